"""Benchmark: consistent self-attention (CSA) vs the stock diffusers processor, time and peak memory.

    python benchmarks/attention.py            # writes benchmarks/attention.json, prints a markdown table
    python benchmarks/attention.py --quick    # smaller grid, a smoke test (~1-2 min); writes to the temp dir

Part 1, one self-attention layer at real SDXL shapes with random weights and inputs:
  A: 1024 tokens x 1280 channels x 20 heads (SDXL's 1/32 grid at 1024 px), B: 4096 tokens x 640 channels x
  10 heads (the 1/16 grid). Methods: "stock" (diffusers AttnProcessor2_0), "tiled" (CSA, r = 0.5, W = 4,
  disjoint tiles, one window at a time), "untiled" (CSA, r = 0.5, one window over the whole story).
Part 2, one denoising step (a UNet forward) of the tiny SDXL-style UNet: CSA on no layers / up-blocks / all.

How memory is measured: the configurations run one after another in one worker process, started with glibc
told to mmap every block >= 128 KiB (so a freed tensor leaves the resident set at once). For each, after
a small warm-up call, we reset the process's peak resident set (Linux: write 5 to /proc/self/clear_refs),
read the resident set (inputs and weights included), run the call once, and read the peak (VmHWM). Working memory = peak - resident before the call - bytes of the returned output: what the
layer needs beyond its unavoidable input and output. Time: the same process repeats the call; we keep the
fastest run. FLOPs are counted from the shapes (matmuls only: projections, QK^T, AV).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATE, TILE = 0.5, 4
SHAPES = {  # name: (tokens N, channels C, heads)
    "A_1024x1280": (1024, 1280, 20),
    "B_4096x640": (4096, 640, 10),
}


# ---------------------------------------------------------------------------------------------------
# FLOP counts
# ---------------------------------------------------------------------------------------------------
def layer_flops(method: str, images: int, tokens: int, channels: int, rate: float = RATE, tile: int = TILE) -> float:
    """Matmul FLOPs of one self-attention layer call (q, k, v, out projections + QK^T + AV)."""
    from sdlite.attention import num_sampled_tokens, window_starts

    proj = 2 * tokens * channels * channels  # one (N, C) @ (C, C)
    if method == "stock":
        return images * (4 * proj + 2 * 2 * tokens * tokens * channels)
    w = images if method == "untiled" else tile
    stride = w
    slots = len(window_starts(images, w, stride)) * w  # image computations (> images when windows overlap)
    keys = tokens + num_sampled_tokens(w, tokens, rate)  # N (1 + (W-1) r)
    return slots * (4 * proj + 2 * 2 * tokens * keys * channels)


# ---------------------------------------------------------------------------------------------------
# the worker (one fresh process runs every job)
# ---------------------------------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _memory(call) -> tuple[dict, float]:
    """Run ``call`` once: its working memory (peak resident - resident before - output) and its time."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak resident set (VmHWM) to the current one
        f.write("5")
    before = _status_bytes("VmRSS")
    t0, c0 = time.perf_counter(), time.process_time()
    out = call()
    seconds = (time.perf_counter() - t0, time.process_time() - c0)
    peak = _status_bytes("VmHWM")
    out_bytes = out.numel() * out.element_size()
    del out
    return {"peak_rss_bytes": peak, "rss_before_bytes": before, "output_bytes": out_bytes,
            "working_bytes": peak - before - out_bytes}, seconds


def _compare(calls: dict, rounds: int) -> dict[str, dict]:
    """Memory of each call (first run), then ``rounds - 1`` more runs interleaved (a, b, c, a, b, c, ...)
    so that a burst of load from other processes hits every method alike; time = the fastest run (wall
    clock; the process CPU time of that run is recorded too, as cpu_s)."""
    results, times = {}, {name: [] for name in calls}
    for name, call in calls.items():
        results[name], seconds = _memory(call)
        times[name].append(seconds)
    for _ in range(rounds - 1):
        for name, call in calls.items():
            t0, c0 = time.perf_counter(), time.process_time()
            call()
            times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    for name in calls:
        wall, cpu = min(times[name])
        results[name].update(time_s=wall, cpu_s=cpu, times_s=[t for t, _ in times[name]])
    return results


