"""Tiny random UNets of the real architectures, for tests and benchmarks (no download, about 1 s to build).

``tiny_sdxl_unet`` is SDXL-shaped (``addition_embed_type="text_time"``: pooled text embeddings + 6 time ids,
self- and cross-attention in down, mid and up blocks); ``tiny_sd15_unet`` is SD1.5-shaped. Both are
``diffusers.UNet2DConditionModel``s with seeded random weights; :func:`tiny_unet_inputs` makes a matching
random batch of inputs.
"""

from __future__ import annotations

import torch

from .seeds import seeded

__all__ = ["tiny_sd15_pipeline", "write_clip_tokenizer_files", "tiny_sd15_unet", "tiny_sdxl_pipeline", "tiny_sdxl_unet", "tiny_unet_inputs"]

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
def write_clip_tokenizer_files(folder, pad_token: str = "<|endoftext|>") -> None:
    """A tokenizer folder in the layout of the published SDXL / SD1.5 repositories: ``vocab.json``,
    ``merges.txt``, ``special_tokens_map.json`` and ``tokenizer_config.json`` (no ``tokenizer.json``, which
    transformers v5 writes instead), the full CLIP vocabulary of 49408 tokens, no trigger word.
    SDXL's second tokenizer pads with ``"!"``."""
    import json
    from pathlib import Path

    from .tokenization import clip_vocab_and_merges

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in ("tokenizer.json", "added_tokens.json"):
        (folder / stale).unlink(missing_ok=True)
    vocab, merges = clip_vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer", **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _save_and_reload(pipe, folder, real_tokenizer_files: bool = False):
    """save_pretrained, then load back with the same pipeline class (the user's loading path). With
    ``real_tokenizer_files`` the tokenizer folders are rewritten in the published repositories' format first."""
    from pathlib import Path

    folder = Path(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    if real_tokenizer_files:
        for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
            if (folder / name).is_dir():
                write_clip_tokenizer_files(folder / name, pad)
    return type(pipe).from_pretrained(folder, local_files_only=True)


def _tiny_vae(seed: int):
    """A VAE with SD's 8x downsampling (4 blocks) and 4 latent channels, a few thousand parameters."""
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=8, sample_size=128))


def _tiny_text_config(tokenizer, hidden: int, projection_dim: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                          projection_dim=projection_dim, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _tiny_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")


def tiny_sdxl_pipeline(folder=None, seed: int = 0, real_tokenizer_files: bool = False, real_vocab: bool = False):
    """A ``StableDiffusionXLPipeline`` shaped like real SDXL (OpenAI CLIP tokenizers with 49408 tokens, two text
    encoders whose penultimate states are concatenated, a VAE with 8x downsampling, ``text_time`` UNet) with
    random weights of a few million parameters. Images default to 128x128 (latents 16x16).

    With ``folder``, the pipeline is ``save_pretrained`` there and loaded back with ``from_pretrained``: the same
    code path as ``StableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")``;
    ``real_tokenizer_files``: the tokenizers as the published repository has them (:func:`write_clip_tokenizer_files`).
    ``real_vocab``: text encoders of exactly CLIP's 49408 tokens, as SDXL's (no row for PhotoMaker's trigger word;
    the default keeps one more, for the trigger).
    """
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenization import TRIGGER_WORD, load_clip_tokenizers

    tok1, tok2 = load_clip_tokenizers(trigger_word=None if real_vocab else TRIGGER_WORD)
    half = SDXL_TEXT_DIM // 2  # each text encoder gives half of the cross-attention width (SDXL: 768 + 1280)
    te1 = _seeded(seed + 1, lambda: CLIPTextModel(_tiny_text_config(tok1, half, half)))
    te2 = _seeded(seed + 2, lambda: CLIPTextModelWithProjection(_tiny_text_config(tok1, half, SDXL_POOLED_DIM)))
    vae = _tiny_vae(seed + 3)
    unet = tiny_sdxl_unet(seed=seed, sample_size=16)
    scheduler = _tiny_scheduler()
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
                                     unet=unet, scheduler=scheduler)
    if folder is not None:
        pipe = _save_and_reload(pipe, folder, real_tokenizer_files)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd15_pipeline(folder=None, seed: int = 0, real_tokenizer_files: bool = False):
    """A ``StableDiffusionPipeline`` shaped like real SD1.5 (one OpenAI CLIP tokenizer of 49408 tokens, one text
    encoder whose last hidden state is the cross-attention context, a VAE with 8x downsampling, a UNet without
    added conditioning) with random weights. Images default to 128x128 (latents 16x16). No safety checker.

    With ``folder``: saved there and loaded back with ``from_pretrained``, as a user loads
    ``stable-diffusion-v1-5/stable-diffusion-v1-5``; ``real_tokenizer_files`` as in :func:`tiny_sdxl_pipeline`.
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    from .tokenization import TRIGGER_WORD, load_clip_tokenizers

    tok, _ = load_clip_tokenizers(trigger_word=TRIGGER_WORD)
    te = _seeded(seed + 1, lambda: CLIPTextModel(_tiny_text_config(tok, SD15_TEXT_DIM, SD15_TEXT_DIM)))
    pipe = StableDiffusionPipeline(vae=_tiny_vae(seed + 3), text_encoder=te, tokenizer=tok,
                                   unet=tiny_sd15_unet(seed=seed, sample_size=16), scheduler=_tiny_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if folder is not None:
        pipe = _save_and_reload(pipe, folder, real_tokenizer_files)
    pipe.set_progress_bar_config(disable=True)
    return pipe
