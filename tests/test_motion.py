"""The semantic motion predictor (sdlite.motion) and the video decoder's shapes, real-scale configs and CLI."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from matching import whole
from sdlite import motion, video
from sdlite import storyworld as sw
from sdlite.cli import main as sdlite_main
from sdlite.cli.train import main as train_main
from sdlite.eval import transitions
from sdlite.eval import video_metrics as vm
from sdlite.motion import (
    PAPER_SIZE, ImageEmbedder, SemanticMotionPredictor, frame_fractions, linear_interpolation, predictor_errors,
)
from sdlite.storyworld.models import (
    StoryworldSizes, build_clip, build_scheduler, build_storyworld_tokenizer, build_vae, load_storyworld_clip,
)
from sdlite.train import motion as train_motion
from sdlite.train import video as train_video
from sdlite.train.motion import build_cache, load_cache, train_predictor
from sdlite.video import VideoDecoder, VideoModels, build_decoder, video_unet_config

E = 32  # tiny CLIP projection width



@pytest.fixture(scope="module")
def tiny_clip():
    sizes = StoryworldSizes.named("tiny")
    tok = build_storyworld_tokenizer()
    return build_clip(sizes, tok, seed=1).eval(), tok


@pytest.fixture(scope="module")
def tiny_models(tiny_clip):
    clip, tok = tiny_clip
    vae = build_vae(StoryworldSizes.named("tiny"), seed=2).eval()
    torch.manual_seed(0)
    pred = SemanticMotionPredictor(embed_dim=E, hidden_size=32, num_layers=1, num_heads=2, head_dim=16).eval()
    dec = build_decoder("tiny", image_embed_dim=E, cross_attention_dim=clip.config.text_config.hidden_size, seed=3)
    _randomize_conv_out(dec)  # as if trained: an untrained residual decoder outputs exactly 0
    return VideoModels(vae=vae, embedder=ImageEmbedder(clip), text_model=clip.text_model, tokenizer=tok,
                       predictor=pred, decoder=dec.eval(), scheduler=build_scheduler())


def _randomize_conv_out(dec, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.unet.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dec


def _randomize_output(pred, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pred.proj_out.weight.copy_(torch.randn(pred.proj_out.weight.shape, generator=g) * 0.1)
        pred.proj_out.bias.copy_(torch.randn(pred.proj_out.bias.shape, generator=g) * 0.1)
    return pred


# ---------------------------------------------------------------- interpolation
def test_linear_interpolation_hits_both_ends_and_the_middle():
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    e = linear_interpolation(a, b, 5)  # (3, 5, 8)
    assert e.shape == (3, 5, 8)
    torch.testing.assert_close(e[:, 0], a)
    torch.testing.assert_close(e[:, -1], b)
    torch.testing.assert_close(e[:, 2], (a + b) / 2)
    torch.testing.assert_close(e[:, 1], 0.75 * a + 0.25 * b)


def test_linear_interpolation_of_latents_keeps_the_frame_axis_second():
    a, b = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    z = linear_interpolation(a, b, 4)
    assert z.shape == (2, 4, 4, 6, 6)
    torch.testing.assert_close(z[:, 0], a)
    torch.testing.assert_close(z[:, 3], b)
    torch.testing.assert_close(z[:, 1], (2 * a + b) / 3)


def test_interpolation_bad_input():
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_fractions(1)
    with pytest.raises(ValueError, match="same shape"):
        linear_interpolation(torch.zeros(2, 8), torch.zeros(2, 7), 4)
    assert frame_fractions(3).tolist() == [0.0, 0.5, 1.0]


# ---------------------------------------------------------------- the predictor
def test_untrained_predictor_is_linear_interpolation():
    torch.manual_seed(0)
    pred = SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=2, num_heads=2, head_dim=16)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    torch.testing.assert_close(pred(a, b, 7), linear_interpolation(a, b, 7))


@pytest.mark.parametrize("frames", [3, 16, 24])
def test_predictor_shapes_and_pinned_keyframes(frames):
    torch.manual_seed(0)
    pred = _randomize_output(SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=2, num_heads=2,
                                                     head_dim=16))
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    out = pred(a, b, frames)
    assert out.shape == (2, frames, 16)
    torch.testing.assert_close(out[:, 0], a)
    torch.testing.assert_close(out[:, -1], b)
    assert (out[:, 1:-1] - linear_interpolation(a, b, frames)[:, 1:-1]).abs().max() > 1e-3


def test_predictor_without_pinning_moves_the_keyframes_too():
    torch.manual_seed(0)
    pred = _randomize_output(SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=1, num_heads=2,
                                                     head_dim=16, pin_endpoints=False))
    a, b = torch.randn(2, 16), torch.randn(2, 16)
    assert (pred(a, b, 5)[:, 0] - a).abs().max() > 1e-3


def test_predictor_frames_attend_to_each_other():
    """Frame 1's prediction must depend on where the *end* keyframe is beyond what interpolation says: the
    transformer mixes frames (a per-frame MLP would not change frame 1's correction when only b moves at t=1/4)."""
    torch.manual_seed(0)
    pred = _randomize_output(SemanticMotionPredictor(embed_dim=8, hidden_size=32, num_layers=1, num_heads=2,
                                                     head_dim=16))
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    b2 = b + torch.randn(1, 8)
    d1 = pred(a, b, 5) - linear_interpolation(a, b, 5)
    d2 = pred(a, b2, 5) - linear_interpolation(a, b2, 5)
    assert (d1[:, 1] - d2[:, 1]).abs().max() > 1e-4


def test_predictor_bad_input():
    pred = SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=1, num_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="embed the keyframes"):
        pred(torch.zeros(2, 8), torch.zeros(2, 8), 4)
    with pytest.raises(ValueError, match="at least 2 frames"):
        pred(torch.zeros(2, 16), torch.zeros(2, 16), 1)
    with pytest.raises(ValueError, match="positive int"):
        SemanticMotionPredictor(num_layers=0)


def test_paper_size_predictor():
    with torch.device("meta"):
        pred = SemanticMotionPredictor(**PAPER_SIZE)
    assert len(pred.blocks) == 8
    assert pred.blocks[0].attn1.heads == 12
    assert pred.proj_in.out_features == 1024
    n = sum(p.numel() for p in pred.parameters())
    assert 80e6 < n < 120e6, n  # 8 x (attention 4 x 1024 x 768 + MLP 2 x 1024 x 4096) + projections


def test_predictor_round_trips_through_a_folder(tmp_path):
    torch.manual_seed(0)
    pred = _randomize_output(SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=2, num_heads=2,
                                                     head_dim=16))
    pred.save_pretrained(tmp_path / "predictor")
    again = SemanticMotionPredictor.storyworld(tmp_path / "predictor")
    a, b = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(again(a, b, 9), pred.eval()(a, b, 9), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="python -m sdlite.train motion-predictor"):
        SemanticMotionPredictor.storyworld(tmp_path / "nothing")


# ---------------------------------------------------------------- CLIP image space
def test_storyworld_embedder_shapes_and_bad_input(tiny_clip):
    clip, _ = tiny_clip
    emb = ImageEmbedder(clip)
    x = torch.rand(5, 3, 64, 64) * 2 - 1
    e = emb(x)
    assert e.shape == (5, E)
    ref = clip.visual_projection(clip.vision_model(pixel_values=x).pooler_output)
    torch.testing.assert_close(e, ref)
    torch.testing.assert_close(emb(x, batch_size=2), e)  # batching does not change anything
    assert emb(torch.rand(2, 3, 32, 32)).shape == (2, E)  # resized to the tower's size
    with pytest.raises(ValueError, match="to_tensor"):
        emb(torch.zeros(2, 64, 64, 3))
    with pytest.raises(TypeError, match="CLIPModel"):
        ImageEmbedder(torch.nn.Linear(2, 2))


def test_real_scale_clip_vision_tower_from_a_folder(tmp_path):
    """The real path: a CLIPVisionModelWithProjection at 224 px / patch 14 (ViT-H-14's geometry, tiny widths)
    saved to a folder and loaded back with OpenAI's pixel normalisation."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=14, projection_dim=24)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(cfg).save_pretrained(tmp_path / "vit")
    emb = ImageEmbedder.from_pretrained(tmp_path / "vit")
    assert emb.image_size == 224 and emb.embed_dim == 24
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    e = emb(x)
    assert e.shape == (2, 24)
    manual = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", align_corners=False)
    mean = torch.tensor(motion.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(motion.CLIP_STD).view(1, 3, 1, 1)
    ref = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "vit")(pixel_values=((manual + 1) / 2 - mean) / std)
    torch.testing.assert_close(e, ref.image_embeds)
    pred = SemanticMotionPredictor(embed_dim=24, hidden_size=48, num_layers=2, num_heads=3, head_dim=16)
    assert motion.predict_frame_embeddings(emb, pred, x[:1], x[1:], 16).shape == (1, 16, 24)


# ---------------------------------------------------------------- training
def _curved_embeddings(n, frames=8, d=8, seed=0):
    """Trajectories that are NOT straight lines: e(t) = (1-t) a + t b + sin(pi t) W(b - a)."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w = torch.randn(d, d, generator=torch.Generator().manual_seed(123)) / math.sqrt(d)
    t = torch.linspace(0, 1, frames).view(1, -1, 1)
    return (1 - t) * a[:, None] + t * b[:, None] + torch.sin(math.pi * t) * ((b - a) @ w)[:, None]