def layer_job(cfg: dict) -> list[dict]:
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    from sdlite.attention import ConsistentSelfAttnProcessor, CSAState

    if cfg.get("threads"):  # e.g. 1: small layers on a shared machine time cleanly without thread hand-offs
        torch.set_num_threads(cfg["threads"])
    torch.manual_seed(0)
    N, C, heads = SHAPES[cfg["shape"]] if isinstance(cfg["shape"], str) else cfg["shape"]  # name or [N, C, h]
    B = cfg["images"]
    attn = Attention(query_dim=C, heads=heads, dim_head=C // heads, bias=False, out_bias=True).eval()  # SDXL attn1
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(1))  # (B, N, C)
    calls = {}
    with torch.no_grad():
        for method in cfg["methods"]:
            if method == "stock":
                proc = AttnProcessor2_0()
            else:
                tile = B if method == "untiled" else TILE
                proc = ConsistentSelfAttnProcessor(RATE, tile, tile, window_batch=1,
                                                   state=CSAState(generator=torch.Generator().manual_seed(2)))
            proc(attn, torch.randn(B, 16, C))  # warm-up on 16 tokens per image
            calls[method] = (lambda p: lambda: p(attn, x))(proc)
        results = _compare(calls, cfg["rounds"])
    return [{"kind": "layer", "shape": cfg["shape"], "method": m, "images": B, "rounds": cfg["rounds"],
             **results[m], "flops": layer_flops(m, B, N, C)} for m in cfg["methods"]]


def unet_job(cfg: dict) -> list[dict]:
    import torch

    from sdlite.attention import install_consistent_attention
    from sdlite.tiny import tiny_sdxl_unet, tiny_unet_inputs

    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    unet = tiny_sdxl_unet(seed=0)
    inputs = tiny_unet_inputs(unet, batch=cfg["images"], seed=1)

    def step(layers):
        def call():
            if layers == "none":
                return unet(**inputs).sample
            with install_consistent_attention(unet, rate=RATE, tile=TILE, stride=TILE, layers=layers, seed=2):
                return unet(**inputs).sample
        return call

    with torch.no_grad():
        unet(**tiny_unet_inputs(unet, batch=TILE, seed=3))  # warm-up
        results = _compare({layers: step(layers) for layers in cfg["layers"]}, cfg["rounds"])
    return [{"kind": "unet", "layers": layers, "images": cfg["images"], "rounds": cfg["rounds"], **results[layers]}
            for layers in cfg["layers"]]


def worker(jobs: list) -> None:
    """Run every job in this process (started with the glibc setting below), one JSON line per result."""
    import gc

    for kind, cfg in jobs:
        for row in (layer_job(cfg) if kind == "layer" else unet_job(cfg)):
            print(json.dumps(row), flush=True)
        gc.collect()


def run_jobs(jobs: list) -> Iterator[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(jobs)], env=env,
                            stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        yield json.loads(line)
    if proc.wait() != 0:
        raise RuntimeError(f"the benchmark worker failed with exit code {proc.returncode}")


# ---------------------------------------------------------------------------------------------------
# the grid
# ---------------------------------------------------------------------------------------------------
def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "load_average_at_start": os.getloadavg()}


