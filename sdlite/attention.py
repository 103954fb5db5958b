"""Consistent self-attention (CSA), StoryDiffusion's training-free trick for consistent characters.

Plain self-attention lets each image's tokens attend to the tokens of the *same* image only. CSA (the
paper's Algorithm 1) lets every image also attend to a random sample of the tokens of the *other*
images of its window, so appearance (hair, clothes, face) flows between the images of a story:

    for each window of W consecutive images (a "tile", sliding over the batch):
        for each image i of the window:
            keys/values = tokens sampled at rate r from the window's other images  +  all tokens of image i
            out[i] += Attention(queries of image i, keys, values);  count[i] += 1
    out /= count                                   # images in several windows: average

This module has three layers of the same idea:

* :func:`consistent_self_attention_reference` -- the algorithm itself in plain torch loops: one head,
  identity projections. Read it next to the paper.
* :class:`ConsistentSelfAttnProcessor` -- the fast version as a diffusers attention processor: the
  layer's own q/k/v projections and heads, sampled token *indices* (no dense B*N x B*N mask),
  ``F.scaled_dot_product_attention``, tiles with a stride, guidance halves kept apart, the write/read
  bank for long stories, and the official random-skip schedule.
* :func:`install_consistent_attention` -- puts the processor on chosen self-attention layers of any
  ``UNet2DConditionModel`` and returns a handle whose ``.remove()`` restores the original processors.

Sampling. For image i of a window of W images with N tokens each, the "pool" is the (W-1)*N tokens of
the window's other images (or all W*N tokens with ``include_self_in_sample=True``, the paper's literal
pseudo-code, where some of the image's own tokens then appear twice among the keys). Exactly
``k = round(r * pool)`` distinct pool tokens are drawn uniformly without replacement, so every image has
``N + k`` keys: ``N * (1 + (W - 1) * r)`` in the default mode. ``r = 1`` takes the whole pool (no
randomness): full joint attention over the window.

That is ``sampling="exact"``. ``sampling="official"`` is the official code's: per denoising step, each *source*
image gets one random keep-mask over its tokens (a random count, about r*N), shared by every query image, by all
layers of the same resolution and by both guidance halves (:mod:`sdlite.token_sampling` has both draws).

Windows. ``tile=W`` images per window, starting every ``stride`` images: stride 1 is the paper's sliding
window (the reference's default), stride W gives disjoint tiles (the processor's default, ``stride=None``). If the last start does not reach the end of the batch, one more
window ending at the last image is added, so every image is covered and every window has W images.

The windows and the sampling live in :mod:`sdlite.token_sampling`, the write/read bank in :mod:`sdlite.bank`; their
names are importable from here too.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .bank import ConsistencyBank
from .token_sampling import (
    SAMPLING_MODES,
    check_indices,
    check_rate,
    check_sampling,
    check_tile_stride,
    draw_keep_masks,
    draw_sampled_indices,
    num_sampled_tokens,
    official_key_indices,
    window_starts,
)

__all__ = [
    "OFFICIAL_SKIP_SCHEDULE",
    "SAMPLING_MODES",
    "ConsistencyBank",
    "ConsistentAttentionHandle",
    "ConsistentSelfAttnProcessor",
    "CSAState",
    "SkipSchedule",
    "consistent_self_attention_reference",
    "csa_layer_names",
    "draw_keep_masks",
    "draw_sampled_indices",
    "install_consistent_attention",
    "layer_scale",
    "num_sampled_tokens",
    "official_key_indices",
    "self_attention_layer_names",
    "window_starts",
]


def _check_features(x: torch.Tensor) -> tuple[int, int, int]:
    if not isinstance(x, torch.Tensor) or x.ndim != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be image features of shape (B, N, C), got {shape}: "
                         "flatten each image's H*W grid into N tokens first")
    return tuple(x.shape)  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------
# 1. The reference version: the paper's Algorithm 1, one head, identity projections
# ----------------------------------------------------------------------------------------------------
def consistent_self_attention_reference(
    x: torch.Tensor,
    rate: float,
    tile: int,
    generator: torch.Generator | None = None,
    *,
    stride: int = 1,
    include_self_in_sample: bool = False,
    sampled_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consistent self-attention as in the paper, written for reading: x (B, N, C) -> (B, N, C).

    Single head, identity projections (q = k = v = the tokens), scale 1/sqrt(C). ``sampled_indices``
    (num_windows, W, k) replaces the random draw, e.g. to compare with the fast version on one sample.
    """
    B, N, C = _check_features(x)
    rate = check_rate(rate)
    tile, stride = check_tile_stride(tile, stride, B)
    if sampled_indices is None:
        sampled_indices = draw_sampled_indices(B, N, rate, tile, stride, generator, include_self_in_sample)
    check_indices(sampled_indices, B, N, tile, stride)

    output = torch.zeros_like(x)  # (B, N, C)
    count = torch.zeros(B, 1, 1, dtype=x.dtype, device=x.device)  # (B, 1, 1)
    for w, t in enumerate(window_starts(B, tile, stride)):
        tile_features = x[t:t + tile]  # (W, N, C)
        window_tokens = tile_features.reshape(tile * N, C)  # (W*N, C): the window's tokens end to end
        for i in range(tile):
            sampled_tokens = window_tokens[sampled_indices[w, i]]  # (k, C) from the other images
            token_kv = torch.cat([sampled_tokens, tile_features[i]], dim=0)  # (k + N, C)
            token_q = tile_features[i]  # (N, C)
            weights = torch.softmax(token_q @ token_kv.T / math.sqrt(C), dim=-1)  # (N, k + N)
            output[t + i] += weights @ token_kv  # (N, C)
            count[t + i] += 1
    return output / count


