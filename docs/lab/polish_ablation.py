"""What each part of the polish buys (issue #14; `sdlite.frame_polish`, notebook 06 section 6).

On the evaluation's 100 held-out clips, with its (d) latents and its noise (the same seeds as
`sdlite.eval.transitions.evaluate`, batches of 10), the in-between frames polished at one strength three ways:

    shipped            reading the keyframes (CSA bank), one noise draw per clip
    frames_alone       plain img2img: no keyframe reading, one noise draw per clip
    noise_per_frame    reading the keyframes, a noise draw per frame

The shipped row must equal `full_polished` in results/motion.json (checked when that file used the same strength).

    python docs/lab/polish_ablation.py --out results/polish_ablation.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdlite.eval.transitions import EVAL_SEED, PER_CLIP
from sdlite.eval.video_metrics import IDENTITY_LABELS, paired_difference_ci, video_metrics
from sdlite.frame_polish import STORYWORLD_POLISH_STRENGTH, polish_latents
from sdlite.pipeline import load_pipeline
from sdlite.storyworld.datasets import ClipDataset
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.video import decode_latents, load_video_models, transition_latents

VARIANTS = {"shipped": {}, "frames_alone": {"read_keyframes": False}, "noise_per_frame": {"shared_noise": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--strength", type=float, default=STORYWORLD_POLISH_STRENGTH)
    ap.add_argument("--steps", type=int, default=8, help="the decoder's sampling steps (the evaluation's 8)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    models, pipe, recognizer = load_video_models(), load_pipeline(), load_recognizer()
    data = ClipDataset(args.clips, frames=16, seed=EVAL_SEED)
    per: dict[str, dict[str, list]] = {name: {} for name in VARIANTS}
    t0 = time.time()
    with torch.no_grad():
        for first in range(0, args.clips, 10):
            items = [data[i] for i in range(first, min(args.clips, first + 10))]
            x = torch.stack([it["frames"] for it in items])  # (B, L, 3, H, W)
            prompts = [it["caption"] for it in items]
            true_e = models.embedder(x.reshape(-1, *x.shape[2:])).reshape(len(items), x.shape[1], -1)
            seed = EVAL_SEED + first
            z = transition_latents(models, x[:, 0], x[:, -1], x.shape[1], prompts, "full", args.steps, seed)
            for name, options in VARIANTS.items():
                video = decode_latents(models.vae, polish_latents(pipe, z, prompts, args.strength, seed=seed,
                                                                  **options))
                for k, v in video_metrics(video, x, models.embedder, true_e, recognizer).items():
                    per[name].setdefault(k, []).append(v)
            print(f"{first + len(items)}/{args.clips} clips ({time.time() - t0:.0f} s)", flush=True)
    rows = {}
    for name, metrics in per.items():
        clips = {k: torch.cat(v) for k, v in metrics.items()}
        rows[name] = {"psnr": float(clips["psnr"].mean()),
                      "identity_agreement": float(clips["identity_agreement"].mean()),
                      "identity_per_label": {k: float(clips[f"identity_{k}"].mean()) for k in IDENTITY_LABELS}}
        if name != "shipped":
            rows[name]["vs_shipped"] = {k: paired_difference_ci(clips[k], torch.cat(per["shipped"][k]), seed=EVAL_SEED)
                                        for k in PER_CLIP}
    result = {"command": "python docs/lab/polish_ablation.py" + (f" --out {args.out}" if args.out else ""),
              "n_clips": args.clips, "seed": EVAL_SEED, "strength": args.strength, "decoder_steps": args.steps,
              "rows": rows, "seconds": round(time.time() - t0, 1)}
    motion = Path(__file__).resolve().parents[2] / "results" / "motion.json"
    committed = json.loads(motion.read_text())
    if committed.get("polish", {}).get("strength") == args.strength and committed["n_clips"] == args.clips:
        assert abs(committed["identity_agreement_full_polished"] - rows["shipped"]["identity_agreement"]) < 1e-6, \
            "the shipped row should reproduce results/motion.json's full_polished"
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
