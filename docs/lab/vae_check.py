"""Compare VAE decoders on held-out renders, read by two scorers (README, storyworld; docs/storyworld-recipe.md).

For each VAE (a folder saved with save_pretrained, or a decoder-stage checkpoint `model.safetensors` loaded into the
stage-1 VAE's config): mean |x - D(E(x))| and the recognizer accuracy lost on the reconstructions, per label, on 512
renders of seed 7 (not the evaluation's seed), read by the shipped recognizer and by the seed-1 cross-check.

    python docs/lab/vae_check.py OUT.json VAE [VAE ...]
    # e.g. results/vae_perceptual_check.json data/storyworld/vae runs/perc_decoder_step1500.safetensors
"""
import json
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from sdlite.paths import data_dir
from sdlite.storyworld.recognizer import SEED1_FILE, load_recognizer
from sdlite.eval.checks import vae_check

torch.set_num_threads(1)
out, sources = sys.argv[1], sys.argv[2:]
scorers = {"a": load_recognizer(), "a_seed1": load_recognizer(data_dir() / SEED1_FILE)}
rows = {}
for src in sources:
    if src.endswith(".safetensors"):
        vae = AutoencoderKL.from_pretrained("runs/storyworld/vae/final")  # the stage-1 config and encoder
        vae.load_state_dict(load_file(src))
    else:
        vae = AutoencoderKL.from_pretrained(src)
    vae.eval()
    rows[src] = {}
    for name, rec in scorers.items():
        r = vae_check(vae, rec, n=512, seed=7)
        lost = {k: round(r["accuracy_renders"][k] - r["accuracy_reconstructions"][k], 4) for k in r["accuracy_renders"]}
        rows[src][name] = {"l1": round(r["l1"], 5), "accuracy_lost": lost}
        print(src, name, f"l1 {r['l1']:.4f}", lost, flush=True)
with open(out, "w") as f:
    json.dump({"command": "python docs/lab/vae_check.py " + " ".join(sys.argv[1:]), "renders": "512, seed 7",
               "rows": rows}, f, indent=1)
