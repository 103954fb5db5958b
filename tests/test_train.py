"""sdlite.train: every loop runs a few steps on tiny models, resumes exactly, and exports a loadable pipeline."""
import dataclasses
import json
import types

import numpy as np
import pytest
import torch

from sdlite import storyworld as sw
from sdlite.cli.train import build_parser, main, storyworld_config
from sdlite.storyworld.datasets import character_mask
from sdlite.storyworld.models import (
    StoryworldSizes, assemble_pipeline, build_clip, build_unet, build_vae, load_storyworld, storyworld_tokenizers,
    text_encoders_from_clip,
)
from sdlite.train.loop import read_log
from sdlite.train.storyworld import (
    STAGES, TrainConfig, _random_crops, default_config, train_clip, train_vae, train_vae_decoder,
)
from sdlite.train.unet import encode_text, train_unet


def _lr_at(step, cfg):
    return cfg.lr_at(step)

TINY = StoryworldSizes.named("tiny")



@pytest.fixture(scope="module")
def tokenizers():
    return storyworld_tokenizers()


def _vae_cfg(steps):
    return TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup=1, log_every=1, ckpt_every=1, crop=32)


def test_vae_loop_logs_and_resumes_exactly(tmp_path):
    train_vae(tmp_path / "a", TINY, _vae_cfg(2), progress=False)
    log = read_log(tmp_path / "a" / "vae" / "log.csv")
    assert list(log["step"]) == [1, 2] and np.isfinite(log["loss"]).all()
    with pytest.raises(FileExistsError, match="--resume"):
        train_vae(tmp_path / "a", TINY, _vae_cfg(3), progress=False)
    resumed = train_vae(tmp_path / "a", TINY, _vae_cfg(3), resume=True, progress=False)
    assert list(read_log(tmp_path / "a" / "vae" / "log.csv")["step"]) == [1, 2, 3]  # one new step, not three
    straight = train_vae(tmp_path / "b", TINY, _vae_cfg(3), progress=False)
    for (name, p), (_, q) in zip(resumed.named_parameters(), straight.named_parameters()):
        torch.testing.assert_close(p, q, msg=name)
    cfg = json.loads((tmp_path / "a" / "vae" / "final" / "config.json").read_text())
    assert cfg["scaling_factor"] > 0 and cfg["scaling_factor"] != 0.18215  # measured, not the SD default


def test_clip_loop_learns_from_pairs(tmp_path, tokenizers):
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup=1, log_every=1, ckpt_every=1)
    clip = train_clip(tmp_path, TINY, cfg, tokenizers[0], progress=False)
    log = read_log(tmp_path / "clip" / "log.csv")
    assert list(log["step"]) == [1, 2] and (log["accuracy"] >= 0).all() and np.isfinite(log["loss"]).all()
    assert (tmp_path / "clip" / "final" / "config.json").is_file()
    assert clip.logit_scale.item() <= np.log(100) + 1e-6


def test_unet_loop_collage_pretraining_and_export(tmp_path, tokenizers):
    train_vae(tmp_path, TINY, _vae_cfg(1), progress=False)
    train_clip(tmp_path, TINY, TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1), tokenizers[0],
               progress=False)
    cfg = TrainConfig(steps=2, batch_size=8, lr=1e-3, warmup=1, log_every=1, ckpt_every=1, k=2, probe_groups=2)
    train_unet(tmp_path, TINY, cfg, tokenizers[0], progress=False, export=tmp_path / "pipe")
    log = read_log(tmp_path / "unet" / "log.csv")
    assert list(log["step"]) == [1, 2]
    for col in ("group", "single", "probe_joint", "probe_plain"):
        assert np.isfinite(log[col]).all() and (log[col] > 0).all(), col
    # joint attention really changes the prediction (the probe differs from plain attention)
    assert not np.allclose(log["probe_joint"], log["probe_plain"])
    cfg = dataclasses.replace(cfg, steps=3)
    train_unet(tmp_path, TINY, cfg, tokenizers[0], resume=True, progress=False)
    assert list(read_log(tmp_path / "unet" / "log.csv")["step"]) == [1, 2, 3]
    pipe = load_storyworld(folder=tmp_path / "pipe")
    img = pipe("a boy walking in the park", num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (1, 64, 64, 3)
    meta = json.loads((tmp_path / "pipe" / "training.json").read_text())
    assert meta["parameters"]["unet"] > 0 and (tmp_path / "pipe" / "logs" / "unet.csv").is_file()


def test_perceptual_loss_reads_labels_off_the_reconstruction(tmp_path, capsys):
    """The decoder stage's perceptual term: 0 for a perfect reconstruction, > 0 for a blurred one, gradients reach
    the reconstruction (not the frozen recognizer); the stage logs it and asks for the recognizer file it needs."""
    from sdlite.storyworld.recognizer import Recognizer, load_recognizer
    from sdlite.train.recognizer import save_recognizer
    from sdlite.train.storyworld import perceptual_loss

    rec_net = load_recognizer().requires_grad_(False)  # a trained one, so labels mean something
    x = torch.stack([sw.ImageDataset(4, seed=3)[i]["pixel_values"] for i in range(4)])
    assert perceptual_loss(rec_net, x, x).abs() < 1e-6
    blurred = torch.nn.functional.avg_pool2d(x, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).requires_grad_()
    loss = perceptual_loss(rec_net, blurred, x)
    loss.backward()
    assert loss > 1e-4 and blurred.grad.abs().sum() > 0
    assert all(p.grad is None for p in rec_net.parameters())
    train_vae(tmp_path, TINY, _vae_cfg(1), progress=False)
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup=1, log_every=1, ckpt_every=1, perceptual_weight=0.1,
                      perceptual_recognizer=str(tmp_path / "missing.safetensors"))
    with pytest.raises(FileNotFoundError, match="python -m sdlite.train recognizer"):
        train_vae_decoder(tmp_path, cfg, progress=False)
    torch.manual_seed(0)
    save_recognizer(Recognizer("a"), tmp_path / "perceiver.safetensors")
    cfg = dataclasses.replace(cfg, perceptual_recognizer=str(tmp_path / "perceiver.safetensors"))
    train_vae_decoder(tmp_path, cfg, progress=False)  # the failed call wrote nothing: no --resume needed
    log = read_log(tmp_path / "decoder" / "log.csv")
    assert list(log["step"]) == [1, 2] and (log["perceptual"] > 0).all()
    assert main(["storyworld", "--stage", "decoder", "--out", str(tmp_path), "--perceptual-weight", "-1"]) == 2
    assert "perceptual_weight" in capsys.readouterr().err