def _small_predictor(seed=0):
    torch.manual_seed(seed)
    return SemanticMotionPredictor(embed_dim=8, hidden_size=32, num_layers=1, num_heads=2, head_dim=16)


def test_training_learns_a_curved_motion_better_than_interpolation():
    data, val = _curved_embeddings(512), _curved_embeddings(128, seed=1)
    before = predictor_errors(_small_predictor(), val)
    assert before["ratio"] == pytest.approx(1.0)
    model, hist = train_predictor(data, _small_predictor(), steps=150, batch_size=64, lr=3e-3, seed=0, warmup=10,
                                  log_every=50)
    after = predictor_errors(model, val)
    assert after["ratio"] < 0.5, after
    assert hist["loss"][-1] < hist["loss"][0]
    assert after["mse_linear"] == pytest.approx(before["mse_linear"])


def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    data = _curved_embeddings(64)
    kw = dict(steps=8, batch_size=8, seed=3, warmup=2, log_every=2)
    m1, h1 = train_predictor(data, _small_predictor(), **kw)
    m2, _ = train_predictor(data, _small_predictor(), **kw)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(m2.state_dict()[k], v, rtol=0, atol=0, msg=k)
    m3, _ = train_predictor(data, _small_predictor(), **{**kw, "seed": 4})
    assert not torch.equal(m3.proj_out.weight, m1.proj_out.weight)
    # stopped after 4 steps (checkpoint), resumed to 8: the same weights as the uninterrupted run
    _, part = train_predictor(data, _small_predictor(), out=tmp_path / "run", stop_at=4, **kw)
    assert part["step"][-1] == 4
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["step"] == 4
    resumed, h2 = train_predictor(data, _small_predictor(), out=tmp_path / "run", resume=True, **kw)
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, msg=k)
    assert h2["loss"] == pytest.approx(h1["loss"])
    with pytest.raises(FileExistsError, match="resume"):
        train_predictor(data, _small_predictor(), out=tmp_path / "run", **kw)


def test_training_bad_input():
    with pytest.raises(ValueError, match="load_cache"):
        train_predictor(torch.zeros(4, 8))
    with pytest.raises(ValueError, match="embed_dim"):
        train_predictor(torch.zeros(4, 5, 8), SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=1,
                                                                       num_heads=2, head_dim=16), steps=1)
    with pytest.raises(ValueError, match="seed"):
        train_predictor(torch.zeros(4, 5, 8), seed=1.5)


# ---------------------------------------------------------------- the clip cache
def test_grid_embedder_appends_cell_embeddings_to_the_pooled_one(tiny_clip):
    clip, _ = tiny_clip
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    plain, grid = ImageEmbedder(clip), ImageEmbedder(clip, grid=2)
    e = grid(x)
    assert (grid.pooled_dim, grid.embed_dim, e.shape) == (E, 5 * E, (3, 5 * E))
    torch.testing.assert_close(grid.pooled(e), plain(x))  # the first D numbers: the classic embedding
    # by hand: average the patch tokens of each quarter of the image, then the tower's final norm and projection
    vm = clip.vision_model
    patches = vm(pixel_values=x).last_hidden_state[:, 1:]  # (3, P, hidden)
    side = math.isqrt(patches.shape[1])
    maps = patches.reshape(3, side, side, -1)  # row-major patches
    h = side // 2
    cells = [maps[:, r * h : (r + 1) * h, c * h : (c + 1) * h].mean(dim=(1, 2)) for r in range(2) for c in range(2)]
    ref = clip.visual_projection(vm.post_layernorm(torch.stack(cells, 1)))  # (3, 4, E)
    torch.testing.assert_close(e[:, E:].view(3, 4, E), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="grid=-1"):
        ImageEmbedder(clip, grid=-1)


def test_grid_predictor_and_decoder_read_one_token_per_part(tiny_clip, tmp_path):
    clip, _ = tiny_clip
    with pytest.raises(ValueError, match="image_grid"):
        SemanticMotionPredictor(embed_dim=E, image_grid=2)  # E is not 5 x D
    pred = SemanticMotionPredictor(embed_dim=5 * E, hidden_size=32, num_layers=1, num_heads=2, head_dim=16,
                                   image_grid=2)
    assert pred(torch.randn(2, 5 * E), torch.randn(2, 5 * E), 4).shape == (2, 4, 5 * E)
    dec = build_decoder("tiny", image_embed_dim=5 * E, cross_attention_dim=32, seed=3, image_grid=2)
    emb = torch.randn(2, 4, 5 * E)
    tokens = dec.frame_tokens(emb, 2, 4)
    assert tokens.shape == (2, 4, 5, 32) and dec.condition(torch.randn(2, 7, 32), emb, 4).shape == (8, 12, 32)
    assert dec.frame_tokens(None, 2, 4).shape == (2, 4, 5, 32)  # the null tokens: one per part too
    # the cell parts reach their own tokens: changing cell 3 of frame 1 changes token 4 of frame 1 only
    emb2 = emb.clone()
    emb2[:, 1, 4 * E :] += 1.0
    diff = (dec.frame_tokens(emb2, 2, 4) - tokens).abs().amax(dim=(0, 3))  # (L, parts)
    assert diff[1, 4] > 1e-4 and diff.sum() == diff[1, 4]
    with pytest.raises(ValueError, match="image_embed_dim"):
        build_decoder("tiny", image_embed_dim=E + 1, cross_attention_dim=32, image_grid=2)
    # a predictor and a decoder trained on different embeddings cannot be loaded together
    pred.save_pretrained(tmp_path / "motion" / "predictor")
    build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32).save_pretrained(tmp_path / "motion" / "decoder")
    with pytest.raises(ValueError, match="different image embeddings"):
        video.load_video_models(motion_folder=tmp_path / "motion")


def test_spatial_decoder_lays_each_cell_over_its_region_and_starts_as_the_plain_decoder(tmp_path):
    """spatial_channels: the g x g cell tokens also enter the UNet as an input map, cell (i, j) over latent region
    (i, j); its input weights start at zero, so with the plain decoder's weights it computes the same thing."""
    kw = dict(image_embed_dim=5 * E, cross_attention_dim=32, seed=3, image_grid=2)
    plain = _randomize_conv_out(build_decoder("tiny", **kw)).eval()
    spatial = build_decoder("tiny", spatial_channels=3, **kw).eval()
    assert spatial.unet.conv_in.in_channels == spatial.unet.config.in_channels == 12 + 3
    assert spatial.unet.conv_in.weight[:, 12:].abs().max() == 0  # the new input channels start silent
    assert torch.equal(spatial.unet.conv_in.weight[:, :12], plain.unet.conv_in.weight)  # same seed, same UNet
    missing = spatial.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "unet.conv_in.weight"},
                                      strict=False).missing_keys
    assert sorted(missing) == ["cell_map.bias", "cell_map.weight", "unet.conv_in.weight"]
    g = torch.Generator().manual_seed(0)
    z, start, end = (torch.randn(s, generator=g) for s in ((2, 4, 4, 16, 16), (2, 4, 16, 16), (2, 4, 16, 16)))
    emb = torch.randn(2, 4, 5 * E, generator=g)
    ehs = plain.condition(torch.randn(2, 7, 32, generator=g), emb, 4)
    with torch.no_grad():
        torch.testing.assert_close(spatial(z, 10, start, end, ehs), plain(z, 10, start, end, ehs))
        # the map: (B, L, S, h, w), each cell's value constant over its quarter of the latent grid
        maps = spatial.cell_maps(ehs, 2, 4, 16, 16)
        assert maps.shape == (2, 4, 3, 16, 16)
        emb2 = emb.clone()
        emb2[0, 1, 4 * E :] += 1.0  # the last cell (row 1, column 1) of clip 0, frame 1
        moved = (spatial.cell_maps(plain.condition(torch.zeros(2, 7, 32), emb2, 4), 2, 4, 16, 16)
                 - spatial.cell_maps(plain.condition(torch.zeros(2, 7, 32), emb, 4), 2, 4, 16, 16)).abs().amax(2)
        assert moved[0, 1, 8:, 8:].min() > 1e-5 and moved[0, 1, :8].max() == 0 and moved[0, 1, :, :8].max() == 0
        assert moved[1].max() == 0 and moved[0, [0, 2, 3]].max() == 0
    # it saves and reloads through the same from_pretrained path, wider input convolution included
    spatial.save_pretrained(tmp_path / "decoder")
    again = VideoDecoder.storyworld(tmp_path / "decoder")
    assert again.config.spatial_channels == 3 and again.unet.conv_in.in_channels == 15
    for k, v in spatial.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=0, msg=k)
    with pytest.raises(ValueError, match="needs image_grid"):
        build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, spatial_channels=3)
    with pytest.raises(ValueError, match="spatial_channels=-1"):
        build_decoder("tiny", spatial_channels=-1, **kw)


