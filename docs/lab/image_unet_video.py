"""A probe for issue #14: a video model built on storyworld's *image* UNet (AnimateDiff's way), not a new small one.

The polish (notebook 06 section 6) showed that the image model keeps the character where the 0.44 M-parameter
decoder smears it. Here the image UNet itself becomes the video model: diffusers' `UNetMotionModel.from_unet2d`
adds motion modules (temporal attention, their output projections zeroed so training starts from the image
model), the input convolution is widened to also read the two keyframe latents (new weights zeroed), and the
frames' spatial self-attention reads the keyframes' tokens (`sdlite.keyframe_attention`: the image UNet was
trained on collages to copy across images). Trained with the image UNet's own objective (the noise, plain MSE) on
the motion cache's clips with their captions through the story pipeline's text encoders; sampled with DDIM and
classifier-free guidance, the keyframes pinned as `sdlite.video.sample_latents` does.

    python docs/lab/image_unet_video.py train --steps 1500 --out runs/image_unet_video
    python docs/lab/image_unet_video.py eval --out runs/image_unet_video --clips 100 --json results/image_unet_video.json

Not part of sdlite: a measurement of whether this road reaches the #14 bar.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, MotionAdapter, UNetMotionModel

from sdlite.eval.transitions import EVAL_SEED, PER_CLIP
from sdlite.eval.video_metrics import IDENTITY_LABELS, video_metrics
from sdlite.keyframe_attention import install_keyframe_attention
from sdlite.motion import linear_interpolation
from sdlite.pipeline import load_pipeline
from sdlite.storyworld.datasets import ClipDataset
from sdlite.storyworld.recognizer import load_recognizer
from sdlite.train.motion import load_cache
from sdlite.video import decode_latents, encode_latents

FRAMES = 16


def build(pipe, seed: int = 0) -> UNetMotionModel:
    """The image UNet + motion modules (zeroed outputs) + keyframe channels (zeroed) + keyframe reading."""
    c = pipe.unet.config
    torch.manual_seed(seed)
    adapter = MotionAdapter(block_out_channels=c.block_out_channels, motion_layers_per_block=1,
                            motion_num_attention_heads=2, motion_norm_num_groups=8, motion_max_seq_length=32)
    model = UNetMotionModel.from_unet2d(pipe.unet, adapter)
    model.add_embedding.load_state_dict(pipe.unet.add_embedding.state_dict())  # from_unet2d leaves it untrained
    for module in model.modules():  # each motion module starts as the identity (its residual output zero)
        if type(module).__name__ == "AnimateDiffTransformer3D":
            torch.nn.init.zeros_(module.proj_out.weight)
            torch.nn.init.zeros_(module.proj_out.bias)
    old = model.conv_in
    new = torch.nn.Conv2d(old.in_channels * 3, old.out_channels, old.kernel_size, padding=old.padding)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[:, : old.in_channels] = old.weight
        new.bias.copy_(old.bias)
    model.conv_in = new
    model.register_to_config(in_channels=old.in_channels * 3)
    install_keyframe_attention(model, FRAMES)
    return model


def conditions(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Captions -> the story pipeline's prompt embeddings (N, T, D) and pooled embeddings (N, P)."""
    out_e, out_p = [], []
    with torch.no_grad():
        for i in range(0, len(captions), 256):
            e, _, p, _ = pipe.encode_prompt(captions[i : i + 256], device="cpu", num_images_per_prompt=1,
                                            do_classifier_free_guidance=False)
            out_e.append(e)
            out_p.append(p)
    return torch.cat(out_e), torch.cat(out_p)


def run(model, noisy, t, z0, z1, ehs, pooled):
    """(B, L, C, h, w) -> predicted noise (B, L, C, h, w)."""
    b, frames = noisy.shape[:2]
    keys = torch.cat([z0, z1], 1).unsqueeze(1).expand(-1, frames, -1, -1, -1)
    x = torch.cat([noisy, keys], 2).permute(0, 2, 1, 3, 4)  # (B, 3C, L, h, w)
    size = noisy.shape[-1] * 4
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=x.dtype).expand(b, -1)
    ehs = ehs.repeat_interleave(frames, 0)  # (B * L, T, D): UNetMotionModel takes one context per frame
    out = model(x, t, encoder_hidden_states=ehs, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids})
    return out.sample.permute(0, 2, 1, 3, 4)