# ----------------------------------------------------------------------------------------------------
# 2. Step state, the random-skip schedule, the write/read bank (objects the caller owns)
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkipSchedule:
    """The official code's random skipping: each layer call uses plain attention with probability
    ``early_prob`` before step ``switch_step`` and ``late_prob`` from then on."""

    early_prob: float = 0.3
    late_prob: float = 0.1
    switch_step: int = 20

    def __post_init__(self) -> None:
        for name in ("early_prob", "late_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"SkipSchedule.{name} must be a probability in [0, 1], got {p}")
        if self.switch_step < 0:
            raise ValueError(f"SkipSchedule.switch_step must be >= 0, got {self.switch_step}")

    def skip_probability(self, step: int) -> float:
        return self.early_prob if step < self.switch_step else self.late_prob


OFFICIAL_SKIP_SCHEDULE = SkipSchedule(early_prob=0.3, late_prob=0.1, switch_step=20)


_MODES = ("batch", "write", "read", "off")


@dataclass
class CSAState:
    """Everything that changes while a story is generated. Owned by the caller (via the handle), shared by
    all installed processors; never a module global.

    mode: "batch" (CSA among the images of the batch), "write" (the same, and store sampled tokens of the
    batch for ``characters[0]``), "read" (each image attends to its own tokens + the bank of ``characters``),
    "off" (the original processors).
    """

    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    bank: ConsistencyBank = field(default_factory=ConsistencyBank)
    step: int | None = None
    mode: str = "batch"
    characters: tuple[str, ...] = ()
    guidance_halves: bool = False
    first_steps_without_csa: int = 0
    skip_schedule: SkipSchedule | None = None
    sampling: str = "exact"
    bank_steps: int | None = None  # steps 0 .. bank_steps-1 are stored and read; later read steps: plain attention
    keep_masks: dict = field(default_factory=dict)  # official sampling: this step's draw, per (images, N, rate)

    def shared_keep_masks(self, images: int, tokens: int, rate: float) -> list[torch.Tensor]:
        """Official sampling: the keep-masks of this step for a batch of ``images`` images of ``tokens`` tokens,
        drawn at the first layer of that resolution and reused by the others (and by both guidance halves)."""
        key = (self.step, images, tokens, rate)
        if key not in self.keep_masks:
            self.keep_masks = {k: v for k, v in self.keep_masks.items() if k[0] == self.step}  # older steps: gone
            self.keep_masks[key] = draw_keep_masks(images, tokens, rate, self.generator)
        return self.keep_masks[key]

    def bank_step(self) -> bool:
        """Whether this step's tokens are stored (write) and read (read)."""
        return self.bank_steps is None or (self.step or 0) < self.bank_steps

    def csa_active(self) -> bool:
        """Whether this layer call uses CSA (draws from the generator when a skip schedule is set)."""
        if self.mode == "off":
            return False
        step = 0 if self.step is None else self.step
        if step < self.first_steps_without_csa:
            return False
        if self.skip_schedule is not None:
            p = self.skip_schedule.skip_probability(step)
            if float(torch.rand((), generator=self.generator)) < p:
                return False
        return True


# ----------------------------------------------------------------------------------------------------
# 3. The fast version: a diffusers attention processor
# ----------------------------------------------------------------------------------------------------
def prepare_tokens(attn, hidden_states: torch.Tensor, temb: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """The input steps of diffusers' `AttnProcessor2_0`, in its order: spatial norm, (B, C, H, W) -> (B, N, C),
    group norm. Returns the tokens (B, N, C) and the (C, H, W) to fold the output back into (None for 3-D input)."""
    shown = tuple(hidden_states.shape)
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    spatial = None
    if hidden_states.ndim == 4:
        b, c, h, w = hidden_states.shape
        spatial = (c, h, w)
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)  # (B, N, C)
    if hidden_states.ndim != 3:
        raise ValueError(f"hidden_states must be (B, N, C) or (B, C, H, W), got {shown}")
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, spatial


def _stock_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


class ConsistentSelfAttnProcessor:
    """Consistent self-attention for a diffusers ``Attention`` self-attention layer.

    Follows the step order of diffusers' ``AttnProcessor2_0``: prepare -> q/k/v projections -> heads ->
    sampled extra keys/values -> SDPA -> output projection -> residual / rescale.

    Args:
        rate: sampling rate r in [0, 1]. 0 is plain self-attention: the original processor is called, as for a
            batch of a single image (per guidance half), which has nobody to share tokens with.
        tile: window size W; ``None`` = one window over the whole batch (per guidance half).
        stride: window step. ``None`` (the default) = W: disjoint tiles, each image computed once; 1 = the
            paper's sliding window (each image in W windows, W times the work). The reference function's
            default is the paper's stride 1.
        include_self_in_sample: sample from all window images, the image itself included (paper's pseudo-code).
        window_batch: windows computed in one batched call; 1 keeps peak memory flat in the story length
            (the paper's loop), ``None`` computes all windows at once (fastest for small inputs, training).
        state: the shared :class:`CSAState` (a private one is made when omitted).
        name: the layer's name (key of the bank).
        original: the processor to call when CSA is off (default: a fresh ``AttnProcessor2_0``).
    """

    def __init__(
        self,
        rate: float = 0.5,
        tile: int | None = None,
        stride: int | None = None,
        *,
        include_self_in_sample: bool = False,
        window_batch: int | None = 1,
        state: CSAState | None = None,
        name: str = "",
        original=None,
    ) -> None:
        self.rate = check_rate(rate)
        if tile is not None:
            check_tile_stride(tile, stride, tile)  # W >= 1, 1 <= stride <= W
        elif stride is not None:
            raise ValueError("stride needs a tile size: pass tile=W as well (or neither for one window)")
        if window_batch is not None and (isinstance(window_batch, bool) or not isinstance(window_batch, int)
                                         or window_batch < 1):
            raise ValueError(f"window_batch must be an int >= 1 or None (all windows at once), got {window_batch!r}")
        self.tile = tile
        self.stride = stride
        self.include_self_in_sample = bool(include_self_in_sample)
        self.window_batch = window_batch
        self.state = state if state is not None else CSAState()
        self.name = name
        self.original = original if original is not None else _stock_processor()

    def __repr__(self) -> str:
        return (f"ConsistentSelfAttnProcessor(rate={self.rate}, tile={self.tile}, stride={self.stride}, "
                f"include_self_in_sample={self.include_self_in_sample}, name={self.name!r})")

    # -- the call ----------------------------------------------------------------------------------
    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        sampled_indices: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        state = self.state
        if state.mode not in _MODES:
            raise ValueError(f"CSAState.mode must be one of {_MODES}, got {state.mode!r}")
        if encoder_hidden_states is not None:
            raise ValueError(f"ConsistentSelfAttnProcessor on layer {self.name!r} got encoder_hidden_states: "
                             "it is for self-attention (attn1) layers only; leave cross-attention (attn2) alone")
        if state.mode != "off" and state.guidance_halves and hidden_states.shape[0] % 2:
            raise ValueError(f"guidance_halves=True needs an even batch [uncond; cond], got {hidden_states.shape[0]} "
                             "images: set handle.guidance_halves = False when running without classifier-free guidance")
        nothing_to_sample = state.mode in ("batch", "write") and sampled_indices is None and self._sample_size(
            hidden_states) == 0  # r = 0 or a single image: the original processor, exactly
        if state.mode == "off" or (nothing_to_sample and state.mode != "write"):
            return self.original(attn, hidden_states, attention_mask=attention_mask, temb=temb, **kwargs)
        if attention_mask is not None:
            raise ValueError("ConsistentSelfAttnProcessor does not take an attention_mask: self-attention "
                             "layers of UNet2DConditionModel have none; use the stock processor for masked inputs")

        # prepare: (B, C, H, W) -> (B, N, C), spatial/group norm, as AttnProcessor2_0 does
        residual = hidden_states
        hidden_states, spatial = prepare_tokens(attn, hidden_states, temb)
        batch, tokens, channels = hidden_states.shape  # (B, N, C), B = G * images
        groups = 2 if state.guidance_halves else 1
        images = batch // groups
        residual_3d = residual.view(batch, residual.shape[1], -1).transpose(1, 2) if spatial else residual

        if state.mode == "write":
            self._write_bank(hidden_states, groups, images, tokens)
        use_csa = state.csa_active()
        if state.mode == "read":
            if not use_csa or not state.bank_step():
                return self.original(attn, residual, attention_mask=None, temb=temb, **kwargs)
            out = self._read(attn, hidden_states, residual_3d, groups, images, tokens)
        elif not use_csa or nothing_to_sample:
            return self.original(attn, residual, attention_mask=None, temb=temb, **kwargs)
        else:
            out = self._windows(attn, hidden_states, residual_3d, groups, images, tokens, sampled_indices)
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, -1, *spatial[1:])
        return out

    # -- helpers -------------------------------------------------------------------------------------
    def _sample_size(self, hidden_states: torch.Tensor) -> int:
        """k, the tokens each image samples from its window in this call (0: nothing to share). Official
        sampling: the pool size when anything can be kept (its count is random)."""
        groups = 2 if self.state.guidance_halves else 1
        images = hidden_states.shape[0] // groups
        tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])
        tile = images if self.tile is None else min(self.tile, images)  # (tile > images is refused later)
        if self.state.sampling == "official":
            return (max(tile, 1) - 1) * tokens if self.rate > 0 else 0
        return num_sampled_tokens(max(tile, 1), tokens, self.rate, self.include_self_in_sample)

    def _finish(self, attn, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(n, N, inner) attention output -> out projection -> residual / rescale -> (n, N, C)."""
        out = attn.to_out[0](out)  # (n, N, C) linear proj
        out = attn.to_out[1](out)  # dropout
        if attn.residual_connection:
            out = out + residual
        if attn.rescale_output_factor != 1.0:  # (x / 1.0 == x: skip the pass over the output)
            out = out / attn.rescale_output_factor
        return out

    def _windows(self, attn, x, residual, groups, images, tokens, sampled_indices):
        """CSA among the images of each guidance half, window by window. x: (G*B, N, C) -> (G*B, N, C)."""
        tile = images if self.tile is None else self.tile
        stride = tile if self.stride is None else self.stride  # default: disjoint tiles
        check_tile_stride(tile, stride, images)
        starts = window_starts(images, tile, stride)
        official = self.state.sampling == "official" and sampled_indices is None
        valid = None  # official sampling: which of the padded key positions are real, (nw, W, L)
        if official:
            keep = self.state.shared_keep_masks(images, tokens, self.rate)
            keys, valid = official_key_indices(keep, tokens, tile, stride)  # (nw, W, L) with the own tokens
        elif sampled_indices is None:
            sampled_indices = draw_sampled_indices(images, tokens, self.rate, tile, stride, self.state.generator,
                                                   self.include_self_in_sample)
        if not official:
            check_indices(sampled_indices, images, tokens, tile, stride)
        joint = self.rate == 1.0 and not self.include_self_in_sample  # keys = the whole window, once
        C = x.shape[-1]
        xg = x.view(groups, images, tokens, C)  # (G, B, N, C)
        rg = residual.reshape(groups, images, tokens, -1)  # (G, B, N, C)
        own = torch.arange(tile * tokens).view(tile, tokens)  # (W, N): image i's own positions in its window

        partition = stride >= tile and images % tile == 0  # disjoint tiles covering the batch exactly
        out = None  # (G, B, N, C), allocated at the first window (its dtype/width come from to_out)
        chunk = len(starts) if self.window_batch is None else self.window_batch
        for c0 in range(0, len(starts), chunk):
            nw = len(starts[c0:c0 + chunk])
            if partition:  # a contiguous slice of the batch: a view, no copy
                image_ids = None
                xw = xg[:, starts[c0]:starts[c0] + nw * tile]  # (G, nw*W, N, C)
                rw = rg[:, starts[c0]:starts[c0] + nw * tile]
            else:
                image_ids = torch.tensor([s + i for s in starts[c0:c0 + nw] for i in range(tile)], device=x.device)
                xw = xg.index_select(1, image_ids)  # (G, nw*W, N, C)
                rw = rg.index_select(1, image_ids)
            idx = mask = None
            if official and not joint:
                idx, mask = keys[c0:c0 + nw], valid[c0:c0 + nw]  # (nw, W, L): kept tokens of the others + own
            elif not joint:
                idx = torch.cat([sampled_indices[c0:c0 + nw].cpu(), own.expand(nw, tile, tokens)], dim=2)  # (nw, W, k+N)
            # a helper call, so that one window's temporaries are freed before the next window starts
            y = self._attend_windows(attn, xw, rw, tile, idx, mask)  # (G, nw*W, N, C)
            if out is None:
                make = torch.empty if partition else torch.zeros
                out = make(groups, images, tokens, y.shape[-1], dtype=y.dtype, device=y.device)
            if partition:
                out[:, starts[c0]:starts[c0] + nw * tile] = y
            else:
                out.index_add_(1, image_ids, y)  # overlapping windows: summed here, averaged below
            del xw, rw, y
        if not partition:
            count = torch.zeros(images, dtype=out.dtype, device=out.device)
            for s in starts:
                count[s:s + tile] += 1
            out.div_(count.view(1, images, 1, 1))
        return out.view(groups * images, tokens, -1)

    def _attend_windows(self, attn, xw, rw, tile, idx, valid=None):
        """Attention inside nw windows of W = ``tile`` images. xw, rw: (G, nw*W, N, C) inputs and residuals;
        idx: (nw, W, k+N) key positions of every image in its window's W*N tokens, or None for r = 1 (the
        whole window); valid: (nw, W, k+N) bool, False on padded key positions (official sampling), or None.
        Returns (G, nw*W, N, C)."""
        groups, n_slots, tokens, C = xw.shape
        heads = attn.heads
        nw = n_slots // tile
        xw = xw.reshape(groups * nw, tile * tokens, C)  # (G*nw, W*N, C): each window's tokens end to end
        query = attn.to_q(xw)  # (G*nw, W*N, inner)
        key = attn.to_k(xw)
        value = attn.to_v(xw)
        inner, dtype = key.shape[-1], query.dtype
        head_dim = inner // heads
        n_img = groups * n_slots
        if idx is None:
            # r = 1: every image sees all W*N tokens of its window = plain attention over the joined window
            q = query.view(groups * nw, tile * tokens, heads, head_dim).transpose(1, 2)  # (G*nw, h, W*N, d)
            k = key.view(groups * nw, tile * tokens, heads, head_dim).transpose(1, 2)
            v = value.view(groups * nw, tile * tokens, heads, head_dim).transpose(1, 2)
        else:
            kv_len = idx.shape[2]
            # positions in the G*nw windows' tokens laid end to end; the same sample in both guidance halves
            offsets = torch.arange(groups * nw).view(groups * nw, 1) * (tile * tokens)  # (G*nw, 1)
            rows = (idx.reshape(nw, tile * kv_len).repeat(groups, 1) + offsets).reshape(-1).to(xw.device)
            # sampled + own keys of every image of the window: (G*nw*W*(k+N), inner) -> (G*nw*W, h, k+N, d)
            k = key.reshape(-1, inner).index_select(0, rows).view(n_img, kv_len, heads, head_dim).transpose(1, 2)
            del key
            v = value.reshape(-1, inner).index_select(0, rows).view(n_img, kv_len, heads, head_dim).transpose(1, 2)
            del value, rows
            q = query.view(n_img, tokens, heads, head_dim).transpose(1, 2)  # (G*nw*W, h, N, d)
        del query  # q, k, v are views of (or copies from) the projections
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        mask = None
        if valid is not None:  # the same keep-masks in both guidance halves: (n_img, 1, 1, L), True = a real key
            mask = valid.reshape(nw * tile, -1).repeat(groups, 1).view(n_img, 1, 1, -1).to(xw.device)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        del q, k, v  # attended: (n, h, N', d)
        # (n, h, N', d) -> (n, N', h*d); for the joint case N' = W*N splits back into W images of N tokens
        attended = attended.transpose(1, 2).reshape(n_img, tokens, inner).to(dtype)
        y = self._finish(attn, attended, rw.reshape(n_img, tokens, -1))  # (n_img, N, C)
        return y.view(groups, n_slots, tokens, -1)

    def _write_bank(self, x, groups, images, tokens):
        """Store a sample at rate r of the batch's tokens (same positions in both halves): (G, k, C)."""
        state = self.state
        if len(state.characters) != 1:
            raise ValueError("write mode stores one character per batch: use `with handle.write('name'):`")
        if not state.bank_step():
            return
        pool = images * tokens
        k = int(math.floor(self.rate * pool + 0.5))
        if state.sampling == "official":  # the kept tokens of this step's keep-masks, image after image
            keep = state.shared_keep_masks(images, tokens, self.rate)
            picked = torch.cat([j * tokens + m for j, m in enumerate(keep)])  # (sum of m_j,)
        elif k == pool:
            picked = torch.arange(pool)
        else:
            picked = torch.randperm(pool, generator=state.generator)[:k]  # (k,)
        flat = x.reshape(groups, pool, x.shape[-1])  # (G, B*N, C)
        state.bank.write(state.characters[0], state.step, self.name, flat[:, picked.to(x.device)])

    def _read(self, attn, x, residual, groups, images, tokens):
        """Each image attends to its own tokens + the bank of the named characters. (G*B, N, C) -> same."""
        state = self.state
        if not state.characters:
            raise ValueError("read mode needs at least one character: use `with handle.read('name', ...):`")
        banks = [state.bank.read(c, state.step, self.name) for c in state.characters]
        for c, b in zip(state.characters, banks):
            if b.shape[0] != groups or b.shape[2] != x.shape[-1]:
                raise ValueError(f"bank of {c!r} has shape {tuple(b.shape)} but this layer reads {groups} guidance "
                                 f"group(s) of {x.shape[-1]} channels: write and read with the same "
                                 "guidance_halves setting and the same layers")
        bank = torch.cat(banks, dim=1).to(device=x.device, dtype=x.dtype)  # (G, Kb, C)
        heads = attn.heads
        query = attn.to_q(x)  # (G*B, N, inner)
        key = attn.to_k(x)
        value = attn.to_v(x)
        bank_key = attn.to_k(bank)  # (G, Kb, inner), projected once, shared by the images of a half
        bank_value = attn.to_v(bank)
        inner = key.shape[-1]
        head_dim = inner // heads
        kb = bank.shape[1]

        def with_bank(own, extra):  # (G*B, N, inner), (G, Kb, inner) -> (G*B, h, Kb + N, d)
            extra = extra[:, None].expand(groups, images, kb, inner).reshape(groups * images, kb, inner)
            both = torch.cat([extra, own], dim=1)
            return both.view(groups * images, kb + tokens, heads, head_dim).transpose(1, 2)

        q = query.view(groups * images, tokens, heads, head_dim).transpose(1, 2)  # (G*B, h, N, d)
        k = with_bank(key, bank_key)
        v = with_bank(value, bank_value)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        attended = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (G*B, h, N, d)
        attended = attended.transpose(1, 2).reshape(groups * images, tokens, inner).to(query.dtype)
        return self._finish(attn, attended, residual)


