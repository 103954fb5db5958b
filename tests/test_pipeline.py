"""generate_story on storyworld's architecture and on a reloaded tiny random SDXL folder (the real path)."""
import re

import numpy as np
import pytest
import torch

from matching import whole
from sdlite.attention import ConsistentSelfAttnProcessor, csa_layer_names
from sdlite.id_encoder import IDEncoder, IDEncoderConfig
from sdlite.pipeline import (
    MODEL_DEFAULT, REAL_BANK_STEPS, REAL_ID_LENGTH, Batch, CSAConfig, bank_settings, check_bank_settings,
    estimate_story_bank, generate_story, is_storyworld, load_pipeline, model_defaults, new_bank, panel_seeds,
    plan_batches,
)
from sdlite.story import parse_story
from sdlite.storyworld.models import tiny_storyworld_pipeline
from sdlite.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline


STEPS = 2
# what load_pipeline says after naming a folder or hub id that holds another kind of pipeline
HINT = (": sdlite story runs StableDiffusionXLPipeline (SDXL) and StableDiffusionPipeline (SD1.5) folders; pass one of "
        "those (e.g. stabilityai/stable-diffusion-xl-base-1.0) or 'storyworld'")
FACE = np.full((40, 40, 3), 200, np.uint8)  # an ID image
FOUR = "[Lily] a girl\n" + "\n".join(f"[Lily] {a} in the park" for a in ("standing", "walking", "jumping", "waving"))


@pytest.fixture(scope="module")
def sw_pipe():
    return tiny_storyworld_pipeline(seed=0)


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    tiny_sdxl_pipeline(folder, seed=0)
    return folder


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd15")
    tiny_sd15_pipeline(folder, seed=0)
    return folder


def _arrays(result):
    return result.arrays().astype(np.int16)


def tiny_id_encoder(pipe):
    """A random ID encoder that fits `pipe`'s text encoders (both storyworld encoders have the same width)."""
    width = pipe.text_encoder.config.hidden_size
    return IDEncoder(IDEncoderConfig.tiny(width, width, image_size=32)).eval()


def _story(n, character="Lily", cls="a girl"):
    acts = ["standing", "walking", "jumping", "sitting", "waving"]
    lines = [f"[{character}] {cls}"] + [f"[{character}] {acts[i % 5]} in the park" for i in range(n)]
    return parse_story("\n".join(lines))


# ---------------------------------------------------------------- the plan
def test_plan_writes_references_then_reads_in_bounded_batches():
    story = parse_story("[A] a boy\n[B] a girl\n" + "\n".join(["[A] walking"] * 6 + ["[B] waving"] * 3)
                        + "\n[A] [B] standing\n[NC] the park")
    plan = plan_batches(story, CSAConfig(id_length=2, read_batch=3))
    assert plan[:2] == [Batch("write", ("A",), (0, 1)), Batch("write", ("B",), (6, 7))]
    assert Batch("read", ("A",), (2, 3, 4)) in plan and Batch("read", ("A",), (5,)) in plan
    assert Batch("read", ("B",), (8,)) in plan and Batch("read", ("A", "B"), (9,)) in plan
    assert Batch("plain", (), (10,)) in plan
    # a full batch of panels without characters is plain too, as is the last, shorter one
    scenery = plan_batches(parse_story("[A] a boy\n[A] walking\n" + "[NC] the park\n" * 4), CSAConfig(read_batch=3))
    assert scenery == [Batch("write", ("A",), (0,)), Batch("plain", (), (1, 2, 3)), Batch("plain", (), (4,))]
    covered = sorted(i for b in plan for i in b.panels)
    assert covered == list(range(len(story)))  # every panel exactly once
    # long stories: no batch grows with the story
    for n in (8, 32):
        assert max(len(b.panels) for b in plan_batches(_story(n), CSAConfig())) == 4
    assert [len(b.panels) for b in plan_batches(_story(6), CSAConfig(id_length=None))] == [6]  # all in one batch


def test_seed_policies():
    assert panel_seeds(4, 10) == [10, 11, 12, 13]
    assert panel_seeds(3, 10, "shared") == [10, 10, 10]
    with pytest.raises(ValueError, match="seed_policy must be one of"):
        panel_seeds(3, 1, "random")


# ---------------------------------------------------------------- storyworld architecture
def test_storyworld_story_shapes_determinism_and_clean_uninstall(sw_pipe):
    before = dict(sw_pipe.unet.attn_processors)
    story = parse_story(FOUR)
    a = generate_story(sw_pipe, story, steps=STEPS, progress=False)
    b = generate_story(sw_pipe, story, steps=STEPS, progress=False)
    assert len(a.images) == 4 and a.arrays().shape == (4, 64, 64, 3)
    np.testing.assert_array_equal(a.arrays(), b.arrays())  # same seed, same panels
    after = sw_pipe.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # the exact processor objects are back
    assert a.settings["csa"]["layers"] == "all" and is_storyworld(sw_pipe)
    assert a.settings["csa"]["first_steps_without_csa"] == 0  # storyworld: CSA from the first step
    assert a.bank_nbytes > 0


