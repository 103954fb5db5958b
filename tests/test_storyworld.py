"""Tests of sdlite.storyworld (renderer, captions, datasets) and sdlite.recognizer."""

import dataclasses
import json
import operator
import re

import numpy as np
import pytest
import torch

from sdlite import storyworld as sw


def _panel(seed=0, **kw):
    return sw.sample_panel(np.random.default_rng(seed), **kw)


# ---------------------------------------------------------------- vocabulary
def test_vocabulary_sizes_and_attribute_table():
    assert sw.CLASS_WORDS == ("boy", "girl", "man", "woman")
    assert sw.IDENTITY_ATTRIBUTES == ("hair", "shirt", "trousers", "hat")
    assert "no hat" in sw.HATS
    assert len(sw.SCENES) >= 6 and len(sw.ACTIONS) >= 4
    assert list(sw.ATTRIBUTES) == ["class_word", "hair", "shirt", "trousers", "hat", "scene", "action"]
    for values in sw.ATTRIBUTES.values():
        assert len(set(values)) == len(values) >= 4


def test_all_words_cover_every_caption():
    vocab = set(sw.all_words())
    rng = np.random.default_rng(1)
    for _ in range(300):
        p = sw.sample_panel(rng)
        for word in sw.caption(p, rng).replace(",", " ").split():
            assert word in vocab, word
    assert sorted(vocab) == list(sw.all_words())


# ---------------------------------------------------------------- rendering
def test_render_shape_dtype_and_determinism():
    a, b = _panel(3), _panel(3)
    assert a == b
    img = sw.render(a)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img, sw.render(b))
    assert sw.render(a, size=32).shape == (32, 32, 3)
    assert not np.array_equal(img, sw.render(_panel(4)))
    assert img.std() > 20  # not a flat image


def test_render_size_is_scale_free():
    p = _panel(5)
    small = sw.render(p, 64).astype(np.float32)
    big = sw.render(p, 128).astype(np.float32).reshape(64, 2, 64, 2, 3).mean((1, 3))
    assert np.abs(small - big).mean() < 8  # the same picture at twice the resolution


@pytest.mark.parametrize("attribute", ["class_word", "hair", "shirt", "trousers", "hat"])
def test_every_identity_value_changes_pixels(attribute):
    base = _panel(7, scene="park", action="standing")
    images = []
    for value in sw.ATTRIBUTES[attribute]:
        ch = dataclasses.replace(base.character, **{attribute: value})
        images.append(sw.render(dataclasses.replace(base, character=ch)).astype(np.int16))
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            changed = (np.abs(images[i] - images[j]).max(-1) > 40).sum()
            assert changed >= 20, (attribute, i, j, changed)  # many pixels, not a speck


@pytest.mark.parametrize("attribute", ["scene", "action"])
def test_every_scene_and_action_changes_pixels(attribute):
    base = _panel(8)
    images = []
    for value in sw.ATTRIBUTES[attribute]:
        kw = {attribute: value}
        if attribute == "action":
            kw.update(sw.action_pose(value))
        images.append(sw.render(dataclasses.replace(base, **kw)).astype(np.int16))
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            changed = (np.abs(images[i] - images[j]).max(-1) > 40).sum()
            assert changed >= (400 if attribute == "scene" else 20), (attribute, i, j, changed)


def _figure_height(class_word: str) -> float:
    """Fraction of the image rows where the standing figure changes the empty scene."""
    p = _panel(2, scene="snow", action="standing")
    p = dataclasses.replace(p, character=dataclasses.replace(p.character, class_word=class_word, hat="no hat"),
                            **sw.action_pose("standing"))
    cv = sw.Canvas(64)
    world._draw_scene(cv, p.scene, p.backdrop)
    diff = np.abs(sw.render(p).astype(np.int16) - cv.to_uint8().astype(np.int16)).max(-1)
    rows = np.nonzero((diff > 30).any(1))[0]
    return (rows.max() - rows.min() + 1) / 64