# ----------------------------------------------------------------------------------------------------
# 4. Install / uninstall on a UNet2DConditionModel
# ----------------------------------------------------------------------------------------------------
def self_attention_layer_names(unet) -> list[str]:
    """Module names of the self-attention (``attn1``) layers of a UNet, e.g.
    ``up_blocks.0.attentions.0.transformer_blocks.0.attn1``."""
    from diffusers.models.attention_processor import Attention

    return [name for name, m in unet.named_modules()
            if isinstance(m, Attention) and not m.is_cross_attention and name.endswith("attn1")]


def layer_scale(unet, name: str, vae_scale_factor: int = 8) -> int:
    """How many image pixels one token of layer ``name`` spans along a side: 32 for SDXL's ``up_blocks.0``
    (a 1024-px image -> 32x32 tokens), 16 for ``up_blocks.1``. The official code calls the rates of these
    two resolutions sa32 and sa64 (64x64 tokens at 1024 px)."""
    levels = len(unet.config.block_out_channels)  # each block but the last halves the grid
    parts = name.split(".")
    if parts[0] == "down_blocks":
        depth = int(parts[1])
    elif parts[0] == "up_blocks":
        depth = levels - 1 - int(parts[1])
    elif parts[0] == "mid_block":
        depth = levels - 1
    else:
        raise ValueError(f"layer {name!r} is not in down_blocks, mid_block or up_blocks: cannot tell its resolution")
    return vae_scale_factor * 2 ** depth


