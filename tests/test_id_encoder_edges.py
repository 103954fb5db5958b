"""PhotoMaker's ID encoder at its edges, where mutation testing found the other tests blind (docs/mutation.md): the
v1 preset's numbers, a checkpoint file that is not plain tensors (never unpickled), the loader's messages, and the
bounds of the delayed-conditioning switch."""
import dataclasses
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from matching import whole
from sdlite.id_encoder import (
    ID_ENCODER_CONFIG, ID_ENCODER_WEIGHTS, MLP, FuseModule, IDEncoder, IDEncoderConfig, delayed_conditioning_schedule,
    encode_id_prompts, fuse_id_embeddings, fuse_photomaker_lora, id_pixel_values, load_id_encoder,
    load_photomaker_id_encoder, lora_fingerprint, photomaker_tokenizers, save_id_encoder, save_photomaker_checkpoint,
    start_merge_step,
)


def test_the_v1_preset_is_clip_vit_l_14_with_sdxls_two_projections():
    config = IDEncoderConfig.photomaker_v1()
    assert config.vision == dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                 num_hidden_layers=24, image_size=224, patch_size=14)
    assert (config.projection_dim, config.projection_dim_2) == (768, 1280)


def test_a_checkpoint_file_with_objects_is_refused_unread(tmp_path):
    path = tmp_path / "photomaker.bin"
    torch.save({"id_encoder": {}, "lora_weights": {}, "note": Path("made elsewhere")}, path)  # not plain tensors
    with pytest.raises(pickle.UnpicklingError, match="weights_only"):
        load_photomaker_id_encoder(path, IDEncoderConfig.tiny())


def test_the_loaders_messages_name_what_it_found():
    with pytest.raises(ValueError, match=r"found \['a', 'b', 'c', 'd', 'e'\]$"):
        load_photomaker_id_encoder({k: 0 for k in "fedcba"})  # the first five keys, sorted
    with pytest.raises(ValueError, match="found list$"):
        load_photomaker_id_encoder([1, 2])
    state = IDEncoder(IDEncoderConfig.tiny()).state_dict()
    del state["visual_projection_2.weight"]
    with pytest.raises(ValueError, match=r"1 missing keys \['visual_projection_2.weight'\], 0 unexpected keys \[\]"):
        load_photomaker_id_encoder({"id_encoder": state, "lora_weights": {}}, IDEncoderConfig.tiny())


def test_start_merge_step_bounds():
    assert start_merge_step(1) == 0 and start_merge_step(10, 100) == 10 and start_merge_step(100, 100) == 30
    for bad in (100.5, -0.5):
        with pytest.raises(ValueError, match="is a percentage: use a value in \\[0, 100\\]"):
            start_merge_step(10, bad)
    with pytest.raises(ValueError, match="num_steps=0: need at least one denoising step"):
        start_merge_step(0)


# --- mutation survivors (tools/mutation.py id_encoder; docs/mutation.md) ---

def test_any_module_can_be_saved_in_the_v1_layout_and_one_without_lora_gets_none(tmp_path):
    module = torch.nn.Linear(2, 3)  # not an IDEncoder: no `lora_weights` attribute
    path = save_photomaker_checkpoint(module, tmp_path / "v1.bin")
    saved = torch.load(path, weights_only=True)
    assert sorted(saved) == ["id_encoder", "lora_weights"] and saved["lora_weights"] == {}
    assert sorted(saved["id_encoder"]) == ["bias", "weight"]


def test_delayed_conditioning_with_a_single_step():
    assert delayed_conditioning_schedule(1, 0) == [False]  # one step: the text-only prompt
    assert start_merge_step(1) == 0


def test_the_storyworld_preset_copies_the_towers_activation_and_norm_epsilon():
    clip_vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                       image_size=64, patch_size=8, hidden_act="gelu", layer_norm_eps=1e-6, dropout=0.1)
    config = IDEncoderConfig.storyworld(clip_vision, text_width=48)
    assert config.vision == {k: v for k, v in clip_vision.items() if k != "dropout"}  # the tower's shape, no more
    assert (config.projection_dim, config.projection_dim_2) == (48, 48)
    assert config.image_mean == config.image_std == (0.5, 0.5, 0.5)


