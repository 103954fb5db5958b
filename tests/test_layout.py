"""The package layout's rules, checked on the source (README "Layout"; docs/CONTRIBUTING.md).

- the paper's method lives in top-level modules; `storyworld/`, `train/`, `eval/` and `cli/` sit below them, and
  imports flow one way: method <- storyworld <- train, eval <- cli (a `__main__` is an entry point, like cli);
- no import cycle inside sdlite, at module level or inside functions;
- a leading underscore means "this file only": no module imports another module's `_private` name;
- `import sdlite.cli` imports no torch (so `sdlite --help` answers at once);
- no file under sdlite/ is longer than 800 lines;
- a non-editable install contains every subpackage.
"""
import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "sdlite"
ROOMS = ("storyworld", "train", "eval", "cli")
# What each room may import (besides itself); "method" is every top-level module of sdlite.
ALLOWED = {
    "method": {"method", "storyworld"},  # storyworld only inside functions (the default model): checked below
    "storyworld": {"method", "storyworld"},
    "train": {"method", "storyworld", "train"},
    "eval": {"method", "storyworld", "eval"},
    "cli": {"method", "storyworld", "train", "eval", "cli"},
}
# Forwarding aliases kept for code written against the earlier layout.
ALIASES = {"sdlite.models"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def room(module: str) -> str:
    parts = module.split(".")
    if module.endswith("__main__"):
        return "cli"  # an entry point parses argv
    if len(parts) > 2 or (len(parts) == 2 and parts[1] in ROOMS):
        return parts[1]
    return "method"


def resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str):
    """(imported sdlite module, names imported from it, at module level?) for every import in `module`."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("sdlite"):
                    yield alias.name, [], id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node)
            if not target.startswith("sdlite"):
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from . import world` imports a module
                if f"{target}.{name}" in MODULES:
                    yield f"{target}.{name}", [], id(node) in top_level
                    names = [n for n in names if n != name]
            if target in MODULES:
                yield target, names, id(node) in top_level


def test_the_rooms_exist():
    for name in ROOMS:
        assert (PKG / name / "__init__.py").is_file(), name
    assert room("sdlite.attention") == "method" and room("sdlite.train.unet") == "train"
    assert room("sdlite.eval.__main__") == "cli" and room("sdlite.storyworld") == "storyworld"


def test_imports_flow_one_way():
    bad = []
    for module in MODULES:
        if module in ALIASES or module == "sdlite":
            continue
        for target, _, top in imports(module):
            if target in ("sdlite",) or target in ALIASES:
                bad.append(f"{module} imports the alias {target}: import the real module")
                continue
            src, dst = room(module), room(target)
            if dst not in ALLOWED[src]:
                bad.append(f"{module} ({src}) imports {target} ({dst})")
            if src == "method" and dst == "storyworld" and top:
                bad.append(f"{module} imports {target} at top level: a method module loads storyworld lazily")
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    graph = {m: {t for t, _, _ in imports(m)} - {m} for m in MODULES}
    # a package's __init__ importing its own children is how Python packages work: not a cycle
    for m in MODULES:
        if MODULES[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m)


def test_no_module_imports_another_modules_private_names():
    bad = [f"{m} imports {t}.{n}" for m in MODULES for t, names, _ in imports(m) for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_method_modules_do_not_import_train_eval_cli_at_top_level():
    bad = [f"{m} imports {t}" for m in MODULES if room(m) == "method" for t, _, top in imports(m)
           if top and room(t) in ("train", "eval", "cli")]
    assert not bad, "\n".join(bad)


def test_files_stay_short():
    long = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 800}
    assert not long, f"split these (> 800 lines): {long}"


def test_import_sdlite_cli_imports_no_torch():
    code = "import sys, sdlite.cli; sdlite.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_checker_finds_what_it_forbids(tmp_path, monkeypatch):
    """The rules above can fail: a cycle, a private import and a method module importing train are each found."""
    fake = {"sdlite.attention": "from .train.loop import CsvLog\nfrom .story import _secret\n",
            "sdlite.story": "from .attention import x\n", "sdlite.train.loop": "", "sdlite.train": ""}
    paths = {}
    for name, text in fake.items():
        p = tmp_path / (name.replace(".", "_") + ".py")
        p.write_text(text)
        paths[name] = p
    monkeypatch.setattr(sys.modules[__name__], "MODULES", paths)
    with pytest.raises(AssertionError, match="cycle"):
        test_no_import_cycles()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_module_imports_another_modules_private_names()
    with pytest.raises(AssertionError, match="sdlite.train.loop"):
        test_method_modules_do_not_import_train_eval_cli_at_top_level()


def test_a_wheel_holds_every_subpackage(tmp_path):
    """`pip install .` installs what a wheel holds: every sdlite package must be in it."""
    src = tmp_path / "src"  # a copy: building writes build/ and *.egg-info next to the sources
    shutil.copytree(PKG, src / "sdlite", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(src)], capture_output=True, text=True)
    if res.returncode != 0 and "No module named" in res.stderr and "setuptools" in res.stderr:
        pytest.skip("setuptools is not installed in this environment (pip wheel needs it offline)")
    assert res.returncode == 0, res.stderr[-2000:]
    (wheel,) = tmp_path.glob("sdlite-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for module, path in MODULES.items():
        assert str(path.relative_to(ROOT)) in names, f"{path.relative_to(ROOT)} is missing from the wheel"
