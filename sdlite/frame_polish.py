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
guess is punished more than a blurred average when it is wrong). Holding the decoder's coarse layout during the
redraw (`keep_structure`, ILVR) does not win that PSNR back at the same identity (`docs/lab/polish_psnr.py`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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


def check_structure(factor: int, size: tuple[int, int] | None = None) -> int:
    """The low-pass factor whose coarse latent the redraw must keep (0: off); with the latent `size` (h, w), a
    factor that does not divide it is refused."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 0:
        raise ValueError(f"keep_structure={factor!r}: use 0 (off) or a whole factor >= 1 (e.g. 2: keep the latent "
                         f"averaged over 2x2 cells)")
    if factor and size is not None and (size[0] % factor or size[1] % factor):
        raise ValueError(f"keep_structure={factor} must divide the latent size {size[0]}x{size[1]}: e.g. 2 or 4")
    return factor


def low_pass(z: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, C, h, w) -> (N, C, h, w): every `factor` x `factor` block of cells replaced by its mean (a projection:
    low_pass(low_pass(z)) == low_pass(z), so what is put back is kept exactly). h and w must divide by `factor`."""
    check_structure(factor, tuple(z.shape[-2:]))
    coarse = F.avg_pool2d(z, factor)  # (N, C, h / factor, w / factor)
    return coarse.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_to_image_pipeline(pipe):
    """diffusers' img2img pipeline on the same components (no copy of the weights)."""
    from diffusers import AutoPipelineForImage2Image

    i2i = AutoPipelineForImage2Image.from_pipe(pipe)
    i2i.set_progress_bar_config(disable=True)
    return i2i


def redraw(i2i, images: torch.Tensor, prompt: str, *, strength: float, steps: int, guidance_scale: float,
           seed: int, shared_noise: bool = True, keep_structure: int = 0, handle=None) -> torch.Tensor:
    """One img2img call on latents (N, C, h, w) -> (N, C, h, w): every image from the same noise draw
    (`torch.Generator().manual_seed(seed)`; `shared_noise=False`: one generator for all, a draw per image), the CSA
    `handle` (if any) kept at the pipeline's step, and with `keep_structure` = N the coarse part of the latents put
    back after every step (see `polish_latents`; N = 1 keeps the images themselves, noised to each step's level)."""
    gens = ([torch.Generator().manual_seed(seed) for _ in range(len(images))] if shared_noise
            else torch.Generator().manual_seed(seed))
    if keep_structure:  # the draw the pipeline makes for the first image, to noise the kept part with
        noise = torch.randn(images[:1].shape, generator=torch.Generator().manual_seed(seed)).to(images)  # (1, C, h, w)

    def after_step(pipe, i, t, kwargs):
        if handle is not None:  # the bank is keyed by the step index: keep it in step
            handle.set_step(i + 1)
        if not keep_structure:
            return {}
        # the step just taken was at t: the latents are now at the level of the schedule's next timestep
        timesteps = pipe.scheduler.timesteps
        later = timesteps[int((timesteps == t).nonzero()[-1]) + 1:]
        ref = (images if len(later) == 0  # after the last step: the clean latents
               else pipe.scheduler.add_noise(images, noise.expand_as(images), later[:1]))
        z = kwargs["latents"]  # (N, C, h, w)
        return {"latents": z - low_pass(z, keep_structure) + low_pass(ref.to(z.dtype), keep_structure)}

    return i2i(prompt=[prompt] * len(images), image=images, strength=strength, num_inference_steps=steps,
               guidance_scale=guidance_scale, generator=gens, output_type="latent",
               callback_on_step_end=after_step, callback_on_step_end_tensor_inputs=["latents"]).images


@torch.no_grad()
def polish_latents(pipe, latents: torch.Tensor, prompts: list[str],
                   strength: float = STORYWORLD_POLISH_STRENGTH, *, steps: int | None = None,
                   guidance_scale: float | None = None, seed: int = 0,
                   read_keyframes: bool = True, shared_noise: bool = True, keep_structure: int = 0,
                   csa: CSAConfig | None = None) -> torch.Tensor:
    """Redraw the in-between frames of clips with the image model `pipe` (storyworld's, or an SDXL / SD1.5
    pipeline whose VAE made the latents).

    latents: scaled VAE latents (B, L, C, h, w), frame 0 and L-1 the keyframes; prompts: one per clip;
    strength: the share of the `steps`-step schedule that is redrawn (0: return the latents unchanged);
    read_keyframes: the frames' self-attention reads the keyframes' tokens (the CSA bank), else plain img2img;
    shared_noise: one noise draw for every frame of a clip (else a draw per frame; for the ablation);
    keep_structure: 0, or a factor N: after every step the redraw's coarse part (`low_pass(., N)`) is replaced by
    the input latent's, noised to the same level (ILVR, Choi et al. 2021): the image model may redraw the details
    but not move what the decoder placed;
    csa: its settings (default: the model's CSA defaults). Returns latents of the same shape, keyframes unchanged;
    clip b's noise comes from `torch.Generator().manual_seed(seed + b)`."""
    strength = check_strength(strength)
    keep_structure = check_structure(keep_structure)
    if latents.ndim != 5 or latents.shape[1] < 3:
        raise ValueError(f"latents must be (B, L, C, h, w) with L >= 3 (two keyframes and a frame between them), "
                         f"got {tuple(latents.shape)}")
    check_structure(keep_structure, tuple(latents.shape[-2:]))
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

    out = latents.clone()
    frames = latents.shape[1]
    try:
        for b, prompt in enumerate(prompts):
            kw = dict(strength=strength, steps=steps, guidance_scale=guidance_scale, seed=seed + b,
                      shared_noise=shared_noise, keep_structure=keep_structure, handle=handle)
            z = latents[b].to(pipe.unet.device, pipe.unet.dtype)  # (L, C, h, w)
            if handle is None:
                out[b, 1:-1] = redraw(i2i, z[1:-1], prompt, **kw).to(out.dtype)
                continue
            handle.reseed(seed + b)
            handle.bank.clear()
            handle.set_step(0)
            with handle.write("keyframes"):  # (2, C, h, w): their tokens to the bank, step by step
                redraw(i2i, z[[0, frames - 1]], prompt, **kw)
            handle.set_step(0)
            with handle.read("keyframes"):  # (L-2, C, h, w): each frame reads its own tokens + the keyframes'
                out[b, 1:-1] = redraw(i2i, z[1:-1], prompt, **kw).to(out.dtype)
    finally:
        if handle is not None:
            handle.remove()
    return out