def test_character_is_big_and_children_smaller():
    for adult in ("man", "woman"):
        assert 0.6 <= _figure_height(adult) <= 0.78
    for child in ("boy", "girl"):
        assert 0.45 <= _figure_height(child) < min(_figure_height("man"), _figure_height("woman")) - 0.08


# ---------------------------------------------------------------- captions and labels
def test_caption_full_and_with_exact_drops():
    ch = sw.Character("boy", "red", "blue", "grey", "cap")
    p = sw.Panel(ch, "park", "walking", **sw.action_pose("walking"))
    assert sw.caption(p) == "a boy with red hair, a blue shirt and grey trousers, wearing a cap, walking in the park"
    assert sw.caption(p, drop=("shirt", "hat")) == "a boy with red hair and grey trousers, walking in the park"
    assert sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES) == "a boy, walking in the park"
    no_hat = dataclasses.replace(p, character=dataclasses.replace(ch, hat="no hat"))
    assert "wearing no hat" in sw.caption(no_hat)


def _said(text, attribute, ch):
    words = {"hair": f"{ch.hair} hair", "shirt": f"{ch.shirt} shirt", "trousers": f"{ch.trousers} trousers",
             "hat": "wearing"}
    return words[attribute] in text


def test_caption_random_drops_states_kept_and_never_dropped():
    rng = np.random.default_rng(0)
    counts = {a: 0 for a in sw.IDENTITY_ATTRIBUTES}
    for _ in range(400):
        p = sw.sample_panel(rng)
        drop = {a for a in sw.IDENTITY_ATTRIBUTES if rng.random() < 0.5}
        text = sw.caption(p, drop=drop)
        for a in sw.IDENTITY_ATTRIBUTES:
            assert _said(text, a, p.character) == (a not in drop), (text, drop)
        # class word, action and scene always present
        assert text.startswith(f"a {p.character.class_word}")
        assert f"{p.action} " in text and sw.SCENE_PHRASES[p.scene] in text
        text = sw.caption(p, rng, drop_prob=0.5)
        for a in sw.IDENTITY_ATTRIBUTES:
            counts[a] += _said(text, a, p.character)
    for a, c in counts.items():
        assert 150 < c < 250, (a, c)  # dropped about half the time
    p = sw.sample_panel(rng)
    assert sw.caption(p, rng, drop_prob=1.0) == sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES)
    assert sw.caption(p, rng, drop_prob=0.0) == sw.caption(p)


def test_labels_index_attributes():
    p = _panel(11)
    lab = sw.labels(p)
    assert set(lab) == set(sw.ATTRIBUTES)
    assert sw.ATTRIBUTES["hair"][lab["hair"]] == p.character.hair
    assert sw.ATTRIBUTES["scene"][lab["scene"]] == p.scene
    assert sw.ATTRIBUTES["action"][lab["action"]] == p.action


# ---------------------------------------------------------------- datasets
def test_image_dataset_item_is_pure_function_of_seed_and_index():
    ds = sw.ImageDataset(10, seed=3)
    a, b = ds[4], sw.ImageDataset(10, seed=3)[4]
    assert a["pixel_values"].shape == (3, 64, 64) and a["pixel_values"].dtype == torch.float32
    assert a["pixel_values"].min() >= -1 and a["pixel_values"].max() <= 1
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])
    assert a["caption"] == b["caption"] and a["labels"] == b["labels"]
    assert not torch.equal(a["pixel_values"], sw.ImageDataset(10, seed=4)[4]["pixel_values"])
    assert not torch.equal(a["pixel_values"], ds[5]["pixel_values"])
    assert len(ds) == 10
    with pytest.raises(IndexError):
        ds[10]
    full = sw.ImageDataset(5, seed=3, drop_prob=0.0)
    p, _ = full.panel(2)
    assert full[2]["caption"] == sw.caption(p)


def test_image_dataset_labels_match_pixels():
    ds = sw.ImageDataset(3, seed=1)
    p, _ = ds.panel(1)
    np.testing.assert_array_equal(sw.to_uint8(ds[1]["pixel_values"]), sw.render(p))
    assert ds[1]["labels"] == sw.labels(p)


