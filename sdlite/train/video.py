"""Training the video decoder (`sdlite.video.VideoDecoder`) on cached storyworld clips.

Denoising training with the decoder's `prediction_type` ("sample": the clean latents' residual to the keyframes'
cross-fade, plain MSE; "epsilon": the noise, min-SNR weighted with diffusers' `compute_snr`). Each step conditions on
the true frame embeddings with a little noise (about the predictor's error), drops them for the null tokens with
`null_prob` (so one decoder also serves the temporal-only mode) and drops the prompt with `text_drop_prob`.

    python -m sdlite.train video-decoder --cache runs/motion/train_grid4 --spatial-channels 4 \\
        --out runs/video_spatial --export data/motion/decoder
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..seeds import step_generator
from ..video import VideoDecoder, build_decoder, encode_prompts, load_video_models
from .loop import CsvLog, accelerator, save_checkpoint, set_lr, start_run, warmup_cosine
from .motion import cache_grid, character_masks, load_cache


@dataclass(frozen=True)
class DecoderTrainConfig:
    """The decoder's hyper-parameters (validated; `dataclasses.replace` makes a variant)."""

    steps: int = 4000
    batch_size: int = 4  # clips per step (x L frames)
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    null_prob: float = 0.2  # drop the frame embeddings (the temporal-only mode)
    text_drop_prob: float = 0.3  # drop the prompt ("" encoding)
    embed_noise: float = 0.2  # Gaussian noise on the true embeddings, in units of their std (~ the predictor's error)
    min_snr_gamma: float = 5.0
    character_weight: float = 0.0  # extra loss weight on the latent cells that show the character (0: plain MSE)
    seed: int = 0
    log_every: int = 25
    ckpt_every: int = 200

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, warmup={self.warmup}: "
                             "steps and batch size must be >= 1, lr > 0, warmup >= 0")
        if self.character_weight < 0:
            raise ValueError(f"character_weight={self.character_weight}: use 0 (plain MSE) or a positive weight")
        for name in ("null_prob", "text_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be a probability in [0, 1]")


def _decoder_loss(model, unwrapped: VideoDecoder, scheduler, cfg: DecoderTrainConfig, batch: dict,
                  g: torch.Generator, device) -> torch.Tensor:
    """One step's loss on a batch of cached clips: noise, condition (with the random drops), predict, weigh."""
    from diffusers.training_utils import compute_snr

    z, e, txt, empty_text = batch["latents"], batch["embeds"], batch["text"], batch["empty_text"]
    b, frames = z.shape[:2]
    e = e + cfg.embed_noise * batch["embed_std"] * torch.randn(e.shape, generator=g).to(device)
    drop_text = torch.rand(b, generator=g) < cfg.text_drop_prob
    txt = torch.where(drop_text.view(-1, 1, 1).to(device), empty_text.to(device), txt)
    noise = torch.randn(z.shape, generator=g).to(device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=g)
    null = torch.rand(b, generator=g) < cfg.null_prob
    z0, z1 = z[:, 0], z[:, -1]  # the keyframe latents (B, C, h, w): the decoder's condition
    z = unwrapped.to_diffusion_space(z, z0, z1)  # the latents, or their residual to the cross-fade
    noisy = scheduler.add_noise(z, noise, t.view(-1).to(device))  # (B, L, C, h, w)
    tokens = unwrapped.frame_tokens(e, b, frames)  # (B, L, n, D)
    tokens = torch.where(null.view(-1, 1, 1, 1).to(device), unwrapped.null_tokens.expand_as(tokens), tokens)
    ehs = torch.cat([txt.unsqueeze(1).expand(-1, frames, -1, -1), tokens], 2).reshape(
        b * frames, -1, txt.shape[-1])  # (B*L, T+n, D)
    pred = model(noisy, t.to(device), z0, z1, ehs)  # (B, L, C, h, w)
    if unwrapped.config.prediction_type == "epsilon":
        snr = compute_snr(scheduler, t)
        target, weight = noise, torch.clamp(snr, max=cfg.min_snr_gamma) / snr  # min-SNR weighting
    else:
        target, weight = z, torch.ones(b)  # clean latents: plain MSE at every noise level
    err = (pred.float() - target).pow(2)  # (B, L, C, h, w)
    if cfg.character_weight > 0:  # the character's cells count 1 + w times as much; each clip's weights average 1
        w = 1.0 + cfg.character_weight * batch["masks"].to(err.device).unsqueeze(2)  # (B, L, 1, h, w)
        per_clip = (err * w).mean(dim=(1, 2, 3, 4)) / w.mean(dim=(1, 2, 3, 4))  # (B,)
    else:
        per_clip = err.mean(dim=(1, 2, 3, 4))  # (B,)
    return (weight.to(per_clip.device) * per_clip).mean()


