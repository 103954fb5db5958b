"""Consistency metrics (identity agreement, accuracies, CLIP-I/T) and the consistency evaluation's plumbing."""
import json

import numpy as np
import pytest
import torch

from sdlite import storyworld as sw
from sdlite.cli.eval import build_parser as eval_parser
from sdlite.eval.consistency import SETTINGS, check_bars, make_eval_stories, run_consistency_eval, table_markdown
from sdlite.eval.metrics import (
    clip_i, clip_image_embeddings, clip_t, clip_text_embeddings, identity_agreement, label_accuracy, mean_rows,
    pair_agreement, score_story,
)
from sdlite.story import parse_story



def test_pair_agreement_counts_pairs():
    assert pair_agreement([1, 1, 1, 1]) == 1.0
    assert pair_agreement([0, 1, 2, 3]) == 0.0
    assert pair_agreement([0, 0, 1]) == pytest.approx(1 / 3)  # pairs (0,1),(0,2),(1,2): one agrees
    assert pair_agreement(torch.tensor([2, 2, 5, 5])) == pytest.approx(2 / 6)
    assert pair_agreement([7]) == 1.0
    assert pair_agreement(["red", "red", "blue"]) == pytest.approx(1 / 3)


def test_agreement_and_accuracy_of_tensors_are_python_floats():
    # tensors are read with .tolist(): list(tensor) would compare 0-d tensors and return a 0-d tensor, which the
    # rows' JSON cannot hold
    values = [pair_agreement(torch.tensor([2, 2, 5])), label_accuracy(torch.tensor([1, 2]), [1, 3]),
              label_accuracy([1, 2], torch.tensor([1, 3])), label_accuracy(torch.tensor([1, 2]), torch.tensor([1, 2]))]
    assert values == [pytest.approx(1 / 3), 0.5, 0.5, 1.0]
    assert [type(v) for v in values] == [float] * 4
    json.dumps(values)
    out = identity_agreement({a: torch.tensor([0, 0, 1]) for a in sw.IDENTITY_ATTRIBUTES})
    assert all(type(v) is float for v in out.values()) and out["mean"] == pytest.approx(1 / 3)


def test_identity_agreement_per_attribute_and_mean():
    pred = {"hair": torch.tensor([0, 0, 0]), "shirt": torch.tensor([0, 1, 2]), "trousers": torch.tensor([1, 1, 0]),
            "hat": torch.tensor([3, 3, 3]), "scene": torch.tensor([0, 1, 2])}
    out = identity_agreement(pred)
    assert out["hair"] == 1.0 and out["shirt"] == 0.0 and out["trousers"] == pytest.approx(1 / 3) and out["hat"] == 1
    assert out["mean"] == pytest.approx((1 + 0 + 1 / 3 + 1) / 4)
    with pytest.raises(ValueError, match=r"predictions lack \['hat'\]"):
        identity_agreement({k: v for k, v in pred.items() if k != "hat"})


def test_label_accuracy_and_mean_rows():
    assert label_accuracy(["park", "beach"], ["park", "city"]) == 0.5
    assert label_accuracy(torch.tensor([1, 2]), [1, 2]) == 1.0
    with pytest.raises(ValueError, match="as many predictions as targets"):
        label_accuracy([1], [1, 2])
    assert mean_rows([{"a": 1.0}, {"a": 0.0}]) == {"a": 0.5}
    with pytest.raises(ValueError, match="^no rows to average$"):
        mean_rows([])


def test_clip_scores_by_hand():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    assert clip_i(e) == pytest.approx((0 + 2 ** -0.5 + 2 ** -0.5) / 3)
    assert clip_t(e, e) == pytest.approx(1.0)
    assert clip_i(e[:1]) == 1.0
    assert clip_i(e[:2]) == pytest.approx(0.0)  # two images: one pair, orthogonal (not the 1.0 of a single image)
    assert clip_i(e[1:]) == pytest.approx(2 ** -0.5)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_t(e, e[:2])


class _Oracle:
    """A recognizer that knows the truth of rendered panels (to test score_story without a trained model)."""

    def __init__(self, panels):
        self.labels = [sw.labels(p) for p in panels]

    def predict(self, images):
        return {k: torch.tensor([lab[k] for lab in self.labels]) for k in sw.ATTRIBUTES}


