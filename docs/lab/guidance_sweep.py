"""Does the storyworld model follow prompts better at another classifier-free guidance scale? (README, storyworld)

Prompt following (every label, the shipped recognizer and the seed-1 cross-check) of a storyworld pipeline at a few
guidance scales, on prompts and seeds that are NOT the evaluation's (seed 1 here; `sdlite.eval storyworld` uses
EVAL_SEED), so that picking a scale here does not tune on the evaluation. 25 steps, as the evaluation.

    python docs/lab/guidance_sweep.py results/guidance_sweep.json [MODEL_FOLDER] [n prompts (200)] [scales 3,5,7.5,10]
"""
import json
import sys
import time

import torch

from sdlite.storyworld.models import load_storyworld
from sdlite.paths import data_dir
from sdlite.storyworld.recognizer import SEED1_FILE, load_recognizer
from sdlite.eval.checks import prompt_following_scores

torch.set_num_threads(1)
out = sys.argv[1]
folder = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
scales = [float(s) for s in sys.argv[4].split(",")] if len(sys.argv) > 4 else [3.0, 5.0, 7.5, 10.0]
pipe = load_storyworld("cpu", folder=folder)
pipe.set_progress_bar_config(disable=True)
scorers = {"a": load_recognizer(), "a_seed1": load_recognizer(data_dir() / SEED1_FILE)}
rows = {}
for g in scales:
    t0 = time.time()
    s = prompt_following_scores(pipe, scorers, n=n, steps=25, guidance=g, seed=1)
    rows[str(g)] = {"accuracy": s["accuracy"], "accuracy_where_agreed": s["accuracy_where_agreed"],
                    "min_label_a": min(s["accuracy"]["a"], key=s["accuracy"]["a"].get),
                    "seconds": round(time.time() - t0, 1)}
    acc = s["accuracy"]["a"]
    print(f"guidance {g}: " + " ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
summary = {"command": "python docs/lab/guidance_sweep.py " + " ".join(sys.argv[1:]), "model": folder or "data/storyworld",
           "n_prompts": n, "steps": 25, "prompt_seed": 1, "per_guidance": rows}
with open(out, "w") as f:
    json.dump(summary, f, indent=1)
