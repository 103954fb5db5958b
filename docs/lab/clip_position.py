"""How much of a frame's position and pose does the storyworld CLIP image embedding carry? (README, transitions)\n\n    python docs/lab/clip_position.py\n"""
import dataclasses, numpy as np, torch
torch.set_num_threads(1)
from sdlite import storyworld as sw
from sdlite.video import load_video_models
m = load_video_models(decoder=False, predictor=False)
rng = np.random.default_rng(0)
d_pos, d_act, d_none = [], [], []
for i in range(40):
    p = sw.sample_panel(rng)
    q = dataclasses.replace(p, x=min(0.85, max(0.15, 1 - p.x)))           # same everything, other x
    acts = [a for a in sw.ACTIONS if a != p.action]
    r = dataclasses.replace(p, action=acts[i % len(acts)], **sw.action_pose(acts[i % len(acts)]))  # other pose
    imgs = torch.stack([sw.to_tensor(sw.render(z)) for z in (p, q, r)])
    e = torch.nn.functional.normalize(m.embedder(imgs), dim=-1)
    d_pos.append(1 - (e[0] @ e[1]).item()); d_act.append(1 - (e[0] @ e[2]).item())
print(f"cosine distance, same frame but other x position: {np.mean(d_pos):.4f}; other action/pose: {np.mean(d_act):.4f}")
