"""storyworld's models: tokenizer, configs, pipeline assembly, and the shipped pipeline (offline)."""
import os

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from sdlite import storyworld as sw
from sdlite.storyworld.models import (
    FUNCTION_WORDS, LATENT_SIZE, TEXT_LENGTH, TRIGGER_WORD, StoryworldSizes, assemble_pipeline, build_clip,
    build_storyworld_tokenizer, build_unet, build_vae, load_storyworld, load_storyworld_clip, save_pipeline,
    ABLATION_UNETS, ablation_unet_dir, storyworld_dir, storyworld_tokenizers, text_encoders_from_clip, unet_config,
)


@pytest.fixture(scope="module")
def tokenizers():
    return storyworld_tokenizers()


@pytest.fixture(scope="module")
def tiny_pipe(tokenizers):
    sizes = StoryworldSizes.named("tiny")
    tok = tokenizers[0]
    clip = build_clip(sizes, tok, seed=1)
    return assemble_pipeline(build_vae(sizes, seed=2), clip, build_unet(sizes, seed=3), tok), clip


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_is_small_and_round_trips(tokenizers):
    tok, _ = tokenizers
    assert isinstance(tok, CLIPTokenizer)
    assert len(tok) < 400  # CLIP's has 49408
    text = "a girl with blonde hair, a red shirt and grey trousers, wearing a top hat, waving on the beach"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text.replace(",", " ,")  # CLIP decodes "," as a word


def test_every_storyworld_word_is_one_token(tokenizers):
    tok, _ = tokenizers
    for word in list(sw.all_words()) + list(FUNCTION_WORDS) + [TRIGGER_WORD]:
        pieces = tok.tokenize(word)
        assert len(pieces) == 1, (word, pieces)
        assert tok.convert_tokens_to_ids(pieces[0]) != tok.unk_token_id, word


def test_trigger_word_is_one_special_token(tokenizers):
    tok, _ = tokenizers
    pieces = tok.tokenize("a man img walking in the park")
    assert pieces.count("img") == 1 and len(pieces) == 7
    assert TRIGGER_WORD in tok.get_added_vocab()


def test_second_tokenizer_pads_with_exclamation_mark(tokenizers):
    tok, tok2 = tokenizers
    ids1 = tok("a boy", padding="max_length").input_ids
    ids2 = tok2("a boy", padding="max_length").input_ids
    assert len(ids1) == len(ids2) == TEXT_LENGTH
    assert ids1[:4] == ids2[:4]
    assert ids2[-1] == 0 and tok2.convert_ids_to_tokens(0) == "!"
    assert ids1[-1] == tok.eos_token_id


def test_tokenizer_rejects_bad_words():
    with pytest.raises(ValueError, match="plain a-z words"):
        build_storyworld_tokenizer(["boy", "naïve"])
    with pytest.raises(ValueError, match="pad_token"):
        build_storyworld_tokenizer(["boy"], pad_token="<pad>")


def test_unknown_word_becomes_unknown_tokens(tokenizers):
    tok, _ = tokenizers
    ids = tok("a boy 7").input_ids
    assert tok.unk_token_id in ids  # digits are not in the storyworld vocabulary


# ---------------------------------------------------------------- configs
def test_sizes_by_name():
    base, tiny = StoryworldSizes.named("base"), StoryworldSizes.named("tiny")
    assert base.unet_channels == (32, 64, 64) and tiny.unet_channels < base.unet_channels
    with pytest.raises(ValueError, match="'base'"):
        StoryworldSizes.named("huge")


def test_unet_config_is_sdxl_style():
    sizes = StoryworldSizes.named("base")
    cfg = unet_config(sizes)
    assert cfg["addition_embed_type"] == "text_time"
    assert cfg["cross_attention_dim"] == 2 * sizes.text_hidden  # two text encoders, concatenated
    assert cfg["down_block_types"][0] == "CrossAttnDownBlock2D"  # attention at the highest resolution
    assert cfg["projection_class_embeddings_input_dim"] == 6 * sizes.time_embed_dim + sizes.projection_dim


def test_models_build_with_the_right_shapes(tokenizers):
    sizes = StoryworldSizes.named("tiny")
    vae = build_vae(sizes)
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 3, 64, 64)).latent_dist.mean
    assert z.shape == (2, 4, LATENT_SIZE, LATENT_SIZE)
    clip = build_clip(sizes, tokenizers[0])
    assert clip.config.text_config.vocab_size == len(tokenizers[0])
    te1, te2 = text_encoders_from_clip(clip)
    ids = tokenizers[0](["a boy"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        full = clip.get_text_features(input_ids=ids)
        full = getattr(full, "pooler_output", full)
        torch.testing.assert_close(te2(ids).text_embeds, full)
        torch.testing.assert_close(te1(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)


def test_build_is_seeded_and_leaves_global_rng_alone():
    sizes = StoryworldSizes.named("tiny")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_unet(sizes, seed=5)
    after = torch.rand(1)
    b = build_unet(sizes, seed=5)
    assert torch.equal(before, after)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="seed"):
        build_vae(sizes, seed="0")


def test_pipeline_round_trips_through_a_folder(tiny_pipe, tmp_path):
    pipe, clip = tiny_pipe
    save_pipeline(pipe, clip, tmp_path / "p")
    loaded = load_storyworld(folder=tmp_path / "p")
    kw = dict(prompt="a boy walking in the park", num_inference_steps=2, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_allclose(a, b, atol=1e-5)
    clip2, tok = load_storyworld_clip(folder=tmp_path / "p")
    assert len(tok) == clip2.config.text_config.vocab_size


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m sdlite.train"):
        load_storyworld(folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_storyworld(unet=tmp_path)
    with pytest.raises(ValueError, match="one of"):
        ablation_unet_dir("no_attention")
    with pytest.raises(FileNotFoundError, match="--stage clip"):
        load_storyworld_clip(folder=tmp_path)


# ---------------------------------------------------------------- the shipped pipeline
def test_shipped_pipeline_loads_offline_and_is_deterministic(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert (storyworld_dir() / "model_index.json").is_file(), "data/storyworld must be committed"
    pipe = load_storyworld()
    assert pipe.unet.dtype == torch.float32
    kw = dict(prompt=["a girl with red hair, a blue shirt and black trousers, wearing a cap, standing in the snow"],
              num_inference_steps=3, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(7), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(7), **kw).images
    c = pipe(generator=torch.Generator().manual_seed(8), **kw).images
    assert a.shape == (1, 64, 64, 3) and 0.0 <= a.min() and a.max() <= 1.0
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 0.05
    clip, tok = load_storyworld_clip()
    assert clip.config.vision_config.image_size == 64


def test_the_collage_ablation_unets_ship_and_swap_into_the_pipeline():
    shipped = load_storyworld()
    for name in ABLATION_UNETS:
        assert (ablation_unet_dir(name) / "config.json").is_file(), f"data/storyworld_ablation/{name} must be committed"
        pipe = load_storyworld(unet=ablation_unet_dir(name))
        public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731 (not the path)
        assert public(pipe.unet.config) == public(shipped.unet.config)  # same architecture ...
        w, w0 = pipe.unet.conv_in.weight, shipped.unet.conv_in.weight
        assert w.dtype == torch.float32 and not torch.equal(w, w0)  # ... other weights
        torch.testing.assert_close(pipe.vae.decoder.conv_out.weight, shipped.vae.decoder.conv_out.weight)
