"""The semantic motion predictor (StoryDiffusion, section 3.2), trained in storyworld.

A transition video between two keyframes is planned in CLIP *image* space before a single pixel is drawn:

1. both keyframes -> image embeddings with a CLIP vision tower (`ImageEmbedder`): e_start, e_end, each (D,);
2. linear interpolation to L frame embeddings: e_i = (1 - t_i) e_start + t_i e_end, t_i = i / (L - 1);
3. a transformer (`SemanticMotionPredictor`) reads the L interpolated embeddings as a sequence and predicts the
   L frame embeddings of the real motion. Linear interpolation of embeddings is a cross-fade ("half of the
   start picture plus half of the end picture"); the transformer has seen real motions and knows that halfway
   through a walk the character stands halfway across the frame.

The predictor is trained by MSE regression onto the true CLIP embeddings of every frame of storyworld clips
(`sdlite.train.motion`). The paper's predictor has 8 layers, hidden size 1024 and 12 heads on OpenCLIP ViT-H-14
embeddings (`PAPER_SIZE`); storyworld ships a small one (`data/motion/predictor`).

The predicted embeddings are the per-frame control signal of the video decoder (`sdlite.video`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from torch import nn

from .paths import data_dir

# The paper's predictor: 8 transformer layers, hidden size 1024, 12 heads (of 64 channels: 1024 is not a multiple
# of 12, so the attention's inner width is 12 x 64 = 768, projected back to 1024), on ViT-H-14 embeddings (1024).
PAPER_SIZE = dict(embed_dim=1024, hidden_size=1024, num_layers=8, num_heads=12, head_dim=64)
# What storyworld ships: the storyworld CLIP's projection width is 128.
STORYWORLD_SIZE = dict(embed_dim=128, hidden_size=128, num_layers=4, num_heads=4, head_dim=32)
MOTION_SUBDIR = "motion"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's pixel normalisation (real CLIP towers)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def motion_dir() -> Path:
    """The shipped motion weights, `data/motion/` (`predictor/`, `decoder/`)."""
    return data_dir() / MOTION_SUBDIR


def load_shipped(cls, folder: str | os.PathLike | None, name: str, what: str, train_command: str):
    """`cls.from_pretrained` of `folder` (default `data/motion/<name>`), in eval mode, with a clear error if absent."""
    folder = Path(folder) if folder is not None else motion_dir() / name
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no {what}: train it with `{train_command}` "
                                "or restore data/motion from git")
    return cls.from_pretrained(folder).eval()


def check_frames(frames) -> int:
    if isinstance(frames, bool) or not isinstance(frames, (int, np.integer)) or frames < 2:
        raise ValueError(f"frames={frames!r}: a transition needs at least 2 frames (its two keyframes), e.g. 16")
    return int(frames)


# ----------------------------------------------------------------------------------------------------------
# 1. CLIP image space
# ----------------------------------------------------------------------------------------------------------
def grid_parts(grid, embed_dim: int | None = None, names: tuple[str, str] = ("grid", "embed_dim")) -> int:
    """Check an `ImageEmbedder` grid (and, given, an embedding width made of its parts): the number of parts,
    1 + grid**2 (the pooled embedding and one per cell). `names`: the caller's argument names, for the error."""
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 0:
        raise ValueError(f"{names[0]}={grid!r} must be an int >= 0 (0: the pooled embedding only)")
    parts = 1 + grid * grid
    if embed_dim is not None and embed_dim % parts:
        raise ValueError(f"{names[1]}={embed_dim} is not (1 + {names[0]}**2 = {parts}) x D: use the embed_dim of an "
                         f"ImageEmbedder(grid={grid})")
    return parts


