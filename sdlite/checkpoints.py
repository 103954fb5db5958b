"""A pipeline folder is checked before it is loaded, and the weights that were loaded are compared with the files.

diffusers and transformers load what they can: a text encoder whose `config.json` asks for more layers than its
weights hold is built with the extra layers left random, and one that asks for fewer silently drops weights. Both
give images that are wrong without any error. `check_pipeline_folder` reads every component's `config.json` and
the headers of its `.safetensors` files (cheap: no tensor is read) and names the damaged file;
`check_loaded_weights` compares each loaded component's state dict with the tensor names in its files and names
the component whose weights do not match.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def _components(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text())
    return [name for name, spec in index.items() if not name.startswith("_") and isinstance(spec, list)
            and len(spec) == 2 and spec[0] is not None and (folder / name).is_dir()]


def _weight_names(component: Path) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for file in sorted(component.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            names |= set(handle.keys())
    return names


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """Every component's config parses and every weight file's header reads; else a ValueError naming the file."""
    from safetensors import safe_open

    folder = Path(folder)
    try:
        components = _components(folder)
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / 'model_index.json'} is not valid JSON ({err.msg}, line {err.lineno}): restore "
                         "the pipeline folder") from None
    for name in components:
        for config in (folder / name).glob("*config*.json"):
            try:
                json.loads(config.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise ValueError(f"{config} is not valid JSON ({err}): restore the {name} component") from None
        for file in sorted((folder / name).glob("*.safetensors")):
            try:
                with safe_open(str(file), "pt") as handle:
                    handle.keys()
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{file} is not a readable safetensors file ({' '.join(str(err).split())[:120]}): "
                                 f"the {name} component is damaged or truncated; restore it") from None


def check_loaded_weights(pipe, folder: str | os.PathLike) -> None:
    """Each loaded component's parameters and buffers are exactly the tensors in its files (in float or half)."""
    folder = Path(folder)
    for name in _components(folder):
        module = getattr(pipe, name, None)
        files = _weight_names(folder / name)
        if module is None or not hasattr(module, "state_dict") or not files:
            continue
        loaded = set(module.state_dict())
        missing, unexpected = sorted(loaded - files), sorted(files - loaded)
        if missing or unexpected:
            raise ValueError(
                f"{folder / name}: the weights do not match the component's config.json ({len(missing)} tensors the "
                f"model has but the files lack, e.g. {missing[:2]}; {len(unexpected)} in the files the model has no "
                f"place for, e.g. {unexpected[:2]}): the config and the weights come from different models")
