"""Step 04a: story text -> panels (the story format, parsing, checks).

A story is a small text file, close in spirit to the official StoryDiffusion demo::

    // lines starting with // are comments; blank lines are ignored
    style: plain                       (optional: a named style, or a template containing {prompt})
    negative: a crown                  (optional: the negative prompt, joined to the named style's own)
    ref: Lily = lily.png               (optional, repeatable: a reference picture, relative to the story's folder)
    [Lily] a girl                      a character line: [Name] description (class word, trigger word ...)
    [Tom] a boy
    [Lily] walking in the park # Lily goes out.      one line per panel; after the last `#`: the caption
    [Tom] waving on the beach
    [Lily] [Tom] standing in the city # They meet.    a panel may name several characters
    [NC] the city at night # Night falls.             [NC]: a panel without a character

Rules (each broken rule is a ``ValueError`` naming the line and the fix):

* Character lines come first: a ``[Name] ...`` line whose name is new, before the first panel line. Names are
  letters, digits, ``_`` and ``-``; ``NC`` is reserved.
* A panel's prompt is the descriptions of the characters it names, joined by " and ", then ", " and the panel
  text with the tags removed: ``[Lily] walking in the park`` -> ``a girl, walking in the park`` (exactly the
  form of storyworld's captions). ``[NC]`` panels use their text alone. A tag written after other words is
  replaced where it stands, as the official demo does: ``[Lily] and [Tom] running`` -> ``a girl and a boy
  running``.
* The negative prompt is the style's negative joined with the story's own ``negative:`` line (the official demo's
  rule).
* The caption is the text after the last ``#`` (the prompt ends at the first ``#``); without one, the panel
  text with the names written out.
* Every character needs at least one *solo* panel (naming only them): its first solo panels are its reference
  panels, generated together and remembered by consistent self-attention.
* On storyworld the prompt after the style template must fit the tokenizer (32 tokens) and every word must be one
  its small vocabulary knows. On real models (77 tokens) a longer prompt is cut with a warning, as diffusers does
  (the official demo's default style template alone is longer than 77 tokens).

The trigger word of PhotoMaker (``img``, written after the class word: ``[Bob] a man img``) is kept in
:attr:`StoryPanel.id_prompt` and removed from :attr:`StoryPanel.prompt`. ``ref:`` lines name a defined character
and a picture (:attr:`Story.references`); the picture is read, and the trigger word checked, when a story is
generated with them (``sdlite story``, the same as ``--ref NAME=IMAGE``).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tokenization import TRIGGER_WORD, remove_trigger_word

__all__ = [
    "STYLES",
    "StoryCharacter",
    "Story",
    "StoryPanel",
    "StoryReference",
    "StyleTemplate",
    "check_story_prompts",
    "example_story_path",
    "parse_story",
    "read_story",
    "split_reference",
    "unknown_words",
]

NO_CHARACTER = "NC"
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_TAG = re.compile(r"\[([^\[\]]*)\]")


# ----------------------------------------------------------------------------------------------------
# Style templates
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StyleTemplate:
    """A prompt template (must contain ``{prompt}``) and its negative prompt."""

    name: str
    template: str = "{prompt}"
    negative: str = ""

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise ValueError(f"style template {self.template!r} has no {{prompt}} placeholder: "
                             "write e.g. 'comic book panel, {prompt}, bold lines'")

    def apply(self, prompt: str) -> str:
        return self.template.replace("{prompt}", prompt)


# Written for sdlite. "plain" is the storyworld default: its tokenizer knows only storyworld words, so the other
# styles (for real SDXL) would be rejected there with the list of unknown words.
STYLES: dict[str, StyleTemplate] = {
    s.name: s for s in (
        StyleTemplate("plain", "{prompt}", ""),
        StyleTemplate("comic", "comic book panel, {prompt}, bold ink outlines, flat colours, graphic novel art",
                      "photograph, realistic, blurry, lowres, deformed, text, watermark"),
        StyleTemplate("photo", "photo of {prompt}, 35mm, natural light, sharp focus, detailed",
                      "drawing, painting, cartoon, blurry, lowres, deformed, watermark"),
        StyleTemplate("cinematic", "cinematic still, {prompt}, dramatic lighting, shallow depth of field, film grain",
                      "cartoon, drawing, lowres, blurry, deformed, watermark"),
        StyleTemplate("watercolour", "soft watercolour illustration of {prompt}, paper texture, gentle colours",
                      "photograph, harsh lines, lowres, deformed, watermark"),
        StyleTemplate("manga", "black and white manga panel, {prompt}, screentone shading, clean line art",
                      "colour, photograph, lowres, deformed, watermark"),
    )
}


def _resolve_style(value: str, line: int) -> StyleTemplate:
    value = value.strip()
    if value in STYLES:
        return STYLES[value]
    if "{prompt}" in value:
        return StyleTemplate("custom", value, "")
    raise ValueError(f"line {line}: unknown style {value!r}: use one of {sorted(STYLES)} or a template that "
                     "contains {prompt}, e.g. 'style: a drawing of {prompt}'")


# ----------------------------------------------------------------------------------------------------
# The parsed story
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoryCharacter:
    """A character line of a story: `[Name] description` (not a storyworld character: only words)."""

    name: str
    description: str  # as written, trigger word included
    line: int

    @property
    def prompt(self) -> str:
        """The description without the trigger word (what a text-only prompt says)."""
        return remove_trigger_word(self.description, TRIGGER_WORD)


@dataclass(frozen=True)
class StoryReference:
    """A `ref: Name = picture` line: a reference picture of a character, for PhotoMaker's reference-image mode."""

    name: str
    image: str  # as written; read_story makes a relative path relative to the story's folder
    line: int


