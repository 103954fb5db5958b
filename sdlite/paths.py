"""Where sdlite finds its shipped files (the repo's `data/` folder), and safe output paths: outputs are checked
before any work and written whole or not at all."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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
    """`check_target`, then create the parent folder (for writers that write the file in place)."""
    path = check_target(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_target(path: str | os.PathLike, force: bool = False, what: str = "--out") -> Path:
    """A file this run will write, checked before any work and without creating anything: not a folder, and not an
    existing file unless `force`."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{what} {path} is a folder: give a file path inside it, e.g. {path / 'page.png'}")
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; choose another output path or pass --force to overwrite it")
    return path


def write_all_or_nothing(writers: dict[Path, Callable[[Path], object]], force: bool = False) -> list[Path]:
    """Write several files as one unit: whole, or not at all.

    Each writer writes its file to a temporary name in the target's folder; only when every one has succeeded are
    they moved in: without `force` by a no-clobber hard link (a file that appeared at a target meanwhile is never
    overwritten: FileExistsError), with `force` by an atomic replace. On any failure the temporaries, the files this
    call already moved in and the folders it created are removed; nothing that existed before is touched."""
    created_dirs: list[Path] = []
    temps: dict[Path, Path] = {}
    moved: list[Path] = []
    try:
        for target in writers:
            check_target(target, force)
            for parent in reversed([target.parent, *target.parent.parents]):
                if not parent.exists():
                    parent.mkdir()
                    created_dirs.append(parent)
        for target, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
            os.close(fd)
            temps[target] = Path(tmp)
            write(Path(tmp))
        for target, tmp in temps.items():
            if force:
                os.replace(tmp, target)
            else:
                os.link(tmp, target)  # fails if the target appeared meanwhile: never clobbers
                os.unlink(tmp)
            moved.append(target)
        return moved
    except BaseException as err:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
        for target in moved:
            target.unlink(missing_ok=True)
        for folder in reversed(created_dirs):
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(err, PermissionError) and err.filename:  # name the folder, not our temporary file
            folder = Path(err.filename).parent
            raise PermissionError(f"Permission denied: cannot write into {folder}; choose an output folder you can "
                                  "write to") from err
        raise
