"""Consistency metrics for generated stories (the paper's Table 1, in storyworld).

* **Identity agreement**: the attribute recognizer (:mod:`sdlite.storyworld.recognizer`) reads hair, shirt, trousers and hat
  off every panel; for one attribute, the fraction of panel *pairs* of a story whose predictions agree. 1.0: the
  character looks the same in every panel; about 1/(number of values) for panels drawn independently at random.
  (Transitions have their own measure, the frame identity agreement of `sdlite.eval.video_metrics`.)
* **Scene / action accuracy**: the recognizer's scene and action against the ones the prompt asked for.
* **CLIP-T**: mean cosine similarity of each panel's storyworld-CLIP image embedding with its prompt's text
  embedding. **CLIP-I**: mean cosine similarity between the image embeddings of the panel pairs of a story
  (the paper's "character similarity" uses CLIP image embeddings the same way).
"""
from __future__ import annotations

from itertools import combinations

import numpy as np
import torch
import torch.nn.functional as F

from ..images import as_batch
from ..storyworld import world as sw

__all__ = [
    "clip_i",
    "clip_t",
    "clip_image_embeddings",
    "clip_text_embeddings",
    "identity_agreement",
    "label_accuracy",
    "mean_rows",
    "pair_agreement",
    "score_story",
]


def pair_agreement(labels) -> float:
    """Fraction of unordered pairs (i < j) with labels[i] == labels[j] (indices or values); 1.0 for < 2 labels."""
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
    pairs = list(combinations(labels, 2))
    if not pairs:
        return 1.0
    return sum(a == b for a, b in pairs) / len(pairs)


def identity_agreement(predictions: dict[str, torch.Tensor],
                       attributes: tuple[str, ...] = sw.IDENTITY_ATTRIBUTES) -> dict[str, float]:
    """Per-attribute pair agreement of one story's predicted labels {name: (n,)}, plus their ``"mean"``."""
    missing = [a for a in attributes if a not in predictions]
    if missing:
        raise ValueError(f"predictions lack {missing}: pass the recognizer's output (Recognizer.predict(images))")
    out = {a: pair_agreement(predictions[a]) for a in attributes}
    out["mean"] = float(np.mean([out[a] for a in attributes]))
    return out


def label_accuracy(predicted, target) -> float:
    """Fraction of positions where predicted == target (label indices or value strings)."""
    predicted = predicted.tolist() if isinstance(predicted, torch.Tensor) else list(predicted)
    target = target.tolist() if isinstance(target, torch.Tensor) else list(target)
    if len(predicted) != len(target) or not target:
        raise ValueError(f"need as many predictions as targets (> 0), got {len(predicted)} and {len(target)}")
    return sum(p == t for p, t in zip(predicted, target)) / len(target)


# ----------------------------------------------------------------------------------------------------
# CLIP scores with storyworld's CLIP (any transformers CLIPModel works)
# ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def clip_image_embeddings(clip, images) -> torch.Tensor:
    """Unit-norm image embeddings (n, P). images: uint8 (n, H, W, 3) or float (n, 3, H, W) in [-1, 1]
    (storyworld's CLIP reads 64x64 in [-1, 1] without further normalisation)."""
    size = clip.config.vision_config.image_size
    x = as_batch(images)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    param = next(clip.parameters())
    pooled = clip.vision_model(pixel_values=x.to(param.device, param.dtype)).pooler_output  # (n, hidden)
    return F.normalize(clip.visual_projection(pooled).float(), dim=-1)  # (n, P)


@torch.no_grad()
def clip_text_embeddings(clip, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Unit-norm text embeddings (n, P) of the prompts (padded/truncated to the tokenizer's length)."""
    param = next(clip.parameters())
    ids = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids.to(param.device)
    pooled = clip.text_model(input_ids=ids).pooler_output  # (n, hidden)
    return F.normalize(clip.text_projection(pooled).float(), dim=-1)


def clip_t(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """Mean cosine between each image and its own prompt: (n, P), (n, P) -> float."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"one prompt per image: got {tuple(image_emb.shape)} images and {tuple(text_emb.shape)} texts")
    return float((image_emb * text_emb).sum(-1).mean())


def clip_i(image_emb: torch.Tensor) -> float:
    """Mean cosine over the unordered image pairs of one story: (n, P) -> float (1.0 for one image)."""
    n = image_emb.shape[0]
    if n < 2:
        return 1.0
    sim = image_emb @ image_emb.T  # (n, n)
    i, j = torch.triu_indices(n, n, offset=1)
    return float(sim[i, j].mean())


def score_story(images: np.ndarray, prompts: list[str], scenes: list[str], actions: list[str], recognizer,
                clip=None, clip_tokenizer=None) -> dict[str, float]:
    """All metrics of one story: uint8 panels (n, H, W, 3), their prompts and the scenes/actions asked for.

    Returns identity_agreement (mean) and identity_<attribute>, scene_accuracy, action_accuracy, and with
    ``clip`` also clip_i and clip_t.
    """
    n = len(images)
    if not (len(prompts) == len(scenes) == len(actions) == n):
        raise ValueError(f"one prompt, scene and action per panel: got {n} images, {len(prompts)} prompts, "
                         f"{len(scenes)} scenes, {len(actions)} actions")
    pred = recognizer.predict(np.asarray(images))
    agree = identity_agreement(pred)
    row = {"identity_agreement": agree["mean"], **{f"identity_{a}": agree[a] for a in sw.IDENTITY_ATTRIBUTES},
           "scene_accuracy": label_accuracy([sw.SCENES[i] for i in pred["scene"].tolist()], scenes),
           "action_accuracy": label_accuracy([sw.ACTIONS[i] for i in pred["action"].tolist()], actions)}
    if clip is not None:
        if clip_tokenizer is None:
            raise ValueError("clip scores need the CLIP tokenizer too: pass clip_tokenizer (load_storyworld_clip())")
        img = clip_image_embeddings(clip, np.asarray(images))
        row["clip_i"] = clip_i(img)
        row["clip_t"] = clip_t(img, clip_text_embeddings(clip, clip_tokenizer, prompts))
    return row


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of per-story metric rows."""
    if not rows:
        raise ValueError("no rows to average")
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
