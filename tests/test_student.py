"""The classroom kit: every notebook's exercises are in nbgrader's format, the student versions (`make student`) hold
no solution and no output, and in them every graded test cell fails while every other cell still runs.

The solution notebooks themselves run under nbval (`make test`), so there every test cell passes.
"""
import re
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "classroom"))
from student import student_version  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTION_META = {"solution": True, "grade": False}
TEST_META = {"grade": True, "solution": False, "locked": True}


def grading(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def is_solution(cell) -> bool:
    return grading(cell).get("solution") is True


def is_test(cell) -> bool:
    return grading(cell).get("grade") is True and cell.cell_type == "code"


@pytest.fixture(scope="module", params=NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def notebook(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_exercises_are_in_nbgrader_format(notebook):
    path, nb = notebook
    cells = nb.cells
    tests = [c for c in cells if is_test(c)]
    assert len(tests) >= 3, f"{path.name}: {len(tests)} graded exercises, at least 3 wanted"
    ids = [grading(c)["grade_id"] for c in cells if grading(c)]
    assert len(ids) == len(set(ids)), f"{path.name}: grade_id used twice"
    for i, cell in enumerate(cells):
        meta, src = grading(cell), cell.source
        if is_solution(cell):
            assert {k: meta.get(k) for k in SOLUTION_META} == SOLUTION_META and meta.get("grade_id"), (path.name, i)
            assert "### BEGIN SOLUTION" in src and "### END SOLUTION" in src, (path.name, i)
            assert src.index("### BEGIN SOLUTION") < src.index("### END SOLUTION"), (path.name, i)
            assert is_test(cells[i + 1]), f"{path.name} cell {i}: a solution cell is followed by its test cell"
        elif is_test(cell):
            assert {k: meta.get(k) for k in TEST_META} == TEST_META and meta.get("grade_id"), (path.name, i)
            assert meta.get("points", 0) > 0, (path.name, i)
            assert re.search(r"^\s*assert\b", src, re.M), f"{path.name} cell {i}: a test cell without assert"
            assert "SOLUTION" not in src, (path.name, i)
        else:
            assert "BEGIN SOLUTION" not in src, f"{path.name} cell {i}: solution text outside a solution cell"


def test_every_notebook_has_a_summary(notebook):
    path, nb = notebook
    assert any(c.cell_type == "markdown" and re.match(r"#+\s*Summary\b", c.source.strip()) for c in nb.cells), path.name


def test_student_version_has_no_solution_and_no_output(notebook):
    path, nb = notebook
    student = student_version(nb)
    text = nbformat.writes(student)
    assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in student.cells if c.cell_type == "code")
    # nothing else changed: the same cells, in the same order, the markdown word for word
    assert len(student.cells) == len(nb.cells)
    for a, b in zip(nb.cells, student.cells):
        if not is_solution(a):
            assert a.source == b.source
    assert "BEGIN SOLUTION" in nbformat.writes(nb)  # the solution notebook itself is untouched


def test_in_the_student_version_every_test_fails_and_everything_else_runs(notebook, tmp_path):
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    path, nb = notebook
    student = student_version(nb)
    # The kernel talks over Unix sockets, not loopback TCP: on the CI machine a large output (notebook 06's GIFs,
    # about 0.9 MB) over TCP has stalled the client for about 15 minutes (TCP's retransmission give-up) twice.
    km = KernelManager(kernel_name="python3", transport="ipc", ip=str(tmp_path / "kernel"))
    try:
        NotebookClient(student, km=km, timeout=900, kernel_name="python3", allow_errors=True,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    finally:  # a kernel manager we pass in is ours to stop
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    problems = []
    for i, (cell, solved) in enumerate(zip(student.cells, nb.cells)):
        if cell.cell_type != "code":
            continue
        failed = any(o.get("output_type") == "error" for o in cell.get("outputs", []))
        if is_test(solved) and not failed:
            problems.append(f"cell {i} ({grading(solved)['grade_id']}): the test passes without an answer")
        elif is_solution(solved) and not failed:
            problems.append(f"cell {i}: the placeholder did not raise")
        elif not is_test(solved) and not is_solution(solved) and failed:
            err = next(o for o in cell.outputs if o.get("output_type") == "error")
            problems.append(f"cell {i} fails without the answers: {err.get('ename')}: {err.get('evalue')}"[:300])
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
