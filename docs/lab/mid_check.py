"""Mid-run look at an intermediate storyworld export (docs/storyworld-recipe.md, session 2): prompt following at
guidance 5 and 8, CSA off / rate 0.5 / rate 1.0. Seeds differ from the evaluation's.

    python docs/lab/mid_check.py runs/storyworld/export out.json
"""
import json, sys, time, torch
torch.set_num_threads(1)
from sdlite.storyworld.models import load_storyworld
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.eval.checks import csa_check, prompt_following
folder, out = sys.argv[1], sys.argv[2]
pipe = load_storyworld(folder=folder); pipe.set_progress_bar_config(disable=True)
rec = load_recognizer(None)
res = {"folder": folder, "note": json.load(open(folder + "/training.json"))["note"]}
t0 = time.time()
for g in (5.0, 8.0):
    res[f"pf_g{g}"] = prompt_following(pipe, rec, n=64, guidance=g, seed=3)
    print(g, res[f"pf_g{g}"], time.time() - t0, flush=True)
res["csa"] = csa_check(pipe, rec, stories=24, seed=3, verbose=True,
                       settings={"none": None, "rate0.5": dict(rate=0.5, layers="all"), "rate1.0": dict(rate=1.0, layers="all")})
res["seconds"] = time.time() - t0
json.dump(res, open(out, "w"), indent=1)