@dataclass(frozen=True)
class StoryPanel:
    """One panel: its prompt before and after the style template, the characters it names, its caption."""

    index: int  # 0-based position in the story
    line: int  # 1-based line number in the story text
    text: str  # the panel text without tags and caption
    characters: tuple[str, ...]  # names, in order of appearance ((): an [NC] panel)
    caption: str
    prompt: str  # descriptions + text, trigger word removed, style applied
    id_prompt: str  # the same with the trigger word kept (PhotoMaker path)
    raw_prompt: str  # descriptions + text before the style template (trigger removed)
    inline: str = ""  # a line whose tags stand among its words ("[A] and [B] running"): the body, tags in place

    @property
    def solo(self) -> bool:
        return len(self.characters) == 1


@dataclass(frozen=True)
class Story:
    characters: dict[str, StoryCharacter]  # in definition order
    panels: tuple[StoryPanel, ...]
    style: StyleTemplate = field(default_factory=lambda: STYLES["plain"])
    negative_prompt: str = ""  # what generation uses: the story's own `negative:` line, else the style's
    own_negative: str | None = None  # the story's `negative:` line (None: none), kept when the style changes
    references: tuple[StoryReference, ...] = ()  # its `ref:` lines, in order

    def __len__(self) -> int:
        return len(self.panels)

    @property
    def prompts(self) -> list[str]:
        return [p.prompt for p in self.panels]

    @property
    def captions(self) -> list[str]:
        return [p.caption for p in self.panels]

    def solo_panels(self, name: str) -> list[int]:
        return [p.index for p in self.panels if p.characters == (name,)]

    def reference_panels(self, id_length: int | None = 4) -> dict[str, list[int]]:
        """Each character's reference panels: its first ``id_length`` solo panels (None: all of them)."""
        if id_length is not None and (isinstance(id_length, bool) or not isinstance(id_length, int)
                                      or id_length < 1):
            raise ValueError(f"id_length must be an int >= 1 (reference panels per character) or None (all solo "
                             f"panels), got {id_length!r}")
        return {name: self.solo_panels(name)[:id_length] for name in self.characters}

    def with_style(self, style: str | StyleTemplate) -> Story:
        """The same story under another style (a name of STYLES, a template with {prompt}, or a StyleTemplate)."""
        st = style if isinstance(style, StyleTemplate) else _resolve_style(style, 0)
        panels = tuple(StoryPanel(p.index, p.line, p.text, p.characters, p.caption, st.apply(p.raw_prompt),
                                  st.apply(_id_raw(p, self.characters)), p.raw_prompt, p.inline)
                       for p in self.panels)
        return Story(self.characters, panels, st, _negative(st, self.own_negative), self.own_negative)