_LAYER_SETS = {
    "all": lambda name: True,
    "up": lambda name: name.startswith("up_blocks."),
    "down": lambda name: name.startswith("down_blocks."),
    "mid": lambda name: name.startswith("mid_block."),
}


def csa_layer_names(unet, layers: str | Callable[[str], bool] = "up") -> list[str]:
    """The self-attention layers ``layers`` chooses ("up", "all", "down", "mid" or a predicate on the name)."""
    if isinstance(layers, str):
        if layers not in _LAYER_SETS:
            raise ValueError(f"layers must be one of {sorted(_LAYER_SETS)} or a predicate name -> bool, got {layers!r}")
        predicate = _LAYER_SETS[layers]
    elif callable(layers):
        predicate = layers
    else:
        raise ValueError(f"layers must be 'up', 'all', 'down', 'mid' or a callable, got {type(layers).__name__}")
    chosen = [n for n in self_attention_layer_names(unet) if predicate(n)]
    if not chosen:
        raise ValueError(f"no self-attention layer matches layers={layers!r}; "
                         f"available: {self_attention_layer_names(unet)[:4]}...")
    return chosen


class ConsistentAttentionHandle:
    """What :func:`install_consistent_attention` returns: the step state, the bank, mode switches, remove().

    Typical use in a denoising loop::

        handle = install_consistent_attention(unet, rate=0.5, tile=4, guidance_halves=True)
        for i, t in enumerate(timesteps):
            handle.set_step(i)
            noise = unet(torch.cat([latents] * 2), t, ...).sample
        handle.remove()
    """

    def __init__(self, unet, processors: dict[str, ConsistentSelfAttnProcessor], original: dict, state: CSAState):
        self.unet = unet
        self.processors = processors  # processor key ("...attn1.processor") -> installed processor
        self._original = original  # every processor of the UNet before install, by key
        self.state = state
        self.removed = False

    @property
    def layer_names(self) -> list[str]:
        return [key[: -len(".processor")] for key in self.processors]

    @property
    def bank(self) -> ConsistencyBank:
        return self.state.bank

    @property
    def guidance_halves(self) -> bool:
        return self.state.guidance_halves

    @guidance_halves.setter
    def guidance_halves(self, value: bool) -> None:
        self.state.guidance_halves = bool(value)

    def set_step(self, step: int | None) -> None:
        """The denoising step index (0, 1, ...): drives the skip schedule and keys the bank."""
        if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
            raise ValueError(f"step must be an int >= 0 (the denoising step index) or None, got {step!r}")
        self.state.step = step

    def set_tiles(self, tile: int | None, stride: int | None = None) -> None:
        """Change the window size (``None``: one window over the batch) and stride (``None``: = tile, disjoint
        tiles; 1: the paper's sliding window) of every installed layer,
        e.g. per batch of a story. Checked here; a tile larger than a later batch is refused at that call."""
        if tile is not None:
            check_tile_stride(tile, stride, tile)
        elif stride is not None:
            raise ValueError("stride needs a tile size: pass tile=W as well (or neither for one window)")
        for proc in self.processors.values():
            proc.tile, proc.stride = tile, stride

    def reseed(self, seed: int) -> None:
        self.state.generator.manual_seed(seed)
        self.state.keep_masks = {}  # official sampling: the next batch draws its own

    @contextlib.contextmanager
    def _mode(self, mode: str, characters: tuple[str, ...]) -> Iterator[ConsistentAttentionHandle]:
        previous = (self.state.mode, self.state.characters)
        self.state.mode, self.state.characters = mode, characters
        try:
            yield self
        finally:
            self.state.mode, self.state.characters = previous

    def write(self, character: str):
        """Context: CSA within the batch (the character's reference images) and store their sampled tokens."""
        if not isinstance(character, str) or not character:
            raise ValueError(f"write needs one character name, got {character!r}: e.g. handle.write('alice')")
        return self._mode("write", (character,))

    def read(self, *characters: str):
        """Context: each image attends to its own tokens + the stored tokens of these characters."""
        if not characters or not all(isinstance(c, str) and c for c in characters):
            raise ValueError(f"read needs one or more character names, got {characters!r}: "
                             "e.g. handle.read('alice', 'bob')")
        return self._mode("read", tuple(characters))

    def off(self):
        """Context: the original processors (plain self-attention), e.g. for a no-CSA baseline."""
        return self._mode("off", ())

    def remove(self) -> None:
        """Put back the exact processor objects that were there before install."""
        if self.removed:
            return
        self.unet.set_attn_processor(dict(self._original))
        self.removed = True

    def __enter__(self) -> ConsistentAttentionHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        return (f"ConsistentAttentionHandle(layers={len(self.processors)}, mode={self.state.mode!r}, "
                f"step={self.state.step}, removed={self.removed})")


