"""Several draws with consistent self-attention: keep the closest panel of each draw, or the closest whole draw?
(issue #15; `sdlite.id_selection`, notebook 04 section 8)

With CSA a draw is one story whose panels read each other's tokens, so two choices make sense when a referenced
story is drawn K times: per panel (what `generate_story(..., candidates=K)` ships: each panel keeps its closest
draw, panels may come from different draws) or per story (the draw whose panels are closest on average, the
panels kept together). Both are computed from the same K draws, next to the single draw (draw 0) and next to the
same K draws without CSA chosen per panel (`no_csa_per_panel`: the ID row as shipped), on stories of
the evaluation's kind but other seeds than its own (`make_reference_stories(n, seed)`; the evaluation's stories are
seed 5150), at the reference mode's settings (style strength 20, guidance 3).

    python docs/lab/csa_candidates.py --stories 24 --seed 6160 --out results/csa_candidates_6160.json
    python docs/lab/csa_candidates.py --stories 48 --seed 7000 --out results/csa_candidates_7000.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from sdlite.cli.story import STORYWORLD_ID_CANDIDATES, STORYWORLD_ID_GUIDANCE, STORYWORLD_ID_STRENGTH
from sdlite.eval.photomaker import MATCHED, make_reference_stories, reference_match
from sdlite.id_encoder import load_id_encoder
from sdlite.id_selection import candidate_seeds, reference_similarity
from sdlite.paths import data_dir
from sdlite.pipeline import CSAConfig, generate_story, load_pipeline
from sdlite.story import parse_story
from sdlite.storyworld.recognizer import load_recognizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stories", type=int, default=24)
    ap.add_argument("--seed", type=int, default=6160)
    ap.add_argument("--candidates", type=int, default=STORYWORLD_ID_CANDIDATES)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe, recognizer = load_pipeline(), load_recognizer()
    encoder = load_id_encoder(data_dir() / "storyworld" / "id_encoder")
    rows: dict[str, list] = {"single_draw": [], "per_panel": [], "per_story": [], "no_csa_per_panel": []}
    t0 = time.time()
    for k, st in enumerate(make_reference_stories(args.stories, args.seed)):
        story, refs = parse_story(st.text), [st.references[0]]
        def draw(csa: bool) -> np.ndarray:  # (K, P, H, W, 3): the story drawn K times, as candidates=K draws it
            return np.stack([generate_story(pipe, story, csa=CSAConfig(enabled=csa), seed=s,
                                            guidance_scale=STORYWORLD_ID_GUIDANCE, progress=False,
                                            id_images={"Ref": refs}, id_encoder=encoder,
                                            style_strength_ratio=STORYWORLD_ID_STRENGTH).arrays()
                             for s in candidate_seeds(1000 * k, args.candidates)])

        def per_panel(draws: np.ndarray, sims: torch.Tensor) -> np.ndarray:
            best = sims.argmax(dim=0)  # (P,)
            return np.stack([draws[int(best[i]), i] for i in range(draws.shape[1])])

        draws, plain = draw(True), draw(False)
        sims, plain_sims = (torch.stack([reference_similarity(encoder, list(d), refs) for d in ds])  # (K, P)
                            for ds in (draws, plain))
        chosen = {"single_draw": draws[0], "per_story": draws[int(sims.mean(dim=1).argmax())],
                  "per_panel": per_panel(draws, sims), "no_csa_per_panel": per_panel(plain, plain_sims)}
        for name, panels in chosen.items():
            rows[name].append(reference_match(panels, st.references[0], recognizer))
    table = {}
    for name, matches in rows.items():
        table[name] = {a: round(float(np.mean([m[a] for m in matches])), 4) for a in MATCHED}
        table[name]["reference_match_min"] = min(table[name][a] for a in MATCHED)
        print(name, table[name], flush=True)
    result = {"command": "python docs/lab/csa_candidates.py " + f"--stories {args.stories} --seed {args.seed}"
              + (f" --out {args.out}" if args.out else ""), "n_stories": args.stories, "seed": args.seed,
              "candidates": args.candidates, "rows": table, "seconds": round(time.time() - t0, 1)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
