"""Training storyworld's models from scratch: VAE, CLIP, then the SDXL-style UNet by collage pre-training.

    python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld --force

Every loop is an `accelerate` loop (one CPU here, several GPUs elsewhere), seeded, resumable (`--resume` picks
up the last checkpoint of the stage) and logs its losses to `<out>/<stage>/log.csv`. Data item i is a pure
function of (seed, i) (`sdlite.storyworld`), and the noise of step s is drawn from a generator seeded with
(seed, s), so a resumed run sees exactly the batches an uninterrupted run would have seen.

**Collage pre-training through attention** (the UNet stage). CSA at inference lets the images of a story
attend to each other; it can only transfer identity if the model's self-attention has learned to copy
appearance between corresponding regions of *different* images. Inside one image, convolutions can do any
copying, so a model trained on single images never learns it. Here every batch mixes

- groups of K panels of one character (different scenes/actions) denoised with *full joint self-attention
  across the group* (`sdlite.attention`, rate 1 or 0.5, disjoint tiles of K): only attention can carry the
  character from one panel to another. In half the groups the identity words appear in one caption only
  (`identity_in_one_caption`), in the others each caption drops them with probability 1/2: both reward copying;
- ordinary single images (plain attention).

The loss is weighted up on the character's pixels (where the identity is). The telling sign that the model
uses attention to copy: the group loss falls *below* the single-image loss, and the probe loss of the same
group batch with joint attention falls below the probe loss with the joint attention switched off
(columns `group`, `single`, `probe_joint`, `probe_plain` of the log).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import storyworld as sw
from .models import (
    IMAGE_SIZE, StoryworldSizes, assemble_pipeline, build_clip, build_scheduler, build_storyworld_tokenizer,
    build_unet, build_vae, count_parameters, save_pipeline, storyworld_tokenizers, text_encoders_from_clip,
)
from .paths import data_dir

STAGES = ("vae", "clip", "unet", "decoder")
# What `make train-storyworld` runs: every shipped checkpoint from scratch (about 2.8 h on a quiet 2-core CPU).
RECIPE_COMMAND = ("python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld "
                  "--force --threads 1")


@dataclass
class TrainConfig:
    """One stage's hyper-parameters. `steps` counts optimizer steps of `batch_size` images."""

    steps: int
    batch_size: int
    lr: float
    warmup: int = 100
    decay_steps: int = 0  # the learning rate falls linearly to 0 over the last `decay_steps` steps (0 = constant)
    log_every: int = 50
    ckpt_every: int = 250
    seed: int = 0
    weight_decay: float = 0.01
    crop: int = 0  # vae only: train on random crops of this size (0 = whole images)
    character_weight: float = 2.0  # unet, decoder: loss weight 1 + w on the character's pixels
    # decoder only: + w * (how differently a frozen recognizer reads the reconstruction and the original), a
    # perceptual loss as LPIPS is for SD's VAE; the recognizer is its own file, never one of the scorers
    perceptual_weight: float = 0.0
    perceptual_recognizer: str = "perceptual_recognizer.safetensors"  # in data/ unless a path
    # unet only
    k: int = 4  # panels per group (collage)
    group_fraction: float = 0.5  # share of the batch's images that come in groups
    group_rates: tuple[float, ...] = (1.0, 0.5)  # joint-attention sampling rate, cycled over steps
    attention_layers: str = "all"  # which self-attention layers are joint during group steps
    caption_dropout: float = 0.1  # unconditional (zeroed text) training, for classifier-free guidance
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    export_every: int = 0  # unet: export the pipeline every N steps (0 = only at the end)
    probe_groups: int = 8  # unet: groups in the fixed probe batch (joint vs plain attention loss)


def default_config(stage: str) -> TrainConfig:
    """The shipped recipe. Wall time with 1 thread on a quiet 2-core CPU: VAE ~7.5 min, CLIP ~3 min, UNet ~2 h 10 min
    (2.1-2.4 steps/s), decoder ~24 min (docs/storyworld-recipe.md has the measured times of the shipped runs).
    The UNet and the decoder hold their learning rate, then cool it down linearly to 0 over their last steps."""
    if stage == "vae":
        return TrainConfig(steps=1000, batch_size=32, lr=1e-3, ckpt_every=200, crop=32)
    if stage == "clip":
        return TrainConfig(steps=200, batch_size=96, lr=5e-4, ckpt_every=100)
    if stage == "unet":
        return TrainConfig(steps=17000, batch_size=16, lr=5e-4, warmup=200, decay_steps=3800, log_every=50,
                           ckpt_every=200)
    if stage == "decoder":
        return TrainConfig(steps=3000, batch_size=16, lr=3e-4, warmup=50, decay_steps=1000, ckpt_every=250,
                           character_weight=4.0)
    raise ValueError(f"unknown stage {stage!r}: use one of {STAGES}")


# ----------------------------------------------------------------------------------------------------
# Small helpers: logging, checkpoints, schedules
# ----------------------------------------------------------------------------------------------------
class CsvLog:
    """Appends rows to `path` (one column per key of the first row); also keeps them in memory."""

    def __init__(self, path: Path, fields: list[str]):
        self.path, self.fields = Path(path), fields
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(fields)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])


def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def read_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A stage's log.csv as columns of floats (NaN where a row has no value)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r[k] not in ("", None) else np.nan for r in rows]) for k in rows[0]}


def _lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up, then constant, then (if `decay_steps`) a linear cool-down to 0 at the last step.

    Because the middle part is constant, a run resumed with more steps and a cool-down equals one run that was
    given those settings from the start."""
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
    if cfg.decay_steps > 0:
        lr *= min(1.0, (cfg.steps - step) / cfg.decay_steps)
    return lr


def _step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """The generator of one step's randomness (noise, timesteps, dropout): a pure function of (seed, step)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))


