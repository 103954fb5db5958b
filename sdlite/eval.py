"""Evaluations: ``python -m sdlite.eval <name> ...``.

    python -m sdlite.eval consistency --stories 50      the consistency table (sdlite.eval_story)
    python -m sdlite.eval storyworld ...                the storyworld model evaluation (its own module)

The same registry as the ``sdlite`` command (:mod:`sdlite.cli`): each entry is "module:function", where
``add_<name>_parser(subparsers)`` adds a subparser and sets ``func``.
"""
from __future__ import annotations

import argparse
import sys

from .cli import build_registry_parser, run_registry_parser

__all__ = ["EVALUATIONS", "build_parser", "main"]

EVALUATIONS: tuple[str, ...] = (
    "sdlite.eval_story:add_consistency_parser",
    "sdlite.eval_storyworld:add_storyworld_parser",
)


def build_parser(entries: tuple[str, ...] = EVALUATIONS) -> argparse.ArgumentParser:
    return build_registry_parser("python -m sdlite.eval", "sdlite evaluations", "evaluation", entries)


def main(argv: list[str] | None = None) -> int:
    return run_registry_parser(build_parser(), "evaluation", argv)


if __name__ == "__main__":
    sys.exit(main())
