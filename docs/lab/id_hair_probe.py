"""Where does the reference path lose the hair? One ID encoder on held-out reference stories (those of
`sdlite.eval.photomaker`, from any seed), measured in one of these modes:

    reference       the ID path, as the evaluation's `id` row (one reference, CSA off)
    text_hair       no reference; the character line names the hair ("[Ref] a girl with brown hair"): the UNet's
                    own ceiling for drawing a named hair colour (run it first: the ID path fuses the LoRA for good)
    reference_hair  the ID path with the hair named as well ("[Ref] a girl img with brown hair")
    vae             no generation: renders of each hair colour through the VAE, read by the recognizer (the ceiling
                    every latent method shares)

    python docs/lab/id_hair_probe.py data/storyworld/id_encoder --stories 48 --seed 7000 --strength 10
    python docs/lab/id_hair_probe.py data/storyworld/id_encoder --stories 24 --modes text_hair,reference,reference_hair
    python docs/lab/id_hair_probe.py data/storyworld/id_encoder --stories 24 --guidance 7.5
    python docs/lab/id_hair_probe.py data/storyworld/id_encoder --modes vae

Prints the reference match per attribute, its minimum, and the commonest hair misses (reference's hair -> panel's).
The figures in docs/storyworld-recipe.md ("The hair fine-tune") come from these commands (seed 7000: 48 stories at
strength 10; the tuning seed 6160, the default: 24 stories).
"""
from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch

from sdlite.eval.photomaker import MATCHED, TUNING_SEED, make_reference_stories, reference_match
from sdlite.images import to_tensor, to_uint8
from sdlite.id_encoder import load_id_encoder
from sdlite.pipeline import CSAConfig, generate_story, load_pipeline
from sdlite.story import parse_story
from sdlite.storyworld import world as sw
from sdlite.storyworld.recognizer import load_recognizer

MODES = ("reference", "text_hair", "reference_hair", "vae")


def story_text(st, mode: str) -> str:
    """The story of `st` with its character line as `mode` asks (the panel lines stay as they are)."""
    lines = st.text.split("\n")
    ch = st.character
    if mode == "text_hair":
        lines[0] = f"[Ref] a {ch.class_word} with {ch.hair} hair"
    elif mode == "reference_hair":
        lines[0] = f"[Ref] a {ch.class_word} img with {ch.hair} hair"
    return "\n".join(lines)


def probe(pipe, encoder, recognizer, stories, mode: str, strength: float, guidance, steps) -> tuple[dict, Counter]:
    rows, misses = [], Counter()
    for k, st in enumerate(stories):
        kw = ({"id_images": {"Ref": [st.references[0]]}, "id_encoder": encoder, "style_strength_ratio": strength}
              if mode != "text_hair" else {})
        res = generate_story(pipe, parse_story(story_text(st, mode)), csa=CSAConfig(enabled=False), seed=1000 * k,
                             guidance_scale=guidance, steps=steps, progress=False, **kw)
        panels = res.arrays()
        rows.append(reference_match(panels, st.references[0], recognizer))
        hair = [sw.HAIR_COLOURS[v] for v in recognizer.predict(np.concatenate([st.references[0][None], panels]))["hair"]]
        misses.update((hair[0], h) for h in hair[1:] if h != hair[0])
    mean = {a: round(float(np.mean([r[a] for r in rows])), 3) for a in MATCHED}
    return {**mean, "reference_match_min": min(mean.values())}, misses


@torch.no_grad()
def vae_hair(pipe, recognizer, n: int = 40, seed: int = 3) -> dict[str, float]:
    """Per hair colour: the share of n random renders with that hair whose VAE reconstruction is read right."""
    import dataclasses

    rng, out = np.random.default_rng(seed), {}
    for hair in sw.HAIR_COLOURS:
        renders = np.stack([sw.render(sw.sample_panel(rng, dataclasses.replace(sw.sample_character(rng), hair=hair)))
                            for _ in range(n)])
        x = torch.stack([to_tensor(im) for im in renders])
        back = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
        read = recognizer.predict(to_uint8(back))["hair"]
        out[hair] = round(float((read == sw.HAIR_COLOURS.index(hair)).float().mean()), 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("encoder", help="an ID encoder folder, e.g. data/storyworld/id_encoder")
    ap.add_argument("--stories", type=int, default=24)
    ap.add_argument("--seed", type=int, default=TUNING_SEED, help="the stories' seed (default: the tuning stories')")
    ap.add_argument("--modes", default="reference", help=f"comma-separated, of {MODES}")
    ap.add_argument("--strength", type=float, default=10.0, help="style strength R of the ID path")
    ap.add_argument("--guidance", type=float, default=None, help="default: storyworld's 5")
    ap.add_argument("--steps", type=int, default=None, help="default: storyworld's 20")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",")]
    if not set(modes) <= set(MODES):
        ap.error(f"--modes: choose from {MODES}")
    torch.set_num_threads(1)
    pipe, encoder, recognizer = load_pipeline("storyworld"), load_id_encoder(args.encoder), load_recognizer()
    stories = make_reference_stories(args.stories, args.seed)
    for mode in modes:
        t0 = time.time()
        if mode == "vae":
            print(f"vae: hair read right after the VAE {vae_hair(pipe, recognizer)}")
            continue
        row, misses = probe(pipe, encoder, recognizer, stories, mode, args.strength, args.guidance, args.steps)
        print(f"{mode}: {row} ({time.time() - t0:.0f} s)")
        print("  hair misses (reference -> panel):", ", ".join(f"{a}->{b} {n}" for (a, b), n in misses.most_common(6)))


if __name__ == "__main__":
    main()
