"""sdlite's command lines: everything that parses argv or prints for a person.

    sdlite story ... / sdlite video ...        the user's command (`cli.story`, `cli.video`)
    python -m sdlite.train <what> ...          training (`cli.train`)
    python -m sdlite.eval <table> ...          evaluations (`cli.eval`)

Each command module has `add_<name>_parser(subparsers)`, which adds its parser and sets `func` (called with the
parsed arguments; returns the exit code). Parsers are built with light imports only: torch, diffusers and the
models are imported inside the `func`s, so `sdlite --help` answers at once. Bad input is one line on stderr and
exit code 2 (`run_registry_parser`).
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["SUBCOMMANDS", "add_threads_option", "build_parser", "build_registry_parser", "main", "run_module_command",
           "run_registry_parser", "set_threads"]

MAX_MESSAGE = 400  # characters of an error line (a 1 MB story line is not echoed back)
SUBCOMMANDS: tuple[str, ...] = (
    "sdlite.cli.story:add_story_parser",
    "sdlite.cli.video:add_video_parser",
)


def build_registry_parser(prog: str, description: str, dest: str, entries: tuple[str, ...]) -> argparse.ArgumentParser:
    """A parser with one subcommand per "module:function" entry (the function adds its subparser)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest=dest, metavar=dest.upper())
    for entry in entries:
        module, _, function = entry.partition(":")
        getattr(importlib.import_module(module), function)(sub)
    return parser


def run_registry_parser(parser: argparse.ArgumentParser, dest: str, argv: list[str] | None = None,
                        quiet: bool = True) -> int:
    """Parse, call the chosen subcommand's ``func``; bad input becomes one clear line on stderr and exit code 2.
    ``quiet``: silence the libraries first (it imports them: the `sdlite` command's jobs do it themselves, after
    their cheap checks, so a bad option is answered at once)."""
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    if quiet:
        from ..quiet import quiet_libraries

        quiet_libraries()  # a person reads this output: sdlite's progress and messages, not the libraries' bars
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted; nothing new was written", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a person reads this: one line, the traceback only with --debug
        if getattr(args, "debug", False):
            raise
        expected = isinstance(err, (ValueError, FileExistsError, FileNotFoundError, TypeError, PermissionError))
        message = " ".join(str(err).split())
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 20] + " ... (shortened)"
        kind = "" if expected else f"{type(err).__name__}: "
        hint = "" if expected or not hasattr(args, "debug") else " (run again with --debug for the traceback)"
        print(f"{parser.prog} {getattr(args, dest)}: error: {kind}{message}{hint}", file=sys.stderr)
        return 2


def add_threads_option(parser: argparse.ArgumentParser, default: int | None = None) -> None:
    parser.add_argument("--threads", type=int, default=default,
                        help="torch threads (1 is fastest for the tiny models on a busy 2-core CPU)")


def run_module_command(parser: argparse.ArgumentParser, dest: str, argv: list[str] | None = None) -> int:
    """`python -m sdlite.<room> ...`: like `run_registry_parser`, and the command line itself is handed to the job
    as `args.command_line` (recorded next to the weights or results it writes)."""
    argv = list(argv if argv is not None else sys.argv[1:])
    parser.set_defaults(command_line=f"{parser.prog} " + " ".join(argv))
    return run_registry_parser(parser, dest, argv)


def set_threads(args) -> None:
    """An entry point's `--threads N`: torch.set_num_threads(N) (the library itself never sets global state).
    The storyworld models are tiny: one thread is fastest (two spin-wait on a busy 2-core machine)."""
    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads {threads}: use 1 or more")
        import torch

        torch.set_num_threads(threads)


def build_parser(subcommands: tuple[str, ...] = SUBCOMMANDS) -> argparse.ArgumentParser:
    return build_registry_parser("sdlite", "StoryDiffusion built from scratch (sdlite).", "command", subcommands)


def main(argv: list[str] | None = None) -> int:
    return run_registry_parser(build_parser(), "command", argv, quiet=False)