def plan(quick: bool) -> list[tuple[str, dict]]:
    """Jobs in run order. Sizes chosen so the whole run stays under 5 minutes on 2 busy CPU cores:
    the time ratio at 4 images (interleaved rounds), memory up to 64 images tiled and 12 untiled."""
    if quick:
        return [("layer", {"shape": "A_1024x1280", "methods": ["stock", "tiled"], "images": 4, "rounds": 2}),
                ("layer", {"shape": "A_1024x1280", "methods": ["tiled", "untiled"], "images": 8, "rounds": 1}),
                ("layer", {"shape": "A_1024x1280", "methods": ["untiled"], "images": 12, "rounds": 1}),
                ("unet", {"layers": ["none", "up", "all"], "images": 4, "rounds": 3, "threads": 1})]
    return [
        ("layer", {"shape": "A_1024x1280", "methods": ["stock", "tiled"], "images": 4, "rounds": 3}),
        ("layer", {"shape": "B_4096x640", "methods": ["stock", "tiled"], "images": 4, "rounds": 2}),
        ("layer", {"shape": "A_1024x1280", "methods": ["stock", "tiled", "untiled"], "images": 8, "rounds": 1}),
        ("layer", {"shape": "A_1024x1280", "methods": ["untiled"], "images": 12, "rounds": 1}),
        ("layer", {"shape": "A_1024x1280", "methods": ["tiled"], "images": 64, "rounds": 1}),
        # the tiny UNet's ops are small: one thread, or thread hand-offs on a busy machine swamp the timing
        ("unet", {"layers": ["none", "up", "all"], "images": 8, "rounds": 4, "threads": 1}),
    ]


def summarize(rows: list[dict]) -> dict:
    def get(kind, **match):
        for r in rows:
            if r["kind"] == kind and all(r[k] == v for k, v in match.items()):
                return r
        return None

    out: dict = {}
    a = "A_1024x1280"
    t4, t64 = get("layer", shape=a, method="tiled", images=4), get("layer", shape=a, method="tiled", images=64)
    if t4 and t64:
        out["peak_memory_ratio_64_vs_4_tiled"] = t64["working_bytes"] / t4["working_bytes"]
        out["peak_memory_ratio_64_vs_4_tiled_how"] = f"measured, shape {a}, working memory (see docstring)"
    # untiled: the untiled story of 4 images is one window of W = 4 = the tiled run at 4 images
    u = {b: get("layer", shape=a, method="untiled", images=b) for b in (8, 12, 64)}
    if t4 and u[8] and u[12]:
        xs = [4, 8, 12]
        ys = [t4["working_bytes"], u[8]["working_bytes"], u[12]["working_bytes"]]
        out["untiled_working_bytes_measured"] = dict(zip(map(str, xs), ys))
        if u[64]:
            out["peak_memory_ratio_64_vs_4_untiled"] = u[64]["working_bytes"] / ys[0]
            out["peak_memory_ratio_64_vs_4_untiled_how"] = "measured"
        else:  # 64 images untiled need ~22 GB of keys/values at shape A: fit a + b B + c B^2 and extrapolate
            import numpy as np

            coef = np.polyfit(xs, ys, 2)
            out["peak_memory_ratio_64_vs_4_untiled"] = float(np.polyval(coef, 64) / ys[0])
            out["untiled_64_working_gib_extrapolated"] = float(np.polyval(coef, 64) / 2**30)
            out["peak_memory_ratio_64_vs_4_untiled_how"] = (
                "EXTRAPOLATED (not measured): quadratic through the measured working memory at 4, 8, 12 images, "
                f"shape {a}; 64 images untiled would need ~{np.polyval(coef, 64) / 2**30:.0f} GiB")
        out["peak_memory_ratio_12_vs_4_untiled_measured"] = ys[2] / ys[0]
    t8 = get("layer", shape=a, method="tiled", images=8)
    if t4 and t8:
        out["peak_memory_ratio_8_vs_4_tiled_measured"] = t8["working_bytes"] / t4["working_bytes"]
    s4, s8 = get("layer", shape=a, method="stock", images=4), get("layer", shape=a, method="stock", images=8)
    if s4 and s8:
        out["peak_memory_ratio_8_vs_4_stock_measured"] = s8["working_bytes"] / s4["working_bytes"]
    ratios = {}
    for shape in SHAPES:
        s, c = get("layer", shape=shape, method="stock", images=4), get("layer", shape=shape, method="tiled", images=4)
        if s and c:
            time_ratio = c["time_s"] / s["time_s"]
            flop_ratio = c["flops"] / s["flops"]
            ratios[shape] = {"time_ratio": time_ratio, "cpu_time_ratio": c["cpu_s"] / s["cpu_s"],
                             "flop_ratio": flop_ratio,
                             "time_over_flop_ratio": time_ratio / flop_ratio,
                             "cpu_time_over_flop_ratio": c["cpu_s"] / s["cpu_s"] / flop_ratio,
                             "key_ratio": 1 + (TILE - 1) * RATE,
                             "time_over_key_ratio": time_ratio / (1 + (TILE - 1) * RATE),
                             "memory_ratio_csa_over_stock": c["working_bytes"] / s["working_bytes"]}
    out["per_shape_4_images"] = ratios
    if ratios:
        worst = max(ratios, key=lambda k: ratios[k]["time_over_flop_ratio"])
        out["time_over_flop_ratio"] = ratios[worst]["time_over_flop_ratio"]
        out["time_over_flop_ratio_how"] = (f"worst shape ({worst}): (CSA time / stock time) / (CSA FLOPs / stock FLOPs),"
                                           " W=4, r=0.5, disjoint tiles, 4 images, whole layer incl. projections")
    base = next((r for r in rows if r["kind"] == "unet" and r["layers"] == "none"), None)
    if base:
        out["unet_step"] = {r["layers"]: {"images": r["images"], "time_s": r["time_s"],
                                          "time_ratio_vs_none": r["time_s"] / base["time_s"],
                                          "cpu_time_ratio_vs_none": r["cpu_s"] / base["cpu_s"],
                                          "working_mib": r["working_bytes"] / 2**20}
                            for r in rows if r["kind"] == "unet"}
    out["goals"] = {
        "tiled_memory_64_vs_4_within_1.25x": out.get("peak_memory_ratio_64_vs_4_tiled", float("inf")) <= 1.25,
        "untiled_memory_grows": out.get("peak_memory_ratio_12_vs_4_untiled_measured", 0) > 1.25,
        "time_within_1.3x_of_flop_ratio": out.get("time_over_flop_ratio", float("inf")) <= 1.3,
    }
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| part | shape / layers | method | images | time (s) | working memory (MiB) | GFLOP |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "layer":
            what, method, gflop = r["shape"], r["method"], f"{r['flops'] / 1e9:.0f}"
        else:
            what, method, gflop = f"tiny UNet, CSA on {r['layers']}", "one step", "-"
        lines.append(f"| {r['kind']} | {what} | {method} | {r['images']} | {r['time_s']:.3f} | "
                     f"{r['working_bytes'] / 2**20:.0f} | {gflop} |")
    return "\n".join(lines)


