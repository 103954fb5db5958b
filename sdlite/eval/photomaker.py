"""PhotoMaker in storyworld, measured: do a story's panels follow the reference images?

    python -m sdlite.eval photomaker --stories 100 --out results/photomaker.json

Stories of one character from the held-out split (`storyworld.datasets.is_held_out`: the ID encoder never saw these
characters in training), 4 panels, independent noise per panel, prompts that leave the identity unsaid ("a girl img,
waving on the beach"). The references are renders of the character in other scenes and poses. The recognizer reads
hair, shirt, trousers and hat in every panel and in the first reference; the *reference match* of an attribute is the
share of panels that agree with the reference. Settings, all on the same stories and noise:

    no_id            the text-only prompts (the baseline: the model picks the identity itself)
    id               the ID path, one reference, CSA off
    id_csa           the ID path with consistent self-attention (the official demo's "reference images" mode)
    id_3_refs        three references, CSA off
    id_strength_R    the delayed-conditioning sweep (style strength R %: text-only for the first R % of the steps),
                     on *other* stories (`tuning_seed`); the default strength is chosen there, then used above
    id_guidance_G    then, at that strength, the guidance sweep (classifier-free guidance scale G) on the same tuning
                     stories; the reference mode's default guidance is chosen there the same way, then used above

The ID rows draw every panel `candidates` times (`STORYWORLD_CANDIDATES`, fixed, not tuned) and keep the draw whose
ID embedding is closest to the reference's (`sdlite.id_selection`), as `sdlite story --ref` does on storyworld.
Next to them, on the same stories:

    id_single_draw      the ID path with one draw per panel (the row `id` was before the choice)
    id_csa_single_draw  the same with CSA
    selection_only      text-only draws, the closest to the reference kept: what the choice does without the ID path
    candidate_sweep     on the tuning stories, 1, 2, 4 and 8 draws per panel at the chosen strength and guidance

Bars: reference_match_min (id, as shipped) >= 0.75, reference_match_min_with_csa >= reference_match_min - 0.02,
scene accuracy within 5 points of no_id. `csa_minus_id`: the CSA row's minimum minus the ID row's, with a paired
bootstrap interval over the stories. Each story moves a row's mean by 1/(4 * stories) per panel, so a gap of
0.02 needs many stories to be told from luck: the Makefile's line measures 100.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..id_selection import candidate_seeds, pick_closest
from ..pipeline import CSAConfig, generate_story
from ..story import parse_story
from ..storyworld import world as sw
from ..storyworld.datasets import id_caption, sample_split_character

MATCHED = ("hair", "shirt", "trousers", "hat")
STRENGTHS = (0.0, 10.0, 20.0, 30.0, 50.0)
GUIDANCES = (2.0, 3.0, 4.0, 5.0)  # 5: storyworld's default guidance (the strength sweep's)
STORYWORLD_CANDIDATES = 8  # draws per panel in reference mode (`sdlite.id_selection`): a 4-panel story in seconds
CANDIDATE_COUNTS = (2, 4, 8)  # shown on the tuning stories next to the single draw
EVAL_SEED = 5150
TUNING_SEED = 6160
PANELS = 4


@dataclass(frozen=True)
class ReferenceStory:
    """One evaluation story: its text (the `[Name] a girl img` form), the references' renders and the asked labels."""

    text: str
    references: tuple  # uint8 (H, W, 3) renders of the character in other scenes
    scenes: tuple[str, ...]
    actions: tuple[str, ...]
    character: sw.Character


def make_reference_stories(n: int, seed: int = EVAL_SEED, references: int = 3) -> list[ReferenceStory]:
    """n stories of held-out characters, `PANELS` panels each, with `references` reference renders each."""
    if n < 1:
        raise ValueError(f"need at least one story, got n={n}")
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 77])
        ch = sample_split_character(rng, held_out=True)
        scenes = [sw.SCENES[j] for j in rng.permutation(len(sw.SCENES))]
        panels = [sw.sample_panel(rng, ch, scene=scenes[j]) for j in range(PANELS)]
        refs = [sw.render(sw.sample_panel(rng, ch, scene=scenes[PANELS + j % (len(scenes) - PANELS)]))
                for j in range(references)]
        lines = [f"[Ref] a {ch.class_word} img"] + [f"[Ref] {id_caption(p)[len(f'a {ch.class_word} img, '):]}"
                                                   for p in panels]
        out.append(ReferenceStory("\n".join(lines), tuple(refs), tuple(p.scene for p in panels),
                                  tuple(p.action for p in panels), ch))
    return out