def test_an_id_encoder_folder_is_made_with_its_parents_and_a_readable_config(tmp_path):
    encoder = IDEncoder(IDEncoderConfig.tiny())
    folder = save_id_encoder(encoder, tmp_path / "runs" / "new" / "id_encoder")  # parents made as needed
    text = (folder / "config.json").read_text()
    assert text == json.dumps(json.loads(text), indent=1) + "\n"  # one key per line, indented by one space
    assert json.loads(text)["projection_dim"] == 16
    loaded = load_id_encoder(folder)
    assert loaded.config == encoder.config


def test_the_tiny_preset_is_a_two_layer_tower_of_width_32():
    config = IDEncoderConfig.tiny()
    assert config.vision == dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                                 image_size=32, patch_size=8)
    assert (config.projection_dim, config.projection_dim_2) == (16, 16)
    assert IDEncoderConfig.tiny(8, 24, 64).vision["image_size"] == 64
    encoder = IDEncoder(config)
    assert encoder.vision_model.config.num_hidden_layers == 2 and encoder.vision_model.config.patch_size == 8


def test_the_photomaker_path_refuses_a_pipeline_with_one_tokenizer():
    from types import SimpleNamespace

    from sdlite.storyworld.models import build_storyworld_tokenizer

    one = SimpleNamespace(tokenizer=build_storyworld_tokenizer())  # an SD1.5-like pipeline: no tokenizer_2
    with pytest.raises(ValueError, match=whole("the PhotoMaker path needs an SDXL pipeline with two "
                                                 "tokenizers (tokenizer, tokenizer_2)")):
        photomaker_tokenizers(one)


def test_a_lora_fingerprint_is_16_hex_digits_that_follow_the_weights():
    lora = {"a.weight": torch.ones(2, 3), "b.weight": torch.zeros(4)}
    fingerprint = lora_fingerprint(lora)
    assert re.fullmatch("[0-9a-f]{16}", fingerprint) and lora_fingerprint(dict(reversed(lora.items()))) == fingerprint
    assert lora_fingerprint({**lora, "a.weight": torch.ones(2, 3) * 2}) != fingerprint
    assert lora_fingerprint({"a.weight": torch.ones(3, 2), "b.weight": torch.zeros(4)}) != fingerprint  # shape counts


def test_id_images_without_their_axis_are_refused_with_the_fix():
    encoder = IDEncoder(IDEncoderConfig.tiny())
    message = ("id_pixel_values must be (batch, num_id_images, 3, H, W), got (2, 3, 32, 32); add the num_id_images "
               "axis with .unsqueeze(1) for one image per prompt")
    with pytest.raises(ValueError, match=whole(message)):
        encoder.id_embeddings(torch.zeros(2, 3, 32, 32))


def test_the_default_style_strength_is_photomakers_20_percent():
    assert start_merge_step(50) == 10 and start_merge_step(50) == start_merge_step(50, 20.0)
    assert start_merge_step(100, max_step=100) == 20  # 21 % would give 21 here (and 10 at 50 steps too)


