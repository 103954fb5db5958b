"""storyworld's training data as torch Datasets: single images, collages (k panels of one character) and clips
(one character moving smoothly between two panels). Item i is a pure function of (seed, i)."""
from __future__ import annotations

from typing import Sequence

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..images import to_tensor
from .world import (
    ATTRIBUTES, CLASS_WORDS, CLIP_KINDS, HAIR_COLOURS, HATS, IDENTITY_ATTRIBUTES, SCENES, SHIRT_COLOURS,
    TROUSERS_COLOURS, Character, Panel, caption, check_size, clip_panels, labels, render, sample_character, sample_clip_endpoints,
    sample_panel,
)


# ----------------------------------------------------------------------------------------------------------
# Where the character is (training weighs its loss up there)
# ----------------------------------------------------------------------------------------------------------
def _contrast_character(ch: Character, attributes=IDENTITY_ATTRIBUTES) -> Character:
    """The same character with each of `attributes` changed to the next value (to find their pixels)."""
    def other(name):
        values = ATTRIBUTES[name]
        return values[(values.index(getattr(ch, name)) + 1) % len(values)]
    return dataclasses.replace(ch, **{name: other(name) for name in attributes})


def character_mask(panel: Panel, size: int = 64, latent_size: int = 16,
                   attributes: tuple[str, ...] = IDENTITY_ATTRIBUTES) -> torch.Tensor:
    """(latent_size, latent_size) float in {0, 1}: latent cells that show the character's identity attributes
    (by default hair, shirt, trousers and hat; `attributes=("hair",)` for the hair alone): where the render changes
    when those attributes change."""
    bad = set(attributes) - set(IDENTITY_ATTRIBUTES)
    if bad or not attributes:
        raise ValueError(f"attributes={attributes!r}: name one or more of {IDENTITY_ATTRIBUTES}")
    a = render(panel, size).astype(np.int16)
    b = render(dataclasses.replace(panel, character=_contrast_character(panel.character, attributes)),
               size).astype(np.int16)
    diff = torch.from_numpy((np.abs(a - b).sum(-1) > 30).astype(np.float32))[None, None]  # (1,1,H,W)
    return (F.adaptive_max_pool2d(diff, latent_size)[0, 0] > 0).float()


# ----------------------------------------------------------------------------------------------------------
# Datasets (item i is a pure function of (seed, i))
# ----------------------------------------------------------------------------------------------------------
def _item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), stream])


def _check_len(n, what: str) -> int:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 0:
        raise ValueError(f"{what}={n!r}: use a non-negative integer")
    return int(n)


def _check_index(i, n: int) -> int:
    if not isinstance(i, (int, np.integer)):
        raise TypeError(f"index must be an integer, got {type(i).__name__}")
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"index {i} out of range for a dataset of {n} items")
    return int(i)


def _stack_labels(panels: Sequence[Panel]) -> dict[str, torch.Tensor]:
    labs = [labels(p) for p in panels]
    return {name: torch.tensor([lab[name] for lab in labs], dtype=torch.long) for name in ATTRIBUTES}


class ImageDataset(Dataset):
    """Single panels: {"pixel_values": float32 (3, H, W) in [-1, 1], "caption": str, "labels": {name: int}}."""

    def __init__(self, n: int, seed: int = 0, size: int = 64, drop_prob: float = 0.5):
        self.n = _check_len(n, "n")
        check_size(size)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob={drop_prob} is outside [0, 1]")
        self.seed, self.size, self.drop_prob = int(seed), int(size), float(drop_prob)

    def __len__(self) -> int:
        return self.n

    def panel(self, i: int) -> tuple[Panel, np.random.Generator]:
        rng = _item_rng(self.seed, _check_index(i, self.n), 1)
        return sample_panel(rng), rng

    def __getitem__(self, i: int) -> dict:
        p, rng = self.panel(i)
        return {"pixel_values": to_tensor(render(p, self.size)),
                "caption": caption(p, rng, self.drop_prob), "labels": labels(p)}


class CollageDataset(Dataset):
    """Groups of k panels of ONE character in different scenes / actions.

    Item: {"pixel_values": (k, 3, H, W), "captions": list of k str, "labels": {name: LongTensor (k,)}}.
    With `identity_in_one_caption`, one caption of the group (at a random place) states every identity
    attribute and the others state none, so a model can only get the identity right by copying it across
    the group; otherwise each caption drops attributes independently with `drop_prob`.
    """

    def __init__(self, n_groups: int, k: int = 4, seed: int = 0, size: int = 64, drop_prob: float = 0.5,
                 identity_in_one_caption: bool = False):
        self.n = _check_len(n_groups, "n_groups")
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r}: a collage needs k >= 1 panels (e.g. k=4)")
        check_size(size)
        if not 0.0 <= drop_prob <= 1.0:
            raise ValueError(f"drop_prob={drop_prob} is outside [0, 1]")
        self.k, self.seed, self.size, self.drop_prob = int(k), int(seed), int(size), float(drop_prob)
        self.identity_in_one_caption = bool(identity_in_one_caption)

    def __len__(self) -> int:
        return self.n

    def panels(self, i: int) -> tuple[list[Panel], np.random.Generator]:
        rng = _item_rng(self.seed, _check_index(i, self.n), 2)
        ch = sample_character(rng)
        # different scenes (cycling through a permutation when k > number of scenes), random actions
        order = [SCENES[j] for j in rng.permutation(len(SCENES))]
        return [sample_panel(rng, ch, scene=order[j % len(order)]) for j in range(self.k)], rng

    def __getitem__(self, i: int) -> dict:
        panels, rng = self.panels(i)
        if self.identity_in_one_caption:
            stated = int(rng.integers(self.k))
            caps = [caption(p, drop=() if j == stated else IDENTITY_ATTRIBUTES) for j, p in enumerate(panels)]
        else:
            caps = [caption(p, rng, self.drop_prob) for p in panels]
        return {"pixel_values": torch.stack([to_tensor(render(p, self.size)) for p in panels]),
                "captions": caps, "labels": _stack_labels(panels)}