@pytest.mark.parametrize("one", [False, True])
def test_collage_keeps_one_identity(one):
    ds = sw.CollageDataset(6, k=4, seed=2, identity_in_one_caption=one)
    item = ds[3]
    assert item["pixel_values"].shape == (4, 3, 64, 64) and len(item["captions"]) == 4
    for name in sw.ATTRIBUTES:
        assert item["labels"][name].shape == (4,) and item["labels"][name].dtype == torch.long
    for name in ("class_word",) + sw.IDENTITY_ATTRIBUTES:
        assert len(set(item["labels"][name].tolist())) == 1
    assert len(set(item["labels"]["scene"].tolist())) == 4  # different scenes
    panels, _ = ds.panels(3)
    assert len({p.character for p in panels}) == 1
    for j, p in enumerate(panels):
        assert item["captions"][j].startswith(f"a {p.character.class_word}")
    if one:
        full = [c for c in item["captions"] if c == sw.caption(panels[item["captions"].index(c)])]
        assert len(full) == 1
        bare = [c for c, p in zip(item["captions"], panels) if c == sw.caption(p, drop=sw.IDENTITY_ATTRIBUTES)]
        assert len(bare) == 3
    torch.testing.assert_close(item["pixel_values"], ds[3]["pixel_values"])


def test_clip_starts_and_ends_at_its_panels_and_moves_smoothly():
    ds = sw.ClipDataset(24, frames=16, seed=0)
    kinds = set()
    for i in range(len(ds)):
        panels, kind = ds.panels(i)
        kinds.add(kind)
        item = ds[i]
        frames = item["frames"]
        assert frames.shape == (16, 3, 64, 64)
        torch.testing.assert_close(frames[0], sw.to_tensor(sw.render(panels[0])))
        torch.testing.assert_close(frames[-1], sw.to_tensor(sw.render(panels[-1])))
        assert len({p.character for p in panels}) == 1 and len({p.scene for p in panels}) == 1
        step = (frames[1:] - frames[:-1]).abs().mean((1, 2, 3))  # (L-1,)
        total = (frames[-1] - frames[0]).abs().mean()
        assert step.max() < 0.08, (kind, step.max())  # no jumps: a few % of the pixels change per frame
        assert item["labels"]["hair"].shape == (16,)
        assert item["caption"].startswith(sw.caption(panels[0]))
        if kind != "walk across":
            assert step.max() <= total + 1e-6 or total < 0.02
    assert "walk across" in kinds and "sit down" in kinds


def test_walk_across_crosses_the_frame():
    rng = np.random.default_rng(0)
    a, b, cycles = sw.sample_clip_endpoints(rng, kind="walk across")
    assert abs(b.x - a.x) >= 0.35 and cycles >= 1
    panels = sw.clip_panels(a, b, 16, cycles)
    assert panels[0] == a and panels[-1] == b
    assert len({round(p.stride, 3) for p in panels}) > 8  # the legs swing on the way


