"""PhotoMaker end to end in storyworld: the training pairs and their held-out split, the trainer (tiny models, a few
steps, resumed and exported), the ID encoder folder format, reference-image mode in `generate_story` and in
`sdlite story --ref`, the evaluation's measures, and the shipped encoder with its results."""
import dataclasses
import json
import types
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sdlite.pipeline
from sdlite.cli import main
from sdlite.eval import photomaker as pm
from sdlite.id_encoder import (
    IDEncoder, IDEncoderConfig, fuse_photomaker_lora, id_pixel_values, load_id_encoder, save_id_encoder,
)
from sdlite.paths import data_dir
from sdlite.pipeline import CSAConfig, generate_story
from sdlite.story import parse_story
from sdlite.storyworld import world as sw
from sdlite.storyworld.datasets import IDPairDataset, id_caption, is_held_out, sample_split_character
from sdlite.storyworld.models import tiny_storyworld_pipeline
from sdlite.train.id_encoder import (
    IDTrainConfig, learning_rates, reference_loss_gap, storyworld_id_encoder, train_id_encoder,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = data_dir() / "storyworld" / "id_encoder"
STORY = "[Lily] a girl img\n[Lily] waving on the beach # Hi.\n[Lily] sitting in the park # Sit.\n"
LILY = sw.Character("girl", "pink", "green", "blue", "crown")


def all_characters():
    return [sw.Character(*c) for c in product(sw.CLASS_WORDS, sw.HAIR_COLOURS, sw.SHIRT_COLOURS,
                                              sw.TROUSERS_COLOURS, sw.HATS)]


def lily_picture(seed=1) -> Image.Image:
    return Image.fromarray(sw.render(sw.sample_panel(np.random.default_rng(seed), LILY)))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sw")
    tiny_storyworld_pipeline(folder)
    return folder


@pytest.fixture(scope="module")
def trained(tiny_folder, tmp_path_factory):
    """A tiny storyworld pipeline and an ID encoder trained on it for a few steps of both stages, exported."""
    root = tmp_path_factory.mktemp("idt")
    cfg = IDTrainConfig(tower_steps=2, tower_batch_size=4, steps=3, batch_size=4, log_every=1, ckpt_every=2,
                        warmup=1, decay_steps=1, max_references=2)
    train_id_encoder(root / "run", cfg, export=root / "export", progress=False, storyworld=tiny_folder)
    return types.SimpleNamespace(folder=tiny_folder, run=root / "run", export=root / "export", cfg=cfg)


# ----------------------------------------------------------------------------------------------------------
# the data
# ----------------------------------------------------------------------------------------------------------
def test_a_fifth_of_the_characters_is_held_out_and_every_attribute_value_is_still_trained():
    chars = all_characters()
    held = [c for c in chars if is_held_out(c)]
    assert 0.17 < len(held) / len(chars) < 0.23
    train = [c for c in chars if not is_held_out(c)]
    for attr in ("class_word", "hair", "shirt", "trousers", "hat"):
        assert {getattr(c, attr) for c in train} == {getattr(c, attr) for c in chars}
    assert [is_held_out(c) for c in chars] == [is_held_out(c) for c in chars]  # a fixed split


def test_pairs_show_one_training_character_and_their_caption_leaves_the_identity_unsaid():
    ds = IDPairDataset(40, num_references=3, seed=3)
    for i in range(len(ds)):
        refs, target = ds.panels(i)
        assert len(refs) == 3 and all(r.character == target.character for r in refs)
        assert not is_held_out(target.character)
        assert target.scene not in {r.scene for r in refs}  # the reference never shows the target's scene
    item = ds[0]
    refs, target = ds.panels(0)
    assert item["references"].shape == (3, 64, 64, 3) and item["references"].dtype == np.uint8
    np.testing.assert_array_equal(item["references"][1], sw.render(refs[1]))
    words = item["caption"].replace(",", "").split()
    assert words[:3] == ["a", target.character.class_word, "img"]
    ch = target.character
    assert not {ch.hair, ch.shirt, ch.trousers, "hair", "shirt", "trousers", "hat", "cap", "crown"} & set(words)
    assert item["mask"].shape == (16, 16) and 0 < float(item["mask"].sum()) < 256
    held = IDPairDataset(20, seed=3, held_out=True)
    assert all(is_held_out(held.panels(i)[1].character) for i in range(20))


def test_the_id_caption_is_what_a_story_makes_of_the_trigger_form():
    panel = sw.sample_panel(np.random.default_rng(0), LILY, scene="beach", action="waving")
    story = parse_story("[Lily] a girl img\n[Lily] waving on the beach\n")
    assert id_caption(panel) == story.panels[0].id_prompt == "a girl img, waving on the beach"


def test_pair_dataset_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_references"):
        IDPairDataset(4, num_references=0)
    with pytest.raises(ValueError, match="num_references"):
        IDPairDataset(4, num_references=True)


# ----------------------------------------------------------------------------------------------------------
# the encoder's input and its folder format
# ----------------------------------------------------------------------------------------------------------
def test_storyworld_encoders_take_renders_in_minus_one_to_one():
    config = IDEncoderConfig.storyworld({"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                         "num_hidden_layers": 1, "image_size": 64, "patch_size": 8}, 16)
    assert config.embed_dim == 32 and config.image_mean == (0.5, 0.5, 0.5)
    render = sw.render(sw.sample_panel(np.random.default_rng(2), LILY))
    x = IDEncoder(config).pixel_values([render])
    want = torch.from_numpy(render).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x[0], want, rtol=0, atol=1e-5)
    clip = id_pixel_values([render], 64)  # CLIP's normalisation by default (PhotoMaker's)
    assert not torch.allclose(clip, x)
    with pytest.raises(ValueError, match="image_std"):
        IDEncoderConfig(image_std=(0.5, 0.0, 0.5))


def test_an_id_encoder_folder_round_trips_and_never_overwrites(tmp_path):
    encoder = IDEncoder(IDEncoderConfig.tiny())
    encoder.lora_weights = {"unet.a.lora.down.weight": torch.ones(2, 3)}
    save_id_encoder(encoder, tmp_path / "enc")
    back = load_id_encoder(tmp_path / "enc")
    assert back.config == encoder.config
    for (k, v), (k2, v2) in zip(encoder.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert torch.equal(back.lora_weights["unet.a.lora.down.weight"], torch.ones(2, 3))
    with pytest.raises(FileExistsError, match="force"):
        save_id_encoder(encoder, tmp_path / "enc")
    encoder.lora_weights = {}
    save_id_encoder(encoder, tmp_path / "enc", force=True)
    assert load_id_encoder(tmp_path / "enc").lora_weights == {}  # the old LoRA file went with the old encoder


def test_bad_id_encoder_paths_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="ID encoder folder"):
        load_id_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="id_encoder.safetensors is missing"):
        load_id_encoder(tmp_path / "empty")
    save_id_encoder(IDEncoder(IDEncoderConfig.tiny()), tmp_path / "enc")
    (tmp_path / "enc" / "id_encoder.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="damaged"):
        load_id_encoder(tmp_path / "enc")


# ----------------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------------
def test_stage_one_trains_the_tower_only_then_everything_learns():
    cfg = IDTrainConfig(tower_steps=10, steps=20, warmup=2, decay_steps=5)
    first = learning_rates(cfg, 5)
    assert first["tower"] > 0 and first["heads"] > 0 and first["fuse"] == first["lora"] == 0
    second = learning_rates(cfg, 15)
    assert second["fuse"] > 0 and second["lora"] > 0
    assert second["tower"] == pytest.approx(second["fuse"] * cfg.tower_lr_scale)
    assert learning_rates(cfg, 29)["fuse"] < second["fuse"]  # the cool-down at the end
    with pytest.raises(ValueError, match="text_fraction"):
        IDTrainConfig(text_fraction=1.0)


def test_noisy_timesteps_weigh_more_up_to_the_cap():
    from diffusers.training_utils import compute_snr

    from sdlite.storyworld.models import build_scheduler
    from sdlite.train.id_encoder import noise_weight

    snr = compute_snr(build_scheduler(), torch.tensor([0, 100, 500, 700, 999]))
    w = noise_weight(snr, 20.0)
    assert w[0] == w[1] == 1.0  # little noise: the plain loss
    assert 1.0 < w[2] < w[3] < 20.0 and w[4] == 20.0
    torch.testing.assert_close(w[2], 1 / snr[2])  # in between: 1/SNR, as an x0 loss weighs it
    assert torch.equal(noise_weight(snr, 1.0), torch.ones(5))  # cap 1: the plain min-SNR loss


def test_the_encoder_starts_from_storyworld_clips_tower(tiny_folder):
    from sdlite.pipeline import load_pipeline
    from sdlite.storyworld.models import load_storyworld_clip

    clip, _ = load_storyworld_clip(folder=tiny_folder)
    encoder = storyworld_id_encoder(load_pipeline(tiny_folder), clip)
    for k, v in clip.vision_model.state_dict().items():
        assert torch.equal(encoder.vision_model.state_dict()[k], v)
    assert encoder.config.embed_dim == 2 * clip.config.text_config.hidden_size  # the UNet's cross-attention width


def test_training_logs_both_stages_and_exports_an_encoder_with_its_lora(trained):
    from sdlite.train.loop import read_log

    log = read_log(trained.run / "log.csv")
    assert log["stage"].tolist() == ["tower", "tower", "fuse", "fuse", "fuse"]  # a column of words stays words
    assert log["step"].tolist() == [1, 2, 3, 4, 5] and np.isnan(log["diffusion"][0]) and log["diffusion"][2] > 0
    record = json.loads((trained.export / "training.json").read_text())
    assert (trained.export / "log.csv").read_text() == (trained.run / "log.csv").read_text()
    assert record["config"]["steps"] == 3 and record["cpu_seconds"] > 0
    encoder = load_id_encoder(trained.export)
    ups = [v for k, v in encoder.lora_weights.items() if "lora.up" in k]
    assert ups and any(float(v.abs().sum()) > 0 for v in ups)  # the LoRA learned (it starts at zero)
    assert all(k.startswith("unet.") for k in encoder.lora_weights)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(trained, tmp_path):
    cfg = trained.cfg
    run = tmp_path / "run"
    train_id_encoder(run, cfg, progress=False, storyworld=trained.folder, max_minutes=0.0)  # stops after one step
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["step"] == 1
    train_id_encoder(run, cfg, export=tmp_path / "export", resume=True, progress=False, storyworld=trained.folder)
    a, b = load_id_encoder(trained.export), load_id_encoder(tmp_path / "export")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_a_run_folder_is_not_started_twice(trained):
    with pytest.raises(FileExistsError, match="resume"):
        train_id_encoder(trained.run, trained.cfg, progress=False, storyworld=trained.folder)


def test_a_run_started_from_a_trained_encoder_holds_its_weights_then_fine_tunes_them(trained, tmp_path):
    from sdlite.pipeline import load_pipeline
    from sdlite.storyworld.models import load_storyworld_clip
    from sdlite.train.id_encoder import IDTraining, load_initial_weights

    start = load_id_encoder(trained.export)
    pipe = load_pipeline(trained.folder)
    model = IDTraining(storyworld_id_encoder(pipe, load_storyworld_clip(folder=trained.folder)[0], seed=5), pipe.unet,
                       trained.cfg.lora_rank)
    load_initial_weights(model, trained.export)
    for k, v in start.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v), k
    lora = model.lora_state_dict()
    assert set(lora) == set(start.lora_weights) and all(torch.equal(lora[k], v) for k, v in start.lora_weights.items())

    cfg = dataclasses.replace(trained.cfg, tower_steps=0, steps=2, hair_weight=5.0, label_weight=0.0, seed=1,
                              lora_targets=("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"))
    tuned = train_id_encoder(tmp_path / "run", cfg, export=tmp_path / "export", progress=False,
                             storyworld=trained.folder, init=trained.export)
    record = json.loads((tmp_path / "export" / "training.json").read_text())
    assert record["config"]["hair_weight"] == 5.0
    assert record["init"]["training"] == json.loads((trained.export / "training.json").read_text())  # the chain
    changed = [k for k, v in start.state_dict().items() if not torch.equal(tuned.state_dict()[k], v)]
    assert any(not k.startswith("vision_model.") for k in changed)  # the projections / FuseModule learned
    # the attention LoRA went on from the trained one; the ResNet convolutions got one of their own, which fuses
    assert set(start.lora_weights) < set(tuned.lora_weights)
    assert any(".conv1." in k for k in tuned.lora_weights) and any(".conv2." in k for k in tuned.lora_weights)
    pipe = load_pipeline(trained.folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert fuse_photomaker_lora(pipe, load_id_encoder(tmp_path / "export").lora_weights)
    assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items() if ".conv1." in k)


def test_a_start_without_a_lora_or_with_bad_weights_is_refused(trained, tmp_path):
    encoder = load_id_encoder(trained.export)
    encoder.lora_weights = {}
    save_id_encoder(encoder, tmp_path / "no_lora")
    with pytest.raises(ValueError, match="no UNet LoRA"):
        train_id_encoder(tmp_path / "run", trained.cfg, progress=False, storyworld=trained.folder,
                         init=tmp_path / "no_lora")
    for bad in ({"hair_weight": -1.0}, {"label_weight": -0.1}, {"high_noise_weight": 0.5}):
        with pytest.raises(ValueError, match=">= "):
            IDTrainConfig(**bad)
    for bad in ((), ("to_q", "")):
        with pytest.raises(ValueError, match="lora_targets"):
            IDTrainConfig(lora_targets=bad)


def test_the_train_command_passes_the_fine_tuning_options_on(monkeypatch):
    import sdlite.train.id_encoder as tid
    from sdlite.cli.train import main as train_main

    seen = {}
    monkeypatch.setattr(tid, "train_id_encoder", lambda out, cfg, **kw: seen.update(cfg=cfg, **kw))
    assert train_main(["id-encoder", "--out", "runs/x", "--init", "data/storyworld/id_encoder", "--tower-steps", "0",
                       "--hair-weight", "8", "--high-noise-weight", "5", "--label-weight", "0", "--lr", "3e-4",
                       "--warmup", "50", "--lora-targets", "to_q, to_k,conv1", "--threads", "1"]) == 0
    cfg = seen["cfg"]
    assert seen["init"] == "data/storyworld/id_encoder"
    assert (cfg.tower_steps, cfg.hair_weight, cfg.high_noise_weight, cfg.label_weight, cfg.lr, cfg.warmup) == \
        (0, 8.0, 5.0, 0.0, 3e-4, 50)
    assert cfg.lora_targets == ("to_q", "to_k", "conv1")
    assert cfg.steps == IDTrainConfig().steps  # what is not given keeps the recipe's value


def test_the_exported_lora_fuses_into_a_storyworld_pipeline(trained):
    from sdlite.pipeline import load_pipeline

    pipe = load_pipeline(trained.folder)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    assert fuse_photomaker_lora(pipe, load_id_encoder(trained.export).lora_weights)
    after = pipe.unet.state_dict()
    assert set(after) == set(before)  # plain layers again, the LoRA fused into their weights
    assert any(not torch.equal(before[k], after[k]) for k in before if "to_q" in k)


# ----------------------------------------------------------------------------------------------------------
# reference-image mode
# ----------------------------------------------------------------------------------------------------------
def test_delayed_conditioning_strength_decides_whether_the_reference_is_used(tiny_folder):
    from sdlite.pipeline import load_pipeline

    pipe = load_pipeline(tiny_folder)
    from sdlite.storyworld.models import load_storyworld_clip

    encoder = storyworld_id_encoder(pipe, load_storyworld_clip(folder=tiny_folder)[0])  # no LoRA: the UNet as is
    story = parse_story(STORY)
    kw = dict(csa=CSAConfig(enabled=False), steps=4, seed=3, progress=False)
    plain = generate_story(pipe, story, **kw).arrays()
    never = generate_story(pipe, story, id_images={"Lily": [lily_picture()]}, id_encoder=encoder,
                           style_strength_ratio=100.0, **kw).arrays()
    np.testing.assert_array_equal(never, plain)  # text-only for every step: the reference is never read
    early = generate_story(pipe, story, id_images={"Lily": [lily_picture()]}, id_encoder=encoder,
                           style_strength_ratio=0.0, **kw).arrays()
    assert not np.array_equal(early, plain)  # the ID prompt from step 1 on
    other = generate_story(pipe, story, id_images={"Lily": [lily_picture(), lily_picture(7)]}, id_encoder=encoder,
                           style_strength_ratio=0.0, **kw).arrays()
    assert not np.array_equal(other, early)  # two references are two ID tokens, not one


def run_cli(tmp_path, *options, story=STORY):
    (tmp_path / "s.txt").write_text(story)
    lily_picture().save(tmp_path / "lily.png")
    return main(["story", str(tmp_path / "s.txt"), "--out", str(tmp_path / "o" / "page.png"), *options])


@pytest.mark.parametrize("ref, story, message", [
    ("Lily=missing.png", STORY, "reference image .*missing.png does not exist"),
    ("Bob={lily}", STORY, "no character 'Bob'"),
    ("Lily={lily}", STORY.replace("a girl img", "a girl"), "has no trigger word"),
    ("Lily={lily}", STORY.replace("a girl img", "a girl images,"), "has no trigger word"),  # a whole word only
    ("Lily={lily}", STORY.replace("[Lily] sitting", "[Lily] a girl img, sitting"), "line 3: .*more than once"),
    ("Lily", STORY, "write NAME=IMAGE"),
    ("Lily={story}", STORY, "not a readable picture"),
])
def test_bad_references_fail_before_any_model_loads(tmp_path, monkeypatch, capsys, ref, story, message):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the references were checked")

    monkeypatch.setattr(sdlite.pipeline, "load_pipeline", no_model)
    monkeypatch.setattr(sdlite.pipeline, "load_tokenizer", no_model)
    ref = ref.format(lily=tmp_path / "lily.png", story=tmp_path / "s.txt")
    assert run_cli(tmp_path, "--ref", ref, story=story) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_a_story_names_its_references_with_ref_lines(tmp_path):
    from sdlite.story import StoryReference, read_story

    story = parse_story("[Lily] a girl img\nref: Lily = lily.png\nref: [Lily]=/abs/b c.png\n[Lily] waving on the beach\n")
    assert story.references == (StoryReference("Lily", "lily.png", 2), StoryReference("Lily", "/abs/b c.png", 3))
    assert len(story) == 1 and parse_story(STORY).references == ()
    (tmp_path / "tales").mkdir()
    (tmp_path / "tales" / "s.txt").write_text("[Lily] a girl img\nref: Lily = pics/lily.png\n[Lily] waving\n")
    assert read_story(tmp_path / "tales" / "s.txt").references[0].image == str(tmp_path / "tales" / "pics" / "lily.png")
    for text, message in (("ref: lily.png", "write a reference line as `ref: Name = picture.png`"),
                          ("ref: Lily =", "write a reference line"),
                          ("ref: Bob = bob.png", "line 2: `ref:` names an unknown character \\[Bob\\]")):
        with pytest.raises(ValueError, match=message):
            parse_story(f"[Lily] a girl img\n{text}\n[Lily] waving on the beach\n")


def test_sdlite_story_uses_the_storys_ref_lines_as_it_uses_ref(tmp_path, monkeypatch):
    lily_picture().save(tmp_path / "lily.png")
    (tmp_path / "tale").mkdir()
    (tmp_path / "tale" / "s.txt").write_text(STORY.replace("[Lily] a girl img\n", "[Lily] a girl img\nref: Lily = ../lily.png\n"))
    monkeypatch.chdir(tmp_path / "tale")  # the story's folder, not the working folder, resolves the path
    fast = ["--steps", "3", "--candidates", "2", "--quiet"]  # --candidates is accepted: the story has references
    assert main(["story", "s.txt", "--out", str(tmp_path / "a" / "page.png"), *fast]) == 0
    monkeypatch.chdir(tmp_path)
    assert run_cli(tmp_path, "--ref", f"Lily={tmp_path / 'lily.png'}", *fast) == 0
    assert main(["story", str(tmp_path / "s.txt"), "--out", str(tmp_path / "p" / "page.png"), "--steps", "3",
                 "--quiet"]) == 0
    for panel in ("panel_01.png", "panel_02.png"):
        from_story = np.asarray(Image.open(tmp_path / "a" / "page_panels" / panel))
        np.testing.assert_array_equal(from_story, np.asarray(Image.open(tmp_path / "o" / "page_panels" / panel)))
        assert not np.array_equal(from_story, np.asarray(Image.open(tmp_path / "p" / "page_panels" / panel)))


def test_a_missing_picture_named_by_the_story_fails_before_any_model_loads(tmp_path, monkeypatch, capsys):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the references were checked")

    monkeypatch.setattr(sdlite.pipeline, "load_pipeline", no_model)
    monkeypatch.setattr(sdlite.pipeline, "load_tokenizer", no_model)
    story = STORY.replace("[Lily] a girl img\n", "[Lily] a girl img\nref: Lily = gone.png\n")
    assert run_cli(tmp_path, story=story) == 2
    err = capsys.readouterr().err
    assert "line 2: ref: Lily = " in err and "gone.png does not exist" in err, err
    assert not (tmp_path / "o").exists()


def test_a_trigger_word_followed_by_punctuation_is_found(tmp_path, monkeypatch):
    from sdlite.cli.story import check_references

    lily = tmp_path / "lily.png"
    lily_picture().save(lily)
    for description in ("a girl img, brown hair", "a girl IMG", "a girl img."):
        refs = check_references(parse_story(STORY.replace("a girl img", description)), [("--ref", "Lily", lily)])
        assert list(refs) == ["Lily"] and len(refs["Lily"]) == 1, description


def test_strength_and_photomaker_need_a_reference(tmp_path, capsys):
    assert run_cli(tmp_path, "--id-strength", "30") == 2
    assert "--ref" in capsys.readouterr().err
    assert run_cli(tmp_path, "--ref", f"Lily={tmp_path / 'lily.png'}", "--id-strength", "120") == 2
    assert "0 to 100" in capsys.readouterr().err


@pytest.mark.parametrize("options, expected, candidates", [
    (("--ref", "Lily={lily}"), "reference default", "reference default"),
    (("--ref", "Lily={lily}", "--guidance", "5", "--candidates", "3"), 5.0, 3),
    (("--guidance", "4"), 4.0, None),
    ((), None, None),  # no reference: the model's own default (generate_story's None), one draw
])
def test_storyworld_reference_mode_has_its_own_guidance_unless_told(tmp_path, monkeypatch, options, expected,
                                                                    candidates):
    from sdlite.cli.story import STORYWORLD_ID_CANDIDATES, STORYWORLD_ID_GUIDANCE

    seen = {}

    def generate(pipe, story, **kw):
        seen.update(kw)
        return types.SimpleNamespace(images=[Image.new("RGB", (64, 64)) for _ in range(len(story))])

    monkeypatch.setattr(sdlite.pipeline, "generate_story", generate)
    options = [o.format(lily=tmp_path / "lily.png") for o in options]
    assert run_cli(tmp_path, *options, "--quiet", "--no-csa") == 0
    expected = STORYWORLD_ID_GUIDANCE if expected == "reference default" else expected
    assert seen["guidance_scale"] == expected
    assert STORYWORLD_ID_GUIDANCE != 5.0  # the tuned value differs from the text-only default (else: no test)
    assert seen.get("candidates") == (STORYWORLD_ID_CANDIDATES if candidates == "reference default" else candidates)
    assert STORYWORLD_ID_CANDIDATES == pm.STORYWORLD_CANDIDATES > 1


class ColourEncoder:
    """A stand-in ID encoder whose ID embedding is an image's mean colour (for choosing among candidates)."""

    def pixel_values(self, images):
        return torch.stack([torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) for im in images])

    def id_embeddings(self, pixels):  # (B, 1, 3, H, W) -> (B, 1, 3)
        return pixels.mean(dim=(-2, -1)) + 1.0