class ClipDataset(Dataset):
    """One character moving smoothly between two panels, every in-between frame rendered.

    Item: {"frames": float32 (L, 3, H, W) in [-1, 1], "caption": str (the first panel, fully described,
    then the last action), "captions": [first, last] panel captions, "labels": {name: LongTensor (L,)}
    (per frame; the action switches at the midpoint), "kind": str}.
    """

    def __init__(self, n: int, frames: int = 16, seed: int = 0, size: int = 64):
        self.n = _check_len(n, "n")
        if not isinstance(frames, (int, np.integer)) or frames < 2:
            raise ValueError(f"frames={frames!r}: a clip needs at least 2 frames (its two endpoints)")
        check_size(size)
        self.frames, self.seed, self.size = int(frames), int(seed), int(size)

    def __len__(self) -> int:
        return self.n

    def panels(self, i: int) -> tuple[list[Panel], str]:
        rng = _item_rng(self.seed, _check_index(i, self.n), 3)
        kind = CLIP_KINDS[rng.integers(len(CLIP_KINDS))]
        a, b, cycles = sample_clip_endpoints(rng, kind=kind)
        return clip_panels(a, b, self.frames, cycles), kind

    def __getitem__(self, i: int) -> dict:
        panels, kind = self.panels(i)
        a, b = panels[0], panels[-1]
        text = caption(a)
        if b.action != a.action:
            text += f", then {b.action}"
        return {"frames": torch.stack([to_tensor(render(p, self.size)) for p in panels]),
                "caption": text, "captions": [caption(a), caption(b)], "labels": _stack_labels(panels),
                "kind": kind}


# ----------------------------------------------------------------------------------------------------------
# ID pairs: reference renders of a character -> a target render of the same character (the ID encoder's data)
# ----------------------------------------------------------------------------------------------------------
HELD_OUT_EVERY = 5  # one character in five is never shown to the ID encoder in training (its evaluation's)


def is_held_out(character: Character) -> bool:
    """True for the characters kept out of the ID encoder's training (a fixed fifth of the 1920, every attribute
    value still seen in training, only its combinations held out): the evaluation's references come from these."""
    key = (CLASS_WORDS.index(character.class_word), HAIR_COLOURS.index(character.hair),
           SHIRT_COLOURS.index(character.shirt), TROUSERS_COLOURS.index(character.trousers), HATS.index(character.hat))
    return int(np.random.SeedSequence([2024, *key]).generate_state(1)[0]) % HELD_OUT_EVERY == 0


def sample_split_character(rng: np.random.Generator, held_out: bool) -> Character:
    """A uniformly random character of one split (training: `held_out=False`; evaluation: True)."""
    while True:
        ch = sample_character(rng)
        if is_held_out(ch) == held_out:
            return ch


def id_caption(panel: Panel, trigger_word: str = "img") -> str:
    """The ID prompt of a panel: class word, trigger, action and scene, the identity left unsaid
    ("a girl img, waving on the beach", as `[Lily] a girl img` + `[Lily] waving on the beach` in a story)."""
    plain = caption(panel, drop=IDENTITY_ATTRIBUTES)  # "a girl, waving on the beach"
    word = f"a {panel.character.class_word}"
    return f"{word} {trigger_word}{plain[len(word):]}"


class IDPairDataset(Dataset):
    """References -> target, one character (PhotoMaker's training pairs, made by the renderer).

    Item: {"references": uint8 (n, H, W, 3) renders of the character in other scenes and poses, "pixel_values":
    float32 (3, H, W) in [-1, 1] the target, "caption": its ID prompt (identity unsaid, `id_caption`), "mask":
    (H/4, W/4) the character's latent cells, "hair_mask": (H/4, W/4) those of its hair, "labels": {name: int} of the
    target}. Characters come from the training split (`held_out=False`) or the held-out one.
    """

    def __init__(self, n: int, num_references: int = 1, seed: int = 0, size: int = 64, held_out: bool = False):
        self.n = _check_len(n, "n")
        if isinstance(num_references, bool) or not isinstance(num_references, (int, np.integer)) \
                or num_references < 1:
            raise ValueError(f"num_references={num_references!r}: use at least one reference image")
        check_size(size)
        self.num_references, self.seed, self.size, self.held_out = int(num_references), int(seed), int(size), held_out

    def __len__(self) -> int:
        return self.n

    def panels(self, i: int) -> tuple[list[Panel], Panel]:
        """(reference panels, target panel): the same character, the target in a scene no reference shows."""
        rng = _item_rng(self.seed, _check_index(i, self.n), 4)
        ch = sample_split_character(rng, self.held_out)
        order = [SCENES[j] for j in rng.permutation(len(SCENES))]
        target = sample_panel(rng, ch, scene=order[0])
        refs = [sample_panel(rng, ch, scene=order[1 + j % (len(order) - 1)]) for j in range(self.num_references)]
        return refs, target

    def __getitem__(self, i: int) -> dict:
        refs, target = self.panels(i)
        return {"references": np.stack([render(p, self.size) for p in refs]),
                "pixel_values": to_tensor(render(target, self.size)), "caption": id_caption(target),
                "mask": character_mask(target, self.size, self.size // 4),
                "hair_mask": character_mask(target, self.size, self.size // 4, ("hair",)), "labels": labels(target)}
