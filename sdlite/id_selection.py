"""Choosing among candidates: the panel whose ID embedding is closest to the reference's (notebook 04, issue #15).

The reference-image mode conditions every panel on the reference's ID embedding, yet a single draw of the noise
still misses small parts now and then (in storyworld: brown hair drawn black, the commonest miss). The ID encoder
that reads the reference can read the panels too. So each panel is drawn K times (K noise seeds), and the draw kept
is the one whose ID embedding points most nearly the way the references' do:

    e_ref = normalize(mean_r  normalize(ID(reference_r)))          (D,)    the character's direction
    s_j   = < normalize(ID(candidate_j)), e_ref >                   ()      cosine similarity, j = 0 .. K-1
    keep    argmax_j s_j                                                    (a tie keeps the earlier draw)

No scorer of the evaluation is used: the choice sees only the encoder the panels were conditioned with. It costs K
times the panels' sampling. Candidate j of a story draws with seed `seed + j * CANDIDATE_SEED_STRIDE`, so candidate
0 is the single draw (`candidates=1`) and no two candidates of nearby seeds share noise.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

CANDIDATE_SEED_STRIDE = 1_000_003  # a prime far above any story's panel count: candidate j's seeds never meet j+1's


def candidate_seeds(seed: int, candidates: int) -> list[int]:
    """The story seed of each draw: draw 0 is the single draw's `seed`."""
    return [seed + j * CANDIDATE_SEED_STRIDE for j in range(candidates)]


def check_candidates(candidates: int) -> int:
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates={candidates!r}: use a whole number >= 1 (1: a single draw per panel)")
    return candidates


@torch.no_grad()
def id_directions(encoder, images) -> torch.Tensor:
    """PIL images or uint8 (H, W, 3) arrays -> (n, D) unit ID embeddings (the encoder's `id_embeddings`)."""
    pixels = encoder.pixel_values(list(images))[:, None]  # (n, 1, 3, S, S): one ID image per row
    return F.normalize(encoder.id_embeddings(pixels)[:, 0].float(), dim=-1)


def reference_direction(encoder, references) -> torch.Tensor:
    """(D,) the references' mean unit ID embedding, normalised: the character's direction."""
    return F.normalize(id_directions(encoder, references).mean(0), dim=-1)


def reference_similarity(encoder, images, references=None, *, direction: torch.Tensor | None = None) -> torch.Tensor:
    """(n,) cosine similarity of each image's ID embedding to the references' direction (or a given `direction`)."""
    direction = reference_direction(encoder, references) if direction is None else direction
    return id_directions(encoder, images) @ direction


def pick_closest(encoder, runs: list, id_images: dict):
    """The candidates `runs` (StoryResults of one story, candidate j = runs[j]) -> one StoryResult whose panel i
    is the candidate closest to its character's references. Panels that name no character of `id_images`, or more
    than one character, keep candidate 0. settings["chosen_candidate"] says which candidate each panel kept."""
    if not runs:
        raise ValueError("pick_closest needs at least one candidate run")
    story = runs[0].story
    chosen = [0] * len(story)
    directions: dict[str, torch.Tensor] = {}  # each character's references embedded once
    for i, panel in enumerate(story.panels):
        if len(panel.characters) != 1 or panel.characters[0] not in id_images:
            continue
        name = panel.characters[0]
        if name not in directions:
            directions[name] = reference_direction(encoder, id_images[name])
        sims = reference_similarity(encoder, [run.images[i] for run in runs], direction=directions[name])
        chosen[i] = int(sims.argmax())  # argmax returns the first of equal maxima
    settings = {**runs[0].settings, "candidates": len(runs), "chosen_candidate": chosen}
    return dataclasses.replace(runs[0], images=[runs[j].images[i] for i, j in enumerate(chosen)],
                               seeds=[runs[j].seeds[i] for i, j in enumerate(chosen)], settings=settings)