def _save_checkpoint(folder: Path, step: int, model: torch.nn.Module, optimizer, extra: dict | None = None) -> None:
    """model.safetensors + optimizer.pt + state.json, written to a temp folder then renamed (never half-written)."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for name, tensors in (extra or {}).items():
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def _load_checkpoint(folder: Path, model: torch.nn.Module, optimizer) -> tuple[int, dict]:
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    extra = {p.stem: load_file(str(p)) for p in folder.glob("*.safetensors") if p.stem != "model"}
    return json.loads((folder / "state.json").read_text())["step"], extra


def _start(stage_dir: Path, resume: bool, model, optimizer) -> tuple[int, dict]:
    ckpt = stage_dir / "checkpoint"
    if resume and (ckpt / "state.json").is_file():
        return _load_checkpoint(ckpt, model, optimizer)
    if not resume and (stage_dir / "log.csv").exists():
        raise FileExistsError(f"{stage_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return 0, {}


def _accelerator():
    from accelerate import Accelerator

    return Accelerator()


def _stack(items: list[dict], key: str) -> torch.Tensor:
    return torch.stack([it[key] for it in items])


# ----------------------------------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------------------------------
def train_vae(out: str | os.PathLike, sizes: StoryworldSizes, cfg: TrainConfig, resume: bool = False,
              progress: bool = True):
    """AutoencoderKL on storyworld renders: L1 + MSE reconstruction + a tiny KL (1e-6), as LDM autoencoders.

    Writes `<out>/vae/final` (save_pretrained, with `scaling_factor` = 1 / std of the latents).
    """
    stage_dir = Path(out) / "vae"
    acc = _accelerator()
    vae = build_vae(sizes, seed=cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, _ = _start(stage_dir, resume, vae, opt)
    vae, opt = acc.prepare(vae, opt)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "l1", "kl", "lr", "seconds"])
    data = sw.ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 1)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="vae", disable=not (progress and acc.is_main_process), initial=start,
               total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        x = _stack([data[i] for i in range(first, first + per_proc)], "pixel_values").to(acc.device)  # (B,3,64,64)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        gen = _step_generator(cfg.seed, step)
        if cfg.crop:  # the VAE is fully convolutional: train on random crops (4x cheaper at half the size)
            x = _random_crops(x, cfg.crop, gen)  # (B,3,crop,crop)
        post = acc.unwrap_model(vae).encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x.device)  # (B,4,16,16)
        rec = acc.unwrap_model(vae).decode(z).sample
        l1 = (rec - x).abs().mean()
        kl = post.kl().mean() / z[0].numel()
        loss = l1 + F.mse_loss(rec, x) + 1e-6 * kl
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(dict(step=step + 1, loss=loss.item(), l1=l1.item(), kl=kl.item(), lr=_lr_at(step, cfg),
                           seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            _save_checkpoint(stage_dir / "checkpoint", step + 1, acc.unwrap_model(vae), opt)
    vae = acc.unwrap_model(vae).eval()
    if acc.is_main_process:
        _save_checkpoint(stage_dir / "checkpoint", cfg.steps, vae, opt)
        n = max(16, min(256, cfg.steps * cfg.batch_size))
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, n=n, seed=cfg.seed + 99))
        vae.save_pretrained(stage_dir / "final")
    return vae


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One random size x size crop per image, at multiples of 4 (the VAE's downsampling). (B,3,H,W) -> (B,3,s,s)."""
    b, _, h, w = x.shape
    ys = torch.randint(0, (h - size) // 4 + 1, (b,), generator=gen) * 4
    xs = torch.randint(0, (w - size) // 4 + 1, (b,), generator=gen) * 4
    return torch.stack([x[i, :, y : y + size, c : c + size] for i, (y, c) in enumerate(zip(ys.tolist(), xs.tolist()))])


@torch.no_grad()
def latent_scaling_factor(vae, n: int = 256, seed: int = 0) -> float:
    """1 / std of the VAE's latent means over n renders (SD's recipe: scaled latents have unit variance)."""
    data = sw.ImageDataset(n, seed=seed)
    x = torch.stack([data[i]["pixel_values"] for i in range(n)])
    z = torch.cat([vae.encode(x[i : i + 64]).latent_dist.mean for i in range(0, n, 64)])
    return float(1.0 / z.std())


# ----------------------------------------------------------------------------------------------------
# Stage 2: CLIP
# ----------------------------------------------------------------------------------------------------
def train_clip(out: str | os.PathLike, sizes: StoryworldSizes, cfg: TrainConfig, tokenizer, resume: bool = False,
               progress: bool = True):
    """Contrastive CLIP on (render, caption) pairs; captions drop each identity word with probability 0.3.

    Writes `<out>/clip/final` (CLIPModel.save_pretrained).
    """
    stage_dir = Path(out) / "clip"
    acc = _accelerator()
    clip = build_clip(sizes, tokenizer, seed=cfg.seed)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, _ = _start(stage_dir, resume, clip, opt)
    clip, opt = acc.prepare(clip, opt)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "accuracy", "lr", "seconds"])
    data = sw.ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 2, drop_prob=0.3)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="clip", disable=not (progress and acc.is_main_process), initial=start,
               total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        items = [data[i] for i in range(first, first + per_proc)]
        x = _stack(items, "pixel_values").to(acc.device)  # (B,3,64,64) in [-1,1]
        ids = tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(acc.device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        res = clip(input_ids=ids, pixel_values=x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        acc.backward(res.loss)
        opt.step()
        with torch.no_grad():  # CLIP can only be trusted up to 100: keep logit_scale <= ln 100
            acc.unwrap_model(clip).logit_scale.clamp_(0, math.log(100))
        acc_i2t = (res.logits_per_image.argmax(1) == torch.arange(len(items), device=x.device)).float().mean()
        bar.set_postfix(loss=f"{res.loss.item():.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(dict(step=step + 1, loss=res.loss.item(), accuracy=acc_i2t.item(), lr=_lr_at(step, cfg),
                           seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            _save_checkpoint(stage_dir / "checkpoint", step + 1, acc.unwrap_model(clip), opt)
    clip = acc.unwrap_model(clip).eval()
    if acc.is_main_process:
        _save_checkpoint(stage_dir / "checkpoint", cfg.steps, clip, opt)
        clip.save_pretrained(stage_dir / "final")
    return clip


# ----------------------------------------------------------------------------------------------------
# Stage 3: the UNet (collage pre-training through attention)
# ----------------------------------------------------------------------------------------------------
def encode_text(te1, te2, tok1, tok2, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding (what `StableDiffusionXLPipeline.encode_prompt` computes, without guidance):

    penultimate hidden states of both encoders, concatenated -> (B, L, 2*hidden); pooled `text_embeds` of the
    second -> (B, projection_dim).
    """
    device = next(te1.parameters()).device
    ids1 = tok1(captions, padding="max_length", truncation=True, max_length=tok1.model_max_length,
                return_tensors="pt").input_ids.to(device)
    ids2 = tok2(captions, padding="max_length", truncation=True, max_length=tok2.model_max_length,
                return_tensors="pt").input_ids.to(device)
    h1 = te1(ids1, output_hidden_states=True).hidden_states[-2]  # (B, L, hidden)
    out2 = te2(ids2, output_hidden_states=True)
    return torch.cat([h1, out2.hidden_states[-2]], dim=-1), out2.text_embeds


def _contrast_character(ch: sw.Character) -> sw.Character:
    """The same class word with every identity attribute changed (to find the character's pixels)."""
    def other(values, v):
        return values[(values.index(v) + 1) % len(values)]
    return dataclasses.replace(ch, hair=other(sw.HAIR_COLOURS, ch.hair), shirt=other(sw.SHIRT_COLOURS, ch.shirt),
                               trousers=other(sw.TROUSERS_COLOURS, ch.trousers), hat=other(sw.HATS, ch.hat))


def character_mask(panel: sw.Panel, size: int = IMAGE_SIZE, latent_size: int = 16) -> torch.Tensor:
    """(latent_size, latent_size) float in {0, 1}: latent cells that show the character's identity attributes
    (hair, shirt, trousers, hat): where the render changes when those attributes change."""
    a = sw.render(panel, size).astype(np.int16)
    b = sw.render(dataclasses.replace(panel, character=_contrast_character(panel.character)), size).astype(np.int16)
    diff = torch.from_numpy((np.abs(a - b).sum(-1) > 30).astype(np.float32))[None, None]  # (1,1,H,W)
    return (F.adaptive_max_pool2d(diff, latent_size)[0, 0] > 0).float()


class UnetBatches:
    """The UNet stage's data: step s -> (group items, single items), pure functions of (seed, s).

    Groups alternate between `identity_in_one_caption=True` and independent caption drops.
    """

    def __init__(self, cfg: TrainConfig, steps: int, seed: int):
        n_img = cfg.batch_size
        self.k = cfg.k
        self.groups = int(round(cfg.group_fraction * n_img / cfg.k))
        self.singles = n_img - self.groups * cfg.k
        total = max(1, steps * max(self.groups, 1))
        self.one = sw.CollageDataset(total, k=cfg.k, seed=seed + 10, identity_in_one_caption=True)
        self.drop = sw.CollageDataset(total, k=cfg.k, seed=seed + 11, drop_prob=0.5)
        self.single = sw.ImageDataset(max(1, steps * max(self.singles, 1)), seed=seed + 12, drop_prob=0.5)

    def group(self, i: int) -> dict:
        ds = self.one if i % 2 == 0 else self.drop
        item = ds[i // 2]
        panels, _ = ds.panels(i // 2)
        item["mask"] = torch.stack([character_mask(p) for p in panels])  # (k,16,16)
        return item

    def image(self, i: int) -> dict:
        item = self.single[i]
        item["mask"] = character_mask(self.single.panel(i)[0])
        return item

    def batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[dict | None, dict | None]:
        """(groups, singles) for this process: pixel_values (n,3,64,64), captions, masks (n,16,16)."""
        g_per, s_per = self.groups // world, self.singles // world
        groups = [self.group(step * self.groups + rank * g_per + j) for j in range(g_per)]
        singles = [self.image(step * self.singles + rank * s_per + j) for j in range(s_per)]
        g = None
        if groups:
            g = {"pixel_values": torch.cat([it["pixel_values"] for it in groups]),
                 "captions": [c for it in groups for c in it["captions"]],
                 "mask": torch.cat([it["mask"] for it in groups])}
        s = None
        if singles:
            s = {"pixel_values": _stack(singles, "pixel_values"), "captions": [it["caption"] for it in singles],
                 "mask": _stack(singles, "mask")}
        return g, s


class UnetTrainer:
    """Holds the frozen parts (VAE, text encoders), the noise schedule and the loss of one (sub)batch."""

    def __init__(self, vae, te1, te2, tok1, tok2, cfg: TrainConfig, device):
        self.vae, self.te1, self.te2, self.tok1, self.tok2 = vae, te1, te2, tok1, tok2
        self.cfg, self.device = cfg, device
        self.scheduler = build_scheduler()
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)  # (1000,)

    @torch.no_grad()
    def condition(self, pixels: torch.Tensor, captions: list[str], gen: torch.Generator, dropout: bool = True):
        """latents (n,4,16,16) scaled; text (n,L,2h); pooled (n,P); time ids (n,6); dropped captions zeroed."""
        pixels = pixels.to(self.device)
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        text, pooled = encode_text(self.te1, self.te2, self.tok1, self.tok2, captions)
        if dropout and self.cfg.caption_dropout > 0:
            keep = (torch.rand(len(captions), generator=gen) >= self.cfg.caption_dropout).float().to(self.device)
            text, pooled = text * keep[:, None, None], pooled * keep[:, None]  # force_zeros_for_empty_prompt
        h, w = pixels.shape[-2:]
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text.dtype, device=self.device).repeat(len(captions), 1)
        return latents, text, pooled, time_ids

    def loss(self, unet, latents, text, pooled, time_ids, mask, gen: torch.Generator,
             timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE, weighted 1 + character_weight on the character's latent cells."""
        n = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, len(self.alphas_cumprod), (n,), generator=gen)
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen)
        timesteps, noise = timesteps.to(self.device), noise.to(self.device)
        a = self.alphas_cumprod[timesteps].view(n, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, timesteps, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = a.view(n) / (1 - a.view(n))
        snr_w = torch.clamp(snr, max=self.cfg.min_snr_gamma) / snr  # (n,)
        pix_w = 1.0 + self.cfg.character_weight * mask.to(self.device)[:, None]  # (n,1,16,16)
        per = ((pred.float() - noise) ** 2 * pix_w).mean(dim=(1, 2, 3)) / pix_w.mean(dim=(1, 2, 3))
        return (per * snr_w).mean()


def _frozen_parts(out: Path, tokenizer):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    vae = AutoencoderKL.from_pretrained(out / "vae" / "final").eval().requires_grad_(False)
    clip = CLIPModel.from_pretrained(out / "clip" / "final").eval()
    te1, te2 = text_encoders_from_clip(clip)
    tok2 = storyworld_tokenizers(tokenizer)[1]
    return vae, clip, te1, te2, tok2


def train_unet(out: str | os.PathLike, sizes: StoryworldSizes, cfg: TrainConfig, tokenizer, resume: bool = False,
               progress: bool = True, export: str | os.PathLike | None = None, max_minutes: float | None = None):
    """Collage pre-training through attention (see the module doc). Needs `<out>/vae/final`, `<out>/clip/final`.

    Writes `<out>/unet/final` (the EMA weights, save_pretrained) and, with `export`, the pipeline folder
    (also every `cfg.export_every` steps). `max_minutes` stops early (with a checkpoint) after that wall time.
    """
    from .attention import install_consistent_attention

    out = Path(out)
    stage_dir = out / "unet"
    acc = _accelerator()
    vae, clip, te1, te2, tok2 = _frozen_parts(out, tokenizer)
    vae, te1, te2 = vae.to(acc.device), te1.to(acc.device), te2.to(acc.device)
    unet = build_unet(sizes, seed=cfg.seed)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, extra = _start(stage_dir, resume, unet, opt)
    if "ema" in extra:
        ema = extra["ema"]
    unet, opt = acc.prepare(unet, opt)
    raw = acc.unwrap_model(unet)
    handle = install_consistent_attention(raw, rate=1.0, tile=cfg.k, stride=cfg.k, layers=cfg.attention_layers,
                                          window_batch=None, seed=cfg.seed)
    trainer = UnetTrainer(vae, te1, te2, tokenizer, tok2, cfg, acc.device)
    data = UnetBatches(cfg, cfg.steps, cfg.seed)
    probe = _probe_batch(trainer, cfg, cfg.probe_groups)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "group", "single", "probe_joint", "probe_plain", "rate",
                                         "lr", "seconds"])
    t0 = time.time()
    run_group = run_single = 0.0
    n_avg = 0
    bar = tqdm(range(start, cfg.steps), desc="unet", disable=not (progress and acc.is_main_process), initial=start,
               total=cfg.steps)
    step = start
    for step in bar:
        gen = _step_generator(cfg.seed, step)
        rate = cfg.group_rates[step % len(cfg.group_rates)]
        for p in handle.processors.values():
            p.rate = rate
        handle.reseed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        groups, singles = data.batch(step, acc.process_index, acc.num_processes)
        losses = []
        lg = ls = torch.zeros(())
        raw.train()
        if groups is not None:
            lg = trainer.loss(unet, *trainer.condition(groups["pixel_values"], groups["captions"], gen),
                              groups["mask"], gen)  # joint self-attention inside each group of k
            losses.append(lg * len(groups["captions"]))
        if singles is not None:
            with handle.off():
                ls = trainer.loss(unet, *trainer.condition(singles["pixel_values"], singles["captions"], gen),
                                  singles["mask"], gen)
            losses.append(ls * len(singles["captions"]))
        loss = sum(losses) / (data.groups * cfg.k + data.singles)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in raw.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v.detach(), 1 - decay)
        run_group += lg.item()
        run_single += ls.item()
        n_avg += 1
        bar.set_postfix(group=f"{lg.item():.4f}", single=f"{ls.item():.4f}")
        last = step + 1 == cfg.steps or (max_minutes is not None and time.time() - t0 > 60 * max_minutes)
        if (step + 1) % cfg.log_every == 0 or last:
            pj, pp = _probe_losses(trainer, raw, handle, probe)
            log.write(dict(step=step + 1, loss=loss.item(), group=run_group / n_avg, single=run_single / n_avg,
                           probe_joint=pj, probe_plain=pp, rate=rate, lr=_lr_at(step, cfg),
                           seconds=time.time() - t0))
            run_group = run_single = 0.0
            n_avg = 0
        if acc.is_main_process and ((step + 1) % cfg.ckpt_every == 0 or last):
            _save_checkpoint(stage_dir / "checkpoint", step + 1, raw, opt, {"ema": ema})
        if acc.is_main_process and export and cfg.export_every and (step + 1) % cfg.export_every == 0 and not last:
            _export(out, ema, sizes, tokenizer, export, clip=clip, note=f"intermediate, step {step + 1}")
        if last:
            break
    handle.remove()
    final = build_unet(sizes)
    final.load_state_dict(ema)
    if acc.is_main_process:
        final.save_pretrained(stage_dir / "final")
        (stage_dir / "final" / "state.json").write_text(json.dumps({"step": step + 1}))
        if export:
            _export(out, ema, sizes, tokenizer, export, clip=clip, note=f"step {step + 1}")
    return final


def _probe_batch(trainer: UnetTrainer, cfg: TrainConfig, groups: int = 8) -> dict:
    """A fixed batch of groups whose identity words are in one caption only, with fixed noise and timesteps."""
    ds = sw.CollageDataset(groups, k=cfg.k, seed=cfg.seed + 777, identity_in_one_caption=True)
    items = [ds[i] for i in range(groups)]
    pixels = torch.cat([it["pixel_values"] for it in items])
    caps = [c for it in items for c in it["captions"]]
    mask = torch.stack([character_mask(p) for i in range(groups) for p in ds.panels(i)[0]])
    gen = torch.Generator().manual_seed(cfg.seed + 778)
    cond = trainer.condition(pixels, caps, gen, dropout=False)
    n = len(caps)
    # the same timestep for the k panels of a group, spread over [100, 900]
    t = torch.linspace(100, 900, groups).long().repeat_interleave(cfg.k)
    return {"cond": cond, "mask": mask, "timesteps": t, "noise": torch.randn(cond[0].shape, generator=gen), "n": n}


@torch.no_grad()
def _probe_losses(trainer: UnetTrainer, unet, handle, probe: dict) -> tuple[float, float]:
    """(loss with joint attention at rate 1, loss with plain attention) on the fixed probe batch."""
    was = unet.training
    unet.eval()
    rates = {k: p.rate for k, p in handle.processors.items()}
    for p in handle.processors.values():
        p.rate = 1.0
    gen = torch.Generator()
    args = (*probe["cond"], probe["mask"], gen)
    joint = trainer.loss(unet, *args, timesteps=probe["timesteps"], noise=probe["noise"]).item()
    with handle.off():
        plain = trainer.loss(unet, *args, timesteps=probe["timesteps"], noise=probe["noise"]).item()
    for k, p in handle.processors.items():
        p.rate = rates[k]
    unet.train(was)
    return joint, plain


def _export(out: Path, unet_state: dict, sizes, tokenizer, folder, vae=None, clip=None, note: str = "") -> Path:
    """Assemble the SDXL pipeline from the stage outputs and save it (fp16) to `folder`, with the logs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    out = Path(out)
    if vae is None:  # the stage-4 VAE (tuned decoder) when it exists, else stage 1's
        vae = AutoencoderKL.from_pretrained(out / ("decoder" if (out / "decoder" / "final").is_dir() else "vae")
                                            / "final")
    clip = clip if clip is not None else CLIPModel.from_pretrained(out / "clip" / "final")
    unet = build_unet(sizes)
    unet.load_state_dict(unet_state)
    pipe = assemble_pipeline(vae, clip, unet, tokenizer)
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pipeline(pipe, clip, tmp, fp16=True)
    (tmp / "logs").mkdir()
    for old in sorted((folder / "logs").glob("*.json")) if (folder / "logs").is_dir() else []:
        shutil.copy(old, tmp / "logs" / old.name)  # keep the recorded checks of earlier exports
    for stage in STAGES:
        if (out / stage / "log.csv").exists():
            shutil.copy(out / stage / "log.csv", tmp / "logs" / f"{stage}.csv")
    meta = {"command": " ".join(["python -m sdlite.train", *sys.argv[1:]]) if sys.argv else "",
            "recipe": RECIPE_COMMAND, "note": note, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "sizes": dataclasses.asdict(sizes),
            "parameters": {"vae": count_parameters(vae), "clip": count_parameters(clip),
                           "unet": count_parameters(unet)},
            "data": "sdlite.storyworld renders (ImageDataset / CollageDataset), generated on the fly from the seeds"}
    for stage in STAGES:
        st = out / stage / "train_config.json"
        if st.exists():
            meta[f"{stage}_config"] = json.loads(st.read_text())
    (tmp / "training.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


# ----------------------------------------------------------------------------------------------------
# Stage 4: the VAE decoder, fine-tuned on the character (encoder frozen)
# ----------------------------------------------------------------------------------------------------
def perceptual_loss(recognizer, rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """How differently a frozen recognizer reads the reconstruction `rec` and the original `x` (B, 3, 64, 64):
    the KL divergence of its label distributions (original -> reconstruction), summed over its heads, averaged over
    the batch. 0 when it reads both alike; it rises when a detail that tells a label apart (a face, a hat's brim)
    is blurred away, which an L1 loss counts as a few pixels."""
    with torch.no_grad():
        target = recognizer(x)
    got = recognizer(rec)
    return sum(F.kl_div(F.log_softmax(got[k], -1), F.log_softmax(target[k], -1), log_target=True,
                        reduction="batchmean") for k in got)


def _perceptual_recognizer(cfg: TrainConfig, device):
    from .recognizer import load_recognizer

    path = Path(cfg.perceptual_recognizer)
    path = path if path.is_file() or path.parent != Path(".") else data_dir() / path
    if not path.is_file():
        raise FileNotFoundError(f"perceptual_weight={cfg.perceptual_weight} needs the recognizer {path}: train it "
                                "with `python -m sdlite.recognizer --seed 2 --out data/perceptual_recognizer"
                                ".safetensors` (not a scorer: a recognizer of its own seed and renders)")
    return load_recognizer(path).to(device).requires_grad_(False).eval()


def train_vae_decoder(out: str | os.PathLike, cfg: TrainConfig, resume: bool = False, progress: bool = True):
    """Fine-tune the VAE's decoder only, with the loss weighted 1 + w on the character's pixels, plus
    `cfg.perceptual_weight` x `perceptual_loss` with a frozen recognizer of its own (not a scorer).

    The stage-1 VAE, trained on crops where sky and grass fill most pixels, blurs the small parts that carry
    identity (hair under a hat, the face that tells a boy from a man). Freezing the encoder keeps the latent
    space (and `scaling_factor`) the UNet was trained in, so this stage can run before or after the UNet,
    exactly as SD's "ft-MSE" VAE fine-tuned only its decoder. Needs `<out>/vae/final`; writes
    `<out>/decoder/final` (a whole `AutoencoderKL`: frozen encoder + tuned decoder), which `_export` prefers.
    """
    from diffusers import AutoencoderKL

    out = Path(out)
    stage_dir = out / "decoder"
    acc = _accelerator()
    perceiver = _perceptual_recognizer(cfg, acc.device) if cfg.perceptual_weight else None  # fails before writing
    vae = AutoencoderKL.from_pretrained(out / "vae" / "final")
    vae.requires_grad_(False)
    tuned = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, _ = _start(stage_dir, resume, vae, opt)
    vae, opt = acc.prepare(vae, opt)
    raw = acc.unwrap_model(vae)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "l1", "l1_character", "perceptual", "lr", "seconds"])
    data = sw.ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 21)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="decoder", disable=not (progress and acc.is_main_process),
               initial=start, total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        idx = range(first, first + per_proc)
        x = _stack([data[i] for i in idx], "pixel_values").to(acc.device)  # (B,3,64,64)
        mask = torch.stack([character_mask(data.panel(i)[0], latent_size=IMAGE_SIZE) for i in idx])  # (B,64,64)
        weight = (1.0 + cfg.character_weight * mask)[:, None].to(acc.device)  # (B,1,64,64)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        gen = _step_generator(cfg.seed, step)
        with torch.no_grad():  # the frozen encoder: a sample of the posterior, as the UNet's latents are
            post = raw.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(x.device)  # (B,4,16,16)
        rec = raw.decode(z).sample
        err = rec - x
        l1 = (weight * err.abs()).mean() / weight.mean()
        loss = l1 + (weight * err.pow(2)).mean() / weight.mean()
        perc = perceptual_loss(perceiver, rec, x) if perceiver is not None else torch.zeros(())
        loss = loss + cfg.perceptual_weight * perc
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            l1c = float((err.detach().abs().mean(1, keepdim=True) * mask[:, None]).sum() / (mask.sum() + 1e-8))
            log.write(dict(step=step + 1, loss=loss.item(), l1=float(err.detach().abs().mean()), l1_character=l1c,
                           perceptual=perc.item(), lr=_lr_at(step, cfg), seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            _save_checkpoint(stage_dir / "checkpoint", step + 1, raw, opt)
    vae = raw.eval().requires_grad_(False)
    if acc.is_main_process:
        _save_checkpoint(stage_dir / "checkpoint", cfg.steps, vae, opt)
        vae.save_pretrained(stage_dir / "final")  # same config, same scaling_factor as stage 1
    return vae


# ----------------------------------------------------------------------------------------------------
# Quick checks of a trained pipeline (prompt following, CSA on / off), scored by the recognizer
# ----------------------------------------------------------------------------------------------------
def _generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float) -> np.ndarray:
    """uint8 (B, 64, 64, 3): one image per prompt, image i from torch.Generator().manual_seed(seeds[i])."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    out = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
               output_type="np").images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


@torch.no_grad()
def prompt_following(pipe, recognizer, n: int = 120, steps: int = 25, guidance: float = 5.0, seed: int = 0,
                     batch: int = 8) -> dict[str, float]:
    """Accuracy of every label on images generated from prompts that state every attribute."""
    return prompt_following_scores(pipe, {"main": recognizer}, n, steps, guidance, seed, batch)["accuracy"]["main"]


@torch.no_grad()
def prompt_following_scores(pipe, recognizers: dict, n: int = 120, steps: int = 25, guidance: float = 5.0,
                            seed: int = 0, batch: int = 8) -> dict:
    """Prompt following read by several scorers at once, to see how much of a miss is the scorer's.

    Returns {"accuracy": {scorer: {label: fraction}}} and, with two or more scorers (the first two are compared):
    "agreement" {label: fraction of images where both give the same value} and "accuracy_where_agreed"
    {label: accuracy on those images only}, a reading less blurred by one scorer's mistakes.
    """
    rng = np.random.default_rng([seed, 31])
    panels = [sw.sample_panel(rng) for _ in range(n)]
    preds = {name: {a: [] for a in sw.ATTRIBUTES} for name in recognizers}
    for i in range(0, n, batch):
        chunk = panels[i : i + batch]
        imgs = _generate(pipe, [sw.caption(p) for p in chunk], [seed * 100003 + i + j for j in range(len(chunk))],
                         steps, guidance)
        for name, rec in recognizers.items():
            pred = rec.predict(imgs)
            for a in sw.ATTRIBUTES:
                preds[name][a] += [int(v) for v in pred[a]]
    truth = {a: np.array([sw.labels(p)[a] for p in panels]) for a in sw.ATTRIBUTES}
    pred = {name: {a: np.array(v) for a, v in d.items()} for name, d in preds.items()}
    out = {"accuracy": {name: {a: float(np.mean(d[a] == truth[a])) for a in sw.ATTRIBUTES} for name, d in pred.items()}}
    if len(recognizers) >= 2:
        first, second = (pred[name] for name in list(recognizers)[:2])
        same = {a: first[a] == second[a] for a in sw.ATTRIBUTES}
        out["agreement"] = {a: float(same[a].mean()) for a in sw.ATTRIBUTES}
        out["accuracy_where_agreed"] = {a: float(np.mean(first[a][same[a]] == truth[a][same[a]])) if same[a].any()
                                        else float("nan") for a in sw.ATTRIBUTES}
    return out


@torch.no_grad()
def vae_check(vae, recognizer, n: int = 128, seed: int = 0) -> dict:
    """Mean |x - D(E(x))| on held-out renders, and the recognizer's accuracy on the renders vs reconstructions."""
    data = sw.ImageDataset(n, seed=seed + 4242)
    x = torch.stack([data[i]["pixel_values"] for i in range(n)])
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 32]).latent_dist.mean).sample for i in range(0, n, 32)])
    truth = {k: torch.tensor([data[i]["labels"][k] for i in range(n)]) for k in sw.ATTRIBUTES}
    p_orig, p_rec = recognizer.predict(sw.to_uint8(x)), recognizer.predict(sw.to_uint8(rec))
    return {"l1": float((rec.clamp(-1, 1) - x).abs().mean()),
            "accuracy_renders": {k: float((p_orig[k] == truth[k]).float().mean()) for k in truth},
            "accuracy_reconstructions": {k: float((p_rec[k] == truth[k]).float().mean()) for k in truth}}


