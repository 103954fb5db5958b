"""The training loop toolkit every sdlite trainer uses: one checkpoint format, a CSV log, learning-rate schedules
and the accelerator.

A checkpoint is a folder:

    model.safetensors      the model's state dict
    optimizer.pt           the optimizer's state dict (torch.save, loaded with weights_only=True)
    <name>.safetensors     optional extra tensors, e.g. ema.safetensors (the UNet's moving average)
    state.json             {"step": N, ...}: the optimizer steps done, plus any JSON the trainer keeps (a history)

It is written to `<folder>.tmp` and renamed into place, so a run killed mid-write leaves the previous checkpoint
whole. A run folder holds `checkpoint/` and `log.csv`; `start_run` refuses to start a second run in a folder that
holds one unless told to resume it.
"""
from __future__ import annotations

import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"


# ----------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """What a run resumes from: the step, extra tensors by file name, and the trainer's JSON state."""

    step: int = 0
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    state: dict = field(default_factory=dict)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_checkpoint(folder: str | os.PathLike, step: int, model: torch.nn.Module, optimizer,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None, state: dict | None = None) -> Path:
    """Write a checkpoint folder (see the module doc) atomically: to `<folder>.tmp`, then renamed."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_contiguous(model.state_dict()), str(tmp / "model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    for name, group in (tensors or {}).items():
        save_file(_contiguous(group), str(tmp / f"{name}.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**(state or {}), "step": int(step)}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def load_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, optimizer) -> Checkpoint:
    """Load a checkpoint folder into `model` and `optimizer`; returns its step, extra tensors and state."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    tensors = {p.stem: load_file(str(p)) for p in sorted(folder.glob("*.safetensors")) if p.stem != "model"}
    state = json.loads((folder / "state.json").read_text())
    return Checkpoint(int(state.pop("step")), tensors, state)


def start_run(run_dir: str | os.PathLike, resume: bool, model: torch.nn.Module, optimizer) -> Checkpoint:
    """Resume from `<run_dir>/checkpoint` when `resume` and it exists; otherwise a fresh start, refused (before any
    work) when `run_dir` already holds a run's log."""
    run_dir = Path(run_dir)
    ckpt = run_dir / CHECKPOINT
    if resume and (ckpt / "state.json").is_file():
        return load_checkpoint(ckpt, model, optimizer)
    if not resume and (run_dir / "log.csv").exists():
        raise FileExistsError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    return Checkpoint()


# ----------------------------------------------------------------------------------------------------------
# The log
# ----------------------------------------------------------------------------------------------------------
def _fmt(v):
    return f"{v:.6g}" if isinstance(v, float) else v


class CsvLog:
    """Appends rows to `path` (one column per name in `fields`, written as a header when the file is new)."""

    def __init__(self, path: str | os.PathLike, fields: list[str]):
        self.path, self.fields = Path(path), list(fields)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])


def _column(values: list) -> np.ndarray:
    """One log column: floats (NaN where a row has no value), or the strings as written when it holds words."""
    try:
        return np.array([float(v) if v not in ("", None) else np.nan for v in values])
    except ValueError:  # e.g. a `stage` column: "tower", "fuse"
        return np.array(["" if v is None else v for v in values])


def read_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A run's log.csv as columns of floats (NaN where a row has no value); a column of words stays strings."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: _column([r[k] for r in rows]) for k in rows[0]}


# ----------------------------------------------------------------------------------------------------------
# Learning-rate schedules (a factor of the peak rate, per optimizer step)
# ----------------------------------------------------------------------------------------------------------
def warmup_hold_cooldown(step: int, steps: int, warmup: int, cooldown: int = 0) -> float:
    """Linear warm-up over `warmup` steps, then constant, then (with `cooldown`) linearly down to 0 at the last step.

    The middle part is constant, so a run resumed with more steps and a cool-down equals one run that was given
    those settings from the start."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    if cooldown > 0:
        factor *= min(1.0, (steps - step) / cooldown)
    return factor


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up, then a cosine from 1 down to `floor` at the last step."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return warm * (floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def accelerator():
    """An `accelerate.Accelerator`: one CPU here, one or several GPUs elsewhere, the same loop."""
    from accelerate import Accelerator

    return Accelerator()
