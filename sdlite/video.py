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
  input channels (`cell_maps`). Cross-attention alone barely uses the embeddings; the map gives them a direct path
  (docs/storyworld-recipe.md has the measurements);
- the keyframes' own tokens (`keyframe_attention=True`, the shipped decoder): every frame's spatial self-attention
  also reads the tokens of frames 0 and L-1, consistent self-attention with the keyframes as the bank
  (`sdlite.keyframe_attention`; notebook 06 section 5 measures what it changes).

With no embeddings (`mode="temporal_only"`) learned null tokens stand in for the frame tokens: that is the
"latent-space only" decoder the paper argues against (only the temporal modules can plan the motion). Training
drops the embeddings at random (`null_prob`), so one trained decoder serves both modes.

The diffusion runs on *the residual of the frame latents to the latent cross-fade of the keyframes*
(`interpolation_residual`; the UNet's output convolution starts at zero, so an untrained decoder predicts residual
0, i.e. the cross-fade, baseline (a)). Training only has to learn what the cross-fade gets wrong: where the
character really is at frame i, which the semantic embeddings say.

`generate_transition(start, end, frames=16)` makes one transition; `story_video(panels)` chains the transitions
between consecutive story panels into one video; `write_video` saves one. Training is in `sdlite.train.video`,
the paper's Table 2 in `sdlite.eval.transitions` (`python -m sdlite.eval transitions`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin, UNetMotionModel
from diffusers.configuration_utils import register_to_config
from torch import nn

from .frame_polish import check_strength, polish_latents
from .images import as_image_tensor, fit_square, to_uint8
from .keyframe_attention import install_keyframe_attention
from .motion import (
    ImageEmbedder, SemanticMotionPredictor, check_frames, grid_parts, linear_interpolation, load_shipped, motion_dir,
)
from .paths import check_writable
from .pipeline import load_pipeline
from .seeds import check_seed, seeded

MODES = ("full", "no_predictor", "temporal_only", "true_embeddings")


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
                 spatial_channels: int = 0, keyframe_attention: bool = False):
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
        # the in-between frames' self-attention also reads the keyframes' tokens (sdlite.keyframe_attention)
        self.keyframe_processors = install_keyframe_attention(self.unet) if keyframe_attention else []

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
        for processor in self.keyframe_processors:  # they see (B * L, N, C): tell them L
            processor.frames = frames
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
        return load_shipped(cls, folder, "decoder", "video decoder", "python -m sdlite.train video-decoder")


def build_decoder(size: str = "base", image_embed_dim: int = 128, cross_attention_dim: int = 128,
                  sample_size: int = 16, frame_tokens: int = 2, seed: int = 0,
                  prediction_type: str = "sample", interpolation_residual: bool | None = None,
                  image_grid: int = 0, spatial_channels: int = 0, keyframe_attention: bool = False) -> VideoDecoder:
    """A randomly initialised decoder (seeded, without touching the global RNG). `interpolation_residual`
    (default: on for prediction_type="sample") makes it predict the correction to the latent cross-fade."""
    seed = check_seed(seed)
    cfg = video_unet_config(size, cross_attention_dim=cross_attention_dim, sample_size=sample_size)
    residual = prediction_type == "sample" if interpolation_residual is None else interpolation_residual
    return seeded(seed, lambda: VideoDecoder(cfg, image_embed_dim=image_embed_dim, frame_tokens=frame_tokens,
                                             prediction_type=prediction_type, interpolation_residual=residual,
                                             image_grid=image_grid, spatial_channels=spatial_channels,
                                             keyframe_attention=keyframe_attention))


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


def load_video_models(device: str | torch.device = "cpu", storyworld_folder: str | os.PathLike | None = None,
                      motion_folder: str | os.PathLike | None = None, decoder: bool = True,
                      predictor: bool = True) -> VideoModels:
    """The shipped storyworld parts: VAE + CLIP (data/storyworld), predictor + decoder (data/motion)."""
    from .storyworld.models import build_scheduler, load_storyworld_clip, load_storyworld_vae, storyworld_dir

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
                   pin: bool = True, embed_guidance: float = 1.0) -> torch.Tensor:
    """DDIM sampling of (B, L, C, h, w) frame latents between keyframe latents start/end (B, C, h, w).

    `strength` < 1 starts from the latent linear interpolation noised to that level (SDEdit), instead of pure
    noise: the decoder then only has to fix what the cross-fade gets wrong. With `pin`, the first and last
    frames are the keyframes at every step (replaced by the keyframe latents noised to the current level, the
    "replacement" trick of diffusion inpainting), so the in-between frames are denoised next to the true ends
    and the returned first/last latents are exactly `start` / `end`.

    `embed_guidance` w > 1 is classifier-free guidance on the frame embeddings: the prediction with the null frame
    tokens (the decoder was trained to serve both) is pushed away from, `null + w * (with - null)`; 1 is off.
    """
    frames = check_frames(frames)
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must be in (0, 1]: 1 starts from pure noise")
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    sched = type(scheduler).from_config(scheduler.config, prediction_type=decoder.config.prediction_type)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    b = start.shape[0]
    if embed_guidance < 1.0 or embed_guidance != embed_guidance:
        raise ValueError(f"embed_guidance={embed_guidance} must be >= 1 (1: no guidance on the frame embeddings)")
    guided = embed_guidance > 1.0 and frame_embeds is not None
    ehs = decoder.condition(text, frame_embeds, frames)  # (B*L, T+n, D)
    null_ehs = decoder.condition(text, None, frames) if guided else None
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
        x_in = sched.scale_model_input(x, t)
        eps = decoder(x_in, t, start, end, ehs).float()
        if guided:
            eps_null = decoder(x_in, t, start, end, null_ehs).float()
            eps = eps_null + embed_guidance * (eps - eps_null)
        step = sched.step(eps, t, x)
        # the last step returns the model's clean estimate (DDIM would leave sqrt(1 - alpha_bar_0) of noise)
        x = step.pred_original_sample if t == timesteps[-1] else step.prev_sample
    if pin:
        x[:, [0, -1]] = ends.to(x.dtype)
    return decoder.from_diffusion_space(x, start, end)