def _run(colours, story_text="[Lily] a girl img\n[Bob] a boy\n[Lily] waving\n[Bob] sitting\n"):
    story = parse_story(story_text)
    return sdlite.pipeline.StoryResult([Image.new("RGB", (8, 8), c) for c in colours], story,
                                       seeds=[7] * len(colours), plan=[], settings={"seed": 7})


def test_each_referenced_panel_keeps_the_candidate_closest_to_its_references():
    from sdlite.id_selection import pick_closest

    red, green, reddish = (250, 10, 10), (10, 250, 10), (200, 60, 40)
    runs = [_run([green, green]), _run([reddish, red]), _run([red, reddish])]
    for j, run in enumerate(runs):
        run.seeds[:] = [100 * j, 100 * j + 1]
    picked = pick_closest(ColourEncoder(), runs, {"Lily": [Image.new("RGB", (8, 8), red)]})
    assert picked.settings["chosen_candidate"] == [2, 0] and picked.settings["candidates"] == 3
    assert picked.images[0] is runs[2].images[0] and picked.seeds == [200, 1]  # Bob has no reference: draw 0
    both = pick_closest(ColourEncoder(), runs, {"Lily": [Image.new("RGB", (8, 8), red)],
                                                "Bob": [Image.new("RGB", (8, 8), green)]})
    assert both.settings["chosen_candidate"] == [2, 0]
    tie = pick_closest(ColourEncoder(), [_run([red, red]), _run([red, red])], {"Lily": [Image.new("RGB", (8, 8), red)]})
    assert tie.settings["chosen_candidate"] == [0, 0]  # a tie keeps the earlier draw
    with pytest.raises(ValueError, match="at least one"):
        pick_closest(ColourEncoder(), [], {})