BEGIN, END = "<!-- attention.py results: begin (generated) -->", "<!-- attention.py results: end -->"


def results_section(result: dict) -> str:
    """The generated part of benchmarks/RESULTS.md: machine, command, date, table, goals."""
    m, g = result["machine"], result["goals"]
    per = result["per_shape_4_images"]

    def mark(ok: bool) -> str:
        return "**met**" if ok else "**NOT met**"

    lines = [BEGIN,
             f"Measured {result['date_utc']} with `{result['command']}` ({result['total_seconds']:.0f} s in all) on "
             f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), Python {m['python']}; "
             f"load average at start {m['load_average_at_start'][0]:.1f} (the machine was shared: wall times are noisy, "
             "so the CPU-time ratios are shown too).", "",
             markdown(result["rows"]), "",
             "| goal | measured | verdict |", "|---|---|---|",
             f"| tiled (W=4, r=0.5): working memory at 64 images within 1.25x of 4 images | "
             f"{result['peak_memory_ratio_64_vs_4_tiled']:.3f}x (8 vs 4: {result['peak_memory_ratio_8_vs_4_tiled_measured']:.3f}x)"
             f" | {mark(g['tiled_memory_64_vs_4_within_1.25x'])} |",
             f"| untiled (one window): working memory grows | 12 vs 4 images: "
             f"{result['peak_memory_ratio_12_vs_4_untiled_measured']:.2f}x measured; 64 vs 4: "
             f"{result['peak_memory_ratio_64_vs_4_untiled']:.0f}x extrapolated (quadratic fit, not run: it would need "
             f"~{result.get('untiled_64_working_gib_extrapolated', float('nan')):.0f} GiB) | "
             f"{mark(g['untiled_memory_grows'])} |",
             f"| disjoint tiles W=4, r=0.5: time ratio / FLOP ratio <= 1.3 (worst shape, wall clock) | "
             f"{result['time_over_flop_ratio']:.2f} | {mark(g['time_within_1.3x_of_flop_ratio'])} |", "",
             "| shape (4 images) | CSA/stock time (wall) | (CPU time) | FLOP ratio | wall / FLOP | CPU / FLOP | "
             "keys ratio 1+(W-1)r | CSA/stock working memory |", "|---|---|---|---|---|---|---|---|"]
    for shape, r in per.items():
        lines.append(f"| {shape} | {r['time_ratio']:.2f} | {r['cpu_time_ratio']:.2f} | {r['flop_ratio']:.2f} | "
                     f"{r['time_over_flop_ratio']:.2f} | {r['cpu_time_ratio'] / r['flop_ratio']:.2f} | "
                     f"{r['key_ratio']:.1f} | {r['memory_ratio_csa_over_stock']:.2f} |")
    if "unet_step" in result:
        lines += ["", "| tiny UNet step (8 images, W=4, r=0.5, one thread) | time (s) | vs no CSA (wall) | (CPU time) | "
                  "working memory (MiB) |", "|---|---|---|---|---|"]
        for layers, r in result["unet_step"].items():
            lines.append(f"| CSA on {layers} | {r['time_s']:.3f} | {r['time_ratio_vs_none']:.2f} | "
                         f"{r['cpu_time_ratio_vs_none']:.2f} | {r['working_mib']:.1f} |")
    lines.append(END)
    return "\n".join(lines)


