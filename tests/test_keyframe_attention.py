"""Keyframe-reading attention (sdlite.keyframe_attention) and the decoder's options that use it; guidance on the frame
embeddings (sdlite.video.sample_latents(embed_guidance=...))."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from sdlite.cli.train import main as train_main
from sdlite.keyframe_attention import (
    KeyframeAttnProcessor, install_keyframe_attention, keyframe_attention_reference, keyframe_tokens,
    spatial_self_attention_names,
)
from sdlite.motion import ImageEmbedder
from sdlite.storyworld.models import StoryworldSizes, build_clip, build_scheduler, build_storyworld_tokenizer, build_vae
from sdlite.train.motion import build_cache
from sdlite.video import VideoDecoder, build_decoder, sample_latents

ROOT = Path(__file__).resolve().parents[1]

E = 32


def _random_conv_out(dec, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dec.unet.conv_out.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dec.eval()


def _inputs(b=2, frames=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(noisy=torch.randn(b, frames, 4, 8, 8, generator=g), start=torch.randn(b, 4, 8, 8, generator=g),
                end=torch.randn(b, 4, 8, 8, generator=g), text=torch.randn(b, 3, 32, generator=g),
                embeds=torch.randn(b, frames, E, generator=g))


def test_keyframe_tokens_put_each_clips_own_keyframes_after_each_frame():
    frames, n = 4, 3
    x = torch.arange(2 * frames * n, dtype=torch.float32).view(2 * frames, n, 1)  # (B*L, N, 1), every token distinct
    out = keyframe_tokens(x, frames)
    assert out.shape == (2 * frames, 3 * n, 1)
    for clip in range(2):
        first, last = clip * frames, clip * frames + frames - 1
        for i in range(clip * frames, (clip + 1) * frames):
            assert torch.equal(out[i], torch.cat([x[i], x[first], x[last]]))
    with pytest.raises(ValueError, match="whole clips"):
        keyframe_tokens(torch.zeros(7, n, 1), frames)
    with pytest.raises(ValueError, match="at least 2 frames"):
        keyframe_tokens(torch.zeros(4, n, 1), 1)


@pytest.mark.parametrize("heads", [1, 2])
def test_processor_equals_the_by_hand_attention_per_frame_and_head(heads):
    torch.manual_seed(0)
    dim, frames = 16, 4
    attn = Attention(dim, heads=heads, dim_head=dim // heads).eval()
    x = torch.randn(2 * frames, 6, dim)
    with torch.no_grad():
        fast = KeyframeAttnProcessor(frames)(attn, x)
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        d = dim // heads
        by_hand = torch.cat([keyframe_attention_reference(q[..., h * d:(h + 1) * d], k[..., h * d:(h + 1) * d],
                                                          v[..., h * d:(h + 1) * d], frames) for h in range(heads)],
                            dim=-1)
        expected = attn.to_out[0](by_hand)
        plain = AttnProcessor2_0()(attn, x)
    torch.testing.assert_close(fast, expected, atol=1e-5, rtol=1e-5)
    assert (fast - plain).abs().max() > 1e-3  # reading the keyframes changes the result
    with pytest.raises(ValueError, match="self-attention"):
        KeyframeAttnProcessor(frames)(attn, x, encoder_hidden_states=x)


def test_a_keyframe_reads_only_its_own_clip():
    """Frames of clip 0 do not change when clip 1's keyframes change (clips never see each other)."""
    torch.manual_seed(1)
    attn = Attention(8, heads=1, dim_head=8).eval()
    x = torch.randn(2 * 3, 5, 8)
    y = x.clone()
    y[3] += 1.0  # clip 1's first frame
    p = KeyframeAttnProcessor(3)
    with torch.no_grad():
        a, b = p(attn, x), p(attn, y)
    assert torch.equal(a[:3], b[:3]) and not torch.allclose(a[4:], b[4:])


