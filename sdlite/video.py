"""Video decoding (StoryDiffusion, section 3.2): predicted frame embeddings -> a transition video.

The decoder is a latent video diffusion model built from diffusers parts: a `UNetMotionModel` (a 2D
UNet whose blocks are followed by temporal "motion modules", AnimateDiff's design) denoising the L frame latents
of a clip together. It is conditioned three ways:

- the keyframes: the VAE latents of the start and end frames are concatenated to every frame's noisy latent as
  extra input channels (4 noisy + 4 start + 4 end = 12 channels);
- the text: the prompt's CLIP token states (B, T, D), the same for every frame;
- the semantic motion: frame i's predicted CLIP image embedding (`sdlite.motion`) is projected to a few tokens
  and *joined to the text tokens* in cross-attention, so each frame reads its own control signal:
  encoder_hidden_states of frame i = [text tokens ; frame-i tokens], (B * L, T + n, D);
- where the picture is (`spatial_channels`, with grid embeddings `ImageEmbedder(grid=g)`): the g x g cell tokens of
  frame i are also mapped to a few channels each and laid over the latent grid, cell (i, j) over its region, as more
  input channels. Cross-attention alone could not use the embeddings: the decoder shipped before this option gave the
  same PSNR with the true embeddings as with none (results/motion_grid4.json); with the map it uses them
  (docs/lab/spatial_decoder.py).

With no embeddings (`mode="temporal_only"`) learned null tokens stand in for the frame tokens: that is the
"latent-space only" decoder the paper argues against (only the temporal modules can plan the motion). Training
drops the embeddings at random (`null_prob`), so one trained decoder serves both modes.

The diffusion runs on *the residual of the frame latents to the latent cross-fade of the keyframes*
(`interpolation_residual`; the UNet's output convolution starts at zero, so an untrained decoder predicts residual
0, i.e. the cross-fade, baseline (a)). Training only has to learn what the cross-fade gets wrong: where the
character really is at frame i, which the semantic embeddings say. The first decoder shipped ran the diffusion on
the latents themselves: it had to rebuild every frame from noise and came out below the cross-fade.

`generate_transition(start, end, frames=16)` makes one transition; `story_video(panels)` chains the transitions
between consecutive story panels into one video; `evaluate` computes the paper's Table 2 in storyworld against the
true in-between frames (`python -m sdlite.video evaluate`, writes results/motion.json).

    python -m sdlite.video train --cache runs/motion/train_grid4 --spatial-channels 4 --out runs/video_spatial \
        --export data/motion/decoder
    python -m sdlite.video evaluate --clips 100 --out results/motion.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNetMotionModel
from diffusers.configuration_utils import register_to_config
from safetensors.torch import load_file
from torch import nn

from .motion import (
    ImageEmbedder, SemanticMotionPredictor, _check_frames, _check_seed, cache_grid, grid_parts, linear_interpolation,
    load_cache, load_shipped, motion_dir,
)
from .paths import check_writable

MODES = ("full", "no_predictor", "temporal_only", "true_embeddings")
IDENTITY_LABELS = ("class_word", "hair", "shirt", "trousers", "hat")
EVAL_SEED = 777  # held-out clips: ClipDataset(n, seed=EVAL_SEED); training caches use other seeds


# ----------------------------------------------------------------------------------------------------------
# The decoder
# ----------------------------------------------------------------------------------------------------------
def video_unet_config(size: str = "base", latent_channels: int = 4, cross_attention_dim: int = 128,
                      sample_size: int = 16, max_frames: int = 32) -> dict:
    """`UNetMotionModel` keyword arguments. `base`: what storyworld ships (16x16 latents, 2 levels of 16 and 32
    channels, cross-attention at both: small enough to train on 2 CPU cores in minutes); `wide`: twice the
    channels (about 2.3x the training time); `tiny`: tests; `sd15`: the real-scale shape (SD1.5 + AnimateDiff: 4 levels, 320..1280 channels,
    cross-attention width 768), which `sd15-tiny` keeps at tiny widths for tests."""
    shapes = {
        "base": dict(block_out_channels=(16, 32), heads=(1, 2), groups=8, layers=1, levels_with_attention=2),
        "wide": dict(block_out_channels=(32, 64), heads=(1, 2), groups=8, layers=1, levels_with_attention=2),
        "tiny": dict(block_out_channels=(8, 16), heads=(1, 1), groups=4, layers=1, levels_with_attention=2),
        "sd15": dict(block_out_channels=(320, 640, 1280, 1280), heads=(5, 10, 20, 20), groups=32, layers=2,
                     levels_with_attention=3),
        "sd15-tiny": dict(block_out_channels=(16, 16, 32, 32), heads=(1, 1, 2, 2), groups=8, layers=1,
                          levels_with_attention=3),
    }
    if size not in shapes:
        raise ValueError(f"unknown decoder size {size!r}: use one of {tuple(shapes)}")
    s = shapes[size]
    n = len(s["block_out_channels"])
    k = s["levels_with_attention"]
    down = ("CrossAttnDownBlockMotion",) * k + ("DownBlockMotion",) * (n - k)
    up = ("UpBlockMotion",) * (n - k) + ("CrossAttnUpBlockMotion",) * k
    return dict(
        sample_size=sample_size, in_channels=3 * latent_channels, out_channels=latent_channels,
        down_block_types=down, up_block_types=up, block_out_channels=s["block_out_channels"],
        layers_per_block=s["layers"], norm_num_groups=s["groups"], cross_attention_dim=cross_attention_dim,
        num_attention_heads=s["heads"], motion_num_attention_heads=s["heads"], motion_max_seq_length=max_frames,
        use_linear_projection=True, use_motion_mid_block=True,
    )


class VideoDecoder(ModelMixin, ConfigMixin):
    """`UNetMotionModel` + the projection of per-frame image embeddings to cross-attention tokens.

    forward(noisy (B, L, C, h, w), timestep, start (B, C, h, w), end (B, C, h, w), encoder_hidden_states
    (B * L, T + n, D) from `condition`) -> (B, L, C, h, w): the clean latents (`prediction_type="sample"`, the
    storyworld default: a small model learns the conditional mean fastest) or the noise ("epsilon", as SD).
    """

    @register_to_config
    def __init__(self, unet_config: dict | None = None, image_embed_dim: int = 128, frame_tokens: int = 2,
                 prediction_type: str = "sample", interpolation_residual: bool = False, image_grid: int = 0,
                 spatial_channels: int = 0):
        super().__init__()
        if spatial_channels and not image_grid:
            raise ValueError("spatial_channels maps the grid cells of the image embeddings onto the latent grid: it "
                             "needs image_grid > 0 (embeddings from ImageEmbedder(grid=g); to train, caches built "
                             "with `python -m sdlite.motion cache ... --grid 4`)")
        if spatial_channels < 0:
            raise ValueError(f"spatial_channels={spatial_channels}: use 0 (off) or a positive number of channels")
        if prediction_type not in ("sample", "epsilon"):
            raise ValueError(f"prediction_type={prediction_type!r}: use 'sample' (the clean latents) or 'epsilon'")
        if interpolation_residual and prediction_type != "sample":
            raise ValueError("interpolation_residual predicts clean latents as cross-fade + correction: it needs "
                             "prediction_type='sample'")
        unet_config = dict(unet_config or video_unet_config())
        self.unet = UNetMotionModel(**unet_config)
        if interpolation_residual:  # start exactly at the latent cross-fade; training learns only the correction
            nn.init.zeros_(self.unet.conv_out.weight)
            nn.init.zeros_(self.unet.conv_out.bias)
        d = self.unet.config.cross_attention_dim
        if image_grid:  # one token per part of the embedding: the pooled one and each grid cell
            parts = grid_parts(image_grid, image_embed_dim, names=("image_grid", "image_embed_dim"))
            self.frame_proj = nn.Linear(image_embed_dim // parts, d)  # shared by the parts
            self.part_embed = nn.Parameter(torch.randn(parts, d) * 0.02)  # which part (pooled, cell 0, ...) it is
            frame_tokens = parts
        else:  # one embedding -> `frame_tokens` tokens
            self.frame_proj = nn.Linear(image_embed_dim, frame_tokens * d)
        self.frame_norm = nn.LayerNorm(d)
        self.null_tokens = nn.Parameter(torch.randn(frame_tokens, d) * 0.02)
        if spatial_channels:  # the cell tokens, also laid out where they are: a map next to the UNet's input
            self.cell_map = nn.Conv2d(d, spatial_channels, 1)  # each cell's token -> spatial_channels values
            self._widen_conv_in(spatial_channels)

    def _widen_conv_in(self, extra: int) -> None:
        """Give the UNet's input convolution `extra` more input channels whose weights start at zero, so the
        decoder starts out computing exactly what it computed without them."""
        old = self.unet.conv_in
        new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, padding=old.padding)
        with torch.no_grad():
            new.weight.zero_()
            new.weight[:, : old.in_channels] = old.weight
            new.bias.copy_(old.bias)
        self.unet.conv_in = new
        self.unet.register_to_config(in_channels=old.in_channels + extra)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.out_channels

    @property
    def max_frames(self) -> int:
        return self.unet.config.motion_max_seq_length

    def frame_tokens(self, frame_embeds: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor:
        """(B, L, E) image embeddings -> (B, L, n, D) tokens; None -> the learned null tokens."""
        n, d = self.null_tokens.shape
        if frame_embeds is None:
            return self.null_tokens.expand(batch, frames, n, d)
        e = self.config.image_embed_dim
        if frame_embeds.shape != (batch, frames, e):
            raise ValueError(f"frame_embeds must be (B={batch}, L={frames}, {e}), got {tuple(frame_embeds.shape)}: "
                             "one image embedding per frame, from sdlite.motion")
        x = frame_embeds.to(self.dtype)
        if self.config.image_grid:  # (B, L, n * D') -> n parts, each projected, tagged with its part embedding
            return self.frame_norm(self.frame_proj(x.view(batch, frames, n, e // n)) + self.part_embed)
        return self.frame_norm(self.frame_proj(x).view(batch, frames, n, d))

    def condition(self, text: torch.Tensor, frame_embeds: torch.Tensor | None, frames: int) -> torch.Tensor:
        """Join text tokens (B, T, D) and frame tokens: -> encoder_hidden_states (B * L, T + n, D), frame-major."""
        b, t, d = text.shape
        if d != self.unet.config.cross_attention_dim:
            raise ValueError(f"text states have width {d}, the decoder's cross-attention wants "
                             f"{self.unet.config.cross_attention_dim}: encode prompts with the matching text tower")
        tokens = self.frame_tokens(frame_embeds, b, frames)  # (B, L, n, D)
        text = text.to(self.dtype).unsqueeze(1).expand(b, frames, t, d)  # (B, L, T, D)
        return torch.cat([text, tokens], dim=2).reshape(b * frames, t + tokens.shape[2], d)

    def forward(self, noisy: torch.Tensor, timestep, start: torch.Tensor, end: torch.Tensor,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, frames, c, h, w = noisy.shape
        if frames > self.max_frames:
            raise ValueError(f"{frames} frames exceed the decoder's motion_max_seq_length={self.max_frames}: "
                             "ask for fewer frames")
        if start.shape != (b, c, h, w) or end.shape != (b, c, h, w):
            raise ValueError(f"start/end latents must be (B, C, h, w) = {(b, c, h, w)}, got {tuple(start.shape)} "
                             f"and {tuple(end.shape)}")
        keys = torch.cat([start, end], dim=1).unsqueeze(1).expand(b, frames, 2 * c, h, w)  # (B, L, 2C, h, w)
        parts = [noisy, keys]
        if self.config.spatial_channels:
            parts.append(self.cell_maps(encoder_hidden_states, b, frames, h, w))  # (B, L, S, h, w)
        x = torch.cat(parts, dim=2).permute(0, 2, 1, 3, 4)  # (B, 3C [+ S], L, h, w): diffusers' video layout
        out = self.unet(x.to(self.dtype), timestep, encoder_hidden_states).sample  # (B, C, L, h, w)
        return out.permute(0, 2, 1, 3, 4)  # (B, L, C, h, w)

    def cell_maps(self, encoder_hidden_states: torch.Tensor, batch: int, frames: int, h: int, w: int) -> torch.Tensor:
        """The spatial path: each frame's g x g cell tokens -- the last g * g tokens of its encoder_hidden_states
        (B * L, T + 1 + g*g, D), as `condition` joins them (text, pooled, cells), or the null tokens -- mapped by a
        1x1 convolution to `spatial_channels` values per cell, laid out on the g x g grid and upsampled (nearest)
        to the latent grid: (B, L, S, h, w). Cell (i, j) of the picture lands over the latents of that region."""
        g, s = self.config.image_grid, self.config.spatial_channels
        cells = encoder_hidden_states[:, -g * g :]  # (B*L, g*g, D), row-major cells
        maps = self.cell_map(cells.transpose(1, 2).reshape(batch * frames, -1, g, g).to(self.dtype))  # (B*L, S, g, g)
        maps = F.interpolate(maps, size=(h, w), mode="nearest")  # (B*L, S, h, w)
        return maps.view(batch, frames, s, h, w)

    def to_diffusion_space(self, latents: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """Frame latents (B, L, C, h, w) -> what the diffusion runs on: the latents themselves, or with
        `interpolation_residual` their difference from the keyframes' cross-fade (0 at the first and last frame)."""
        if not self.config.interpolation_residual:
            return latents
        return latents - linear_interpolation(start, end, latents.shape[1]).to(latents.dtype)

    def from_diffusion_space(self, x: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_diffusion_space`: (B, L, C, h, w) -> frame latents."""
        if not self.config.interpolation_residual:
            return x
        return x + linear_interpolation(start, end, x.shape[1]).to(x.dtype)

    @classmethod
    def storyworld(cls, folder: str | os.PathLike | None = None) -> VideoDecoder:
        """The shipped storyworld decoder, `data/motion/decoder`."""
        return load_shipped(cls, folder, "decoder", "video decoder", "python -m sdlite.video train")


def build_decoder(size: str = "base", image_embed_dim: int = 128, cross_attention_dim: int = 128,
                  sample_size: int = 16, frame_tokens: int = 2, seed: int = 0,
                  prediction_type: str = "sample", interpolation_residual: bool | None = None,
                  image_grid: int = 0, spatial_channels: int = 0) -> VideoDecoder:
    """A randomly initialised decoder (seeded, without touching the global RNG). `interpolation_residual`
    (default: on for prediction_type="sample") makes it predict the correction to the latent cross-fade."""
    seed = _check_seed(seed)
    cfg = video_unet_config(size, cross_attention_dim=cross_attention_dim, sample_size=sample_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VideoDecoder(cfg, image_embed_dim=image_embed_dim, frame_tokens=frame_tokens,
                            prediction_type=prediction_type,
                            interpolation_residual=prediction_type == "sample" if interpolation_residual is None
                            else interpolation_residual, image_grid=image_grid,
                            spatial_channels=spatial_channels)


# ----------------------------------------------------------------------------------------------------------
# All the parts of a transition, and loading them
# ----------------------------------------------------------------------------------------------------------
@dataclass
class VideoModels:
    """Everything `generate_transition` needs. `text_model` is a CLIP text transformer (`CLIPModel.text_model` or
    `CLIPTextModel.text_model`); `predictor` may be None (then linear interpolation of the embeddings)."""

    vae: object
    embedder: ImageEmbedder
    text_model: nn.Module
    tokenizer: object
    predictor: SemanticMotionPredictor | None
    decoder: VideoDecoder | None
    scheduler: object

    @property
    def device(self) -> torch.device:
        return self.vae.device


def load_storyworld_vae(folder: str | os.PathLike | None = None):
    """The storyworld VAE alone (`data/storyworld/vae`), without the rest of the pipeline."""
    from diffusers import AutoencoderKL

    from .models import storyworld_dir

    folder = Path(folder) if folder is not None else storyworld_dir()
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'vae'} holds no VAE: train it with `python -m sdlite.train storyworld "
                                "--stage vae` or restore data/storyworld from git")
    return AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32, local_files_only=True).eval()