def train_decoder(cache: dict, text: torch.Tensor, empty_text: torch.Tensor, decoder: VideoDecoder, scheduler,
                  cfg: DecoderTrainConfig, out: str | os.PathLike | None = None, resume: bool = False,
                  progress: bool = False, stop_at: int | None = None,
                  max_minutes: float | None = None) -> tuple[VideoDecoder, dict]:
    """Train `decoder` on cached clips: `cache` from `load_cache` (needs "latents" (N, L, C, h, w) and "embeds"
    (N, L, E), and "masks" (N, L, h, w) when `cfg.character_weight` > 0), `text` the encoded captions (N, T, D),
    `empty_text` the "" encoding (1, T, D).

    Everything random in step s comes from a generator seeded with (seed, s): resuming continues exactly; `stop_at`
    ends the run after that step (with a checkpoint), to split a long run into short jobs; `max_minutes` ends it
    (with a checkpoint) once this session has trained that long. Returns (decoder in eval mode, history)."""
    if "latents" not in cache:
        raise ValueError("the cache holds no latents: build it with `python -m sdlite.train motion-cache --latents`")
    lat, emb = cache["latents"], cache["embeds"]
    n = lat.shape[0]
    masks = cache.get("masks")
    fits = masks is not None and masks.shape[:2] == lat.shape[:2] and masks.shape[2:] == lat.shape[3:]
    if cfg.character_weight > 0 and not fits:
        raise ValueError("character_weight > 0 needs cache['masks'] (N, L, h, w) matching the latents: "
                         "sdlite.train.motion.character_masks(cache_folder)")
    if text.shape[0] != n:
        raise ValueError(f"{text.shape[0]} text encodings for {n} clips: encode every cached caption")
    acc = accelerator()
    opt = torch.optim.AdamW(decoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist = {"step": [], "loss": [], "seconds": []}
    start = start_run(out, resume, decoder, opt) if out is not None else None
    start_step = start.step if start is not None else 0
    if start is not None and start.step:
        hist = start.state["history"]
    log = CsvLog(Path(out) / "log.csv", ["step", "loss", "seconds"]) if out is not None else None
    model, opt = acc.prepare(decoder, opt)
    unwrapped = acc.unwrap_model(model)
    emb_std = emb.std().item()
    t0 = time.time() - (hist["seconds"][-1] if hist["seconds"] else 0.0)
    model.train()
    end_step = cfg.steps if stop_at is None else min(cfg.steps, int(stop_at))
    session_start = time.time()
    for step in range(start_step, end_step):
        if max_minutes is not None and time.time() - session_start > 60 * max_minutes:
            end_step = step  # out of time: checkpoint what we have
            if out is not None:
                save_checkpoint(Path(out) / "checkpoint", step, unwrapped, opt, state={"history": hist})
            break
        g = step_generator(cfg.seed, step)
        idx = torch.randint(n, (cfg.batch_size,), generator=g)
        batch = {"latents": lat[idx].to(acc.device), "embeds": emb[idx].to(acc.device),
                 "text": text[idx].to(acc.device), "empty_text": empty_text, "embed_std": emb_std}
        if cfg.character_weight > 0:
            batch["masks"] = masks[idx]
        set_lr(opt, cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup, floor=0.1))  # cosine to 10%
        loss = _decoder_loss(model, unwrapped, scheduler, cfg, batch, g, acc.device)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % cfg.log_every == 0 or step + 1 == end_step:
            row = dict(step=step + 1, loss=loss.item(), seconds=time.time() - t0)
            for k, v in row.items():
                hist[k].append(v)
            if log is not None:
                log.write(row)
            if progress:
                print(f"step {step + 1}: loss {loss.item():.5f} ({row['seconds']:.0f}s)", flush=True)
        if out is not None and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == end_step):
            save_checkpoint(Path(out) / "checkpoint", step + 1, unwrapped, opt, state={"history": hist})
    hist["last_step"] = end_step
    return unwrapped.eval(), hist