def test_photomaker_tokenizers_register_the_trigger_word_they_are_given():
    from types import SimpleNamespace

    from sdlite.storyworld.models import build_storyworld_tokenizer

    pipe = SimpleNamespace(tokenizer=build_storyworld_tokenizer(), tokenizer_2=build_storyworld_tokenizer())
    tokenizers = photomaker_tokenizers(pipe, trigger_word="zqx")
    assert all("zqx" in tok.get_added_vocab() for tok in tokenizers)
    assert "zqx" not in pipe.tokenizer.get_added_vocab()  # the pipeline's own tokenizers stay as they were
    again = photomaker_tokenizers(pipe, trigger_word="zqx")
    assert again[0] is tokenizers[0] and again[1] is tokenizers[1]  # copied once per tokenizer and trigger word
    other = photomaker_tokenizers(pipe, trigger_word="qqz")  # another trigger word: other copies, each knows its own
    assert all("qqz" in tok.get_added_vocab() and "zqx" not in tok.get_added_vocab() for tok in other)
    pipe.tokenizer_2 = build_storyworld_tokenizer()  # a tokenizer replaced: copied again, from the new one
    renewed = photomaker_tokenizers(pipe, trigger_word="zqx")
    assert renewed[0] is tokenizers[0] and renewed[1] is not tokenizers[1] and "zqx" in renewed[1].get_added_vocab()


def test_fusing_nothing_or_the_same_lora_again_reports_no_fusion():
    from types import SimpleNamespace

    lora = {"unet.a.to_q_lora.down.weight": torch.ones(2, 4)}
    assert fuse_photomaker_lora(SimpleNamespace(), {}) is False  # nothing to fuse: the pipeline is not touched
    already = SimpleNamespace(unet=SimpleNamespace(photomaker_lora=lora_fingerprint(lora)))
    assert fuse_photomaker_lora(already, dict(lora)) is False  # fused before: a no-op


class _LoraPipe:
    """Just what fuse_photomaker_lora calls on a pipeline: which adapters are loaded, and what diffusers does."""

    def __init__(self, adapters=(), error=None, reads=True):
        self.unet = type("UNet", (), {})()
        self.adapters, self.error, self.reads, self.calls = list(adapters), error, reads, []

    def get_list_adapters(self):
        return {"unet": list(self.adapters)} if self.adapters else {}

    def load_lora_weights(self, weights, adapter_name):
        self.calls.append("load")
        if self.error is not None:
            raise ValueError(self.error)
        if self.reads:
            self.adapters.append(adapter_name)

    def fuse_lora(self, adapter_names):
        self.calls.append(("fuse", tuple(adapter_names)))

    def unload_lora_weights(self):
        self.calls.append("unload")
        self.adapters.clear()


def test_fusing_a_photomaker_lora_refuses_each_case_with_its_fix():
    from types import SimpleNamespace

    lora = {"unet.c.to_q_lora.down.weight": torch.ones(2, 4), "unet.a.to_q_lora.up.weight": torch.ones(4, 2),
            "unet.b.to_k_lora.down.weight": torch.ones(2, 4)}
    other = SimpleNamespace(unet=SimpleNamespace(photomaker_lora="0123456789abcdef"))
    with pytest.raises(ValueError, match=whole("this pipeline's UNet has another PhotoMaker LoRA fused into it already: "
                                               "load the pipeline again (load_pipeline) before using a second checkpoint")):
        fuse_photomaker_lora(other, lora)
    with pytest.raises(ValueError, match=whole("SimpleNamespace cannot load a LoRA: PhotoMaker needs a "
                                               "StableDiffusionXLPipeline")):
        fuse_photomaker_lora(SimpleNamespace(unet=SimpleNamespace()), lora)
    styled = _LoraPipe(adapters=["style"])
    with pytest.raises(ValueError, match=whole("the pipeline has LoRA adapters loaded ({'unet': ['style']}): fuse_lora() "
                                               "and unload_lora_weights() them, or unload them, before PhotoMaker's "
                                               "LoRA is fused")):
        fuse_photomaker_lora(styled, lora)
    assert styled.calls == []  # refused before diffusers is asked anything
    unreadable = ("lora_weights hold no UNet LoRA that diffusers can read (first keys: ['unet.a.to_q_lora.up.weight', "
                  "'unet.b.to_k_lora.down.weight']): expected PhotoMaker v1's, e.g. 'unet.down_blocks.1.attentions.0."
                  "transformer_blocks.0.attn1.processor.to_q_lora.down.weight'")
    ignored = _LoraPipe(reads=False)  # diffusers loaded nothing for the UNet
    with pytest.raises(ValueError, match=whole(unreadable)):
        fuse_photomaker_lora(ignored, lora)
    assert ignored.calls == ["load", "unload"] and getattr(ignored.unet, "photomaker_lora", None) is None
    with pytest.raises(ValueError, match=whole(unreadable + "; diffusers says: bad keys")):
        fuse_photomaker_lora(_LoraPipe(error="bad keys"), lora)
    with pytest.raises(ValueError, match=whole("fusing PhotoMaker's LoRA needs the peft package: pip install peft")):
        fuse_photomaker_lora(_LoraPipe(error="PEFT backend is required for this method."), lora)
    good = _LoraPipe()
    assert fuse_photomaker_lora(good, lora) is True
    assert good.calls == ["load", ("fuse", ("photomaker",)), "unload"] and good.unet.photomaker_lora == lora_fingerprint(lora)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_id_prompts_are_encoded_on_the_text_encoders_device():
    from sdlite.storyworld.models import load_storyworld

    pipe = load_storyworld("cuda")
    embeds, pooled, mask = encode_id_prompts(pipe.text_encoder, pipe.text_encoder_2, photomaker_tokenizers(pipe),
                                             ["a girl img, walking in the park"], 1, "cuda")
    assert {t.device.type for t in (embeds, pooled, mask)} == {"cuda"} and int(mask.sum()) == 1


