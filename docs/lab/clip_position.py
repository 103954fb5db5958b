"""How much of a frame's position and pose does the storyworld CLIP image embedding carry? (README, transitions)

    python docs/lab/clip_position.py

For 40 renders, compares the picture with (1) the same picture but the character at another x position and
(2) the same picture but another action/pose, in three readings of the CLIP vision tower:
- pooled: the projected, pooled image embedding (what the motion predictor and the video decoder use);
- patch tokens: the tower's last hidden states of the 8x8 patches, flattened (where things are, patch by patch);
- 2x2 pooled patches: the patch tokens averaged over the four quarters of the image.
Prints the mean cosine distance of each pair.
"""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from sdlite import storyworld as sw
from sdlite.video import load_video_models

torch.set_num_threads(1)
embedder = load_video_models(decoder=False, predictor=False).embedder


@torch.no_grad()
def readings(images: torch.Tensor) -> dict[str, torch.Tensor]:
    out = embedder.vision_model(pixel_values=embedder.preprocess(images))
    patches = out.last_hidden_state[:, 1:]  # (B, P, hidden), P = 8 x 8
    side = int(patches.shape[1] ** 0.5)
    grid = patches.transpose(1, 2).reshape(len(images), -1, side, side)  # (B, hidden, 8, 8)
    return {"pooled": embedder.visual_projection(out.pooler_output),
            "patch tokens": patches.flatten(1),
            "2x2 pooled patches": F.adaptive_avg_pool2d(grid, 2).flatten(1)}


rng = np.random.default_rng(0)
dist = {}
for i in range(40):
    p = sw.sample_panel(rng)
    moved = dataclasses.replace(p, x=min(0.85, max(0.15, 1 - p.x)))  # same everything, other x
    acts = [a for a in sw.ACTIONS if a != p.action]
    posed = dataclasses.replace(p, action=acts[i % len(acts)], **sw.action_pose(acts[i % len(acts)]))  # other pose
    feats = readings(torch.stack([sw.to_tensor(sw.render(z)) for z in (p, moved, posed)]))
    for name, f in feats.items():
        f = F.normalize(f, dim=-1)
        dist.setdefault(name, {"other x position": [], "other action/pose": []})
        dist[name]["other x position"].append(1 - (f[0] @ f[1]).item())
        dist[name]["other action/pose"].append(1 - (f[0] @ f[2]).item())
for name, d in dist.items():
    print(f"{name:>20}: cosine distance, same frame but other x position: {np.mean(d['other x position']):.4f}; "
          f"other action/pose: {np.mean(d['other action/pose']):.4f}")
