"""Which tokens each image sees in consistent self-attention: the windows and the two ways of sampling.

CSA lets every image attend to its own tokens plus a random share of the tokens of the other images of its window
(:mod:`sdlite.attention` does the attention). This module decides *which* tokens, and nothing else:

* windows: ``tile=W`` images per window, starting every ``stride`` images (:func:`window_starts`);
* ``sampling="exact"`` (sdlite's default, the paper's Algorithm 1 read literally): each *query* image draws its own
  sample of exactly ``k = round(r * pool)`` distinct tokens from its window's other images, redrawn at every layer
  call (:func:`draw_sampled_indices`);
* ``sampling="official"`` (the official StoryDiffusion code): per denoising step, each *source* image gets one random
  keep-mask over its N tokens (each token kept with probability r, so the count is random, about r*N), and every
  query image of the window sees the kept tokens of all the others. The caller shares one draw between all layers
  of the same resolution and both guidance halves (:func:`draw_keep_masks`, :func:`official_key_indices`).

With r = 1 both keep everything (full joint attention over the window); with r = 0 both keep nothing.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "SAMPLING_MODES",
    "check_indices",
    "check_rate",
    "check_sampling",
    "check_tile_stride",
    "draw_keep_masks",
    "draw_sampled_indices",
    "num_sampled_tokens",
    "official_key_indices",
    "window_starts",
]

SAMPLING_MODES = ("exact", "official")


def check_sampling(sampling: str) -> str:
    if sampling not in SAMPLING_MODES:
        raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}: 'exact' (sdlite: each image "
                         "draws its own k tokens per layer call) or 'official' (one keep-mask per source image and step)")
    return sampling


# ----------------------------------------------------------------------------------------------------
# Checks shared by every entry point
# ----------------------------------------------------------------------------------------------------
def check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate):
        raise ValueError(f"rate must be a number in [0, 1], got {rate!r}: pass e.g. rate=0.5")
    if not 0.0 <= float(rate) <= 1.0:
        raise ValueError(f"rate must be in [0, 1] (the fraction of other images' tokens sampled), got {rate}: "
                         "use 0 for plain self-attention, 1 for full joint attention")
    return float(rate)


def check_tile_stride(tile: int, stride: int | None, batch: int) -> tuple[int, int]:
    if isinstance(tile, bool) or not isinstance(tile, int):
        raise ValueError(f"tile must be an int (images per window), got {tile!r}")
    if tile < 1:
        raise ValueError(f"tile (window size W) must be >= 1, got {tile}: use tile=batch for no tiling")
    if tile > batch:
        raise ValueError(f"tile W={tile} is larger than the batch of {batch} images: use tile <= {batch} "
                         "(or tile=None in the processor for one window over the whole batch)")
    stride = 1 if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an int >= 1, got {stride!r}: use 1 for the paper's sliding window, "
                         f"{tile} (= tile) for disjoint tiles")
    if stride > tile:
        raise ValueError(f"stride {stride} > tile {tile} would leave images outside every window: "
                         f"use a stride between 1 and {tile}")
    return tile, stride


# ----------------------------------------------------------------------------------------------------
# Windows and sampling (shared by the reference and the fast version, so both see the same sample)
# ----------------------------------------------------------------------------------------------------
def window_starts(batch: int, tile: int, stride: int = 1) -> list[int]:
    """First image of every window: ``0, stride, 2*stride, ...`` plus ``batch - tile`` if needed.

    >>> window_starts(6, 3, 1), window_starts(8, 4, 4), window_starts(6, 4, 4)
    ([0, 1, 2, 3], [0, 4], [0, 2])
    """
    tile, stride = check_tile_stride(tile, stride, batch)
    starts = list(range(0, batch - tile + 1, stride))
    if starts[-1] != batch - tile:  # the last window ends at the last image: nobody is left out
        starts.append(batch - tile)
    return starts


def num_sampled_tokens(tile: int, tokens: int, rate: float, include_self_in_sample: bool = False) -> int:
    """k: how many tokens each image samples from its window's pool (the other images, or all)."""
    pool = (tile if include_self_in_sample else tile - 1) * tokens
    return int(math.floor(check_rate(rate) * pool + 0.5))