def test_csa_changes_panels_and_the_step_callback_drives_it(sw_pipe):
    story = parse_story(FOUR)
    plain = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=CSAConfig(enabled=False)))
    csa = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False,
                                 csa=CSAConfig(first_steps_without_csa=0, rate=1.0)))
    assert np.abs(plain - csa).max() > 0
    # CSA from step STEPS on = never: identical to no CSA ...
    never = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False,
                                   csa=CSAConfig(first_steps_without_csa=STEPS, rate=1.0)))
    np.testing.assert_array_equal(never, plain)
    # ... from the last step on: differs, so the callback advanced the step counter to STEPS - 1
    last = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False,
                                  csa=CSAConfig(first_steps_without_csa=STEPS - 1, rate=1.0)))
    assert np.abs(last - plain).max() > 0
    # rate=None takes the model's default rate (storyworld: 1.0): the same panels as asking for it
    assert CSAConfig().rate is None and model_defaults(sw_pipe)["rate"] == 1.0
    res = generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=CSAConfig(first_steps_without_csa=0))
    default = _arrays(res)
    np.testing.assert_array_equal(default, csa)
    assert res.settings["csa"]["rate"] == 1.0 and res.settings["csa"]["layers"] == "all"  # what actually ran
    half = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False,
                                  csa=CSAConfig(first_steps_without_csa=0, rate=0.5)))
    assert np.abs(half - csa).max() > 0


def test_per_panel_noise_does_not_depend_on_batching(sw_pipe):
    story = parse_story(FOUR)
    one = generate_story(sw_pipe, story, steps=STEPS, progress=False,
                         csa=CSAConfig(enabled=False, id_length=1, read_batch=1))
    four = generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=CSAConfig(enabled=False))
    assert len(one.plan) == 4 and len(four.plan) == 1
    np.testing.assert_allclose(_arrays(one), _arrays(four), atol=2)  # batched matmuls may round differently


def test_shared_seed_repeats_the_noise(sw_pipe):
    story = parse_story("[A] a boy\n" + "\n".join(["[A] walking in the park"] * 3))
    shared = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False, seed_policy="shared",
                                    csa=CSAConfig(enabled=False)))
    indep = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=CSAConfig(enabled=False)))
    np.testing.assert_allclose(shared[0], shared[2], atol=2)  # same prompt, same noise
    assert np.abs(indep[0] - indep[2]).max() > 10


def test_bank_does_not_grow_with_the_story(sw_pipe):
    r8 = generate_story(sw_pipe, _story(8), steps=STEPS, progress=False)
    r12 = generate_story(sw_pipe, _story(12), steps=STEPS, progress=False)
    assert r8.bank_nbytes == r12.bank_nbytes > 0
    assert max(len(b.panels) for b in r12.plan) == 4


def test_tiles_smaller_than_a_batch_and_two_characters(sw_pipe):
    story = parse_story("[A] a boy\n[B] a girl\n[A] walking in the park\n[A] waving in the park\n"
                        "[B] sitting on the beach\n[A] [B] standing in the city\n[NC] the park at night")
    r = generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=CSAConfig(tile=2, id_length=2))
    assert len(r.images) == 5 and [b.mode for b in r.plan] == ["write", "write", "read", "plain"]


def test_storyworld_rejects_unknown_words_before_generating(sw_pipe):
    with pytest.raises(ValueError, match=r"line 2: .*\['dragon'\]"):
        generate_story(sw_pipe, parse_story("[A] a boy\n[A] a dragon in the park"), steps=STEPS, progress=False)
    assert not any(isinstance(p, ConsistentSelfAttnProcessor) for p in sw_pipe.unet.attn_processors.values())


def test_processors_removed_after_an_error_mid_story(sw_pipe, monkeypatch):
    before = dict(sw_pipe.unet.attn_processors)
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("boom")

    monkeypatch.setattr(type(sw_pipe), "__call__", boom)
    with pytest.raises(RuntimeError, match="boom"):
        generate_story(sw_pipe, parse_story(FOUR), steps=STEPS, progress=False)
    assert calls and all(sw_pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_photomaker_path_changes_the_id_panels(sw_pipe):
    story = parse_story("[A] a boy img\n[A] walking in the park\n[A] waving in the park")
    enc = tiny_id_encoder(sw_pipe)
    plain = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False))
    fused = _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False, id_images={"A": [FACE]},
                                   id_encoder=enc, style_strength_ratio=0))
    assert np.abs(plain - fused).max() > 0
    with pytest.raises(ValueError, match="needs both id_images"):
        generate_story(sw_pipe, story, id_images={"A": [FACE]})
    with pytest.raises(ValueError, match=r"id_images names \['Z'\]"):
        generate_story(sw_pipe, story, id_images={"Z": [FACE]}, id_encoder=enc)


def test_bad_settings():
    with pytest.raises(ValueError, match="rate must be in"):
        CSAConfig(rate=1.5)
    with pytest.raises(ValueError, match="tile=1 puts every image alone"):
        CSAConfig(tile=1)
    with pytest.raises(ValueError, match="stride=2 needs a tile"):
        CSAConfig(stride=2)
    with pytest.raises(ValueError, match="layers must be"):
        CSAConfig(layers="middle")
    with pytest.raises(ValueError, match="first_steps_without_csa must be"):
        CSAConfig(first_steps_without_csa=-1)
    with pytest.raises(ValueError, match="read_batch must be"):
        CSAConfig(read_batch=0)


def test_bad_calls(sw_pipe):
    with pytest.raises(TypeError, match="parsed Story"):
        generate_story(sw_pipe, "[A] a boy\n[A] walking")
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        generate_story(sw_pipe, parse_story(FOUR), steps=0)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_pipeline("no-such-model")


