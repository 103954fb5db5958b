"""Evaluations: ``python -m sdlite.eval <name> ...``.

    python -m sdlite.eval consistency --stories 50      the consistency table (sdlite.eval_story)
    python -m sdlite.eval storyworld ...                the storyworld model evaluation (its own module)

Same registry as sdlite/cli.py: each entry is "module:function", where ``add_<name>_parser(subparsers)`` adds a
subparser and sets ``func``. An entry whose module is not there yet is skipped.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["EVALUATIONS", "build_parser", "main"]

EVALUATIONS: tuple[str, ...] = (
    "sdlite.eval_story:add_consistency_parser",
    "sdlite.eval_storyworld:add_storyworld_parser",  # engineer C: the storyworld model evaluation
)


def build_parser(entries: tuple[str, ...] = EVALUATIONS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sdlite.eval", description="sdlite evaluations")
    sub = parser.add_subparsers(dest="evaluation", metavar="EVALUATION")
    for entry in entries:
        module, _, function = entry.partition(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:  # a real import error inside an existing module: show it
                raise
            continue
        getattr(mod, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"python -m sdlite.eval {args.evaluation}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