def test_cache_is_resumable_and_matches_the_dataset(tmp_path, tiny_models, tiny_clip, monkeypatch):
    monkeypatch.setattr(train_motion, "CACHE_CHUNK", 2)
    m = tiny_models
    build_cache(tmp_path / "c", 3, seed=4, embedder=m.embedder, vae=m.vae, frames=5, max_chunks=1, progress=False)
    assert len(list((tmp_path / "c").glob("part_*"))) == 1
    build_cache(tmp_path / "c", 3, seed=4, embedder=m.embedder, vae=m.vae, frames=5, progress=False)
    cache = load_cache(tmp_path / "c")
    assert cache["embeds"].shape == (3, 5, E)
    assert cache["latents"].shape == (3, 5, 4, 16, 16)
    item = sw.ClipDataset(3, frames=5, seed=4)[2]
    assert cache["captions"][2] == item["caption"] and cache["kinds"][2] == item["kind"]
    torch.testing.assert_close(cache["embeds"][2], m.embedder(item["frames"]), atol=2e-2, rtol=1e-2)  # fp16
    assert torch.equal(cache["labels"]["hair"][2], item["labels"]["hair"])
    assert cache["grid"] == 0
    with pytest.raises(FileExistsError, match="another folder"):
        build_cache(tmp_path / "c", 4, seed=4, embedder=m.embedder, progress=False)
    grid = ImageEmbedder(tiny_clip[0], grid=2)
    build_cache(tmp_path / "g", 2, seed=4, embedder=grid, frames=5, progress=False)
    cached = load_cache(tmp_path / "g")
    assert cached["grid"] == 2 and cached["embeds"].shape == (2, 5, 5 * E)
    with pytest.raises(FileNotFoundError, match="python -m sdlite.train motion-cache"):
        load_cache(tmp_path / "empty")


def test_video_train_command_trains_and_exports_a_spatial_decoder(tmp_path, tiny_models, tiny_clip, capsys):
    """`python -m sdlite.train video-decoder --spatial-channels S` on a grid cache: a few steps, then an export that loads
    back with its spatial path; a pooled cache gets a clear error before any training."""
    grid = ImageEmbedder(tiny_clip[0], grid=2)
    build_cache(tmp_path / "g", 2, seed=4, embedder=grid, vae=tiny_models.vae, frames=4, progress=False)
    build_cache(tmp_path / "p", 2, seed=4, embedder=tiny_models.embedder, vae=tiny_models.vae, frames=4,
                progress=False)
    assert train_main(["video-decoder", "--cache", str(tmp_path / "p"), "--out", str(tmp_path / "run_p"), "--size",
                       "tiny", "--steps", "1", "--spatial-channels", "2"]) == 2
    assert "--grid 4" in capsys.readouterr().err
    assert not (tmp_path / "run_p").exists()
    train_main(["video-decoder", "--cache", str(tmp_path / "g"), "--out", str(tmp_path / "run"), "--export",
                str(tmp_path / "dec"), "--size", "tiny", "--steps", "2", "--batch-size", "1", "--spatial-channels",
                "2"])
    dec = VideoDecoder.storyworld(tmp_path / "dec")
    assert dec.config.spatial_channels == 2 and dec.config.image_grid == 2
    assert dec.unet.conv_in.in_channels == 12 + 2 and dec.cell_map.weight.shape[:2] == (2, 128)
    info = json.loads((tmp_path / "dec" / "training.json").read_text())
    assert info["trained_steps"] == 2 and "--spatial-channels 2" in info["command"]


# ---------------------------------------------------------------- the video decoder: shapes and configs
def test_decoder_shapes_and_per_frame_control(tiny_models):
    dec = tiny_models.decoder
    b, frames = 2, 6
    z = torch.randn(b, frames, 4, 16, 16)
    start, end = torch.randn(b, 4, 16, 16), torch.randn(b, 4, 16, 16)
    text = torch.randn(b, 32, 32)
    emb = torch.randn(b, frames, E)
    ehs = dec.condition(text, emb, frames)
    assert ehs.shape == (b * frames, 32 + 2, 32)
    torch.testing.assert_close(ehs[frames + 3, :32], text[1])  # clip 1, frame 3: its clip's text ...
    out = dec(z, 500, start, end, ehs)
    assert out.shape == z.shape
    # ... and its own frame tokens: changing frame 3's embedding changes frame 3's output
    emb2 = emb.clone()
    emb2[:, 3] += 1.0
    out2 = dec(z, 500, start, end, dec.condition(text, emb2, frames))
    assert (out2[:, 3] - out[:, 3]).abs().max() > 1e-5
    # null tokens: the temporal-only decoder
    assert dec.condition(text, None, frames).shape == ehs.shape
    # the keyframes are a condition: changing the end latent changes every frame
    out3 = dec(z, 500, start, end + 1.0, ehs)
    assert ((out3 - out).abs().amax(dim=(2, 3, 4)) > 1e-5).all()


def test_untrained_residual_decoder_gives_the_latent_cross_fade(tiny_models):
    """Diffusion on the residual to the cross-fade, output convolution at zero: sampling returns the cross-fade."""
    dec = build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, seed=5).eval()
    assert dec.config.interpolation_residual and dec.unet.conv_out.weight.abs().max() == 0
    g = torch.Generator().manual_seed(0)
    start, end = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 16, 16, generator=g)
    text = torch.randn(2, 32, 32, generator=g)
    lerp = linear_interpolation(start, end, 6)
    with torch.no_grad():
        z = video.sample_latents(dec, tiny_models.scheduler, start, end, text, None, frames=6, steps=3,
                                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z, lerp)
    # to / from the diffusion space are inverses, and the residual is 0 at both keyframes
    x = torch.randn(2, 6, 4, 16, 16, generator=g)
    r = dec.to_diffusion_space(x, x[:, 0], x[:, -1])
    assert r[:, [0, -1]].abs().max() < 1e-6
    torch.testing.assert_close(dec.from_diffusion_space(r, x[:, 0], x[:, -1]), x)
    # a trained-like decoder moves the in-between frames but, pinned, keeps the keyframes exactly
    with torch.no_grad():
        z2 = video.sample_latents(tiny_models.decoder, tiny_models.scheduler, start, end, text, None, frames=6,
                                  steps=3, generator=torch.Generator().manual_seed(1))
        z3 = video.sample_latents(tiny_models.decoder, tiny_models.scheduler, start, end, text, None, frames=6,
                                  steps=3, generator=torch.Generator().manual_seed(1), pin=False)
    torch.testing.assert_close(z2[:, 0], start)
    torch.testing.assert_close(z2[:, -1], end)
    assert (z2[:, 1:-1] - lerp[:, 1:-1]).abs().max() > 1e-4
    assert (z3[:, 0] - start).abs().max() > 1e-4  # unpinned, the first frame drifts
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        build_decoder("tiny", prediction_type="epsilon", interpolation_residual=True)


def test_decoder_bad_input(tiny_models):
    dec = tiny_models.decoder
    with pytest.raises(ValueError, match="one image embedding per frame"):
        dec.condition(torch.randn(1, 32, 32), torch.randn(1, 5, E), 4)
    with pytest.raises(ValueError, match="matching text tower"):
        dec.condition(torch.randn(1, 32, 16), None, 4)
    ehs = dec.condition(torch.randn(1, 32, 32), None, 40)
    with pytest.raises(ValueError, match="fewer frames"):
        dec(torch.randn(1, 40, 4, 16, 16), 1, torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), ehs)
    with pytest.raises(ValueError, match="start/end latents"):
        dec(torch.randn(1, 4, 4, 16, 16), 1, torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), ehs[:4])
    with pytest.raises(ValueError, match="unknown decoder size"):
        video_unet_config("huge")


def test_real_scale_decoder_config_reloads_from_a_folder(tmp_path):
    """SD1.5 + AnimateDiff's shape (4 levels, cross-attention at 3, width 768 at real scale), tiny widths."""
    real = video_unet_config("sd15", cross_attention_dim=768, sample_size=64)
    assert real["block_out_channels"] == (320, 640, 1280, 1280) and real["cross_attention_dim"] == 768
    assert real["down_block_types"].count("CrossAttnDownBlockMotion") == 3 and real["in_channels"] == 12
    dec = _randomize_conv_out(build_decoder("sd15-tiny", image_embed_dim=24, cross_attention_dim=64, sample_size=32,
                                            seed=0)).eval()
    dec.save_pretrained(tmp_path / "decoder")
    again = VideoDecoder.storyworld(tmp_path / "decoder")
    z = torch.randn(1, 4, 4, 32, 32)
    ehs = dec.condition(torch.randn(1, 77, 64), torch.randn(1, 4, 24), 4)  # 77 tokens as SD1.5
    with torch.no_grad():
        out = dec(z, 10, z[:, 0], z[:, -1], ehs)
        torch.testing.assert_close(again(z, 10, z[:, 0], z[:, -1], ehs), out, rtol=0, atol=0)
    assert out.shape == z.shape


