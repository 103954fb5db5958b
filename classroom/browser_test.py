"""The notebooks as a student uses them: JupyterLab in a real browser (`make browser-test`, outside `make test`).

Starts JupyterLab on 127.0.0.1 with a copy of the notebooks in `.browser-test/` (so nothing the browser saves touches
`notebooks/`), drives Debian's chromium with Playwright (no browser download), and for every notebook: opens it,
runs all cells through the Run menu, waits for the kernel, saves, and fails on any error output; then moves every
slider (and types into every text box) and checks that the widget's output changes. Screenshots go to
`.browser-test/screenshots/` (git-ignored).

    python classroom/browser_test.py [NN_name.ipynb ...] [--chromium /usr/bin/chromium]
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".browser-test"  # beside notebooks/, so their relative paths (../results, ../data) still resolve
SHOTS = WORK / "screenshots"
PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"  # the notebook on screen

# The text an output widget shows, without the controls themselves (a slider's own readout always changes).
OUTPUT_STATE_JS = """
(cell) => {
  const outs = cell.querySelectorAll('.jupyter-widgets-output-area, .widget-output');
  return Array.from(outs).map(o => {
    const imgs = Array.from(o.querySelectorAll('img')).map(i => i.src.length + ':' + i.src.slice(-200));
    return o.innerText + '|' + imgs.join(',');
  }).join('||');
}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(port: int, token: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--ServerApp.token={token}", f"--ServerApp.root_dir={WORK}", "--ServerApp.disable_check_xsrf=True",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")  # containers and CI machines run as root
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(WORK / "lab.log", "w"))
    for _ in range(120):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"JupyterLab did not start: see {WORK / 'lab.log'}")


def wait_idle(page, timeout_s: float) -> None:
    """Until no cell shows [*] (queued or running) and the kernel reports idle."""
    deadline = time.time() + timeout_s
    time.sleep(2)
    while time.time() < deadline:
        busy = page.evaluate("""(panel) => Array.from(document.querySelectorAll(panel + ' .jp-InputArea-prompt'))
                                   .some(p => p.innerText.includes('*'))""", PANEL)
        if not busy:
            return
        time.sleep(1)
    raise TimeoutError(f"cells still running after {timeout_s} s")


def dismiss_dialogs(page) -> None:
    """JupyterLab may ask which kernel to start, and whether to fetch news: keep the default kernel, no news."""
    for _ in range(10):
        dialog = page.locator(".jp-Dialog")
        if dialog.count():
            dialog.get_by_role("button", name="Select").click()
            return
        time.sleep(1)


def run_all(page) -> None:
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()


def errors_in(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    out = []
    for i, cell in enumerate(nb["cells"]):
        for o in cell.get("outputs", []):
            if o.get("output_type") == "error":
                out.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}"[:300])
    return out


def exercise_widgets(page, name: str) -> list[str]:
    """Move every slider and type into every text box; returns the controls whose output did not change."""
    dead = []
    controls = page.locator(f"{PANEL} .jp-Cell .widget-slider .noUi-handle, {PANEL} .jp-Cell .widget-text input")
    for k in range(controls.count()):
        control = controls.nth(k)
        cell = control.locator("xpath=ancestor::div[contains(@class,'jp-Cell')][1]")
        cell.scroll_into_view_if_needed()
        before = cell.evaluate(OUTPUT_STATE_JS)
        if control.evaluate("e => e.tagName") == "INPUT":
            control.fill("a man img riding a bike")
            control.press("Enter")
        else:
            control.focus()
            for _ in range(3):
                control.press("ArrowRight")
        changed = False
        for _ in range(40):
            time.sleep(0.5)
            if cell.evaluate(OUTPUT_STATE_JS) != before:
                changed = True
                break
        cell.screenshot(path=str(SHOTS / f"{name}_widget{k}.png"))
        if not changed:
            dead.append(f"{name}: control {k} changed nothing in its output")
    return dead


def main(argv: list[str] | None = None) -> int:
    from playwright.sync_api import sync_playwright

    ap = argparse.ArgumentParser(prog="python classroom/browser_test.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebooks", nargs="*", help="default: every notebooks/NN_*.ipynb")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium",
                    help="the browser binary (Debian: apt-get install chromium)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds one notebook may run")
    args = ap.parse_args(argv)
    if not Path(args.chromium).is_file():
        print(f"no chromium at {args.chromium}: install it (Debian: apt-get install chromium) or pass --chromium",
              file=sys.stderr)
        return 2
    names = args.notebooks or sorted(p.name for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    shutil.rmtree(WORK, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    for name in names:
        shutil.copy(ROOT / "notebooks" / name, WORK / name)
    port, token = free_port(), secrets.token_hex(16)
    lab = start_lab(port, token)
    failures: list[str] = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            for name in names:
                t0 = time.time()
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?reset&token={token}")  # reset: this tab only
                page.wait_for_selector(f"{PANEL} .jp-Cell", timeout=60_000)
                dismiss_dialogs(page)
                page.wait_for_selector(f"{PANEL} .jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
                run_all(page)
                wait_idle(page, args.timeout)
                page.keyboard.press("Control+s")
                time.sleep(2)
                page.screenshot(path=str(SHOTS / f"{Path(name).stem}.png"), full_page=False)
                errs = errors_in(WORK / name)
                failures += [f"{name}: {e}" for e in errs]
                failures += exercise_widgets(page, Path(name).stem)
                print(f"{name}: ran in {time.time() - t0:.0f} s, {len(errs)} error outputs", flush=True)
                page.get_by_role("menuitem", name="Kernel", exact=True).click()
                page.get_by_role("menuitem", name="Shut Down Kernel", exact=True).click()
            browser.close()
    finally:
        lab.terminate()
        lab.wait(timeout=30)
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(f"{len(names)} notebooks, {len(failures)} failures; screenshots in {SHOTS}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