def image_size(models: VideoModels) -> int:
    """The frame side the models work at (the VAE's sample_size)."""
    return int(models.vae.config.sample_size)


@torch.no_grad()
def transition_latents(models: VideoModels, start: torch.Tensor, end: torch.Tensor, frames: int = 16,
                       prompts: list[str] | None = None, mode: str = "full", steps: int = 20, seed: int = 0,
                       strength: float = 1.0, frame_embeds: torch.Tensor | None = None,
                       pin: bool = True, embed_guidance: float = 1.0) -> torch.Tensor:
    """Batched transitions: keyframes (B, 3, H, W) -> frame latents (B, L, C, h, w). `mode`: "full" (predicted
    embeddings), "no_predictor" (linearly interpolated embeddings), "temporal_only" (no embeddings) or
    "true_embeddings" (the caller passes `frame_embeds`, e.g. the true ones: an upper bound). `pin`: keep the
    first/last latents on the keyframes while sampling (see `sample_latents`)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    if models.decoder is None:
        raise ValueError("models.decoder is None: load it with load_video_models(decoder=True)")
    frames = check_frames(frames)
    seed = check_seed(seed)
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
                          pin, embed_guidance)


@torch.no_grad()
def generate_transition(start, end, frames: int = 16, models: VideoModels | None = None, prompt: str = "",
                        mode: str = "full", steps: int = 20, seed: int = 0, strength: float = 1.0,
                        pin_keyframes: bool = True, polish: float = 0.0, pipe=None) -> torch.Tensor:
    """A transition video from `start` to `end` (paths, PIL images, uint8 arrays or (3, H, W) tensors in [-1, 1]):
    float (L, 3, H, W) in [-1, 1]. With `pin_keyframes` the first and last frames are the keyframes themselves.
    `polish` > 0: the image model `pipe` (default: storyworld's) then redraws the in-between frames at that
    strength, reading the keyframes (`sdlite.frame_polish`; e.g. `STORYWORLD_POLISH_STRENGTH`)."""
    polish = check_strength(polish)
    models = models if models is not None else load_video_models()
    size = image_size(models)
    a = fit_square(as_image_tensor(start), size).to(models.device)
    b = fit_square(as_image_tensor(end), size).to(models.device)
    z = transition_latents(models, a[None], b[None], frames, [prompt], mode, steps, seed, strength)
    if polish > 0:
        z = polish_latents(pipe if pipe is not None else load_pipeline(), z, [prompt], polish, seed=seed)
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
                strength: float = 1.0, polish: float = 0.0, pipe=None) -> torch.Tensor:
    """A whole story as one video: each panel (keyframe) held `hold` frames, consecutive panels joined by a
    `frames`-frame transition (their shared keyframes are not repeated). `panels`: a list of keyframes (any form
    `generate_transition` takes) or a (N, 3, H, W) tensor; `prompts`: one per transition (N - 1) or None.
    Transition k uses seed `seed + k`; `polish`, `pipe`: as `generate_transition`.
    Returns (T, 3, H, W) in [-1, 1], T = N * hold + (N - 1) * (frames - 2)."""
    panels = list(panels)
    if len(panels) < 2:
        raise ValueError(f"a story video needs at least 2 panels, got {len(panels)}")
    if hold < 0:
        raise ValueError(f"hold={hold} must be >= 0 (frames each keyframe is shown still)")
    if prompts is not None and len(prompts) != len(panels) - 1:
        raise ValueError(f"got {len(prompts)} prompts for {len(panels) - 1} transitions: one per pair of panels")
    models = models if models is not None else load_video_models()
    if check_strength(polish) > 0 and pipe is None:
        pipe = load_pipeline()  # once for every transition
    size = image_size(models)
    keys = [fit_square(as_image_tensor(p), size).to(models.device) for p in panels]
    out = [keys[0][None].expand(hold, -1, -1, -1)]
    for k in range(len(keys) - 1):
        clip = generate_transition(keys[k], keys[k + 1], frames, models, prompts[k] if prompts else "", mode,
                                   steps, seed + k, strength, pin_keyframes=True, polish=polish, pipe=pipe)
        out += [clip[1:-1], keys[k + 1][None].expand(hold, -1, -1, -1)]
    return torch.cat(out)


def write_video(path: str | os.PathLike, video: torch.Tensor, fps: int = 8, scale: int = 4,
                force: bool = False) -> Path:
    """Write (L, 3, H, W) in [-1, 1] as .mp4 or .gif (ffmpeg from imageio-ffmpeg), frames upscaled `scale` times
    (nearest); `.png` writes a strip of the frames instead. Never overwrites unless `force`."""
    import mediapy

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


if __name__ == "__main__":  # the command lines live in sdlite.cli: say where
    raise SystemExit("python -m sdlite.video has moved: `sdlite video START END --out clip.gif` generates, "
                     "`python -m sdlite.train video-decoder ...` trains, `python -m sdlite.eval transitions ...` "
                     "evaluates (the same options)")