def test_decoder_stage_tunes_only_the_decoder_and_export_uses_it(tmp_path, tokenizers):
    from diffusers import AutoencoderKL

    train_vae(tmp_path, TINY, _vae_cfg(1), progress=False)
    before = AutoencoderKL.from_pretrained(tmp_path / "vae" / "final")
    cfg = TrainConfig(steps=2, batch_size=2, lr=1e-2, warmup=1, log_every=1, ckpt_every=1, character_weight=4.0)
    tuned = train_vae_decoder(tmp_path, cfg, progress=False)
    log = read_log(tmp_path / "decoder" / "log.csv")
    assert list(log["step"]) == [1, 2] and np.isfinite(log["l1_character"]).all()
    a, b = before.state_dict(), tuned.state_dict()
    enc = [k for k in a if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in a if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and dec
    for k in enc:  # the latent space the UNet learned stays exactly the same
        torch.testing.assert_close(a[k], b[k], msg=k)
    assert any(not torch.equal(a[k], b[k]) for k in dec)
    assert tuned.config.scaling_factor == before.config.scaling_factor
    with pytest.raises(FileExistsError, match="--resume"):
        train_vae_decoder(tmp_path, cfg, progress=False)
    # the exported pipeline carries the tuned decoder
    train_clip(tmp_path, TINY, TrainConfig(steps=1, batch_size=4, lr=1e-3, log_every=1), tokenizers[0],
               progress=False)
    train_unet(tmp_path, TINY, TrainConfig(steps=1, batch_size=8, lr=1e-3, warmup=1, log_every=1, k=2,
                                           probe_groups=2), tokenizers[0], progress=False, export=tmp_path / "by_unet")
    main(["storyworld", "--stage", "export", "--size", "tiny", "--out", str(tmp_path), "--export",
          str(tmp_path / "pipe")])
    pipe = load_storyworld(folder=tmp_path / "pipe")
    by_unet = load_storyworld(folder=tmp_path / "by_unet")  # the UNet stage's own export (a UNet trained on later)
    for k in dec[:3]:
        torch.testing.assert_close(pipe.vae.state_dict()[k], b[k].half().float(), msg=k)
        torch.testing.assert_close(by_unet.vae.state_dict()[k], b[k].half().float(), msg=k)
    # a run stopped by hand after a checkpoint: export takes the checkpoint's EMA weights when they are newer
    from safetensors.torch import load_file, save_file

    from sdlite.train.storyworld import latest_unet_weights

    state, step = latest_unet_weights(tmp_path)
    assert step == 1 and set(state) == set(pipe.unet.state_dict())
    ckpt = tmp_path / "unet" / "checkpoint"
    newer = {k: v + 1.0 for k, v in load_file(str(ckpt / "ema.safetensors")).items()}
    save_file(newer, str(ckpt / "ema.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": 7}))
    state, step = latest_unet_weights(tmp_path)
    assert step == 7 and all(torch.equal(state[k], newer[k]) for k in newer)
    with pytest.raises(FileNotFoundError, match="--stage unet"):
        latest_unet_weights(tmp_path / "nothing")