class ImageEmbedder(nn.Module):
    """Images -> CLIP image embeddings (the projected, pooled output of a CLIP vision tower), (B, 3, H, W) -> (B, D).

    With `grid=g > 0` each image also gets g x g *cell* embeddings: the tower's patch tokens averaged over the cells
    of a g x g grid, through the same final norm and projection as the pooled one, so each lives in the same
    D-dimensional space. The output is then (B, D * (1 + g*g)): [pooled ; cell (0,0) ; cell (0,1) ; ...]. The pooled
    embedding is a summary of *what* is in the picture and barely says *where* (docs/lab/clip_position.py: moving
    the storyworld character across the frame changes it 7x less than changing its pose); the cells say where.
    `pooled(e)` gives back the first D numbers, the classic CLIP image embedding.

    Takes images as float in [-1, 1] (sdlite's convention) at any size: they are resized to the tower's
    `image_size` and normalised with `mean`/`std` when given (real CLIP towers want OpenAI's normalisation; the
    storyworld tower was trained on [-1, 1] images as they are). Works with a `CLIPModel` or a
    `CLIPVisionModelWithProjection` (both have `vision_model` and `visual_projection`).
    """

    def __init__(self, clip, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 grid: int = 0):
        super().__init__()
        parts = grid_parts(grid)
        if not (hasattr(clip, "vision_model") and hasattr(clip, "visual_projection")):
            raise TypeError(f"ImageEmbedder needs a CLIPModel or CLIPVisionModelWithProjection, got "
                            f"{type(clip).__name__}: load one with transformers' from_pretrained")
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        cfg = clip.config.vision_config if hasattr(clip.config, "vision_config") else clip.config
        self.image_size = int(cfg.image_size)
        self.grid = grid
        self.pooled_dim = int(self.visual_projection.out_features)
        self.embed_dim = self.pooled_dim * parts
        self.normalize = mean is not None
        self.register_buffer("mean", torch.tensor(mean or (0.0, 0.0, 0.0)).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std or (1.0, 1.0, 1.0)).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    @classmethod
    def storyworld(cls, folder: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                   grid: int = 0) -> ImageEmbedder:
        """The storyworld CLIP's vision tower (64x64 images in [-1, 1], no extra normalisation)."""
        from .storyworld.models import load_storyworld_clip

        clip, _ = load_storyworld_clip(device, folder)
        return cls(clip, grid=grid).to(device)  # the normalisation buffers too

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                        grid: int = 0) -> ImageEmbedder:
        """A real CLIP vision tower (`CLIPVisionModelWithProjection` folder or hub id, e.g. OpenCLIP ViT-H-14 in
        transformers format) with OpenAI's pixel normalisation. Offline: the weights must already be local."""
        from transformers import CLIPVisionModelWithProjection

        model = CLIPVisionModelWithProjection.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        return cls(model, CLIP_MEAN, CLIP_STD, grid=grid).to(device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (B, 3, H, W) -> the tower's input (B, 3, S, S)."""
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, 3, H, W) in [-1, 1], got {shape}: "
                             "convert uint8 pictures with sdlite.storyworld.to_tensor")
        x = images.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        if self.normalize:
            x = ((x + 1) / 2 - self.mean) / self.std
        return x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        x = self.preprocess(images).to(self.mean.device)
        out = []
        for i in range(0, len(x), batch_size):
            states = self.vision_model(pixel_values=x[i : i + batch_size])
            e = self.visual_projection(states.pooler_output)  # (b, D): the normed class token, projected
            if self.grid:
                e = torch.cat([e, self.cells(states.last_hidden_state).flatten(1)], dim=1)  # (b, D (1 + g*g))
            out.append(e)
        return torch.cat(out)

    def cells(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last hidden states (b, 1 + P, hidden) -> cell embeddings (b, g*g, D), row-major over the grid."""
        patches = hidden[:, 1:]  # (b, P, hidden): drop the class token
        side = math.isqrt(patches.shape[1])
        if side * side != patches.shape[1]:
            raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
        maps = patches.transpose(1, 2).reshape(len(hidden), -1, side, side)  # (b, hidden, side, side)
        pooled = F.adaptive_avg_pool2d(maps, self.grid).flatten(2).transpose(1, 2)  # (b, g*g, hidden)
        return self.visual_projection(self.vision_model.post_layernorm(pooled))  # (b, g*g, D)

    def pooled(self, embeds: torch.Tensor) -> torch.Tensor:
        """(..., embed_dim) -> (..., pooled_dim): the classic CLIP image embedding part."""
        return embeds[..., : self.pooled_dim]


# ----------------------------------------------------------------------------------------------------------
# 2. Linear interpolation in embedding space
# ----------------------------------------------------------------------------------------------------------
def frame_fractions(frames: int, device=None) -> torch.Tensor:
    """t_i = i / (L - 1) for i = 0..L-1: where each frame sits between the keyframes, (L,)."""
    frames = check_frames(frames)
    return torch.linspace(0.0, 1.0, frames, device=device)


def linear_interpolation(start: torch.Tensor, end: torch.Tensor, frames: int) -> torch.Tensor:
    """(1 - t_i) start + t_i end for every frame: (..., D), (..., D) -> (..., L, D). Works on latents too
    ((B, C, H, W) -> (B, L, C, H, W)) when `start` and `end` have a leading batch dimension and more after it."""
    if start.shape != end.shape:
        raise ValueError(f"start {tuple(start.shape)} and end {tuple(end.shape)} must have the same shape")
    t = frame_fractions(frames, start.device).to(start.dtype)  # (L,)
    if start.ndim <= 2:  # (D,) or (B, D) -> (..., L, D)
        t = t.view(-1, 1)
        return (1 - t) * start.unsqueeze(-2) + t * end.unsqueeze(-2)
    t = t.view(1, -1, *([1] * (start.ndim - 1)))  # (1, L, 1, ...)
    return (1 - t) * start.unsqueeze(1) + t * end.unsqueeze(1)


def fraction_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of the frame fractions t in [0, 1] (scaled to [0, 1000] like diffusion timesteps):
    (L,) -> (L, dim). Fractions, not frame indices, so one predictor serves any number of frames."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]  # (L, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


# ----------------------------------------------------------------------------------------------------------
# 3. The transformer
# ----------------------------------------------------------------------------------------------------------
class SemanticMotionPredictor(ModelMixin, ConfigMixin):
    """(e_start, e_end) -> L predicted frame embeddings: linear interpolation, then a transformer over the frames.

    The transformer predicts a *correction* of the interpolation (zero-initialised output layer: an untrained
    predictor IS linear interpolation). With `pin_endpoints` the correction is zero at the two keyframes, whose
    embeddings are known exactly. Blocks are diffusers' `BasicTransformerBlock` (pre-norm self-attention + MLP).
    `save_pretrained` / `from_pretrained` as any diffusers model.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 128, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                 head_dim: int = 32, pin_endpoints: bool = True, image_grid: int = 0):
        super().__init__()  # image_grid: the `ImageEmbedder(grid=...)` whose embeddings it reads and predicts
        for name, v in dict(embed_dim=embed_dim, hidden_size=hidden_size, num_layers=num_layers,
                            num_heads=num_heads, head_dim=head_dim).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive int (the paper: {PAPER_SIZE})")
        grid_parts(image_grid, embed_dim, names=("image_grid", "embed_dim"))
        self.proj_in = nn.Linear(embed_dim, hidden_size)
        self.frame_embed = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(),
                                         nn.Linear(hidden_size, hidden_size))
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(hidden_size, num_heads, head_dim, activation_fn="gelu", attention_bias=True)
            for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(hidden_size)
        self.proj_out = nn.Linear(hidden_size, embed_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, start: torch.Tensor, end: torch.Tensor, frames: int = 16) -> torch.Tensor:
        """start, end: (B, D) keyframe embeddings -> (B, L, D) frame embeddings."""
        d = self.config.embed_dim
        if start.ndim != 2 or start.shape != end.shape or start.shape[-1] != d:
            raise ValueError(f"start and end must both be (B, {d}) embeddings, got {tuple(start.shape)} and "
                             f"{tuple(end.shape)}: embed the keyframes with an ImageEmbedder of width {d}")
        interp = linear_interpolation(start, end, frames)  # (B, L, D)
        t = frame_fractions(frames, start.device)  # (L,)
        when = fraction_embedding(t, self.config.hidden_size).to(interp.dtype)  # (L, H), in the weights' dtype
        h = self.proj_in(interp) + self.frame_embed(when)  # (B, L, H)
        for block in self.blocks:
            h = block(h)  # (B, L, H): every frame attends to every frame
        delta = self.proj_out(self.norm_out(h))  # (B, L, D)
        if self.config.pin_endpoints:
            keep = torch.ones(frames, 1, device=h.device, dtype=h.dtype)
            keep[0] = keep[-1] = 0
            delta = delta * keep
        return interp + delta

    @classmethod
    def storyworld(cls, folder: str | os.PathLike | None = None) -> SemanticMotionPredictor:
        """The shipped storyworld predictor, `data/motion/predictor`."""
        return load_shipped(cls, folder, "predictor", "predictor", "python -m sdlite.train motion-predictor")