def test_generate_story_draws_candidates_with_their_own_seeds_and_keeps_the_closest(trained):
    from sdlite.id_selection import CANDIDATE_SEED_STRIDE, reference_similarity
    from sdlite.pipeline import load_pipeline

    pipe, encoder = load_pipeline(trained.folder), load_id_encoder(trained.export)
    story, refs = parse_story(STORY), {"Lily": [lily_picture()]}
    kw = dict(csa=CSAConfig(enabled=False), steps=3, progress=False, id_images=refs, id_encoder=encoder,
              style_strength_ratio=0.0)
    draws = [generate_story(pipe, story, seed=5 + j * CANDIDATE_SEED_STRIDE, **kw) for j in range(3)]
    best = generate_story(pipe, story, seed=5, candidates=3, **kw)
    for i in range(len(story)):
        sims = reference_similarity(encoder, [d.images[i] for d in draws], refs["Lily"])
        j = best.settings["chosen_candidate"][i]
        assert j == int(sims.argmax())
        np.testing.assert_array_equal(np.asarray(best.images[i]), np.asarray(draws[j].images[i]))
    assert best.seeds == [draws[j].seeds[i] for i, j in enumerate(best.settings["chosen_candidate"])]
    np.testing.assert_array_equal(generate_story(pipe, story, seed=5, candidates=1, **kw).arrays(), draws[0].arrays())
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="candidates"):
            generate_story(pipe, story, seed=5, candidates=bad, **kw)
    with pytest.raises(ValueError, match="closeness to the reference"):
        generate_story(pipe, story, csa=CSAConfig(enabled=False), steps=3, progress=False, candidates=2)