def _negative(style: StyleTemplate, own: str | None) -> str:
    """The style's negative prompt joined with the story's own (the official demo joins them)."""
    return ", ".join(part for part in (style.negative, own or "") if part)


def _id_raw(panel: StoryPanel, characters: dict[str, StoryCharacter]) -> str:
    if panel.inline:
        return _in_place(panel.inline, {c: characters[c].description for c in panel.characters})
    descs = [characters[c].description for c in panel.characters]
    return _join(descs, panel.text)


def _in_place(body: str, words: dict[str, str]) -> str:
    """Each [Name] of ``body`` replaced by ``words[Name]`` where it stands; spaces and stray commas tidied."""
    text = _TAG.sub(lambda m: f" {words[m.group(1).strip()]} ", body)
    return re.sub(r"\s+([,;:.])", r"\1", " ".join(text.split())).strip(" ,;:")


def _tags_among_words(body: str) -> bool:
    """True when a tag follows other words: "[A] and [B] running", not "[A] [B] running"."""
    lead = re.match(r"^(?:\s*\[[^\[\]]*\])+", body)
    return bool(_TAG.search(body[lead.end():] if lead else body))


def _join(descriptions: list[str], text: str) -> str:
    who = " and ".join(d for d in descriptions if d)
    if who and text:
        return f"{who}, {text}"
    return who or text


# ----------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------
def _split_line(line: str, number: int) -> tuple[str, str | None, list[str], str]:
    """A story line -> (body before the first '#', caption after the last '#' or None, [Name] tags, the text
    without tags)."""
    body, caption = line, None
    if "#" in line:
        caption = " ".join(line.rsplit("#", 1)[1].split())  # after the last '#'
        body = line.split("#", 1)[0].strip()  # the prompt: before the first '#'
    names = [t.strip() for t in _TAG.findall(body)]
    for name in names:
        if not _NAME.match(name):
            raise ValueError(f"line {number}: bad character name [{name}]: use letters, digits, _ or - "
                             "(e.g. [Lily]), and [NC] for a panel without a character")
    if "[" in _TAG.sub("", body) or "]" in _TAG.sub("", body):
        raise ValueError(f"line {number}: unbalanced brackets in {line!r}: write character tags as [Name]")
    rest = " ".join(_TAG.sub(" ", body).split())
    return body, caption, names, re.sub(r"^[,;:]\s*", "", rest)


def _panel_names(names: list[str], rest: str, line: str, number: int,
                 characters: dict[str, StoryCharacter]) -> tuple[str, ...]:
    """The characters a panel line names, checked: defined, each once, or [NC] alone (-> no character)."""
    if not names:
        raise ValueError(f"line {number}: a panel line must name its characters as [Name] or start with [NC] "
                         f"(no character), got {line!r}")
    if NO_CHARACTER in names:
        if names != [NO_CHARACTER]:
            raise ValueError(f"line {number}: [NC] means no character, but the line also names "
                             f"{[n for n in names if n != NO_CHARACTER]}: remove [NC] or the names")
        if not rest:
            raise ValueError(f"line {number}: an [NC] panel needs a text, e.g. [NC] the park at night")
        return ()
    for name in names:
        if name not in characters:
            known = ", ".join(f"[{c}]" for c in characters) or "none"
            where = f"define it at the top, before the first panel, with a line `[{name}] description`"
            raise ValueError(f"line {number}: unknown character [{name}] (known: {known}): {where}")
    if len(set(names)) != len(names):
        raise ValueError(f"line {number}: a panel names the same character twice: name each once")
    return tuple(names)


