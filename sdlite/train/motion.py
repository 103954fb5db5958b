"""Training the semantic motion predictor (`sdlite.motion`) on storyworld clips.

Clips are rendered once, every frame embedded with the storyworld CLIP (and, for the video decoder, encoded by its
VAE) into a cache folder of safetensors parts; the predictor then regresses the true frame embeddings from the two
keyframes' by MSE.

    python -m sdlite.train motion-cache --clips 3000 --seed 1 --out runs/motion/train_grid4 --latents --grid 4
    python -m sdlite.train motion-predictor --cache runs/motion/train_grid4 --out runs/motion/predictor \
        --export data/motion/predictor
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..motion import STORYWORLD_SIZE, ImageEmbedder, SemanticMotionPredictor, check_frames, predictor_errors
from ..seeds import check_seed, seeded, step_generator
from ..storyworld.datasets import ClipDataset, character_mask
from .loop import CsvLog, accelerator, save_checkpoint, set_lr, start_run, warmup_cosine


def cache_grid(caches: list[dict]) -> int:
    """The one `ImageEmbedder` grid of several loaded caches (they must agree)."""
    grids = {c["grid"] for c in caches}
    if len(grids) > 1:
        raise ValueError(f"the caches were embedded with different grids {sorted(grids)}: use caches of one --grid")
    return grids.pop()


# ----------------------------------------------------------------------------------------------------------
# The cache: storyworld clips rendered once, embedded (and optionally VAE-encoded)
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {"n_clips": int(n_clips), "seed": check_seed(seed), "frames": check_frames(frames),
            "latents": vae is not None}
    if embedder.grid:
        info["grid"] = embedder.grid  # (pooled-only caches leave it out, as they did before grids existed)
    meta_path = folder / "cache.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) != info:
        raise FileExistsError(f"{folder} holds a cache of other settings {json.loads(meta_path.read_text())}: "
                              "choose another folder")
    meta_path.write_text(json.dumps(info))
    dataset = ClipDataset(n_clips, frames=frames, seed=seed)
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
        raise FileNotFoundError(f"{folder} holds no cache parts: build them with `python -m sdlite.train motion-cache "
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


def character_masks(folder: str | os.PathLike, progress: bool = True) -> torch.Tensor:
    """(N, L, h, w) float {0, 1}: for each cached clip and frame, the latent cells that show the character's identity
    attributes (`character_mask`, from the same renders the cache encoded). Computed once (a few CPU minutes for
    3000 clips) and kept in `folder/masks.safetensors`."""
    folder = Path(folder)
    meta = json.loads((folder / "cache.json").read_text())
    path = folder / "masks.safetensors"
    if path.is_file():
        return load_file(str(path))["masks"].float()
    first = load_file(str(sorted(folder.glob("part_*.safetensors"))[0]))
    if "latents" not in first:
        raise ValueError(f"{folder} holds no latents: character masks weigh the decoder's latent loss")
    latent_size = first["latents"].shape[-1]
    dataset = ClipDataset(meta["n_clips"], frames=meta["frames"], seed=meta["seed"])
    t0, masks = time.time(), []
    for i in range(len(dataset)):
        panels, _ = dataset.panels(i)
        masks.append(torch.stack([character_mask(p, size=dataset.size, latent_size=latent_size)
                                  for p in panels]))  # (L, h, w)
        if progress and (i + 1) % 500 == 0:
            print(f"character masks: {i + 1}/{len(dataset)} clips ({time.time() - t0:.0f}s)", flush=True)
    out = torch.stack(masks)  # (N, L, h, w)
    tmp = path.with_suffix(".tmp")
    save_file({"masks": out.to(torch.uint8)}, str(tmp))
    tmp.rename(path)
    return out


# ----------------------------------------------------------------------------------------------------------
# The predictor
# ----------------------------------------------------------------------------------------------------------
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
    seed = check_seed(seed)
    if embeds.ndim != 3 or embeds.shape[1] < 3:
        raise ValueError(f"embeds must be (N, L, D) with L >= 3, got {tuple(embeds.shape)}: build them with "
                         "sdlite.train.motion.build_cache / load_cache")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps={steps} and batch_size={batch_size} must be >= 1")
    if predictor is None:
        size = {k: v for k, v in STORYWORLD_SIZE.items() if k != "embed_dim"}
        predictor = seeded(seed, lambda: SemanticMotionPredictor(embed_dim=embeds.shape[2], image_grid=image_grid,
                                                                  **size))
    if predictor.config.embed_dim != embeds.shape[2]:
        raise ValueError(f"the predictor's embed_dim={predictor.config.embed_dim} differs from the data's "
                         f"{embeds.shape[2]}: build it with SemanticMotionPredictor(embed_dim={embeds.shape[2]})")
    acc = accelerator()
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=weight_decay)
    history = {"step": [], "loss": [], "val_ratio": [], "seconds": []}
    start = start_run(out, resume, predictor, opt) if out is not None else None
    start_step = start.step if start is not None else 0
    history = start.state.get("history", history) if start is not None and start.step else history
    log = CsvLog(Path(out) / "log.csv", ["step", "loss", "val_ratio", "seconds"]) if out is not None else None
    model, opt = acc.prepare(predictor, opt)
    frames = embeds.shape[1]
    t0 = time.time() - (history["seconds"][-1] if history["seconds"] else 0.0)
    model.train()
    end_step = steps if stop_at is None else min(steps, int(stop_at))
    for step in range(start_step, end_step):
        g = step_generator(seed, step)
        idx = torch.randint(len(embeds), (batch_size,), generator=g)
        e = embeds[idx].to(acc.device)  # (b, L, D)
        set_lr(opt, lr * warmup_cosine(step, steps, warmup))
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
            row = dict(step=step + 1, loss=loss.item(), val_ratio=val, seconds=time.time() - t0)
            for k, v in row.items():
                history[k].append(v)
            if progress:
                print(f"step {step + 1}: loss {loss.item():.5f} val_ratio {val:.4f} ({row['seconds']:.0f}s)",
                      flush=True)
            if log is not None:
                log.write(row)
        if out is not None and ((step + 1) % ckpt_every == 0 or step + 1 == end_step):
            save_checkpoint(Path(out) / "checkpoint", step + 1, acc.unwrap_model(model), opt,
                            state={"history": history})
    return acc.unwrap_model(model).eval(), history
