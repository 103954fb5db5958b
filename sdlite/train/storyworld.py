"""Training storyworld's models from scratch: VAE, CLIP, then the SDXL-style UNet by collage pre-training.

    python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld --force

Every loop is an `accelerate` loop (one CPU here, several GPUs elsewhere) built from `sdlite.train.loop`: seeded,
resumable (`--resume` picks up the last checkpoint of the stage), logging its losses to `<out>/<stage>/log.csv`.
Data item i is a pure function of (seed, i) (`sdlite.storyworld.datasets`), and the noise of step s is drawn from a
generator seeded with (seed, s), so a resumed run sees exactly the batches an uninterrupted run would have seen.

The UNet stage, collage pre-training through attention, is `sdlite.train.unet`. Stage 4 fine-tunes the VAE's
decoder on the character's pixels; `export_pipeline` assembles the stages into a `StableDiffusionXLPipeline` folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm.auto import tqdm

from ..paths import data_dir
from ..seeds import step_generator
from ..storyworld.datasets import ImageDataset, character_mask
from ..storyworld.models import (
    IMAGE_SIZE, StoryworldSizes, assemble_pipeline, build_clip, build_unet, build_vae, count_parameters, save_pipeline,
)
from .loop import CsvLog, accelerator, save_checkpoint, set_lr, start_run, warmup_hold_cooldown

STAGES = ("vae", "clip", "unet", "decoder")
# What `make train-storyworld` runs: every shipped checkpoint from scratch (about 2.8 h on a quiet 2-core CPU).
RECIPE_COMMAND = ("python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld "
                  "--force --threads 1")


@dataclass(frozen=True)
class TrainConfig:
    """One stage's hyper-parameters (validated; named presets in `TrainConfig.preset(stage)`, variants with
    `dataclasses.replace`). `steps` counts optimizer steps of `batch_size` images."""

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

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.decay_steps < 0 or not 0 <= self.group_fraction <= 1:
            raise ValueError(f"steps and batch_size must be >= 1, decay_steps >= 0, group_fraction in [0, 1] (got "
                             f"{self.steps}, {self.batch_size}, {self.decay_steps}, {self.group_fraction})")
        if self.perceptual_weight < 0:
            raise ValueError(f"perceptual_weight={self.perceptual_weight}: use 0 (off) or a positive weight")
        if self.lr <= 0 or self.warmup < 0:
            raise ValueError(f"lr={self.lr} must be > 0 and warmup={self.warmup} >= 0")

    @classmethod
    def preset(cls, stage: str) -> TrainConfig:
        """The shipped recipe of a stage (see `default_config`)."""
        return default_config(stage)

    def lr_at(self, step: int) -> float:
        """Warm-up, hold, and (with `decay_steps`) a linear cool-down to 0 at the last step."""
        return self.lr * warmup_hold_cooldown(step, self.steps, self.warmup, self.decay_steps)


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
# Stage 1: the VAE
# ----------------------------------------------------------------------------------------------------
def train_vae(out: str | os.PathLike, sizes: StoryworldSizes, cfg: TrainConfig, resume: bool = False,
              progress: bool = True):
    """AutoencoderKL on storyworld renders: L1 + MSE reconstruction + a tiny KL (1e-6), as LDM autoencoders.

    Writes `<out>/vae/final` (save_pretrained, with `scaling_factor` = 1 / std of the latents).
    """
    stage_dir = Path(out) / "vae"
    acc = accelerator()
    vae = build_vae(sizes, seed=cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = start_run(stage_dir, resume, vae, opt).step
    vae, opt = acc.prepare(vae, opt)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "l1", "kl", "lr", "seconds"])
    data = ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 1)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="vae", disable=not (progress and acc.is_main_process), initial=start,
               total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        x = torch.stack([data[i]["pixel_values"] for i in range(first, first + per_proc)]).to(acc.device)  # (B,3,64,64)
        set_lr(opt, cfg.lr_at(step))
        gen = step_generator(cfg.seed, step, 0)
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
            log.write(dict(step=step + 1, loss=loss.item(), l1=l1.item(), kl=kl.item(), lr=cfg.lr_at(step),
                           seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            save_checkpoint(stage_dir / "checkpoint", step + 1, acc.unwrap_model(vae), opt)
    vae = acc.unwrap_model(vae).eval()
    if acc.is_main_process:
        save_checkpoint(stage_dir / "checkpoint", cfg.steps, vae, opt)
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
    data = ImageDataset(n, seed=seed)
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
    acc = accelerator()
    clip = build_clip(sizes, tokenizer, seed=cfg.seed)
    opt = torch.optim.AdamW(clip.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = start_run(stage_dir, resume, clip, opt).step
    clip, opt = acc.prepare(clip, opt)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "accuracy", "lr", "seconds"])
    data = ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 2, drop_prob=0.3)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="clip", disable=not (progress and acc.is_main_process), initial=start,
               total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        items = [data[i] for i in range(first, first + per_proc)]
        x = torch.stack([it["pixel_values"] for it in items]).to(acc.device)  # (B,3,64,64) in [-1,1]
        ids = tokenizer([it["caption"] for it in items], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(acc.device)
        set_lr(opt, cfg.lr_at(step))
        res = clip(input_ids=ids, pixel_values=x, return_loss=True)
        opt.zero_grad(set_to_none=True)
        acc.backward(res.loss)
        opt.step()
        with torch.no_grad():  # CLIP can only be trusted up to 100: keep logit_scale <= ln 100
            acc.unwrap_model(clip).logit_scale.clamp_(0, math.log(100))
        acc_i2t = (res.logits_per_image.argmax(1) == torch.arange(len(items), device=x.device)).float().mean()
        bar.set_postfix(loss=f"{res.loss.item():.3f}")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            log.write(dict(step=step + 1, loss=res.loss.item(), accuracy=acc_i2t.item(), lr=cfg.lr_at(step),
                           seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            save_checkpoint(stage_dir / "checkpoint", step + 1, acc.unwrap_model(clip), opt)
    clip = acc.unwrap_model(clip).eval()
    if acc.is_main_process:
        save_checkpoint(stage_dir / "checkpoint", cfg.steps, clip, opt)
        clip.save_pretrained(stage_dir / "final")
    return clip


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
    from ..storyworld.recognizer import load_recognizer

    path = Path(cfg.perceptual_recognizer)
    path = path if path.is_file() or path.parent != Path(".") else data_dir() / path
    if not path.is_file():
        raise FileNotFoundError(f"perceptual_weight={cfg.perceptual_weight} needs the recognizer {path}: train it "
                                "with `python -m sdlite.train recognizer --seed 2 --out data/perceptual_recognizer"
                                ".safetensors` (not a scorer: a recognizer of its own seed and renders)")
    return load_recognizer(path).to(device).requires_grad_(False).eval()


def train_vae_decoder(out: str | os.PathLike, cfg: TrainConfig, resume: bool = False, progress: bool = True):
    """Fine-tune the VAE's decoder only, with the loss weighted 1 + w on the character's pixels, plus
    `cfg.perceptual_weight` x `perceptual_loss` with a frozen recognizer of its own (not a scorer).

    The stage-1 VAE, trained on crops where sky and grass fill most pixels, blurs the small parts that carry
    identity (hair under a hat, the face that tells a boy from a man). Freezing the encoder keeps the latent
    space (and `scaling_factor`) the UNet was trained in, so this stage can run before or after the UNet,
    exactly as SD's "ft-MSE" VAE fine-tuned only its decoder. Needs `<out>/vae/final`; writes
    `<out>/decoder/final` (a whole `AutoencoderKL`: frozen encoder + tuned decoder), which `export_pipeline` prefers.
    """
    from diffusers import AutoencoderKL

    out = Path(out)
    stage_dir = out / "decoder"
    acc = accelerator()
    perceiver = _perceptual_recognizer(cfg, acc.device) if cfg.perceptual_weight else None  # fails before writing
    vae = AutoencoderKL.from_pretrained(out / "vae" / "final")
    vae.requires_grad_(False)
    tuned = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(tuned, lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = start_run(stage_dir, resume, vae, opt).step
    vae, opt = acc.prepare(vae, opt)
    raw = acc.unwrap_model(vae)
    log = CsvLog(stage_dir / "log.csv", ["step", "loss", "l1", "l1_character", "perceptual", "lr", "seconds"])
    data = ImageDataset(cfg.steps * cfg.batch_size, seed=cfg.seed + 21)
    per_proc = cfg.batch_size // acc.num_processes
    t0 = time.time()
    bar = tqdm(range(start, cfg.steps), desc="decoder", disable=not (progress and acc.is_main_process),
               initial=start, total=cfg.steps)
    for step in bar:
        first = step * cfg.batch_size + acc.process_index * per_proc
        idx = range(first, first + per_proc)
        x = torch.stack([data[i]["pixel_values"] for i in idx]).to(acc.device)  # (B,3,64,64)
        mask = torch.stack([character_mask(data.panel(i)[0], latent_size=IMAGE_SIZE) for i in idx])  # (B,64,64)
        weight = (1.0 + cfg.character_weight * mask)[:, None].to(acc.device)  # (B,1,64,64)
        set_lr(opt, cfg.lr_at(step))
        gen = step_generator(cfg.seed, step, 0)
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
                           perceptual=perc.item(), lr=cfg.lr_at(step), seconds=time.time() - t0))
        if (step + 1) % cfg.ckpt_every == 0 and acc.is_main_process:
            save_checkpoint(stage_dir / "checkpoint", step + 1, raw, opt)
    vae = raw.eval().requires_grad_(False)
    if acc.is_main_process:
        save_checkpoint(stage_dir / "checkpoint", cfg.steps, vae, opt)
        vae.save_pretrained(stage_dir / "final")  # same config, same scaling_factor as stage 1
    return vae


# ----------------------------------------------------------------------------------------------------
# Export and the whole recipe
# ----------------------------------------------------------------------------------------------------
def export_pipeline(out: Path, unet_state: dict, sizes, tokenizer, folder, vae=None, clip=None, note: str = "",
                    command: str = "") -> Path:
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
    meta = {"command": command,
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

def stage_config(stage: str, **overrides) -> TrainConfig:
    """The stage's shipped config with some fields replaced (a field given as None keeps the preset; an explicit 0,
    e.g. `group_fraction=0` for a model trained without collages, is honoured). Validated."""
    return dataclasses.replace(default_config(stage), **{k: v for k, v in overrides.items() if v is not None})
