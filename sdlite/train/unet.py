"""Collage pre-training through attention: the storyworld UNet stage.

CSA at inference lets the images of a story attend to each other; it can only transfer identity if the model's
self-attention has learned to copy appearance between corresponding regions of *different* images. Inside one
image, convolutions can do any copying, so a model trained on single images never learns it. Here every batch mixes

- groups of K panels of one character (different scenes/actions) denoised with *full joint self-attention
  across the group* (`sdlite.attention`, rate 1 or 0.5, disjoint tiles of K): only attention can carry the
  character from one panel to another. In half the groups the identity words appear in one caption only
  (`identity_in_one_caption`), in the others each caption drops them with probability 1/2: both reward copying;
- ordinary single images (plain attention).

The loss is min-SNR weighted (diffusers' `compute_snr`) and weighted up on the character's pixels (where the
identity is); the exported weights are an exponential moving average (diffusers' `EMAModel`). The telling sign that
the model uses attention to copy: the group loss falls *below* the single-image loss, and the probe loss of the same
group batch with joint attention falls below the probe loss with the joint attention switched off (columns `group`,
`single`, `probe_joint`, `probe_plain` of the log).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm

from ..attention import install_consistent_attention
from ..seeds import step_generator
from ..storyworld.datasets import CollageDataset, ImageDataset, character_mask
from ..storyworld.models import StoryworldSizes, build_scheduler, build_unet, storyworld_tokenizers, text_encoders_from_clip
from .loop import CsvLog, accelerator, save_checkpoint, set_lr, start_run
from .storyworld import TrainConfig, export_pipeline


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
        self.one = CollageDataset(total, k=cfg.k, seed=seed + 10, identity_in_one_caption=True)
        self.drop = CollageDataset(total, k=cfg.k, seed=seed + 11, drop_prob=0.5)
        self.single = ImageDataset(max(1, steps * max(self.singles, 1)), seed=seed + 12, drop_prob=0.5)

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
            s = {"pixel_values": torch.stack([it["pixel_values"] for it in singles]), "captions": [it["caption"] for it in singles],
                 "mask": torch.stack([it["mask"] for it in singles])}
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
             timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             sample_weight: torch.Tensor | None = None, cell_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Min-SNR-weighted epsilon MSE, weighted 1 + character_weight on the character's latent cells, plus
        `cell_weight` (n, h, w) where given (e.g. more on the hair), and per image by `sample_weight`, (n,)."""
        n = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, len(self.alphas_cumprod), (n,), generator=gen)
        if noise is None:
            noise = torch.randn(latents.shape, generator=gen)
        timesteps, noise = timesteps.to(self.device), noise.to(self.device)
        a = self.alphas_cumprod[timesteps].view(n, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        pred = unet(noisy, timesteps, text, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = compute_snr(self.scheduler, timesteps)  # alpha_t / (1 - alpha_t), (n,)
        snr_w = torch.clamp(snr, max=self.cfg.min_snr_gamma) / snr  # (n,)
        pix_w = 1.0 + self.cfg.character_weight * mask.to(self.device)[:, None]  # (n,1,16,16)
        if cell_weight is not None:
            pix_w = pix_w + cell_weight.to(self.device)[:, None]
        per = ((pred.float() - noise) ** 2 * pix_w).mean(dim=(1, 2, 3)) / pix_w.mean(dim=(1, 2, 3))
        if sample_weight is not None:
            snr_w = snr_w * sample_weight.to(snr_w)
        return (per * snr_w).mean()


def _frozen_parts(out: Path, tokenizer):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    vae = AutoencoderKL.from_pretrained(out / "vae" / "final").eval().requires_grad_(False)
    clip = CLIPModel.from_pretrained(out / "clip" / "final").eval()
    te1, te2 = text_encoders_from_clip(clip)
    tok2 = storyworld_tokenizers(tokenizer)[1]
    return vae, clip, te1, te2, tok2


def _ema_weights(unet, ema: EMAModel) -> dict[str, torch.Tensor]:
    """The moving average as a state dict of the UNet (it has parameters only, no buffers)."""
    return {name: shadow for (name, _), shadow in zip(unet.named_parameters(), ema.shadow_params)}


def train_unet(out: str | os.PathLike, sizes: StoryworldSizes, cfg: TrainConfig, tokenizer, resume: bool = False,
               progress: bool = True, export: str | os.PathLike | None = None, max_minutes: float | None = None,
               command: str = ""):
    """Collage pre-training through attention (see the module doc). Needs `<out>/vae/final`, `<out>/clip/final`.

    Writes `<out>/unet/final` (the EMA weights, save_pretrained) and, with `export`, the pipeline folder
    (also every `cfg.export_every` steps). `max_minutes` stops early (with a checkpoint) after that wall time.
    """
    out = Path(out)
    stage_dir = out / "unet"
    acc = accelerator()
    vae, clip, te1, te2, tok2 = _frozen_parts(out, tokenizer)
    vae, te1, te2 = vae.to(acc.device), te1.to(acc.device), te2.to(acc.device)
    unet = build_unet(sizes, seed=cfg.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ckpt = start_run(stage_dir, resume, unet, opt)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)  # decay min(ema_decay, (1 + s) / (10 + s)) at step s
    if "ema" in ckpt.tensors:
        names = [name for name, _ in unet.named_parameters()]
        ema.shadow_params = [ckpt.tensors["ema"][name].clone() for name in names]
        ema.optimization_step = ckpt.step
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
    running = {"group": 0.0, "single": 0.0, "n": 0}
    bar = tqdm(range(ckpt.step, cfg.steps), desc="unet", disable=not (progress and acc.is_main_process),
               initial=ckpt.step, total=cfg.steps)
    step = ckpt.step
    for step in bar:
        rate, loss, lg, ls = _unet_step(unet, raw, handle, trainer, data, opt, acc, cfg, step)
        ema.step(raw.parameters())
        running["group"] += lg
        running["single"] += ls
        running["n"] += 1
        bar.set_postfix(group=f"{lg:.4f}", single=f"{ls:.4f}")
        last = step + 1 == cfg.steps or (max_minutes is not None and time.time() - t0 > 60 * max_minutes)
        if (step + 1) % cfg.log_every == 0 or last:
            pj, pp = _probe_losses(trainer, raw, handle, probe)
            log.write(dict(step=step + 1, loss=loss, group=running["group"] / running["n"],
                           single=running["single"] / running["n"], probe_joint=pj, probe_plain=pp, rate=rate,
                           lr=cfg.lr_at(step), seconds=time.time() - t0))
            running = {"group": 0.0, "single": 0.0, "n": 0}
        if acc.is_main_process and ((step + 1) % cfg.ckpt_every == 0 or last):
            save_checkpoint(stage_dir / "checkpoint", step + 1, raw, opt, tensors={"ema": _ema_weights(raw, ema)})
        if acc.is_main_process and export and cfg.export_every and (step + 1) % cfg.export_every == 0 and not last:
            export_pipeline(out, _ema_weights(raw, ema), sizes, tokenizer, export, clip=clip,
                            note=f"intermediate, step {step + 1}", command=command)
        if last:
            break
    handle.remove()
    final = build_unet(sizes)
    final.load_state_dict(_ema_weights(raw, ema))
    if acc.is_main_process:
        final.save_pretrained(stage_dir / "final")
        (stage_dir / "final" / "state.json").write_text(json.dumps({"step": step + 1}))
        if export:
            export_pipeline(out, final.state_dict(), sizes, tokenizer, export, clip=clip, note=f"step {step + 1}",
                            command=command)
    return final


def _unet_step(unet, raw, handle, trainer: UnetTrainer, data: UnetBatches, opt, acc, cfg: TrainConfig,
               step: int) -> tuple[float, float, float, float]:
    """One optimizer step: the groups with joint attention (this step's rate), the singles with plain attention.
    Returns (rate, loss, group loss, single loss)."""
    gen = step_generator(cfg.seed, step, 0)
    rate = cfg.group_rates[step % len(cfg.group_rates)]
    for p in handle.processors.values():
        p.rate = rate
    handle.reseed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
    set_lr(opt, cfg.lr_at(step))
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
    return rate, loss.item(), lg.item(), ls.item()


def _probe_batch(trainer: UnetTrainer, cfg: TrainConfig, groups: int = 8) -> dict:
    """A fixed batch of groups whose identity words are in one caption only, with fixed noise and timesteps."""
    ds = CollageDataset(groups, k=cfg.k, seed=cfg.seed + 777, identity_in_one_caption=True)
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
