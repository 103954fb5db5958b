"""Story text -> panels: the format, the references, every bad input, and the checks against a tokenizer."""
import pytest

from sdlite.storyworld.models import build_storyworld_tokenizer
from sdlite.story import (
    STYLES, StyleTemplate, check_story_prompts, example_story_path, parse_story, read_story, unknown_words,
)
from sdlite.tokenization import load_clip_tokenizers

TWO = """
// two characters
style: plain
[Lily] a girl
[Tom] a boy img
[Lily] walking in the park # Lily goes out.
[Tom] waving on the beach
[Lily] [Tom] standing in the city # They meet.
[NC] the city at night # Night falls.
[Tom] sitting in the snow # Tom # rests.
"""


@pytest.fixture(scope="module")
def sw_tok():
    return build_storyworld_tokenizer()


@pytest.fixture(scope="module")
def clip_tok():
    return load_clip_tokenizers()[0]


def test_parse_characters_panels_prompts_captions():
    s = parse_story(TWO)
    assert list(s.characters) == ["Lily", "Tom"]
    assert s.characters["Tom"].description == "a boy img" and s.characters["Tom"].line == 5
    assert len(s) == 5
    assert s.prompts == ["a girl, walking in the park", "a boy, waving on the beach",
                         "a girl and a boy, standing in the city", "the city at night", "a boy, sitting in the snow"]
    # captions: after the LAST '#'; without one, the text with the names written out
    assert s.captions == ["Lily goes out.", "Tom, waving on the beach", "They meet.", "Night falls.", "rests."]
    assert [p.characters for p in s.panels] == [("Lily",), ("Tom",), ("Lily", "Tom"), (), ("Tom",)]
    assert [p.line for p in s.panels] == [6, 7, 8, 9, 10]
    assert s.panels[1].id_prompt == "a boy img, waving on the beach"  # trigger kept for the PhotoMaker path


def test_reference_panels_are_first_solo_panels():
    s = parse_story(TWO)
    assert s.reference_panels(4) == {"Lily": [0], "Tom": [1, 4]}
    assert s.reference_panels(1) == {"Lily": [0], "Tom": [1]}
    assert s.reference_panels(None) == {"Lily": [0], "Tom": [1, 4]}
    with pytest.raises(ValueError, match="id_length must be an int >= 1"):
        s.reference_panels(0)


def test_any_number_of_characters():
    names = [f"C{i}" for i in range(7)]
    text = "\n".join(f"[{n}] a man" for n in names) + "\n" + "\n".join(f"[{n}] walking in the park" for n in names)
    s = parse_story(text + "\n[C0] [C1] [C2] standing in the city")
    assert len(s.characters) == 7 and s.panels[-1].characters == ("C0", "C1", "C2")
    assert s.panels[-1].prompt == "a man and a man and a man, standing in the city"


def test_styles_apply_and_override():
    s = parse_story("style: comic\n[A] a man\n[A] reading a book")
    assert s.style.name == "comic" and s.prompts[0] == STYLES["comic"].apply("a man, reading a book")
    assert s.negative_prompt == STYLES["comic"].negative
    s2 = parse_story("style: a drawing of {prompt}\nnegative: blurry\n[A] a man\n[A] reading")
    assert s2.prompts == ["a drawing of a man, reading"] and s2.negative_prompt == "blurry"
    s3 = parse_story("style: comic\n[A] a man\n[A] reading", style="plain")
    assert s3.prompts == ["a man, reading"]
    assert s.with_style("plain").prompts == ["a man, reading a book"]


def test_example_story_is_storyworld_friendly(sw_tok):
    s = read_story(example_story_path())
    assert 4 <= len(s) <= 8 and s.style.name == "plain"
    check_story_prompts(s, sw_tok)  # no error: every word is in the storyworld vocabulary
    assert all(c for c in s.captions)


# ---------------------------------------------------------------- bad input: line number + fix
def test_unknown_character_names_line_and_fix():
    with pytest.raises(ValueError, match=r"line 3: unknown character \[Bob\].*define it at the top"):
        parse_story("[Lily] a girl\n[Lily] walking\n[Bob] waving")


def test_empty_story():
    with pytest.raises(ValueError, match="the story is empty.*one line per panel"):
        parse_story("// nothing\n\n")
    with pytest.raises(ValueError, match="the story is empty"):
        parse_story("[Lily] a girl\n[Tom] a boy")  # only character lines


def test_character_without_solo_panel():
    with pytest.raises(ValueError, match=r"line 2: character \[Tom\] has no solo panel.*add a line like `\[Tom\]"):
        parse_story("[Lily] a girl\n[Tom] a boy\n[Lily] walking\n[Lily] [Tom] waving")


def test_prompt_too_long_after_template(sw_tok, clip_tok):
    long_panel = "[A] a boy\n[A] " + "walking " * 30 + "in the park"
    with pytest.raises(ValueError, match=r"line 2: the prompt is \d+ tokens after the style template.*takes 32"):
        check_story_prompts(parse_story(long_panel), sw_tok)
    # fits CLIP's 77 plainly, but not after a long template
    story = parse_story("[A] a man\n[A] " + "walking " * 65)  # 70 tokens
    assert check_story_prompts(story, clip_tok) == []
    # on a real model a longer prompt is cut with a warning, as diffusers does (the official default style is
    # longer than 77 tokens), never refused
    with pytest.warns(UserWarning, match=r"line 2: the prompt is \d+ tokens after the style template, the text "
                                         r"encoder reads 77: the end is cut \('shallow depth of field"):
        cut = check_story_prompts(story.with_style("cinematic"), clip_tok)
    assert len(cut) == 1 and "film grain" in cut[0]