def reference_match(panels: np.ndarray, reference: np.ndarray, recognizer) -> dict[str, float]:
    """Share of panels (n, H, W, 3) whose recognised hair / shirt / trousers / hat equal the reference's."""
    pred = recognizer.predict(np.concatenate([reference[None], panels]))
    return {a: float((pred[a][1:] == pred[a][0]).float().mean()) for a in MATCHED}


def _scene_action(panels: np.ndarray, story: ReferenceStory, recognizer) -> tuple[float, float]:
    pred = recognizer.predict(panels)
    scene = np.mean([sw.SCENES[i] == s for i, s in zip(pred["scene"].tolist(), story.scenes)])
    action = np.mean([sw.ACTIONS[i] == a for i, a in zip(pred["action"].tolist(), story.actions)])
    return float(scene), float(action)


def setting_rows(pipe, encoder, stories: list[ReferenceStory], recognizer, *, use_id: bool = True, csa: bool = False,
                 references: int = 1, strength: float = 20.0, guidance: float | None = None, seed: int = 0,
                 candidates: int = 1) -> list[dict[str, float]]:
    """One setting, story by story: the reference match per attribute, scene and action accuracy of each story's
    panels (`guidance`: the classifier-free guidance scale; None: the model's default, storyworld's 5; `candidates`:
    draws per panel, the one closest to the reference kept, `sdlite.id_selection`; without the ID path that choice
    alone)."""
    rows = []
    for k, st in enumerate(stories):
        story = parse_story(st.text)
        refs = {"Ref": list(st.references[:references])}
        kw = dict(csa=CSAConfig(enabled=csa), guidance_scale=guidance, progress=False)
        if use_id:
            res = generate_story(pipe, story, seed=seed + 1000 * k, id_images=refs, id_encoder=encoder,
                                 style_strength_ratio=strength, candidates=candidates, **kw)
        else:  # text-only draws; with candidates > 1 kept by closeness to the reference (the choice without the ID)
            runs = [generate_story(pipe, story, seed=s, **kw) for s in candidate_seeds(seed + 1000 * k, candidates)]
            res = runs[0] if candidates == 1 else pick_closest(encoder, runs, refs)
        panels = res.arrays()
        match = reference_match(panels, st.references[0], recognizer)
        scene, action = _scene_action(panels, st, recognizer)
        rows.append({**match, "scene_accuracy": scene, "action_accuracy": action})
    return rows


def summarise(rows: list[dict[str, float]]) -> dict[str, float]:
    """The stories' mean of each measure, and `reference_match_min`: the lowest attribute's mean."""
    mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    mean["reference_match_min"] = min(mean[a] for a in MATCHED)
    return {k: round(v, 4) for k, v in mean.items()}


def run_setting(pipe, encoder, stories: list[ReferenceStory], recognizer, **setting) -> dict[str, float]:
    """Mean reference match per attribute, its minimum, scene and action accuracy of one setting over the stories
    (the keywords: :func:`setting_rows`)."""
    return summarise(setting_rows(pipe, encoder, stories, recognizer, **setting))


def paired_min_difference(rows_a: list[dict], rows_b: list[dict], resamples: int = 2000, seed: int = 0,
                          level: float = 0.95) -> dict[str, float]:
    """`reference_match_min` of setting a minus that of b, measured on the same stories, and its bootstrap
    confidence interval (stories resampled with replacement, seeded; the minimum is taken after each resample's
    means): is the gap between two rows bigger than the luck of which stories were drawn?"""
    a = np.array([[r[m] for m in MATCHED] for r in rows_a])  # (stories, attributes)
    b = np.array([[r[m] for m in MATCHED] for r in rows_b])
    if a.shape != b.shape or len(a) < 2:
        raise ValueError(f"need both settings' rows on the same >= 2 stories, got {len(a)} and {len(b)}")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(resamples, len(a)))
    diffs = a[idx].mean(1).min(-1) - b[idx].mean(1).min(-1)  # (resamples,)
    lo, hi = np.quantile(diffs, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": round(float(a.mean(0).min() - b.mean(0).min()), 4), "ci_low": round(float(lo), 4),
            "ci_high": round(float(hi), 4), "level": level, "n": len(a)}


