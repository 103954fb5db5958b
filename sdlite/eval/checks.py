"""Quick checks of a trained storyworld pipeline, scored by the recognizer: prompt following, the VAE's
reconstructions, and CSA on / off on short stories. The storyworld evaluation (`sdlite.eval.storyworld`) builds its
bars from them; `python -m sdlite.eval check` runs them on any training run's export.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..attention import install_consistent_attention
from ..images import to_uint8, unit_to_uint8
from ..storyworld import world as sw
from ..storyworld.datasets import ImageDataset


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    batch: int | None = None) -> np.ndarray:
    """uint8 (n, H, W, 3): one image per prompt, image i from `torch.Generator().manual_seed(seeds[i])`, in pipeline
    calls of `batch` prompts (None: one call)."""
    batch = batch or max(1, len(prompts))
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        images = pipe(prompt=prompts[i : i + batch], num_inference_steps=steps, guidance_scale=guidance,
                      generator=gens, output_type="np").images
        out.append(unit_to_uint8(images))
    return np.concatenate(out)


@torch.no_grad()
def prompt_following(pipe, recognizer, n: int = 120, steps: int = 25, guidance: float = 5.0, seed: int = 0,
                     batch: int = 8) -> dict[str, float]:
    """Accuracy of every label on images generated from prompts that state every attribute."""
    return prompt_following_scores(pipe, {"main": recognizer}, n, steps, guidance, seed, batch)["accuracy"]["main"]


@torch.no_grad()
def prompt_following_scores(pipe, recognizers: dict, n: int = 120, steps: int = 25, guidance: float = 5.0,
                            seed: int = 0, batch: int = 8) -> dict:
    """Prompt following read by several scorers at once, to see how much of a miss is the scorer's.

    Returns {"accuracy": {scorer: {label: fraction}}} and, with two or more scorers (the first two are compared):
    "agreement" {label: fraction of images where both give the same value} and "accuracy_where_agreed"
    {label: accuracy on those images only}, a reading less blurred by one scorer's mistakes.
    """
    rng = np.random.default_rng([seed, 31])
    panels = [sw.sample_panel(rng) for _ in range(n)]
    preds = {name: {a: [] for a in sw.ATTRIBUTES} for name in recognizers}
    for i in range(0, n, batch):
        chunk = panels[i : i + batch]
        imgs = generate_images(pipe, [sw.caption(p) for p in chunk], [seed * 100003 + i + j for j in range(len(chunk))],
                         steps, guidance)
        for name, rec in recognizers.items():
            pred = rec.predict(imgs)
            for a in sw.ATTRIBUTES:
                preds[name][a] += [int(v) for v in pred[a]]
    truth = {a: np.array([sw.labels(p)[a] for p in panels]) for a in sw.ATTRIBUTES}
    pred = {name: {a: np.array(v) for a, v in d.items()} for name, d in preds.items()}
    out = {"accuracy": {name: {a: float(np.mean(d[a] == truth[a])) for a in sw.ATTRIBUTES} for name, d in pred.items()}}
    if len(recognizers) >= 2:
        first, second = (pred[name] for name in list(recognizers)[:2])
        same = {a: first[a] == second[a] for a in sw.ATTRIBUTES}
        out["agreement"] = {a: float(same[a].mean()) for a in sw.ATTRIBUTES}
        out["accuracy_where_agreed"] = {a: float(np.mean(first[a][same[a]] == truth[a][same[a]])) if same[a].any()
                                        else float("nan") for a in sw.ATTRIBUTES}
    return out


@torch.no_grad()
def vae_check(vae, recognizer, n: int = 128, seed: int = 0) -> dict:
    """Mean |x - D(E(x))| on held-out renders, and the recognizer's accuracy on the renders vs reconstructions."""
    data = ImageDataset(n, seed=seed + 4242)
    x = torch.stack([data[i]["pixel_values"] for i in range(n)])
    rec = torch.cat([vae.decode(vae.encode(x[i : i + 32]).latent_dist.mean).sample for i in range(0, n, 32)])
    truth = {k: torch.tensor([data[i]["labels"][k] for i in range(n)]) for k in sw.ATTRIBUTES}
    p_orig, p_rec = recognizer.predict(to_uint8(x)), recognizer.predict(to_uint8(rec))
    return {"l1": float((rec.clamp(-1, 1) - x).abs().mean()),
            "accuracy_renders": {k: float((p_orig[k] == truth[k]).float().mean()) for k in truth},
            "accuracy_reconstructions": {k: float((p_rec[k] == truth[k]).float().mean()) for k in truth}}