def test_encode_text_matches_the_pipeline(tokenizers):
    tok1, tok2 = tokenizers
    clip = build_clip(TINY, tok1, seed=1)
    pipe = assemble_pipeline(build_vae(TINY), clip, build_unet(TINY), tok1)
    te1, te2 = text_encoders_from_clip(clip)
    caps = ["a boy with red hair, walking in the park", "a woman, sitting at night"]
    with torch.no_grad():
        text, pooled = encode_text(te1, te2, tok1, tok2, caps)
        ref, _, ref_pooled, _ = pipe.encode_prompt(caps, device="cpu", do_classifier_free_guidance=False)
    assert text.shape == (2, tok1.model_max_length, 2 * TINY.text_hidden)
    torch.testing.assert_close(text, ref)
    torch.testing.assert_close(pooled, ref_pooled)


def test_character_mask_covers_the_character_only():
    rng = np.random.default_rng(0)
    panel = sw.sample_panel(rng)
    mask = character_mask(panel)
    assert mask.shape == (16, 16) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0.03 < mask.mean() < 0.5
    assert mask[0, 0] == 0 and mask[0, -1] == 0  # the sky corners are background
    col = int(round(panel.x * 16))
    assert mask[:, max(0, col - 2) : col + 2].sum() > 0  # something at the character's x position


def test_the_hair_mask_is_the_part_of_the_character_mask_that_the_hair_changes():
    for seed in range(4):
        panel = sw.sample_panel(np.random.default_rng(seed))
        body, hair = character_mask(panel), character_mask(panel, attributes=("hair",))
        assert 0 < hair.sum() < body.sum() and torch.all(hair <= body)  # inside the character, not all of it
        rows = hair.nonzero()[:, 0]
        assert rows.float().mean() < body.nonzero()[:, 0].float().mean()  # above the character's middle: the head
    with pytest.raises(ValueError, match="hair"):
        character_mask(panel, attributes=("scene",))
    with pytest.raises(ValueError, match="one or more"):
        character_mask(panel, attributes=())


def test_cell_weight_adds_to_the_character_weight_where_it_is_given():
    from sdlite.train.unet import UnetTrainer

    class Echo(torch.nn.Module):  # a "UNet" whose error is the same everywhere but in one cell
        def forward(self, noisy, t, text, added_cond_kwargs):
            return types.SimpleNamespace(sample=torch.zeros_like(noisy))

    latents, gen = torch.zeros(2, 4, 16, 16), torch.Generator().manual_seed(0)
    noise = torch.ones(2, 4, 16, 16)
    noise[:, :, 3, 5] = 3.0  # the error there is 9 instead of 1
    cell = torch.zeros(2, 16, 16)
    cell[:, 3, 5] = 1.0
    timesteps = torch.tensor([500, 500])

    def loss(cw, mask, cell_weight=None):
        cfg = TrainConfig(steps=1, batch_size=2, lr=1.0, character_weight=cw)
        trainer = UnetTrainer(None, None, None, None, None, cfg, "cpu")
        return trainer.loss(Echo(), latents, None, None, None, mask, gen, timesteps, noise, cell_weight=cell_weight)

    plain = loss(0.0, torch.zeros(2, 16, 16))
    torch.testing.assert_close(loss(0.0, torch.zeros(2, 16, 16), 6.0 * cell), loss(6.0, cell))
    assert loss(0.0, torch.zeros(2, 16, 16), 6.0 * cell) > plain
    torch.testing.assert_close(loss(0.0, torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)), plain)


def test_random_crops_are_seeded():
    x = torch.arange(2 * 3 * 64 * 64, dtype=torch.float32).view(2, 3, 64, 64)
    a = _random_crops(x, 32, torch.Generator().manual_seed(0))
    b = _random_crops(x, 32, torch.Generator().manual_seed(0))
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)


def test_learning_rate_warms_up_holds_then_cools_down():
    cfg = TrainConfig(steps=100, batch_size=1, lr=1.0, warmup=10, decay_steps=20)
    lrs = [_lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warm-up
    assert all(lr == 1.0 for lr in lrs[9:81])  # constant until the cool-down starts
    assert lrs[80] == pytest.approx(1.0) and lrs[90] == pytest.approx(0.5) and lrs[99] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:]))  # falls every step to the end
    # the constant middle is why a resumed run with more steps and a cool-down equals one longer run:
    short = TrainConfig(steps=60, batch_size=1, lr=1.0, warmup=10)
    assert [_lr_at(s, short) for s in range(60)] == lrs[:60]
    assert _lr_at(99, TrainConfig(steps=100, batch_size=1, lr=1.0, warmup=10)) == 1.0  # decay_steps=0: constant