def test_fuse_and_projection_take_any_leading_axes():
    torch.manual_seed(0)
    fuse = FuseModule(8).eval()
    class_embeds, id_embeds = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    rows = torch.stack([fuse(class_embeds[b], id_embeds[b]) for b in range(2)])  # (M, D) at a time
    torch.testing.assert_close(fuse(class_embeds, id_embeds), rows)
    encoder = IDEncoder(IDEncoderConfig.tiny()).eval()
    pooled = torch.randn(2, 3, encoder.config.vision["hidden_size"])
    torch.testing.assert_close(encoder.project(pooled), torch.stack([encoder.project(p) for p in pooled]))


def test_id_images_go_to_the_encoders_dtype_or_the_device_asked():
    encoder = IDEncoder(IDEncoderConfig.tiny()).double()
    face = np.full((40, 30, 3), 90, np.uint8)
    pix = encoder.pixel_values([face])
    assert (pix.dtype, pix.device.type) == (torch.float64, "cpu")  # the encoder's own
    assert encoder.pixel_values([face], torch.device("meta")).device.type == "meta"  # where the caller says


def test_one_set_of_id_embeddings_and_one_mask_serve_every_prompt_of_a_batch():
    torch.manual_seed(0)
    fuse = FuseModule(8).eval()
    prompts, ids = torch.randn(3, 6, 8), torch.randn(2, 8)  # three prompts, two ID embeddings for all of them
    mask = torch.tensor([False, True, True, False, False, False])
    shared = fuse_id_embeddings(prompts, ids, mask, fuse)
    per_prompt = fuse_id_embeddings(prompts, ids.expand(3, 2, 8), mask.expand(3, 6), fuse)
    torch.testing.assert_close(shared, per_prompt)
    assert shared.shape == (3, 6, 8) and not torch.equal(shared[:, 1:3], prompts[:, 1:3])


