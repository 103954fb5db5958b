"""Seeds, checked in one place: every random step in sdlite takes a seed or a `torch.Generator`, and nothing
touches the caller's global random state."""
from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")


def check_seed(seed) -> int:
    """A seed must be a plain int (not a bool, not a float): returns it as int, else a ValueError."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    return int(seed)


def seeded(seed: int, build: Callable[[], T]) -> T:
    """`build()` with torch's global RNG seeded by `seed` inside a fork, so the weights a constructor draws are
    a function of `seed` and the caller's global RNG is left as it was."""
    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def step_generator(seed: int, step: int, *stream: int) -> torch.Generator:
    """The generator of one training step's randomness, a pure function of (seed, step, *stream): a resumed run
    draws exactly what an uninterrupted one would have drawn."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step, *stream]).generate_state(1)[0]))