def test_decoder_training_smoke_is_deterministic(tiny_models, tmp_path):
    dec0 = build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, seed=7)  # residual, conv_out at 0
    g = torch.Generator().manual_seed(0)
    cache = {"latents": torch.randn(6, 4, 4, 16, 16, generator=g), "embeds": torch.randn(6, 4, E, generator=g)}
    text, empty = torch.randn(6, 32, 32, generator=g), torch.zeros(1, 32, 32)
    cfg = train_video.DecoderTrainConfig(steps=3, batch_size=2, log_every=1, seed=1)
    import copy

    d1, h1 = train_video.train_decoder(cache, text, empty, copy.deepcopy(dec0), tiny_models.scheduler, cfg,
                                 out=tmp_path / "r1")
    d2, h2 = train_video.train_decoder(cache, text, empty, copy.deepcopy(dec0), tiny_models.scheduler, cfg)
    assert len(h1["loss"]) == 3 and all(np.isfinite(h1["loss"]))
    assert h1["loss"] == h2["loss"]
    for k, v in d1.state_dict().items():
        torch.testing.assert_close(d2.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(d1.frame_proj.weight, dec0.frame_proj.weight)  # it learned something
    assert (tmp_path / "r1" / "checkpoint" / "model.safetensors").is_file() and h1["last_step"] == 3
    _, h0 = train_video.train_decoder(cache, text, empty, copy.deepcopy(dec0), tiny_models.scheduler, cfg,
                                out=tmp_path / "r0", max_minutes=1e-9)  # out of time at once: checkpoint, stop
    assert h0["last_step"] == 0
    assert json.loads((tmp_path / "r0" / "checkpoint" / "state.json").read_text())["step"] == 0
    eps = build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, seed=7, prediction_type="epsilon")
    d3, h3 = train_video.train_decoder(cache, text, empty, eps, tiny_models.scheduler, cfg)
    assert h3["loss"] != h1["loss"] and all(np.isfinite(h3["loss"]))
    with pytest.raises(ValueError, match="prediction_type"):
        build_decoder("tiny", prediction_type="v")
    with pytest.raises(ValueError, match="--latents"):
        train_video.train_decoder({"embeds": cache["embeds"]}, text, empty, dec0, tiny_models.scheduler, cfg)


def test_character_weighted_decoder_loss_weighs_the_characters_cells(tiny_models):
    """`character_weight`: the cells of the mask count 1 + w times; a uniform mask (all or nothing) changes nothing,
    since each clip's weights are normalised to average 1; the weighted loss is the weighted mean of the errors."""
    dec = build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, seed=7)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 4, 16, 16, generator=g)
    batch = {"latents": z, "embeds": torch.randn(2, 4, E, generator=g), "text": torch.randn(2, 32, 32, generator=g),
             "empty_text": torch.zeros(1, 32, 32), "embed_std": 1.0}

    def loss(weight, masks, model=dec):
        cfg = train_video.DecoderTrainConfig(character_weight=weight)
        return train_video._decoder_loss(model, dec, tiny_models.scheduler, cfg, {**batch, "masks": masks},
                                         torch.Generator().manual_seed(3), "cpu")

    plain = loss(0.0, None)
    for uniform in (torch.zeros(2, 4, 16, 16), torch.ones(2, 4, 16, 16)):
        torch.testing.assert_close(loss(4.0, uniform), plain)
    half = torch.zeros(2, 4, 16, 16)
    half[..., :8] = 1.0  # the character in the left half of every frame
    # a model that predicts 0 makes the error the target itself: the residual to the keyframes' cross-fade
    target = dec.to_diffusion_space(z, z[:, 0], z[:, -1])
    zero_model = lambda noisy, *a: torch.zeros_like(noisy)  # noqa: E731
    err = target.pow(2)  # (B, L, C, h, w)
    w = 1.0 + 4.0 * half.unsqueeze(2)
    expected = ((err * w).mean(dim=(1, 2, 3, 4)) / w.mean(dim=(1, 2, 3, 4))).mean()
    torch.testing.assert_close(loss(4.0, half, zero_model), expected)
    left, right = err[..., :8].mean(), err[..., 8:].mean()
    assert expected != pytest.approx(err.mean().item()) and min(left, right) <= expected <= max(left, right)
    with pytest.raises(ValueError, match="character_weight"):
        train_video.DecoderTrainConfig(character_weight=-1.0)
    cache = {"latents": z, "embeds": batch["embeds"]}
    with pytest.raises(ValueError, match="masks"):
        train_video.train_decoder(cache, batch["text"], batch["empty_text"], dec, tiny_models.scheduler,
                                  train_video.DecoderTrainConfig(steps=1, character_weight=4.0))


def test_character_masks_of_a_cache_are_the_renders_masks_and_kept(tmp_path):
    """`character_masks(cache)`: per clip and frame the `character_mask` of that frame's panel, computed once into
    masks.safetensors; `--character-weight` trains with them and records the weight."""
    from sdlite.storyworld.datasets import ClipDataset, character_mask

    sizes = StoryworldSizes.named("tiny")
    clip = build_clip(sizes, build_storyworld_tokenizer(), seed=1).eval()
    build_cache(tmp_path / "c", 2, seed=4, embedder=ImageEmbedder(clip), vae=build_vae(sizes, seed=2).eval(), frames=4,
                progress=False)
    masks = train_motion.character_masks(tmp_path / "c", progress=False)
    lat = load_cache(tmp_path / "c")["latents"]
    assert masks.shape == (2, 4, *lat.shape[-2:]) and set(masks.unique().tolist()) <= {0.0, 1.0}
    panels, _ = ClipDataset(2, frames=4, seed=4).panels(1)
    for f, p in enumerate(panels):
        assert torch.equal(masks[1, f], character_mask(p, latent_size=lat.shape[-1]))
    assert 0 < masks.mean() < 0.5  # the character, not the whole frame
    assert (tmp_path / "c" / "masks.safetensors").is_file()
    assert torch.equal(train_motion.character_masks(tmp_path / "c", progress=False), masks)  # read back
    assert train_main(["video-decoder", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r"), "--export",
                       str(tmp_path / "d"), "--size", "tiny", "--steps", "1", "--batch-size", "1",
                       "--character-weight", "4"]) == 0
    assert json.loads((tmp_path / "d" / "training.json").read_text())["config"]["character_weight"] == 4.0


# ---------------------------------------------------------------- transitions and the CLI
def _keyframes():
    a, b, _ = sw.sample_clip_endpoints(np.random.default_rng(0), kind="walk across")
    return sw.render(a), sw.render(b)


def test_generate_transition_shapes_pins_and_seeds(tiny_models):
    a, b = _keyframes()
    v = video.generate_transition(a, b, frames=5, models=tiny_models, steps=2, seed=0)
    assert v.shape == (5, 3, 64, 64) and v.min() >= -1 and v.max() <= 1
    torch.testing.assert_close(v[0], sw.to_tensor(a))
    torch.testing.assert_close(v[-1], sw.to_tensor(b))
    again = video.generate_transition(a, b, frames=5, models=tiny_models, steps=2, seed=0)
    torch.testing.assert_close(again, v, rtol=0, atol=0)
    other = video.generate_transition(a, b, frames=5, models=tiny_models, steps=2, seed=1)
    assert (other - v).abs().max() > 1e-4
    for mode in ("no_predictor", "temporal_only"):
        assert video.generate_transition(a, b, 4, tiny_models, mode=mode, steps=1).shape == (4, 3, 64, 64)
    assert video.generate_transition(a, b, 4, tiny_models, steps=2, strength=0.5).shape == (4, 3, 64, 64)
    with pytest.raises(ValueError, match="unknown mode"):
        video.generate_transition(a, b, 4, tiny_models, mode="magic")
    with pytest.raises(ValueError, match="at least 2 frames"):
        video.generate_transition(a, b, 1, tiny_models)
    with pytest.raises(ValueError, match="uint8"):
        video.generate_transition(a.astype(np.float32), b, 4, tiny_models)