def _read_lines(text: str):
    """Step 1 of `parse_story`: the lines -> (characters, panel rows (line, text, names, caption), the file's style,
    its negative prompt, its `ref:` lines)."""
    characters: dict[str, StoryCharacter] = {}
    references: list[StoryReference] = []
    rows: list[tuple[int, str, tuple[str, ...], str | None]] = []
    file_style: StyleTemplate | None = None
    negative: str | None = None
    # only "\n" ends a line (str.splitlines would also split at U+2028, NEL, ... and shift the line numbers)
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        low = line.lower()
        if low.startswith("style:"):
            file_style = _resolve_style(line[6:], number)
            continue
        if low.startswith("negative:"):
            negative = line[9:].strip()
            continue
        if low.startswith("ref:"):
            references.append(_reference(line[4:], number))
            continue
        body, caption, names, rest = _split_line(line, number)
        is_definition = (not rows and len(names) == 1 and body.startswith("[") and names[0] != NO_CHARACTER
                         and names[0] not in characters)
        if is_definition:
            if caption is not None:
                raise ValueError(f"line {number}: a character line cannot have a caption ('#'): write "
                                 f"[{names[0]}] description, without '#'")
            if not rest:
                raise ValueError(f"line {number}: character [{names[0]}] has no description: write e.g. "
                                 f"[{names[0]}] a girl")
            characters[names[0]] = StoryCharacter(names[0], rest, number)
            continue
        rows.append((number, body, rest, _panel_names(names, rest, line, number, characters), caption))
    return characters, rows, file_style, negative, references


def split_reference(text: str) -> tuple[str, str] | None:
    """"Lily = lily.png" or "[Lily]=lily.png" -> ("Lily", "lily.png"); None when it is not of that form. The one
    reading of a reference, for the story's `ref:` lines and `sdlite story --ref`."""
    name, sep, image = text.partition("=")
    name, image = name.strip().strip("[]").strip(), image.strip()
    return (name, image) if sep and _NAME.match(name) and image else None


def _reference(value: str, number: int) -> StoryReference:
    """The text after `ref:` -> a StoryReference, its form checked."""
    parts = split_reference(value)
    if parts is None:
        raise ValueError(f"line {number}: write a reference line as `ref: Name = picture.png`, got `ref:{value}`")
    return StoryReference(*parts, number)


def parse_story(text: str, style: str | StyleTemplate | None = None) -> Story:
    """Parse story text (format in the module doc) into a :class:`Story`. ``style`` overrides the file's."""
    if not isinstance(text, str):
        raise TypeError(f"parse_story needs the story text as a str, got {type(text).__name__}: "
                        "use read_story(path) for a file")
    characters, rows, file_style, negative, references = _read_lines(text)
    for ref in references:
        if ref.name not in characters:
            known = ", ".join(f"[{c}]" for c in characters) or "none"
            raise ValueError(f"line {ref.line}: `ref:` names an unknown character [{ref.name}] (known: {known}): "
                             "use the name of a character line")
    if not rows:
        raise ValueError("the story is empty: it has no panel lines. Add one line per panel after the character "
                         "lines, e.g. `[Lily] a girl` then `[Lily] walking in the park # Lily goes out.`")
    st = STYLES["plain"] if file_style is None else file_style
    if style is not None:
        st = style if isinstance(style, StyleTemplate) else _resolve_style(style, 0)
    panels = []  # step 2: the prompts, before and after the style template, with and without the trigger word
    for index, (number, body, rest, names, caption) in enumerate(rows):
        descs = [characters[n].description for n in names]
        inline = body if names and _tags_among_words(body) else ""
        if inline:  # "[Bob] and [Alice] running": each tag becomes its description where it stands
            id_raw = _in_place(inline, {n: characters[n].description for n in names})
            raw = remove_trigger_word(_in_place(inline, {n: characters[n].prompt for n in names}), TRIGGER_WORD)
        else:
            id_raw = _join(descs, rest)
            raw = _join([characters[n].prompt for n in names], remove_trigger_word(rest, TRIGGER_WORD))
        if caption is None:
            caption = _in_place(inline, {n: n for n in names}) if inline else (_join(list(names), rest) if names
                                                                               else rest)
        panels.append(StoryPanel(index, number, rest, names, caption, st.apply(raw), st.apply(id_raw), raw, inline))
    story = Story(characters, tuple(panels), st, _negative(st, negative), negative, tuple(references))
    for name, ch in characters.items():  # step 3: every character has a reference panel
        if not story.solo_panels(name):
            raise ValueError(f"line {ch.line}: character [{name}] has no solo panel (a panel naming only [{name}]) "
                             f"to serve as its reference: add a line like `[{name}] standing in the park`, or "
                             "remove the character")
    return story