def _story_panels(rng: np.random.Generator, k: int) -> list:
    ch = sw.sample_character(rng)
    scenes = [sw.SCENES[j] for j in rng.permutation(len(sw.SCENES))[:k]]
    return [sw.sample_panel(rng, ch, scene=s) for s in scenes]


@torch.no_grad()
def csa_check(pipe, recognizer, stories: int = 32, k: int = 4, steps: int = 25, guidance: float = 5.0,
              seed: int = 0, settings: dict | None = None, verbose: bool = False) -> dict[str, dict[str, float]]:
    """Identity agreement and scene accuracy of k-panel stories whose prompts leave the identity unsaid.

    `settings`: name -> None (plain attention) or kwargs of `install_consistent_attention` (guidance halves
    on, tile k); names ending in "shared" use one seed for all panels, the others independent noise.
    Identity agreement = fraction of panel pairs whose predicted attribute agrees, per identity attribute.
    """
    from .attention import install_consistent_attention

    settings = settings or {"none": None, "csa": dict(rate=0.5, layers="all")}
    rng = np.random.default_rng([seed, 41])
    story_panels = [_story_panels(rng, k) for _ in range(stories)]
    results = {}
    for name, kwargs in settings.items():
        handle = None
        if kwargs is not None:
            handle = install_consistent_attention(pipe.unet, tile=k, stride=k, guidance_halves=True,
                                                  seed=seed, **kwargs)
        agree = {a: [] for a in sw.IDENTITY_ATTRIBUTES}
        scene = []
        try:
            for s, panels in enumerate(story_panels):
                prompts = [sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES) for p in panels]
                seeds = [seed * 7919 + s * k] * k if name.endswith("shared") else [seed * 7919 + s * k + j
                                                                                      for j in range(k)]
                pred = recognizer.predict(_generate(pipe, prompts, seeds, steps, guidance))
                for a in sw.IDENTITY_ATTRIBUTES:
                    v = pred[a].tolist()
                    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
                    agree[a].append(np.mean([v[i] == v[j] for i, j in pairs]))
                truth = [sw.labels(p)["scene"] for p in panels]
                scene += [int(pred["scene"][j]) == truth[j] for j in range(k)]
        finally:
            if handle is not None:
                handle.remove()
        row = {f"agree_{a}": float(np.mean(v)) for a, v in agree.items()}
        row["identity_agreement"] = float(np.mean([row[f"agree_{a}"] for a in sw.IDENTITY_ATTRIBUTES]))
        row["scene_accuracy"] = float(np.mean(scene))
        results[name] = row
        if verbose:
            print(name, json.dumps(row), flush=True)
    return results


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m sdlite.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("world", choices=["storyworld"], help="the world to train (only storyworld)")
    ap.add_argument("--stage", choices=[*STAGES, "all", "export", "check"], default="all",
                    help="check: score the pipeline in --export (default data/storyworld) with the recognizer")
    ap.add_argument("--prompts", type=int, default=120, help="check: prompts for prompt following")
    ap.add_argument("--stories", type=int, default=32, help="check: 4-panel stories for the CSA check")
    ap.add_argument("--guidance", type=float, default=5.0, help="check: classifier-free guidance scale")
    ap.add_argument("--recognizer", default=None, help="check: recognizer file (default: the shipped one)")
    ap.add_argument("--rates", default=None, help="check: only sweep these CSA rates, e.g. 0.3,0.7,1.0")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs), e.g. runs/storyworld")
    ap.add_argument("--export", default=None, help="pipeline folder to write at the end, e.g. data/storyworld")
    ap.add_argument("--force", action="store_true", help="allow --export to replace an existing folder")
    ap.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint")
    ap.add_argument("--size", default="base", choices=["base", "tiny"])
    ap.add_argument("--steps", type=int, default=None, help="override the steps of the stage(s) trained")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="cool the learning rate down linearly to 0 over the last N steps of the stage(s) trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="unet: stop (with a checkpoint) after this time")
    ap.add_argument("--export-every", type=int, default=0, help="unet: also export the pipeline every N steps")
    ap.add_argument("--character-weight", type=float, default=None)
    ap.add_argument("--perceptual-weight", type=float, default=None,
                    help="decoder: weight of the perceptual (recognizer) loss")
    ap.add_argument("--perceptual-recognizer", default=None,
                    help="decoder: the perceptual loss's recognizer (default data/perceptual_recognizer.safetensors)")
    ap.add_argument("--group-fraction", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (e.g. 2 on a laptop)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def stage_config(stage: str, args: argparse.Namespace) -> TrainConfig:
    """The stage's shipped config with the command line's overrides (an option left out keeps the default; an
    explicit 0, e.g. `--group-fraction 0` for a model trained without collages, is honoured)."""
    cfg = default_config(stage)
    cfg.seed = args.seed
    for name in ("steps", "batch_size", "decay_steps", "character_weight", "group_fraction", "perceptual_weight",
                 "perceptual_recognizer"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.export_every:
        cfg.export_every = args.export_every
    if cfg.perceptual_weight < 0:
        raise ValueError(f"--perceptual-weight {cfg.perceptual_weight}: use 0 (off) or a positive weight")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.decay_steps < 0 or not 0 <= cfg.group_fraction <= 1:
        raise ValueError(f"bad {stage} config: --steps and --batch-size must be >= 1, --decay-steps >= 0, "
                         f"--group-fraction in [0, 1] (got {cfg.steps}, {cfg.batch_size}, {cfg.decay_steps}, "
                         f"{cfg.group_fraction})")
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "check":
        return _check_main(args)
    if args.export and Path(args.export).exists() and not args.force:
        raise FileExistsError(f"{args.export} exists: pass --force to replace it (or choose another --export)")
    out = Path(args.out)
    sizes = StoryworldSizes.named(args.size)
    tokenizer = build_storyworld_tokenizer()
    stages = STAGES if args.stage == "all" else (() if args.stage == "export" else (args.stage,))
    for stage in stages:
        cfg = stage_config(stage, args)
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if stage == "vae":
            train_vae(out, sizes, cfg, args.resume, progress=not args.quiet)
        elif stage == "clip":
            train_clip(out, sizes, cfg, tokenizer, args.resume, progress=not args.quiet)
        elif stage == "unet":
            train_unet(out, sizes, cfg, tokenizer, args.resume, progress=not args.quiet, export=args.export,
                       max_minutes=args.max_minutes)
        else:
            train_vae_decoder(out, cfg, args.resume, progress=not args.quiet)
    if args.stage in ("export", "decoder", "all") and args.export:
        state, step = latest_unet_weights(out)
        _export(out, state, sizes, tokenizer, args.export, note=f"step {step}")
    return 0


def latest_unet_weights(out: str | os.PathLike) -> tuple[dict, int]:
    """The UNet's EMA weights and step: from `<out>/unet/final`, or from the last checkpoint when it is newer
    (a run stopped by hand between checkpoints can still be exported)."""
    stage = Path(out) / "unet"
    final = stage / "final" / "diffusion_pytorch_model.safetensors"
    ckpt = stage / "checkpoint"

    def step_of(path: Path) -> int:
        return json.loads(path.read_text())["step"] if path.is_file() else -1

    final_step, ckpt_step = step_of(stage / "final" / "state.json"), step_of(ckpt / "state.json")
    if ckpt_step > final_step and (ckpt / "ema.safetensors").is_file():
        return load_file(str(ckpt / "ema.safetensors")), ckpt_step
    if final.is_file():
        return load_file(str(final)), final_step
    raise FileNotFoundError(f"{final} is missing: train the UNet first (--stage unet), then export")


def _check_main(args) -> int:
    from .models import load_storyworld
    from .recognizer import load_recognizer

    pipe = load_storyworld(folder=args.export)
    rec = load_recognizer(args.recognizer)
    t0 = time.time()
    if args.rates:  # a sweep of CSA sampling rates only (all self-attention layers, disjoint tiles of 4)
        rates = [float(r) for r in args.rates.split(",")]
        settings = {f"csa_rate{r:g}": dict(rate=r, layers="all") for r in rates}
        res = {"csa": csa_check(pipe, rec, stories=args.stories, guidance=args.guidance, seed=args.seed,
                                settings=settings, verbose=True),
               "command": "python -m sdlite.train " + " ".join(sys.argv[1:]), "seconds": time.time() - t0}
        path = Path(args.out) / "check_rates.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        return 0
    res = {"vae": vae_check(pipe.vae, rec, seed=args.seed)}
    print(json.dumps(res, indent=1), flush=True)
    res["prompt_following"] = prompt_following(pipe, rec, n=args.prompts, guidance=args.guidance, seed=args.seed)
    print(json.dumps(res, indent=1), flush=True)
    settings = {"none": None, "csa": dict(rate=0.5, layers="all"), "csa_up": dict(rate=0.5, layers="up"),
                "none_shared": None, "csa_shared": dict(rate=0.5, layers="all")}
    res["csa"] = csa_check(pipe, rec, stories=args.stories, guidance=args.guidance, seed=args.seed,
                           settings=settings, verbose=True)
    res["command"] = "python -m sdlite.train " + " ".join(sys.argv[1:])
    res["seconds"] = time.time() - t0
    print(json.dumps(res, indent=1))
    path = Path(args.out) / "check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