def test_story_video_chains_transitions(tiny_models):
    frames = [sw.render(sw.sample_panel(np.random.default_rng(i))) for i in range(3)]
    v = video.story_video(frames, tiny_models, frames=4, hold=2, steps=1)
    assert v.shape == (3 * 2 + 2 * (4 - 2), 3, 64, 64)
    torch.testing.assert_close(v[0], sw.to_tensor(frames[0]))
    torch.testing.assert_close(v[2 + 2], sw.to_tensor(frames[1]))  # hold, 2 in-between frames, panel 2
    torch.testing.assert_close(v[-1], sw.to_tensor(frames[2]))
    with pytest.raises(ValueError, match="at least 2 panels"):
        video.story_video(frames[:1], tiny_models)
    with pytest.raises(ValueError, match="one per pair"):
        video.story_video(frames, tiny_models, prompts=["a"])


def test_cli_writes_a_video_and_never_overwrites(tiny_models, tmp_path, monkeypatch, capsys):
    a, b = _keyframes()
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    monkeypatch.setattr(video, "load_video_models", lambda *args, **kw: tiny_models)
    out = tmp_path / "clip.mp4"
    argv = ["video", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--frames", "6", "--steps", "1",
            "--out", str(out)]
    assert sdlite_main(argv) == 0
    assert out.stat().st_size > 500
    import imageio_ffmpeg
    import mediapy

    mediapy.set_ffmpeg(imageio_ffmpeg.get_ffmpeg_exe())
    frames = mediapy.read_video(str(out))
    assert frames.shape == (6, 256, 256, 3)
    stamp = out.stat().st_mtime_ns
    assert sdlite_main(argv) == 2 and "--force" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == stamp
    assert sdlite_main(argv + ["--force"]) == 0
    gif, strip = tmp_path / "clip.gif", tmp_path / "strip.png"
    assert sdlite_main(argv[:-1] + [str(gif)]) == 0 and gif.stat().st_size > 500
    assert sdlite_main(argv[:-1] + [str(strip), "--scale", "1"]) == 0
    assert Image.open(strip).size == (6 * 64, 64)
    assert sdlite_main(["video", str(tmp_path / "nope.png"), str(tmp_path / "b.png"), "--out",
                        str(tmp_path / "x.mp4")]) == 2
    assert "PNG/JPEG" in capsys.readouterr().err
    assert sdlite_main(argv[:-1] + [str(tmp_path / "clip.avi")]) == 2
    assert ".mp4, .gif or .png" in capsys.readouterr().err


def test_cli_polish_redraws_the_in_between_frames_only(tiny_models, tmp_path, monkeypatch, capsys):
    """`sdlite video --polish S`: the same clip, its in-between frames redrawn by the image model (a tiny SDXL
    here, standing in for storyworld's), the keyframes untouched; a bad strength fails before any work."""
    from sdlite.cli.video import POLISH_STRENGTH
    from sdlite.tiny import tiny_sdxl_pipeline

    a, b = _keyframes()
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    monkeypatch.setattr(video, "load_video_models", lambda *args, **kw: tiny_models)
    monkeypatch.setattr(video, "load_pipeline", lambda *args, **kw: tiny_sdxl_pipeline(seed=0))
    argv = ["video", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--frames", "5", "--steps", "1",
            "--scale", "1", "--out"]
    assert sdlite_main(argv + [str(tmp_path / "plain.png")]) == 0
    assert sdlite_main(argv + [str(tmp_path / "polished.png"), "--polish", "0.5"]) == 0
    plain = np.asarray(Image.open(tmp_path / "plain.png")).reshape(64, 5, 64, 3)
    polished = np.asarray(Image.open(tmp_path / "polished.png")).reshape(64, 5, 64, 3)
    assert np.array_equal(plain[:, [0, 4]], polished[:, [0, 4]])  # the keyframes
    assert not np.array_equal(plain[:, 1:4], polished[:, 1:4])
    assert sdlite_main(argv + [str(tmp_path / "bad.png"), "--polish", "1.5"]) == 2
    assert "--polish 1.5" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()
    from sdlite.cli import build_parser

    assert build_parser().parse_args(argv + ["x.png", "--polish"]).polish == POLISH_STRENGTH
    assert build_parser().parse_args(argv + ["x.png"]).polish == 0.0
    frames = [sw.render(sw.sample_panel(np.random.default_rng(i))) for i in range(3)]
    v = video.story_video(frames, tiny_models, frames=4, hold=1, steps=1, polish=0.5)
    assert v.shape == (3 + 2 * 2, 3, 64, 64)
    torch.testing.assert_close(v[3], sw.to_tensor(frames[1]))  # hold, 2 in-between frames, panel 2


def test_sdlite_console_command_has_video(tiny_models, tmp_path, monkeypatch):
    from sdlite import cli

    assert any("video" in s for s in cli.SUBCOMMANDS)
    a, b = _keyframes()
    Image.fromarray(a).save(tmp_path / "a.png")
    Image.fromarray(b).save(tmp_path / "b.png")
    monkeypatch.setattr(video, "load_video_models", lambda *args, **kw: tiny_models)
    out = tmp_path / "v.gif"
    argv = ["video", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--frames", "4", "--steps", "1", "--out",
            str(out)]
    assert cli.main(argv) == 0 and out.is_file()
    assert cli.main(argv) == 2  # exists: refused with a one-line error