@pytest.mark.parametrize("options, message", [
    (("--candidates", "2"), "--candidates works with reference pictures: add --ref"),
    (("--ref", "Lily={lily}", "--candidates", "0"), "--candidates 0"),
])
def test_bad_candidates_fail_before_any_model_loads(tmp_path, capsys, options, message):
    options = [o.format(lily=tmp_path / "lily.png") for o in options]
    assert run_cli(tmp_path, *options) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_story_ref_generates_with_the_reference(trained, tmp_path):
    args = ["--model", str(trained.folder), "--photomaker", str(trained.export), "--quiet", "--no-csa"]
    assert run_cli(tmp_path, "--ref", f"Lily={tmp_path / 'lily.png'}", "--id-strength", "0", *args) == 0
    with_ref = np.asarray(Image.open(tmp_path / "o" / "page_panels" / "panel_01.png"))
    assert main(["story", str(tmp_path / "s.txt"), "--out", str(tmp_path / "p" / "page.png"), "--model",
                 str(trained.folder), "--quiet", "--no-csa"]) == 0
    without = np.asarray(Image.open(tmp_path / "p" / "page_panels" / "panel_01.png"))
    assert not np.array_equal(with_ref, without)


# ----------------------------------------------------------------------------------------------------------
# the evaluation
# ----------------------------------------------------------------------------------------------------------
def test_evaluation_stories_are_held_out_and_unsaid():
    stories = pm.make_reference_stories(6, seed=1, references=2)
    for st in stories:
        assert is_held_out(st.character) and len(st.references) == 2
        story = parse_story(st.text)
        assert len(story) == pm.PANELS and list(story.characters) == ["Ref"]
        ch = st.character
        words = set(" ".join(story.prompts).replace(",", "").split())
        assert not {ch.hair, ch.shirt, ch.trousers} & words
    assert [s.text for s in pm.make_reference_stories(6, seed=1, references=2)] == [s.text for s in stories]


