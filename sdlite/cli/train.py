"""`python -m sdlite.train <what>`: every training job, one subcommand each.

    python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld --force
    python -m sdlite.train recognizer --arch a --steps 1500 --force
    python -m sdlite.train motion-cache --clips 3000 --seed 1 --out runs/motion/train_grid4 --latents --grid 4
    python -m sdlite.train motion-predictor --cache runs/motion/train_grid4 --out runs/motion/predictor_grid4 ...
    python -m sdlite.train video-decoder --cache runs/motion/train_grid4 --spatial-channels 4 --out runs/video ...
    python -m sdlite.train id-encoder --out runs/id_encoder --export data/storyworld/id_encoder --force
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from . import add_threads_option, build_registry_parser, run_module_command, set_threads

STAGES = ("vae", "clip", "unet", "decoder")  # sdlite.train.storyworld.STAGES (a test keeps them equal)
JOBS: tuple[str, ...] = tuple(f"sdlite.cli.train:add_{name}_parser" for name in (
    "storyworld", "recognizer", "motion_cache", "motion_predictor", "video_decoder", "id_encoder"))



# ----------------------------------------------------------------------------------------------------------
# storyworld: VAE, CLIP, UNet, VAE decoder, export
# ----------------------------------------------------------------------------------------------------------
def add_storyworld_parser(sub) -> None:
    ap = sub.add_parser("storyworld", help="storyworld's VAE, CLIP and UNet from scratch, exported as a pipeline",
                        description="Train storyworld's models from scratch (sdlite.train.storyworld, .unet).")
    ap.add_argument("--stage", choices=[*STAGES, "all", "export", "check"], default="all",
                    help="check: the same as `python -m sdlite.eval check` on --export")
    ap.add_argument("--out", required=True, help="run folder (checkpoints, logs), e.g. runs/storyworld")
    ap.add_argument("--export", default=None, help="pipeline folder to write at the end, e.g. data/storyworld")
    ap.add_argument("--force", action="store_true", help="allow --export to replace an existing folder")
    ap.add_argument("--resume", action="store_true", help="continue each stage from its last checkpoint")
    ap.add_argument("--size", default="base", choices=["base", "tiny"])
    ap.add_argument("--steps", type=int, default=None, help="override the steps of the stage(s) trained")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="cool the learning rate down linearly to 0 over the last N steps of the stage(s) trained")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="unet: stop (with a checkpoint) after this time")
    ap.add_argument("--export-every", type=int, default=None, help="unet: also export the pipeline every N steps")
    ap.add_argument("--character-weight", type=float, default=None)
    ap.add_argument("--perceptual-weight", type=float, default=None,
                    help="decoder: weight of the perceptual (recognizer) loss")
    ap.add_argument("--perceptual-recognizer", default=None,
                    help="decoder: the perceptual loss's recognizer (default data/perceptual_recognizer.safetensors)")
    ap.add_argument("--group-fraction", type=float, default=None)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--prompts", type=int, default=120, help="check: prompts for prompt following")
    ap.add_argument("--stories", type=int, default=32, help="check: 4-panel stories for the CSA check")
    ap.add_argument("--guidance", type=float, default=5.0, help="check: classifier-free guidance scale")
    ap.add_argument("--recognizer", default=None, help="check: recognizer file (default: the shipped one)")
    ap.add_argument("--rates", default=None, help="check: only sweep these CSA rates, e.g. 0.3,0.7,1.0")
    add_threads_option(ap)
    ap.set_defaults(func=run_storyworld)


def storyworld_config(stage: str, args):
    """A stage's shipped config with the command line's overrides: an option left out keeps the preset, an explicit
    0 (e.g. `--group-fraction 0` for a model trained without collages) is honoured. Bad values: a ValueError."""
    from ..train.storyworld import stage_config

    return stage_config(stage, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                        decay_steps=args.decay_steps, character_weight=args.character_weight,
                        group_fraction=args.group_fraction, perceptual_weight=args.perceptual_weight,
                        perceptual_recognizer=args.perceptual_recognizer, export_every=args.export_every)


def run_storyworld(args) -> int:
    set_threads(args)
    if args.stage == "check":  # generating to score is the evaluations' job
        from .eval import run_check

        return run_check(args, command=args.command_line)
    from ..train.recipe import train_storyworld

    if args.export and Path(args.export).exists() and not args.force:
        raise FileExistsError(f"{args.export} exists: pass --force to replace it (or choose another --export)")
    stages = STAGES if args.stage == "all" else (() if args.stage == "export" else (args.stage,))
    configs = {stage: storyworld_config(stage, args) for stage in stages}
    train_storyworld(args.out, stages, configs, size=args.size, export=args.export, resume=args.resume,
                     progress=not args.quiet, max_minutes=args.max_minutes, command=args.command_line)
    return 0


# ----------------------------------------------------------------------------------------------------------
# recognizer: the attribute scorers
# ----------------------------------------------------------------------------------------------------------
def add_recognizer_parser(sub) -> None:
    ap = sub.add_parser("recognizer", help="a storyworld attribute recognizer (a scorer)",
                        description="Train the storyworld attribute recognizer (sdlite.train.recognizer).")
    ap.add_argument("--arch", default="a", choices=("a", "b"))
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", default=None, help="default: data/recognizer.safetensors (b: recognizer_b...)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    add_threads_option(ap, default=2)
    ap.set_defaults(func=run_recognizer)


def run_recognizer(args) -> int:
    from ..paths import check_writable, data_dir
    from ..storyworld.recognizer import DEFAULT_FILES
    from ..train.recognizer import recognizer_record, save_recognizer, train_or_fit

    set_threads(args)
    out = Path(args.out) if args.out else data_dir() / DEFAULT_FILES[args.arch]
    check_writable(out, args.force)
    model, history = train_or_fit(args.arch, args.steps, args.seed, args.n_train)
    info = recognizer_record(model, history, args.arch, args.seed, args.steps, args.n_train, args.n_test,
                             command=args.command_line)
    save_recognizer(model, out, {"heldout_accuracy_min": info["heldout_accuracy_min"], "seed": args.seed},
                    force=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("heldout_accuracy", "heldout_augmented_accuracy", "train_seconds")},
                     indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# motion: the clip cache and the semantic motion predictor
# ----------------------------------------------------------------------------------------------------------
def add_motion_cache_parser(sub) -> None:
    c = sub.add_parser("motion-cache", help="render storyworld clips and embed (and VAE-encode) every frame")
    c.add_argument("--clips", type=int, default=4000)
    c.add_argument("--seed", type=int, default=1)
    c.add_argument("--frames", type=int, default=16)
    c.add_argument("--out", required=True, help="cache folder (resumable: existing parts are kept)")
    c.add_argument("--latents", action="store_true", help="also store the storyworld VAE latents (video decoder)")
    c.add_argument("--grid", type=int, default=0, help="also embed g x g cells of each frame (ImageEmbedder grid)")
    c.add_argument("--max-chunks", type=int, default=None, help="stop after this many parts of 200 clips")
    c.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    add_threads_option(c)
    c.set_defaults(func=run_motion_cache)


def run_motion_cache(args) -> int:
    from ..motion import ImageEmbedder
    from ..storyworld.models import load_storyworld_vae
    from ..train.motion import build_cache

    set_threads(args)
    vae = load_storyworld_vae(args.storyworld) if args.latents else None
    build_cache(args.out, args.clips, args.seed, ImageEmbedder.storyworld(args.storyworld, grid=args.grid), vae,
                args.frames, args.max_chunks)
    return 0


def add_motion_predictor_parser(sub) -> None:
    t = sub.add_parser("motion-predictor", help="train the semantic motion predictor on a cache")
    t.add_argument("--cache", required=True, nargs="+", help="one or more cache folders (train data)")
    t.add_argument("--val-cache", default=None, help="held-out cache folder (the ratio is logged)")
    t.add_argument("--out", required=True, help="run folder (log.csv, checkpoint/)")
    t.add_argument("--export", default=None, help="save_pretrained the final predictor here (e.g. data/motion/predictor)")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; --resume later)")
    t.add_argument("--force", action="store_true", help="overwrite --export")
    add_threads_option(t)
    t.set_defaults(func=run_motion_predictor)


def run_motion_predictor(args) -> int:
    import torch

    from ..motion import predictor_errors
    from ..paths import check_writable
    from ..train.motion import cache_grid, load_cache, train_predictor

    set_threads(args)
    if args.export:
        check_writable(Path(args.export) / "config.json", args.force)
    caches = [load_cache(c) for c in args.cache] + ([load_cache(args.val_cache)] if args.val_cache else [])
    grid = cache_grid(caches)
    embeds = torch.cat([c["embeds"] for c in caches[: len(args.cache)]])
    val = caches[-1]["embeds"] if args.val_cache else None
    model, hist = train_predictor(embeds, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                  out=args.out, resume=args.resume, progress=True, val_embeds=val,
                                  stop_at=args.stop_at, image_grid=grid)
    if args.export and hist["step"][-1] == args.steps:
        model.save_pretrained(args.export)
        info = {"command": args.command_line, "train_clips": len(embeds), "steps": args.steps,
                "final_loss": hist["loss"][-1], "train_seconds": round(hist["seconds"][-1], 1)}
        if val is not None:
            info["val"] = predictor_errors(model, val)
        (Path(args.export) / "training.json").write_text(json.dumps(info, indent=1) + "\n")
        print(json.dumps(info, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------------------
# video-decoder
# ----------------------------------------------------------------------------------------------------------
def add_video_decoder_parser(sub) -> None:
    t = sub.add_parser("video-decoder", help="train the video decoder on cached clips (with latents)")
    t.add_argument("--cache", required=True, nargs="+")
    t.add_argument("--out", required=True)
    t.add_argument("--export", default=None, help="save_pretrained the decoder here (e.g. data/motion/decoder)")
    t.add_argument("--size", default="base")
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch-size", type=int, default=4)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--spatial-channels", type=int, default=0,
                   help="also feed the grid cells of the embeddings spatially, as this many input channels "
                        "(needs a cache built with --grid; the shipped decoder uses 4)")
    t.add_argument("--keyframe-attention", action="store_true",
                   help="the frames' self-attention also reads the keyframes' tokens (sdlite.keyframe_attention)")
    t.add_argument("--init", default=None, help="start from this trained decoder folder instead of random weights")
    t.add_argument("--character-weight", type=float, default=0.0,
                   help="the latent cells that show the character count 1 + this many times in the loss "
                        "(masks computed once into the cache folder; 0: plain MSE)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (checkpointed; --resume later)")
    t.add_argument("--max-minutes", type=float, default=None, help="stop (checkpointed, exported) after this long")
    t.add_argument("--save-dtype", choices=("float32", "float16"), default="float32",
                   help="the export's weights (float16: half the size; loads back as float32)")
    t.add_argument("--force", action="store_true")
    t.add_argument("--storyworld", default=None, help="folder with vae/ and clip/ (default data/storyworld)")
    add_threads_option(t)
    t.set_defaults(func=run_video_decoder)


def run_video_decoder(args) -> int:
    from ..paths import check_writable
    from ..train.video import DecoderTrainConfig, train_decoder_on_caches

    set_threads(args)
    if args.export:
        check_writable(Path(args.export) / "config.json", args.force)
    cfg = DecoderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                             character_weight=args.character_weight)
    info = train_decoder_on_caches(args.cache, args.out, cfg, size=args.size, spatial_channels=args.spatial_channels,
                                   export=args.export, resume=args.resume, stop_at=args.stop_at,
                                   max_minutes=args.max_minutes, storyworld=args.storyworld,
                                   command=args.command_line, keyframe_attention=args.keyframe_attention,
                                   init=args.init, save_dtype=args.save_dtype)
    if info is not None:
        print(json.dumps(info, indent=1))
    return 0


def build_parser(entries: tuple[str, ...] = JOBS) -> argparse.ArgumentParser:
    return build_registry_parser("python -m sdlite.train", "sdlite training jobs", "job", entries)


def main(argv: list[str] | None = None) -> int:
    return run_module_command(build_parser(), "job", argv)


# ----------------------------------------------------------------------------------------------------------
# id-encoder: PhotoMaker's ID encoder, trained in storyworld
# ----------------------------------------------------------------------------------------------------------
def add_id_encoder_parser(sub) -> None:
    ap = sub.add_parser("id-encoder", help="storyworld's PhotoMaker ID encoder (tower, FuseModule, UNet LoRA)",
                        description="Train storyworld's ID encoder on reference -> target render pairs "
                                    "(sdlite.train.id_encoder).")
    ap.add_argument("--out", required=True, help="run folder (checkpoint, log.csv), e.g. runs/id_encoder")
    ap.add_argument("--export", default=None, help="ID encoder folder written at the end, e.g. "
                                                    "data/storyworld/id_encoder")
    ap.add_argument("--force", action="store_true", help="allow --export to replace an existing folder")
    ap.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    ap.add_argument("--tower-steps", type=int, default=None, help="stage 1 steps (tower + label heads)")
    ap.add_argument("--steps", type=int, default=None, help="stage 2 steps (diffusion loss on ID pairs)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--decay-steps", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None, help="stage 2's rate (projections, FuseModule, LoRA)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--hair-weight", type=float, default=None, help="extra loss weight on the hair's latent cells")
    ap.add_argument("--high-noise-weight", type=float, default=None, help="cap of the noisy timesteps' weight")
    ap.add_argument("--label-weight", type=float, default=None, help="weight of the tower's label heads in stage 2")
    ap.add_argument("--lora-targets", default=None, help="UNet layers with a LoRA, comma-separated (default "
                    "to_q,to_k,to_v,to_out.0: every attention layer; add conv1,conv2 for the ResNet blocks)")
    ap.add_argument("--init", default=None, help="start from this trained ID encoder folder (e.g. to fine-tune "
                                                 "data/storyworld/id_encoder with another recipe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None, help="stop (with a checkpoint) after this time")
    ap.add_argument("--storyworld", default=None, help="pipeline folder (default data/storyworld)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_option(ap)
    ap.set_defaults(func=run_id_encoder)


def run_id_encoder(args) -> int:
    import dataclasses

    from ..train.id_encoder import IDTrainConfig, train_id_encoder

    set_threads(args)
    overrides = {k: getattr(args, k) for k in ("tower_steps", "steps", "batch_size", "decay_steps", "lr", "warmup",
                                               "hair_weight", "high_noise_weight", "label_weight")
                 if getattr(args, k) is not None}
    if args.lora_targets is not None:
        overrides["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    cfg = dataclasses.replace(IDTrainConfig(seed=args.seed), **overrides)
    train_id_encoder(args.out, cfg, export=args.export, resume=args.resume, force=args.force,
                     max_minutes=args.max_minutes, progress=not args.quiet, command=args.command_line,
                     storyworld=args.storyworld, init=args.init)
    if args.export:
        print(f"wrote {args.export}")
    return 0
