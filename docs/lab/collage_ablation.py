"""The collage ablation (appendix notebook 07, section 8): two UNets trained with the same recipe for the same
6000 steps, with collage pre-training through attention and without it (`--group-fraction 0`: single images only),
each put into the shipped pipeline (same VAE, text encoders, scheduler) and scored the same way: prompt following
(64 prompts) and CSA off / on over 32 four-panel stories with independent noise per panel (seeds differ from the
evaluation's).

    python docs/lab/collage_ablation.py results/collage_ablation.json     # about 3 minutes, 1 thread
"""
import datetime
import json
import sys
import time

import torch

from sdlite.storyworld.models import ABLATION_UNETS, ablation_unet_dir, load_storyworld
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.eval.checks import csa_check, prompt_following

torch.set_num_threads(1)
out = sys.argv[1]
rec = load_recognizer()
res = {"command": "python docs/lab/collage_ablation.py " + out, "models": {}}
t0 = time.time()
for name in ABLATION_UNETS:
    pipe = load_storyworld(unet=ablation_unet_dir(name))
    row = {"prompt_following": prompt_following(pipe, rec, n=64, guidance=5.0, seed=3)}
    row["csa"] = csa_check(pipe, rec, stories=32, seed=3, settings={"none": None, "rate1.0": dict(rate=1.0, layers="all")})
    row["csa_gain"] = row["csa"]["rate1.0"]["identity_agreement"] - row["csa"]["none"]["identity_agreement"]
    res["models"][name] = row
    print(name, json.dumps(row), f"{time.time() - t0:.0f} s", flush=True)
res["seconds"] = round(time.time() - t0, 1)
res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
with open(out, "w") as f:
    json.dump(res, f, indent=1)