def test_the_decoder_installs_it_on_spatial_self_attention_only_and_keeps_it_through_a_folder(tmp_path):
    kw = dict(image_embed_dim=E, cross_attention_dim=32, sample_size=8, seed=3)
    plain = _random_conv_out(build_decoder("tiny", **kw))
    dec = build_decoder("tiny", keyframe_attention=True, **kw).eval()
    dec.load_state_dict(plain.state_dict())  # no parameters of its own: the same weights load
    names = spatial_self_attention_names(dec.unet)
    assert names and all("motion_modules" not in n and n.endswith("attn1.processor") for n in names)
    procs = dec.unet.attn_processors
    assert all(isinstance(procs[n], KeyframeAttnProcessor) for n in names)
    assert sum(isinstance(p, KeyframeAttnProcessor) for p in procs.values()) == len(names) == len(dec.keyframe_processors)
    x = _inputs()
    ehs = dec.condition(x["text"], x["embeds"], 5)
    with torch.no_grad():
        out = dec(x["noisy"], torch.tensor([10, 500]), x["start"], x["end"], ehs)
        ref = plain(x["noisy"], torch.tensor([10, 500]), x["start"], x["end"], ehs)
    assert all(p.frames == 5 for p in dec.keyframe_processors)  # the decoder told them the clip length
    assert (out - ref).abs().max() > 1e-4
    dec.save_pretrained(tmp_path / "d")
    back = VideoDecoder.from_pretrained(tmp_path / "d").eval()
    assert back.config.keyframe_attention and len(back.keyframe_processors) == len(names)
    with torch.no_grad():
        torch.testing.assert_close(back(x["noisy"], torch.tensor([10, 500]), x["start"], x["end"], ehs), out)
    with pytest.raises(ValueError, match="no spatial self-attention"):
        install_keyframe_attention(SimpleNamespace(attn_processors={"mid.motion_modules.0.attn1.processor": None}))


def test_embed_guidance_is_the_classifier_free_combination_of_with_and_without_embeddings():
    """One sampling step returns the model's clean estimate, so guidance w gives null + w * (with - null) exactly."""
    dec = _random_conv_out(build_decoder("tiny", image_embed_dim=E, cross_attention_dim=32, sample_size=8, seed=3))
    x = _inputs()
    sched = build_scheduler()

    def run(embeds, w):
        return sample_latents(dec, sched, x["start"], x["end"], x["text"], embeds, frames=5, steps=1,
                              generator=torch.Generator().manual_seed(0), pin=False, embed_guidance=w)

    with_e, without = run(x["embeds"], 1.0), run(None, 1.0)
    torch.testing.assert_close(run(x["embeds"], 2.5), without + 2.5 * (with_e - without), atol=1e-5, rtol=1e-5)
    assert torch.equal(run(None, 3.0), without)  # nothing to guide with: no embeddings
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match="embed_guidance"):
            run(x["embeds"], bad)


def test_train_command_fine_tunes_a_decoder_with_keyframe_attention(tmp_path):
    """`--init FOLDER --keyframe-attention`: starts from the trained weights, records the chain of commands."""
    sizes = StoryworldSizes.named("tiny")
    clip = build_clip(sizes, build_storyworld_tokenizer(), seed=1).eval()
    vae = build_vae(sizes, seed=2).eval()
    build_cache(tmp_path / "c", 2, seed=4, embedder=ImageEmbedder(clip), vae=vae, frames=4, progress=False)
    assert train_main(["video-decoder", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r0"), "--export",
                       str(tmp_path / "d0"), "--size", "tiny", "--steps", "1", "--batch-size", "1"]) == 0
    assert train_main(["video-decoder", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r1"), "--export",
                       str(tmp_path / "d1"), "--init", str(tmp_path / "d0"), "--keyframe-attention", "--steps", "2",
                       "--batch-size", "1"]) == 0
    dec = VideoDecoder.storyworld(tmp_path / "d1")
    assert dec.config.keyframe_attention
    info = json.loads((tmp_path / "d1" / "training.json").read_text())
    assert info["trained_steps"] == 2 and "--keyframe-attention" in info["command"]
    assert info["init"]["training"]["trained_steps"] == 1
    assert train_main(["video-decoder", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r2"), "--init",
                       str(tmp_path / "nowhere"), "--steps", "1"]) == 2


def test_a_decoder_export_can_be_stored_in_float16(tmp_path):
    """`--save-dtype float16`: half the bytes on disk, loads back as float32 within float16's rounding."""
    from safetensors.torch import load_file

    sizes = StoryworldSizes.named("tiny")
    clip = build_clip(sizes, build_storyworld_tokenizer(), seed=1).eval()
    build_cache(tmp_path / "c", 2, seed=4, embedder=ImageEmbedder(clip), vae=build_vae(sizes, seed=2).eval(),
                frames=4, progress=False)
    for dtype in ("float32", "float16"):
        assert train_main(["video-decoder", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / f"r_{dtype}"),
                           "--export", str(tmp_path / dtype), "--size", "tiny", "--steps", "1", "--batch-size", "1",
                           "--save-dtype", dtype]) == 0
        assert json.loads((tmp_path / dtype / "training.json").read_text())["saved_dtype"] == dtype
    stored = {d: load_file(str(tmp_path / d / "diffusion_pytorch_model.safetensors")) for d in ("float32", "float16")}
    assert {t.dtype for t in stored["float16"].values()} == {torch.float16}
    full, half = VideoDecoder.storyworld(tmp_path / "float32"), VideoDecoder.storyworld(tmp_path / "float16")
    for (name, a), b in zip(full.named_parameters(), half.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)  # the same run, rounded once
    with pytest.raises(ValueError, match="save_dtype"):
        from sdlite.train.video import train_decoder_on_caches

        train_decoder_on_caches([tmp_path / "c"], tmp_path / "r_bad", None, save_dtype="bfloat16")


