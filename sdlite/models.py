"""Forwarding alias: storyworld's tiny models live in `sdlite.storyworld.models`.

Kept so that code written against the earlier layout (`from sdlite.models import load_storyworld`) runs unchanged.
New code imports `sdlite.storyworld.models`.
"""
from .storyworld.models import *  # noqa: F401,F403
from .storyworld.models import load_storyworld, load_storyworld_clip  # noqa: F401  (the names most used)
