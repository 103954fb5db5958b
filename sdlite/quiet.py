"""Quiet libraries for a person reading the output (a notebook, the `sdlite` command).

transformers and diffusers print "Loading weights" bars, "Loading pipeline components" bars and a warning that
torchvision is missing (sdlite does not need it) on every model load. An entry point that shows its own progress
calls `quiet_libraries()` once; library code never does (it would change global state behind its caller's back).
"""
from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Errors only from transformers and diffusers, and no loading bars (sdlite's own progress bars stay)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    import diffusers
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