class _Reader:
    """A stand-in recognizer that reads labels from a lookup of exact pictures."""

    def __init__(self, table):
        self.table = table

    def predict(self, images):
        rows = [self.table[np.asarray(im).tobytes()] for im in images]
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}


def test_reference_match_counts_the_panels_that_agree_with_the_reference():
    rng = np.random.default_rng(0)
    ref_panel = sw.sample_panel(rng, LILY)
    same = [sw.sample_panel(rng, LILY) for _ in range(2)]
    other_ch = dataclasses.replace(LILY, hair="black", hat="no hat")
    other = [sw.sample_panel(rng, other_ch) for _ in range(2)]
    pics = [sw.render(p) for p in [ref_panel, *same, *other]]
    reader = _Reader({im.tobytes(): sw.labels(p) for im, p in zip(pics, [ref_panel, *same, *other])})
    got = pm.reference_match(np.stack(pics[1:]), pics[0], reader)
    assert got == {"hair": 0.5, "shirt": 1.0, "trousers": 1.0, "hat": 0.5}


def test_the_strength_is_chosen_by_reference_match_within_the_scene_limit():
    def row(match, scene):
        return {"reference_match_min": match, "scene_accuracy": scene}

    sweep = {"no_id": row(0.2, 0.95), "id_strength_0": row(0.9, 0.70), "id_strength_10": row(0.8, 0.92),
             "id_strength_20": row(0.8, 0.94), "id_strength_50": row(0.5, 0.95)}
    assert pm.choose_strength(sweep) == 10.0  # 0 loses the scene; 10 and 20 tie: the lower strength
    with pytest.raises(ValueError, match="widen"):
        pm.choose_strength({"no_id": row(0.2, 1.0), "id_strength_0": row(0.9, 0.5)})