@pytest.mark.parametrize("prompt_shape, ids_shape, mask, message", [
    ((10, 8), (1, 1, 8), torch.ones(10, dtype=torch.bool),
     "prompt_embeds must be (batch, length, dim), got shape (10, 8)"),
    ((1, 10, 8), (1, 1, 8), torch.ones(10), "class_tokens_mask must be a bool tensor, got torch.float32: use mask.bool()"),
    ((1, 10, 8), (1, 1, 8), torch.ones(9, dtype=torch.bool),
     "class_tokens_mask has shape (9,) but prompt_embeds is (1, 10, 8): the mask needs one entry per prompt token"),
    ((1, 10, 8), (1, 1, 6), torch.ones(10, dtype=torch.bool),
     "id_embeds has shape (1, 1, 6); expected (batch=1, num_id_images, dim=8) to match prompt_embeds"),
    ((1, 10, 8), (2, 1, 8), torch.ones(10, dtype=torch.bool),
     "id_embeds has shape (2, 1, 8); expected (batch=1, num_id_images, dim=8) to match prompt_embeds"),
    ((1, 10, 8), (1, 3, 8), torch.zeros(10, dtype=torch.bool),
     "class_tokens_mask marks [0] tokens per prompt for 3 ID embeddings: each prompt needs the same non-zero multiple "
     "of 3 (encode with encode_with_trigger(..., num_id_images=3))"),
])
def test_fusing_mismatched_embeddings_says_which_shape_is_wrong(prompt_shape, ids_shape, mask, message):
    with pytest.raises(ValueError, match=whole(message)):
        fuse_id_embeddings(torch.randn(prompt_shape), torch.randn(ids_shape), mask, FuseModule(8))


def test_a_checkpoint_file_is_read_as_photomaker_v1_and_a_missing_path_is_named(tmp_path, monkeypatch):
    import sdlite.id_encoder as id_encoder

    seen = []
    monkeypatch.setattr(id_encoder, "load_photomaker_id_encoder", lambda path: seen.append(path) or "v1 encoder")
    checkpoint = tmp_path / "photomaker-v1.bin"
    checkpoint.write_bytes(b"weights")
    assert id_encoder.load_id_encoder(checkpoint) == "v1 encoder" and seen == [checkpoint]
    with pytest.raises(FileNotFoundError, match=whole(
            f"no ID encoder at {tmp_path / 'nope'}: pass an ID encoder folder (with {id_encoder.ID_ENCODER_WEIGHTS}) "
            "or a PhotoMaker v1 checkpoint file (photomaker-v1.bin)")):
        id_encoder.load_id_encoder(tmp_path / "nope")


def test_id_embeddings_take_the_prompts_precision():
    torch.manual_seed(0)
    fuse = FuseModule(8).eval()
    prompts, mask = torch.randn(1, 4, 8), torch.tensor([0, 1, 0, 0]) > 0
    ids = torch.randn(1, 1, 8, dtype=torch.float64)
    out = fuse_id_embeddings(prompts, ids, mask, fuse)  # float64 ID embeddings, a float32 prompt and module
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fuse_id_embeddings(prompts, ids.float(), mask, fuse))


def test_a_broken_id_encoder_folder_is_named_with_the_fix(tmp_path):
    folder = save_id_encoder(IDEncoder(IDEncoderConfig.tiny()), tmp_path / "enc")
    (folder / ID_ENCODER_WEIGHTS).rename(tmp_path / "weights")
    with pytest.raises(FileNotFoundError, match=whole(
            f"{folder} is not an ID encoder folder: {ID_ENCODER_WEIGHTS} is missing (write one with "
            "sdlite.id_encoder.save_id_encoder)")):
        load_id_encoder(folder)
    (tmp_path / "weights").rename(folder / ID_ENCODER_WEIGHTS)
    (folder / ID_ENCODER_CONFIG).write_text('{"projection_dim": 8, "colour": "red"}')
    # the rest is Python's own TypeError message, which names the field
    with pytest.raises(ValueError, match=r"\A" + re.escape(f"{folder / ID_ENCODER_CONFIG} is not a valid IDEncoderConfig: ")
                       + r".*'colour'\Z"):
        load_id_encoder(folder)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_checkpoint_saved_from_a_gpu_loads_onto_the_cpu(tmp_path):
    encoder = IDEncoder(IDEncoderConfig.tiny()).to("cuda")
    path = save_photomaker_checkpoint(encoder, tmp_path / "photomaker.bin",
                                      lora_weights={"unet.a.to_q_lora.down.weight": torch.ones(2, 4, device="cuda")})
    loaded = load_photomaker_id_encoder(path, IDEncoderConfig.tiny())
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    assert {t.device.type for t in loaded.lora_weights.values()} == {"cpu"}