def read_story(path: str | Path, style: str | StyleTemplate | None = None) -> Story:
    """Parse a story file (UTF-8, with or without a byte-order mark)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no story file at {path}: write one (see sdlite/story.py for the format) or "
                                f"start from {example_story_path()}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (Windows Notepad) is not part of the first line
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: byte {raw[err.start]:#04x} is not UTF-8: save the story as UTF-8 "
                         "text") from None
    story = parse_story(text, style=style)
    # a relative picture path is the story's folder's, not the folder sdlite runs in (an absolute one stays)
    refs = tuple(dataclasses.replace(r, image=str(path.parent / Path(r.image).expanduser())) for r in story.references)
    return dataclasses.replace(story, references=refs)


def example_story_path() -> Path:
    """The bundled example story, ``data/stories/example.txt``."""
    from .paths import data_file

    return data_file("stories", "example.txt")


# ----------------------------------------------------------------------------------------------------
# Checks against a tokenizer
# ----------------------------------------------------------------------------------------------------
FULL_CLIP_VOCABULARY = 49408
_WORD = re.compile(r"[^\W\d_]+|\d+|[^\w\s]|_")  # a word of letters in any script ("Zürich"), a number, a sign


def is_small_vocabulary(tokenizer) -> bool:
    """True for storyworld's cut-down tokenizer, False for CLIP's full vocabulary."""
    return len(tokenizer) < FULL_CLIP_VOCABULARY // 2


def unknown_words(tokenizer, text: str) -> list[str]:
    """Words of ``text`` a small-vocabulary tokenizer (storyworld's) does not know as one token; [] for CLIP's.

    CLIP's BPE never fails: an unknown word silently becomes letter pieces the storyworld text encoder never saw
    in training. A word is known when it is one token that is not the unknown token.
    """
    if not is_small_vocabulary(tokenizer):
        return []
    unk = tokenizer.unk_token_id
    bad = []
    for word in _WORD.findall(text):
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1 or tokenizer.convert_tokens_to_ids(pieces[0]) == unk:
            if word not in bad:
                bad.append(word)
    return bad


def check_story_prompts(story: Story, tokenizer, use_trigger: bool = False) -> list[str]:
    """Every prompt (and the negative prompt) fits ``tokenizer``: known words, length within model_max_length.

    Raises ValueError naming the line and the fix. On a real model's tokenizer (CLIP's full vocabulary) a prompt
    longer than the limit is not an error: the pipeline cuts it, as diffusers does; the warnings (one per prompt,
    also issued with ``warnings.warn``) are returned.
    """
    import warnings

    cut = []
    limit = tokenizer.model_max_length
    small = is_small_vocabulary(tokenizer)
    texts = [(p.line, p.id_prompt if use_trigger else p.prompt) for p in story.panels]
    if story.negative_prompt:
        texts.append((0, story.negative_prompt))
    for line, prompt in texts:
        where = f"line {line}" if line else "the negative prompt"
        bad = unknown_words(tokenizer, prompt)
        if use_trigger:
            bad = [w for w in bad if w.lower() != TRIGGER_WORD]
        if bad:
            raise ValueError(
                f"{where}: the prompt {prompt!r} uses words the model's small (storyworld) vocabulary does not "
                f"know: {bad}. Use storyworld words only (class words, colours, scenes, actions: see "
                "sdlite.storyworld.all_words()), the 'plain' style, or a real SDXL model (--model <hub id or folder>)")
        n = len(tokenizer(prompt, add_special_tokens=True, truncation=False).input_ids)
        if n > limit and not small:
            ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
            lost = tokenizer.decode(ids[limit - 2:])
            cut.append(f"{where}: the prompt is {n} tokens after the style template, the text encoder reads {limit}: "
                       f"the end is cut ({lost[:60]!r}{' ...' if len(lost) > 60 else ''}), as diffusers does")
            warnings.warn(cut[-1], UserWarning, stacklevel=2)
            continue
        if n > limit:
            hint = " or drop the style template (style: plain)" if small or story.style.name != "plain" else ""
            raise ValueError(f"{where}: the prompt is {n} tokens after the style template, but the tokenizer takes "
                             f"{limit} (BOS and EOS included): shorten the panel text or the character "
                             f"description{hint}")
    return cut