def update_results_md(path: Path, section: str) -> None:
    """Replace the generated block of RESULTS.md (or append it); other sections are left alone."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Consistent self-attention (`benchmarks/attention.py`)\n\n" + section + "\n"
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid, for a smoke test")
    parser.add_argument("--out", default=None,
                        help="JSON to write (default benchmarks/attention.json; with --quick a file in the temp dir)")
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"),
                        help="file whose generated attention block is updated (full runs only; '' to skip)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.out is None:
        import tempfile

        args.out = str(Path(tempfile.gettempdir()) / "attention_quick.json") if args.quick else str(HERE / "attention.json")
    start = time.perf_counter()
    info = machine()
    rows = []
    t0 = time.perf_counter()
    for row in run_jobs(plan(args.quick)):
        rows.append(row)
        what = {k: row[k] for k in ("shape", "method", "layers", "images") if k in row}
        print(f"{row['kind']:5s} {json.dumps(what):70s} time {row['time_s']:7.3f} s  working "
              f"{row['working_bytes'] / 2**20:8.1f} MiB  (+{time.perf_counter() - t0:.0f} s)", flush=True)
    summary = summarize(rows)
    total = time.perf_counter() - start
    result = {
        **{k: v for k, v in summary.items()},
        "command": "python benchmarks/attention.py" + (" --quick" if args.quick else ""),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": info,
        "total_seconds": total,
        "settings": {"rate": RATE, "tile": TILE, "stride": TILE, "window_batch": 1, "shapes": SHAPES},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.results_md and not args.quick:
        update_results_md(Path(args.results_md), results_section(result))
        print(f"updated {args.results_md}")
    print(markdown(rows))
    print(json.dumps({k: v for k, v in summary.items()}, indent=2))
    print(f"total {total:.0f} s, wrote {args.out}")


if __name__ == "__main__":
    main()