# ---------------------------------------------------------------- metrics and the evaluation
def test_metrics_on_known_cases():
    x = torch.zeros(2, 3, 8, 8)
    torch.testing.assert_close(vm.psnr(x, x + 0.2), torch.full((2,), 20.0))  # mse (0.1)^2 on [0, 1]
    img = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(vm.ssim(img, img), torch.ones(1))
    noisy = (img + 0.3 * torch.randn(img.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
    assert 0 < vm.ssim(img, noisy).item() < 0.9
    labels = {k: torch.zeros(2, 4, dtype=torch.long) for k in vm.IDENTITY_LABELS}
    labels["hair"][0, 1] = 3  # clip 0: one frame with other hair
    labels["hat"][0, 1] = 2  # the same frame: still one frame off
    torch.testing.assert_close(vm.frame_identity_agreement(labels), torch.tensor([0.75, 1.0]))
    e = torch.randn(1, 5, 8)
    sims = vm.clip_similarities(e.expand(2, 5, 8).clone())
    assert sims["first"].shape == (2,) and sims["frames"].shape == (2,)
    torch.testing.assert_close(vm.clip_similarities(e[:, :1].expand(1, 5, 8))["first"], torch.ones(1))
    still = torch.zeros(1, 4, 3, 8, 8)
    assert vm.motion_amount(still).item() == 0
    moving = torch.stack([torch.full((3, 8, 8), v) for v in (-1.0, 1.0, -1.0, 1.0)])[None]
    assert vm.motion_amount(moving).item() == pytest.approx(1.0)
    # paired bootstrap: a constant lead has a zero-width interval; noise around 0 gives one that holds 0
    a = torch.randn(50, generator=torch.Generator().manual_seed(2))
    ci = vm.paired_difference_ci(a + 0.5, a)
    assert ci["mean"] == pytest.approx(0.5) and ci["ci_low"] == pytest.approx(0.5) and ci["n"] == 50
    ci = vm.paired_difference_ci(a, torch.zeros(50))
    assert ci["ci_low"] < ci["mean"] < ci["ci_high"] and ci["ci_low"] < float(a.mean()) + 1e-9
    assert vm.paired_difference_ci(a, torch.zeros(50)) == ci  # seeded
    with pytest.raises(ValueError, match="same >= 2 clips"):
        vm.paired_difference_ci(torch.ones(1), torch.zeros(1))


def test_evaluate_and_summary_have_the_checked_names(tiny_models):
    from sdlite.storyworld.recognizer import Recognizer

    rec = Recognizer("a").eval()
    res = transitions.evaluate(tiny_models, n_clips=3, seed=5, frames=4, steps=1, batch_size=2, recognizer=rec)
    assert set(res["per_method"]) == set(transitions.METHODS)
    for m, row in res["per_method"].items():
        assert {"psnr", "ssim", "embed_mse", "identity_agreement", "first_fidelity_psnr", "motion",
                "clipsim_first", "clipsim_frames"} <= set(row), m
        assert all(np.isfinite(v) for v in row.values())
    assert sum(res["kind_counts"].values()) == 3
    out = transitions.summarize(res, "test", n_clips=3)
    assert set(out["psnr"]) >= {"latent_interpolation", "no_predictor", "temporal_only", "full"}
    assert out["n_clips"] == 3 and 0 <= out["identity_agreement_full"] <= 1
    assert out["predictor_error_ratio_vs_linear"] == pytest.approx(res["predictor"]["ratio"])
    assert set(out["bars"]) == {"predictor_error_ratio_le_0.7", "full_beats_a_b_c_in_psnr",
                                "identity_agreement_full_ge_0.85"}
    json.dumps(out)  # serialisable
    assert isinstance(out["bars"]["full_beats_a_b_c_in_psnr"], bool)
    lead = out["psnr_lead_of_full"]  # (d) minus each other method, per clip, with its bootstrap interval
    assert set(lead) == set(transitions.METHODS) - {"full"}
    for m, ci in lead.items():
        assert ci["mean"] == pytest.approx(out["psnr"]["full"] - out["psnr"][m], abs=1e-4), m
        assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
    # a subset of the methods (e.g. temporal_only vs true_embeddings): the PSNR bar is "not run", not a crash
    part = transitions.evaluate(tiny_models, n_clips=2, seed=5, frames=4, steps=1, batch_size=2,
                          methods=("temporal_only", "true_embeddings"))
    sub = transitions.summarize(part, "test", n_clips=2)
    assert set(sub["psnr"]) == {"temporal_only", "true_embeddings"}
    assert sub["bars"]["full_beats_a_b_c_in_psnr"] is None


def test_the_evaluation_measures_the_polished_method_next_to_d(tiny_models, tmp_path):
    """`full_polished`: (d)'s latents redrawn by an image pipeline (here a tiny SDXL); strength 0 is (d) itself."""
    from sdlite.storyworld.recognizer import Recognizer
    from sdlite.tiny import tiny_sdxl_pipeline

    sdxl = tiny_sdxl_pipeline(seed=0)
    rec = Recognizer("a").eval()
    kw = dict(n_clips=2, seed=5, frames=4, steps=1, batch_size=2, recognizer=rec)
    with pytest.raises(ValueError, match="image pipeline"):
        transitions.evaluate(tiny_models, methods=("full", transitions.POLISHED), **kw)
    res = transitions.evaluate(tiny_models, methods=("full", transitions.POLISHED), pipe=sdxl, polish_strength=0.5,
                               **kw)
    out = transitions.summarize(res, "test", n_clips=2)
    assert out["identity_agreement_full_polished"] == res["per_method"][transitions.POLISHED]["identity_agreement"]
    assert out["psnr"]["full"] != out["psnr"][transitions.POLISHED]  # the same (d) latents, redrawn
    zero = transitions.evaluate(tiny_models, methods=("full", transitions.POLISHED), pipe=sdxl, polish_strength=0.0,
                                **kw)
    assert zero["per_method"]["full"]["psnr"] == zero["per_method"][transitions.POLISHED]["psnr"]
    json.dumps(out)


def test_predictor_errors_are_the_mean_squared_errors_themselves():
    """Not only their ratio: on clips whose frames are exactly the cross-fade, interpolation's error is 0 and a
    predictor that outputs a constant offset c has error c**2 (mean over the in-between frames and dimensions)."""
    class Offset(torch.nn.Module):
        dtype, device = torch.float32, torch.device("cpu")

        def forward(self, start, end, frames):
            return linear_interpolation(start, end, frames) + 0.5

    e0, e1 = torch.randn(6, 8, generator=torch.Generator().manual_seed(2)).chunk(2)
    clips = linear_interpolation(e0, e1, 5)  # (3, 5, 8): the cross-fade is the truth
    err = predictor_errors(Offset(), clips)
    assert err["mse_linear"] == 0.0 and err["mse_predictor"] == pytest.approx(0.25)
    noisy = clips + torch.randn(clips.shape, generator=torch.Generator().manual_seed(3))
    err = predictor_errors(Offset(), noisy)
    miss = (linear_interpolation(noisy[:, 0], noisy[:, -1], 5) - noisy)[:, 1:-1]  # interpolation's own miss
    assert err["mse_linear"] == pytest.approx(float(miss.pow(2).mean()), rel=1e-5)
    assert err["mse_predictor"] == pytest.approx(float((miss + 0.5).pow(2).mean()), rel=1e-5)
    assert err["ratio"] == pytest.approx(err["mse_predictor"] / err["mse_linear"])


# --- mutation survivors (tools/mutation.py motion; docs/mutation.md) ---
# Each test builds what it checks itself (no module-scoped fixture: mutmut charges a fixture's calls to the
# first test that used it).


def _tiny_clip_folder(folder):
    """A storyworld folder holding only `clip/` (what load_storyworld_clip reads): the tiny CLIP, random weights."""
    tok = build_storyworld_tokenizer()
    clip = build_clip(StoryworldSizes.named("tiny"), tok, seed=1).eval()
    clip.save_pretrained(folder / "clip")
    tok.save_pretrained(folder / "clip")
    return clip


def _tiny_vit(folder, dtype=torch.float32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14, projection_dim=8)
    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(cfg).eval()
    model.to(dtype).save_pretrained(folder)
    return model


def test_storyworld_embedder_reads_the_given_folder_with_its_grid(tmp_path):
    clip = _tiny_clip_folder(tmp_path / "sw")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    emb = ImageEmbedder.storyworld(tmp_path / "sw")  # default device cpu, default grid 0
    assert (emb.grid, emb.pooled_dim, emb.embed_dim) == (0, E, E)
    torch.testing.assert_close(emb(x), ImageEmbedder(clip)(x), rtol=0, atol=0)
    cells = ImageEmbedder.storyworld(tmp_path / "sw", grid=2)
    assert (cells.grid, cells.embed_dim) == (2, 5 * E)
    torch.testing.assert_close(cells(x), ImageEmbedder(clip, grid=2)(x), rtol=0, atol=0)


def test_storyworld_embedder_defaults_to_the_shipped_clip():
    clip, _ = load_storyworld_clip()
    emb = ImageEmbedder.storyworld()
    assert emb.grid == 0 and emb.embed_dim == emb.pooled_dim == clip.visual_projection.out_features
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.testing.assert_close(emb(x), ImageEmbedder(clip)(x), rtol=0, atol=0)


def test_storyworld_embedder_puts_the_tower_on_the_given_device(tmp_path):
    _tiny_clip_folder(tmp_path / "sw")
    emb = ImageEmbedder.storyworld(tmp_path / "sw", device="meta")
    assert {p.device.type for p in emb.vision_model.parameters()} == {"meta"}
    assert emb.visual_projection.weight.device.type == "meta"


def test_real_clip_tower_is_loaded_in_float32_onto_the_device_with_its_grid(tmp_path):
    """A tower saved in float16 is loaded in float32 (transformers would keep float16 by default), `device` moves
    the whole embedder and `grid` reaches it."""
    _tiny_vit(tmp_path / "vit16", torch.float16)
    emb = ImageEmbedder.from_pretrained(tmp_path / "vit16")
    assert {p.dtype for p in emb.parameters()} == {torch.float32}
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert emb(x).dtype == torch.float32 and emb.grid == 0 and emb.embed_dim == 8
    grid = ImageEmbedder.from_pretrained(tmp_path / "vit16", grid=1)
    assert (grid.grid, grid.embed_dim, grid(x).shape) == (1, 16, (2, 16))
    meta = ImageEmbedder.from_pretrained(tmp_path / "vit16", device="meta")
    assert meta.mean.device.type == "meta"
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_real_clip_tower_is_loaded_offline(tmp_path, monkeypatch):
    """Offline (the docstring's promise): transformers is asked for local files only, so a hub id that is not in
    the local cache fails at once instead of trying the network (about 50 s of retries with no network)."""
    from transformers import CLIPVisionModelWithProjection

    _tiny_vit(tmp_path / "vit")
    load, seen = CLIPVisionModelWithProjection.from_pretrained, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("local_files_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(CLIPVisionModelWithProjection, "from_pretrained", spy)
    ImageEmbedder.from_pretrained(tmp_path / "vit")
    assert seen == [True]


def test_cells_of_a_non_square_patch_grid_are_refused():
    tok = build_storyworld_tokenizer()
    emb = ImageEmbedder(build_clip(StoryworldSizes.named("tiny"), tok, seed=1).eval(), grid=2)
    with pytest.raises(ValueError, match=whole("5 patch tokens do not form a square grid")):
        emb.cells(torch.zeros(1, 1 + 5, 7))


def test_shipped_predictor_loads_from_data_motion():
    pred = motion.SemanticMotionPredictor.storyworld()
    assert not pred.training
    config = json.loads((motion.motion_dir() / "predictor" / "config.json").read_text())
    assert pred.config.embed_dim == config["embed_dim"] and pred.config.image_grid == config["image_grid"]


def test_missing_predictor_message_names_what_and_how(tmp_path):
    folder = tmp_path / "nothing"
    expected = (f"{folder} holds no predictor: train it with `python -m sdlite.train motion-predictor` "
                "or restore data/motion from git")
    with pytest.raises(FileNotFoundError, match=whole(expected)):
        SemanticMotionPredictor.storyworld(folder)


def _embedder_and_predictor():
    tok = build_storyworld_tokenizer()
    emb = ImageEmbedder(build_clip(StoryworldSizes.named("tiny"), tok, seed=1).eval())
    torch.manual_seed(0)
    pred = SemanticMotionPredictor(embed_dim=E, hidden_size=32, num_layers=1, num_heads=2, head_dim=16).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pred.proj_out.weight.copy_(torch.randn(pred.proj_out.weight.shape, generator=g) * 0.1)
        pred.proj_out.bias.copy_(torch.randn(pred.proj_out.bias.shape, generator=g) * 0.1)
    return emb, pred


def test_predict_frame_embeddings_without_a_predictor_interpolates_the_keyframes():
    emb, _ = _embedder_and_predictor()
    g = torch.Generator().manual_seed(2)
    start, end = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    out = motion.predict_frame_embeddings(emb, None, start, end, 5)  # 3 clips: both halves split right
    e_start, e_end = emb(torch.cat([start, end])).split(3)  # one batch, as the function embeds them
    torch.testing.assert_close(out, linear_interpolation(e_start, e_end, 5), rtol=0, atol=0)
    assert motion.predict_frame_embeddings(emb, None, start[:1], end[:1]).shape == (1, 16, E)  # 16 by default


def test_predict_frame_embeddings_with_a_predictor_uses_its_frames_and_dtype():
    emb, pred = _embedder_and_predictor()
    g = torch.Generator().manual_seed(3)
    start, end = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1, torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    e_start, e_end = emb(torch.cat([start, end])).split(3)  # one batch, as the function embeds them
    out = motion.predict_frame_embeddings(emb, pred, start, end, 5)
    with torch.no_grad():
        torch.testing.assert_close(out, pred(e_start, e_end, 5), rtol=0, atol=0)
    assert motion.predict_frame_embeddings(emb, pred, start[:1], end[:1]).shape == (1, 16, E)  # 16 by default
    # under CPU autocast the embedder gives bfloat16 embeddings: the float32 predictor gets them in float32, so
    # the frame fractions (computed in the keyframes' dtype) are not rounded to bfloat16 (1/3 -> 0.333984)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        e16 = emb(torch.cat([start, end]))
        assert e16.dtype == torch.bfloat16
        out16 = motion.predict_frame_embeddings(emb, pred, start, end, 4)
        with torch.no_grad():
            ref16 = pred(e16[:3].float(), e16[3:].float(), 4)
    torch.testing.assert_close(out16, ref16, rtol=0, atol=0)


def test_predictor_errors_message_and_the_smallest_clips():
    for shape in [(2, 2, 8), (2, 8), (2, 2, 8, 1)]:
        expected = f"embeds must be (N, L, D) with L >= 3 (in-between frames to score), got {shape}"
        with pytest.raises(ValueError, match=whole(expected)):
            predictor_errors(SemanticMotionPredictor(embed_dim=8, hidden_size=16, num_layers=1, num_heads=2,
                                                     head_dim=8), torch.zeros(shape))
    # L = 3 (one in-between frame) and D = 2 are scored
    e0, e1 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0)).chunk(2)
    clips = linear_interpolation(e0, e1, 3)  # (2, 3, 2)
    pred = SemanticMotionPredictor(embed_dim=2, hidden_size=16, num_layers=1, num_heads=2, head_dim=8)
    err = predictor_errors(pred, clips + torch.tensor([0.0, 0.5, 0.0]).view(1, 3, 1))
    assert err["mse_linear"] == pytest.approx(0.25) and err["mse_predictor"] == pytest.approx(0.25)


def test_predictor_errors_batches_256_clips_at_a_time():
    class Spy(torch.nn.Module):
        dtype, device = torch.float32, torch.device("cpu")

        def __init__(self):
            super().__init__()
            self.batches = []

        def forward(self, start, end, frames):
            self.batches.append(len(start))
            return linear_interpolation(start, end, frames)

    spy = Spy()
    err = predictor_errors(spy, torch.zeros(300, 3, 2))
    assert spy.batches == [256, 44] and err["mse_predictor"] == 0.0


def test_predictor_errors_converts_the_clips_to_the_predictors_dtype():
    torch.manual_seed(0)
    pred = SemanticMotionPredictor(embed_dim=8, hidden_size=16, num_layers=1, num_heads=2, head_dim=8)
    clips = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    err = predictor_errors(pred, clips)  # float64 clips, float32 predictor
    assert err == predictor_errors(pred, clips.float())
    assert err["ratio"] == pytest.approx(1.0)  # untrained: interpolation


def test_predictor_errors_moves_the_clips_to_the_predictors_device():
    """The clips go where the predictor is (a stand-in on the meta device records where its input lives)."""
    class Elsewhere(torch.nn.Module):
        dtype, device = torch.float32, torch.device("meta")

        def forward(self, start, end, frames):
            raise LookupError(f"{start.device.type} {end.device.type}")

    with pytest.raises(LookupError, match="^meta meta$"):
        predictor_errors(Elsewhere(), torch.zeros(2, 4, 3))


def _tiny_embedder(**kw):
    tok = build_storyworld_tokenizer()
    return ImageEmbedder(build_clip(StoryworldSizes.named("tiny"), tok, seed=1).eval(), **kw)


def test_grid_parts_refuses_what_is_not_a_plain_int():
    assert motion.grid_parts(2) == 5 and motion.grid_parts(0, 7) == 1
    for bad in (2.0, True, -1):
        expected = f"grid={bad!r} must be an int >= 0 (0: the pooled embedding only)"
        with pytest.raises(ValueError, match=whole(expected)):
            motion.grid_parts(bad)


def test_embedder_needs_both_tower_parts_and_says_what_it_got():
    class HalfClip(torch.nn.Module):  # a vision tower without its projection
        def __init__(self):
            super().__init__()
            self.vision_model = torch.nn.Identity()

    for wrong, name in ((HalfClip(), "HalfClip"), (torch.nn.Linear(2, 2), "Linear")):
        expected = (f"ImageEmbedder needs a CLIPModel or CLIPVisionModelWithProjection, got {name}: load one with "
                    "transformers' from_pretrained")
        with pytest.raises(TypeError, match=whole(expected)):
            ImageEmbedder(wrong)


def test_embedder_is_frozen_and_saves_only_the_tower():
    emb = _tiny_embedder()
    assert not any(p.requires_grad for p in emb.parameters()) and not emb.training
    keys = set(emb.state_dict())
    assert keys and all(k.startswith(("vision_model.", "visual_projection.")) for k in keys)  # no mean / std


def test_embedder_normalisation_with_one_of_mean_and_std():
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean = torch.tensor([0.5, 0.25, 0.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(_tiny_embedder(mean=(0.5, 0.25, 0.0)).preprocess(x), (x + 1) / 2 - mean)  # std 1
    # an empty mean still asks for normalisation: [-1, 1] -> [0, 1], shifted by 0
    torch.testing.assert_close(_tiny_embedder(mean=()).preprocess(x), (x + 1) / 2)
    torch.testing.assert_close(_tiny_embedder(mean=(), std=()).preprocess(x), (x + 1) / 2)
    torch.testing.assert_close(_tiny_embedder().preprocess(x), x, rtol=0, atol=0)  # no mean: as it is


def test_embedder_resizes_when_either_side_differs():
    emb = _tiny_embedder()
    assert emb.image_size == 64
    g = torch.Generator().manual_seed(0)
    for h, w in ((64, 32), (32, 64), (48, 48)):
        x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
        out = emb.preprocess(x)
        assert out.shape == (1, 3, 64, 64)
        ref = torch.nn.functional.interpolate(x, size=(64, 64), mode="bicubic", align_corners=False)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_embedder_refuses_what_is_not_a_batch_of_rgb_tensors():
    emb = _tiny_embedder()
    advice = ": convert uint8 pictures with sdlite.storyworld.to_tensor"
    for bad, got in ((torch.zeros(3, 3, 64), "(3, 3, 64)"), (torch.zeros(2, 64, 64, 3), "(2, 64, 64, 3)"),
                     (np.zeros((2, 3, 64, 64), np.uint8), "ndarray"), ([1, 2], "list")):
        expected = f"images must be a float tensor (B, 3, H, W) in [-1, 1], got {got}{advice}"
        with pytest.raises(ValueError, match=whole(expected)):
            emb.preprocess(bad)


def test_fraction_embedding_is_the_sinusoidal_formula():
    """sin and cos of 1000 t / 10000**(i / half), i < half = dim // 2, and a zero column for an odd dim."""
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    for dim in (8, 9):
        half = dim // 2
        freqs = np.exp(-np.log(10_000.0) * np.arange(half) / half)
        angles = 1000.0 * t.double().numpy()[:, None] * freqs[None]
        ref = np.concatenate([np.sin(angles), np.cos(angles), np.zeros((4, dim - 2 * half))], axis=1)
        out = motion.fraction_embedding(t, dim)
        assert out.shape == (4, dim) and out.dtype == torch.float32
        np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=3e-4)
    angles = 1000.0 * 0.5 * np.exp(-np.log(100.0) * np.arange(2) / 2)  # another max_period
    np.testing.assert_allclose(motion.fraction_embedding(torch.tensor([0.5]), 4, max_period=100.0).numpy()[0],
                               np.concatenate([np.sin(angles), np.cos(angles)]), rtol=0, atol=1e-4)


def test_fraction_embedding_stays_on_the_device_of_t_and_in_float32():
    out = motion.fraction_embedding(torch.linspace(0, 1, 3, device="meta"), 8)
    assert out.device.type == "meta" and out.shape == (3, 8)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = motion.fraction_embedding(torch.tensor([0.0, 0.5, 1.0]), 8)
    finally:
        torch.set_default_dtype(before)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, motion.fraction_embedding(torch.tensor([0.0, 0.5, 1.0]), 8), rtol=0, atol=0)


def _randomized_predictor(**kw):
    torch.manual_seed(0)
    pred = SemanticMotionPredictor(**{**dict(embed_dim=8, hidden_size=16, num_layers=2, num_heads=2, head_dim=8),
                                      **kw}).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pred.proj_out.weight.copy_(torch.randn(pred.proj_out.weight.shape, generator=g) * 0.1)
        pred.proj_out.bias.copy_(torch.randn(pred.proj_out.bias.shape, generator=g) * 0.1)
    return pred


def test_predictor_forward_is_interpolation_plus_the_pinned_correction():
    """The forward pass by its parts: h = proj_in(interp) + frame_embed(features of t); the blocks; the correction
    proj_out(norm_out(h)), zero at both keyframes; interp + correction. 16 frames by default."""
    pred = _randomized_predictor()
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 8, generator=g), torch.randn(2, 8, generator=g)
    with torch.no_grad():
        for frames in (5, 16):
            interp = linear_interpolation(a, b, frames)
            h = pred.proj_in(interp) + pred.frame_embed(motion.fraction_embedding(torch.linspace(0, 1, frames), 16))
            for block in pred.blocks:
                h = block(h)
            delta = pred.proj_out(pred.norm_out(h))
            delta[:, [0, -1]] = 0
            torch.testing.assert_close(pred(a, b, frames), interp + delta)
        torch.testing.assert_close(pred(a, b), pred(a, b, 16), rtol=0, atol=0)