def initial_decoder(folder: str | os.PathLike, keyframe_attention: bool, grid: int) -> VideoDecoder:
    """A trained decoder to fine-tune (checked against the cache's embeddings), with keyframe attention on or off."""
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"--init {folder}: no decoder there (a folder with config.json from save_pretrained)")
    decoder = VideoDecoder.from_pretrained(folder, keyframe_attention=keyframe_attention)
    if decoder.config.image_grid != grid:
        raise ValueError(f"--init {folder} reads grid-{decoder.config.image_grid} embeddings, the cache holds "
                         f"grid-{grid} ones: build the cache with --grid {decoder.config.image_grid}")
    return decoder


def train_decoder_on_caches(caches: list[str | os.PathLike], out: str | os.PathLike, cfg: DecoderTrainConfig,
                            size: str = "base", spatial_channels: int = 0, export: str | os.PathLike | None = None,
                            resume: bool = False, stop_at: int | None = None, max_minutes: float | None = None,
                            storyworld: str | os.PathLike | None = None, command: str = "",
                            keyframe_attention: bool = False, init: str | os.PathLike | None = None,
                            save_dtype: str = "float32") -> dict | None:
    """The whole job behind `python -m sdlite.train video-decoder`: load the storyworld VAE and CLIP and the caches,
    build the decoder (before encoding the prompts, so a bad setting fails before any work), train, and (when the
    schedule finished, or time ran out with `max_minutes`) export it with its `training.json`. Returns that record.

    `init`: start from a trained decoder's folder (its shape; `size` and `spatial_channels` are then ignored) instead
    of random weights, e.g. to add keyframe attention, which has no parameters of its own, to a trained decoder.
    `save_dtype="float16"` stores the export at half the size (it loads back as float32, each weight rounded)."""
    if save_dtype not in ("float32", "float16"):
        raise ValueError(f"save_dtype={save_dtype!r}: use 'float32' or 'float16'")
    models = load_video_models(storyworld_folder=storyworld, decoder=False, predictor=False)
    loaded = [load_cache(c) for c in caches]
    cache = {"latents": torch.cat([c["latents"] for c in loaded]), "embeds": torch.cat([c["embeds"] for c in loaded])}
    if cfg.character_weight > 0:
        cache["masks"] = torch.cat([character_masks(c) for c in caches])
    if init is not None:
        decoder = initial_decoder(init, keyframe_attention, cache_grid(loaded))
    else:
        decoder = build_decoder(size, image_embed_dim=cache["embeds"].shape[-1],
                                cross_attention_dim=models.text_model.config.hidden_size,
                                sample_size=cache["latents"].shape[-1], seed=cfg.seed, image_grid=cache_grid(loaded),
                                spatial_channels=spatial_channels, keyframe_attention=keyframe_attention)
    captions = [cap for c in loaded for cap in c["captions"]]
    text = torch.cat([encode_prompts(models, captions[i : i + 256]) for i in range(0, len(captions), 256)])
    empty = encode_prompts(models, [""])
    decoder, hist = train_decoder(cache, text, empty, decoder, models.scheduler, cfg, out, resume, progress=True,
                                  stop_at=stop_at, max_minutes=max_minutes)
    finished = hist["last_step"] == cfg.steps
    if not export or not (finished or max_minutes is not None):
        return None
    decoder.to(getattr(torch, save_dtype)).save_pretrained(export)  # (the decoder is not used after this)
    info = {"command": command, "saved_dtype": save_dtype, "train_clips": len(captions),
            "config": dataclasses.asdict(cfg),
            "trained_steps": hist["last_step"], "finished_schedule": finished,
            "parameters": sum(p.numel() for p in decoder.parameters()),
            "final_loss": hist["loss"][-1], "mean_logged_loss_last_4": float(np.mean(hist["loss"][-4:])),
            "train_seconds": round(hist["seconds"][-1], 1)}
    if init is not None and (Path(init) / "training.json").is_file():  # the chain of commands that made it
        info["init"] = {"folder": str(init), "training": json.loads((Path(init) / "training.json").read_text())}
    (Path(export) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info
