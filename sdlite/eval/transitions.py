"""The paper's Table 2 in storyworld: transition videos against the true in-between frames.

Four methods make the frames between two keyframes of held-out clips (`ClipDataset(n, seed=EVAL_SEED)`):
(a) `latent_interpolation`, the cross-fade of the keyframes' latents, no model; (b) `no_predictor`, the decoder fed
linearly interpolated embeddings; (c) `temporal_only`, the decoder without embeddings; (d) `full`, the decoder fed
the semantic motion predictor's embeddings; and `true_embeddings`, the decoder fed the true ones (a ceiling).
On request, `full_polished`: (d), then the image model redraws the in-between frames reading the keyframes
(`sdlite.frame_polish`), at a strength chosen on other clips (`polish_sweep`, `TUNING_SEED`) unless given.
`python -m sdlite.eval transitions` writes results/motion.json (`summarize` gives its shape).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..frame_polish import check_strength, polish_latents
from ..motion import linear_interpolation, motion_dir
from ..storyworld.datasets import ClipDataset
from ..video import VideoModels, decode_latents, latent_interpolation_video, transition_latents
from .video_metrics import (
    IDENTITY_LABELS, clip_similarities, frame_identity_agreement, motion_amount, paired_difference_ci, video_metrics,
)

METHODS = ("latent_interpolation", "no_predictor", "temporal_only", "full", "true_embeddings")
POLISHED = "full_polished"  # (d) + the image model's redraw: run only when asked (it needs the image pipeline)
EVAL_SEED = 777  # held-out clips: ClipDataset(n, seed=EVAL_SEED); training caches use other seeds
TUNING_SEED = 4242  # the clips the polish strength is chosen on (neither training's nor the evaluation's)
POLISH_STRENGTHS = (0.1, 0.2, 0.3, 0.5)
PER_CLIP = ("psnr", "identity_agreement")  # kept clip by clip, for paired comparisons


def _truth_stats(models: VideoModels, x: torch.Tensor, true_e: torch.Tensor, recognizer) -> dict[str, torch.Tensor]:
    """What the true clips (B, L, 3, H, W) themselves score: motion, CLIPSIM, frame identity agreement."""
    b, frames = x.shape[:2]
    sims = clip_similarities(models.embedder.pooled(true_e))
    out = {"motion": motion_amount(x), "clipsim_first": sims["first"], "clipsim_frames": sims["frames"]}
    if recognizer is not None:
        pred = recognizer.predict(x.reshape(-1, *x.shape[2:]))
        out["identity_agreement"] = frame_identity_agreement({k: pred[k].view(b, frames) for k in IDENTITY_LABELS})
    return out


def _embedding_errors(models: VideoModels, true_e: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per clip, the squared error of the predicted and of the interpolated embeddings over the in-between frames
    (all parts, and the pooled part alone)."""
    frames = true_e.shape[1]
    out = {}
    for name, e in (("predictor", models.predictor(true_e[:, 0], true_e[:, -1], frames)),
                    ("linear", linear_interpolation(true_e[:, 0], true_e[:, -1], frames))):
        err = (e - true_e)[:, 1:-1]  # (B, L - 2, E): the in-between frames
        out[name] = err.pow(2).mean(dim=(1, 2))
        out[name + "_pooled"] = models.embedder.pooled(err).pow(2).mean(dim=(1, 2))
    return out


def _method_video(models: VideoModels, method: str, x: torch.Tensor, prompts: list[str], true_e: torch.Tensor,
                  steps: int, seed: int, strength: float, pin: bool, embed_guidance: float = 1.0,
                  pipe=None, polish_strength: float = 0.0) -> torch.Tensor:
    frames = x.shape[1]
    if method == "latent_interpolation":
        return latent_interpolation_video(models, x[:, 0], x[:, -1], frames)
    mode = "full" if method == POLISHED else method
    z = transition_latents(models, x[:, 0], x[:, -1], frames, prompts, mode, steps, seed, strength,
                           frame_embeds=true_e if method == "true_embeddings" else None, pin=pin,
                           embed_guidance=embed_guidance)
    if method == POLISHED:  # the same (d) latents, redrawn by the image model
        z = polish_latents(pipe, z, prompts, polish_strength, seed=seed)
    return decode_latents(models.vae, z)


def _means(values: dict[str, list]) -> dict[str, float]:
    return {k: float(torch.cat(v).mean()) for k, v in values.items()}


@torch.no_grad()
def evaluate(models: VideoModels, n_clips: int = 100, seed: int = EVAL_SEED, frames: int = 16, steps: int = 20,
             strength: float = 1.0, batch_size: int = 10, recognizer=None, methods=METHODS,
             progress: bool = False, pin: bool = True, embed_guidance: float = 1.0, pipe=None,
             polish_strength: float = 0.0) -> dict:
    """Compare the methods on `n_clips` held-out clips `ClipDataset(n_clips, frames, seed)` against their true
    frames (`full_polished` needs the image pipeline `pipe` and a `polish_strength`). Returns
    {"per_method": {method: {metric: mean}}, "per_kind_psnr": {method: {kind: mean}},
    "truth": {metric: mean of the true clips}, "predictor": errors of the predicted embeddings, ...}."""
    if POLISHED in methods and pipe is None:
        raise ValueError(f"method {POLISHED!r} needs the image pipeline: evaluate(..., pipe=load_pipeline())")
    data = ClipDataset(n_clips, frames=frames, seed=seed)
    per: dict[str, dict[str, list]] = {m: {} for m in methods}
    truth: dict[str, list] = {}
    errors: dict[str, list] = {}
    kinds: list[str] = []
    t0 = time.time()
    for first in range(0, n_clips, batch_size):
        items = [data[i] for i in range(first, min(n_clips, first + batch_size))]
        x = torch.stack([it["frames"] for it in items]).to(models.device)  # (B, L, 3, H, W)
        b = x.shape[0]
        kinds += [it["kind"] for it in items]
        true_e = models.embedder(x.reshape(-1, *x.shape[2:])).reshape(b, frames, -1)  # (B, L, E)
        if models.predictor is not None:
            for k, v in _embedding_errors(models, true_e).items():
                errors.setdefault(k, []).append(v)
        for k, v in _truth_stats(models, x, true_e, recognizer).items():
            truth.setdefault(k, []).append(v.cpu())
        for m in methods:
            video = _method_video(models, m, x, [it["caption"] for it in items], true_e, steps, seed + first,
                                  strength, pin, embed_guidance, pipe, polish_strength)
            for k, v in video_metrics(video, x, models.embedder, true_e, recognizer).items():
                per[m].setdefault(k, []).append(v.cpu())
        if progress:
            print(f"evaluated {first + b}/{n_clips} clips ({time.time() - t0:.0f}s)", flush=True)
    result = {"per_method": {m: _means(d) for m, d in per.items()}, "truth": _means(truth)}
    result["per_clip"] = {m: {k: torch.cat(v).tolist() for k, v in d.items() if k in PER_CLIP} for m, d in per.items()}
    kinds_arr = np.array(kinds)
    def per_kind(metric):
        return {m: {kind: float(torch.cat(per[m][metric])[torch.from_numpy(kinds_arr == kind)].mean())
                    for kind in sorted(set(kinds))} for m in methods if metric in per[m]}

    result["per_kind_psnr"] = per_kind("psnr")
    result["per_kind_identity"] = per_kind("identity_agreement")
    result["kind_counts"] = {kind: int((kinds_arr == kind).sum()) for kind in sorted(set(kinds))}
    if "full" in methods:  # (d)'s lead over every other method, per clip, with a bootstrap interval
        full = torch.cat(per["full"]["psnr"])
        result["psnr_lead_of_full"] = {m: paired_difference_ci(full, torch.cat(per[m]["psnr"]), seed=seed)
                                       for m in methods if m != "full"}
    if errors:
        e = {k: torch.cat(v).mean().item() for k, v in errors.items()}
        result["predictor"] = {"mse_predictor": e["predictor"], "mse_linear": e["linear"],
                               "ratio": e["predictor"] / e["linear"],
                               "ratio_pooled_part": e["predictor_pooled"] / e["linear_pooled"],
                               "image_grid": models.embedder.grid}
    result["seconds"] = round(time.time() - t0, 1)
    return result


def summarize(res: dict, command: str, **settings) -> dict:
    """The evaluation in results/motion.json's shape: the names the checks use, plus every metric and the bars.
    (`identity_agreement_full` is the frame identity agreement of (d); the key keeps its recorded name.)"""
    pm = res["per_method"]
    psnrs = {m: pm[m]["psnr"] for m in pm}
    ratio = res.get("predictor", {}).get("ratio", float("nan"))
    ident = pm.get("full", {}).get("identity_agreement", float("nan"))
    needed = ("full", "latent_interpolation", "no_predictor", "temporal_only")
    beats = all(psnrs["full"] > psnrs[m] for m in needed[1:]) if set(needed) <= set(psnrs) else None  # None: not run
    return {
        "command": command, **settings,
        "predictor_error_ratio_vs_linear": ratio,
        "psnr": psnrs,
        "identity_agreement_full": ident,
        "bars": {
            "predictor_error_ratio_le_0.7": bool(ratio <= 0.7),
            "full_beats_a_b_c_in_psnr": beats,
            "identity_agreement_full_ge_0.85": bool(ident >= 0.85),
        },
        **({"identity_agreement_full_polished": pm[POLISHED]["identity_agreement"]} if POLISHED in pm else {}),
        "metrics": pm, "truth": res["truth"], "per_kind_psnr": res["per_kind_psnr"],
        "per_kind_identity": res.get("per_kind_identity"),
        "kind_counts": res["kind_counts"], "psnr_lead_of_full": res.get("psnr_lead_of_full"),
        "predictor_errors": res.get("predictor"), "seconds": res["seconds"],
    }


def polish_sweep(models: VideoModels, pipe, recognizer, n_clips: int = 20, seed: int = TUNING_SEED,
                 strengths=POLISH_STRENGTHS, **settings) -> dict[str, dict[str, float]]:
    """(d) unpolished ("0") and polished at each strength on `n_clips` clips of `seed` (not the evaluation's):
    {strength: {"psnr", "identity_agreement"}}. `settings`: evaluate's frames, steps, strength, pin."""
    rows = {"0": evaluate(models, n_clips, seed, recognizer=recognizer, methods=("full",), **settings)}
    for s in strengths:
        rows[f"{s:g}"] = evaluate(models, n_clips, seed, recognizer=recognizer, methods=(POLISHED,), pipe=pipe,
                                  polish_strength=check_strength(s), **settings)
    means = {k: next(iter(r["per_method"].values())) for k, r in rows.items()}  # each run has one method
    return {k: {m: round(row[m], 4) for m in ("psnr", "identity_agreement")} for k, row in means.items()}


def choose_polish_strength(sweep: dict[str, dict[str, float]]) -> float:
    """The polished strength with the highest frame identity (a tie goes to the lower strength)."""
    polished = [(row["identity_agreement"], -float(k), float(k)) for k, row in sweep.items() if float(k) > 0]
    if not polished:
        raise ValueError("the sweep holds no polished row: sweep at least one strength > 0")
    return max(polished)[2]


