"""Polishing a transition: the image model redraws the in-between frames, reading the keyframes (notebook 06).

The video decoder is small: its in-between frames are blurred averages, and the character loses its hair, hat or
shape on the way (`results/motion.json`: frame identity about 0.52, against 0.89 for the true frames through the
VAE). The image model of the story draws characters far better. So after the decoder, each in-between frame's latent
is handed to the image model as a starting point (SDEdit, "img2img"):

    1. noise the frame latents to the level `strength` of the schedule     z_t = add_noise(z, noise, t_strength)
    2. denoise them with the clip's prompt for the last `strength` of the steps (diffusers' img2img pipeline)
    3. while denoising, every frame's self-attention also reads the keyframes' tokens (consistent self-attention
       with a bank, as notebook 03 reads a character's stored references): the keyframes are noised and denoised
       the same way first, their tokens written to the bank at every step (`write`), then the frames `read` them.

One noise draw serves every frame of a clip (the keyframes' too): a redraw that differs from frame to frame would
flicker. The keyframes' own outputs are thrown away: the clip still starts and ends on the true keyframes.

What it buys and costs is measured, not assumed (`python -m sdlite.eval transitions --methods full,full_polished`):
the redrawn frames keep the character better but follow the true in-between frames less closely in PSNR (a sharp
guess is punished more than a blurred average when it is wrong).
"""
from __future__ import annotations

import torch

from .attention import install_consistent_attention
from .pipeline import CSAConfig, model_defaults, new_bank

# storyworld's strength, chosen by `python -m sdlite.eval transitions --methods ...,full_polished` on clips of its
# own (the highest frame identity of 0.1 / 0.2 / 0.3 / 0.5; results/motion.json "polish"). A test keeps them equal.
STORYWORLD_POLISH_STRENGTH = 0.5


def check_strength(strength: float) -> float:
    """The share of the schedule that is redrawn: 0 (nothing) ... 1 (from pure noise)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise ValueError(f"polish strength={strength!r}: use a number in [0, 1] (e.g. 0.5; 0 turns polishing off)")
    return float(strength)


def image_to_image_pipeline(pipe):
    """diffusers' img2img pipeline on the same components (no copy of the weights)."""
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


@torch.no_grad()
def polish_latents(pipe, latents: torch.Tensor, prompts: list[str],
                   strength: float = STORYWORLD_POLISH_STRENGTH, *, steps: int | None = None,
                   guidance_scale: float | None = None, seed: int = 0,
                   read_keyframes: bool = True, shared_noise: bool = True,
                   csa: CSAConfig | None = None) -> torch.Tensor:
    """Redraw the in-between frames of clips with the image model `pipe` (storyworld's, or an SDXL / SD1.5
    pipeline whose VAE made the latents).

    latents: scaled VAE latents (B, L, C, h, w), frame 0 and L-1 the keyframes; prompts: one per clip;
    strength: the share of the `steps`-step schedule that is redrawn (0: return the latents unchanged);
    read_keyframes: the frames' self-attention reads the keyframes' tokens (the CSA bank), else plain img2img;
    shared_noise: one noise draw for every frame of a clip (else a draw per frame; for the ablation);
    csa: its settings (default: the model's CSA defaults). Returns latents of the same shape, keyframes unchanged;
    clip b's noise comes from `torch.Generator().manual_seed(seed + b)`."""
    strength = check_strength(strength)
    if latents.ndim != 5 or latents.shape[1] < 3:
        raise ValueError(f"latents must be (B, L, C, h, w) with L >= 3 (two keyframes and a frame between them), "
                         f"got {tuple(latents.shape)}")
    if len(prompts) != latents.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {latents.shape[0]} clips: pass one prompt per clip")
    if strength == 0.0:
        return latents.clone()
    defaults = model_defaults(pipe)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    csa = (csa or CSAConfig()).with_model_defaults(defaults)
    i2i = image_to_image_pipeline(pipe)
    handle = None
    if read_keyframes:  # one install for every clip: each clip reseeds it and starts from an empty bank
        handle = install_consistent_attention(
            pipe.unet, rate=csa.rate, layers=csa.layers, guidance_halves=guidance_scale > 1.0,
            first_steps_without_csa=csa.first_steps_without_csa, sampling=csa.sampling, seed=seed,
            bank=new_bank(csa), vae_scale_factor=pipe.vae_scale_factor)

    def next_step(_pipe, i, _t, _kwargs):  # the bank is keyed by the step index: keep it in step
        handle.set_step(i + 1)
        return {}

    def run(images, prompt, clip_seed, **kw):  # one noise draw for every image of a clip (or one generator)
        gens = ([torch.Generator().manual_seed(clip_seed) for _ in range(len(images))] if shared_noise
                else torch.Generator().manual_seed(clip_seed))
        return i2i(prompt=[prompt] * len(images), image=images, strength=strength, num_inference_steps=steps,
                   guidance_scale=guidance_scale, generator=gens, output_type="latent", **kw).images

    out = latents.clone()
    frames = latents.shape[1]
    try:
        for b, prompt in enumerate(prompts):
            z = latents[b].to(pipe.unet.device, pipe.unet.dtype)  # (L, C, h, w)
            if handle is None:
                out[b, 1:-1] = run(z[1:-1], prompt, seed + b).to(out.dtype)
                continue
            handle.reseed(seed + b)
            handle.bank.clear()
            handle.set_step(0)
            with handle.write("keyframes"):  # (2, C, h, w): their tokens to the bank, step by step
                run(z[[0, frames - 1]], prompt, seed + b, callback_on_step_end=next_step)
            handle.set_step(0)
            with handle.read("keyframes"):  # (L-2, C, h, w): each frame reads its own tokens + the keyframes'
                out[b, 1:-1] = run(z[1:-1], prompt, seed + b, callback_on_step_end=next_step).to(out.dtype)
    finally:
        if handle is not None:
            handle.remove()
    return out