# ---------------------------------------------------------------- the real path: SDXL from a folder
def test_real_sdxl_path_from_a_saved_folder(sdxl_folder):
    pipe = load_pipeline(sdxl_folder, "cpu")
    assert not is_storyworld(pipe) and len(pipe.tokenizer) >= 49408
    assert model_defaults(pipe)["layers"] == "up" and model_defaults(pipe)["rate"] == 0.5  # the paper's
    story = parse_story("style: comic\n[Bob] a man img, wearing a black suit\n[Bob] reading a newspaper at home\n"
                        "[Bob] riding a dragon over the mountains")  # any English: the full CLIP vocabulary
    before = dict(pipe.unet.attn_processors)
    r = generate_story(pipe, story, steps=STEPS, height=64, width=64, progress=False)
    assert r.arrays().shape == (2, 64, 64, 3)
    assert "wearing a black suit" in story.prompts[0] and "img" not in story.prompts[0].split()
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    up = [k for k in before if k.startswith("up_blocks") and "attn1" in k]
    assert up and r.settings["csa"]["layers"] == "up"
    assert r.settings["csa"]["first_steps_without_csa"] == 1  # SDXL: as the official code
    again = generate_story(pipe, story, steps=STEPS, height=64, width=64, progress=False)
    np.testing.assert_array_equal(r.arrays(), again.arrays())


def test_load_pipeline_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a diffusers pipeline folder"):
        load_pipeline(tmp_path)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            load_pipeline("storyworld", "cuda")


def test_hub_id_without_network_says_how_to_get_the_weights():
    with pytest.raises(FileNotFoundError, match="Hugging Face cache.*--model PATH"):
        load_pipeline("sdlite-tests/no-such-sdxl", "cpu")


# ---------------------------------------------------------------- the real path: SD1.5 from a folder
def test_sd15_folder_loads_as_sd15_and_tells_its_stories(sd15_folder):
    from diffusers import StableDiffusionPipeline

    pipe = load_pipeline(sd15_folder, "cpu")
    assert type(pipe) is StableDiffusionPipeline and pipe.safety_checker is None
    assert model_defaults(pipe)["guidance_scale"] == 7.5 and model_defaults(pipe)["layers"] == "up"
    story = parse_story("[Bob] a man in a black suit\n[Bob] reading a newspaper\n[Bob] riding a horse\n"
                        "[NC] a quiet street at night")
    before = dict(pipe.unet.attn_processors)
    r = generate_story(pipe, story, steps=STEPS, height=64, width=64, progress=False)
    assert r.arrays().shape == (3, 64, 64, 3) and r.bank_nbytes > 0
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    plain = generate_story(pipe, story, steps=STEPS, height=64, width=64, progress=False,
                           csa=CSAConfig(enabled=False))
    assert plain.bank_nbytes == 0
    # CSA changes the character's panels, never the [NC] one (plain attention in both runs)
    assert np.abs(_arrays(r)[:2] - _arrays(plain)[:2]).max() > 0
    np.testing.assert_allclose(_arrays(r)[2], _arrays(plain)[2], atol=2)  # batched alone vs with others
    # without guidance: one half, the bank holds half as many tokens
    no_cfg = generate_story(pipe, story, steps=STEPS, height=64, width=64, progress=False, guidance_scale=1.0)
    assert no_cfg.bank_nbytes * 2 == r.bank_nbytes
    with pytest.raises(ValueError, match="PhotoMaker path needs an SDXL pipeline"):
        generate_story(pipe, parse_story("[A] a man img\n[A] walking"), id_images={"A": [np.zeros((8, 8, 3))]},
                       id_encoder=IDEncoder(IDEncoderConfig.tiny(16, 16, image_size=32)))


def test_other_pipeline_classes_are_refused_in_one_line(sdxl_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "kandinsky"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["_class_name"] = "KandinskyV22Pipeline"
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="holds a KandinskyV22Pipeline: sdlite story runs StableDiffusionXLPipeline "
                                         r"\(SDXL\) and StableDiffusionPipeline \(SD1.5\)"):
        load_pipeline(folder)


