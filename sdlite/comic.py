"""Step 04c: comic pages: panels + captions -> one PNG page.

Two layouts, for any number of panels:

* ``"grid"``: ``columns`` panels per row (2 gives the classic 2x2 page for four panels); the last row is centred.
* ``"classic"``: rows of 1, 2 or 3 panels (a repeating rhythm, or a seeded random one) scaled to the page width,
  like a printed comic. Unlike the official demo, small panels keep their captions.

Every panel gets its caption under it, word-wrapped, in the bundled DejaVu Sans font (``data/fonts``; licence
next to it). Panels are upscaled with nearest-neighbour by default, so storyworld's 64x64 pixels stay crisp.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .paths import check_writable, data_file

__all__ = ["LAYOUTS", "MAX_PAGE_PIXELS", "PageGeometry", "PanelBox", "bundled_font", "classic_rows", "layout_boxes",
           "load_font", "make_page", "missing_glyphs", "page_geometry", "save_page", "wrap_text"]

LAYOUTS = ("grid", "classic")
_CLASSIC_RHYTHM = (2, 1, 3, 2)  # panels per row, repeated


MAX_PAGE_PIXELS = 80_000_000  # a larger page is refused (image viewers and Pillow itself give up around 90 M)


def load_font(size: int = 16, path: str | Path | None = None) -> ImageFont.FreeTypeFont:
    """The bundled DejaVu Sans, or the TrueType/OpenType font at ``path`` (e.g. one with CJK or emoji glyphs)."""
    if path is None:
        return bundled_font(size)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no font file at {path}: pass a .ttf/.otf file (--font PATH)")
    try:
        return ImageFont.truetype(str(path), size)
    except OSError as err:
        raise ValueError(f"{path} is not a font Pillow can read ({err}): pass a .ttf or .otf file") from None


def missing_glyphs(text: str, font: ImageFont.FreeTypeFont) -> list[str]:
    """The characters of ``text`` the font has no glyph for (they would print as empty boxes), in order, once each.
    A character is missing when it renders exactly like a code point no font covers (plane 16's last one)."""
    side = 2 * int(font.size) + 4

    def pixels(ch: str) -> bytes:
        canvas = Image.new("L", (side, side))
        ImageDraw.Draw(canvas).text((2, 2), ch, fill=255, font=font)
        return canvas.tobytes()

    notdef = pixels("\U0010fffd")
    seen, missing = set(), []
    for ch in text:
        if ch in seen or ch.isspace() or not ch.isprintable():
            continue
        seen.add(ch)
        if pixels(ch) == notdef:
            missing.append(ch)
    return missing


def bundled_font(size: int = 16) -> ImageFont.FreeTypeFont:
    """DejaVu Sans at ``size`` px (shipped in data/fonts, Bitstream Vera licence)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"font size must be an int >= 4 px, got {size!r}")
    return ImageFont.truetype(str(data_file("fonts", "DejaVuSans.ttf")), size)


def _longest_fitting_prefix(word: str, font: ImageFont.FreeTypeFont, width: int) -> int:
    """The largest k >= 1 with ``font.getlength(word[:k]) <= width`` (1 when even one letter is wider). A line of
    ``width`` px holds at most ``width`` letters (every letter is at least a pixel wide), so a binary search over
    k <= width + 1 measures O(log width) prefixes, however long the word."""
    lo, hi = 1, min(len(word), width + 1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if font.getlength(word[:mid]) <= width:
            lo = mid
        else:
            hi = mid - 1
    return lo


def wrap_text(text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    """Greedy word wrap to lines no wider than ``width`` px (a single too-long word is cut letter by letter).

    Linear in the text's length: a trial line is measured only while it can still fit, and a long word is cut with a
    binary search instead of measuring every prefix."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if len(trial) <= width + 1 and font.getlength(trial) <= width:
            current = trial
            continue
        if current:
            lines.append(current)
        while len(word) > 1:  # break a word longer than the line
            cut = _longest_fitting_prefix(word, font, width)
            if cut == len(word) and font.getlength(word) <= width:
                break
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


@dataclass(frozen=True)
class PanelBox:
    """Where panel ``index`` goes on the page: its image box (x, y, size) and the caption strip under it."""

    index: int
    x: int
    y: int
    w: int
    h: int
    caption_h: int


def classic_rows(n: int, seed: int | None = None) -> list[int]:
    """Panels per row for the classic layout: the rhythm 2, 1, 3, 2, ... or, with ``seed``, a random one (1-3 per
    row); the last row takes what is left."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"a page needs at least one panel, got n={n!r}")
    rng = np.random.default_rng(seed) if seed is not None else None
    rows, k = [], 0
    while sum(rows) < n:
        size = int(rng.integers(1, 4)) if rng is not None else _CLASSIC_RHYTHM[k % len(_CLASSIC_RHYTHM)]
        rows.append(min(size, n - sum(rows)))
        k += 1
    return rows


def layout_boxes(n: int, layout: str = "grid", panel_size: int = 256, columns: int = 2, gap: int = 12,
                 caption_lines: int = 2, font_size: int = 16, seed: int | None = None) -> tuple[int, int, list[PanelBox]]:
    """Page size and one :class:`PanelBox` per panel (square panels). Returns (width, height, boxes)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}: use one of {LAYOUTS}")
    if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
        raise ValueError(f"columns must be an int >= 1, got {columns!r}")
    if panel_size < 16:
        raise ValueError(f"panel_size={panel_size} px is too small to read: use >= 16 (e.g. 256)")
    line_h = int(font_size * 1.25)
    cap_h = caption_lines * line_h + gap // 2
    if layout == "grid":
        rows = [min(columns, n - i) for i in range(0, n, columns)] if n > 0 else []
        page_w = columns * panel_size + (columns + 1) * gap
    else:
        rows = classic_rows(n, seed) if n > 0 else []
        page_w = 2 * panel_size + 3 * gap  # a classic page is as wide as two panels
    if n < 1:
        raise ValueError(f"a page needs at least one panel, got n={n!r}")
    boxes, y, k = [], gap, 0
    for count in rows:
        if layout == "grid":
            size = panel_size
            x0 = (page_w - (count * size + (count - 1) * gap)) // 2  # centre a short last row
        else:  # the row's panels share the page width; a lone panel is capped at 1.25x and centred
            size = min((page_w - (count + 1) * gap) // count, int(1.25 * panel_size))
            x0 = (page_w - (count * size + (count - 1) * gap)) // 2
        for j in range(count):
            boxes.append(PanelBox(k, x0 + j * (size + gap), y, size, size, cap_h))
            k += 1
        y += size + cap_h + gap
    return page_w, y, boxes


@dataclass(frozen=True)
class PageGeometry:
    """Where everything goes on a page, computed from the captions alone (before any panel exists)."""

    font: ImageFont.FreeTypeFont
    font_size: int
    line_h: int
    width: int
    height: int  # without the title
    boxes: list
    title_font: ImageFont.FreeTypeFont | None
    title_lines: list[str]
    title_h: int


def page_geometry(captions: list[str], layout: str = "grid", panel_size: int = 256, columns: int = 2,
                  title: str | None = None, font_size: int | None = None, seed: int | None = None,
                  font_path: str | Path | None = None) -> PageGeometry:
    """The page's size and boxes for these captions; a ValueError, before any work, when the page would be larger
    than MAX_PAGE_PIXELS."""
    font_size = font_size or max(10, panel_size // 16)
    font = load_font(font_size, font_path)
    line_h = int(font_size * 1.25)
    # enough caption lines for the longest caption at the narrowest panel width
    lines = 1
    for _ in range(3):
        page_w, page_h, boxes = layout_boxes(len(captions), layout, panel_size, columns, 12, lines, font_size, seed)
        need = max(len(wrap_text(c, font, b.w - 4)) for b, c in zip(boxes, captions)) if any(captions) else 0
        if need <= lines:
            break
        lines = need
    title_font, title_lines, title_h = None, [], 0
    if title:
        title_font = load_font(int(font_size * 1.5), font_path)
        title_lines = wrap_text(title, title_font, page_w - 24)
        title_h = len(title_lines) * int(font_size * 1.9) + 12
    if page_w * (page_h + title_h) > MAX_PAGE_PIXELS:
        raise ValueError(f"the page would be {page_w} x {page_h + title_h} px ({page_w * (page_h + title_h) / 1e6:.0f} "
                         f"megapixels, at most {MAX_PAGE_PIXELS / 1e6:.0f}): use fewer panels per page, a smaller "
                         "--panel-size, or shorter captions")
    return PageGeometry(font, font_size, line_h, page_w, page_h, boxes, title_font, title_lines, title_h)


def make_page(
    images,
    captions: list[str] | None = None,
    layout: str = "grid",
    panel_size: int = 256,
    columns: int = 2,
    title: str | None = None,
    font_size: int | None = None,
    seed: int | None = None,
    resample: str = "nearest",
    background: tuple[int, int, int] = (255, 255, 255),
    font_path: str | Path | None = None,
) -> Image.Image:
    """Lay out panels (PIL images or uint8 (H, W, 3) arrays) with their captions on one RGB page (captions in the
    bundled font, or the one at ``font_path``)."""
    images = list(images)
    if not images:
        raise ValueError("make_page needs at least one panel image")
    if captions is None:
        captions = [""] * len(images)
    captions = list(captions)
    if len(captions) != len(images):
        raise ValueError(f"{len(images)} panels but {len(captions)} captions: give one caption per panel "
                         "(use '' for none)")
    if resample not in ("nearest", "lanczos"):
        raise ValueError(f"resample must be 'nearest' (crisp pixels) or 'lanczos' (smooth), got {resample!r}")
    pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images]
    g = page_geometry(captions, layout, panel_size, columns, title, font_size, seed, font_path)
    font, font_size, line_h, page_w, page_h, boxes = g.font, g.font_size, g.line_h, g.width, g.height, g.boxes
    title_font, title_lines, title_h = g.title_font, g.title_lines, g.title_h
    page = Image.new("RGB", (page_w, page_h + title_h), background)
    draw = ImageDraw.Draw(page)
    if title:
        for t, text in enumerate(title_lines):
            draw.text((page_w // 2, 12 + t * int(font_size * 1.9)), text, fill=(0, 0, 0), font=title_font, anchor="ma")
    method = Image.NEAREST if resample == "nearest" else Image.LANCZOS
    for box, im, cap in zip(boxes, pil, captions):
        y = box.y + title_h
        page.paste(im.convert("RGB").resize((box.w, box.h), method), (box.x, y))
        draw.rectangle([box.x - 1, y - 1, box.x + box.w, y + box.h], outline=(0, 0, 0), width=2)
        for t, text in enumerate(wrap_text(cap, font, box.w - 4)):
            draw.text((box.x + box.w // 2, y + box.h + 4 + t * line_h), text, fill=(0, 0, 0), font=font, anchor="ma")
    return page


def save_page(page: Image.Image, path: str | Path, force: bool = False) -> Path:
    """Write the page as PNG; refuses to overwrite an existing file unless ``force``."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: pages are written as PNG, use a path ending in .png")
    path = check_writable(path, force)
    page.save(path, format="PNG")
    return path
