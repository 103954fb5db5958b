"""Mutation testing of the paper's modules with mutmut, one shard per module (what `make mutation` runs).

    python tools/mutation.py                 # every shard, one after another
    python tools/mutation.py comic story     # only these modules
    python tools/mutation.py comic --fresh   # forget the cached verdicts of this shard and test every mutant again
    python tools/mutation.py --list          # the shards: module, test files

A mutant is the module with one small deliberate bug (`<` for `<=`, `+ 1` for `- 1`, a string changed, an argument
dropped ...); the tests should fail on it ("killed"). One that passes every test ("survived") is a bug the tests
would let through, unless it is *equivalent* (it behaves exactly as the original). Equivalent survivors are listed,
each with why, in `tools/mutation_equivalents.toml`; any other survivor makes this script exit with status 1.

How mutmut works here (measured with mutmut 3.8.1, see docs/mutation.md): it copies `sdlite/` and `tests/` into
`mutants/`, rewrites every function of the mutated module into a trampoline that calls the original or one mutant,
runs the shard's tests once to record which tests call which function, and then, per mutant, forks and runs only
the tests that call the mutated function. The mutant is picked by an environment variable, so nothing is re-imported.

Why shards: mutmut keeps one cache per `mutants/` folder, and its cache is invalidated as a whole when the test
selection changes. Each module gets its own working folder `build/mutation/<module>/` (links to sdlite/, tests/ and
data/, and a pyproject.toml holding this module's [tool.mutmut]) with its own cache and only the test files that
exercise the module (`[tool.mutmut.shards]` in pyproject.toml), so one shard runs in minutes, not the suite's ten.
A second run is incremental: mutants of functions that did not change keep their verdict, except survivors and
timeouts, which are tested again (a test may have been added for them), unless listed in
`tools/mutation_equivalents.toml` (`--recheck-listed` tests those again too). `--fresh` starts the shard from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
EQUIVALENTS = Path(__file__).resolve().parent / "mutation_equivalents.toml"
MUTMUT_VERSION = "3.8.1"  # the figures in docs/mutation.md were measured with it
LINKED = ("sdlite", "tests", "data", "results")  # the shard's folder sees the repo's through links; mutmut copies them
# mutmut's exit codes -> what they mean (mutmut.stats.status_by_exit_code, condensed)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}
CAUGHT = ("killed", "timeout")  # a mutant that makes the tests hang is caught too (mutmut stops it)


def read_config() -> tuple[dict, dict]:
    """pyproject.toml's [tool.mutmut] (without the shards) and its [tool.mutmut.shards]."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]
    shared = dict(tool["mutmut"])
    shards = shared.pop("shards")
    return shared, shards


