"""The comic page pixel by pixel, and the geometry behind it, at the boundaries (written against the survivors of
`make mutation MODULE=comic`, docs/mutation.md): a page drawn by the rules below must equal `make_page`'s exactly.

The drawing rules: a white page; the title's lines centred, the first 12 px from the top, one every
int(1.9 x font size) px; each panel resized to its box (nearest-neighbour by default) and pasted under the title;
a 2 px black frame just around it; its caption's lines centred 4 px under it, one every line height; all text black,
anchored at its middle-ascender ("ma")."""
from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image, ImageDraw

from matching import whole
from sdlite import comic
from sdlite.comic import (
    bundled_font, classic_rows, layout_boxes, load_font, make_page, missing_glyphs, page_geometry, wrap_text,
)

OTHER_FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSerif.ttf"  # a second font at hand


def panels(n: int, seed: int = 0) -> list[np.ndarray]:
    """Random 8x8 pictures: nearest-neighbour and Lanczos upscaling give different pixels."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


def drawn_by_the_rules(images, captions, g, resample=Image.NEAREST) -> np.ndarray:
    """The page the module doc describes, drawn from the geometry (whose numbers are tested on their own)."""
    page = Image.new("RGB", (g.width, g.height + g.title_h), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    for t, line in enumerate(g.title_lines):
        draw.text((g.width // 2, 12 + t * int(g.font_size * 1.9)), line, fill=(0, 0, 0), font=g.title_font,
                  anchor="ma")
    pixels = np.array(page)
    for box, im in zip(g.boxes, images):
        top = box.y + g.title_h
        pixels[top:top + box.h, box.x:box.x + box.w] = np.array(Image.fromarray(im).resize((box.w, box.h), resample))
        frame = np.zeros_like(pixels[top - 1:top + box.h + 1, box.x - 1:box.x + box.w + 1])
        frame[2:-2, 2:-2] = pixels[top + 1:top + box.h - 1, box.x + 1:box.x + box.w - 1]  # 2 px: one out, one in
        pixels[top - 1:top + box.h + 1, box.x - 1:box.x + box.w + 1] = frame
    page = Image.fromarray(pixels)
    draw = ImageDraw.Draw(page)
    for box, caption in zip(g.boxes, captions):
        for t, line in enumerate(wrap_text(caption, g.font, box.w - 4)):
            draw.text((box.x + box.w // 2, box.y + g.title_h + box.h + 4 + t * g.line_h), line, fill=(0, 0, 0),
                      font=g.font, anchor="ma")
    return np.array(page)


CAPTIONS = ["Lily goes out into the park on a windy day.", "Tom waves.", "", "They meet by the old fountain at noon."]
TITLE = "The long and windy afternoon of Lily and Tom in the park"


@pytest.mark.parametrize("layout, columns, seed, resample, font", [
    ("grid", 3, None, "nearest", None), ("classic", 2, 3, "lanczos", OTHER_FONT)])
def test_the_page_is_drawn_exactly_by_the_rules(layout, columns, seed, resample, font):
    images = panels(4)
    page = make_page(images, CAPTIONS, layout=layout, panel_size=97, columns=columns, title=TITLE, font_size=14,
                     seed=seed, resample=resample, font_path=font)
    g = page_geometry(CAPTIONS, layout, 97, columns, TITLE, 14, seed, font)
    assert len(g.title_lines) >= 2 and max(len(wrap_text(c, g.font, 93)) for c in CAPTIONS) >= 2  # rules exercised
    assert layout == "classic" or (g.width % 2, g.boxes[0].w % 2) == (1, 1)  # odd widths: centring rounds down
    method = Image.NEAREST if resample == "nearest" else Image.LANCZOS
    expected = drawn_by_the_rules(images, CAPTIONS, g, method)
    assert page.mode == "RGB" and np.array_equal(np.array(page), expected)


def test_inputs_of_other_kinds_and_the_defaults():
    images = panels(2)
    as_pil = [Image.fromarray(im) for im in images]
    page = make_page([as_pil[0], images[1].astype(np.int64)])  # a PIL image and an int64 array: same pixels
    assert page.size == (2 * 256 + 3 * 12, page_geometry(["", ""]).height)  # default panel_size 256, no captions
    g = page_geometry(["", ""])
    assert np.array_equal(np.array(page), drawn_by_the_rules(images, ["", ""], g))
    palette = as_pil[0].convert("P", palette=Image.ADAPTIVE, colors=16)  # a palette image keeps its colours
    page = np.array(make_page([palette], ["x"], panel_size=32))
    box = page_geometry(["x"], panel_size=32).boxes[0]
    panel = np.array(palette.convert("RGB").resize((32, 32), Image.NEAREST))
    assert np.array_equal(page[box.y + 1:box.y + 31, box.x + 1:box.x + 31], panel[1:31, 1:31])


def test_a_panel_with_transparency_shows_its_colours():
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    page = np.array(make_page([rgba], panel_size=32))
    box = page_geometry([""], panel_size=32).boxes[0]
    panel = np.array(rgba.convert("RGB").resize((32, 32), Image.NEAREST))  # the alpha channel is dropped
    assert np.array_equal(page[box.y + 1:box.y + 31, box.x + 1:box.x + 31], panel[1:31, 1:31])


def test_layout_defaults_and_limits():
    assert layout_boxes(3)[2] == layout_boxes(3, caption_lines=2, font_size=16)[2]  # the documented defaults
    assert layout_boxes(3)[2][0].caption_h == 2 * 20 + 6
    w, h, boxes = layout_boxes(2, columns=1, panel_size=16)  # one column and the smallest panel are allowed
    assert w == 16 + 2 * 12 and [(b.x, b.y) for b in boxes] == [(12, 12), (12, 12 + 16 + 46 + 12)]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"columns must be an int >= 1, got {bad!r}"):
            layout_boxes(2, columns=bad)
    with pytest.raises(ValueError, match=r"panel_size=15 px is too small to read: use >= 16"):
        layout_boxes(2, panel_size=15)
    with pytest.raises(ValueError, match="a page needs at least one panel, got n=0"):
        layout_boxes(0, "grid")


def test_the_page_size_limit_and_its_message(monkeypatch):
    captions = ["a"] * 6
    g = page_geometry(captions, panel_size=2048)
    monkeypatch.setattr(comic, "MAX_PAGE_PIXELS", g.width * g.height)  # exactly at the limit is allowed
    page_geometry(captions, panel_size=2048)
    monkeypatch.undo()
    width, height, _ = layout_boxes(6, "grid", 4096, 1, 12, 1, 4096 // 16)  # one caption line at font size 256
    total = width * height
    assert total > comic.MAX_PAGE_PIXELS
    with pytest.raises(ValueError, match=rf"^the page would be {width} x {height} px \({total / 1e6:.0f} megapixels, "
                                         r"at most 80\): use fewer panels per page, a smaller --panel-size, or shorter"):
        page_geometry(captions, panel_size=4096, columns=1, title="")


def test_make_page_messages():
    with pytest.raises(ValueError, match="make_page needs at least one panel image"):
        make_page([])
    with pytest.raises(ValueError, match=r"2 panels but 1 captions: give one caption per panel \(use '' for none\)"):
        make_page(panels(2), ["a"])
    with pytest.raises(ValueError, match="resample must be 'nearest' .* or 'lanczos' .*, got 'bicubic'"):
        make_page(panels(1), resample="bicubic")


def test_geometry_numbers():
    g = page_geometry(["a caption"], panel_size=320)
    assert (g.font_size, g.line_h, g.title_h, g.title_font, g.title_lines) == (20, 25, 0, None, [])  # 320 // 16
    g = page_geometry(["a", "b", "c"], "classic", panel_size=64, title="Lily and Tom go to the park together",
                      font_size=20, seed=5, font_path=OTHER_FONT)
    assert g.font.path == g.title_font.path == str(OTHER_FONT) and g.title_font.size == 30  # 1.5 x 20
    assert len(g.title_lines) == 5 and g.title_h == 5 * 38 + 12  # one line every int(1.9 x 20) px, 12 px margin
    assert g.boxes == layout_boxes(3, "classic", 64, 2, 12, 1, 20, seed=5)[2]  # the seed reaches the layout
    assert page_geometry(["a"] * 3, "classic", 64, seed=5).boxes != page_geometry(["a"] * 3, "classic", 64).boxes


def text_of_width(font, low: float, high: float) -> str:
    """A word whose rendered width w has low < w <= high (searched: 'm's and 'i's)."""
    for wide in range(60):
        for narrow in range(60):
            word = "m" * wide + "i" * narrow
            if low < font.getlength(word) <= high:
                return word
    raise AssertionError(f"no word between {low} and {high} px")


def test_text_exactly_as_wide_as_its_room_stays_on_one_line():
    g = page_geometry(["x"], panel_size=96, font_size=14)
    room = g.boxes[0].w - 4  # a caption has the panel's width less 2 px each side
    caption = text_of_width(g.font, room - 1, room)
    g2 = page_geometry([caption + " and"], panel_size=96, font_size=14)
    page = np.array(make_page(panels(1), [caption + " and"], panel_size=96, font_size=14))
    assert np.array_equal(page, drawn_by_the_rules(panels(1), [caption + " and"], g2))
    assert wrap_text(caption + " and", g.font, room) == [caption, "and"] and g2.boxes[0].caption_h == 2 * 17 + 6
    page_w = g.width
    title_font = load_font(21)  # int(1.5 x 14)
    title = text_of_width(title_font, page_w - 25, page_w - 24)  # the title has the page less 12 px each side
    assert page_geometry(["x"], panel_size=96, font_size=14, title=title).title_lines == [title]


def test_a_title_counts_towards_the_page_size_limit(monkeypatch):
    g = page_geometry(["a", "b"], title="A title")
    monkeypatch.setattr(comic, "MAX_PAGE_PIXELS", g.width * g.height + 1)  # fits without the title, not with it
    page_geometry(["a", "b"])
    total = g.width * (g.height + g.title_h)
    with pytest.raises(ValueError, match=rf"the page would be {g.width} x {g.height + g.title_h} px "
                                         rf"\({total / 1e6:.0f} megapixels, at most"):
        page_geometry(["a", "b"], title="A title")


def test_classic_rows_seeded_and_bad_counts():
    seeded = [classic_rows(12, seed) for seed in range(8)]
    assert all(1 <= r <= 3 for rows in seeded for r in rows) and all(sum(rows) == 12 for rows in seeded)
    assert any(1 in rows[:-1] for rows in seeded) and any(rows[:4] != [2, 1, 3, 2] for rows in seeded)
    assert classic_rows(12, 4) == classic_rows(12, 4)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=f"a page needs at least one panel, got n={bad!r}"):
            classic_rows(bad)


def test_fonts_and_glyphs(tmp_path):
    not_a_font = tmp_path / "font.ttf"
    not_a_font.write_bytes(b"not a font")
    with pytest.raises(ValueError, match="font.ttf is not a font Pillow can read .*: pass a .ttf or .otf file"):
        load_font(16, not_a_font)
    assert load_font().size == 16 and load_font().path == bundled_font().path
    serif = load_font(18, OTHER_FONT)
    assert (serif.size, serif.path) == (18, str(OTHER_FONT))
    assert missing_glyphs("a\x00b\x7fc", bundled_font(16)) == []  # control characters are not glyphs to check


# --- mutation survivors of the second comic run (tools/mutation.py comic; docs/mutation.md) ---

def word_of_exact_width(font, at_least: int) -> tuple[str, int]:
    """An 'm's-and-'i's word whose rendered width is a whole number of pixels (>= at_least), and that width."""
    for wide in range(1, 30):
        for narrow in range(30):
            word = "m" * wide + "i" * narrow
            width = font.getlength(word)
            if width >= at_least and width == int(width):
                return word, int(width)
    raise AssertionError("no word of a whole-pixel width")


def test_a_long_word_is_cut_where_a_prefix_is_exactly_as_wide_as_the_line():
    font = load_font(12)
    head, width = word_of_exact_width(font, 20)
    word = head + "mmmm"  # too wide for one line: cut letter by letter, and `head` fills the line exactly
    assert font.getlength(word) > width and font.getlength(head + "m") > width
    lines = wrap_text(word, font, width)
    assert lines[0] == head and "".join(lines) == word
    assert all(font.getlength(line) <= width for line in lines)


def test_layout_boxes_documented_defaults_in_full():
    assert layout_boxes(3) == layout_boxes(3, "grid", 256, 2, 12, 2, 16, None)
    assert {(b.w, b.h) for b in layout_boxes(3)[2]} == {(256, 256)}


def test_the_page_size_message_counts_the_title_in_its_megapixels(monkeypatch):
    title = "Lily and Tom go out into the park on a very windy day"
    g = page_geometry(["a", "b"], panel_size=1024, title=title)
    total = g.width * (g.height + g.title_h)
    assert f"{total / 1e6:.0f}" != f"{g.width * (g.height - g.title_h) / 1e6:.0f}"  # the title changes the figure
    monkeypatch.setattr(comic, "MAX_PAGE_PIXELS", 1_000_000)
    expected = (f"the page would be {g.width} x {g.height + g.title_h} px ({total / 1e6:.0f} megapixels, at most 1): "
                "use fewer panels per page, a smaller --panel-size, or shorter captions")
    with pytest.raises(ValueError, match=whole(expected)):
        page_geometry(["a", "b"], panel_size=1024, title=title)


def test_black_and_white_and_transparent_panels_are_smoothed_like_their_colours():
    """Each panel is turned into RGB before it is resized. Pillow resizes a bilevel ("1") picture with nearest
    neighbour whatever it is asked, and an RGBA one with its colours weighted by alpha (a transparent pixel counts as
    black): resized first, a Lanczos page would show blocky or darkened panels."""
    rng = np.random.default_rng(2)
    bilevel = Image.fromarray(rng.integers(0, 2, (8, 8), dtype=np.uint8) * 255).convert("1")
    rgba = Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8), "RGBA")
    box = page_geometry([""], panel_size=32).boxes[0]
    for picture in (bilevel, rgba):
        page = np.array(make_page([picture], panel_size=32, resample="lanczos"))
        smooth = np.array(picture.convert("RGB").resize((32, 32), Image.LANCZOS))
        resized_first = np.array(picture.resize((32, 32), Image.LANCZOS).convert("RGB"))
        assert not np.array_equal(smooth[1:31, 1:31], resized_first[1:31, 1:31])
        assert np.array_equal(page[box.y + 1:box.y + 31, box.x + 1:box.x + 31], smooth[1:31, 1:31])


def test_two_words_exactly_as_wide_as_the_line_share_it():
    font = load_font(12)
    line = next(t for t in ("m" * a + " " + "i" * b for a in range(1, 20) for b in range(1, 20))
                if font.getlength(t) == int(font.getlength(t)))  # a two-word line of a whole-pixel width
    width = int(font.getlength(line))
    assert wrap_text(line + " mm", font, width) == [line, "mm"]
    assert wrap_text(line, font, width - 1) == line.split()


def test_the_bundled_font_default_size_and_smallest_size():
    assert bundled_font().size == 16 and bundled_font(4).size == 4
    for bad in (3, 4.5, True, "16"):
        with pytest.raises(ValueError, match=whole(f"font size must be an int >= 4 px, got {bad!r}")):
            bundled_font(bad)