def test_score_story_on_renders_of_one_and_of_different_characters():
    rng = np.random.default_rng(0)
    hero = sw.sample_character(rng)
    same = [sw.sample_panel(rng, hero) for _ in range(4)]
    mixed = [sw.sample_panel(rng) for _ in range(4)]
    for panels, expect_one in ((same, True), (mixed, False)):
        images = np.stack([sw.render(p) for p in panels])
        prompts = [sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES) for p in panels]
        row = score_story(images, prompts, [p.scene for p in panels], [p.action for p in panels], _Oracle(panels))
        assert row["scene_accuracy"] == 1.0 and row["action_accuracy"] == 1.0
        assert (row["identity_agreement"] == 1.0) == expect_one
    assert all(type(v) is float for v in row.values())
    with pytest.raises(ValueError, match="one prompt, scene and action per panel"):
        score_story(images, prompts[:2], [], [], _Oracle(panels))
    # CLIP scores without the tokenizer: refused before the model is used (any object stands for it)
    with pytest.raises(ValueError, match=r"^clip scores need the CLIP tokenizer too: pass clip_tokenizer "
                                         r"\(load_storyworld_clip\(\)\)$"):
        score_story(images, prompts, [p.scene for p in panels], [p.action for p in panels], _Oracle(panels),
                    clip=object())