def test_every_checkpoint_refusal_is_one_whole_message(tmp_path):
    tiny = IDEncoderConfig.tiny()
    state = IDEncoder(tiny).state_dict()
    with pytest.raises(FileNotFoundError, match=whole(
            f"no checkpoint file at {tmp_path / 'nope.bin'}: download photomaker-v1.bin or pass its path")):
        load_photomaker_id_encoder(tmp_path / "nope.bin", tiny)
    v2 = {**state, "qformer_perceiver.token_proj.0.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=whole(
            "this is a PhotoMaker v2 checkpoint (its ID encoder has a qformer_perceiver): v2 also needs face-recognition "
            "embeddings of every ID photo (InsightFace's ArcFace model, a separate download), which cannot be computed "
            "offline here; sdlite runs PhotoMaker v1: use photomaker-v1.bin")):
        load_photomaker_id_encoder({"id_encoder": v2, "lora_weights": {}}, tiny)
    for lora in ([torch.zeros(2)], {"a.weight": [1.0]}, {3: torch.zeros(2)}):
        with pytest.raises(ValueError, match=whole(
                "the checkpoint's lora_weights must be a dict of name -> tensor (PhotoMaker v1: the UNet LoRA in "
                "diffusers' format); pass {} when there is none")):
            load_photomaker_id_encoder({"id_encoder": state, "lora_weights": lora}, tiny)
    name = "visual_projection_2.weight"
    wrong = {**state, name: torch.zeros(3, 3)}
    with pytest.raises(ValueError, match=whole(
            f"shape mismatch for {name}: checkpoint (3, 3) vs model {tuple(state[name].shape)}; pass the IDEncoderConfig "
            "the checkpoint was made with")):
        load_photomaker_id_encoder({"id_encoder": wrong, "lora_weights": {}}, tiny)
    extra = {**state, "a.weight": torch.zeros(1), "b.weight": torch.zeros(1), "c.weight": torch.zeros(1),
             "d.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=whole(
            "the id_encoder state dict does not fit this IDEncoderConfig: 0 missing keys [], 4 unexpected keys "
            "['a.weight', 'b.weight', 'c.weight']; is it a PhotoMaker v1 checkpoint (v2 has another ID encoder)?")):
        load_photomaker_id_encoder({"id_encoder": extra, "lora_weights": {}}, tiny)
    gone = sorted(state)[:4]  # 4 keys missing: the first 3 named
    few = {k: v for k, v in state.items() if k not in gone}
    with pytest.raises(ValueError, match=whole(
            f"the id_encoder state dict does not fit this IDEncoderConfig: 4 missing keys {gone[:3]}, 0 unexpected keys "
            "[]; is it a PhotoMaker v1 checkpoint (v2 has another ID encoder)?")):
        load_photomaker_id_encoder({"id_encoder": few, "lora_weights": {}}, tiny)
    loaded = load_photomaker_id_encoder({"id_encoder": state, "lora_weights": None}, tiny)  # None: no LoRA
    assert loaded.lora_weights == {}


def test_id_photos_and_their_size_are_checked_with_the_fix():
    face = np.full((6, 4, 3), 255, np.uint8)
    assert id_pixel_values([face], 1).shape == (1, 3, 1, 1)  # the smallest size
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=whole(
                f"size={bad!r} must be a positive int (the ID encoder's image_size, 224 for PhotoMaker v1)")):
            id_pixel_values([face], bad)
    for bad in ([], (), face, None):
        with pytest.raises(ValueError, match=whole(
                "images must be a non-empty list of ID photos (PIL images or uint8 H x W x 3 arrays)")):
            id_pixel_values(bad, 4)


def test_id_pixel_values_are_float32_whatever_torchs_default_dtype():
    face = np.full((6, 4, 3), 120, np.uint8)
    expected = id_pixel_values([face], 4)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # a notebook that switched torch to double precision
    try:
        pix = id_pixel_values([face], 4)
    finally:
        torch.set_default_dtype(before)
    assert pix.dtype == torch.float32 and torch.equal(pix, expected)


