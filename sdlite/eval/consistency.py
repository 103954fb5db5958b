"""The consistency evaluation (the paper's Table 1, in storyworld): does CSA keep a character the same?

    python -m sdlite.eval consistency --stories 50 --out results/consistency.json

Random storyworld stories of 4-6 panels (8 for the write/read bank rows) whose prompts name the class word, the
scene and the action but *not* the identity attributes ("a girl, waving on the beach"): the model must choose
hair, clothes and hat itself, so only CSA can make the panels agree. Every story is generated under each setting:

    no_csa                   plain SDXL sampling (the baseline)
    default                  the default CSAConfig (what `sdlite story` does): references written, rest read
    rate_0.3/0.5/0.7/1.0     the whole story in one CSA batch at that sampling rate
    tile_2/4/all             the same at the model's default rate with windows of 2, 4 or all panels
    layers_up/all            CSA in the up-blocks' self-attention only (official) vs every self-attention layer
    bank8_no_csa / bank8     8-panel stories: no CSA vs 4 references written + 4 panels read from the bank

each with independent noise per panel ("per_panel") and with one shared seed for all panels ("shared", the
official demo's habit), and scored with :mod:`sdlite.eval.metrics` (recognizer + storyworld CLIP).
Bars (per_panel rows): default raises mean identity agreement by >= 0.30 over no_csa, with scene accuracy within
5 points of no_csa.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..attention import install_consistent_attention
from ..images import unit_to_uint8
from ..pipeline import CSAConfig, generate_story, model_defaults, panel_seeds
from ..story import parse_story
from ..storyworld import world as sw
from .metrics import mean_rows, score_story

__all__ = ["BARS", "EvalStory", "SETTINGS", "check_bars", "make_eval_stories", "run_consistency_eval",
           "run_consistency_table", "table_markdown"]


@dataclass(frozen=True)
class EvalStory:
    text: str
    prompts: tuple[str, ...]
    scenes: tuple[str, ...]
    actions: tuple[str, ...]
    class_word: str


def make_eval_stories(n: int, seed: int = 0, panels: tuple[int, int] = (4, 6)) -> list[EvalStory]:
    """n random one-character stories with ``panels[0]..panels[1]`` panels; prompts without identity words."""
    if n < 1:
        raise ValueError(f"need at least one story, got n={n}")
    lo, hi = panels
    if not 2 <= lo <= hi:
        raise ValueError(f"panels={panels}: need 2 <= min <= max panels per story")
    rng = np.random.default_rng([seed, 404])
    out = []
    for _ in range(n):
        cls = sw.CLASS_WORDS[rng.integers(len(sw.CLASS_WORDS))]
        k = int(rng.integers(lo, hi + 1))
        scenes = [sw.SCENES[i] for i in rng.integers(len(sw.SCENES), size=k)]
        actions = [sw.ACTIONS[i] for i in rng.integers(len(sw.ACTIONS), size=k)]
        lines = [f"[Hero] a {cls}"]
        lines += [f"[Hero] {a} {sw.SCENE_PHRASES[s]}" for s, a in zip(scenes, actions)]
        text = "\n".join(lines)
        story = parse_story(text)
        out.append(EvalStory(text, tuple(story.prompts), tuple(scenes), tuple(actions), cls))
    return out


def _batchable(csa: CSAConfig, n: int) -> bool:
    """A setting whose stories can share one pipeline call: no CSA, or one CSA batch per story whose windows
    (disjoint tiles) never cross from one story into the next."""
    if not csa.enabled:
        return True
    tile = n if csa.tile is None or csa.tile >= n else csa.tile
    refs = csa.references  # the "model" default is storyworld's 4 (these tables run on storyworld)
    one_batch = refs is None or refs >= n
    return one_batch and n % tile == 0 and (csa.stride is None or csa.stride == tile)


@torch.no_grad()
def generate_stories_batched(pipe, stories: list[EvalStory], csa: CSAConfig, *, steps: int | None = None,
                             seeds: list[int], seed_policy: str = "per_panel") -> list[np.ndarray]:
    """The panels of several equally long stories in ONE pipeline call (many images per call: several times
    the CPU throughput of one story per call). CSA runs in disjoint windows of one story each (tile = the story,
    or a divisor of it), so no story sees another; this is what generate_story does for a story that is one CSA
    batch (id_length >= its panels). Returns one uint8 (n, H, W, 3) per story.
    """

    n = len(stories[0].prompts)
    if any(len(st.prompts) != n for st in stories) or not _batchable(csa, n):
        raise ValueError("batched generation needs stories of equal length and a setting that is one CSA batch per "
                         "story with windows inside it: use batch_stories=1 for this setting")
    defaults = model_defaults(pipe)
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance_scale"]
    prompts = [p for st in stories for p in st.prompts]
    gens = [torch.Generator().manual_seed(s) for k, st in enumerate(stories)
            for s in panel_seeds(n, seeds[k], seed_policy)]
    handle = None
    if csa.enabled:
        csa = csa.with_model_defaults(defaults)
        tile = n if csa.tile is None or csa.tile >= n else csa.tile
        handle = install_consistent_attention(pipe.unet, rate=csa.rate, tile=tile, layers=csa.layers,
                                              guidance_halves=guidance > 1,
                                              first_steps_without_csa=csa.first_steps_without_csa,
                                              skip_schedule=csa.skip_schedule, seed=seeds[0],
                                              sampling=csa.sampling)
        handle.set_step(0)

    def on_step_end(_pipe, i, _t, kwargs):
        if handle is not None:
            handle.set_step(i + 1)
        return {}

    try:
        images = pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, generator=gens,
                      callback_on_step_end=on_step_end, output_type="np").images  # (K*n, H, W, 3) in [0, 1]
    finally:
        if handle is not None:
            handle.remove()
    images = unit_to_uint8(images)
    return [images[k * n:(k + 1) * n] for k in range(len(stories))]


# name -> (CSAConfig, which stories: "short" (4-6 panels) or "long" (8 panels))
SETTINGS: dict[str, tuple[CSAConfig, str]] = {
    "no_csa": (CSAConfig(enabled=False), "short"),
    "default": (CSAConfig(), "short"),
    "rate_0.3": (CSAConfig(rate=0.3, id_length=None), "short"),
    "rate_0.5": (CSAConfig(rate=0.5, id_length=None), "short"),
    "rate_0.7": (CSAConfig(rate=0.7, id_length=None), "short"),
    "rate_1.0": (CSAConfig(rate=1.0, id_length=None), "short"),
    "tile_2": (CSAConfig(tile=2, id_length=None), "short"),
    "tile_4": (CSAConfig(tile=4, id_length=None), "short"),
    "tile_all": (CSAConfig(id_length=None), "short"),
    "layers_up": (CSAConfig(layers="up", id_length=None), "short"),
    "layers_all": (CSAConfig(layers="all", id_length=None), "short"),
    "bank8_no_csa": (CSAConfig(enabled=False), "long"),
    "bank8": (CSAConfig(id_length=4, read_batch=4), "long"),
}
SEED_POLICY_NAMES = ("per_panel", "shared")

BARS = {"identity_gain": 0.30, "scene_drop_points": 5.0}


def _key(csa: CSAConfig, which: str) -> tuple:
    return (which, tuple(sorted((k, str(v)) for k, v in asdict(csa).items())))


def run_consistency_eval(pipe, recognizer, clip=None, clip_tokenizer=None, *, n_stories: int = 50,
                         settings: list[str] | None = None, seed_policies: tuple[str, ...] = SEED_POLICY_NAMES,
                         steps: int | None = None, seed: int = 0, short_panels: tuple[int, int] = (4, 6),
                         long_panels: int = 8, progress: bool = True, log=print,
                         shared_settings: list[str] | None = None, batch_stories: int = 1,
                         sampling: str = "exact") -> list[dict]:
    """Generate and score every story under every setting; one row per (setting, seed_policy).

    Settings that are the same computation (e.g. rate_0.5, tile_all and layers_all on storyworld) are run once
    and reported under each name. ``shared_settings`` limits the "shared" seed policy to those settings (None: all).
    ``sampling``: how every CSA setting samples tokens ("exact", sdlite's, or "official", see sdlite.token_sampling).
    ``batch_stories`` > 1 generates that many stories per pipeline call where the setting allows it
    (:func:`generate_stories_batched`; several times faster on a CPU), else story by story with generate_story.
    """
    from tqdm.auto import tqdm


    names = list(SETTINGS) if settings is None else list(settings)
    unknown = [s for s in names + list(shared_settings or []) if s not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    stories = {"short": make_eval_stories(n_stories, seed, short_panels), "long": make_eval_stories(n_stories, seed + 1,
                                                                                      (long_panels, long_panels))}
    defaults = model_defaults(pipe)
    done: dict[tuple, dict] = {}
    rows = []
    def names_for(policy):
        if policy == "shared" and shared_settings is not None:
            return [n for n in names if n in shared_settings]
        return names

    total = sum(len(names_for(p)) for p in seed_policies) * n_stories
    bar = tqdm(total=total, desc="consistency eval", unit="story", disable=not progress)
    for policy in seed_policies:
        for name in names_for(policy):
            csa, which = SETTINGS[name]
            csa = dataclasses.replace(csa, sampling=sampling).with_model_defaults(defaults)
            group = stories[which]
            n0 = len(group[0].prompts)
            batched = batch_stories > 1 and all(len(st.prompts) == n0 for st in group) and _batchable(csa, n0)
            key = (policy, _key(csa, which), batched)
            if batched and csa.enabled:  # one CSA batch per story: id_length and tile >= n mean the same thing
                eff_tile = None if csa.tile is None or csa.tile >= n0 else csa.tile
                key = (policy, which, "batched", csa.rate, eff_tile, csa.layers, csa.first_steps_without_csa,
                       str(csa.skip_schedule), csa.sampling)
            elif batched:
                key = (policy, which, "batched", "no_csa")
            if key not in done:
                t0 = time.perf_counter()
                per_story = []
                for c0 in range(0, len(group), batch_stories if batched else 1):
                    chunk = group[c0:c0 + (batch_stories if batched else 1)]
                    chunk_seeds = [seed + 1000 * (c0 + j) for j in range(len(chunk))]
                    if batched:
                        arrays = generate_stories_batched(pipe, chunk, csa, steps=steps, seeds=chunk_seeds,
                                                          seed_policy=policy)
                    else:
                        res = generate_story(pipe, parse_story(chunk[0].text), csa=csa, steps=steps,
                                             seed=chunk_seeds[0], seed_policy=policy, progress=False)
                        arrays = [res.arrays()]
                    for st, arr in zip(chunk, arrays):
                        per_story.append(score_story(arr, list(st.prompts), list(st.scenes), list(st.actions),
                                                     recognizer, clip, clip_tokenizer))
                    bar.update(len(chunk))
                done[key] = {**mean_rows(per_story), "seconds": round(time.perf_counter() - t0, 1),
                             "n_panels": sum(len(st.prompts) for st in group),
                             "generation": f"{batch_stories} stories per pipeline call" if batched
                             else "generate_story, one story per call"}
            else:
                bar.update(n_stories)
            result = done[key]
            row = {"setting": name, "seed_policy": policy, **{k: round(v, 4) if isinstance(v, float) else v
                                                              for k, v in result.items()},
                   "n_stories": n_stories,
                   "stories": f"make_eval_stories({n_stories}, seed={seed}, panels={tuple(short_panels)})"
                   if which == "short" else f"make_eval_stories({n_stories}, seed={seed + 1}, panels="
                                            f"({long_panels}, {long_panels}))",
                   "csa": {**asdict(csa), "layers": csa.layers if csa.enabled else None,
                           "rate": csa.rate if csa.enabled else None, "skip_schedule": str(csa.skip_schedule)},
                   "steps": steps or defaults["steps"]}
            rows.append(row)
            if log:
                log(f"{name:>13} {policy:>9}: identity {row['identity_agreement']:.3f}  scene "
                    f"{row['scene_accuracy']:.3f}  action {row['action_accuracy']:.3f}")
    bar.close()
    return rows


def check_bars(rows: list[dict]) -> dict:
    """The issue's bars on the per_panel rows: identity gain of default over no_csa, scene accuracy drop."""
    by = {(r["setting"], r["seed_policy"]): r for r in rows}
    if ("default", "per_panel") not in by or ("no_csa", "per_panel") not in by:
        raise ValueError("the bars need the rows ('default', 'per_panel') and ('no_csa', 'per_panel')")
    d, n = by[("default", "per_panel")], by[("no_csa", "per_panel")]
    gain = d["identity_agreement"] - n["identity_agreement"]
    drop = 100 * (n["scene_accuracy"] - d["scene_accuracy"])
    return {"identity_gain": round(gain, 4), "identity_bar": BARS["identity_gain"],
            "identity_met": bool(gain >= BARS["identity_gain"]),
            "scene_drop_points": round(drop, 2), "scene_bar_points": BARS["scene_drop_points"],
            "scene_met": bool(drop <= BARS["scene_drop_points"])}


def table_markdown(rows: list[dict]) -> str:
    """The table as markdown, bars marked."""
    cols = ["identity_agreement", "identity_hair", "identity_shirt", "identity_trousers", "identity_hat",
            "scene_accuracy", "action_accuracy", "clip_i", "clip_t"]
    head = "| setting | seed policy | " + " | ".join(c.replace("identity_agreement", "identity (mean)")
                                                   .replace("identity_", "id ") for c in cols) + " | stories |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for r in rows:
        vals = " | ".join(f"{r[c]:.3f}" if c in r else "-" for c in cols)
        lines.append(f"| {r['setting']} | {r['seed_policy']} | {vals} | {r['n_stories']} |")
    bars = check_bars(rows)
    lines.append("")
    lines.append(f"Bar 1, mean identity agreement of `default` minus `no_csa` (per_panel) >= {bars['identity_bar']}: "
                 f"{bars['identity_gain']:+.3f}, **{'met' if bars['identity_met'] else 'not met'}**.")
    lines.append(f"Bar 2, scene accuracy drop of `default` vs `no_csa` (per_panel) <= {bars['scene_bar_points']} "
                 f"points: {bars['scene_drop_points']:+.1f} points, **{'met' if bars['scene_met'] else 'not met'}**.")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Command line: python -m sdlite.eval consistency ...
# ----------------------------------------------------------------------------------------------------


def run_consistency_table(out: str | Path, command: str, model: str = "storyworld", recognizer=None,
                          log=print, **options) -> list[dict]:
    """The job behind `python -m sdlite.eval consistency`: load the storyworld pipeline (or the folder `model`), its
    CLIP and the recognizer, run `run_consistency_eval(**options)`, and write the rows (`out`, JSON, each with the
    `command`) and the table with its bars (`out` with .md). The caller checks that both may be written."""
    from ..storyworld.models import load_storyworld, load_storyworld_clip
    from ..storyworld.recognizer import load_recognizer

    folder = None if model == "storyworld" else Path(model)
    pipe = load_storyworld("cpu", folder=folder)
    clip, clip_tok = load_storyworld_clip("cpu", folder=folder)
    t0 = time.perf_counter()
    rows = run_consistency_eval(pipe, load_recognizer(recognizer), clip, clip_tok, **options)
    for r in rows:
        r["command"] = command
    out = Path(out)
    out.write_text(json.dumps(rows, indent=1) + "\n")
    text = f"Command: `{command}` ({time.perf_counter() - t0:.0f} s)\n\n"
    try:
        text += table_markdown(rows)
        if log:
            log(json.dumps(check_bars(rows)))
    except ValueError as err:  # a subset without default/no_csa: table without bars
        text += f"(no bars: {err})\n"
    out.with_suffix(".md").write_text(text)
    return rows