def test_predictor_runs_on_the_device_of_its_inputs():
    pred = _randomized_predictor().to("meta")
    out = pred(torch.zeros(2, 8, device="meta"), torch.zeros(2, 8, device="meta"), 4)
    assert out.device.type == "meta" and out.shape == (2, 4, 8)


def test_predictor_output_dtype_does_not_follow_the_default_dtype():
    pred = _randomized_predictor()
    a, b = torch.randn(2, 8, generator=torch.Generator().manual_seed(2)).chunk(2)
    with torch.no_grad():
        ref = pred(a, b, 4)
        before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            out = pred(a, b, 4)
        finally:
            torch.set_default_dtype(before)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_predictor_bad_keyframes_message():
    pred = SemanticMotionPredictor(embed_dim=16, hidden_size=32, num_layers=1, num_heads=2, head_dim=16)
    advice = ": embed the keyframes with an ImageEmbedder of width 16"
    for a, b in (((2, 3, 16), (2, 3, 16)), ((2, 16), (3, 16)), ((2, 8), (2, 8))):
        expected = f"start and end must both be (B, 16) embeddings, got {a} and {b}{advice}"
        with pytest.raises(ValueError, match=whole(expected)):
            pred(torch.zeros(a), torch.zeros(b), 4)


def test_predictor_errors_add_up_over_batches():
    pred = _randomized_predictor()
    clips = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(3))
    whole, batched = predictor_errors(pred, clips), predictor_errors(pred, clips, batch_size=2)
    assert whole["mse_predictor"] > 0
    for key in whole:
        assert batched[key] == pytest.approx(whole[key], rel=1e-6), key


