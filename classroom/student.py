"""Student versions of the course notebooks, made with nbgrader's own preprocessors.

    python classroom/student.py                      # notebooks/NN_*.ipynb -> student/NN_*.ipynb (what `make student` runs)
    python classroom/student.py --out handout notebooks/03_consistent_self_attention.ipynb

Every exercise in `notebooks/` is in nbgrader's format: a solution cell (metadata `solution: true`, the answer between
`### BEGIN SOLUTION` and `### END SOLUTION`) followed by a locked test cell with points (`grade: true`) that holds the
asserts. The student version replaces each answer with nbgrader's placeholder (`raise NotImplementedError()`), clears
every output, locks the test cells and records their checksums; everything else stays as it is. A teacher can also
drop `notebooks/` into an nbgrader course (`source/<assignment>/`) unchanged and run `nbgrader generate_assignment`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbgrader.preprocessors import (
    CheckCellMetadata, ClearHiddenTests, ClearOutput, ClearSolutions, ComputeChecksums, LockCells,
)

ROOT = Path(__file__).resolve().parent.parent
# nbgrader's generate_assignment order, without the parts that need a course database
STEPS = (LockCells, ClearSolutions, ClearOutput, CheckCellMetadata, ComputeChecksums, ClearHiddenTests)


def student_version(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as a student gets it (a new object; `nb` is left as it is)."""
    nb = nbformat.from_dict(nb)  # a copy
    resources: dict = {}
    for step in STEPS:
        nb, resources = step().preprocess(nb, resources)
    return nb


def write_student_versions(notebooks: list[Path], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        target = out / path.name
        nbformat.write(student_version(nb), target)
        written.append(target)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python classroom/student.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", type=Path, help="default: notebooks/NN_*.ipynb")
    ap.add_argument("--out", type=Path, default=ROOT / "student", help="folder to write (default: student/)")
    args = ap.parse_args(argv)
    notebooks = args.notebooks or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    for path in write_student_versions(notebooks, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