# ---------------------------------------------------------------- the bank: its size before generating, and trades
def test_bank_estimate_equals_the_measured_bank(sw_pipe, sdxl_folder):
    two = parse_story("[A] a boy\n[B] a girl\n[A] walking in the park\n[A] waving in the park\n"
                      "[B] sitting on the beach\n[A] [B] standing in the city")
    for csa in (CSAConfig(), CSAConfig(rate=0.5, layers="up"), CSAConfig(rate=0.3, bank_dtype="float16"),
                CSAConfig(bank_steps=1, id_length=1), CSAConfig(bank_device="cpu", rate_by_scale={16: 0.25})):
        est = estimate_story_bank(sw_pipe, two, csa, steps=STEPS)
        r = generate_story(sw_pipe, two, csa=csa, steps=STEPS, progress=False)
        assert sum(est.values()) == r.bank_nbytes > 0, csa
    full = estimate_story_bank(sw_pipe, two, CSAConfig(), steps=STEPS)
    assert estimate_story_bank(sw_pipe, two, CSAConfig(bank_dtype="float16"), steps=STEPS)["A"] * 2 == full["A"]
    assert estimate_story_bank(sw_pipe, two, CSAConfig(bank_steps=1), steps=STEPS)["A"] * STEPS == full["A"]
    assert full["A"] == 2 * full["B"]  # A has 2 reference panels, B one
    assert estimate_story_bank(sw_pipe, two, CSAConfig(enabled=False)) == {"A": 0, "B": 0}
    steps = model_defaults(sw_pipe)["steps"]  # the model's default when steps is not given
    assert estimate_story_bank(sw_pipe, two) == estimate_story_bank(sw_pipe, two, steps=steps) != \
        estimate_story_bank(sw_pipe, two, steps=steps - 1)
    # sizes whose latent grid is halved to odd sides (48 x 40 px: 12 x 10 -> 6 x 5 -> 3 x 3), guidance just above 1
    for height, width in ((48, 40), (40, 48)):
        est = estimate_story_bank(sw_pipe, two, steps=STEPS, height=height, width=width, guidance_scale=1.5)
        r = generate_story(sw_pipe, two, steps=STEPS, height=height, width=width, guidance_scale=1.5, progress=False)
        assert sum(est.values()) == r.bank_nbytes > 0, (height, width)
    # a real-layout SDXL at another size, with and without guidance
    pipe = load_pipeline(sdxl_folder)
    story = parse_story("[Bob] a man\n[Bob] reading\n[Bob] running\n[Bob] sleeping")
    for kw in ({"height": 64, "width": 96}, {"height": 64, "width": 64, "guidance_scale": 1.0}):
        est = estimate_story_bank(pipe, story, None, steps=3, **kw)
        r = generate_story(pipe, story, steps=3, progress=False, **kw)
        assert est["Bob"] == r.bank_nbytes > 0 and r.settings["csa"]["id_length"] == 2  # the real-model default


def test_bank_on_cpu_in_half_precision_and_fewer_steps(sw_pipe):
    bank = new_bank(CSAConfig(bank_device="cpu", bank_dtype="float16"))
    story = _story(6)
    r = generate_story(sw_pipe, story, steps=3, progress=False, csa=CSAConfig(bank_steps=2), bank=bank)
    assert bank.characters == ["Lily"] and bank.steps("Lily") == [0, 1]  # kept by the caller, 2 of 3 steps
    stored = [bank.read("Lily", s, layer) for s in (0, 1) for layer in bank.layers("Lily")]
    assert all(t.dtype == torch.float16 and t.device.type == "cpu" for t in stored)
    full = generate_story(sw_pipe, story, steps=3, progress=False)
    assert r.bank_nbytes * 3 == full.bank_nbytes * 2 // 2  # 2/3 of the steps, half the bytes per value
    assert np.abs(_arrays(r) - _arrays(full)).max() > 0  # fewer stored steps: a different (cheaper) story


# --- mutation survivors (tools/mutation.py pipeline; docs/mutation.md): functions only the CLI called ---

def test_the_official_preset_is_the_demos_setting_and_takes_overrides():
    from sdlite.attention import OFFICIAL_SKIP_SCHEDULE

    csa = CSAConfig.official()
    assert (csa.layers, csa.rate, dict(csa.rate_by_scale), csa.sampling) == ("up", 0.5, {32: 0.5, 16: 0.5}, "official")
    assert (csa.first_steps_without_csa, csa.skip_schedule, csa.id_length, csa.bank_steps) == \
        (1, OFFICIAL_SKIP_SCHEDULE, 1, None)
    other = CSAConfig.official(rate=0.3, id_length=2)
    assert (other.rate, other.id_length, other.sampling, other.layers) == (0.3, 2, "official", "up")


def test_bank_settings_name_what_stored_tokens_depend_on():
    pipe = tiny_storyworld_pipeline(seed=0)  # built here: mutmut charges a module fixture to its first test only
    csa = CSAConfig(layers="up", bank_steps=3)
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor
    settings = bank_settings(pipe, csa, steps=4, height=None, width=48, guidance_scale=5.0)
    assert settings == {"unet": type(pipe.unet).__name__, "cross_attention_dim": pipe.unet.config.cross_attention_dim,
                        "block_out_channels": list(pipe.unet.config.block_out_channels), "height": default,
                        "width": 48, "steps": 4, "guidance_halves": True, "layers": "up",
                        "layer_names": csa_layer_names(pipe.unet, "up"), "bank_steps": 3}
    assert bank_settings(pipe, csa, 4, 32, 32, guidance_scale=1.0)["guidance_halves"] is False  # no guidance
    assert [bank_settings(pipe, csa, 4, 40, 32, guidance_scale=1.5)[k] for k in ("height", "guidance_halves")] == [40, True]
    assert bank_settings(pipe, CSAConfig(layers="all"), 4, 32, 32, 5.0)["layer_names"] == \
        csa_layer_names(pipe.unet, "all")


def test_a_character_file_made_under_other_settings_is_refused_by_name():
    wanted = {"height": 64, "steps": 4, "layer_names": ["a", "b"]}
    check_bank_settings("Lily", dict(wanted), wanted)  # the same settings: no error
    hint = ("; generate with the same model, size, steps, guidance and CSA layers, or write the character again")
    cases = [({**wanted, "steps": 8}, "steps 8 in the file, 4 now"),
             ({"height": 64, "layer_names": ["a", "b"]}, "steps None in the file, 4 now"),
             ({**wanted, "layer_names": ["a"]}, "layer_names (the list differs)")]
    for saved, shown in cases:
        message = f"character file of 'Lily' was made with other settings: {shown}{hint}"
        with pytest.raises(ValueError, match=whole(message)):
            check_bank_settings("Lily", saved, wanted)


