"""Tiny random UNets of the real architectures, for tests and benchmarks (no download, about 1 s to build).

``tiny_sdxl_unet`` is SDXL-shaped (``addition_embed_type="text_time"``: pooled text embeddings + 6 time ids,
self- and cross-attention in down, mid and up blocks); ``tiny_sd15_unet`` is SD1.5-shaped. Both are
``diffusers.UNet2DConditionModel``s with seeded random weights; :func:`tiny_unet_inputs` makes a matching
random batch of inputs.
"""

from __future__ import annotations

import torch

from .seeds import seeded

__all__ = ["tiny_sd15_unet", "tiny_sdxl_pipeline", "tiny_sdxl_unet", "tiny_unet_inputs"]

SDXL_TEXT_DIM = 64  # cross-attention width of the tiny SDXL UNet (real SDXL: 2048)
SDXL_POOLED_DIM = 32  # pooled text embedding width (real SDXL: 1280)
SDXL_TIME_DIM = 8  # addition_time_embed_dim (real SDXL: 256)
SD15_TEXT_DIM = 32  # cross-attention width of the tiny SD1.5 UNet (real SD1.5: 768)


def _seeded(seed: int, build):
    return seeded(seed, build).eval()


def tiny_sdxl_unet(seed: int = 0, block_out_channels: tuple[int, ...] = (32, 64), sample_size: int = 16):
    """A small SDXL-style ``UNet2DConditionModel`` (about 1.5 M parameters) with random weights.

    Blocks: Down (no attention) -> CrossAttnDown (2 transformer layers, like SDXL's deeper blocks) ->
    CrossAttn mid -> CrossAttnUp -> Up. Heads of 8 channels each (SDXL: 64).
    """
    from diffusers import UNet2DConditionModel

    c0, c1 = block_out_channels
    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(c0, c1),
        layers_per_block=1,
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(c0 // 8, c1 // 8),  # diffusers' name for the number of heads
        cross_attention_dim=SDXL_TEXT_DIM,
        norm_num_groups=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=SDXL_POOLED_DIM + 6 * SDXL_TIME_DIM,
    ))


def tiny_sd15_unet(seed: int = 0, block_out_channels: tuple[int, ...] = (32, 64), sample_size: int = 16):
    """A small SD1.5-style ``UNet2DConditionModel``: cross-attention blocks down and up, no added conditioning."""
    from diffusers import UNet2DConditionModel

    c0, c1 = block_out_channels
    return _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(c0, c1),
        layers_per_block=1,
        attention_head_dim=8,
        cross_attention_dim=SD15_TEXT_DIM,
        norm_num_groups=8,
    ))


def tiny_unet_inputs(unet, batch: int = 4, seed: int = 0, text_tokens: int = 8, timestep: int = 500) -> dict:
    """Random keyword inputs for ``unet(**inputs)``: sample, timestep, encoder_hidden_states (+ SDXL's
    added_cond_kwargs when the UNet has ``addition_embed_type="text_time"``)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    size = cfg.sample_size
    inputs = {
        "sample": torch.randn(batch, cfg.in_channels, size, size, generator=g),  # (B, 4, H, W)
        "timestep": torch.tensor(timestep),
        "encoder_hidden_states": torch.randn(batch, text_tokens, cfg.cross_attention_dim, generator=g),  # (B, T, D)
    }
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=g),  # (B, pooled)
            "time_ids": torch.tensor([[size * 8, size * 8, 0, 0, size * 8, size * 8]], dtype=torch.float32)
            .repeat(batch, 1),  # (B, 6): original size, crop top-left, target size
        }
    return inputs


# ----------------------------------------------------------------------------------------------------
# Whole tiny pipelines (added for story generation tests: the real loading path without a download)
# ----------------------------------------------------------------------------------------------------
def _save_and_reload(pipe, folder):
    from pathlib import Path

    from diffusers import StableDiffusionXLPipeline

    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)


def tiny_sdxl_pipeline(folder=None, seed: int = 0):
    """A ``StableDiffusionXLPipeline`` shaped like real SDXL (OpenAI CLIP tokenizers with 49408 tokens, two text
    encoders whose penultimate states are concatenated, a VAE with 8x downsampling, ``text_time`` UNet) with
    random weights of a few million parameters. Images default to 128x128 (latents 16x16).

    With ``folder``, the pipeline is ``save_pretrained`` there and loaded back with ``from_pretrained``: the same
    code path as ``StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .tokenization import TRIGGER_WORD, load_clip_tokenizers

    tok1, tok2 = load_clip_tokenizers(trigger_word=TRIGGER_WORD)
    half = SDXL_TEXT_DIM // 2  # each text encoder gives half of the cross-attention width (SDXL: 768 + 1280)

    def text_config(projection_dim):
        return CLIPTextConfig(vocab_size=len(tok1), hidden_size=half, intermediate_size=2 * half,
                              num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                              projection_dim=projection_dim, bos_token_id=tok1.bos_token_id,
                              eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id)

    te1 = _seeded(seed + 1, lambda: CLIPTextModel(text_config(half)))
    te2 = _seeded(seed + 2, lambda: CLIPTextModelWithProjection(text_config(SDXL_POOLED_DIM)))
    vae = _seeded(seed + 3, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=128))
    unet = tiny_sdxl_unet(seed=seed, sample_size=16)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler)
    if folder is not None:
        pipe = _save_and_reload(pipe, folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe
