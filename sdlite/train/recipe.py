"""The whole storyworld recipe: every stage in order into one run folder, then the export of the pipeline
(`python -m sdlite.train storyworld --stage all --out runs/storyworld --export data/storyworld`)."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from ..storyworld.models import StoryworldSizes, build_storyworld_tokenizer
from .storyworld import (
    TrainConfig, export_pipeline, latest_unet_weights, train_clip, train_vae, train_vae_decoder,
)
from .unet import train_unet


def train_storyworld(out: str | os.PathLike, stages: tuple[str, ...], configs: dict[str, TrainConfig],
                     size: str = "base", export: str | os.PathLike | None = None, resume: bool = False,
                     progress: bool = True, max_minutes: float | None = None, command: str = "") -> None:
    """Run `stages` (in STAGES order) into the run folder `out`, then, after the decoder stage or with no stage at
    all, export the pipeline to `export`. Each stage records its config in `<out>/<stage>/train_config.json`."""
    out = Path(out)
    sizes = StoryworldSizes.named(size)
    tokenizer = build_storyworld_tokenizer()
    for stage in stages:
        cfg = configs[stage]
        (out / stage).mkdir(parents=True, exist_ok=True)
        (out / stage / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        if stage == "vae":
            train_vae(out, sizes, cfg, resume, progress=progress)
        elif stage == "clip":
            train_clip(out, sizes, cfg, tokenizer, resume, progress=progress)
        elif stage == "unet":
            train_unet(out, sizes, cfg, tokenizer, resume, progress=progress, export=export, max_minutes=max_minutes,
                       command=command)
        else:
            train_vae_decoder(out, cfg, resume, progress=progress)
    if export and (not stages or "decoder" in stages):
        state, step = latest_unet_weights(out)
        export_pipeline(out, state, sizes, tokenizer, export, note=f"step {step}", command=command)