def test_decoder_ablation_compares_decoders_on_the_same_clips(tmp_path, capsys):
    """Two copies of the shipped decoder score the same and differ by exactly 0; a missing folder is one line."""
    from sdlite.cli.eval import main as eval_main
    from sdlite.motion import motion_dir

    shipped = motion_dir() / "decoder"
    out = tmp_path / "ablation.json"
    assert eval_main(["decoder-ablation", "--decoder", f"a={shipped}", "--decoder", f"b={shipped}", "--clips", "2",
                      "--steps", "1", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    a, b = res["rows"]["a"], res["rows"]["b"]
    assert a["psnr"] == b["psnr"] and a["identity_agreement"] == b["identity_agreement"]
    assert set(a["identity_per_label"]) == {"class_word", "hair", "shirt", "trousers", "hat"}
    assert b["vs_a"]["psnr"]["mean"] == 0 and "vs_a" not in a and res["n_clips"] == 2
    assert 0 <= a["identity_agreement"] <= 1 and a["training_steps"] >= 1
    assert eval_main(["decoder-ablation", "--decoder", f"x={tmp_path / 'none'}", "--out", str(tmp_path / "x.json")]) == 2
    assert "no decoder in" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_the_shipped_decoders_record_how_they_were_made():
    """data/motion: the shipped decoder reads the keyframes; the ablation's twin does not; both were fine-tuned the
    same number of steps from the same 3000-step decoder, and each folder records its commands."""
    from sdlite.motion import motion_dir

    folders = {name: motion_dir() / name for name in ("decoder", "decoder_no_keyframes", "decoder_3000_steps")}
    records = {name: json.loads((f / "training.json").read_text()) for name, f in folders.items()}
    configs = {name: json.loads((f / "config.json").read_text()) for name, f in folders.items()}
    assert configs["decoder"]["keyframe_attention"] is True
    assert not configs["decoder_no_keyframes"].get("keyframe_attention", False)
    assert not configs["decoder_3000_steps"].get("keyframe_attention", False)
    base = records["decoder_3000_steps"]
    assert base["trained_steps"] == 3000 and "video-decoder" in base["command"]
    for name in ("decoder", "decoder_no_keyframes"):
        rec = records[name]
        assert rec["init"]["training"] == base, name  # the same starting weights, recorded with their command
        assert rec["trained_steps"] == records["decoder"]["trained_steps"] and rec["config"] == records["decoder"]["config"]
        assert ("--keyframe-attention" in rec["command"]) == (name == "decoder")
        assert rec["parameters"] == base["parameters"]  # keyframe reading adds no parameters


def test_the_size_ablations_wide_decoder_differs_from_its_base_in_width_only():
    """data/motion/decoder_wide_3000_steps: the decoder-size row of the ablation. Same recipe, steps and data as the
    3000-step base decoder; only the channels double. Its row in results/motion_ablation.json is this folder."""
    from sdlite.motion import motion_dir

    base, wide = motion_dir() / "decoder_3000_steps", motion_dir() / "decoder_wide_3000_steps"
    configs = [json.loads((f / "config.json").read_text()) for f in (base, wide)]
    records = [json.loads((f / "training.json").read_text()) for f in (base, wide)]
    unets = [c.pop("unet_config") for c in configs]
    assert [2 * c for c in unets[0].pop("block_out_channels")] == unets[1].pop("block_out_channels")
    assert unets[0] == unets[1] and configs[0]["_class_name"] == configs[1]["_class_name"] == "VideoDecoder"
    for c in configs:  # the base decoder was saved before the keyframe flag existed: absent means off
        c.setdefault("keyframe_attention", False)
        c.pop("_diffusers_version")
    assert configs[0] == configs[1] and configs[1]["keyframe_attention"] is False
    assert records[1]["config"] == records[0]["config"] and records[1]["trained_steps"] == 3000
    assert "--size wide" in records[1]["command"] and records[1]["train_clips"] == records[0]["train_clips"]
    assert records[1]["parameters"] > 3 * records[0]["parameters"]
    rows = json.loads((ROOT / "results" / "motion_ablation.json").read_text())["rows"]
    row = next(r for r in rows.values() if Path(r["folder"]) == Path("data/motion/decoder_wide_3000_steps"))
    assert row["parameters"] == records[1]["parameters"] and row["training_steps"] == 3000
