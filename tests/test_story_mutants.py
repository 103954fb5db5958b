"""The story format's promises, pinned where the first mutation run of sdlite/story.py found them unchecked.

Pure Python: no model, no tokenizer file. The checks against a tokenizer use `WordTokenizer`, a word-level
stand-in with the interface `check_story_prompts` reads (length, model_max_length, tokenize, ids, decode).
Error messages are matched whole (anchored, case as written): a user reads them to fix the story.
"""
import os
import re
import warnings

import pytest

from matching import whole
from sdlite.story import (
    FULL_CLIP_VOCABULARY,
    STYLES,
    Story,
    StyleTemplate,
    check_story_prompts,
    is_small_vocabulary,
    parse_story,
    read_story,
)


class _Encoding:
    def __init__(self, ids):
        self.input_ids = ids


class WordTokenizer:
    """One token per word or sign (the token is the word itself); words outside ``vocab`` are cut into letters."""

    unk_token_id = 0

    def __init__(self, vocab=(), size=FULL_CLIP_VOCABULARY, limit=77):
        self.vocab = {w: i + 1 for i, w in enumerate(vocab)}
        self.size = size
        self.model_max_length = limit

    def __len__(self):
        return self.size

    def tokenize(self, word):
        word = word.lower()
        return [word] if word in self.vocab else list(word)

    def convert_tokens_to_ids(self, token):
        return self.vocab.get(token, self.unk_token_id)

    def __call__(self, text, add_special_tokens=True, truncation=False):
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return _Encoding(["<bos>", *words, "<eos>"] if add_special_tokens else words)

    def decode(self, ids):
        return " ".join(ids)


STORY_WORDS = ("a", "girl", "boy", "img", ",", "walking", "in", "the", "park", "running", "and", "crown")


def small(limit=77):
    """A storyworld-like tokenizer: a small vocabulary, every word it does not know is an error."""
    return WordTokenizer(STORY_WORDS, size=1000, limit=limit)


