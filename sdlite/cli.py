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

__all__ = ["SUBCOMMANDS", "build_parser", "build_registry_parser", "main", "run_registry_parser"]

SUBCOMMANDS: tuple[str, ...] = (
    "sdlite.story:add_story_parser",
    "sdlite.video:add_video_parser",
)


def build_registry_parser(prog: str, description: str, dest: str, entries: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser with one subcommand per "module:function" entry (the function adds its subparser)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper())
    for entry in entries:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def run_registry_parser(parser: argparse.ArgumentParser, dest: str, argv: list[str] | None = None) -> int:
    """Parse, call the chosen subcommand's ``func``; bad input becomes one clear line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError, TypeError) as err:
        # bad input: one clear line, no traceback (the message names the fix)
        print(f"{parser.prog} {getattr(args, dest)}: error: {err}", file=sys.stderr)
        return 2


def build_parser(subcommands: tuple[str, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    return build_registry_parser("sdlite", "StoryDiffusion built from scratch (sdlite).", "command", subcommands)


def main(argv: list[str] | None = None) -> int:
    return run_registry_parser(build_parser(), "command", argv)


if __name__ == "__main__":
    sys.exit(main())
