"""The ``sdlite`` command: ``sdlite <subcommand> ...``.

Each subcommand lives in its own module as ``add_<name>_parser(subparsers)``: it adds its parser and sets
``func`` (called with the parsed arguments; returns the exit code). To add one, write that function and list
it in :data:`SUBCOMMANDS` ("module:function"). Modules are imported when the parser is built, so keep their
top-level imports light (torch/diffusers inside the run function).
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: tuple[str, ...] = (
    "sdlite.story:add_story_parser",
    "sdlite.video:add_video_parser",
)


def build_parser(subcommands: tuple[str, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdlite", description="StoryDiffusion built from scratch (sdlite).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in subcommands:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as err:
        # bad input: one clear line, no traceback (the message names the fix)
        print(f"sdlite {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