# ------------------------------------------------------------------------------------------------ vocabulary size
def test_small_vocabulary_is_below_half_of_clip():
    assert is_small_vocabulary(WordTokenizer(size=FULL_CLIP_VOCABULARY // 2 - 1))
    assert not is_small_vocabulary(WordTokenizer(size=FULL_CLIP_VOCABULARY // 2))
    assert is_small_vocabulary(WordTokenizer(size=20000))  # e.g. a storyworld vocabulary grown to 20k words
    assert not is_small_vocabulary(WordTokenizer(size=FULL_CLIP_VOCABULARY))


# ------------------------------------------------------------------------------------------------ checks: words
def test_unknown_word_in_the_negative_prompt_is_named_as_the_negative_prompt():
    story = parse_story("negative: a dragon\n[Ann] a girl\n[Ann] walking in the park")
    with pytest.raises(ValueError, match=whole(
            "the negative prompt: the prompt 'a dragon' uses words the model's small (storyworld) vocabulary does "
            "not know: ['dragon']. Use storyworld words only (class words, colours, scenes, actions: see "
            "sdlite.storyworld.all_words()), the 'plain' style, or a real SDXL model (--model <hub id or folder>)")):
        check_story_prompts(story, small())


def test_trigger_word_is_allowed_only_when_checking_the_id_prompts():
    story = parse_story("[Ann] a girl img\n[Ann] walking in the park")
    tok = WordTokenizer(tuple(w for w in STORY_WORDS if w != "img"), size=1000)  # storyworld does not know "img"
    assert check_story_prompts(story, tok) == []  # the text-only prompt has no trigger word
    assert check_story_prompts(story, tok, use_trigger=True) == []  # the trigger word is not an unknown word
    assert check_story_prompts(parse_story("[Ann] a girl IMG\n[Ann] walking"), tok, use_trigger=True) == []
    bad = parse_story("[Ann] a girl img\n[Ann] flying in the park")
    with pytest.raises(ValueError, match=whole(
            "line 2: the prompt 'a girl img, flying in the park' uses words the model's small (storyworld) "
            "vocabulary does not know: ['flying']. Use storyworld words only (class words, colours, scenes, "
            "actions: see sdlite.storyworld.all_words()), the 'plain' style, or a real SDXL model "
            "(--model <hub id or folder>)")):
        check_story_prompts(bad, tok, use_trigger=True)


def test_default_check_reads_the_text_only_prompt_and_use_trigger_the_id_prompt():
    # "a girl , walking in the park" is 7 tokens + BOS/EOS = 9: it fits a limit of 9; the ID prompt has one more
    story = parse_story("[Ann] a girl img\n[Ann] walking in the park")
    assert check_story_prompts(story, small(limit=9)) == []
    with pytest.raises(ValueError, match=whole(
            "line 2: the prompt is 10 tokens after the style template, but the tokenizer takes 9 (BOS and EOS "
            "included): shorten the panel text or the character description or drop the style template "
            "(style: plain)")):
        check_story_prompts(story, small(limit=9), use_trigger=True)


# ------------------------------------------------------------------------------------------------ checks: length
def test_small_vocabulary_prompt_exactly_at_the_limit_fits_and_one_over_is_an_error():
    story = parse_story("[Ann] a girl\n[Ann] walking in the park")  # 9 tokens
    assert check_story_prompts(story, small(limit=9)) == []
    with pytest.raises(ValueError, match=whole(
            "line 2: the prompt is 9 tokens after the style template, but the tokenizer takes 8 (BOS and EOS "
            "included): shorten the panel text or the character description or drop the style template "
            "(style: plain)")):
        check_story_prompts(story, small(limit=8))


def test_full_vocabulary_prompt_exactly_at_the_limit_is_not_cut():
    story = parse_story("[Ann] a girl\n[Ann] walking in the park")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_story_prompts(story, WordTokenizer(limit=9)) == []


def test_cut_warning_shows_at_most_60_characters_of_the_lost_end():
    story60 = parse_story("[Ann] a girl\n[Ann] walking in the park " + "x" * 60)
    story61 = parse_story("[Ann] a girl\n[Ann] walking in the park " + "x" * 61)
    with pytest.warns(UserWarning) as rec:
        cut60 = check_story_prompts(story60, WordTokenizer(limit=9))
        cut61 = check_story_prompts(story61, WordTokenizer(limit=9))
    assert cut60 == ["line 2: the prompt is 10 tokens after the style template, the text encoder reads 9: the end "
                     "is cut ('" + "x" * 60 + "'), as diffusers does"]
    assert cut61 == ["line 2: the prompt is 10 tokens after the style template, the text encoder reads 9: the end "
                     "is cut ('" + "x" * 60 + "' ...), as diffusers does"]
    assert [str(w.message) for w in rec] == cut60 + cut61
    assert all(w.category is UserWarning for w in rec)


def test_every_long_prompt_gets_its_own_warning():
    text = "negative: a crown in the park and the park\n[Ann] a girl\n[Ann] walking in the park\n[Ann] running in the park"
    with pytest.warns(UserWarning) as rec:
        cut = check_story_prompts(parse_story(text), WordTokenizer(limit=8))
    assert [c.split(":")[0] for c in cut] == ["line 3", "line 4", "the negative prompt"]
    assert len(rec) == 3


def test_cut_warning_points_at_the_caller():
    if "MUTANT_UNDER_TEST" in os.environ:
        pytest.skip("under mutmut the trampoline adds frames between the caller and check_story_prompts")
    story = parse_story("[Ann] a girl\n[Ann] walking in the park and the park")
    with pytest.warns(UserWarning) as rec:
        check_story_prompts(story, WordTokenizer(limit=8))
    assert rec[0].filename == __file__


# ------------------------------------------------------------------------------------------------ parsing
def test_parse_story_wants_text_not_bytes():
    with pytest.raises(TypeError, match=whole(
            "parse_story needs the story text as a str, got bytes: use read_story(path) for a file")):
        parse_story(b"[Ann] a girl\n[Ann] walking")


def test_empty_story_message():
    with pytest.raises(ValueError, match=whole(
            "the story is empty: it has no panel lines. Add one line per panel after the character lines, e.g. "
            "`[Lily] a girl` then `[Lily] walking in the park # Lily goes out.`")):
        parse_story("// nothing yet\n[Ann] a girl\n")


def test_character_without_solo_panel_message():
    with pytest.raises(ValueError, match=whole(
            "line 2: character [Bob] has no solo panel (a panel naming only [Bob]) to serve as its reference: add "
            "a line like `[Bob] standing in the park`, or remove the character")):
        parse_story("[Ann] a girl\n[Bob] a boy\n[Ann] walking\n[Ann] [Bob] running")


def test_style_and_negative_lines_need_no_space_after_the_colon():
    story = parse_story("style:comic\nnegative:crown\n[Ann] a girl\n[Ann] walking")
    assert story.style == STYLES["comic"]
    assert story.own_negative == "crown"
    assert story.negative_prompt == STYLES["comic"].negative + ", crown"


def test_a_story_without_negative_line_has_no_own_negative():
    story = parse_story("[Ann] a girl\n[Ann] walking")
    assert story.own_negative is None
    assert story.negative_prompt == ""


def test_character_records_its_name_description_and_line():
    story = parse_story("// cast\n[Ann] a girl img\n[Ann] walking")
    ann = story.characters["Ann"]
    assert (ann.name, ann.description, ann.line, ann.prompt) == ("Ann", "a girl img", 2, "a girl")


def test_panel_records_its_text_and_no_inline_body_when_tags_lead():
    story = parse_story("[Ann] a girl\n[Ann] walking in the park # Ann goes out.")
    p = story.panels[0]
    assert (p.index, p.line, p.text, p.characters, p.caption, p.inline) == (
        0, 2, "walking in the park", ("Ann",), "Ann goes out.", "")


def test_comma_after_the_leading_tags_is_dropped():
    story = parse_story("[Ann] a girl\n[Ann], walking in the park")
    assert story.panels[0].text == "walking in the park"
    assert story.prompts == ["a girl, walking in the park"]


def test_a_tag_after_words_is_replaced_where_it_stands():
    story = parse_story("[Ann] a girl\n[Ann] walking\nin the park with [Ann] # Ann waits.")
    assert story.panels[1].prompt == "in the park with a girl"
    assert story.panels[1].inline == "in the park with [Ann]"


def test_inline_tags_keep_the_punctuation_tidy():
    story = parse_story("[Ann] a girl\n[Bob] a boy\n[Ann] walking\n[Bob] walking\n"
                        "[Ann] meets [Bob], smiling\n[Ann] and [Bob] running,")
    assert story.prompts[2:] == ["a girl meets a boy, smiling", "a girl and a boy running"]
    assert story.captions[2:] == ["Ann meets Bob, smiling", "Ann and Bob running"]


def test_names_in_captions_are_kept_whole_even_ending_in_x():
    story = parse_story("[Ann] a girl\n[MAX] a boy\n[Ann] walking\n[MAX] walking\n[Ann] meets [MAX]")
    assert story.captions[-1] == "Ann meets MAX"
    assert story.panels[-1].inline == "[Ann] meets [MAX]"


def test_inline_panel_keeps_the_trigger_word_only_in_the_id_prompt():
    story = parse_story("[Ann] a girl img\n[Bob] a boy\n[Ann] walking\n[Bob] walking\n[Bob] and [Ann] img running")
    p = story.panels[-1]
    assert p.id_prompt == "a boy and a girl img img running"
    assert p.prompt == "a boy and a girl running"


# ------------------------------------------------------------------------------------------------ bad lines
def test_bad_character_name_message():
    with pytest.raises(ValueError, match=whole(
            "line 2: bad character name [Li ly]: use letters, digits, _ or - (e.g. [Lily]), and [NC] for a panel "
            "without a character")):
        parse_story("[Ann] a girl\n[Li ly] walking")


def test_a_lone_opening_bracket_is_unbalanced():
    with pytest.raises(ValueError, match=whole(
            "line 2: unbalanced brackets in '[Ann] walking [ in the park': write character tags as [Name]")):
        parse_story("[Ann] a girl\n[Ann] walking [ in the park")


def test_panel_without_tags_message_quotes_the_line():
    with pytest.raises(ValueError, match=whole(
            "line 3: a panel line must name its characters as [Name] or start with [NC] (no character), got "
            "'walking in the park # out'")):
        parse_story("[Ann] a girl\n[Ann] walking\nwalking in the park # out")


def test_nc_with_names_message_lists_the_other_names():
    with pytest.raises(ValueError, match=whole(
            "line 3: [NC] means no character, but the line also names ['Ann']: remove [NC] or the names")):
        parse_story("[Ann] a girl\n[Ann] walking\n[NC] [Ann] the city")


def test_unknown_character_message_lists_the_known_ones():
    with pytest.raises(ValueError, match=whole(
            "line 4: unknown character [Cat] (known: [Ann], [Bob]): define it at the top, before the first panel, "
            "with a line `[Cat] description`")):
        parse_story("[Ann] a girl\n[Bob] a boy\n[Ann] walking\n[Cat] running")
    with pytest.raises(ValueError, match=whole(
            "line 2: unknown character [Cat] (known: none): define it at the top, before the first panel, "
            "with a line `[Cat] description`")):
        parse_story("[NC] the city\n[Cat] running")


# ------------------------------------------------------------------------------------------------ styles
def test_custom_template_style_is_named_custom_with_no_negative():
    story = parse_story("style: a drawing of {prompt}\n[Ann] a girl\n[Ann] walking")
    assert story.style == StyleTemplate("custom", "a drawing of {prompt}", "")
    assert story.negative_prompt == ""
    assert story.prompts == ["a drawing of a girl, walking"]


def test_unknown_style_message():
    known = "['cinematic', 'comic', 'manga', 'photo', 'plain', 'watercolour']"
    with pytest.raises(ValueError, match=whole(
            f"line 1: unknown style 'noir': use one of {known} or a template that contains {{prompt}}, e.g. "
            "'style: a drawing of {prompt}'")):
        parse_story("style: noir\n[Ann] a girl\n[Ann] walking")
    # a style given as an argument has no line: it is reported as line 0
    message = whole(f"line 0: unknown style 'noir': use one of {known} or a template that contains {{prompt}}, "
                    "e.g. 'style: a drawing of {prompt}'")
    with pytest.raises(ValueError, match=message):
        parse_story("[Ann] a girl\n[Ann] walking", style="noir")
    with pytest.raises(ValueError, match=message):
        parse_story("[Ann] a girl\n[Ann] walking").with_style("noir")


def test_template_without_placeholder_message():
    with pytest.raises(ValueError, match=whole(
            "style template 'a drawing' has no {prompt} placeholder: write e.g. 'comic book panel, {prompt}, "
            "bold lines'")):
        StyleTemplate("mine", "a drawing")


def test_a_style_template_object_is_used_as_given():
    mine = StyleTemplate("mine", "ink of {prompt}", "colour")
    story = parse_story("[Ann] a girl\n[Ann] walking", style=mine)
    assert story.style is mine
    assert story.prompts == ["ink of a girl, walking"]
    assert story.negative_prompt == "colour"
    assert parse_story("[Ann] a girl\n[Ann] walking").with_style(mine) == story


STORY = ("negative: a crown\n[Ann] a girl img\n[Bob] a boy\n[Ann] walking in the park # Ann goes out.\n"
         "[Bob] running\n[Bob] and [Ann] img running\n[NC] the park")


@pytest.mark.parametrize("style", ["comic", "a drawing of {prompt}", STYLES["photo"], "plain"])
def test_with_style_is_the_story_parsed_with_that_style(style):
    assert parse_story(STORY).with_style(style) == parse_story(STORY, style=style)
    assert parse_story(STORY, style="manga").with_style(style) == parse_story(STORY, style=style)


def test_with_style_keeps_the_id_prompt_with_its_text():
    story = parse_story(STORY).with_style("comic")
    assert story.panels[0].id_prompt == STYLES["comic"].apply("a girl img, walking in the park")
    assert story.panels[0].prompt == STYLES["comic"].apply("a girl, walking in the park")
    assert story.own_negative == "a crown"


# ------------------------------------------------------------------------------------------------ references
def test_reference_panels_default_to_the_first_four_solo_panels():
    story = parse_story("[Ann] a girl\n" + "\n".join(f"[Ann] walking {i}" for i in range(6)))
    assert story.reference_panels() == {"Ann": [0, 1, 2, 3]}
    assert story.reference_panels(None) == {"Ann": [0, 1, 2, 3, 4, 5]}


@pytest.mark.parametrize("bad", ["2", 2.5, 2.0, True, 0])
def test_reference_panels_refuse_a_non_int_count(bad):
    story = parse_story("[Ann] a girl\n[Ann] walking")
    with pytest.raises(ValueError, match=whole(
            "id_length must be an int >= 1 (reference panels per character) or None (all solo panels), got "
            f"{bad!r}")):
        story.reference_panels(bad)


# ------------------------------------------------------------------------------------------------ files
def test_read_story_applies_the_style_argument(tmp_path):
    path = tmp_path / "s.txt"
    path.write_text("[Ann] a girl\n[Ann] walking", encoding="utf-8")
    assert read_story(path, style="comic") == parse_story("[Ann] a girl\n[Ann] walking", style="comic")
    assert read_story(path, "comic").style == STYLES["comic"]


def test_read_story_non_utf8_message(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("[Ann] a girl\n[Ann] walking in Z\u00fcrich".encode("latin-1"))
    with pytest.raises(ValueError, match=whole(
            f"{path}: line 2: byte 0xfc is not UTF-8: save the story as UTF-8 text")):
        read_story(path)