def _choose(sweep: dict[str, dict], prefix: str, max_scene_drop: float) -> float:
    """The value V of the best `prefix`V row: the highest reference match among the rows whose scene accuracy is
    within `max_scene_drop` of the no-ID baseline; a tie goes to the lower V."""
    base = sweep["no_id"]["scene_accuracy"]
    ok = [(row["reference_match_min"], -float(name[len(prefix):]), float(name[len(prefix):]))
          for name, row in sweep.items() if name.startswith(prefix)
          and base - row["scene_accuracy"] <= max_scene_drop]
    if not ok:
        raise ValueError(f"no {prefix}* setting keeps scene accuracy within the limit: widen the sweep")
    return max(ok)[2]


def choose_strength(sweep: dict[str, dict], max_scene_drop: float = 0.05) -> float:
    """The delayed-conditioning default: the strength with the best reference match among those whose scene
    accuracy is within `max_scene_drop` of the no-ID baseline (the trade-off PhotoMaker describes)."""
    return _choose(sweep, "id_strength_", max_scene_drop)


def choose_guidance(sweep: dict[str, dict], max_scene_drop: float = 0.05) -> float:
    """The reference mode's guidance scale, by the same rule over the `id_guidance_G` rows."""
    return _choose(sweep, "id_guidance_", max_scene_drop)


def run_photomaker_eval(pipe, encoder, recognizer, *, n_stories: int = 100, n_tuning: int = 24, seed: int = 0,
                        command: str = "", progress: bool = True, others: dict | None = None,
                        candidates: int = STORYWORLD_CANDIDATES) -> dict:
    """The whole table (see the module doc) as a dict ready for results/photomaker.json. `others`: {name: (pipe,
    encoder)}, other ID encoders (each on its own pipeline: a LoRA stays fused) measured as the `id` row, under
    `encoder_ablation`."""
    t0 = time.time()
    say = print if progress else (lambda *a, **k: None)
    tuning = make_reference_stories(n_tuning, TUNING_SEED)
    sweep = {"no_id": run_setting(pipe, encoder, tuning, recognizer, use_id=False, seed=seed)}
    for r in STRENGTHS:
        sweep[f"id_strength_{r:g}"] = run_setting(pipe, encoder, tuning, recognizer, strength=r, seed=seed)
        say(f"tuning strength {r:g}: {sweep[f'id_strength_{r:g}']}")
    strength = choose_strength(sweep)
    guidance_rows = {"no_id": sweep["no_id"]}
    for g in GUIDANCES:
        guidance_rows[f"id_guidance_{g:g}"] = run_setting(pipe, encoder, tuning, recognizer, strength=strength,
                                                          guidance=g, seed=seed)
        say(f"tuning guidance {g:g}: {guidance_rows[f'id_guidance_{g:g}']}")
    guidance = choose_guidance(guidance_rows)
    # the draws per panel: fixed beforehand (a cost, not tuned); the tuning stories show what each count buys
    candidate_rows = {"1": guidance_rows[f"id_guidance_{guidance:g}"]}
    for c in CANDIDATE_COUNTS:
        candidate_rows[str(c)] = run_setting(pipe, encoder, tuning, recognizer, strength=strength, guidance=guidance,
                                             seed=seed, candidates=c)
        say(f"tuning candidates {c}: {candidate_rows[str(c)]}")
    stories = make_reference_stories(n_stories, EVAL_SEED)
    single = {"strength": strength, "guidance": guidance, "seed": seed}
    chosen = {**single, "candidates": candidates}  # every ID row's settings
    id_rows = setting_rows(pipe, encoder, stories, recognizer, **chosen)
    csa_rows = setting_rows(pipe, encoder, stories, recognizer, csa=True, **chosen)
    table = {
        "no_id": run_setting(pipe, encoder, stories, recognizer, use_id=False, seed=seed),
        "id": summarise(id_rows),
        "id_csa": summarise(csa_rows),
        "id_3_refs": run_setting(pipe, encoder, stories, recognizer, references=3, **chosen),
        "id_single_draw": run_setting(pipe, encoder, stories, recognizer, **single),
        "id_csa_single_draw": run_setting(pipe, encoder, stories, recognizer, csa=True, **single),
        "selection_only": run_setting(pipe, encoder, stories, recognizer, use_id=False, seed=seed,
                                      candidates=candidates),
    }
    for name, row in table.items():
        say(f"{name}: {row}")
    ablation = {name: run_setting(other_pipe, other, stories, recognizer, **chosen)
                for name, (other_pipe, other) in (others or {}).items()}
    result = {
        "reference_match_min": table["id"]["reference_match_min"],
        "reference_match_min_with_csa": table["id_csa"]["reference_match_min"],
        "no_id_reference_match_min": table["no_id"]["reference_match_min"],
        "csa_minus_id": paired_min_difference(csa_rows, id_rows),
        "reference_match_min_single_draw": table["id_single_draw"]["reference_match_min"],
        "candidates": candidates,
        "scene_accuracy_drop": round(table["no_id"]["scene_accuracy"] - table["id"]["scene_accuracy"], 4),
        "n_stories": n_stories,
        "panels_per_story": PANELS,
        "style_strength_ratio": strength,
        "guidance_scale": guidance,
        "table": table,
        "strength_sweep": {"n_stories": n_tuning, "seed": TUNING_SEED, "rows": sweep},
        "guidance_sweep": {"n_stories": n_tuning, "seed": TUNING_SEED, "style_strength_ratio": strength,
                           "rows": guidance_rows},
        "candidate_sweep": {"n_stories": n_tuning, "seed": TUNING_SEED, "style_strength_ratio": strength,
                            "guidance_scale": guidance, "rows": candidate_rows},
        **({"encoder_ablation": {"id": table["id"], **ablation}} if ablation else {}),
        "seconds": round(time.time() - t0, 1),
        "command": command,
    }
    result["bars"] = {
        "reference_match_min_ge_0.75": result["reference_match_min"] >= 0.75,
        "reference_match_min_with_csa_ge_reference_match_min_minus_0.02":
            result["reference_match_min_with_csa"] >= result["reference_match_min"] - 0.02,
        "scene_accuracy_drop_le_0.05": result["scene_accuracy_drop"] <= 0.05,
    }
    return result


# ----------------------------------------------------------------------------------------------------------
# What the tower sees: a linear probe of its pooled output
# ----------------------------------------------------------------------------------------------------------
PROBED = ("class_word", "hair", "shirt", "trousers", "hat", "scene")


def _pooled(vision_model, panels, mean, std) -> torch.Tensor:
    from ..id_encoder import id_pixel_values

    images = [sw.render(p) for p in panels]
    pix = id_pixel_values(images, vision_model.config.image_size, mean=mean, std=std)
    with torch.no_grad():
        return vision_model(pixel_values=pix).pooler_output  # (n, hidden)


def tower_probe(vision_model, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), n_train: int = 1500, n_test: int = 500,
                seed: int = 0, steps: int = 300) -> dict[str, float]:
    """Held-out accuracy of a linear classifier per label on a frozen tower's pooled output: what the tower *sees*.
    Trained on training-split characters, tested on held-out ones (seeded; a few seconds on CPU)."""
    rng = np.random.default_rng([seed, 31])
    train = [sw.sample_panel(rng, sample_split_character(rng, False)) for _ in range(n_train)]
    test = [sw.sample_panel(rng, sample_split_character(rng, True)) for _ in range(n_test)]
    xtr, xte = _pooled(vision_model, train, mean, std), _pooled(vision_model, test, mean, std)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    out = {}
    for name in PROBED:
        ytr = torch.tensor([sw.labels(p)[name] for p in train])
        yte = torch.tensor([sw.labels(p)[name] for p in test])
        gen = torch.Generator().manual_seed(seed)
        head = torch.nn.Linear(xtr.shape[1], len(sw.ATTRIBUTES[name]))
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
            head.bias.zero_()
        opt = torch.optim.Adam(head.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(head(xtr), ytr) + 1e-3 * head.weight.pow(2).sum()
            loss.backward()
            opt.step()
        out[name] = round(float((head(xte).argmax(-1) == yte).float().mean()), 3)
    return out


def write_result(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return out