def test_the_guidance_is_chosen_by_the_same_rule_over_its_own_rows():
    def row(match, scene):
        return {"reference_match_min": match, "scene_accuracy": scene}

    sweep = {"no_id": row(0.2, 0.95), "id_guidance_2": row(0.9, 0.80), "id_guidance_3": row(0.7, 0.93),
             "id_guidance_4": row(0.7, 0.95), "id_guidance_5": row(0.6, 0.95),
             "id_strength_0": row(1.0, 0.95)}  # another sweep's row: not a guidance
    assert pm.choose_guidance(sweep) == 3.0  # 2 loses the scene; 3 and 4 tie: the lower scale
    assert pm.choose_guidance(sweep, max_scene_drop=0.2) == 2.0
    with pytest.raises(ValueError, match="widen"):
        pm.choose_guidance({"no_id": row(0.2, 1.0), "id_guidance_2": row(0.9, 0.5)})


def test_other_encoders_are_measured_as_the_id_row_on_their_own_pipelines(monkeypatch):
    calls = []

    def fake_rows(pipe, encoder, stories, recognizer, *, use_id=True, csa=False, references=1, strength=20.0,
                  guidance=None, seed=0, candidates=1):
        calls.append((pipe, encoder, len(stories), use_id, csa, references, strength, guidance, candidates))
        match = {("pipe", "enc"): 0.8, ("pipe2", "base"): 0.6}[pipe, encoder] if use_id else 0.2
        if guidance is not None:  # the guidance sweep: 4 reads best
            match -= abs(guidance - 4.0) / 10
        if csa:  # CSA costs the hair of the last story only
            return [{**dict.fromkeys(pm.MATCHED, match), "hair": match - 0.3 * (i == len(stories) - 1),
                     "scene_accuracy": 1.0} for i in range(len(stories))]
        return [{**dict.fromkeys(pm.MATCHED, match), "scene_accuracy": 1.0} for _ in stories]

    monkeypatch.setattr(pm, "setting_rows", fake_rows)
    monkeypatch.setattr(pm, "make_reference_stories", lambda n, seed: [seed] * n)
    res = pm.run_photomaker_eval("pipe", "enc", None, n_stories=3, n_tuning=2, progress=False,
                                 others={"base": ("pipe2", "base")})
    ablation = res["encoder_ablation"]
    assert ablation["id"] == res["table"]["id"] and ablation["base"]["reference_match_min"] == 0.6
    assert calls[-1][:2] == ("pipe2", "base")  # its own pipeline: a fused LoRA stays in a UNet
    gap = res["csa_minus_id"]  # the paired interval of the CSA row's minimum minus the ID row's
    assert gap["mean"] == pytest.approx(-0.1) and gap["n"] == 3 and gap["ci_low"] <= -0.1 <= gap["ci_high"] <= 0
    assert res["guidance_scale"] == 4.0 and set(res["guidance_sweep"]["rows"]) == {
        "no_id", *(f"id_guidance_{g:g}" for g in pm.GUIDANCES)}
    k = pm.STORYWORLD_CANDIDATES
    assert calls[-1] == ("pipe2", "base", 3, True, False, 1, res["style_strength_ratio"], 4.0, k)  # the id row's
    table_calls = [c for c in calls if c[2] == 3 and c[3]]  # the table's ID rows: all at the chosen settings
    assert len(table_calls) == 6 and {c[6:8] for c in table_calls} == {(res["style_strength_ratio"], 4.0)}
    assert sorted(c[8] for c in table_calls) == [1, 1, k, k, k, k]  # the single-draw rows, and the shipped ones
    assert [c[8] for c in calls if c[2] == 3 and not c[3]] == [1, k]  # no ID; the choice alone
    assert res["candidates"] == k and set(res["candidate_sweep"]["rows"]) == {"1", *map(str, pm.CANDIDATE_COUNTS)}
    assert res["candidate_sweep"]["rows"]["1"] == res["guidance_sweep"]["rows"]["id_guidance_4"]
    assert "encoder_ablation" not in pm.run_photomaker_eval("pipe", "enc", None, n_stories=3, n_tuning=2,
                                                           progress=False)


