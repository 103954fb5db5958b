"""sdlite.frame_polish: the image model redraws a transition's in-between frames, reading the keyframes."""
import json

import pytest
import torch

from sdlite.eval import transitions
from sdlite.cli.video import POLISH_STRENGTH
from sdlite.frame_polish import STORYWORLD_POLISH_STRENGTH, check_strength, low_pass, polish_latents
from sdlite.pipeline import load_pipeline
from sdlite.tiny import tiny_sd15_pipeline, tiny_sdxl_pipeline

STEPS = 4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """A tiny SDXL in the real folder layout, loaded back through `load_pipeline` (as a user's SDXL folder)."""
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    tiny_sdxl_pipeline(folder, seed=0)
    return load_pipeline(folder)


def _clips(pipe, b=2, frames=5, seed=0):
    c, s = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn(b, frames, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_polish_redraws_only_the_in_between_frames_and_is_seeded(sdxl):
    z = _clips(sdxl)
    prompts = ["a girl walking", "a boy waving"]
    out = polish_latents(sdxl, z, prompts, 0.5, steps=STEPS, seed=3)
    assert out.shape == z.shape and torch.isfinite(out).all()
    assert torch.equal(out[:, 0], z[:, 0]) and torch.equal(out[:, -1], z[:, -1])  # the keyframes stay
    assert not torch.allclose(out[:, 1:-1], z[:, 1:-1])
    torch.testing.assert_close(polish_latents(sdxl, z, prompts, 0.5, steps=STEPS, seed=3), out, rtol=0, atol=0)
    assert not torch.allclose(polish_latents(sdxl, z, prompts, 0.5, steps=STEPS, seed=4), out)
    same = polish_latents(sdxl, z, prompts, 0.0, steps=STEPS)
    assert torch.equal(same, z) and same is not z  # strength 0: nothing redrawn
    # a higher strength moves the frames further from where they started
    far = polish_latents(sdxl, z, prompts, 1.0, steps=STEPS, seed=3)
    assert (far - z)[:, 1:-1].abs().mean() > (out - z)[:, 1:-1].abs().mean()


def test_the_frames_read_the_keyframes_only_when_asked(sdxl):
    """With keyframe reading, changing a keyframe changes the redrawn frames (they attend to its tokens); without
    it, the frames are plain img2img and do not depend on the keyframes at all."""
    z = _clips(sdxl, b=1)
    other = z.clone()
    other[:, 0] = torch.randn(other[:, 0].shape, generator=torch.Generator().manual_seed(9))
    kw = dict(steps=STEPS, seed=1)
    plain, plain_other = (polish_latents(sdxl, x, ["a girl"], 0.6, read_keyframes=False, **kw) for x in (z, other))
    torch.testing.assert_close(plain[:, 1:-1], plain_other[:, 1:-1], rtol=0, atol=0)
    read, read_other = (polish_latents(sdxl, x, ["a girl"], 0.6, **kw) for x in (z, other))
    assert not torch.allclose(read[:, 1:-1], read_other[:, 1:-1])
    assert not torch.allclose(read[:, 1:-1], plain[:, 1:-1])
    before = {k: type(v) for k, v in sdxl.unet.attn_processors.items()}
    polish_latents(sdxl, z, ["a girl"], 0.6, **kw)
    assert {k: type(v) for k, v in sdxl.unet.attn_processors.items()} == before  # the processors are put back


def test_one_noise_draw_serves_every_frame_of_a_clip(sdxl):
    """Two equal in-between frames come out equal (the same noise for each frame: no flicker from the redraw)."""
    z = _clips(sdxl, b=1)
    z[:, 2] = z[:, 1]
    for read in (False, True):
        out = polish_latents(sdxl, z, ["a girl"], 0.5, steps=STEPS, seed=2, read_keyframes=read)
        torch.testing.assert_close(out[:, 2], out[:, 1], rtol=1e-5, atol=1e-5)
        apart = polish_latents(sdxl, z, ["a girl"], 0.5, steps=STEPS, seed=2, read_keyframes=read, shared_noise=False)
        assert not torch.allclose(apart[:, 2], apart[:, 1], atol=1e-3)  # a draw per frame: they drift apart


def test_low_pass_is_the_block_mean_and_a_projection():
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lp = low_pass(z, 4)
    torch.testing.assert_close(lp[..., :4, :4], z[..., :4, :4].mean(dim=(-2, -1), keepdim=True).expand(-1, -1, 4, 4))
    torch.testing.assert_close(low_pass(lp, 4), lp)  # putting the coarse part back twice changes nothing
    assert torch.equal(low_pass(z, 1), z)
    with pytest.raises(ValueError, match="must divide"):
        low_pass(z, 3)


def test_keep_structure_keeps_the_coarse_latent_and_redraws_the_rest(sdxl):
    """ILVR: the redrawn frames' block means are the input's (to float error), their detail is new; keep_structure=1
    gives the input latents back, each step's latents being the input noised to that step's level."""
    z = _clips(sdxl, b=1)
    free = polish_latents(sdxl, z, ["a girl"], 0.8, steps=STEPS, seed=5)
    kept = polish_latents(sdxl, z, ["a girl"], 0.8, steps=STEPS, seed=5, keep_structure=2)
    mid = (slice(None), slice(1, -1))
    torch.testing.assert_close(low_pass(kept[mid].flatten(0, 1), 2), low_pass(z[mid].flatten(0, 1), 2),
                               rtol=0, atol=1e-5)
    assert not torch.allclose(low_pass(free[mid].flatten(0, 1), 2), low_pass(z[mid].flatten(0, 1), 2), atol=1e-2)
    assert not torch.allclose(kept[mid], z[mid], atol=1e-2)  # the detail is redrawn
    torch.testing.assert_close(polish_latents(sdxl, z, ["a girl"], 0.8, steps=STEPS, seed=5, keep_structure=1), z,
                               rtol=0, atol=1e-5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="keep_structure"):
            polish_latents(sdxl, z, ["a girl"], 0.5, keep_structure=bad)
    with pytest.raises(ValueError, match="must divide"):
        polish_latents(sdxl, z, ["a girl"], 0.5, keep_structure=3)


def test_polish_runs_on_sd15_too(tmp_path):
    tiny_sd15_pipeline(tmp_path / "sd15", seed=0)
    pipe = load_pipeline(tmp_path / "sd15")
    z = _clips(pipe, b=1, frames=3)
    out = polish_latents(pipe, z, ["a cat"], 0.5, steps=STEPS)
    assert out.shape == z.shape and not torch.allclose(out[:, 1], z[:, 1])


def test_bad_input_is_refused_before_any_work(sdxl):
    z = _clips(sdxl)
    for bad in (-0.1, 1.5, True, "0.3", float("nan")):
        with pytest.raises(ValueError, match="strength"):
            polish_latents(sdxl, z, ["a", "b"], bad)
    assert check_strength(1) == 1.0
    with pytest.raises(ValueError, match="one prompt per clip"):
        polish_latents(sdxl, z, ["a"], 0.3)
    with pytest.raises(ValueError, match="L >= 3"):
        polish_latents(sdxl, z[:, :2], ["a", "b"], 0.3)
    with pytest.raises(ValueError, match=r"\(B, L, C, h, w\)"):
        polish_latents(sdxl, z[0], ["a", "b"], 0.3)


def test_the_polish_strength_is_chosen_by_frame_identity_with_ties_to_the_lower():
    sweep = {"0": {"psnr": 24.0, "identity_agreement": 0.9},  # unpolished: never chosen
             "0.1": {"psnr": 23.0, "identity_agreement": 0.7}, "0.2": {"psnr": 22.0, "identity_agreement": 0.75},
             "0.5": {"psnr": 20.0, "identity_agreement": 0.75}}
    assert transitions.choose_polish_strength(sweep) == 0.2
    sweep["0.5"]["identity_agreement"] = 0.76
    assert transitions.choose_polish_strength(sweep) == 0.5
    with pytest.raises(ValueError, match="no polished row"):
        transitions.choose_polish_strength({"0": sweep["0"]})


def test_the_committed_table_records_the_polished_method():
    """results/motion.json: (d) polished, next to (d), at the strength chosen on the tuning clips."""
    from pathlib import Path

    res = json.loads((Path(__file__).resolve().parents[1] / "results" / "motion.json").read_text())
    polish = res["polish"]
    assert polish["chosen_on"]["seed"] == transitions.TUNING_SEED != res["seed"]
    assert polish["strength"] == transitions.choose_polish_strength(polish["chosen_on"]["sweep"])
    assert polish["strength"] == STORYWORLD_POLISH_STRENGTH == POLISH_STRENGTH  # what `--polish` alone uses
    assert "--methods" in res["command"] and transitions.POLISHED in res["command"]
    assert res["identity_agreement_full_polished"] == res["metrics"][transitions.POLISHED]["identity_agreement"]
    assert res["identity_agreement_full"] == res["metrics"]["full"]["identity_agreement"]