def test_load_pipeline_defaults_to_storyworld_and_loads_a_half_folder_in_float32_on_the_cpu(tmp_path):
    assert is_storyworld(load_pipeline()) and is_storyworld(load_pipeline("storyworld"))
    pipe = tiny_sd15_pipeline(seed=0)
    pipe.to(torch.float16).save_pretrained(tmp_path / "sd15_fp16")  # a folder of float16 weights
    loaded = load_pipeline(tmp_path / "sd15_fp16")  # on the CPU: float32 unless told otherwise
    assert loaded.unet.dtype == loaded.text_encoder.dtype == loaded.vae.dtype == torch.float32
    assert load_pipeline(tmp_path / "sd15_fp16", dtype=torch.bfloat16).unet.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_asking_for_cuda_without_a_gpu_says_what_to_do():
    message = "device 'cuda' asked for, but torch sees no GPU: use --device cpu (storyworld runs on CPU)"
    with pytest.raises(ValueError, match=whole(message)):
        load_pipeline("storyworld", device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_storyworld_sd15_and_the_id_path_run_on_the_asked_device(sd15_folder):
    sd15 = load_pipeline(sd15_folder, device="cuda")  # SD1.5's prompts are encoded on the device passed to it
    story = parse_story("[Bob] a man\n[Bob] reading\n[Bob] running")
    assert len(generate_story(sd15, story, steps=STEPS, height=64, width=64, progress=False).images) == 2
    pipe = load_pipeline("storyworld", device="cuda")
    assert pipe.unet.device.type == "cuda"
    # the ID path on the GPU: ID prompts, ID images and the encoder's output stay on the pipeline's device
    story = parse_story("[A] a boy img\n[A] walking in the park\n[A] waving in the park")
    enc = tiny_id_encoder(pipe).to("cuda")
    r = generate_story(pipe, story, steps=STEPS, progress=False, id_images={"A": [FACE]}, id_encoder=enc)
    assert len(r.images) == 2


def test_only_sd15_pipelines_are_loaded_without_their_safety_checker():
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from sdlite.pipeline import _no_safety_checker

    assert _no_safety_checker(StableDiffusionPipeline) == {"safety_checker": None, "feature_extractor": None,
                                                           "requires_safety_checker": False}
    assert _no_safety_checker(StableDiffusionXLPipeline) == {}


def test_pipeline_folders_named_in_their_messages(tmp_path):
    from sdlite.pipeline import pipeline_class_name

    for config, holds in [(["not", "a", "dict"], "pipeline without _class_name"), ({}, "pipeline without _class_name"),
                          ({"_class_name": "KandinskyPipeline"}, "KandinskyPipeline")]:
        with pytest.raises(ValueError, match=whole(f"m/x holds a {holds}{HINT}")):
            pipeline_class_name(config, "m/x")
    assert pipeline_class_name({"_class_name": "StableDiffusionPipeline"}, "m/x") == "StableDiffusionPipeline"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    pattern = (re.escape(f"{broken / 'model_index.json'} is not valid JSON (") + ".+"
               + re.escape("): restore the pipeline folder"))
    with pytest.raises(ValueError, match="^" + pattern + "$"):
        load_pipeline(broken)


def test_load_tokenizer_reads_storyworld_by_default_and_a_folders_tokenizer_offline(tmp_path, monkeypatch):
    from transformers import CLIPTokenizer

    from sdlite.pipeline import load_tokenizer

    default = load_tokenizer()
    assert default is not None and default.get_vocab() == load_tokenizer("storyworld").get_vocab()
    default.save_pretrained(tmp_path / "pipe" / "tokenizer")
    assert load_tokenizer(tmp_path / "pipe").get_vocab() == default.get_vocab()
    assert load_tokenizer(tmp_path / "elsewhere") is None  # no tokenizer/ folder: nothing to check with
    seen = {}
    original = CLIPTokenizer.from_pretrained.__func__

    def spy(cls, folder, **kwargs):
        seen.update(kwargs)
        return original(cls, folder, **kwargs)

    monkeypatch.setattr(CLIPTokenizer, "from_pretrained", classmethod(spy))
    load_tokenizer(tmp_path / "pipe")
    assert seen == {"local_files_only": True}  # never asks the network


def test_story_result_arrays_are_rgb_whatever_the_panels_mode():
    from PIL import Image

    from sdlite.pipeline import StoryResult

    panels = [Image.new("L", (8, 6), 200), Image.new("RGBA", (8, 6), (10, 20, 30, 0))]
    arrays = StoryResult(images=panels, story=None, seeds=[0, 1], plan=[]).arrays()
    assert arrays.shape == (2, 6, 8, 3) and arrays.dtype == np.uint8
    assert (arrays[0] == 200).all() and (arrays[1] == [10, 20, 30]).all()


# --- mutation survivors, pipeline's fourth sitting: what load_pipeline hands diffusers, the ID path's panels ---
def test_storyworld_by_name_or_by_folder_loads_on_the_asked_device(monkeypatch):
    from sdlite.storyworld import models as sw_models

    seen = []
    monkeypatch.setattr(sw_models, "load_storyworld", lambda *args, **kwargs: seen.append((args, kwargs)) or "pipe")
    assert load_pipeline("storyworld", "cpu") == "pipe"
    assert load_pipeline(sw_models.storyworld_dir(), torch.device("cpu")) == "pipe"
    assert seen == [((torch.device("cpu"),), {}), ((torch.device("cpu"),), {"folder": sw_models.storyworld_dir()})]


def test_wrong_model_paths_get_the_whole_message(tmp_path):
    with pytest.raises(FileNotFoundError, match=whole(
            f"{tmp_path} is not a diffusers pipeline folder (no model_index.json): pass a folder written by "
            "save_pretrained, a hub id, or 'storyworld'")):
        load_pipeline(tmp_path)
    with pytest.raises(FileNotFoundError, match=whole(
            "--model 'm/x/y': no such folder (and not a hub id of the form 'namespace/name'): check the path, or pass "
            "'storyworld' or a hub id like 'stabilityai/stable-diffusion-xl-base-1.0'")):
        load_pipeline("m/x/y")
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match=whole(f"{tmp_path} holds a KandinskyPipeline{HINT}")):
        load_pipeline(tmp_path)