def test_id_photos_in_any_pillow_mode_or_integer_array_read_as_their_rgb():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (12, 8, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (12, 8), dtype=np.uint8)
    palette = Image.fromarray(rgb).quantize(colors=16)  # a "P" picture: its pixels are indices into the palette
    for photo, as_rgb in [(rgb.astype(np.int64), rgb),  # np.full / np.array of ints give int64
                          (gray, np.stack([gray] * 3, axis=-1)),
                          (Image.fromarray(rgb).convert("RGBA"), rgb),
                          (palette, np.asarray(palette.convert("RGB")))]:
        torch.testing.assert_close(id_pixel_values([photo], 6), id_pixel_values([as_rgb], 6), rtol=0, atol=0)


def test_an_odd_margin_is_cropped_from_its_whole_pixel_start():
    rng = np.random.default_rng(1)
    for shape, box in [((12, 8, 3), (0, 1, 6, 7)), ((8, 12, 3), (1, 0, 7, 6))]:  # portrait and landscape
        photo = rng.integers(0, 256, shape, dtype=np.uint8)
        long_side = (6, 9) if shape[0] > shape[1] else (9, 6)  # shorter side 8 -> 6, longer 12 -> 9: 3 px to share
        crop = np.asarray(Image.fromarray(photo).resize(long_side, Image.BICUBIC).crop(box), np.float32) / 255
        expected = (torch.from_numpy(crop).permute(2, 0, 1) - 0.5) / 0.5  # 1 px cut before, 2 after
        torch.testing.assert_close(id_pixel_values([photo], 6, mean=(0.5,) * 3, std=(0.5,) * 3)[0], expected)


def test_an_id_encoder_config_is_checked_field_by_field():
    ok = IDEncoderConfig.tiny()
    for name in ("projection_dim", "projection_dim_2"):
        assert getattr(dataclasses.replace(ok, **{name: 1}), name) == 1  # the smallest
        for bad in (0, -3, True, 8.0):
            with pytest.raises(ValueError, match=whole(f"{name}={bad!r} must be a positive int (SDXL: 768 and 1280)")):
                dataclasses.replace(ok, **{name: bad})
    with pytest.raises(TypeError, match=whole("vision must be a dict of CLIPVisionConfig arguments, got list")):
        dataclasses.replace(ok, vision=[1024])
    for name, bad in [("image_mean", (0.5, 0.5)), ("image_mean", (0.5, "a", 0.5)), ("image_std", (0.5, 0.0, 0.5)),
                      ("image_std", (0.5, -1, 0.5))]:
        with pytest.raises(ValueError, match=whole(f"{name}={bad!r} must be 3 numbers (one per RGB channel; std > 0)")):
            dataclasses.replace(ok, **{name: bad})
    config = dataclasses.replace(ok, image_mean=[0, 1, 0], image_std=(1, 2, 3))
    assert config.image_mean == (0.0, 1.0, 0.0) and config.image_std == (1.0, 2.0, 3.0)  # floats, a tuple
    assert all(type(v) is float for v in config.image_mean + config.image_std)
    assert dataclasses.replace(ok, image_mean=(-1, 0, 0.25)).image_mean == (-1.0, 0.0, 0.25)  # any mean


def test_an_mlp_is_residual_unless_told_and_says_when_it_cannot_be():
    torch.manual_seed(0)
    mlp = MLP(4, 4, 8).eval()  # PhotoMaker's default: residual
    x = torch.randn(3, 4)
    torch.testing.assert_close(mlp(x), mlp.fc2(mlp.act_fn(mlp.fc1(mlp.layernorm(x)))) + x)
    assert MLP(4, 6, 8, use_residual=False)(x).shape == (3, 6)
    with pytest.raises(ValueError, match=whole("a residual MLP needs in_dim == out_dim, got 4 and 6")):
        MLP(4, 6, 8)
