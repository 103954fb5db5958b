"""Peak memory of generate_story vs story length: a 32-panel story must not need more than an 8-panel one.

    python benchmarks/story_memory.py                 # 8 and 32 panels, write/read bank vs one CSA batch
    python benchmarks/story_memory.py --panels 4 8 16 32 --size 64 --steps 2

Each measurement runs in a fresh process (peak RSS is a high-water mark): load a random storyworld-architecture
pipeline ("base" sizes), generate a 1-panel story (warm-up: the high-water mark of the model + one batch), then
the n-panel story; report peak RSS after the story minus the warm-up peak, i.e. the extra memory the story
length costs. glibc keeps freed heap pages and fragments under this alloc/free pattern, which inflates the
high-water mark a little by chance; run with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=65536`` (large
buffers then go straight back to the OS) to see what the tensors themselves need. "bank" is the default protocol (4 references written, then read batches of 4); "one_batch" puts
every panel in one CSA batch (id_length=None), the memory-hungry way, to show the measurement sees growth.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB


def child(panels: int, mode: str, size: int, steps: int) -> dict:
    import torch

    from sdlite.storyworld.models import StoryworldSizes, assemble_pipeline, build_clip, build_storyworld_tokenizer
    from sdlite.storyworld.models import build_unet, build_vae
    from sdlite.pipeline import CSAConfig, generate_story
    from sdlite.story import parse_story

    torch.set_num_threads(2)
    sizes = StoryworldSizes.named("base")
    tok = build_storyworld_tokenizer()
    clip = build_clip(sizes, tok, seed=1)
    pipe = assemble_pipeline(build_vae(sizes, seed=2), clip, build_unet(sizes, seed=3), tok)
    pipe.set_progress_bar_config(disable=True)
    csa = CSAConfig() if mode == "bank" else CSAConfig(id_length=None)
    acts = ["standing", "walking", "jumping", "sitting", "waving"]

    def story(n):
        return parse_story("[A] a girl\n" + "\n".join(f"[A] {acts[i % 5]} in the park" for i in range(n)))

    generate_story(pipe, story(1), csa=csa, steps=steps, height=size, width=size, progress=False)
    warm = _peak_mb()
    t0 = time.perf_counter()
    res = generate_story(pipe, story(panels), csa=csa, steps=steps, height=size, width=size, progress=False)
    return {"panels": panels, "mode": mode, "size": size, "steps": steps, "warm_peak_mb": round(warm, 1),
            "peak_mb": round(_peak_mb(), 1), "extra_mb": round(_peak_mb() - warm, 1),
            "bank_mb": round(res.bank_nbytes / 2**20, 2), "largest_batch": max(len(b.panels) for b in res.plan),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--panels", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--modes", nargs="+", default=["bank", "one_batch"], choices=["bank", "one_batch"])
    ap.add_argument("--size", type=int, default=64, help="image size in px (storyworld: 64)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.panels[0], args.modes[0], args.size, args.steps)))
        return
    rows = []
    for mode in args.modes:
        for n in args.panels:
            cmd = [sys.executable, __file__, "--child", "--panels", str(n), "--modes", mode, "--size", str(args.size),
                   "--steps", str(args.steps)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for mode in args.modes:
        r = {x["panels"]: x for x in rows if x["mode"] == mode}
        lo, hi = min(r), max(r)
        print(f"{mode}: peak RSS {r[hi]['peak_mb']:.0f} MiB at {hi} panels vs {r[lo]['peak_mb']:.0f} MiB at {lo} "
              f"(ratio {r[hi]['peak_mb'] / r[lo]['peak_mb']:.3f}); extra over warm-up {r[hi]['extra_mb']:.0f} vs "
              f"{r[lo]['extra_mb']:.0f} MiB; bank {r[hi]['bank_mb']} vs {r[lo]['bank_mb']} MiB")


if __name__ == "__main__":
    main()