def test_a_local_folder_is_read_offline_and_sd15_without_its_safety_checker(sd15_folder, monkeypatch):
    import diffusers

    seen = []
    real = diffusers.StableDiffusionPipeline.from_pretrained

    def recording(path, **kwargs):
        seen.append((path, kwargs))
        return real(path, **kwargs)

    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_pretrained", recording)
    load_pipeline(sd15_folder)
    assert seen == [(sd15_folder, {"dtype": torch.float32, "local_files_only": True, "safety_checker": None,
                                   "feature_extractor": None, "requires_safety_checker": False})]


class _HubStub:
    """diffusers' hub loading without a network: the config a hub id names, and a record of each from_pretrained."""

    def __init__(self, monkeypatch, class_name, fp16_files=True, cached=True):
        import diffusers

        self.calls, self.fp16_files, self.cached = [], fp16_files, cached
        monkeypatch.setattr(diffusers.DiffusionPipeline, "load_config",
                            lambda name: self.calls.append(("config", name)) or {"_class_name": class_name})
        if class_name in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
            monkeypatch.setattr(getattr(diffusers, class_name), "from_pretrained", self.from_pretrained)

    def from_pretrained(self, name, **kwargs):
        self.calls.append(("load", name, kwargs))
        if not self.cached:
            raise OSError("not in the cache, and no network")
        if kwargs.get("variant") == "fp16" and not self.fp16_files:
            raise OSError("no fp16 variant")
        return self

    def to(self, device):
        self.calls.append(("to", device))
        return self


def test_a_hub_id_asks_diffusers_for_safetensors_and_fp16_files_where_half_precision_is_used(monkeypatch):
    sd15 = _HubStub(monkeypatch, "StableDiffusionPipeline")
    assert load_pipeline("someone/sd15", "cpu") is sd15
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    assert sd15.calls == [("config", "someone/sd15"),
                          ("load", "someone/sd15", {"dtype": torch.float32, "use_safetensors": True, "variant": None,
                                                    **no_checker}),
                          ("to", torch.device("cpu"))]
    half = _HubStub(monkeypatch, "StableDiffusionPipeline", fp16_files=False)
    assert load_pipeline("someone/sd15", "cpu", dtype=torch.float16) is half
    fp16 = {"dtype": torch.float16, "use_safetensors": True}
    assert half.calls == [("config", "someone/sd15"), ("load", "someone/sd15", {**fp16, "variant": "fp16", **no_checker}),
                          ("load", "someone/sd15", {**fp16, **no_checker}),  # no fp16 files: the default ones
                          ("to", torch.device("cpu"))]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # only the stub touches the 'GPU'
    on_gpu = _HubStub(monkeypatch, "StableDiffusionXLPipeline")
    load_pipeline("someone/sdxl", "cuda")
    assert on_gpu.calls[1:] == [("load", "someone/sdxl", {**fp16, "variant": "fp16"}),  # CUDA: float16 by default
                                ("to", torch.device("cuda"))]
    offline = _HubStub(monkeypatch, "StableDiffusionXLPipeline", cached=False)
    with pytest.raises(FileNotFoundError, match=whole(
            "--model 'someone/sdxl' was taken as a hub id (no local folder of that name), and could not be loaded "
            "(OSError): without a network the weights must be in the Hugging Face cache (run once online: "
            "`huggingface-cli download stabilityai/stable-diffusion-xl-base-1.0`) or in a local folder passed as "
            "--model PATH")):
        load_pipeline("someone/sdxl", "cpu")
    assert [call[0] for call in offline.calls] == ["config", "load"]  # float32: no second try without a variant
    _HubStub(monkeypatch, "KandinskyPipeline")
    with pytest.raises(ValueError, match=whole(f"someone/kandinsky holds a KandinskyPipeline{HINT}")):
        load_pipeline("someone/kandinsky")


