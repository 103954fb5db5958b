"""Why is identity agreement across the frames of a transition low? (README, transitions; issue: bar >= 0.9)

Frame identity agreement (`sdlite.eval.video_metrics.frame_identity_agreement`): per clip, the share of frames whose recognised class word, hair,
shirt, trousers and hat all equal the clip's majority. This script scores, on the evaluation's held-out clips:
the true frames (renders); the true frames through the VAE (encode -> decode: the best any latent-space method can
do with this VAE); the latent cross-fade; and the full system at 8 and 20 sampling steps. Per label too, to see
which label breaks the agreement.

    python docs/lab/identity_ceiling.py results/identity_ceiling.json [n clips (40)] [VAE/storyworld folder]
"""
import json
import sys
import time

import torch

from sdlite import storyworld as sw
from sdlite import video
from sdlite.eval import transitions
from sdlite.eval import video_metrics as vm
from sdlite.storyworld.recognizer import load_recognizer

torch.set_num_threads(1)
out = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 40
storyworld_folder = sys.argv[3] if len(sys.argv) > 3 else None
t0 = time.time()
models = video.load_video_models(storyworld_folder=storyworld_folder)
rec = load_recognizer()
data = sw.ClipDataset(n, frames=16, seed=transitions.EVAL_SEED)
videos: dict[str, list] = {"truth": [], "truth_through_vae": [], "latent_interpolation": [], "full_8_steps": [],
                           "full_20_steps": []}
with torch.no_grad():
    for first in range(0, n, 10):
        items = [data[i] for i in range(first, min(n, first + 10))]
        x = torch.stack([it["frames"] for it in items])  # (B, L, 3, 64, 64)
        b = x.shape[0]
        prompts = [it["caption"] for it in items]
        videos["truth"].append(x)
        z = video.encode_latents(models.vae, x.flatten(0, 1))
        videos["truth_through_vae"].append(video.decode_latents(models.vae, z).view_as(x))
        videos["latent_interpolation"].append(video.latent_interpolation_video(models, x[:, 0], x[:, -1], 16))
        for steps in (8, 20):
            lat = video.transition_latents(models, x[:, 0], x[:, -1], 16, prompts, "full", steps, transitions.EVAL_SEED + first)
            videos[f"full_{steps}_steps"].append(video.decode_latents(models.vae, lat))
rows = {}
for name, chunks in videos.items():
    v = torch.cat(chunks)  # (N, L, 3, 64, 64)
    pred = rec.predict(v.flatten(0, 1))
    labels = {k: pred[k].view(len(v), 16) for k in vm.IDENTITY_LABELS}
    per_label = {k: float(vm.frame_identity_agreement({j: labels[k] for j in vm.IDENTITY_LABELS}).mean())
                 for k in vm.IDENTITY_LABELS}
    rows[name] = {"identity_agreement": float(vm.frame_identity_agreement(labels).mean()), "per_label": per_label}
    print(f"{name:22s} {rows[name]['identity_agreement']:.3f}  " + " ".join(f"{k} {v:.3f}" for k, v in per_label.items()),
          flush=True)
summary = {"command": "python docs/lab/identity_ceiling.py " + " ".join(sys.argv[1:]), "n_clips": n,
           "clips": f"ClipDataset({n}, frames=16, seed=transitions.EVAL_SEED)", "rows": rows,
           "seconds": round(time.time() - t0, 1)}
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