def test_words_outside_the_storyworld_vocabulary(sw_tok, clip_tok):
    story = parse_story("[A] a dragon\n[A] flying over the park")
    with pytest.raises(ValueError, match=r"line 2: .*does not know: \['dragon', 'flying', 'over'\].*storyworld words"):
        check_story_prompts(story, sw_tok)
    check_story_prompts(story, clip_tok)  # real SDXL: any word
    # a named style is rejected on storyworld for the same reason
    with pytest.raises(ValueError, match="does not know"):
        check_story_prompts(parse_story("[A] a boy\n[A] walking").with_style("comic"), sw_tok)
    assert unknown_words(sw_tok, "a boy, walking in the park") == []
    assert unknown_words(clip_tok, "a dragon") == []


def test_other_bad_lines():
    with pytest.raises(ValueError, match=r"line 1: character \[A\] has no description"):
        parse_story("[A]\n[A] walking")
    with pytest.raises(ValueError, match=r"line 2: bad character name \[Dr\. Who\]"):
        parse_story("[A] a man\n[Dr. Who] walking")
    with pytest.raises(ValueError, match=r"line 2: a panel line must name its characters"):
        parse_story("[A] a man\nwalking in the park")
    with pytest.raises(ValueError, match=r"line 3: \[NC\] means no character"):
        parse_story("[A] a man\n[A] walking\n[NC] [A] in the park")
    with pytest.raises(ValueError, match=r"line 2: an \[NC\] panel needs a text"):
        parse_story("[A] a man\n[NC] # empty")
    with pytest.raises(ValueError, match="line 1: unknown style 'noir'"):
        parse_story("style: noir\n[A] a man\n[A] walking")
    with pytest.raises(ValueError, match="line 1: a character line cannot have a caption"):
        parse_story("[A] a man # hello\n[A] walking")
    with pytest.raises(ValueError, match="unbalanced brackets"):
        parse_story("[A] a man\n[A] walking ]")
    with pytest.raises(ValueError, match="names the same character twice"):
        parse_story("[A] a man\n[A] walking\n[A] [A] waving")
    with pytest.raises(ValueError, match="no {prompt} placeholder"):
        StyleTemplate("x", "just words")
    with pytest.raises(TypeError, match="story text as a str"):
        parse_story(b"[A] a man")
    with pytest.raises(FileNotFoundError, match="no story file"):
        read_story("/nonexistent/story.txt")


def test_with_style_takes_the_new_styles_negative_unless_the_story_wrote_its_own():
    text = "[Lily] a girl\n[Lily] walking in the park\n"
    comic = parse_story(text, style="comic")
    assert comic.negative_prompt == STYLES["comic"].negative != ""
    for name in ("plain", "photo"):  # the same as parsing with that style from the start
        assert comic.with_style(name).negative_prompt == parse_story(text, style=name).negative_prompt
        assert comic.with_style(name).negative_prompt == STYLES[name].negative
    own = parse_story("negative: a crown\n" + text, style="comic")
    # the style's negative and the story's own are joined, as the official demo does
    assert own.negative_prompt == STYLES["comic"].negative + ", a crown"
    assert own.with_style("photo").negative_prompt == STYLES["photo"].negative + ", a crown"
    assert own.with_style("plain").negative_prompt == "a crown"  # plain has no negative of its own


def test_tags_among_words_are_replaced_where_they_stand():
    story = parse_story("[Bob] a man img\n[Alice] a woman\n[Bob] reading\n[Alice] singing\n"
                        "[Bob] and [Alice] running in the park # Together.\n[Bob] [Alice] at home\n"
                        "[Alice] waving at [Bob]")
    assert story.panels[2].prompt == "a man and a woman running in the park"
    assert story.panels[2].id_prompt == "a man img and a woman running in the park"
    assert story.panels[2].characters == ("Bob", "Alice") and story.panels[2].caption == "Together."
    assert story.panels[3].prompt == "a man and a woman, at home"  # tags first: the usual form
    assert story.panels[4].prompt == "a woman waving at a man" and story.panels[4].caption == "Alice waving at Bob"
    assert story.with_style("comic").panels[2].prompt == STYLES["comic"].apply("a man and a woman running in the park")


def test_the_format_example_in_the_module_doc_runs_on_storyworld_and_non_ascii_words_stay_whole():
    import sdlite.story as story_module
    from sdlite.storyworld.models import build_storyworld_tokenizer

    block = story_module.__doc__.split("::", 1)[1].split("\n\n")[1]
    lines = [line.strip().split("   ")[0].strip() for line in block.splitlines() if line.strip()]
    story = parse_story("\n".join(lines))
    check_story_prompts(story, build_storyworld_tokenizer())  # raises on a word storyworld does not know
    assert len(story) == 4 and story.negative_prompt == "a crown"
    tok = build_storyworld_tokenizer()
    assert unknown_words(tok, "walking in Zürich, 2 km") == ["Zürich", "2", "km"]  # not ["ü", "rich"]