def test_the_id_path_fuses_exactly_the_solo_panels_of_characters_with_id_images(sw_pipe):
    # Bob has the trigger word but no images, the two-character panel is nobody's, the trigger word in capitals counts
    story = parse_story("[Lily] a girl IMG\n[Bob] a boy img\n[Lily] walking in the park\n[Bob] sitting on the beach\n"
                        "[Lily] [Bob] standing in the city\n[Lily] waving in the park")
    enc = tiny_id_encoder(sw_pipe)
    kw = dict(steps=STEPS, progress=False, csa=CSAConfig(enabled=False))  # one batch: ID and text-only rows mixed
    assert plan_batches(story, kw["csa"]) == plan_batches(story, None) == [Batch("plain", (), (0, 1, 2, 3))]
    plain = _arrays(generate_story(sw_pipe, story, **kw))
    fused = _arrays(generate_story(sw_pipe, story, id_images={"Lily": [FACE]}, id_encoder=enc, style_strength_ratio=0,
                                   **kw))
    assert [i for i in range(len(story)) if np.abs(plain[i] - fused[i]).max() > 0] == [0, 3]
    # an encoder in another precision than the pipeline (PhotoMaker's fp32 encoder next to an fp16 SDXL)
    wide = _arrays(generate_story(sw_pipe, story, id_images={"Lily": [FACE]}, id_encoder=enc.double(),
                                  style_strength_ratio=0, **kw))
    assert np.abs(wide - fused).max() <= 1


def test_a_new_bank_lives_where_the_settings_say():
    bank = new_bank(CSAConfig(bank_device="cpu", bank_dtype="float16"))
    assert (bank.device, bank.dtype) == (torch.device("cpu"), torch.float16)
    assert (new_bank(CSAConfig()).device, new_bank(CSAConfig()).dtype) == (None, None)  # where the tokens are made


@pytest.mark.parametrize("folder", ["sdxl_folder", "sd15_folder"])
def test_without_csa_each_panel_is_what_diffusers_draws_from_its_prompt_and_the_storys_negative(folder, request):
    pipe = load_pipeline(request.getfixturevalue(folder))
    size = dict(height=64, width=64, guidance_scale=5.0)
    for text in ("[Bob] a man\n[Bob] reading\n[Bob] running",  # no negative: SDXL's zeros for an empty one
                 "negative: a hat\n[Bob] a man\n[Bob] reading\n[Bob] running"):
        story = parse_story(text)
        r = generate_story(pipe, story, steps=STEPS, seed=3, progress=False, csa=CSAConfig(enabled=False), **size)
        for i, panel in enumerate(story.panels):
            ref = pipe(prompt=panel.prompt, negative_prompt=story.negative_prompt or None, num_inference_steps=STEPS,
                       generator=torch.Generator().manual_seed(3 + i), output_type="pil", **size).images[0]
            diff = np.abs(np.asarray(ref, np.int16) - _arrays(r)[i])
            assert diff.max() <= 2, (text, i)  # panels batched together vs one by one: float noise only


