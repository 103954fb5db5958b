"""Several draws of (d), averaged: what does the decoder's own randomness cost the frames? (issue #14)

(d) draws its in-between frames from noise, once. Drawn K times with K noise seeds (`candidate_seeds`, as the
reference mode's draws), the frames differ where the decoder is unsure: a shirt's colour, a hat, the hair. Their
mean is an estimate of the frames' expected value (the decoder's posterior mean), which squared error prefers. Two
places to take the mean: the latents (one VAE decode) or the decoded frames (K decodes). Next to them, the draw
kept per clip whose in-between frames' ID embeddings (storyworld's ID encoder, `sdlite.id_selection`) are closest
to the keyframes': the reference mode's choice, transposed to clips. Clips of another seed than the evaluation's
(777); 4242 is the polish's tuning seed.

    python docs/lab/transition_draws.py --clips 20 --seed 4242 --out results/transition_draws_4242.json
    python docs/lab/transition_draws.py --clips 40 --seed 9090 --out results/transition_draws_9090.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdlite.eval.video_metrics import paired_difference_ci, video_metrics
from sdlite.id_encoder import load_id_encoder
from sdlite.id_selection import candidate_seeds, id_directions
from sdlite.images import to_uint8
from sdlite.paths import data_dir
from sdlite.storyworld.datasets import ClipDataset
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.video import decode_latents, load_video_models, transition_latents

STEPS = 8  # the evaluation's


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clips", type=int, default=20)
    ap.add_argument("--seed", type=int, default=4242)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    models, recognizer = load_video_models(), load_recognizer()
    encoder = load_id_encoder(data_dir() / "storyworld" / "id_encoder")
    data = ClipDataset(args.clips, frames=16, seed=args.seed)
    items = [data[i] for i in range(args.clips)]
    x = torch.stack([it["frames"] for it in items])  # (B, L, 3, H, W)
    b, frames = x.shape[:2]
    true_e = models.embedder(x.flatten(0, 1)).reshape(b, frames, -1)
    prompts = [it["caption"] for it in items]
    keys = id_directions(encoder, to_uint8(x[:, [0, -1]].flatten(0, 1))).view(b, 2, -1)
    key_dir = F.normalize(keys.mean(1), dim=-1)  # (B, D): each clip's keyframes' direction
    latents, videos, closeness = [], [], []
    for s in candidate_seeds(0, args.draws):  # draw 0 is the evaluation's single draw
        z = transition_latents(models, x[:, 0], x[:, -1], frames, prompts, "full", STEPS, s, pin=True)
        v = decode_latents(models.vae, z)
        d = id_directions(encoder, to_uint8(v[:, 1:-1].flatten(0, 1))).view(b, frames - 2, -1)
        latents.append(z)
        videos.append(v)
        closeness.append((d @ key_dir[..., None])[..., 0].mean(1))  # (B,): mean cosine over the in-between frames

    def measure(video: torch.Tensor) -> dict:
        m = video_metrics(video, x, models.embedder, true_e, recognizer)
        return {"psnr": m["psnr"], "identity_agreement": m["identity_agreement"],
                **{k: m[k] for k in m if k.startswith("identity_") and k != "identity_agreement"}}

    rows = {}
    k = 1
    while k <= args.draws:
        rows[f"mean_of_{k}_latents"] = measure(decode_latents(models.vae, torch.stack(latents[:k]).mean(0)))
        rows[f"mean_of_{k}_frames"] = measure(torch.stack(videos[:k]).mean(0))
        k *= 2
    chosen = torch.stack(closeness).argmax(0)  # (B,)
    rows[f"closest_of_{args.draws}"] = measure(torch.stack(videos)[chosen, torch.arange(b)])
    single = rows["mean_of_1_frames"]
    result = {
        "command": "python docs/lab/transition_draws.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if v is not None),
        "n_clips": args.clips, "seed": args.seed, "steps": STEPS, "draws": args.draws,
        "rows": {name: {k: round(float(v.mean()), 4) for k, v in r.items()} for name, r in rows.items()},
        "vs_single_draw": {name: {k: {q: round(v, 4) if isinstance(v, float) else v
                                      for q, v in paired_difference_ci(r[k], single[k], seed=args.seed).items()}
                                  for k in ("psnr", "identity_agreement")}
                           for name, r in rows.items() if name != "mean_of_1_frames"},
        "seconds": round(time.time() - t0, 1),
    }
    del result["rows"]["mean_of_1_latents"], result["vs_single_draw"]["mean_of_1_latents"]  # = the single draw
    print(json.dumps(result["rows"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