def story_panels(rng: np.random.Generator, k: int) -> list:
    ch = sw.sample_character(rng)
    scenes = [sw.SCENES[j] for j in rng.permutation(len(sw.SCENES))[:k]]
    return [sw.sample_panel(rng, ch, scene=s) for s in scenes]


@torch.no_grad()
def csa_check(pipe, recognizer, stories: int = 32, k: int = 4, steps: int = 25, guidance: float = 5.0,
              seed: int = 0, settings: dict | None = None, verbose: bool = False) -> dict[str, dict[str, float]]:
    """Identity agreement and scene accuracy of k-panel stories whose prompts leave the identity unsaid.

    `settings`: name -> None (plain attention) or kwargs of `install_consistent_attention` (guidance halves
    on, tile k); names ending in "shared" use one seed for all panels, the others independent noise.
    Identity agreement = fraction of panel pairs whose predicted attribute agrees, per identity attribute.
    """
    settings = settings or {"none": None, "csa": dict(rate=0.5, layers="all")}
    rng = np.random.default_rng([seed, 41])
    stories_panels = [story_panels(rng, k) for _ in range(stories)]
    results = {}
    for name, kwargs in settings.items():
        handle = None
        if kwargs is not None:
            handle = install_consistent_attention(pipe.unet, tile=k, stride=k, guidance_halves=True,
                                                  seed=seed, **kwargs)
        agree = {a: [] for a in sw.IDENTITY_ATTRIBUTES}
        scene = []
        try:
            for s, panels in enumerate(stories_panels):
                prompts = [sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES) for p in panels]
                seeds = [seed * 7919 + s * k] * k if name.endswith("shared") else [seed * 7919 + s * k + j
                                                                                      for j in range(k)]
                pred = recognizer.predict(generate_images(pipe, prompts, seeds, steps, guidance))
                for a in sw.IDENTITY_ATTRIBUTES:
                    v = pred[a].tolist()
                    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
                    agree[a].append(np.mean([v[i] == v[j] for i, j in pairs]))
                truth = [sw.labels(p)["scene"] for p in panels]
                scene += [int(pred["scene"][j]) == truth[j] for j in range(k)]
        finally:
            if handle is not None:
                handle.remove()
        row = {f"agree_{a}": float(np.mean(v)) for a, v in agree.items()}
        row["identity_agreement"] = float(np.mean([row[f"agree_{a}"] for a in sw.IDENTITY_ATTRIBUTES]))
        row["scene_accuracy"] = float(np.mean(scene))
        results[name] = row
        if verbose:
            print(name, json.dumps(row), flush=True)
    return results


def run_checks(folder: str | os.PathLike | None, out: str | os.PathLike, recognizer: str | os.PathLike | None = None,
               prompts: int = 120, stories: int = 32, guidance: float = 5.0, seed: int = 0,
               rates: list[float] | None = None, command: str = "", log=print) -> dict:
    """The job behind `python -m sdlite.eval check`: every check on the pipeline in `folder` (None: the shipped
    storyworld), written to `<out>/check.json`; with `rates`, only a sweep of CSA sampling rates (all
    self-attention layers, disjoint tiles of 4) to `<out>/check_rates.json`."""
    from ..storyworld.models import load_storyworld
    from ..storyworld.recognizer import load_recognizer

    pipe = load_storyworld(folder=folder)
    rec = load_recognizer(recognizer)
    t0 = time.time()
    verbose = log is not None
    if rates:
        settings = {f"csa_rate{r:g}": dict(rate=r, layers="all") for r in rates}
        res = {"csa": csa_check(pipe, rec, stories=stories, guidance=guidance, seed=seed, settings=settings,
                                verbose=verbose)}
        name = "check_rates.json"
    else:
        res = {"vae": vae_check(pipe.vae, rec, seed=seed)}
        res["prompt_following"] = prompt_following(pipe, rec, n=prompts, guidance=guidance, seed=seed)
        if log:
            log(json.dumps(res, indent=1))
        settings = {"none": None, "csa": dict(rate=0.5, layers="all"), "csa_up": dict(rate=0.5, layers="up"),
                    "none_shared": None, "csa_shared": dict(rate=0.5, layers="all")}
        res["csa"] = csa_check(pipe, rec, stories=stories, guidance=guidance, seed=seed, settings=settings,
                               verbose=verbose)
        name = "check.json"
    res["command"] = command
    res["seconds"] = time.time() - t0
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    return res