def test_command_line_overrides_keep_defaults_and_honour_zero():
    args = lambda *a: build_parser().parse_args(["storyworld", "--out", "runs/x", *a])  # noqa: E731
    assert storyworld_config("unet", args()) == default_config("unet")
    cfg = storyworld_config("unet", args("--group-fraction", "0", "--steps", "6000", "--decay-steps", "500"))
    assert (cfg.group_fraction, cfg.steps, cfg.decay_steps, cfg.batch_size) == (0.0, 6000, 500, 16)
    with pytest.raises(ValueError, match="group_fraction in"):
        storyworld_config("unet", args("--group-fraction", "2"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.steps = 1  # a config is frozen: variants come from dataclasses.replace
    from sdlite.cli.train import STAGES as CLI_STAGES

    assert CLI_STAGES == STAGES  # the parser's copy of the stage names (kept light) matches


def test_bad_input_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(ValueError, match="one of"):
        default_config("gan")
    (tmp_path / "exists").mkdir()
    assert main(["storyworld", "--stage", "vae", "--out", str(tmp_path / "run"), "--export",
                 str(tmp_path / "exists")]) == 2
    assert "--force" in capsys.readouterr().err


def test_quick_checks_run_and_report_fractions(tokenizers):
    from sdlite.eval.checks import csa_check, prompt_following, prompt_following_scores, vae_check
    from sdlite.storyworld.recognizer import Recognizer

    torch.manual_seed(0)
    rec = Recognizer("a").eval()
    tok = tokenizers[0]
    pipe = assemble_pipeline(build_vae(TINY), build_clip(TINY, tok), build_unet(TINY), tok)
    pipe.set_progress_bar_config(disable=True)
    pf = prompt_following(pipe, rec, n=2, steps=2, batch=2)
    assert set(pf) == set(sw.ATTRIBUTES) and all(0 <= v <= 1 for v in pf.values())
    # a scorer cross-checked with itself agrees everywhere; another scorer reads the same images differently
    same = prompt_following_scores(pipe, {"a": rec, "copy": rec}, n=2, steps=2, batch=2)
    assert same["accuracy"]["a"] == pf and same["agreement"] == {a: 1.0 for a in sw.ATTRIBUTES}
    assert same["accuracy_where_agreed"] == pf
    torch.manual_seed(1)
    other = prompt_following_scores(pipe, {"a": rec, "other": Recognizer("a").eval()}, n=4, steps=2, batch=2)
    assert other["accuracy"]["a"] != other["accuracy"]["other"] or min(other["agreement"].values()) < 1.0
    res = csa_check(pipe, rec, stories=1, steps=2, settings={"none": None, "csa": dict(rate=0.5, layers="all")})
    for row in res.values():
        assert 0 <= row["identity_agreement"] <= 1 and 0 <= row["scene_accuracy"] <= 1
        # agreement over the 6 pairs of 4 panels comes in sixths
        assert abs(row["agree_hair"] * 6 - round(row["agree_hair"] * 6)) < 1e-9
    assert not any("Consistent" in type(p).__name__ for p in pipe.unet.attn_processors.values())  # removed
    v = vae_check(pipe.vae, rec, n=4)
    assert v["l1"] > 0 and set(v["accuracy_reconstructions"]) == set(sw.ATTRIBUTES)


def test_loop_checkpoint_round_trips_and_refuses_a_second_run(tmp_path):
    """train/loop.py: one checkpoint format (model, optimizer, extra tensors, JSON state), written atomically."""
    from sdlite.train.loop import load_checkpoint, save_checkpoint, start_run, warmup_cosine, warmup_hold_cooldown

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    save_checkpoint(tmp_path / "run" / "checkpoint", 7, model, opt, tensors={"ema": {"w": torch.ones(2)}},
                    state={"history": {"loss": [0.5]}})
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    other = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.1)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint", other, opt2)
    assert ckpt.step == 7 and ckpt.state == {"history": {"loss": [0.5]}}
    torch.testing.assert_close(ckpt.tensors["ema"]["w"], torch.ones(2))
    torch.testing.assert_close(other.weight, model.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert start_run(tmp_path / "run", True, other, opt2).step == 7
    (tmp_path / "run" / "log.csv").write_text("step\n1\n")
    with pytest.raises(FileExistsError, match="--resume"):
        start_run(tmp_path / "run", False, other, opt2)
    assert start_run(tmp_path / "fresh", True, other, opt2).step == 0  # nothing to resume: a fresh start
    # schedules: warm-up, hold, cool-down to 0; cosine from 1 to the floor
    assert [warmup_hold_cooldown(s, 10, 2, 4) for s in (0, 1, 5, 9)] == [0.5, 1.0, 1.0, 0.25]
    assert warmup_cosine(0, 100, 1) == 1.0 and warmup_cosine(100, 100, 1, floor=0.1) == pytest.approx(0.1)
