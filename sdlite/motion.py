"""The semantic motion predictor (StoryDiffusion, section 3.2), trained in storyworld.

A transition video between two keyframes is planned in CLIP *image* space before a single pixel is drawn:

1. both keyframes -> image embeddings with a CLIP vision tower (`ImageEmbedder`): e_start, e_end, each (D,);
2. linear interpolation to L frame embeddings: e_i = (1 - t_i) e_start + t_i e_end, t_i = i / (L - 1);
3. a transformer (`SemanticMotionPredictor`) reads the L interpolated embeddings as a sequence and predicts the
   L frame embeddings of the real motion. Linear interpolation of embeddings is a cross-fade ("half of the
   start picture plus half of the end picture"); the transformer has seen real motions and knows that halfway
   through a walk the character stands halfway across the frame.

Training (`train_predictor`) is an MSE regression onto the true CLIP embeddings of every frame of storyworld clips
(`sdlite.storyworld.ClipDataset`), with an `accelerate` loop. The paper's predictor has 8 layers, hidden size 1024
and 12 heads on OpenCLIP ViT-H-14 embeddings (`PAPER_SIZE`); storyworld ships a small one (`data/motion/predictor`).

The predicted embeddings are the per-frame control signal of the video decoder (`sdlite.video`).

    python -m sdlite.motion cache --clips 4000 --seed 1 --out runs/motion/train     # render + embed clips
    python -m sdlite.motion train --cache runs/motion/train --out runs/motion/predictor --export data/motion/predictor
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from safetensors.torch import load_file, save_file
from torch import nn

from .paths import check_writable, data_dir

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


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def _check_frames(frames) -> int:
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


def cache_grid(caches: list[dict]) -> int:
    """The one `ImageEmbedder` grid of several loaded caches (they must agree)."""
    grids = {c["grid"] for c in caches}
    if len(grids) > 1:
        raise ValueError(f"the caches were embedded with different grids {sorted(grids)}: use caches of one --grid")
    return grids.pop()


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
        from .models import load_storyworld_clip

        clip, _ = load_storyworld_clip(device, folder)
        return cls(clip, grid=grid)

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
    frames = _check_frames(frames)
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
        h = self.proj_in(interp) + self.frame_embed(fraction_embedding(t, self.config.hidden_size))  # (B, L, H)
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
        return load_shipped(cls, folder, "predictor", "predictor", "python -m sdlite.motion train")


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
# Data: storyworld clips rendered once, embedded (and optionally VAE-encoded) into a cache
# ----------------------------------------------------------------------------------------------------------
CACHE_CHUNK = 200  # clips per cache file: each file takes well under 2 minutes on 2 CPU cores


@torch.no_grad()
def encode_clips(dataset, indices, embedder: ImageEmbedder, vae=None) -> dict:
    """Render clips `indices` of a `ClipDataset` and encode every frame.

    Returns {"embeds": (N, L, D), "latents": (N, L, 4, h, w) (scaled VAE means, when `vae`), "captions": [str],
    "kinds": [str], "labels": {name: (N, L)}}.
    """
    embeds, latents, caps, kinds, labs = [], [], [], [], []
    for i in indices:
        item = dataset[i]
        x = item["frames"]  # (L, 3, H, W)
        embeds.append(embedder(x).float())
        if vae is not None:
            z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
            latents.append(z.float().cpu())
        caps.append(item["caption"])
        kinds.append(item["kind"])
        labs.append(item["labels"])
    out = {"embeds": torch.stack(embeds), "captions": caps, "kinds": kinds,
           "labels": {k: torch.stack([lab[k] for lab in labs]) for k in labs[0]}}
    if vae is not None:
        out["latents"] = torch.stack(latents)
    return out


def build_cache(folder: str | os.PathLike, n_clips: int, seed: int, embedder: ImageEmbedder, vae=None,
                frames: int = 16, max_chunks: int | None = None, progress: bool = True) -> Path:
    """Render and encode `n_clips` clips of `ClipDataset(n_clips, frames, seed)` into `folder/part_XXXXX.safetensors`
    (CACHE_CHUNK clips per file). Resumable: parts already written are kept; `max_chunks` stops early."""
    from . import storyworld as sw

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"n_clips": int(n_clips), "seed": _check_seed(seed), "frames": _check_frames(frames),
            "latents": vae is not None}
    if embedder.grid:
        info["grid"] = embedder.grid  # (pooled-only caches leave it out, as they did before grids existed)
    meta_path = folder / "cache.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != info:
        raise FileExistsError(f"{folder} holds a cache of other settings {json.loads(meta_path.read_text())}: "
                              "choose another folder")
    meta_path.write_text(json.dumps(info))
    dataset = sw.ClipDataset(n_clips, frames=frames, seed=seed)
    done = 0
    for c, first in enumerate(range(0, n_clips, CACHE_CHUNK)):
        path = folder / f"part_{c:05d}.safetensors"
        if path.exists():
            continue
        if max_chunks is not None and done >= max_chunks:
            break
        t0 = time.time()
        part = encode_clips(dataset, range(first, min(n_clips, first + CACHE_CHUNK)), embedder, vae)
        tensors = {"embeds": part["embeds"].half()}
        if "latents" in part:
            tensors["latents"] = part["latents"].half()
        tensors.update({f"labels.{k}": v for k, v in part["labels"].items()})
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"captions": json.dumps(part["captions"]),
                                               "kinds": json.dumps(part["kinds"])})
        tmp.rename(path)
        done += 1
        if progress:
            print(f"cache part {c}: clips {first}..{first + len(part['captions']) - 1} in {time.time() - t0:.0f}s",
                  flush=True)
    return folder


def load_cache(folder: str | os.PathLike) -> dict:
    """A cache folder -> {"embeds": float32 (N, L, D), "latents" (if cached), "captions", "kinds", "labels",
    "grid" (the ImageEmbedder grid of the embeddings)}."""
    from safetensors import safe_open

    folder = Path(folder)
    parts = sorted(folder.glob("part_*.safetensors"))
    if not parts:
        raise FileNotFoundError(f"{folder} holds no cache parts: build them with `python -m sdlite.motion cache "
                                f"--out {folder}`")
    tensors: dict[str, list] = {}
    caps, kinds = [], []
    for p in parts:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata()
        caps += json.loads(meta["captions"])
        kinds += json.loads(meta["kinds"])
        for k, v in load_file(str(p)).items():
            tensors.setdefault(k, []).append(v)
    out = {k: torch.cat(v) for k, v in tensors.items()}
    result = {"embeds": out.pop("embeds").float(), "captions": caps, "kinds": kinds}
    if "latents" in out:
        result["latents"] = out.pop("latents").float()
    result["labels"] = {k.split(".", 1)[1]: v for k, v in out.items() if k.startswith("labels.")}
    meta = folder / "cache.json"
    result["grid"] = int(json.loads(meta.read_text()).get("grid", 0)) if meta.is_file() else 0
    return result


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation
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


def train_predictor(embeds: torch.Tensor, predictor: SemanticMotionPredictor | None = None, steps: int = 2000,
                    batch_size: int = 64, lr: float = 3e-4, seed: int = 0, warmup: int = 100,
                    weight_decay: float = 0.01, out: str | os.PathLike | None = None, resume: bool = False,
                    log_every: int = 50, ckpt_every: int = 500, progress: bool = False,
                    val_embeds: torch.Tensor | None = None, stop_at: int | None = None, image_grid: int = 0,
                    ) -> tuple[SemanticMotionPredictor, dict]:
    """Fit the predictor to true frame embeddings (N, L, D) by MSE, with an accelerate loop (AdamW, linear warmup,
    cosine decay). Batch b of step s is a pure function of (seed, s), so `resume` (from `out/checkpoint`) continues
    exactly; `stop_at` ends the run after that step (with a checkpoint), to split a long run into short jobs.
    Returns (predictor in eval mode, history {"step", "loss", "val_ratio", "seconds"})."""
    from accelerate import Accelerator

    seed = _check_seed(seed)
    if embeds.ndim != 3 or embeds.shape[1] < 3:
        raise ValueError(f"embeds must be (N, L, D) with L >= 3, got {tuple(embeds.shape)}: build them with "
                         "sdlite.motion.build_cache / load_cache")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if predictor is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            predictor = SemanticMotionPredictor(embed_dim=embeds.shape[2], image_grid=image_grid, **{
                k: v for k, v in STORYWORLD_SIZE.items() if k != "embed_dim"})
    if predictor.config.embed_dim != embeds.shape[2]:
        raise ValueError(f"the predictor's embed_dim={predictor.config.embed_dim} differs from the data's "
                         f"{embeds.shape[2]}: build it with SemanticMotionPredictor(embed_dim={embeds.shape[2]})")
    acc = Accelerator()
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=weight_decay)
    start_step, history = 0, {"step": [], "loss": [], "val_ratio": [], "seconds": []}
    ckpt = Path(out) / "checkpoint" if out is not None else None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        if resume and (ckpt / "state.json").is_file():
            predictor.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            state = json.loads((ckpt / "state.json").read_text())
            start_step, history = state["step"], state["history"]
        elif not resume and (Path(out) / "log.csv").exists():
            raise FileExistsError(f"{out} already holds a run: pass resume=True (--resume) or choose another out")
    model, opt = acc.prepare(predictor, opt)
    frames = embeds.shape[1]
    t0 = time.time() - (history["seconds"][-1] if history["seconds"] else 0.0)
    model.train()
    end_step = steps if stop_at is None else min(steps, int(stop_at))
    for step in range(start_step, end_step):
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))
        idx = torch.randint(len(embeds), (batch_size,), generator=g)
        e = embeds[idx].to(acc.device)  # (b, L, D)
        warm = min(1.0, (step + 1) / max(1, warmup))
        for group in opt.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        pred = model(e[:, 0], e[:, -1], frames)  # (b, L, D)
        loss = F.mse_loss(pred, e)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == end_step:
            val = float("nan")
            if val_embeds is not None:
                val = predictor_errors(acc.unwrap_model(model), val_embeds)["ratio"]
                model.train()
            history["step"].append(step + 1)
            history["loss"].append(loss.item())
            history["val_ratio"].append(val)
            history["seconds"].append(time.time() - t0)
            if progress:
                print(f"step {step + 1}: loss {loss.item():.5f} val_ratio {val:.4f} ({time.time() - t0:.0f}s)",
                      flush=True)
            if out is not None:
                log = Path(out) / "log.csv"
                if not log.exists():
                    log.write_text("step,loss,val_ratio,seconds\n")
                with open(log, "a") as f:
                    f.write(f"{step + 1},{loss.item():.6g},{val:.6g},{history['seconds'][-1]:.1f}\n")
        if ckpt is not None and ((step + 1) % ckpt_every == 0 or step + 1 == end_step):
            _save_checkpoint(ckpt, step + 1, acc.unwrap_model(model), opt, history)
    return acc.unwrap_model(model).eval(), history


def _save_checkpoint(folder: Path, step: int, model: nn.Module, opt, history: dict) -> None:
    """model + optimizer + state, written to a temp folder then renamed (never half-written)."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(opt.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "history": history}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