def test_each_batch_is_tiled_as_the_settings_say(sw_pipe):
    story = parse_story(FOUR)  # id_length=4: one write batch of the four panels

    def run(**tiles):
        csa = CSAConfig(id_length=4, **tiles)
        return _arrays(generate_story(sw_pipe, story, steps=STEPS, progress=False, csa=csa))

    one_window = run()
    assert np.array_equal(run(tile=8), one_window)  # a tile larger than the batch is one window over it
    disjoint = run(tile=2)
    assert np.abs(disjoint - one_window).max() > 0  # two windows of two panels
    assert np.abs(run(tile=2, stride=1) - disjoint).max() > 0  # the paper's sliding window


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_after_the_merge_step_the_id_prompt_replaces_the_tokens_and_the_pooled_embedding(sw_pipe, monkeypatch, guidance):
    story = parse_story("[A] a boy img\n[A] walking in the park")
    enc = tiny_id_encoder(sw_pipe)
    seen = []  # per step: the conditional half's tokens and pooled embedding, and the unconditional half's
    forward = sw_pipe.unet.forward

    def recording(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
        seen.append((encoder_hidden_states.clone(), added_cond_kwargs["text_embeds"].clone()))
        return forward(sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kwargs)

    monkeypatch.setattr(sw_pipe.unet, "forward", recording)
    generate_story(sw_pipe, story, steps=4, guidance_scale=guidance, progress=False, csa=CSAConfig(enabled=False),
                   id_images={"A": [np.full((40, 40, 3), v, np.uint8) for v in (90, 200)]}, id_encoder=enc,
                   style_strength_ratio=50)  # two ID images: "a boy boy": its pooled embedding differs from "a boy"
    halves = 2 if guidance > 1 else 1
    assert len(seen) == 4 and all(tokens.shape[0] == pooled.shape[0] == halves for tokens, pooled in seen)
    cond = [(tokens[-1], pooled[-1]) for tokens, pooled in seen]
    for step in (1, 2):  # merge step int(50 % x 4) = 2: the text-only prompt up to and including it
        assert torch.equal(cond[step][0], cond[0][0]) and torch.equal(cond[step][1], cond[0][1])
    assert not torch.equal(cond[3][0], cond[0][0]) and not torch.equal(cond[3][1], cond[0][1])  # then the ID prompt
    if halves == 2:  # the negative half never changes
        assert all(torch.equal(tokens[0], seen[0][0][0]) and torch.equal(pooled[0], seen[0][1][0])
                   for tokens, pooled in seen)


def test_each_kind_of_model_has_its_defaults(sw_pipe, sdxl_folder, sd15_folder):
    assert model_defaults(sw_pipe) == {"steps": 20, "guidance_scale": 5.0, "layers": "all", "first_steps_without_csa": 0,
                                       "rate": 1.0, "id_length": 4, "bank_steps": None}
    real = {"steps": 35, "layers": "up", "first_steps_without_csa": 1, "rate": 0.5, "id_length": REAL_ID_LENGTH,
            "bank_steps": REAL_BANK_STEPS}
    assert model_defaults(load_pipeline(sdxl_folder)) == {**real, "guidance_scale": 5.0}  # the official demo's
    assert model_defaults(load_pipeline(sd15_folder)) == {**real, "guidance_scale": 7.5}  # diffusers' SD1.5 default


def test_generate_storys_own_checks_say_what_to_pass(sw_pipe, sd15_folder):
    story = parse_story(FOUR)
    enc = IDEncoder(IDEncoderConfig.tiny(16, 16, image_size=32))
    cases = [
        (dict(csa={"rate": 0.5}), TypeError, "csa must be a CSAConfig, got dict: e.g. CSAConfig(rate=0.5)"),
        (dict(story=FOUR), TypeError, "story must be a parsed Story, got str: use sdlite.story.parse_story(text)"),
        (dict(steps=True), ValueError, "steps must be an int >= 1, got True"),
        (dict(steps=2.0), ValueError, "steps must be an int >= 1, got 2.0"),
        (dict(id_encoder=enc), ValueError,
         "the PhotoMaker path needs both id_images={name: [images]} and id_encoder=IDEncoder(...)"),
        (dict(id_images={"Lily": []}, id_encoder=enc), ValueError,
         "every character in id_images needs at least one image"),
        (dict(id_images={"Bob": [FACE]}, id_encoder=enc), ValueError,
         "id_images names ['Bob'], not characters of the story (['Lily'])"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=whole(message)):
            generate_story(sw_pipe, kwargs.pop("story", story), progress=False, **kwargs)
    with pytest.raises(ValueError, match=whole(
            "the PhotoMaker path needs an SDXL pipeline (PhotoMaker fuses into both SDXL text encoders' tokens): load "
            "an SDXL model, or drop id_images for SD1.5")):
        generate_story(load_pipeline(sd15_folder), story, id_images={"Lily": [FACE]}, id_encoder=enc)
    assert len(generate_story(sw_pipe, story, steps=1, progress=False).images) == 4  # one step is enough


def test_csa_settings_are_checked_at_their_bounds_with_whole_messages():
    for ok in (dict(rate=0), dict(rate=1), dict(rate=0.25), dict(first_steps_without_csa=0), dict(tile=2, stride=1),
               dict(tile=2, stride=2), dict(id_length=1, bank_steps=1, read_batch=1), dict(id_length=MODEL_DEFAULT),
               dict(bank_steps=MODEL_DEFAULT), dict(rate_by_scale={1: 0, 32: 1}), dict(bank_dtype="bfloat16"),
               dict(bank_dtype="float32"), dict(bank_dtype="float16"), dict(layers="down"), dict(layers="mid")):
        CSAConfig(**ok)  # accepted
    bad = [(dict(rate=r), f"rate must be in [0, 1], got {r!r}: e.g. rate=0.5") for r in (True, -0.1, 1.5, "0.5")]
    bad += [(dict(first_steps_without_csa=f),
             f"first_steps_without_csa must be an int >= 0 or None (model default), got {f!r}") for f in (True, -1, 1.5)]
    bad += [({name: v}, f"{name} must be an int >= 1 or None, got {v!r}")
            for name in ("tile", "id_length", "bank_steps") for v in (0, True, 2.5)]
    bad += [(dict(tile=MODEL_DEFAULT), "tile must be an int >= 1 or None, got 'model'"),  # tile has no model default
            (dict(rate_by_scale={"x": 0.5}), "rate_by_scale must map a scale to a rate, e.g. {32: 0.5, 16: 0.5}, got "
                                             "{'x': 0.5}"),
            (dict(rate_by_scale=[1, 2]), "rate_by_scale must map a scale to a rate, e.g. {32: 0.5, 16: 0.5}, got [1, 2]"),
            (dict(rate_by_scale={0: 0.5}), "rate_by_scale needs scales >= 1 and rates in [0, 1], got {0: 0.5}"),
            (dict(rate_by_scale={16: 1.5}), "rate_by_scale needs scales >= 1 and rates in [0, 1], got {16: 1.5}"),
            (dict(bank_dtype="float64"), "bank_dtype must be 'float16', 'bfloat16', 'float32' or None, got 'float64'"),
            (dict(tile=1), "tile=1 puts every image alone in its window (no consistency): use tile >= 2, None (whole "
                           "batch), or enabled=False for no CSA"),
            (dict(stride=1), "stride=1 needs a tile and 1 <= stride <= tile: e.g. tile=4, stride=2"),
            (dict(tile=2, stride=3), "stride=3 needs a tile and 1 <= stride <= tile: e.g. tile=4, stride=2"),
            (dict(tile=2, stride=0), "stride=0 needs a tile and 1 <= stride <= tile: e.g. tile=4, stride=2"),
            (dict(read_batch=0), "read_batch must be an int >= 1, got 0"),
            (dict(read_batch=True), "read_batch must be an int >= 1, got True"),
            (dict(layers="middle"), "layers must be 'up', 'all', 'down', 'mid' or None (model default), got 'middle'")]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=whole(message)):
            CSAConfig(**kwargs)
    assert CSAConfig(rate_by_scale={"32": "0.5", 16: 1}).rate_by_scale == ((16, 1.0), (32, 0.5))  # sorted, hashable