def test_check_frames_takes_ints_from_2_and_nothing_else():
    assert motion.check_frames(2) == 2 and motion.check_frames(np.int64(5)) == 5
    assert frame_fractions(2).tolist() == [0.0, 1.0]
    assert linear_interpolation(torch.zeros(1, 3), torch.ones(1, 3), 2).tolist() == [[[0.0] * 3, [1.0] * 3]]
    for bad in (2.5, 3.0, True, 1, "16"):
        expected = f"frames={bad!r}: a transition needs at least 2 frames (its two keyframes), e.g. 16"
        with pytest.raises(ValueError, match=whole(expected)):
            motion.check_frames(bad)


def test_fractions_and_interpolation_stay_on_the_device_of_their_inputs():
    assert frame_fractions(3, device="meta").device.type == "meta"
    out = linear_interpolation(torch.zeros(2, 8, device="meta"), torch.zeros(2, 8, device="meta"), 4)
    assert out.device.type == "meta" and out.shape == (2, 4, 8)


def test_linear_interpolation_keeps_the_input_dtype():
    """The fractions are cast to the keyframes' dtype: bfloat16 keyframes give bfloat16 frames (not float32)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, generator=g).bfloat16(), torch.randn(2, 8, generator=g).bfloat16()
    e = linear_interpolation(a, b, 4)
    assert e.dtype == torch.bfloat16 and e.shape == (2, 4, 8)
    assert torch.equal(e[:, 0], a) and torch.equal(e[:, -1], b)
    a64, b64 = a.double(), b.double()
    assert linear_interpolation(a64, b64, 4).dtype == torch.float64


def test_linear_interpolation_of_three_axes_puts_the_frames_second():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    e = linear_interpolation(a, b, 4)  # (B, C, W) -> (B, L, C, W)
    assert e.shape == (2, 4, 3, 5)
    torch.testing.assert_close(e[:, 0], a)
    torch.testing.assert_close(e[:, 3], b)
    torch.testing.assert_close(e[:, 1], (2 * a + b) / 3)


def test_embedder_resizes_by_height_and_width_not_by_channels():
    """A tower whose image size is 3 pixels, like the channel count: the sides decide, not the channel axis."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=3, patch_size=1, projection_dim=4)
    emb = ImageEmbedder(CLIPVisionModelWithProjection(cfg))
    assert emb.image_size == 3
    g = torch.Generator().manual_seed(0)
    for h, w in ((3, 5), (5, 3)):
        x = torch.rand(1, 3, h, w, generator=g) * 2 - 1
        ref = torch.nn.functional.interpolate(x, size=(3, 3), mode="bicubic", align_corners=False)
        torch.testing.assert_close(emb.preprocess(x), ref, rtol=0, atol=0)
    x = torch.rand(1, 3, 3, 3, generator=g)
    torch.testing.assert_close(emb.preprocess(x), x, rtol=0, atol=0)


def test_predictor_errors_ratio_of_small_errors():
    """The ratio is mse_predictor / mse_linear also when the summed squared errors are far below 1."""
    class Offset(torch.nn.Module):
        dtype, device = torch.float32, torch.device("cpu")

        def forward(self, start, end, frames):
            return linear_interpolation(start, end, frames) + 0.01

    e0, e1 = torch.randn(4, 4, generator=torch.Generator().manual_seed(4)).chunk(2)
    clips = linear_interpolation(e0, e1, 4)  # (2, 4, 4): 16 in-between numbers
    clips = clips + 0.02 * torch.randn(clips.shape, generator=torch.Generator().manual_seed(5))
    err = predictor_errors(Offset(), clips)
    assert err["mse_linear"] * 16 < 0.1  # the summed squared error of interpolation
    assert err["ratio"] == pytest.approx(err["mse_predictor"] / err["mse_linear"], rel=1e-6)
    assert err["ratio"] > 1.05  # the offset makes it worse


def test_predictor_runs_in_the_dtype_of_its_weights():
    """A predictor cast to float64 or bfloat16 (e.g. with the rest of a half-precision pipeline) runs in that dtype:
    its frame-time embedding is cast to the weights' dtype (it used to stay float32 and fail in the first layer)."""
    pred = _randomized_predictor()
    a, b = torch.randn(2, 8, generator=torch.Generator().manual_seed(5)).chunk(2)
    with torch.no_grad():
        ref = pred(a, b, 4)
        for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.1)):
            out = pred.to(dtype)(a.to(dtype), b.to(dtype), 4)
            assert out.dtype == dtype
            torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
        pred.float()


def test_predict_frame_embeddings_rounds_both_keyframes_to_a_bfloat16_predictor(tmp_path):
    """The float32 embeddings of both keyframes are given to a bfloat16 predictor in bfloat16."""
    clip = _tiny_clip_folder(tmp_path / "sw")
    embedder = ImageEmbedder(clip)
    pred = SemanticMotionPredictor(embed_dim=E, hidden_size=32, num_layers=1, num_heads=2, head_dim=16)
    pred = _randomize_output(pred).to(torch.bfloat16)
    g = torch.Generator().manual_seed(6)
    start, end = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    e_start, e_end = embedder(start), embedder(end)
    with torch.no_grad():
        expected = pred(e_start.bfloat16(), e_end.bfloat16(), 5)
    out = motion.predict_frame_embeddings(embedder, pred, start, end, 5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_storyworld_embedder_moves_its_normalisation_with_the_tower(tmp_path):
    _tiny_clip_folder(tmp_path / "sw")
    emb = ImageEmbedder.storyworld(tmp_path / "sw", device="meta")
    assert emb.mean.device.type == emb.std.device.type == "meta"
