"""Where sdlite finds its shipped files (the repo's `data/` folder), and safe output paths."""
from __future__ import annotations

import os
from pathlib import Path

# The repo layout is notebooks/, sdlite/, data/ side by side; `pip install -e .` keeps it.
# SDLITE_DATA overrides it (e.g. for a non-editable install with data/ copied elsewhere).
_REPO_DATA = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """The folder of shipped data (tokenizer vocabulary, storyworld checkpoints, fixtures)."""
    path = Path(os.environ.get("SDLITE_DATA", _REPO_DATA))
    if not path.is_dir():
        raise FileNotFoundError(
            f"sdlite's data folder {path} does not exist. Install sdlite from a clone of the repository "
            "with `pip install -e .` (data/ stays next to sdlite/), or set SDLITE_DATA to a copy of data/."
        )
    return path


def data_file(*parts: str) -> Path:
    """A file inside data/, with an error that says what is missing."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"missing shipped file {path}: is your clone complete? (git status / git lfs not needed)")
    return path


def check_writable(path: str | os.PathLike, force: bool = False) -> Path:
    """Refuse to overwrite an existing file unless `force`; create the parent folder."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; choose another output path or pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