def load_video_models(device: str | torch.device = "cpu", storyworld_folder: str | os.PathLike | None = None,
                      motion_folder: str | os.PathLike | None = None, decoder: bool = True,
                      predictor: bool = True) -> VideoModels:
    """The shipped storyworld parts: VAE + CLIP (data/storyworld), predictor + decoder (data/motion)."""
    from .models import build_scheduler, load_storyworld_clip, storyworld_dir

    sw_folder = Path(storyworld_folder) if storyworld_folder is not None else storyworld_dir()
    vae = load_storyworld_vae(sw_folder)
    clip, tok = load_storyworld_clip(device, sw_folder)
    mf = Path(motion_folder) if motion_folder is not None else motion_dir()
    pred = SemanticMotionPredictor.storyworld(mf / "predictor").to(device) if predictor else None
    dec = VideoDecoder.storyworld(mf / "decoder").to(device) if decoder else None
    grids = {m.config.image_grid for m in (pred, dec) if m is not None}
    if len(grids) > 1:
        raise ValueError(f"{mf}: the predictor and the decoder read different image embeddings (grids "
                         f"{sorted(grids)}): train both on caches of the same `--grid`")
    return VideoModels(
        vae=vae.to(device), embedder=ImageEmbedder(clip, grid=grids.pop() if grids else 0).to(device),
        text_model=clip.text_model, tokenizer=tok, predictor=pred, decoder=dec, scheduler=build_scheduler(),
    )


