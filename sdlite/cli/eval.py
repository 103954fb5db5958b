"""`python -m sdlite.eval <table>`: every evaluation that generates in order to score, or writes results/.

    python -m sdlite.eval storyworld            the storyworld quality bars -> results/storyworld.json
    python -m sdlite.eval consistency ...       the paper's Table 1 in storyworld -> results/consistency.json
    python -m sdlite.eval transitions ...       the paper's Table 2 in storyworld -> results/motion.json
    python -m sdlite.eval decoder-ablation ...  video decoders compared as (d) -> results/motion_ablation.json
    python -m sdlite.eval predictor-errors ...  the motion predictor's error against linear interpolation
    python -m sdlite.eval check ...             quick checks of a training run's export
    python -m sdlite.eval photomaker ...        reference-image mode in storyworld -> results/photomaker.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_threads_option, build_registry_parser, run_module_command, set_threads
from .story import STORYWORLD_ID_CANDIDATES

TABLES: tuple[str, ...] = tuple(f"sdlite.cli.eval:add_{name}_parser" for name in (
    "storyworld", "consistency", "transitions", "decoder_ablation", "predictor_errors", "check", "photomaker"))
# sdlite.eval.transitions.METHODS / EVAL_SEED (a test keeps them equal): the parser imports no torch
TRANSITION_METHODS = ("latent_interpolation", "no_predictor", "temporal_only", "full", "true_embeddings")
TRANSITION_POLISHED = "full_polished"  # transitions.POLISHED: run when named, not in the default list
TRANSITION_SEED = 777



# ----------------------------------------------------------------------------------------------------------
# storyworld
# ----------------------------------------------------------------------------------------------------------
def add_storyworld_parser(sub) -> None:
    p = sub.add_parser("storyworld", help="the storyworld quality bars: writes results/storyworld.json",
                       description="The storyworld quality bars, measured in one command (sdlite.eval.storyworld).")
    p.add_argument("--out", default="results/storyworld.json", help="where the json goes (overwritten)")
    p.add_argument("--stories", type=int, default=64, help="four-panel stories for the CSA bar (>= 64)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (the bars use 25)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not the bars")
    p.add_argument("--model", default="storyworld", help="'storyworld' (the shipped data/storyworld) or another "
                   "storyworld pipeline folder, e.g. a training run's export")
    add_threads_option(p, default=1)
    p.set_defaults(func=run_storyworld)


def run_storyworld(args) -> int:
    from ..eval.storyworld import evaluate_storyworld, format_table

    if args.stories < 1 or args.steps < 1:
        raise ValueError("--stories and --steps must be >= 1")
    set_threads(args)
    result = evaluate_storyworld(args.out, quick=args.quick, n_stories=args.stories, steps=args.steps,
                                 folder=None if args.model == "storyworld" else Path(args.model))
    print(format_table(result))
    print(f"wrote {args.out} in {result['seconds']} s")
    return 0


# ----------------------------------------------------------------------------------------------------------
# consistency (Table 1)
# ----------------------------------------------------------------------------------------------------------
def add_consistency_parser(sub) -> None:
    p = sub.add_parser("consistency", help="the consistency evaluation (identity agreement with/without CSA)",
                       description="The consistency evaluation, the paper's Table 1 in storyworld "
                                   "(sdlite.eval.consistency).")
    p.add_argument("--model", default="storyworld", help="'storyworld' or a storyworld-style pipeline folder")
    p.add_argument("--stories", type=int, default=50, help="stories per setting (default 50)")
    p.add_argument("--settings", default=None, help="comma-separated subset of the settings (default: all)")
    p.add_argument("--seed-policies", default="per_panel,shared", help="per_panel,shared (default both)")
    p.add_argument("--shared-settings", default=None,
                   help="run the shared-seed policy only for these settings (comma-separated; default: all)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--panels", type=int, nargs=2, default=(4, 6), metavar=("MIN", "MAX"),
                   help="panels per story (default 4 6)")
    p.add_argument("--batch-stories", type=int, default=1,
                   help="stories per pipeline call where the setting allows (faster on CPU; default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampling", choices=["exact", "official"], default="exact",
                   help="how CSA samples tokens in every setting: exact (sdlite's, default) or official (one keep-mask "
                        "per source image and step, as the official code)")
    p.add_argument("--recognizer", default=None, help="recognizer file (default: data/recognizer.safetensors)")
    p.add_argument("--out", default="results/consistency.json", help="rows as JSON (+ a .md table next to it)")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_threads_option(p)
    p.set_defaults(func=run_consistency)


def run_consistency(args) -> int:
    from ..eval.consistency import run_consistency_table
    from ..paths import check_writable

    out = check_writable(args.out, args.force)
    check_writable(Path(out).with_suffix(".md"), args.force)
    set_threads(args)

    def fmt(v):
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

    command = "python -m sdlite.eval consistency " + " ".join(
        f"--{k.replace('_', '-')} {fmt(v)}" for k, v in vars(args).items()
        if k not in ("func", "force", "evaluation", "command_line") and v is not None)
    run_consistency_table(
        out, command, model=args.model, recognizer=args.recognizer, n_stories=args.stories,
        settings=args.settings.split(",") if args.settings else None,
        seed_policies=tuple(args.seed_policies.split(",")), steps=args.steps, seed=args.seed,
        shared_settings=args.shared_settings.split(",") if args.shared_settings else None,
        short_panels=tuple(args.panels), batch_stories=args.batch_stories, sampling=args.sampling)
    print(f"wrote {out} and {Path(out).with_suffix('.md')}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# transitions (Table 2) and the predictor's errors
# ----------------------------------------------------------------------------------------------------------
def add_transitions_parser(sub) -> None:
    e = sub.add_parser("transitions", help="Table 2 in storyworld: write results/motion.json",
                       description="Transition videos against the true in-between frames (sdlite.eval.transitions).")
    e.add_argument("--clips", type=int, default=100)
    e.add_argument("--seed", type=int, default=TRANSITION_SEED)
    e.add_argument("--frames", type=int, default=16)
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--strength", type=float, default=1.0)
    e.add_argument("--no-pin", action="store_true", help="do not hold the first/last latents on the keyframes")
    e.add_argument("--embed-guidance", type=float, default=1.0,
                   help="classifier-free guidance on the frame embeddings (1: off)")
    e.add_argument("--methods", default=",".join(TRANSITION_METHODS),
                   help=f"comma-separated subset of {TRANSITION_METHODS + (TRANSITION_POLISHED,)} ("
                        f"{TRANSITION_POLISHED}: (d), then the image model redraws the in-between frames)")
    e.add_argument("--polish-strength", type=float, default=None,
                   help=f"{TRANSITION_POLISHED}'s strength (default: chosen on 20 other clips)")
    e.add_argument("--decoder", default=None, help="decoder folder (default data/motion/decoder)")
    e.add_argument("--out", default="results/motion.json")
    e.add_argument("--force", action="store_true")
    e.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    e.add_argument("--motion", default=None, help="folder with predictor/ and decoder/ (default data/motion)")
    add_threads_option(e)
    e.set_defaults(func=run_transitions)


def run_transitions(args) -> int:
    from ..eval.transitions import run_transitions_eval
    from ..paths import check_writable

    check_writable(args.out, args.force)
    set_threads(args)
    methods = tuple(args.methods.split(","))
    known = TRANSITION_METHODS + (TRANSITION_POLISHED,)
    unknown = set(methods) - set(known)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {known}")
    res = run_transitions_eval(args.out, args.command_line, n_clips=args.clips, seed=args.seed, frames=args.frames,
                               steps=args.steps, strength=args.strength, pin=not args.no_pin, methods=methods,
                               storyworld=args.storyworld, motion=args.motion, decoder=args.decoder,
                               embed_guidance=args.embed_guidance, polish_strength=args.polish_strength)
    print(json.dumps({k: res[k] for k in ("predictor_error_ratio_vs_linear", "psnr", "identity_agreement_full",
                                          "identity_agreement_full_polished", "bars") if k in res}, indent=1))
    return 0


def add_decoder_ablation_parser(sub) -> None:
    e = sub.add_parser("decoder-ablation", help="video decoders compared as (d) full: results/motion_ablation.json",
                       description="Decoders (keyframe reading on/off, size, training length) on the same held-out "
                                   "clips (sdlite.eval.transitions.decoder_ablation).")
    e.add_argument("--decoder", action="append", required=True, metavar="NAME=FOLDER",
                   help="a decoder to compare (repeat); the first is the row the others are compared with")
    e.add_argument("--clips", type=int, default=100)
    e.add_argument("--seed", type=int, default=TRANSITION_SEED)
    e.add_argument("--steps", type=int, default=8)
    e.add_argument("--out", default="results/motion_ablation.json")
    e.add_argument("--force", action="store_true")
    e.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    add_threads_option(e)
    e.set_defaults(func=run_decoder_ablation)


def run_decoder_ablation(args) -> int:
    from ..eval.transitions import decoder_ablation
    from ..paths import check_writable

    check_writable(args.out, args.force)
    decoders = {}
    for item in args.decoder:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--decoder {item!r}: write NAME=FOLDER, e.g. keyframes=data/motion/decoder")
        decoders[name] = folder
    set_threads(args)
    res = decoder_ablation(decoders, args.command_line, args.clips, args.seed, args.steps, args.out, args.storyworld)
    for name, row in res["rows"].items():
        print(f"{name:40s} PSNR {row['psnr']:6.2f}  frame identity {row['identity_agreement']:.3f}")
    return 0


def add_predictor_errors_parser(sub) -> None:
    e = sub.add_parser("predictor-errors", help="the predictor's error vs linear interpolation on a cache")
    e.add_argument("--cache", required=True)
    e.add_argument("--predictor", default=None, help="default: data/motion/predictor")
    add_threads_option(e)
    e.set_defaults(func=run_predictor_errors)


def run_predictor_errors(args) -> int:
    from ..motion import SemanticMotionPredictor, predictor_errors
    from ..train.motion import load_cache

    set_threads(args)
    pred = SemanticMotionPredictor.storyworld(args.predictor)
    print(json.dumps(predictor_errors(pred, load_cache(args.cache)["embeds"]), indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------
# check: quick checks of a training run's export
# ----------------------------------------------------------------------------------------------------------
def add_check_parser(sub) -> None:
    p = sub.add_parser("check", help="prompt following, VAE and CSA checks of a storyworld pipeline folder")
    p.add_argument("--export", default=None, help="the pipeline folder (default: the shipped data/storyworld)")
    p.add_argument("--out", required=True, help="folder for check.json / check_rates.json, e.g. the run folder")
    p.add_argument("--prompts", type=int, default=120, help="prompts for prompt following")
    p.add_argument("--stories", type=int, default=32, help="4-panel stories for the CSA check")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--recognizer", default=None, help="recognizer file (default: the shipped one)")
    p.add_argument("--rates", default=None, help="only sweep these CSA rates, e.g. 0.3,0.7,1.0")
    p.add_argument("--seed", type=int, default=0)
    add_threads_option(p)
    p.set_defaults(func=lambda args: run_check(args, args.command_line))


def run_check(args, command: str) -> int:
    """`python -m sdlite.eval check` (and the older `python -m sdlite.train storyworld --stage check`)."""
    from ..eval.checks import run_checks

    set_threads(args)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else None
    res = run_checks(args.export, args.out, args.recognizer, prompts=args.prompts, stories=args.stories,
                     guidance=args.guidance, seed=args.seed, rates=rates, command=command)
    print(json.dumps(res, indent=1))
    return 0


def build_parser(entries: tuple[str, ...] = TABLES) -> argparse.ArgumentParser:
    return build_registry_parser("python -m sdlite.eval", "sdlite evaluations", "evaluation", entries)


def main(argv: list[str] | None = None) -> int:
    return run_module_command(build_parser(), "evaluation", argv)


# ----------------------------------------------------------------------------------------------------------
# photomaker: reference-image mode, measured
# ----------------------------------------------------------------------------------------------------------
def add_photomaker_parser(sub) -> None:
    p = sub.add_parser("photomaker", help="reference-image mode (PhotoMaker) in storyworld -> results/photomaker.json",
                       description="Do a story's panels follow the reference images? (sdlite.eval.photomaker)")
    p.add_argument("--stories", type=int, default=100, help="stories of held-out characters (default 100)")
    p.add_argument("--tuning-stories", type=int, default=24,
                   help="other stories, for choosing the delayed-conditioning strength (default 24)")
    p.add_argument("--id-encoder", default=None, help="ID encoder folder (default data/storyworld/id_encoder)")
    p.add_argument("--compare", action="append", default=[], metavar="NAME=FOLDER",
                   help="another ID encoder folder measured as the 'id' row under encoder_ablation (repeatable)")
    p.add_argument("--recognizer", default=None, help="recognizer file (default: data/recognizer.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--candidates", type=int, default=STORYWORLD_ID_CANDIDATES, metavar="K",
                   help=f"draws per panel in the ID rows, the closest to the reference kept (default "
                        f"{STORYWORLD_ID_CANDIDATES}, as sdlite story --ref on storyworld; 1: a single draw)")
    p.add_argument("--out", default="results/photomaker.json")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    add_threads_option(p, default=1)
    p.set_defaults(func=run_photomaker)


def run_photomaker(args) -> int:
    from ..eval.photomaker import run_photomaker_eval, write_result
    from ..id_encoder import load_id_encoder
    from ..paths import check_writable, data_dir
    from ..pipeline import load_pipeline
    from ..storyworld.recognizer import load_recognizer

    if args.stories < 1 or args.tuning_stories < 1 or args.candidates < 1:
        raise ValueError("--stories, --tuning-stories and --candidates must be >= 1")
    compare = dict(item.split("=", 1) for item in args.compare if "=" in item)
    if len(compare) != len(args.compare) or "id" in compare:
        raise ValueError("--compare takes NAME=FOLDER (a name other than 'id'), e.g. "
                         "--compare base=data/storyworld/id_encoder_base")
    out = check_writable(args.out, args.force)
    set_threads(args)
    encoder = load_id_encoder(args.id_encoder or data_dir() / "storyworld" / "id_encoder")
    others = {name: (load_pipeline("storyworld"), load_id_encoder(folder)) for name, folder in compare.items()}
    result = run_photomaker_eval(load_pipeline("storyworld"), encoder, load_recognizer(args.recognizer),
                                 n_stories=args.stories, n_tuning=args.tuning_stories, seed=args.seed,
                                 command=args.command_line, others=others, candidates=args.candidates)
    write_result(result, out)
    sweeps = ("table", "strength_sweep", "guidance_sweep", "candidate_sweep")  # printed in full while they ran
    print(json.dumps({k: v for k, v in result.items() if k not in sweeps}, indent=1))
    print(f"wrote {out}")
    return 0
