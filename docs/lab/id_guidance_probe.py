"""Can guidance on the ID direction draw the hair better? A probe for the reference mode (issue #15).

Classifier-free guidance moves a prediction from the unconditional one towards the prompt's. With an ID prompt, the
step can be split in two directions, text and identity:

    eps = eps_uncond + g (eps_text - eps_uncond) + g_id (eps_id - eps_text)

where eps_text is the prediction for the text-only prompt and eps_id for the ID prompt (its class tokens fused with
the reference). g_id = g is plain guidance; g_id > g pushes harder on the identity alone. This costs one more UNet
call per step after the merge step (delayed conditioning), so here it is a wrapper around the UNet, for measuring
only: it is not part of sdlite.

    python docs/lab/id_guidance_probe.py --guidance 3 --id-guidance 3,5,8
    python docs/lab/id_guidance_probe.py --guidance 2 --id-guidance 3,4

Prints the evaluation's `run_setting` row (reference match per attribute, minimum, scene and action accuracy) for
each g_id, on the tuning stories of `sdlite.eval.photomaker` (or `--seed`), at the shipped strength R = 20.
"""
from __future__ import annotations

import argparse
import time

import torch

from sdlite.eval.photomaker import TUNING_SEED, make_reference_stories, run_setting
from sdlite.id_encoder import load_id_encoder
from sdlite.pipeline import load_pipeline
from sdlite.storyworld.recognizer import load_recognizer


def split_guidance(pipe, guidance: float, state: dict) -> None:
    """Wrap `pipe.unet` so that, once the ID prompt is in use, the conditional half of each prediction becomes
    eps_text + (g_id / g) (eps_id - eps_text): the pipeline's own guidance then gives the formula above."""
    unet_forward = pipe.unet.forward

    def forward(sample, t, encoder_hidden_states=None, added_cond_kwargs=None, **kw):
        out = unet_forward(sample, t, encoder_hidden_states=encoder_hidden_states,
                           added_cond_kwargs=added_cond_kwargs, **kw)
        half = sample.shape[0] // 2  # [uncond; cond]
        text = state["text"]  # (B, T, D): this batch's text-only prompts
        if state["id_guidance"] == guidance or torch.equal(encoder_hidden_states[half:], text):
            return out  # plain guidance, or still before the merge step
        cond = {"text_embeds": state["pooled"], "time_ids": added_cond_kwargs["time_ids"][half:]}
        eps_text = unet_forward(sample[half:], t, encoder_hidden_states=text, added_cond_kwargs=cond, **kw)[0]
        eps = out[0].clone()
        eps[half:] = eps_text + state["id_guidance"] / guidance * (eps[half:] - eps_text)
        return (eps,)

    pipe.unet.forward = forward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--encoder", default="data/storyworld/id_encoder")
    ap.add_argument("--stories", type=int, default=24)
    ap.add_argument("--seed", type=int, default=TUNING_SEED)
    ap.add_argument("--guidance", type=float, default=3.0, help="g (the reference mode's: 3)")
    ap.add_argument("--id-guidance", default="3,5,8", help="comma-separated g_id values")
    ap.add_argument("--strength", type=float, default=20.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = load_pipeline()
    encoder, recognizer = load_id_encoder(args.encoder), load_recognizer()
    state: dict = {}
    encode_prompt = pipe.encode_prompt  # the text-only prompts go through it (the ID prompts do not)

    def remember_text(*a, **kw):  # keep each batch's text-only prompt embeddings for the wrapper
        out = encode_prompt(*a, **kw)  # (prompt, negative, pooled, negative pooled)
        state["text"], state["pooled"] = out[0], out[2]
        return out

    pipe.encode_prompt = remember_text
    split_guidance(pipe, args.guidance, state)
    stories = make_reference_stories(args.stories, args.seed)
    for g_id in (float(v) for v in args.id_guidance.split(",")):
        state["id_guidance"] = g_id
        t0 = time.time()
        row = run_setting(pipe, encoder, stories, recognizer, strength=args.strength, guidance=args.guidance)
        print(f"g = {args.guidance:g}, g_id = {g_id:g}: {row} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