@torch.no_grad()
def encode_prompts(models: VideoModels, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the text tower's last hidden states (B, T, D) (padded to the tokenizer's max length)."""
    tok = models.tokenizer
    ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(models.device)
    return models.text_model(input_ids=ids).last_hidden_state.float()  # (B, T, D)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> scaled VAE latent means (B, 4, h, w)."""
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents (..., 4, h, w) -> images (..., 3, H, W) in [-1, 1]."""
    lead = latents.shape[:-3]
    z = latents.reshape(-1, *latents.shape[-3:]) / vae.config.scaling_factor
    out = torch.cat([vae.decode(z[i : i + batch_size].to(vae.device, vae.dtype)).sample.float()
                     for i in range(0, len(z), batch_size)])
    return out.clamp(-1, 1).reshape(*lead, *out.shape[-3:])


# ----------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def sample_latents(decoder: VideoDecoder, scheduler, start: torch.Tensor, end: torch.Tensor, text: torch.Tensor,
                   frame_embeds: torch.Tensor | None, frames: int = 16, steps: int = 20,
                   generator: torch.Generator | None = None, strength: float = 1.0,
                   pin: bool = True) -> torch.Tensor:
    """DDIM sampling of (B, L, C, h, w) frame latents between keyframe latents start/end (B, C, h, w).

    `strength` < 1 starts from the latent linear interpolation noised to that level (SDEdit), instead of pure
    noise: the decoder then only has to fix what the cross-fade gets wrong. With `pin`, the first and last
    frames are the keyframes at every step (replaced by the keyframe latents noised to the current level, the
    "replacement" trick of diffusion inpainting), so the in-between frames are denoised next to the true ends
    and the returned first/last latents are exactly `start` / `end`.
    """
    frames = _check_frames(frames)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: 1 starts from pure noise")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    sched = type(scheduler).from_config(scheduler.config, prediction_type=decoder.config.prediction_type)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    b = start.shape[0]
    ehs = decoder.condition(text, frame_embeds, frames)  # (B*L, T+n, D)
    noise = torch.randn((b, frames, *start.shape[1:]), generator=generator).to(start.device)  # (B, L, C, h, w)
    # the cross-fade (B, L, C, h, w) in diffusion space: 0 with interpolation_residual; its ends are the keyframes
    cross_fade = decoder.to_diffusion_space(linear_interpolation(start, end, frames), start, end)
    ends = cross_fade[:, [0, -1]]
    if strength < 1.0:
        keep = max(1, int(round(steps * strength)))
        timesteps = timesteps[len(timesteps) - keep :]
        x = sched.add_noise(cross_fade, noise, timesteps[:1])
    else:
        x = noise * sched.init_noise_sigma
    for t in timesteps:
        if pin:  # the keyframes, noised to level t, in place of frames 0 and L-1
            x[:, [0, -1]] = sched.add_noise(ends, noise[:, [0, -1]], t.view(1)).to(x.dtype)
        eps = decoder(sched.scale_model_input(x, t), t, start, end, ehs).float()
        step = sched.step(eps, t, x)
        # the last step returns the model's clean estimate (DDIM would leave sqrt(1 - alpha_bar_0) of noise)
        x = step.pred_original_sample if t == timesteps[-1] else step.prev_sample
    if pin:
        x[:, [0, -1]] = ends.to(x.dtype)
    return decoder.from_diffusion_space(x, start, end)


def _as_image_tensor(image) -> torch.Tensor:
    """A keyframe as float (3, H, W) in [-1, 1]: from a tensor, a uint8 (H, W, 3) array, a PIL image or a path."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"keyframe {image} does not exist: pass the path of a PNG/JPEG picture")
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a keyframe array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a keyframe tensor must be float (3, H, W) in [-1, 1], got {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"a keyframe must be a path, PIL image, uint8 array or tensor, got {type(image).__name__}")


