"""Comic pages: both layouts for any panel count, every caption drawn, bundled font, PNG, no overwrite."""
import numpy as np
import pytest
from PIL import Image

from sdlite.comic import LAYOUTS, bundled_font, classic_rows, layout_boxes, make_page, save_page, wrap_text


def _panels(n, size=64):
    rng = np.random.default_rng(0)
    return [np.full((size, size, 3), rng.integers(0, 255, 3), np.uint8) for _ in range(n)]


def _overlap(a, b):
    return a.x < b.x + b.w and b.x < a.x + a.w and a.y < b.y + b.h + b.caption_h and b.y < a.y + a.h + a.caption_h


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 12])
def test_boxes_fit_the_page_and_never_overlap(layout, n):
    w, h, boxes = layout_boxes(n, layout, panel_size=100)
    assert [b.index for b in boxes] == list(range(n))
    for b in boxes:
        assert 0 <= b.x and b.x + b.w <= w and 0 <= b.y and b.y + b.h + b.caption_h <= h
    assert not any(_overlap(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_grid_is_two_by_two_for_four_panels():
    _, _, boxes = layout_boxes(4, "grid", panel_size=100, columns=2)
    assert len({b.x for b in boxes}) == 2 and len({b.y for b in boxes}) == 2
    assert {(b.w, b.h) for b in boxes} == {(100, 100)}


def test_classic_rows_rhythm_and_seeded_random():
    assert classic_rows(8) == [2, 1, 3, 2]
    assert classic_rows(4) == [2, 1, 1]
    assert sum(classic_rows(11, seed=3)) == 11 and classic_rows(11, seed=3) == classic_rows(11, seed=3)
    assert all(1 <= r <= 3 for r in classic_rows(30, seed=1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_panel_and_caption_is_drawn(layout):
    n = 5
    captions = [f"caption {i}" for i in range(n)]
    page = make_page(_panels(n), captions, layout=layout, panel_size=96)
    blank = make_page(_panels(n), [""] * n, layout=layout, panel_size=96)
    arr, arr_blank = np.asarray(page), np.asarray(blank)
    assert page.mode == "RGB"
    _, _, boxes = layout_boxes(n, layout, panel_size=96, caption_lines=1, font_size=max(10, 96 // 16))
    for b in boxes:  # each panel's colour is in its box; each caption strip has dark text pixels
        colour = np.asarray(_panels(n)[b.index][0, 0], np.int16)
        centre = arr[b.y + b.h // 2, b.x + b.w // 2].astype(np.int16)
        assert np.abs(centre - colour).max() <= 1
        strip = arr[b.y + b.h + 2:b.y + b.h + b.caption_h, b.x:b.x + b.w]
        assert (strip.min(axis=-1) < 100).sum() > 10, f"no caption under panel {b.index} ({layout})"
        assert (arr_blank[b.y + b.h + 2:b.y + b.h + b.caption_h, b.x:b.x + b.w].min(axis=-1) < 100).sum() == 0


def test_long_captions_wrap_and_grow_the_page():
    short = make_page(_panels(2), ["hi", "ho"], panel_size=96)
    long = make_page(_panels(2), ["a very long caption " * 6, "ho"], panel_size=96)
    assert long.size[1] > short.size[1] and long.size[0] == short.size[0]
    font = bundled_font(12)
    lines = wrap_text("one two three four five six seven eight nine ten", font, 60)
    assert len(lines) > 1 and all(font.getlength(l) <= 60 for l in lines)
    assert " ".join(lines) == "one two three four five six seven eight nine ten"
    assert all(font.getlength(l) <= 30 for l in wrap_text("Supercalifragilistic", font, 30))


def test_title_and_pil_input():
    pil = [Image.fromarray(p) for p in _panels(3)]
    with_title = make_page(pil, ["a", "b", "c"], title="Lily's day")
    without = make_page(pil, ["a", "b", "c"])
    assert with_title.size[1] > without.size[1]


def test_save_page_png_and_no_overwrite(tmp_path):
    page = make_page(_panels(2), ["a", "b"])
    path = save_page(page, tmp_path / "sub" / "page.png")
    assert Image.open(path).format == "PNG"
    with pytest.raises(FileExistsError, match="pass --force"):
        save_page(page, path)
    save_page(page, path, force=True)
    with pytest.raises(ValueError, match="ending in .png"):
        save_page(page, tmp_path / "page.jpg")


def test_bad_pages():
    with pytest.raises(ValueError, match="at least one panel"):
        make_page([])
    with pytest.raises(ValueError, match="2 panels but 1 captions"):
        make_page(_panels(2), ["x"])
    with pytest.raises(ValueError, match="unknown layout"):
        make_page(_panels(2), layout="manga")
    with pytest.raises(ValueError, match="columns must be"):
        make_page(_panels(2), columns=0)
    with pytest.raises(ValueError, match="font size"):
        bundled_font(2)


def test_wrap_text_is_linear_and_matches_the_plain_greedy_wrap():
    """A 6000-letter word without spaces (which once took minutes) wraps in well under a second of measurements,
    and on ordinary text the fast wrap equals the plain greedy one that measures every prefix."""
    import random

    font = bundled_font(14)

    def plain(text, width):  # the readable reference: measure every prefix
        lines, current = [], ""
        for word in text.split():
            trial = f"{current} {word}".strip()
            if font.getlength(trial) <= width:
                current = trial
                continue
            if current:
                lines.append(current)
            while font.getlength(word) > width and len(word) > 1:
                cut = max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width or k == 1)
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        if current:
            lines.append(current)
        return lines

    rng = random.Random(3)
    words = ["a", "Lily", "walks", "into", "the", "snow", "x" * 40, "émigré", "jumping"]
    for _ in range(60):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(0, 25)))
        for width in (1, 30, 120):
            assert wrap_text(text, font, width) == plain(text, width), (text, width)
    calls = 0
    real = font.getlength

    class Counting:
        def getlength(self, s):
            nonlocal calls
            calls += 1
            return real(s)

    lines = wrap_text("a" * 6000, Counting(), 240)
    assert "".join(lines) == "a" * 6000 and all(real(line) <= 240 for line in lines)
    assert calls < 6000  # O(log width) measurements per line, not one per prefix (the old wrap: millions)


def test_layout_margins_gaps_and_centring_exactly():
    """Every box of both layouts at its exact place: a 12 px margin and gap, a short last row centred, a classic
    row of one panel capped at 1.25x and centred (these slipped through an earlier overlap-only test)."""
    w, h, boxes = layout_boxes(3, "grid", panel_size=100, columns=2, gap=12, caption_lines=2, font_size=16)
    cap = 2 * 20 + 6
    assert w == 2 * 100 + 3 * 12 == 236
    assert [(b.x, b.y, b.w, b.h, b.caption_h) for b in boxes] == [
        (12, 12, 100, 100, cap), (124, 12, 100, 100, cap), (68, 12 + 100 + cap + 12, 100, 100, cap)]
    assert h == 12 + 2 * (100 + cap + 12)
    w, h, boxes = layout_boxes(1, "classic", panel_size=100, gap=12, caption_lines=1, font_size=16)
    assert w == 236 and [(b.x, b.w) for b in boxes] == [((236 - 125) // 2, 125)]  # 1.25 x 100, centred
    w, h, boxes = layout_boxes(2, "classic", panel_size=100, gap=12, caption_lines=1, font_size=16, seed=0)
    assert classic_rows(2, 0) == [2]  # two panels in one row share the width: (236 - 3 * 12) // 2 each
    assert [(b.x, b.y, b.w) for b in boxes] == [(12, 12, 100), (124, 12, 100)]