def train(args) -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline()
    model = build(pipe)
    cache = load_cache(args.cache)
    lat = cache["latents"]  # (N, L, C, h, w)
    ehs, pooled = conditions(pipe, cache["captions"])
    empty_e, empty_p = conditions(pipe, [""])
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start = 0
    if (out / "checkpoint.pt").is_file():
        state = torch.load(out / "checkpoint.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    model.train()
    t0 = time.time()
    for step in range(start, args.steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(len(lat), (args.batch_size,), generator=g)
        z = lat[idx]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (args.batch_size,), generator=g)
        noisy = sched.add_noise(z, noise, t)
        drop = (torch.rand(args.batch_size, generator=g) < 0.1).view(-1, 1)
        e = torch.where(drop.unsqueeze(-1), empty_e, ehs[idx])
        p = torch.where(drop, empty_p, pooled[idx])
        for group in opt.param_groups:  # 100 warm-up steps
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        loss = F.mse_loss(run(model, noisy, t, z[:, 0], z[:, -1], e, p), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % 250 == 0 or step + 1 == args.steps:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, out / "checkpoint.pt")
    (out / "training.json").write_text(json.dumps({"command": args.command, "steps": args.steps,
                                                   "batch_size": args.batch_size, "lr": args.lr,
                                                   "parameters": sum(p.numel() for p in model.parameters()),
                                                   "seconds_this_run": round(time.time() - t0, 1)}, indent=1))


@torch.no_grad()
def sample(model, sched, z0, z1, e, p, empty_e, empty_p, steps: int, guidance: float, generator) -> torch.Tensor:
    """DDIM with classifier-free guidance, the keyframes pinned (noised to each level): (B, L, C, h, w)."""
    b = z0.shape[0]
    sched.set_timesteps(steps)
    noise = torch.randn((b, FRAMES, *z0.shape[1:]), generator=generator)
    ends = torch.stack([z0, z1], 1)  # (B, 2, C, h, w)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        x[:, [0, -1]] = sched.add_noise(ends, noise[:, [0, -1]], t.view(1))
        x_in = torch.cat([x, x])
        eps = run(model, x_in, t, torch.cat([z0, z0]), torch.cat([z1, z1]), torch.cat([empty_e.expand_as(e), e]),
                  torch.cat([empty_p.expand_as(p), p]))
        eps_u, eps_c = eps.chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        step = sched.step(eps, t, x)
        x = step.pred_original_sample if t == sched.timesteps[-1] else step.prev_sample
    x[:, [0, -1]] = ends
    return x


def evaluate(args) -> None:
    torch.set_num_threads(1)
    pipe = load_pipeline()
    model = build(pipe)
    state = torch.load(Path(args.out) / "checkpoint.pt")
    model.load_state_dict(state["model"])
    model.eval()
    from sdlite.video import load_video_models

    models, recognizer = load_video_models(decoder=False, predictor=False), load_recognizer()
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    empty_e, empty_p = conditions(pipe, [""])
    data = ClipDataset(args.clips, frames=FRAMES, seed=EVAL_SEED)
    per: dict[str, list] = {}
    t0 = time.time()
    for first in range(0, args.clips, 10):
        items = [data[i] for i in range(first, min(args.clips, first + 10))]
        x = torch.stack([it["frames"] for it in items])
        z0, z1 = encode_latents(pipe.vae, x[:, 0]), encode_latents(pipe.vae, x[:, -1])
        e, p = conditions(pipe, [it["caption"] for it in items])
        z = sample(model, sched, z0, z1, e, p, empty_e, empty_p, args.sample_steps, args.guidance,
                   torch.Generator().manual_seed(EVAL_SEED + first))
        video = decode_latents(pipe.vae, z)
        true_e = models.embedder(x.reshape(-1, *x.shape[2:])).reshape(len(items), FRAMES, -1)
        for k, v in video_metrics(video, x, models.embedder, true_e, recognizer).items():
            per.setdefault(k, []).append(v)
        print(f"{first + len(items)}/{args.clips} clips ({time.time() - t0:.0f} s)", flush=True)
    means = {k: float(torch.cat(v).mean()) for k, v in per.items()}
    result = {"command": args.command, "checkpoint_step": state["step"], "n_clips": args.clips, "seed": EVAL_SEED,
              "sample_steps": args.sample_steps, "guidance": args.guidance, "psnr": means["psnr"],
              "identity_agreement": means["identity_agreement"],
              "identity_per_label": {k: means[f"identity_{k}"] for k in IDENTITY_LABELS},
              "per_clip": {k: torch.cat(per[k]).tolist() for k in PER_CLIP}, "seconds": round(time.time() - t0, 1)}
    print(json.dumps({k: v for k, v in result.items() if k != "per_clip"}, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


def main() -> None:
    import sys

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("job", choices=("train", "eval"))
    ap.add_argument("--out", default="runs/image_unet_video")
    ap.add_argument("--cache", default="runs/motion/train_grid4")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.command = "python docs/lab/image_unet_video.py " + " ".join(sys.argv[1:])
    train(args) if args.job == "train" else evaluate(args)


if __name__ == "__main__":
    main()