def test_compare_needs_a_name_and_a_folder(capsys):
    from sdlite.cli.eval import main as eval_main

    for bad in ("data/storyworld/id_encoder_base", "id=data/storyworld/id_encoder_base"):
        assert eval_main(["photomaker", "--compare", bad, "--out", "/nonexistent/x.json"]) == 2
        assert "--compare takes NAME=FOLDER" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# the shipped encoder and its results
# ----------------------------------------------------------------------------------------------------------
def test_the_shipped_encoder_loads_with_its_recipe():
    encoder = load_id_encoder(SHIPPED)
    record = json.loads((SHIPPED / "training.json").read_text())
    assert record["command"].startswith("python -m sdlite.train id-encoder")
    assert encoder.lora_weights and record["cpu_seconds"] > 0


def test_the_shipped_tower_sees_what_storyworld_clips_tower_misses():
    from sdlite.storyworld.models import load_storyworld_clip

    clip, _ = load_storyworld_clip()
    before = pm.tower_probe(clip.vision_model, n_train=600, n_test=300, steps=150)
    after = pm.tower_probe(load_id_encoder(SHIPPED).vision_model, n_train=600, n_test=300, steps=150)
    assert after["hair"] > before["hair"] + 0.2 and after["hat"] > before["hat"] + 0.2
    assert min(after[a] for a in ("class_word", "hair", "shirt", "trousers", "hat")) > 0.8