def toml_value(value) -> str:
    """A str, bool, number or list of them as TOML (JSON's strings are TOML's basic strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)


def shard_pyproject(shared: dict, shard: dict) -> str:
    """The shard's pyproject.toml: mutmut's settings for this module alone, and the repo's pytest settings."""
    extra = {key: value for key, value in shard.items() if key not in ("source", "tests")}  # e.g. also_copy
    settings = {**shared, **extra, "only_mutate": [shard["source"]], "pytest_add_cli_args_test_selection": shard["tests"]}
    pytest_ini = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["pytest"]["ini_options"]
    pytest_ini = {**pytest_ini, "testpaths": ["tests"]}
    lines = ["# written by tools/mutation.py from the repo's pyproject.toml: do not edit", "[tool.mutmut]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    lines += ["", "[tool.pytest.ini_options]"] + [f"{key} = {toml_value(value)}" for key, value in pytest_ini.items()]
    return "\n".join(lines) + "\n"


def prepare_shard(name: str, shared: dict, shard: dict, fresh: bool, keep: frozenset = frozenset()) -> Path:
    """build/mutation/<name>/ with links to the repo and this shard's config; the verdicts of survivors not in
    `keep` (the listed equivalents, unless --recheck-listed) reset."""
    missing = [p for p in [shard["source"], *shard["tests"]] if not (ROOT / p.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"mutation: shard {name} names files that do not exist: {missing}: fix [tool.mutmut.shards]")
    folder = WORK / name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for link in LINKED:
        target = folder / link
        if not target.is_symlink():
            target.symlink_to(os.path.relpath(ROOT / link, folder))
    (folder / "pyproject.toml").write_text(shard_pyproject(shared, shard), "utf-8")
    retest_survivors(folder / "mutants" / (shard["source"] + ".meta"), keep)
    return folder


def retest_survivors(meta: Path, keep: frozenset = frozenset()) -> int:
    """Forget the verdict of every mutant that was not caught last time, so mutmut tests it again (tests may have
    been added since); caught ones keep theirs while their function is unchanged (mutmut checks its hash), and so do
    the survivors in `keep`: a listed equivalent survives every test, and each retest costs all the tests that call
    its function (id_encoder: about 90 s each). mutmut still retests them when their function changes."""
    if not meta.exists():
        return 0
    data = json.loads(meta.read_text("utf-8"))
    again = [k for k, code in data["exit_code_by_key"].items()
             if code is not None and STATUS.get(code) not in CAUGHT and k not in keep]
    for key in again:
        data["exit_code_by_key"][key] = None
    meta.write_text(json.dumps(data, indent=4), "utf-8")
    return len(again)


def run_mutmut(folder: Path) -> int:
    """`mutmut run` in the shard's folder: one worker (the machine has 2 shared cores), torch on one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    mutmut = Path(sys.executable).parent / "mutmut"
    return subprocess.run([str(mutmut), "run", "--max-children", "1"], cwd=folder, env=env).returncode


def verdicts(folder: Path, source: str) -> dict[str, str]:
    """Mutant name -> killed / survived / timeout / no tests / ..., from mutmut's record of the shard."""
    meta = json.loads((folder / "mutants" / (source + ".meta")).read_text("utf-8"))
    return {key: STATUS.get(code, "suspicious") for key, code in meta["exit_code_by_key"].items()}


def read_equivalents() -> dict[str, str]:
    """Mutant name -> why it is equivalent (or not worth a test), from tools/mutation_equivalents.toml."""
    if not EQUIVALENTS.exists():
        return {}
    table = tomllib.loads(EQUIVALENTS.read_text("utf-8"))
    return {name: why for module in table.values() for name, why in module.items()}


def summarize(name: str, result: dict[str, str], equivalents: dict[str, str], seconds: float) -> dict:
    """The shard's score and the mutants that still need a test."""
    counts = Counter(result.values())
    not_caught = sorted(k for k, v in result.items() if v not in CAUGHT)
    unexplained = [k for k in not_caught if k not in equivalents]
    # the mutated module's prefix, e.g. "sdlite.eval.metrics." (mutant names are "<module>.x_<function>__mutmut_N")
    prefix = next(iter(result)).rsplit(".", 1)[0] + "." if result else f"sdlite.{name}."
    return {"module": name, "total": len(result), "caught": sum(counts[c] for c in CAUGHT), "counts": dict(counts),
            "equivalent": [k for k in not_caught if k in equivalents], "unexplained": unexplained,
            "stale_equivalents": [k for k in equivalents if k.startswith(prefix)
                                  and result.get(k, "killed") in CAUGHT],  # gone, or caught by now
            "seconds": round(seconds, 1)}


def report(summary: dict, result: dict[str, str]) -> None:
    s = summary
    print(f"\nmutation {s['module']}: {s['caught']}/{s['total']} caught "
          f"({', '.join(f'{v} {k}' for k, v in sorted(s['counts'].items()))}) in {s['seconds']} s; "
          f"{len(s['equivalent'])} listed as equivalent")
    for key in s["unexplained"]:
        print(f"  {result[key]}: {key}    (see it: cd build/mutation/{s['module']} && mutmut show {key})")
    for key in s["stale_equivalents"]:
        print(f"  note: {key} is listed in {EQUIVALENTS.name} but no longer survives: remove it")


def check_mutmut() -> None:
    try:
        from importlib.metadata import version

        found = version("mutmut")
    except Exception:  # noqa: BLE001 - not installed
        raise SystemExit(f"mutation: mutmut is not installed: {sys.executable} -m pip install mutmut=={MUTMUT_VERSION}")
    if found != MUTMUT_VERSION:
        print(f"mutation: warning: mutmut {found}, the recorded figures are from {MUTMUT_VERSION}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    shared, shards = read_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", help=f"shards to run (default: all): {', '.join(shards)}")
    parser.add_argument("--fresh", action="store_true", help="forget the shard's cached verdicts first")
    parser.add_argument("--recheck-listed", action="store_true",
                        help="test the survivors listed in mutation_equivalents.toml again too (slow)")
    parser.add_argument("--list", action="store_true", help="print the shards and exit")
    args = parser.parse_args(argv)
    unknown = [m for m in args.modules if m not in shards]
    if unknown:
        parser.error(f"no shard {unknown}: choose from {', '.join(shards)}")
    if args.list:
        for name, shard in shards.items():
            print(f"{name}: {shard['source']} <- {' '.join(shard['tests'])}")
        return 0
    check_mutmut()
    equivalents = read_equivalents()
    failed = False
    for name in args.modules or list(shards):
        keep = frozenset() if args.recheck_listed else frozenset(equivalents)
        folder = prepare_shard(name, shared, shards[name], args.fresh, keep)
        start = time.monotonic()
        code = run_mutmut(folder)
        if code != 0:
            print(f"mutation {name}: mutmut failed (exit {code}); the output above says why", file=sys.stderr)
            failed = True
            continue
        result = verdicts(folder, shards[name]["source"])
        summary = summarize(name, result, equivalents, time.monotonic() - start)
        (folder / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")
        report(summary, result)
        failed |= bool(summary["unexplained"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
