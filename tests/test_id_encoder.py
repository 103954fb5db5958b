"""ID encoder, FuseModule, PhotoMaker v1 checkpoint loading, delayed conditioning."""
import pytest
import torch
from torch import nn

from sdlite.id_encoder import (
    FuseModule,
    IDEncoder,
    IDEncoderConfig,
    delayed_conditioning_schedule,
    fuse_id_embeddings,
    load_photomaker_id_encoder,
    save_photomaker_checkpoint,
    start_merge_step,
)


def manual_fuse(fm: FuseModule, c: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """The FuseModule written out with functional ops and the module's own weights."""
    def mlp(m, x, residual):
        h = nn.functional.layer_norm(x, x.shape[-1:], m.layernorm.weight, m.layernorm.bias)
        h = nn.functional.linear(h, m.fc1.weight, m.fc1.bias)
        h = nn.functional.gelu(h)
        h = nn.functional.linear(h, m.fc2.weight, m.fc2.bias)
        return h + x if residual else h
    x = mlp(fm.mlp1, torch.cat([c, i], -1), False) + c
    x = mlp(fm.mlp2, x, True)
    return nn.functional.layer_norm(x, x.shape[-1:], fm.layer_norm.weight, fm.layer_norm.bias)


def test_fuse_module_matches_manual():
    torch.manual_seed(0)
    fm = FuseModule(24)
    for p in fm.parameters():  # non-trivial LayerNorm weights too
        nn.init.normal_(p, std=0.3)
    c, i = torch.randn(5, 24), torch.randn(5, 24)
    torch.testing.assert_close(fm(c, i), manual_fuse(fm, c, i))
    assert {k.split(".")[0] for k in fm.state_dict()} == {"mlp1", "mlp2", "layer_norm"}
    assert fm.mlp1.fc1.in_features == 48 and fm.mlp2.use_residual and not fm.mlp1.use_residual


def test_photomaker_v1_sizes():
    fm = FuseModule(2048)
    assert fm.mlp1.fc1.weight.shape == (2048, 4096)
    assert IDEncoderConfig.photomaker_v1().embed_dim == 2048


def test_fuse_replaces_only_masked_positions():
    torch.manual_seed(1)
    B, L, D, n = 2, 10, 8, 3
    fm = FuseModule(D)
    prompt = torch.randn(B, L, D)
    ids = torch.randn(B, n, D)
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[1, 4:7] = True
    out = fuse_id_embeddings(prompt, ids, mask, fm)
    assert out.shape == prompt.shape
    torch.testing.assert_close(out[~mask], prompt[~mask])  # unmasked tokens untouched
    torch.testing.assert_close(out[0, 3], manual_fuse(fm, prompt[0, 3], ids[0, 1]))  # j-th class token <- j-th image
    torch.testing.assert_close(out[1, 6], manual_fuse(fm, prompt[1, 6], ids[1, 2]))
    assert not torch.equal(out[mask], prompt[mask])
    assert prompt.data_ptr() != out.data_ptr()


def test_fuse_k_tokens_per_image_repeats_each_embedding():
    torch.manual_seed(2)
    fm = FuseModule(8)
    prompt, ids = torch.randn(1, 12, 8), torch.randn(1, 2, 8)
    mask = torch.zeros(12, dtype=torch.bool)
    mask[3:7] = True  # 2 images x 2 tokens
    out = fuse_id_embeddings(prompt, ids, mask, fm)
    torch.testing.assert_close(out[0, 4], manual_fuse(fm, prompt[0, 4], ids[0, 0]))
    torch.testing.assert_close(out[0, 5], manual_fuse(fm, prompt[0, 5], ids[0, 1]))


@pytest.mark.parametrize(
    "prompt_shape, ids_shape, mask, message",
    [
        ((10, 8), (1, 1, 8), torch.ones(10, dtype=torch.bool), "must be \\(batch, length, dim\\)"),
        ((1, 10, 8), (1, 1, 8), torch.ones(10), "must be a bool tensor"),
        ((1, 10, 8), (1, 1, 8), torch.ones(9, dtype=torch.bool), "one entry per prompt token"),
        ((1, 10, 8), (1, 1, 6), torch.ones(10, dtype=torch.bool), "expected \\(batch=1, num_id_images, dim=8\\)"),
        ((1, 10, 8), (1, 3, 8), torch.zeros(10, dtype=torch.bool), "non-zero multiple of 3"),
    ],
)
def test_fuse_bad_input(prompt_shape, ids_shape, mask, message):
    with pytest.raises(ValueError, match=message):
        fuse_id_embeddings(torch.randn(prompt_shape), torch.randn(ids_shape), mask, FuseModule(8))


def test_fuse_dim_mismatch():
    with pytest.raises(ValueError, match="fuse_module works on dim 16"):
        fuse_id_embeddings(torch.randn(1, 4, 8), torch.randn(1, 1, 8), torch.ones(4, dtype=torch.bool), FuseModule(16))


def test_id_encoder_end_to_end_and_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(3)
    cfg = IDEncoderConfig.tiny()
    enc = IDEncoder(cfg).eval()
    pixels = torch.randn(2, 3, 3, 32, 32)  # 2 prompts x 3 ID images
    emb = enc.id_embeddings(pixels)
    assert emb.shape == (2, 3, 32)
    prompt = torch.randn(2, 77, 32)
    mask = torch.zeros(77, dtype=torch.bool)
    mask[2:5] = True
    out = enc(pixels, prompt, mask)
    path = save_photomaker_checkpoint(enc, tmp_path / "photomaker-tiny.bin")
    ckpt = torch.load(path, weights_only=True)
    assert set(ckpt) == {"id_encoder", "lora_weights"}
    assert "visual_projection_2.weight" in ckpt["id_encoder"] and "fuse_module.mlp1.fc1.weight" in ckpt["id_encoder"]
    loaded = load_photomaker_id_encoder(path, cfg).eval()
    torch.testing.assert_close(loaded(pixels, prompt, mask), out, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_photomaker_checkpoint(enc, path)


def test_loader_errors(tmp_path):
    cfg = IDEncoderConfig.tiny()
    state = IDEncoder(cfg).state_dict()
    with pytest.raises(ValueError, match="not a PhotoMaker checkpoint"):
        load_photomaker_id_encoder({"state_dict": state}, cfg)
    bad = dict(state)
    bad.pop("visual_projection_2.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="1 missing keys.*visual_projection_2.*1 unexpected keys.*extra"):
        load_photomaker_id_encoder({"id_encoder": bad, "lora_weights": {}}, cfg)
    wrong = dict(state)
    wrong["visual_projection_2.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="shape mismatch for visual_projection_2.weight"):
        load_photomaker_id_encoder({"id_encoder": wrong, "lora_weights": {}}, cfg)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_photomaker_id_encoder(tmp_path / "missing.bin", cfg)
    with pytest.raises(ValueError, match="id_pixel_values must be"):
        IDEncoder(cfg).id_embeddings(torch.randn(2, 3, 32, 32))


def test_delayed_conditioning():
    assert start_merge_step(50, 20) == 10
    assert start_merge_step(200, 20) == 30  # capped as in PhotoMaker
    # PhotoMaker's pipeline: the text-only prompt while step <= start_merge_step
    sched = delayed_conditioning_schedule(6, 2)
    assert sched == [False, False, False, True, True, True]
    assert delayed_conditioning_schedule(4, 0) == [False, True, True, True]  # always one text-only step
    assert not any(delayed_conditioning_schedule(4, 3)) and not any(delayed_conditioning_schedule(4, 9))
    with pytest.raises(ValueError, match="percentage"):
        start_merge_step(10, 150)
    with pytest.raises(ValueError, match="at least one denoising step"):
        delayed_conditioning_schedule(0, 0)
    with pytest.raises(ValueError, match="merge_step=-1"):
        delayed_conditioning_schedule(5, -1)
