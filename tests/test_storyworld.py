"""Tests of sdlite.storyworld (renderer, captions, datasets) and sdlite.recognizer."""

import dataclasses
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


def test_character_is_big_and_children_smaller():
    def height(class_word):
        p = _panel(2, scene="snow", action="standing")
        p = dataclasses.replace(p, character=dataclasses.replace(p.character, class_word=class_word, hat="no hat"))
        bg = sw.render(dataclasses.replace(p, x=0.0 + 0.0, character=p.character))
        # compare with the empty scene: rows where the figure changes pixels
        empty = np.zeros((64, 64, 3), np.float32)
        cv = sw._Canvas(64)
        sw._draw_scene(cv, p.scene, p.backdrop)
        empty = cv.to_uint8().astype(np.int16)
        rows = np.nonzero((np.abs(bg.astype(np.int16) - empty).max(-1) > 30).any(1))[0]
        return (rows.max() - rows.min() + 1) / 64

    for adult in ("man", "woman"):
        assert 0.6 <= height(adult) <= 0.78
    for child in ("boy", "girl"):
        assert 0.45 <= height(child) < min(height("man"), height("woman"))


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
        assert f"{p.action} " in text and sw._SCENE_PHRASES[p.scene] in text
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