def predict_frame_embeddings(embedder: ImageEmbedder, predictor: SemanticMotionPredictor | None,
                             start: torch.Tensor, end: torch.Tensor, frames: int = 16) -> torch.Tensor:
    """Keyframe images (B, 3, H, W) in [-1, 1] -> (B, L, D) frame embeddings (linear interpolation if no predictor)."""
    e = embedder(torch.cat([start, end]))  # (2B, D)
    e_start, e_end = e.chunk(2)
    if predictor is None:
        return linear_interpolation(e_start, e_end, frames)
    with torch.no_grad():
        return predictor(e_start.to(predictor.dtype), e_end.to(predictor.dtype), frames)


# ----------------------------------------------------------------------------------------------------------
# How close the predictor comes
# ----------------------------------------------------------------------------------------------------------
def predictor_errors(predictor: SemanticMotionPredictor, embeds: torch.Tensor, batch_size: int = 256) -> dict:
    """Mean squared error to the true frame embeddings (N, L, D), of the predictor and of linear interpolation,
    over the in-between frames (the keyframes are given), and their ratio (< 1: the predictor is closer)."""
    if embeds.ndim != 3 or embeds.shape[1] < 3:
        raise ValueError(f"embeds must be (N, L, D) with L >= 3 (in-between frames to score), got "
                         f"{tuple(embeds.shape)}")
    n, frames, _ = embeds.shape
    sq_pred, sq_lin = 0.0, 0.0
    predictor = predictor.eval()
    with torch.no_grad():
        for i in range(0, n, batch_size):
            e = embeds[i : i + batch_size].to(predictor.device, predictor.dtype)
            pred = predictor(e[:, 0], e[:, -1], frames)
            lin = linear_interpolation(e[:, 0], e[:, -1], frames)
            sq_pred += (pred - e)[:, 1:-1].float().pow(2).sum().item()
            sq_lin += (lin - e)[:, 1:-1].float().pow(2).sum().item()
    count = n * (frames - 2) * embeds.shape[2]
    return {"mse_predictor": sq_pred / count, "mse_linear": sq_lin / count, "ratio": sq_pred / max(sq_lin, 1e-30)}


if __name__ == "__main__":  # the command lines live in sdlite.cli: say where
    raise SystemExit("python -m sdlite.motion has moved: `python -m sdlite.train motion-cache ...` (was `cache`), "
                     "`python -m sdlite.train motion-predictor ...` (was `train`), `python -m sdlite.eval "
                     "predictor-errors ...` (was `errors`), with the same options")
