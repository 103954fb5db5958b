"""storyworld: the course's toy world, with known ground truth, and everything that only makes sense in it.

- `world`: characters, scenes, actions, poses; the renderer (`render`), captions and labels; clip endpoints.
- `datasets`: single images, collages and clips as torch Datasets (item i a pure function of (seed, i)).
- `models`: the tiny SDXL-style UNet, VAE and CLIP built for storyworld, their tokenizer, and their loading
  (`load_storyworld`).
- `recognizer`: the attribute scorers that read every label off a picture.

`from sdlite import storyworld as sw` gives the world and its datasets (`sw.render`, `sw.ClipDataset`, ...); the
models and the recognizers are imported from their modules.
"""
from ..images import to_tensor, to_uint8
from .datasets import ClipDataset, CollageDataset, ImageDataset
from .world import *  # noqa: F401,F403  (the world's public names: sw.render, sw.Character, sw.SCENES, ...)
from .world import __all__ as _world_names

__all__ = [*_world_names, "ClipDataset", "CollageDataset", "ImageDataset", "to_tensor", "to_uint8"]