def run_transitions_eval(out: str | os.PathLike | None, command: str, n_clips: int = 100, seed: int = EVAL_SEED,
                         frames: int = 16, steps: int = 20, strength: float = 1.0, pin: bool = True,
                         methods=METHODS, storyworld: str | os.PathLike | None = None,
                         motion: str | os.PathLike | None = None, decoder: str | os.PathLike | None = None,
                         embed_guidance: float = 1.0, polish_strength: float | None = None,
                         tuning_clips: int = 20) -> dict:
    """The job behind `python -m sdlite.eval transitions`: load the shipped models (or the given folders), evaluate,
    summarize, attach the models' training records, and write the json to `out` (when not None). With
    `full_polished` among the methods, the polish strength is `polish_strength`, or when None the one
    `polish_sweep` chooses on `tuning_clips` other clips (recorded under "polish")."""
    from ..pipeline import load_pipeline
    from ..storyworld.recognizer import load_recognizer
    from ..video import VideoDecoder, load_video_models

    unknown = set(methods) - set(METHODS + (POLISHED,))
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}: choose from {METHODS + (POLISHED,)}")
    if polish_strength is not None:
        check_strength(polish_strength)
    models = load_video_models(storyworld_folder=storyworld, motion_folder=motion)
    if decoder:
        models.decoder = VideoDecoder.storyworld(decoder)
    recognizer = load_recognizer()
    pipe, polish = None, None
    if POLISHED in methods:
        pipe = load_pipeline(storyworld if storyworld is not None else "storyworld")
        polish = {"strength": polish_strength, "chosen_on": None}
        if polish_strength is None:
            sweep = polish_sweep(models, pipe, recognizer, tuning_clips, frames=frames, steps=steps,
                                 strength=strength, pin=pin)
            polish = {"strength": choose_polish_strength(sweep),
                      "chosen_on": {"n_clips": tuning_clips, "seed": TUNING_SEED, "sweep": sweep}}
            print(f"polish strength {polish['strength']:g} chosen on {tuning_clips} tuning clips: {sweep}", flush=True)
    res = evaluate(models, n_clips, seed, frames, steps, strength, recognizer=recognizer,
                   methods=tuple(methods), progress=True, pin=pin, embed_guidance=embed_guidance, pipe=pipe,
                   polish_strength=polish["strength"] if polish else 0.0)
    res = summarize(res, command, n_clips=n_clips, seed=seed, steps=steps, strength=strength, pin=pin,
                    embed_guidance=embed_guidance, **({"polish": polish} if polish else {}))
    mf = Path(motion) if motion else motion_dir()
    for part, folder in (("predictor", mf / "predictor"), ("decoder", Path(decoder or mf / "decoder"))):
        if (folder / "training.json").is_file():
            res[f"{part}_training"] = json.loads((folder / "training.json").read_text())
    if out is not None:
        Path(out).write_text(json.dumps(res, indent=1) + "\n")
    return res


def decoder_ablation(decoders: dict[str, str | os.PathLike], command: str, n_clips: int = 100, seed: int = EVAL_SEED,
                     steps: int = 8, out: str | os.PathLike | None = None,
                     storyworld: str | os.PathLike | None = None) -> dict:
    """The decoders (name -> folder) compared as (d) full, on the same held-out clips, noise and predicted embeddings:
    PSNR, frame identity agreement (per label and per kind of motion), each row's training record, and each row's
    paired difference to the first row with a bootstrap interval. Written to `out` (json) when given."""
    from ..storyworld.recognizer import load_recognizer
    from ..video import VideoDecoder, load_video_models

    if not decoders:
        raise ValueError("name at least one decoder: NAME=FOLDER")
    missing = [str(f) for f in decoders.values() if not (Path(f) / "config.json").is_file()]
    if missing:
        raise ValueError(f"no decoder in {', '.join(missing)}: each needs the config.json of save_pretrained")
    models = load_video_models(storyworld_folder=storyworld, decoder=False)
    recognizer = load_recognizer()
    rows, clips = {}, {}
    for name, folder in decoders.items():
        models.decoder = VideoDecoder.storyworld(folder)
        res = evaluate(models, n_clips, seed, steps=steps, recognizer=recognizer, methods=("full",), progress=True)
        full = res["per_method"]["full"]
        record = json.loads((Path(folder) / "training.json").read_text()) if (Path(folder) / "training.json").is_file() else {}
        steps_trained = record.get("trained_steps", 0) + record.get("init", {}).get("training", {}).get("trained_steps", 0)
        rows[name] = {"folder": str(folder), "keyframe_attention": bool(models.decoder.config.keyframe_attention),
                      "parameters": sum(p.numel() for p in models.decoder.parameters()),
                      "training_steps": steps_trained, "psnr": full["psnr"],
                      "identity_agreement": full["identity_agreement"],
                      "identity_per_label": {k[len("identity_"):]: v for k, v in full.items()
                                             if k.startswith("identity_") and k != "identity_agreement"},
                      "identity_per_kind": res["per_kind_identity"]["full"], "seconds": res["seconds"]}
        clips[name] = res["per_clip"]["full"]
    first = next(iter(rows))
    for name in rows:
        if name != first:
            rows[name]["vs_" + first] = {
                k: paired_difference_ci(torch.tensor(clips[name][k]), torch.tensor(clips[first][k]), seed=seed)
                for k in PER_CLIP}
    result = {"command": command, "n_clips": n_clips, "seed": seed, "steps": steps, "method": "full",
              "kind_counts": res["kind_counts"], "rows": rows}
    if out is not None:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result