def install_consistent_attention(
    unet,
    rate: float = 0.5,
    tile: int | None = None,
    stride: int | None = None,
    *,
    layers: str | Callable[[str], bool] = "up",
    guidance_halves: bool = False,
    include_self_in_sample: bool = False,
    first_steps_without_csa: int = 0,
    skip_schedule: SkipSchedule | None = None,
    window_batch: int | None = 1,
    seed: int = 0,
    generator: torch.Generator | None = None,
    sampling: str = "exact",
    rate_by_scale: dict[int, float] | None = None,
    vae_scale_factor: int = 8,
    bank: ConsistencyBank | None = None,
    bank_steps: int | None = None,
) -> ConsistentAttentionHandle:
    """Put :class:`ConsistentSelfAttnProcessor` on chosen self-attention layers of a ``UNet2DConditionModel``.

    Args:
        rate, tile, stride: sampling rate r; window size W (``None``: one window over the batch); window step
            (``None``: = W, disjoint tiles; 1: the paper's sliding window).
        layers: "up" (as the official code: self-attention of the up-blocks), "all", "down", "mid", or a
            predicate on the layer name (e.g. ``lambda name: "up_blocks.1" in name``). Cross-attention
            (``attn2``) is never touched.
        guidance_halves: the batch is [uncond; cond]; CSA runs within each half, never across.
        first_steps_without_csa: steps 0 .. n-1 use plain attention (set the step with ``handle.set_step``).
        skip_schedule: e.g. ``OFFICIAL_SKIP_SCHEDULE`` (random plain-attention layer calls).
        seed / generator: the random source of the sampling and the skips.
        sampling: "exact" (each image draws exactly k tokens per layer call) or "official" (one keep-mask per
            source image and step, shared by the layers of a resolution and both guidance halves).
        rate_by_scale: a rate per resolution, keyed by :func:`layer_scale` (official sa32 / sa64:
            ``{32: 0.5, 16: 0.5}``); layers of other scales take ``rate``. ``vae_scale_factor``: pixels per latent.
        bank: the :class:`ConsistencyBank` to write to and read from (default: a new one); e.g. one with
            characters loaded from files, or ``ConsistencyBank(device="cpu", dtype=torch.float16)``.
        bank_steps: store (and read) only the first n steps' tokens; later steps of read batches use plain
            attention. None: every step.
    Other arguments: see :class:`ConsistentSelfAttnProcessor`.
    """
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise TypeError(f"install_consistent_attention needs a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    chosen = csa_layer_names(unet, layers)
    if not isinstance(first_steps_without_csa, int) or first_steps_without_csa < 0:
        raise ValueError(f"first_steps_without_csa must be an int >= 0, got {first_steps_without_csa!r}")
    check_sampling(sampling)
    if sampling == "official" and include_self_in_sample:
        raise ValueError("include_self_in_sample is a choice of exact sampling: official sampling keeps every own "
                         "token and masks the others; drop one of the two")
    if bank_steps is not None and (isinstance(bank_steps, bool) or not isinstance(bank_steps, int) or bank_steps < 1):
        raise ValueError(f"bank_steps must be an int >= 1 or None (every step), got {bank_steps!r}")
    rate_by_scale = {int(k): check_rate(v) for k, v in (rate_by_scale or {}).items()}
    original = dict(unet.attn_processors)  # key -> processor object (kept to restore exactly)
    if any(isinstance(p, ConsistentSelfAttnProcessor) for p in original.values()):
        raise ValueError("consistent attention is already installed on this UNet: call handle.remove() first")
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    state = CSAState(generator=generator, bank=ConsistencyBank() if bank is None else bank,
                     guidance_halves=bool(guidance_halves), first_steps_without_csa=first_steps_without_csa,
                     skip_schedule=skip_schedule, sampling=sampling, bank_steps=bank_steps)
    processors = {}
    for name in chosen:
        key = name + ".processor"
        layer_rate = rate_by_scale.get(layer_scale(unet, name, vae_scale_factor), rate) if rate_by_scale else rate
        processors[key] = ConsistentSelfAttnProcessor(
            layer_rate, tile, stride, include_self_in_sample=include_self_in_sample, window_batch=window_batch,
            state=state, name=name, original=original[key])
    unet.set_attn_processor({**original, **processors})
    return ConsistentAttentionHandle(unet, processors, original, state)