# ----------------------------------------------------------------------------------------------------------
# Command line: python -m sdlite.motion {cache,train,errors}
# ----------------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sdlite.motion", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cache", help="render storyworld clips and embed (and VAE-encode) every frame")
    c.add_argument("--clips", type=int, default=4000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--frames", type=int, default=16)
    c.add_argument("--out", required=True, help="cache folder (resumable: existing parts are kept)")
    c.add_argument("--latents", action="store_true", help="also store the storyworld VAE latents (video decoder)")
    c.add_argument("--grid", type=int, default=0, help="also embed g x g cells of each frame (ImageEmbedder grid)")
    c.add_argument("--max-chunks", type=int, default=None, help=f"stop after this many parts of {CACHE_CHUNK} clips")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    t = sub.add_parser("train", help="train the predictor on a cache")
    t.add_argument("--cache", required=True, nargs="+", help="one or more cache folders (train data)")
    t.add_argument("--val-cache", default=None, help="held-out cache folder (the ratio is logged)")
    t.add_argument("--out", required=True, help="run folder (log.csv, checkpoint/)")
    t.add_argument("--export", default=None, help="save_pretrained the final predictor here (e.g. data/motion/predictor)")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; --resume later)")
    t.add_argument("--force", action="store_true", help="overwrite --export")
    t.add_argument("--threads", type=int, default=None)
    e = sub.add_parser("errors", help="the predictor's error vs linear interpolation on a cache")
    e.add_argument("--cache", required=True)
    e.add_argument("--predictor", default=None, help="default: data/motion/predictor")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "cache":
        vae = None
        if args.latents:
            from .video import load_storyworld_vae

            vae = load_storyworld_vae(args.storyworld)
        build_cache(args.out, args.clips, args.seed, ImageEmbedder.storyworld(args.storyworld, grid=args.grid), vae,
                    args.frames, args.max_chunks)
        return 0
    if args.command == "train":
        if args.export:
            check_writable(Path(args.export) / "config.json", args.force)
        caches = [load_cache(c) for c in args.cache] + ([load_cache(args.val_cache)] if args.val_cache else [])
        grid = cache_grid(caches)
        embeds = torch.cat([c["embeds"] for c in caches[: len(args.cache)]])
        val = caches[-1]["embeds"] if args.val_cache else None
        model, hist = train_predictor(embeds, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      seed=args.seed, out=args.out, resume=args.resume, progress=True,
                                      val_embeds=val, stop_at=args.stop_at, image_grid=grid)
        if args.export and hist["step"][-1] == args.steps:
            model.save_pretrained(args.export)
            info = {"command": "python -m sdlite.motion " + " ".join(argv if argv is not None else sys.argv[1:]),
                    "train_clips": len(embeds), "steps": args.steps, "final_loss": hist["loss"][-1],
                    "train_seconds": round(hist["seconds"][-1], 1)}
            if val is not None:
                info["val"] = predictor_errors(model, val)
            (Path(args.export) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
            print(json.dumps(info, indent=1))
        return 0
    if args.command == "errors":
        pred = SemanticMotionPredictor.storyworld(args.predictor)
        print(json.dumps(predictor_errors(pred, load_cache(args.cache)["embeds"]), indent=1))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