def test_results_photomaker_json_is_whole_and_its_bars_follow_its_numbers():
    from sdlite.cli.story import STORYWORLD_ID_GUIDANCE, STORYWORLD_ID_STRENGTH

    res = json.loads((ROOT / "results" / "photomaker.json").read_text())
    for key in ("reference_match_min", "reference_match_min_with_csa", "no_id_reference_match_min",
                "scene_accuracy_drop", "n_stories"):
        assert isinstance(res[key], (int, float)), key
    assert res["n_stories"] >= 50
    table = res["table"]
    assert res["reference_match_min"] == table["id"]["reference_match_min"] == min(
        table["id"][a] for a in pm.MATCHED)
    assert res["no_id_reference_match_min"] == table["no_id"]["reference_match_min"]
    assert res["reference_match_min_single_draw"] == table["id_single_draw"]["reference_match_min"]
    from sdlite.cli.story import STORYWORLD_ID_CANDIDATES

    assert res["candidates"] == STORYWORLD_ID_CANDIDATES  # the table's ID rows are what `--ref` does
    assert res["bars"]["reference_match_min_ge_0.75"] == (res["reference_match_min"] >= 0.75)
    assert res["scene_accuracy_drop"] == pytest.approx(table["no_id"]["scene_accuracy"] -
                                                       table["id"]["scene_accuracy"], abs=1e-4)
    assert res["style_strength_ratio"] == STORYWORLD_ID_STRENGTH  # the CLI's default is the one the sweep chose
    assert res["guidance_scale"] == STORYWORLD_ID_GUIDANCE == pm.choose_guidance(res["guidance_sweep"]["rows"])
    assert res["command"].startswith("python -m sdlite.eval photomaker")
    gap = res["csa_minus_id"]  # the paired interval's centre is the two rows' difference
    assert gap["n"] == res["n_stories"] and gap["ci_low"] <= gap["mean"] <= gap["ci_high"]
    assert gap["mean"] == pytest.approx(res["reference_match_min_with_csa"] - res["reference_match_min"], abs=1e-3)


def test_the_shipped_encoder_denoises_its_own_character_better_than_another():
    from sdlite.pipeline import load_pipeline

    encoder = load_id_encoder(SHIPPED)
    pipe = load_pipeline("storyworld")
    fuse_photomaker_lora(pipe, encoder.lora_weights)
    gap = reference_loss_gap(pipe, encoder, n=16, seed=3)
    assert gap["other"] > 1.1 * gap["own"], gap


def test_the_shipped_encoder_makes_held_out_characters_panels_follow_their_reference():
    from sdlite.pipeline import load_pipeline
    from sdlite.storyworld.recognizer import load_recognizer

    stories = pm.make_reference_stories(4, seed=8)  # not the evaluation's seeds
    encoder, recognizer = load_id_encoder(SHIPPED), load_recognizer()
    plain = pm.run_setting(load_pipeline("storyworld"), encoder, stories, recognizer, use_id=False)
    with_id = pm.run_setting(load_pipeline("storyworld"), encoder, stories, recognizer)
    assert with_id["shirt"] >= plain["shirt"] + 0.3 and with_id["trousers"] >= plain["trousers"] + 0.2, (plain, with_id)
    assert sum(with_id[a] for a in pm.MATCHED) >= sum(plain[a] for a in pm.MATCHED) + 1.0
    assert with_id["scene_accuracy"] >= plain["scene_accuracy"] - 0.1


def test_paired_min_difference_needs_both_rows_on_the_same_stories():
    rows = [dict.fromkeys(pm.MATCHED, 1.0)] * 3
    with pytest.raises(ValueError, match="same >= 2 stories"):
        pm.paired_min_difference(rows, rows[:2])
    assert pm.paired_min_difference(rows, rows) == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "level": 0.95, "n": 3}
