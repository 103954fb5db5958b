"""Keyframe-reading attention: the in-between frames of a transition read the keyframes' tokens (notebook 06).

The video decoder (`sdlite.video.VideoDecoder`) denoises the L frames of a clip together. Its spatial
self-attention layers see one frame at a time: (B * L, N, C), each frame attending to its own N tokens. To draw the
character where it stands at frame i, a frame must fetch the character's appearance from wherever it stood in the
keyframes, and its own tokens hold the keyframes only as input channels at the *same* positions.

Consistent self-attention (section 3.1, notebook 03) solved the same problem across the panels of a story: an image
attends to its own tokens and to tokens of the other images, so appearance travels between them. Here the
"other images" are the clip's first and last frames, the keyframes (pinned to the true keyframes while sampling):

    keys/values of frame i = [frame i's tokens ; frame 0's tokens ; frame L-1's tokens]      (3N tokens)

the same projections `to_k` / `to_v` for all three, no new parameters, as the CSA bank reads its stored tokens.
Frame i's query at the character's new place can then match the character's tokens in the keyframes wherever
they are. The temporal layers (motion modules) and the cross-attention are left as they are.

`KeyframeAttnProcessor` is the fast path; `keyframe_attention_reference` the same maths written out per frame
(the notebook checks one against the other). `install_keyframe_attention(unet)` puts the processor on every
spatial self-attention layer of a diffusers `UNetMotionModel`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import prepare_tokens


def _check_frames(batch: int, frames: int) -> int:
    if frames < 2:
        raise ValueError(f"keyframe attention needs at least 2 frames per clip (the two keyframes), got {frames}")
    if batch % frames:
        raise ValueError(f"{batch} frames in the batch are not whole clips of {frames} frames: the decoder "
                         "passes (B * L, N, C), set `frames` to L")
    return batch // frames


def keyframe_tokens(x: torch.Tensor, frames: int) -> torch.Tensor:
    """Each frame's keys (or values) joined with its clip's keyframes': (B * L, N, D) -> (B * L, 3N, D)."""
    clips = _check_frames(x.shape[0], frames)
    n, d = x.shape[1:]
    per_clip = x.view(clips, frames, n, d)  # (B, L, N, D)
    keys = per_clip[:, [0, -1]].reshape(clips, 1, 2 * n, d).expand(clips, frames, 2 * n, d)  # (B, L, 2N, D)
    return torch.cat([per_clip, keys], dim=2).reshape(clips * frames, 3 * n, d)


def keyframe_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int) -> torch.Tensor:
    """The readable path, one frame at a time, one head: q, k, v (B * L, N, D) -> (B * L, N, D).

    Frame i of clip b attends to [its own keys ; frame 0's ; frame L-1's] with softmax(q k^T / sqrt(D))."""
    clips = _check_frames(q.shape[0], frames)
    out = torch.empty_like(q)
    for b in range(clips):
        first, last = b * frames, b * frames + frames - 1
        for i in range(b * frames, (b + 1) * frames):
            keys = torch.cat([k[i], k[first], k[last]])  # (3N, D)
            values = torch.cat([v[i], v[first], v[last]])
            weights = torch.softmax(q[i] @ keys.T / q.shape[-1] ** 0.5, dim=-1)  # (N, 3N)
            out[i] = weights @ values
    return out


class KeyframeAttnProcessor:
    """A diffusers attention processor for the decoder's spatial self-attention (attn1) layers.

    Step order as diffusers' `AttnProcessor2_0`: prepare -> q/k/v projections -> keyframe tokens joined to k/v ->
    heads -> SDPA -> output projection -> residual / rescale. `frames` (L) is set by the decoder before each call of
    its UNet (`VideoDecoder.forward`); the batch must be whole clips, frame-major (B * L, N, C).
    """

    def __init__(self, frames: int = 16) -> None:
        self.frames = frames

    def __repr__(self) -> str:
        return f"KeyframeAttnProcessor(frames={self.frames})"

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("KeyframeAttnProcessor is for self-attention (attn1) layers without a mask: leave "
                             "cross-attention and the motion modules on their own processors")
        # prepare: (B*L, C, H, W) -> (B*L, N, C), as AttnProcessor2_0 (and CSA's processor) does
        residual = hidden_states
        hidden_states, spatial = prepare_tokens(attn, hidden_states, temb)
        batch, tokens, _ = hidden_states.shape

        query = attn.to_q(hidden_states)  # (B*L, N, inner)
        key = keyframe_tokens(attn.to_k(hidden_states), self.frames)  # (B*L, 3N, inner)
        value = keyframe_tokens(attn.to_v(hidden_states), self.frames)
        inner = query.shape[-1]
        heads, head_dim = attn.heads, inner // attn.heads
        q = query.view(batch, tokens, heads, head_dim).transpose(1, 2)  # (B*L, h, N, d)
        k = key.view(batch, 3 * tokens, heads, head_dim).transpose(1, 2)  # (B*L, h, 3N, d)
        v = value.view(batch, 3 * tokens, heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)  # (B*L, h, N, d)
        out = out.transpose(1, 2).reshape(batch, tokens, inner).to(query.dtype)

        out = attn.to_out[1](attn.to_out[0](out))  # output projection, dropout
        if spatial:
            out = out.transpose(-1, -2).reshape(batch, *spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def spatial_self_attention_names(unet) -> list[str]:
    """The processor names of a `UNetMotionModel`'s spatial self-attention layers (attn1 of its Transformer2D
    blocks): not the motion modules' temporal attention, not cross-attention."""
    return [name for name in unet.attn_processors
            if name.endswith("attn1.processor") and ".attentions." in name and "motion_modules" not in name]


def install_keyframe_attention(unet, frames: int = 16) -> list[KeyframeAttnProcessor]:
    """Put a `KeyframeAttnProcessor` on every spatial self-attention layer of `unet`; the others keep theirs.
    Returns the installed processors (set their `frames` before a call)."""
    names = spatial_self_attention_names(unet)
    if not names:
        raise ValueError("no spatial self-attention layers found: keyframe attention needs a diffusers "
                         "UNetMotionModel with Transformer2D blocks")
    processors = {name: KeyframeAttnProcessor(frames) for name in names}
    unet.set_attn_processor({**unet.attn_processors, **processors})
    return list(processors.values())