# ---------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown hair 'green'.*use one of"):
        sw.Character("boy", "green", "red", "blue", "cap")
    with pytest.raises(ValueError, match="unknown class_word"):
        sw.Character("dog", "red", "red", "blue", "cap")
    ch = sw.Character("boy", "red", "red", "blue", "cap")
    with pytest.raises(ValueError, match="unknown scene 'moon'"):
        sw.Panel(ch, "moon", "walking")
    with pytest.raises(ValueError, match="unknown action"):
        sw.Panel(ch, "park", "flying")
    with pytest.raises(ValueError, match=r"x=1.5 is outside \[0.0, 1.0\]"):
        sw.Panel(ch, "park", "walking", x=1.5)
    with pytest.raises(ValueError, match="facing"):
        sw.Panel(ch, "park", "walking", facing=0)
    p = sw.Panel(ch, "park", "walking")
    with pytest.raises(ValueError, match="multiple of 8"):
        sw.render(p, size=60)
    with pytest.raises(ValueError, match="multiple of 8"):
        sw.ImageDataset(4, size=30)
    with pytest.raises(ValueError, match="k >= 1"):
        sw.CollageDataset(4, k=0)
    with pytest.raises(ValueError, match="at least 2 frames"):
        sw.ClipDataset(4, frames=1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        sw.clip_panels(p, p, frames=1)
    with pytest.raises(ValueError, match="drop only identity attributes"):
        sw.caption(p, drop=("scene",))
    with pytest.raises(ValueError, match=r"drop_prob=1.5 is outside"):
        sw.ImageDataset(4, drop_prob=1.5)
    with pytest.raises(ValueError, match="non-negative integer"):
        sw.ImageDataset(-1)
    with pytest.raises(TypeError, match="default_rng"):
        sw.sample_panel(0)
    with pytest.raises(TypeError, match="needs a Panel"):
        sw.render("a boy")
    with pytest.raises(ValueError, match="same character, scene and facing"):
        sw.interpolate(p, dataclasses.replace(p, scene="beach"), 0.5)


# ---------------------------------------------------------------- recognizer
from sdlite.images import as_batch
from sdlite.storyworld import recognizer as rec
from sdlite.storyworld import world
from sdlite.train import recognizer as train_rec  # noqa: E402
from sdlite.paths import data_dir  # noqa: E402


@pytest.fixture(scope="module")
def heldout():
    # seed 424242: neither the training renders (1000 + seed) nor the shipped json's test set (999000 + seed)
    return rec.render_set(300, seed=424242)


# The colour reader (b) is the cross-check for the colour labels; the CNN (a) must pass the bar everywhere.
COLOUR_LABELS = ("shirt", "trousers", "scene")


@pytest.mark.parametrize("arch", rec.ARCHS)
def test_shipped_recognizers_are_small_and_accurate(arch, heldout):
    path = data_dir() / rec.DEFAULT_FILES[arch]
    assert path.stat().st_size < 2_000_000
    model = rec.load_recognizer(arch=arch)
    assert model.arch == arch and not model.training
    images, labels = heldout
    acc = rec.accuracy(model, images, labels)
    assert set(acc) == set(sw.ATTRIBUTES)
    for name, a in acc.items():
        if arch == "a" or name in COLOUR_LABELS:
            assert a >= 0.95, (arch, name, a)  # the bar (>= 0.97) is measured on 2000 images in data/*.json
        else:
            assert a >= 0.6, (arch, name, a)  # well above chance (<= 0.33), not a reliable scorer


def test_seed1_cnn_scorer_is_independent_and_accurate(heldout):
    a = rec.load_recognizer(arch="a")
    a1 = rec.load_recognizer(data_dir() / rec.SEED1_FILE)
    assert a1.arch == "a"
    assert not torch.equal(a1.heads["hair"].weight, a.heads["hair"].weight)
    images, labels = heldout
    acc = rec.accuracy(a1, images, labels)
    assert min(acc.values()) >= 0.92, acc
    pa, p1 = a.predict(images), a1.predict(images)
    assert (pa["hair"] == p1["hair"]).float().mean() > 0.93


def test_predict_accepts_uint8_and_float_and_the_two_scorers_agree(heldout):
    images, labels = heldout
    a, b = rec.load_recognizer(arch="a"), rec.load_recognizer(arch="b")
    p_uint8 = rec.predict(images[:64], a)
    p_float = a.predict(torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1)
    for name in sw.ATTRIBUTES:
        assert p_uint8[name].dtype == torch.long and p_uint8[name].shape == (64,)
        torch.testing.assert_close(p_uint8[name], p_float[name])
    single = a.predict(images[0])
    assert {k: int(v[0]) for k, v in single.items()} == {k: int(v[0]) for k, v in p_uint8.items()}
    p_b = b.predict(images[:64])
    for name in COLOUR_LABELS:
        assert (p_uint8[name] == p_b[name]).float().mean() > 0.93, name
    # 128x128 renders are area-averaged to 64x64 and read the same
    panel = sw.sample_panel(np.random.default_rng(5))
    big = a.predict(sw.render(panel, 128))
    assert {k: int(v[0]) for k, v in big.items()} == sw.labels(panel)


def test_augment_is_seeded_bounded_and_degrades(heldout):
    x = as_batch(heldout[0][:8])
    y1 = train_rec.augment(x, torch.Generator().manual_seed(0))
    y2 = train_rec.augment(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(y1, y2)
    assert y1.shape == x.shape and y1.min() >= -1 and y1.max() <= 1
    assert (y1 - x).abs().mean() > 0.02
    assert (train_rec.augment(x, torch.Generator().manual_seed(1)) - y1).abs().mean() > 0.01


def test_recognizer_training_smoke(tmp_path):
    model, history = train_rec.train_recognizer(steps=3, seed=0, arch="a", batch_size=8, n_train=16, log=None, log_every=1)
    assert history["step"] == [1, 2, 3] and all(np.isfinite(history["loss"]))
    path = train_rec.save_recognizer(model, tmp_path / "r.safetensors")
    again = rec.load_recognizer(tmp_path / "r.safetensors")
    assert again.arch == "a"
    x = as_batch(rec.render_set(4, seed=3)[0])
    for name in sw.ATTRIBUTES:  # float16 storage keeps the predictions
        torch.testing.assert_close(again(x)[name], model(x)[name], atol=0.05, rtol=0.05)
    with pytest.raises(FileExistsError, match="--force"):
        train_rec.save_recognizer(model, path)


def test_colour_reader_fit_smoke():
    # 40 samples < features: the dual ridge solve
    model, _ = train_rec.fit_colour_reader(seed=0, n_train=40, log=None)
    assert model.arch == "b"
    assert model.features(torch.zeros(2, 3, 64, 64)).shape == (2, model.features.out_features)
    images, labels = rec.render_set(40, seed=1000)  # the renders it was fitted on (before augmentation)
    assert rec.accuracy(model, images, labels)["shirt"] >= 0.9


def test_recognizer_bad_input():
    with pytest.raises(ValueError, match="unknown recognizer arch 'c'"):
        rec.Recognizer("c")
    with pytest.raises(FileNotFoundError, match="python -m sdlite.train recognizer"):
        rec.load_recognizer("/nonexistent/r.safetensors")
    with pytest.raises(TypeError, match="must be uint8"):
        as_batch(np.zeros((2, 64, 64, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        as_batch(torch.zeros(2, 64, 64, 3))
    with pytest.raises(TypeError, match="numpy array or a float torch tensor"):
        as_batch([1, 2, 3])
    with pytest.raises(ValueError, match="n_train >= batch_size"):
        train_rec.train_recognizer(steps=1, n_train=4, batch_size=8, log=None)


def test_storyworld_eval_quick_writes_every_bar_and_the_cross_check(tmp_path):
    from sdlite.eval.storyworld import BARS, evaluate_storyworld, format_table

    torch.set_num_threads(1)
    res = evaluate_storyworld(tmp_path / "sw.json", quick=True, log=None)
    saved = json.loads((tmp_path / "sw.json").read_text())
    names = ["recognizer_accuracy_min", "vae_recon_accuracy_drop", "scene_accuracy", "identity_accuracy_min",
             "action_accuracy", "free_choice_max_share", "csa_identity_gain", "csa_scene_drop", "story4_seconds_cpu"]
    assert set(names) <= set(saved) and set(saved["bars"]) == set(BARS) and saved["command"].endswith("--quick")
    compare = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
    for name in names:
        op, bound = BARS[name]
        assert saved["bars"][name] == {"bar": f"{op} {bound}", "met": compare[op](saved[name], bound)}
    assert 0 <= saved["identity_accuracy_min"] <= 1 and saved["story4_seconds_cpu"] > 0
    cross = saved["details"]["prompt_following_cross_check"]
    assert set(cross["agreement"]) == set(sw.ATTRIBUTES) and all(0 <= v <= 1 for v in cross["agreement"].values())
    assert res["details"]["prompt_following"]["scene"] == saved["scene_accuracy"]
    assert format_table(res).count("\n") == len(BARS) + 1
