"""Where does the polish lose its PSNR, and can it be won back? (issue #14; `sdlite.frame_polish`)

The polished frames keep the character (frame identity 0.83) but follow the true frames less closely than (d) (PSNR
-4.3 dB, results/motion.json). Two ways to win the PSNR back, measured on the polish's tuning clips (`TUNING_SEED`,
not the evaluation's), with the same (d) latents and noise for every row:

    keep_structure    ILVR (Choi et al. 2021): after every denoising step the coarse part of the latents
                      (`low_pass(z, N)`, averages over N x N latent cells) is replaced by (d)'s latents noised to the
                      same level, so the image model redraws detail only and cannot move what the decoder placed
                      (`polish_latents(..., keep_structure=N)`).
    composite         the polished frame inside a mask, (d)'s outside: with the true character mask of each frame
                      (an oracle no user has, dilated by D pixels), and with a mask a user has, the pixels where the
                      two keyframes differ (both places of the character), dilated by D.

If the loss were the background being redrawn, the composites would win it back; if it is the character drawn
somewhere else or in another pose, nothing but a better motion model will.

    python docs/lab/polish_psnr.py --out results/polish_psnr.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlite.eval.transitions import POLISH_STRENGTHS, TUNING_SEED
from sdlite.eval.video_metrics import video_metrics
from sdlite.frame_polish import STORYWORLD_POLISH_STRENGTH, polish_latents
from sdlite.pipeline import load_pipeline
from sdlite.storyworld.datasets import ClipDataset, character_mask
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.video import decode_latents, load_video_models, transition_latents

# (strength, keep_structure): strength 0 is (d) alone; keep_structure 0 is the plain polish
POLISHES = ((0.0, 0),) + tuple((s, 0) for s in POLISH_STRENGTHS) + (
    (0.5, 2), (0.5, 4), (0.7, 4), (0.7, 8), (1.0, 8), (1.0, 16))
DILATIONS = {"true_mask": (0, 2, 4), "keyframe_difference": (2, 6)}  # pixels


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """(N, 1, H, W) in {0, 1} -> grown by `pixels` in every direction."""
    return F.max_pool2d(mask, 2 * pixels + 1, 1, pixels) if pixels else mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--seed", type=int, default=TUNING_SEED)
    ap.add_argument("--steps", type=int, default=8, help="the decoder's sampling steps (the evaluation's 8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models, pipe, recognizer = load_video_models(), load_pipeline(), load_recognizer()
    data = ClipDataset(args.clips, frames=16, seed=args.seed)
    per: dict[str, dict[str, list]] = {}
    t0 = time.time()

    def measure(name, video, x, true_e):
        metrics = video_metrics(video, x, models.embedder, true_e, recognizer)
        for k in ("psnr", "identity_agreement"):
            per.setdefault(name, {}).setdefault(k, []).append(metrics[k])

    with torch.no_grad():
        for first in range(0, args.clips, 10):  # the evaluation's batches and seeds
            ids = range(first, min(args.clips, first + 10))
            items = [data[i] for i in ids]
            x = torch.stack([it["frames"] for it in items])  # (B, L, 3, H, W)
            b, frames = x.shape[:2]
            prompts = [it["caption"] for it in items]
            true_e = models.embedder(x.reshape(-1, *x.shape[2:])).reshape(b, frames, -1)
            seed = args.seed + first
            z = transition_latents(models, x[:, 0], x[:, -1], frames, prompts, "full", args.steps, seed)
            videos = {}
            for strength, factor in POLISHES:
                videos[(strength, factor)] = decode_latents(
                    models.vae, polish_latents(pipe, z, prompts, strength, seed=seed, keep_structure=factor))
                measure(f"polish {strength:g}, keep_structure {factor}", videos[(strength, factor)], x, true_e)
            d, polished = videos[(0.0, 0)], videos[(STORYWORLD_POLISH_STRENGTH, 0)]
            true_mask = torch.stack([torch.stack([character_mask(p, latent_size=x.shape[-1]) for p in data.panels(i)[0]])
                                     for i in ids])[:, :, None]  # (B, L, 1, H, W), pixels
            moved = ((x[:, 0] - x[:, -1]).abs().sum(1, keepdim=True) > 0.25).float()  # (B, 1, H, W)
            for kind, dilations in DILATIONS.items():
                for px in dilations:
                    m = (dilate(true_mask.flatten(0, 1), px).view_as(true_mask) if kind == "true_mask"
                         else dilate(moved, px)[:, None])
                    measure(f"composite, {kind} + {px} px", m * polished + (1 - m) * d, x, true_e)
            print(f"{first + b}/{args.clips} clips ({time.time() - t0:.0f} s)", flush=True)
    rows = {name: {k: round(float(torch.cat(v).mean()), 4) for k, v in m.items()} for name, m in per.items()}
    result = {"command": "python docs/lab/polish_psnr.py" + (f" --out {args.out}" if args.out else ""),
              "n_clips": args.clips, "seed": args.seed, "decoder_steps": args.steps,
              "composite_polish_strength": STORYWORLD_POLISH_STRENGTH, "rows": rows,
              "seconds": round(time.time() - t0, 1)}
    for name, row in rows.items():
        print(f"{name:45s} {row}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