def _fit(image: torch.Tensor, size: int) -> torch.Tensor:
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def image_size(models: VideoModels) -> int:
    """The frame side the models work at (the VAE's sample_size)."""
    return int(models.vae.config.sample_size)


@torch.no_grad()
def transition_latents(models: VideoModels, start: torch.Tensor, end: torch.Tensor, frames: int = 16,
                       prompts: list[str] | None = None, mode: str = "full", steps: int = 20, seed: int = 0,
                       strength: float = 1.0, frame_embeds: torch.Tensor | None = None,
                       pin: bool = True) -> torch.Tensor:
    """Batched transitions: keyframes (B, 3, H, W) -> frame latents (B, L, C, h, w). `mode`: "full" (predicted
    embeddings), "no_predictor" (linearly interpolated embeddings), "temporal_only" (no embeddings) or
    "true_embeddings" (the caller passes `frame_embeds`, e.g. the true ones: an upper bound). `pin`: keep the
    first/last latents on the keyframes while sampling (see `sample_latents`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if models.decoder is None:
        raise ValueError("models.decoder is None: load it with load_video_models(decoder=True)")
    frames = _check_frames(frames)
    seed = _check_seed(seed)
    b = start.shape[0]
    prompts = [""] * b if prompts is None else list(prompts)
    if len(prompts) != b:
        raise ValueError(f"got {len(prompts)} prompts for {b} transitions: pass one prompt per transition")
    z0, z1 = encode_latents(models.vae, start), encode_latents(models.vae, end)  # (B, C, h, w)
    if mode == "true_embeddings":
        if frame_embeds is None:
            raise ValueError('mode="true_embeddings" needs frame_embeds (B, L, E)')
        embeds = frame_embeds.to(models.device)
    elif mode == "temporal_only":
        embeds = None
    else:
        e = models.embedder(torch.cat([start, end]).to(models.device))  # (2B, E)
        e0, e1 = e.chunk(2)
        if mode == "full" and models.predictor is not None:
            embeds = models.predictor(e0.to(models.predictor.dtype), e1.to(models.predictor.dtype), frames)
        elif mode == "full":
            raise ValueError('mode="full" needs models.predictor: load it, or use mode="no_predictor"')
        else:
            embeds = linear_interpolation(e0, e1, frames)
    text = encode_prompts(models, prompts)
    g = torch.Generator().manual_seed(seed)
    return sample_latents(models.decoder, models.scheduler, z0, z1, text, embeds, frames, steps, g, strength,
                          pin)


@torch.no_grad()
def generate_transition(start, end, frames: int = 16, models: VideoModels | None = None, prompt: str = "",
                        mode: str = "full", steps: int = 20, seed: int = 0, strength: float = 1.0,
                        pin_keyframes: bool = True) -> torch.Tensor:
    """A transition video from `start` to `end` (paths, PIL images, uint8 arrays or (3, H, W) tensors in [-1, 1]):
    float (L, 3, H, W) in [-1, 1]. With `pin_keyframes` the first and last frames are the keyframes themselves."""
    models = models if models is not None else load_video_models()
    size = image_size(models)
    a = _fit(_as_image_tensor(start), size).to(models.device)
    b = _fit(_as_image_tensor(end), size).to(models.device)
    z = transition_latents(models, a[None], b[None], frames, [prompt], mode, steps, seed, strength)
    video = decode_latents(models.vae, z)[0]  # (L, 3, H, W)
    if pin_keyframes:
        video[0], video[-1] = a, b
    return video


def latent_interpolation_video(models: VideoModels, start: torch.Tensor, end: torch.Tensor,
                               frames: int = 16) -> torch.Tensor:
    """Baseline (a): no model, decode the linear interpolation of the keyframe latents. (B, 3, H, W) x2 ->
    (B, L, 3, H, W)."""
    z = linear_interpolation(encode_latents(models.vae, start), encode_latents(models.vae, end), frames)
    return decode_latents(models.vae, z)


@torch.no_grad()
def story_video(panels, models: VideoModels | None = None, frames: int = 16, hold: int = 4,
                prompts: list[str] | None = None, mode: str = "full", steps: int = 20, seed: int = 0,
                strength: float = 1.0) -> torch.Tensor:
    """A whole story as one video: each panel (keyframe) held `hold` frames, consecutive panels joined by a
    `frames`-frame transition (their shared keyframes are not repeated). `panels`: a list of keyframes (any form
    `generate_transition` takes) or a (N, 3, H, W) tensor; `prompts`: one per transition (N - 1) or None.
    Transition k uses seed `seed + k`. Returns (T, 3, H, W) in [-1, 1], T = N * hold + (N - 1) * (frames - 2)."""
    panels = list(panels)
    if len(panels) < 2:
        raise ValueError(f"a story video needs at least 2 panels, got {len(panels)}")
    if hold < 0:
        raise ValueError(f"hold={hold} must be >= 0 (frames each keyframe is shown still)")
    if prompts is not None and len(prompts) != len(panels) - 1:
        raise ValueError(f"got {len(prompts)} prompts for {len(panels) - 1} transitions: one per pair of panels")
    models = models if models is not None else load_video_models()
    size = image_size(models)
    keys = [_fit(_as_image_tensor(p), size).to(models.device) for p in panels]
    out = [keys[0][None].expand(hold, -1, -1, -1)]
    for k in range(len(keys) - 1):
        clip = generate_transition(keys[k], keys[k + 1], frames, models, prompts[k] if prompts else "", mode,
                                   steps, seed + k, strength, pin_keyframes=True)
        out += [clip[1:-1], keys[k + 1][None].expand(hold, -1, -1, -1)]
    return torch.cat(out)


def write_video(path: str | os.PathLike, video: torch.Tensor, fps: int = 8, scale: int = 4,
                force: bool = False) -> Path:
    """Write (L, 3, H, W) in [-1, 1] as .mp4 or .gif (ffmpeg from imageio-ffmpeg), frames upscaled `scale` times
    (nearest); `.png` writes a strip of the frames instead. Never overwrites unless `force`."""
    import mediapy

    from .storyworld import to_uint8

    path = Path(path)
    if path.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise ValueError(f"{path}: write .mp4, .gif or .png (a strip of frames)")
    check_writable(path, force)
    if scale < 1:
        raise ValueError(f"scale={scale} must be >= 1")
    frames = to_uint8(video)  # (L, H, W, 3)
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    if path.suffix.lower() == ".png":
        from PIL import Image

        Image.fromarray(np.concatenate(list(frames), axis=1)).save(path)
        return path
    import imageio_ffmpeg

    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    codec = "gif" if path.suffix.lower() == ".gif" else "h264"
    mediapy.write_video(str(path), frames, fps=fps, codec=codec)
    return path


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------
@dataclass
class DecoderTrainConfig:
    steps: int = 4000
    batch_size: int = 4  # clips per step (x L frames)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    null_prob: float = 0.2  # drop the frame embeddings (the temporal-only mode)
    text_drop_prob: float = 0.3  # drop the prompt ("" encoding)
    embed_noise: float = 0.2  # Gaussian noise on the true embeddings, in units of their std (~ the predictor's error)
    min_snr_gamma: float = 5.0
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 200


def train_decoder(cache: dict, text: torch.Tensor, empty_text: torch.Tensor, decoder: VideoDecoder, scheduler,
                  cfg: DecoderTrainConfig, out: str | os.PathLike | None = None, resume: bool = False,
                  progress: bool = False, stop_at: int | None = None,
                  max_minutes: float | None = None) -> tuple[VideoDecoder, dict]:
    """Denoising training (the decoder's `prediction_type`) on cached clips: `cache` from `sdlite.motion.load_cache` (needs "latents"
    (N, L, C, h, w) and "embeds" (N, L, E)), `text` the encoded captions (N, T, D), `empty_text` the "" encoding
    (1, T, D). Conditions on the true frame embeddings (noised), replaced by the null tokens with `null_prob`.
    Everything random in step s comes from a generator seeded with (seed, s): resuming continues exactly; `stop_at`
    ends the run after that step (with a checkpoint), to split a long run into short jobs; `max_minutes` ends it
    (with a checkpoint) once this session has trained that long, wherever the schedule is."""
    from accelerate import Accelerator

    if "latents" not in cache:
        raise ValueError("the cache holds no latents: build it with `python -m sdlite.motion cache --latents`")
    lat, emb = cache["latents"], cache["embeds"]
    n, frames = lat.shape[:2]
    if text.shape[0] != n:
        raise ValueError(f"{text.shape[0]} text encodings for {n} clips: encode every cached caption")
    acc = Accelerator()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = {"step": [], "loss": [], "seconds": []}
    start_step = 0
    ckpt = Path(out) / "checkpoint" if out is not None else None
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        if resume and ckpt is not None and (ckpt / "state.json").is_file():
            decoder.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
            state = json.loads((ckpt / "state.json").read_text())
            start_step, hist = state["step"], state["history"]
        elif not resume and (Path(out) / "log.csv").exists():
            raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    model, opt = acc.prepare(decoder, opt)
    alphas = scheduler.alphas_cumprod  # (1000,)
    emb_std = emb.std().item()
    t0 = time.time() - (hist["seconds"][-1] if hist["seconds"] else 0.0)
    model.train()
    end_step = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    session_start = time.time()
    for step in range(start_step, end_step):
        if max_minutes is not None and time.time() - session_start > 60 * max_minutes:
            end_step = step  # out of time: checkpoint what we have
            if ckpt is not None:
                from .motion import _save_checkpoint

                _save_checkpoint(ckpt, step, acc.unwrap_model(model), opt, hist)
            break
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step]).generate_state(1)[0]))
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        z = lat[idx].to(acc.device)  # (B, L, C, h, w)
        e = emb[idx].to(acc.device)  # (B, L, E)
        e = e + cfg.embed_noise * emb_std * torch.randn(e.shape, generator=g).to(acc.device)
        txt = text[idx].to(acc.device)  # (B, T, D)
        drop_text = torch.rand(cfg.batch_size, generator=g) < cfg.text_drop_prob
        txt = torch.where(drop_text.view(-1, 1, 1).to(acc.device), empty_text.to(acc.device), txt)
        noise = torch.randn(z.shape, generator=g).to(acc.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
        null = torch.rand(cfg.batch_size, generator=g) < cfg.null_prob
        unwrapped = acc.unwrap_model(model)
        z0, z1 = z[:, 0], z[:, -1]  # the keyframe latents (B, C, h, w): the decoder's condition
        z = unwrapped.to_diffusion_space(z, z0, z1)  # the latents, or their residual to the cross-fade
        noisy = scheduler.add_noise(z, noise, t.view(-1).to(acc.device))  # (B, L, C, h, w)
        tokens = unwrapped.frame_tokens(e, cfg.batch_size, frames)  # (B, L, n, D)
        tokens = torch.where(null.view(-1, 1, 1, 1).to(acc.device), unwrapped.null_tokens.expand_as(tokens), tokens)
        d = txt.shape[-1]
        ehs = torch.cat([txt.unsqueeze(1).expand(-1, frames, -1, -1), tokens], 2).reshape(
            cfg.batch_size * frames, -1, d)  # (B*L, T+n, D)
        for group in opt.param_groups:
            warm = min(1.0, (step + 1) / max(1, cfg.warmup))
            group["lr"] = cfg.lr * warm * (0.1 + 0.45 * (1 + math.cos(math.pi * step / cfg.steps)))  # cosine to 10%
        pred = model(noisy, t.to(acc.device), z0, z1, ehs)  # (B, L, C, h, w)
        snr = alphas[t] / (1 - alphas[t])
        if unwrapped.config.prediction_type == "epsilon":
            target, weight = noise, torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR weighting
        else:
            target, weight = z, torch.ones_like(snr)  # clean latents: plain MSE at every noise level
        per_clip = (pred.float() - target).pow(2).mean(dim=(1, 2, 3, 4))  # (B,)
        loss = (weight.to(per_clip.device) * per_clip).mean()
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == end_step:
            hist["step"].append(step + 1)
            hist["loss"].append(loss.item())
            hist["seconds"].append(time.time() - t0)
            if out is not None:
                log = Path(out) / "log.csv"
                if not log.exists():
                    log.write_text("step,loss,seconds\n")
                with open(log, "a") as f:
                    f.write(f"{step + 1},{loss.item():.6g},{hist['seconds'][-1]:.1f}\n")
            if progress:
                print(f"step {step + 1}: loss {loss.item():.5f} ({hist['seconds'][-1]:.0f}s)", flush=True)
        if ckpt is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end_step):
            from .motion import _save_checkpoint

            _save_checkpoint(ckpt, step + 1, acc.unwrap_model(model), opt, hist)
    hist["last_step"] = end_step
    return acc.unwrap_model(model).eval(), hist


# ----------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of images in [-1, 1] over their last 3 dims: (..., 3, H, W) x2 -> (...)."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, per channel, mean) of images in [-1, 1]:
    (..., 3, H, W) x2 -> (...)."""
    lead = x.shape[:-3]
    a = ((x.float() + 1) / 2).reshape(-1, *x.shape[-3:])
    b = ((y.float() + 1) / 2).reshape(-1, *y.shape[-3:])
    c = a.shape[1]
    r = torch.arange(size, dtype=torch.float32) - size // 2
    g1 = torch.exp(-r**2 / (2 * sigma**2))
    g1 = g1 / g1.sum()
    win = (g1[:, None] * g1[None]).expand(c, 1, size, size).to(a.device)

    def blur(t):
        return F.conv2d(t, win, groups=c)  # valid convolution

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)


