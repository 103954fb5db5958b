"""`sdlite video START END --out clip.gif`: a transition video between two keyframes."""
from __future__ import annotations

import argparse
from pathlib import Path

# sdlite.video.MODES without the ceiling mode (a user has no true embeddings), listed here to keep imports light.
USER_MODES = ("full", "no_predictor", "temporal_only")
# sdlite.frame_polish.STORYWORLD_POLISH_STRENGTH (a test keeps them equal): what `--polish` alone means
POLISH_STRENGTH = 0.5


def add_polish_option(p, flag: str = "--polish") -> None:
    """The polish option of `sdlite video` and `sdlite story --video` (sdlite.frame_polish)."""
    p.add_argument(flag, type=float, nargs="?", const=POLISH_STRENGTH, default=0.0, metavar="S",
                   help=f"the image model then redraws the in-between frames, reading the keyframes: {flag} alone "
                        f"uses {POLISH_STRENGTH} (chosen on tuning clips: the character is kept better, the "
                        "frames follow the motion less closely; results/motion.json); 0: off (default)")


def check_polish(value: float, flag: str = "--polish") -> None:
    if not 0.0 <= value <= 1.0:  # (NaN fails too)
        raise ValueError(f"{flag} {value}: a strength in [0, 1] (e.g. {POLISH_STRENGTH}; 0 turns it off)")


def add_video_parser(subparsers, name: str = "video") -> argparse.ArgumentParser:
    """Register the `video` command on an argparse subparsers object (sdlite.cli does this)."""
    p = subparsers.add_parser(name, help="a transition video between two keyframes",
                              description="Generate a transition video between two keyframes with the semantic "
                                          "motion predictor and the video decoder (storyworld models by default).")
    p.add_argument("start", help="start keyframe (PNG/JPEG)")
    p.add_argument("end", help="end keyframe (PNG/JPEG)")
    p.add_argument("--frames", type=int, default=16, help="frames of the transition, keyframes included")
    p.add_argument("--out", required=True, help="output .mp4, .gif or .png (a strip of frames)")
    p.add_argument("--prompt", default="", help="what the clip shows (optional)")
    p.add_argument("--mode", default="full", choices=USER_MODES)
    p.add_argument("--steps", type=int, default=20, help="denoising steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strength", type=float, default=1.0, help="1: start from noise; <1: from the noised "
                                                                "latent interpolation")
    add_polish_option(p)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--scale", type=int, default=4, help="upscale frames this many times (nearest) when writing")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    p.set_defaults(func=run_video)
    return p


def check_keyframe(path: str) -> None:
    """A keyframe must be a readable picture of a sane size; checked before any model loads."""
    from ..images import check_picture_file

    check_picture_file(path, "keyframe")


def run_video(args) -> int:
    from ..paths import check_target, write_all_or_nothing
    from ..quiet import quiet_libraries

    out = check_target(args.out, args.force)  # refuse before any work
    if out.suffix.lower() not in (".mp4", ".gif", ".png"):
        raise ValueError(f"--out {out}: write .mp4, .gif or .png (a strip of frames)")
    if args.fps < 1 or args.scale < 1 or args.steps < 1:
        raise ValueError(f"--fps {args.fps}, --scale {args.scale}, --steps {args.steps}: each must be 1 or more")
    check_polish(args.polish)
    for key in (args.start, args.end):
        check_keyframe(key)
    quiet_libraries()  # the cheap checks are done: from here on, libraries load (without their bars)
    from ..motion import check_frames
    from ..video import generate_transition, write_video

    check_frames(args.frames)
    video = generate_transition(args.start, args.end, args.frames, prompt=args.prompt, mode=args.mode,
                                steps=args.steps, seed=args.seed, strength=args.strength, polish=args.polish)
    write_all_or_nothing({out: lambda p: write_video(p, video, fps=args.fps, scale=args.scale, force=True)},
                         force=args.force)
    print(f"wrote {out} ({video.shape[0]} frames)")
    return 0