def draw_sampled_indices(
    batch: int,
    tokens: int,
    rate: float,
    tile: int,
    stride: int = 1,
    generator: torch.Generator | None = None,
    include_self_in_sample: bool = False,
) -> torch.Tensor:
    """Sampled token indices for every window and image: LongTensor (num_windows, W, k).

    ``out[w, i]`` are indices into window w's W*N tokens laid end to end (image j's token t is j*N + t):
    k distinct tokens drawn uniformly without replacement from image i's pool. With
    ``include_self_in_sample=False`` the pool is the window's other images; with rate 1 the pool is taken
    whole and in order (no randomness, the generator is not used).
    """
    starts = window_starts(batch, tile, stride)
    k = num_sampled_tokens(tile, tokens, rate, include_self_in_sample)
    pool = (tile if include_self_in_sample else tile - 1) * tokens
    out = torch.empty(len(starts), tile, k, dtype=torch.long)  # (num_windows, W, k)
    for w in range(len(starts)):
        for i in range(tile):
            if k == pool:
                picked = torch.arange(pool)  # rate 1: the whole pool
            else:
                picked = torch.randperm(pool, generator=generator)[:k]  # (k,) in [0, pool)
            if not include_self_in_sample:
                # pool position p -> window position: skip image i's own block [i*N, (i+1)*N)
                picked = picked + tokens * (picked >= i * tokens)
            out[w, i] = picked
    return out


def check_indices(indices: torch.Tensor, batch: int, tokens: int, tile: int, stride: int) -> torch.Tensor:
    starts = window_starts(batch, tile, stride)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.long or indices.ndim != 3:
        raise ValueError("sampled_indices must be a LongTensor (num_windows, W, k) as made by "
                         "draw_sampled_indices(...)")
    if indices.shape[0] != len(starts) or indices.shape[1] != tile:
        raise ValueError(f"sampled_indices has shape {tuple(indices.shape)} but this batch has {len(starts)} "
                         f"windows of W={tile} images: draw them with draw_sampled_indices({batch}, {tokens}, "
                         f"rate, {tile}, {stride})")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= tile * tokens):
        raise ValueError(f"sampled_indices must lie in [0, W*N) = [0, {tile * tokens}) (positions in the "
                         "window's tokens laid end to end)")
    return indices


# ----------------------------------------------------------------------------------------------------
# The official code's sampling: one keep-mask per source image (and step, and resolution)
# ----------------------------------------------------------------------------------------------------
def draw_keep_masks(images: int, tokens: int, rate: float, generator: torch.Generator | None = None
                    ) -> list[torch.Tensor]:
    """One keep-mask per source image: token t of image j is kept with probability ``rate``, independently.

    Returns, per image, the kept token positions in increasing order (LongTensor (m_j,), m_j random, about
    ``rate * tokens``). One (images, tokens) uniform draw from ``generator``, in row order.
    """
    rate = check_rate(rate)
    keep = torch.rand(images, tokens, generator=generator) < rate  # (B, N) bool
    return [row.nonzero(as_tuple=True)[0] for row in keep]


def official_key_indices(keep: list[torch.Tensor], tokens: int, tile: int, stride: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Key positions of every image of every window under official sampling, padded to one length.

    Image i of window w (first image s) sees the kept tokens of the window's other images j (in image order),
    then all N of its own tokens; position ``j*N + t`` is image j's token t in the window's W*N tokens laid end to
    end. Returns ``(idx, valid)``, both (num_windows, W, L) with L the longest key list: ``idx`` LongTensor,
    ``valid`` bool, False on the padding (which repeats the image's own first token and must be masked out).
    """
    starts = window_starts(len(keep), tile, stride)
    rows = []
    for s in starts:
        for i in range(tile):
            others = [j * tokens + keep[s + j] for j in range(tile) if j != i]
            rows.append(torch.cat([*others, i * tokens + torch.arange(tokens)]))  # (m + N,)
    length = max(len(r) for r in rows)
    idx = torch.empty(len(rows), length, dtype=torch.long)
    valid = torch.zeros(len(rows), length, dtype=torch.bool)
    for n, r in enumerate(rows):
        i = n % tile
        idx[n] = i * tokens  # padding: the image's own first token, masked out
        idx[n, : len(r)] = r
        valid[n, : len(r)] = True
    return idx.view(len(starts), tile, length), valid.view(len(starts), tile, length)