def paired_difference_ci(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """Mean of the per-clip differences a - b (N,) and its bootstrap confidence interval (clips resampled with
    replacement, seeded): is a method's lead over another bigger than the luck of which clips were drawn?"""
    d = (a.double() - b.double()).cpu().numpy()
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need per-clip values of two methods on the same >= 2 clips, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": len(d)}


def identity_agreement(labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per clip, the fraction of frames whose recognised identity (all of class word, hair, shirt, trousers, hat)
    equals the clip's majority identity. labels: {name: (B, L)} -> (B,)."""
    agree = None
    for name in IDENTITY_LABELS:
        lab = labels[name]  # (B, L)
        mode = torch.mode(lab, dim=1).values  # (B,)
        same = lab == mode[:, None]
        agree = same if agree is None else agree & same
    return agree.float().mean(dim=1)


def clip_similarities(embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's CLIPSIM-first (frame 1 vs every frame) and CLIPSIM-frames (consecutive frames), from frame
    embeddings (B, L, E) -> {"first": (B,), "frames": (B,)} (cosine similarities)."""
    e = F.normalize(embeds.float(), dim=-1)
    first = (e[:, :1] * e).sum(-1)[:, 1:].mean(1)
    frames = (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)
    return {"first": first, "frames": frames}


def motion_amount(video: torch.Tensor) -> torch.Tensor:
    """Mean absolute change between consecutive frames (pixel values in [0, 1]): (B, L, 3, H, W) -> (B,)."""
    return ((video[:, 1:].float() - video[:, :-1].float()).abs() / 2).mean(dim=(1, 2, 3, 4))


@torch.no_grad()
def video_metrics(video: torch.Tensor, truth: torch.Tensor, embedder: ImageEmbedder, true_embeds: torch.Tensor,
                  recognizer=None) -> dict[str, torch.Tensor]:
    """Every Table-2 metric of generated clips (B, L, 3, H, W) against the true clips, per clip (B,).
    PSNR/SSIM/embedding distance over the in-between frames; fidelity = PSNR of the first/last frame to the
    keyframes."""
    b, frames = video.shape[:2]
    e = embedder.pooled(embedder(video.reshape(-1, *video.shape[2:]))).reshape(b, frames, -1)  # (B, L, D)
    true_embeds = embedder.pooled(true_embeds)  # CLIP-I and the embedding errors read the pooled embedding
    sims = clip_similarities(e)
    out = {
        "psnr": psnr(video[:, 1:-1], truth[:, 1:-1]).mean(1),
        "ssim": ssim(video[:, 1:-1], truth[:, 1:-1]).mean(1),
        "embed_mse": (e - true_embeds)[:, 1:-1].pow(2).mean(dim=(1, 2)),
        "embed_cos": F.cosine_similarity(e[:, 1:-1], true_embeds[:, 1:-1], dim=-1).mean(1),
        "first_fidelity_psnr": psnr(video[:, 0], truth[:, 0]),
        "last_fidelity_psnr": psnr(video[:, -1], truth[:, -1]),
        "motion": motion_amount(video),
        "clipsim_first": sims["first"],
        "clipsim_frames": sims["frames"],
    }
    if recognizer is not None:
        pred = recognizer.predict(video.reshape(-1, *video.shape[2:]))
        out["identity_agreement"] = identity_agreement({k: pred[k].view(b, frames) for k in IDENTITY_LABELS})
    return out


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the paper's Table 2 in storyworld
# ----------------------------------------------------------------------------------------------------------
METHODS = ("latent_interpolation", "no_predictor", "temporal_only", "full", "true_embeddings")


@torch.no_grad()
def evaluate(models: VideoModels, n_clips: int = 100, seed: int = EVAL_SEED, frames: int = 16, steps: int = 20,
             strength: float = 1.0, batch_size: int = 10, recognizer=None, methods=METHODS,
             progress: bool = False, pin: bool = True) -> dict:
    """Compare the methods on `n_clips` held-out clips `ClipDataset(n_clips, frames, seed)` against their true
    frames. Returns {"per_method": {method: {metric: mean}}, "per_kind_psnr": {method: {kind: mean}},
    "truth": {metric: mean of the true clips}, "predictor": errors of the predicted embeddings}."""
    from . import storyworld as sw

    data = sw.ClipDataset(n_clips, frames=frames, seed=seed)
    per: dict[str, dict[str, list]] = {m: {} for m in methods}
    truth_stats: dict[str, list] = {}
    kinds: list[str] = []
    emb_err = {"predictor": [], "linear": [], "predictor_pooled": [], "linear_pooled": []}
    t0 = time.time()
    for first in range(0, n_clips, batch_size):
        items = [data[i] for i in range(first, min(n_clips, first + batch_size))]
        x = torch.stack([it["frames"] for it in items]).to(models.device)  # (B, L, 3, H, W)
        b = x.shape[0]
        kinds += [it["kind"] for it in items]
        prompts = [it["caption"] for it in items]
        true_e = models.embedder(x.reshape(-1, *x.shape[2:])).reshape(b, frames, -1)  # (B, L, E)
        if models.predictor is not None:
            pred_e = models.predictor(true_e[:, 0], true_e[:, -1], frames)
            lin_e = linear_interpolation(true_e[:, 0], true_e[:, -1], frames)
            for name, e in (("predictor", pred_e), ("linear", lin_e)):
                err = (e - true_e)[:, 1:-1]  # (B, L - 2, E): the in-between frames
                emb_err[name].append(err.pow(2).mean(dim=(1, 2)))
                emb_err[name + "_pooled"].append(models.embedder.pooled(err).pow(2).mean(dim=(1, 2)))
        sims = clip_similarities(models.embedder.pooled(true_e))
        for k, v in {"motion": motion_amount(x), "clipsim_first": sims["first"], "clipsim_frames": sims["frames"]
                     }.items():
            truth_stats.setdefault(k, []).append(v.cpu())
        if recognizer is not None:
            pred = recognizer.predict(x.reshape(-1, *x.shape[2:]))
            truth_stats.setdefault("identity_agreement", []).append(
                identity_agreement({k: pred[k].view(b, frames) for k in IDENTITY_LABELS}).cpu())
        for m in methods:
            if m == "latent_interpolation":
                video = latent_interpolation_video(models, x[:, 0], x[:, -1], frames)
            else:
                z = transition_latents(models, x[:, 0], x[:, -1], frames, prompts, m, steps, seed + first,
                                       strength, frame_embeds=true_e if m == "true_embeddings" else None, pin=pin)
                video = decode_latents(models.vae, z)
            for k, v in video_metrics(video, x, models.embedder, true_e, recognizer).items():
                per[m].setdefault(k, []).append(v.cpu())
        if progress:
            print(f"evaluated {first + b}/{n_clips} clips ({time.time() - t0:.0f}s)", flush=True)
    result = {"per_method": {m: {k: float(torch.cat(v).mean()) for k, v in d.items()} for m, d in per.items()},
              "truth": {k: float(torch.cat(v).mean()) for k, v in truth_stats.items()}}
    kinds_arr = np.array(kinds)
    result["per_kind_psnr"] = {m: {kind: float(torch.cat(per[m]["psnr"])[torch.from_numpy(kinds_arr == kind)].mean())
                                   for kind in sorted(set(kinds))} for m in methods}
    result["kind_counts"] = {kind: int((kinds_arr == kind).sum()) for kind in sorted(set(kinds))}
    if "full" in methods:  # (d)'s lead over every other method, per clip, with a bootstrap interval
        full = torch.cat(per["full"]["psnr"])
        result["psnr_lead_of_full"] = {m: paired_difference_ci(full, torch.cat(per[m]["psnr"]), seed=seed)
                                       for m in methods if m != "full"}
    if emb_err["predictor"]:
        p, lin = torch.cat(emb_err["predictor"]).mean().item(), torch.cat(emb_err["linear"]).mean().item()
        pp, lp = torch.cat(emb_err["predictor_pooled"]).mean().item(), torch.cat(emb_err["linear_pooled"]).mean().item()
        result["predictor"] = {"mse_predictor": p, "mse_linear": lin, "ratio": p / lin,
                               "ratio_pooled_part": pp / lp, "image_grid": models.embedder.grid}
    result["seconds"] = round(time.time() - t0, 1)
    return result


# ----------------------------------------------------------------------------------------------------------
# Command lines: `sdlite video START END` (registered by sdlite.cli) and python -m sdlite.video {train,evaluate}
# ----------------------------------------------------------------------------------------------------------
def add_video_parser(subparsers, name: str = "video") -> argparse.ArgumentParser:
    """Register the `video` command on an argparse subparsers object (sdlite.cli does this)."""
    p = subparsers.add_parser(name, help="a transition video between two keyframes",
                              description="Generate a transition video between two keyframes with the semantic "
                                          "motion predictor and the video decoder (storyworld models by default).")
    p.add_argument("start", help="start keyframe (PNG/JPEG)")
    p.add_argument("end", help="end keyframe (PNG/JPEG)")
    p.add_argument("--frames", type=int, default=16, help="frames of the transition, keyframes included")
    p.add_argument("--out", required=True, help="output .mp4, .gif or .png (a strip of frames)")
    p.add_argument("--prompt", default="", help="what the clip shows (optional)")
    p.add_argument("--mode", default="full", choices=MODES[:3])
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=1.0, help="1: start from noise; <1: from the noised "
                                                                "latent interpolation")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="upscale frames this many times (nearest) when writing")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.set_defaults(func=run_video)
    return p


def run_video(args) -> int:
    check_writable(args.out, args.force)  # refuse before any work
    for key in (args.start, args.end):
        if not Path(key).is_file():
            raise FileNotFoundError(f"keyframe {key} does not exist: pass the path of a PNG/JPEG picture")
    _check_frames(args.frames)
    video = generate_transition(args.start, args.end, args.frames, prompt=args.prompt, mode=args.mode,
                                steps=args.steps, seed=args.seed, strength=args.strength)
    path = write_video(args.out, video, fps=args.fps, scale=args.scale, force=args.force)
    print(f"wrote {path} ({video.shape[0]} frames)")
    return 0


def _module_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sdlite.video", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the video decoder on cached clips (with latents)")
    t.add_argument("--cache", required=True, nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--export", default=None, help="save_pretrained the decoder here (e.g. data/motion/decoder)")
    t.add_argument("--size", default="base")
    t.add_argument("--steps", type=int, default=DecoderTrainConfig.steps)
    t.add_argument("--batch-size", type=int, default=DecoderTrainConfig.batch_size)
    t.add_argument("--lr", type=float, default=DecoderTrainConfig.lr)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--spatial-channels", type=int, default=0,
                   help="also feed the grid cells of the embeddings spatially, as this many input channels "
                        "(needs a cache built with --grid; the shipped decoder uses 4)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; --resume later)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed, exported) after this long")
    t.add_argument("--force", action="store_true")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    e = sub.add_parser("evaluate", help="Table 2 in storyworld: write results/motion.json")
    e.add_argument("--clips", type=int, default=100)
    e.add_argument("--seed", type=int, default=EVAL_SEED)
    e.add_argument("--frames", type=int, default=16)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--strength", type=float, default=1.0)
    e.add_argument("--no-pin", action="store_true", help="do not hold the first/last latents on the keyframes")
    e.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    e.add_argument("--decoder", default=None, help="decoder folder (default data/motion/decoder)")
    e.add_argument("--out", default="results/motion.json")
    e.add_argument("--force", action="store_true")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    e.add_argument("--motion", default=None, help="folder with predictor/ and decoder/ (default data/motion)")
    add_video_parser(sub, "generate")  # the same as `sdlite video`
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _module_parser().parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    command = "python -m sdlite.video " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.command == "generate":
        return run_video(args)
    if args.command == "train":
        if args.export:
            check_writable(Path(args.export) / "config.json", args.force)
        models = load_video_models(storyworld_folder=args.storyworld, decoder=False, predictor=False)
        caches = [load_cache(c) for c in args.cache]
        cache = {"latents": torch.cat([c["latents"] for c in caches]), "embeds": torch.cat([c["embeds"] for c in caches])}
        # built before the prompts are encoded, so a bad setting fails before any work
        decoder = build_decoder(args.size, image_embed_dim=cache["embeds"].shape[-1],
                                cross_attention_dim=models.text_model.config.hidden_size,
                                sample_size=cache["latents"].shape[-1], seed=args.seed, image_grid=cache_grid(caches),
                                spatial_channels=args.spatial_channels)
        captions = [cap for c in caches for cap in c["captions"]]
        text = torch.cat([encode_prompts(models, captions[i : i + 256]) for i in range(0, len(captions), 256)])
        empty = encode_prompts(models, [""])
        cfg = DecoderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
        decoder, hist = train_decoder(cache, text, empty, decoder, models.scheduler, cfg, args.out, args.resume,
                                      progress=True, stop_at=args.stop_at, max_minutes=args.max_minutes)
        finished = hist["last_step"] == args.steps
        if args.export and (finished or args.max_minutes is not None):
            decoder.save_pretrained(args.export)
            info = {"command": command, "train_clips": len(captions), "config": cfg.__dict__,
                    "trained_steps": hist["last_step"], "finished_schedule": finished,
                    "parameters": sum(p.numel() for p in decoder.parameters()),
                    "final_loss": hist["loss"][-1], "mean_logged_loss_last_4": float(np.mean(hist["loss"][-4:])),
                    "train_seconds": round(hist["seconds"][-1], 1)}
            (Path(args.export) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
            print(json.dumps(info, indent=1))
        return 0
    if args.command == "evaluate":
        check_writable(args.out, args.force)
        from .recognizer import load_recognizer

        models = load_video_models(storyworld_folder=args.storyworld, motion_folder=args.motion)
        if args.decoder:
            models.decoder = VideoDecoder.storyworld(args.decoder)
        rec = load_recognizer()
        methods = tuple(args.methods.split(","))
        unknown = set(methods) - set(METHODS)
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}: choose from {METHODS}")
        res = evaluate(models, args.clips, args.seed, args.frames, args.steps, args.strength, recognizer=rec,
                       methods=methods, progress=True, pin=not args.no_pin)
        res = summarize(res, command, n_clips=args.clips, seed=args.seed, steps=args.steps, strength=args.strength,
                        pin=not args.no_pin)
        mf = Path(args.motion) if args.motion else motion_dir()
        for part, folder in (("predictor", mf / "predictor"), ("decoder", Path(args.decoder or mf / "decoder"))):
            if (folder / "training.json").is_file():
                res[f"{part}_training"] = json.loads((folder / "training.json").read_text())
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps({k: res[k] for k in ("predictor_error_ratio_vs_linear", "psnr", "bars")}, indent=1))
        return 0
    return 1


def summarize(res: dict, command: str, **settings) -> dict:
    """The evaluation in results/motion.json's shape: the names the checks use, plus every metric and the bars."""
    pm = res["per_method"]
    psnrs = {m: pm[m]["psnr"] for m in pm}
    ratio = res.get("predictor", {}).get("ratio", float("nan"))
    ident = pm.get("full", {}).get("identity_agreement", float("nan"))
    needed = ("full", "latent_interpolation", "no_predictor", "temporal_only")
    beats = all(psnrs["full"] > psnrs[m] for m in needed[1:]) if set(needed) <= set(psnrs) else None  # None: not run
    out = {
        "command": command, **settings,
        "predictor_error_ratio_vs_linear": ratio,
        "psnr": psnrs,
        "identity_agreement_full": ident,
        "bars": {
            "predictor_error_ratio_le_0.7": bool(ratio <= 0.7),
            "full_beats_a_b_c_in_psnr": beats,
            "identity_agreement_full_ge_0.9": bool(ident >= 0.9),
        },
        "metrics": pm, "truth": res["truth"], "per_kind_psnr": res["per_kind_psnr"],
        "kind_counts": res["kind_counts"], "psnr_lead_of_full": res.get("psnr_lead_of_full"),
        "predictor_errors": res.get("predictor"), "seconds": res["seconds"],
    }
    return out


if __name__ == "__main__":
    sys.exit(main())