def test_clip_embeddings_shapes_and_norm():
    from sdlite.storyworld.models import StoryworldSizes, build_clip, build_storyworld_tokenizer

    tok = build_storyworld_tokenizer()
    clip = build_clip(StoryworldSizes.named("tiny"), tok).eval()
    images = np.random.default_rng(0).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    img = clip_image_embeddings(clip, images)
    txt = clip_text_embeddings(clip, tok, ["a boy", "a girl, walking in the park", "a man"])
    assert img.shape == txt.shape == (3, clip.config.projection_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    # the same image twice: CLIP-I of the pair is 1
    assert clip_i(clip_image_embeddings(clip, np.stack([images[0], images[0]]))) == pytest.approx(1.0, abs=1e-5)


def test_eval_stories_never_say_identity_words():
    stories = make_eval_stories(20, seed=1)
    assert stories == make_eval_stories(20, seed=1) and stories != make_eval_stories(20, seed=2)
    identity = set(sw.HAIR_COLOURS) | set(sw.SHIRT_COLOURS) | set(sw.TROUSERS_COLOURS) | {"cap", "crown", "hat"}
    for st in stories:
        assert 4 <= len(st.prompts) <= 6
        story = parse_story(st.text)
        for prompt, scene, action in zip(story.prompts, st.scenes, st.actions):
            assert prompt.startswith(f"a {st.class_word}, {action} ")
            assert not identity & set(prompt.replace(",", " ").split()), prompt
    assert {len(s.prompts) for s in make_eval_stories(3, panels=(8, 8))} == {8}


def test_settings_cover_the_issue():
    assert {"no_csa", "default", "rate_0.3", "rate_0.5", "rate_0.7", "tile_2", "tile_4", "tile_all", "layers_up",
            "layers_all", "bank8"} <= set(SETTINGS)
    assert not SETTINGS["no_csa"][0].enabled and SETTINGS["bank8"][1] == "long"


def test_consistency_eval_rows_and_bars_on_a_tiny_pipeline():
    from sdlite.storyworld.models import load_storyworld_clip  # noqa: F401  (same loader the command uses)
    from sdlite.storyworld.recognizer import Recognizer
    from sdlite.storyworld.models import tiny_storyworld_pipeline

    pipe = tiny_storyworld_pipeline()
    torch.manual_seed(0)
    rec = Recognizer().eval()
    rows = run_consistency_eval(pipe, rec, n_stories=1, settings=["no_csa", "default", "rate_0.5", "tile_all"],
                                short_panels=(4, 4), steps=2, progress=False, log=None)
    assert [(r["setting"], r["seed_policy"]) for r in rows][:2] == [("no_csa", "per_panel"), ("default", "per_panel")]
    assert len(rows) == 8 and all(r["n_panels"] == 4 for r in rows)  # short_panels=(4, 4): four panels
    assert rows[0]["stories"] == "make_eval_stories(1, seed=0, panels=(4, 4))"
    for r in rows:
        for key in ("setting", "seed_policy", "identity_agreement", "scene_accuracy", "action_accuracy", "n_stories"):
            assert key in r
        assert 0 <= r["identity_agreement"] <= 1 and r["n_stories"] == 1
    by = {(r["setting"], r["seed_policy"]): r for r in rows}
    # rate_0.5 and tile_all are the same computation: computed once, reported twice
    assert by[("rate_0.5", "per_panel")]["identity_agreement"] == by[("tile_all", "per_panel")]["identity_agreement"]
    json.dumps(rows)
    bars = check_bars(rows)
    assert set(bars) >= {"identity_gain", "identity_met", "scene_drop_points", "scene_met"}
    assert "**met**" in table_markdown(rows) or "**not met**" in table_markdown(rows)
    with pytest.raises(ValueError, match="unknown settings"):
        run_consistency_eval(pipe, rec, n_stories=1, settings=["tiles_9"])


def test_check_bars_arithmetic():
    rows = [{"setting": "no_csa", "seed_policy": "per_panel", "identity_agreement": 0.3, "scene_accuracy": 0.9},
            {"setting": "default", "seed_policy": "per_panel", "identity_agreement": 0.7, "scene_accuracy": 0.87}]
    bars = check_bars(rows)
    assert bars["identity_gain"] == pytest.approx(0.4) and bars["identity_met"]
    assert bars["scene_drop_points"] == pytest.approx(3.0) and bars["scene_met"]
    rows[1]["scene_accuracy"] = 0.8
    assert not check_bars(rows)["scene_met"]
    with pytest.raises(ValueError, match="the bars need the rows"):
        check_bars(rows[:1])


def test_eval_dispatcher_has_consistency():
    help_text = eval_parser().format_help()
    assert "consistency" in help_text


def test_consistency_command_writes_json_and_table_and_never_overwrites(tmp_path, capsys):
    from sdlite.cli.eval import main as eval_main
    from sdlite.storyworld.recognizer import Recognizer
    from sdlite.train.recognizer import save_recognizer
    from sdlite.storyworld.models import tiny_storyworld_pipeline

    folder = tmp_path / "sw"
    tiny_storyworld_pipeline(folder)
    torch.manual_seed(0)
    rec = save_recognizer(Recognizer().eval(), tmp_path / "rec.safetensors")
    out = tmp_path / "c.json"
    args = ["consistency", "--model", str(folder), "--recognizer", str(rec), "--stories", "1", "--steps", "1",
            "--settings", "no_csa,default", "--shared-settings", "no_csa", "--out", str(out)]
    assert eval_main(args) == 0
    rows = json.loads(out.read_text())
    assert [(r["setting"], r["seed_policy"]) for r in rows] == [
        ("no_csa", "per_panel"), ("default", "per_panel"), ("no_csa", "shared")]
    assert all("clip_i" in r and "clip_t" in r and r["command"].startswith("python -m sdlite.eval consistency")
               for r in rows)
    assert "Bar 1" in out.with_suffix(".md").read_text()
    assert eval_main(args) == 2 and "already exists" in capsys.readouterr().err


def test_batched_generation_equals_story_by_story_without_csa_and_runs_with_csa():
    from sdlite.eval.consistency import _batchable, generate_stories_batched
    from sdlite.pipeline import CSAConfig
    from sdlite.storyworld.recognizer import Recognizer
    from sdlite.storyworld.models import tiny_storyworld_pipeline

    pipe = tiny_storyworld_pipeline()
    rec = Recognizer().eval()
    kw = dict(n_stories=2, settings=["no_csa"], seed_policies=("per_panel",), steps=2, short_panels=(4, 4),
              progress=False, log=None)
    one = run_consistency_eval(pipe, rec, **kw)[0]
    many = run_consistency_eval(pipe, rec, batch_stories=2, **kw)[0]
    assert many["generation"] == "2 stories per pipeline call" and one["generation"].startswith("generate_story")
    for k in ("identity_agreement", "scene_accuracy", "action_accuracy"):
        assert one[k] == many[k], k  # same seeds per panel: same images, batched or not
    stories = make_eval_stories(2, panels=(4, 4))
    out = generate_stories_batched(pipe, stories, CSAConfig(tile=2), steps=2, seeds=[0, 1000])
    assert [a.shape for a in out] == [(4, 64, 64, 3)] * 2
    assert _batchable(CSAConfig(), 4) and not _batchable(CSAConfig(id_length=2), 4)
    assert not _batchable(CSAConfig(tile=3), 4)
    with pytest.raises(ValueError, match="batch_stories=1"):
        generate_stories_batched(pipe, stories, CSAConfig(id_length=2), steps=1, seeds=[0, 1])
