"""storyworld's models: tiny versions of the real architectures, loaded by the real loading code.

SDXL is a VAE (`AutoencoderKL`), two CLIP text encoders and a `UNet2DConditionModel` with `text_time` added
conditioning, glued by `StableDiffusionXLPipeline`. storyworld keeps every one of those classes and only makes them
small enough to train on a laptop CPU:

- a CLIP BPE tokenizer cut down to the storyworld vocabulary (+ the trigger word `img`), so the token table is tiny;
- a VAE that maps 64x64 renders to 16x16x4 latents (downsampling factor 4, SDXL's is 8);
- one contrastive `CLIPModel` whose text tower serves as *both* SDXL text encoders (hidden states of its
  penultimate layer, concatenated: cross-attention width 2 x hidden) and whose vision tower scores images later;
- an SDXL-style UNet with self-attention at its highest-resolution level, so attention can copy identity.

`load_storyworld()` is just `StableDiffusionXLPipeline.from_pretrained(data/storyworld)`, offline.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from transformers import CLIPTokenizer, CLIPVisionConfig

from ..checkpoints import check_loaded_weights, check_pipeline_folder
from ..paths import data_dir
from ..seeds import seeded
from ..tokenization import BOS, EOS, TRIGGER_WORD, add_trigger_word, clip_vocab_and_merges

# Words captions and story prompts use besides storyworld's attribute words.
FUNCTION_WORDS = (
    "a", "an", "the", "with", "and", "in", "on", "at", "of", "wearing", "is", "are", "his", "her", "their",
    "same", "one", "two", "photo", "picture", "image", "story", "comic", "panel", "hair", "shirt", "trousers",
    "hat", "no", "then", "while", "who", "person", "character",
)
TEXT_LENGTH = 32  # tokens per prompt (SDXL: 77); a storyworld caption needs about 25
STORYWORLD_SUBDIR = "storyworld"
IMAGE_SIZE = 64  # storyworld renders are 64x64 RGB
LATENT_SIZE = 16  # the VAE downsamples by 4


def storyworld_dir() -> Path:
    """The shipped pipeline folder, `data/storyworld/` (a `StableDiffusionXLPipeline.save_pretrained` folder)."""
    return data_dir() / STORYWORLD_SUBDIR


ABLATION_SUBDIR = "storyworld_ablation"
ABLATION_UNETS = ("collage_step6000", "no_collage_step6000")


def ablation_unet_dir(name: str) -> Path:
    """`data/storyworld_ablation/<name>/unet`: the two UNets of the collage ablation (appendix notebook 07), trained
    with the same recipe for the same 6000 steps, with (the shipped run's step-6000 export) and without collages."""
    if name not in ABLATION_UNETS:
        raise ValueError(f"unknown ablation UNet {name!r}: use one of {ABLATION_UNETS}")
    return data_dir() / ABLATION_SUBDIR / name / "unet"


# ---------------------------------------------------------------- tokenizer
def _bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], list[tuple[str, str]]]:
    """Run CLIP's BPE on one lower-case word: its final pieces and the merges applied, in order."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    used = []
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        used.append((pieces[i], pieces[i + 1]))
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces, used


def build_storyworld_tokenizer(
    words: list[str] | tuple[str, ...] | None = None,
    pad_token: str = EOS,
    model_max_length: int = TEXT_LENGTH,
    trigger_word: str = TRIGGER_WORD,
) -> CLIPTokenizer:
    """A transformers `CLIPTokenizer` (fast) that knows only the storyworld words, built offline from CLIP's BPE.

    Every word keeps CLIP's own merges (so "red" is one token, as in CLIP), but the vocabulary holds only what the
    words need: a few hundred entries instead of 49408. `words` defaults to `storyworld.all_words()` plus
    FUNCTION_WORDS. Characters outside a-z become the unknown token. `trigger_word` is registered as one special
    token (as PhotoMaker does). SDXL's second tokenizer is the same with `pad_token="!"`.
    """
    if words is None:
        from .world import all_words

        words = list(all_words()) + list(FUNCTION_WORDS)
    split = sorted({w for phrase in words for w in str(phrase).lower().split()})
    bad = [w for w in split if not w.isascii() or not w.isalpha()]
    if bad:
        raise ValueError(f"tokenizer words must be plain a-z words, got {bad[:5]}: split or rename them")
    if pad_token not in (EOS, "!"):
        raise ValueError(f"pad_token must be {EOS!r} (tokenizer) or '!' (tokenizer_2, as SDXL), got {pad_token!r}")
    _, all_merges = clip_vocab_and_merges()
    ranks = {m: r for r, m in enumerate(all_merges)}
    used: set[tuple[str, str]] = set()
    pieces: set[str] = set()
    for w in split:
        final, applied = _bpe_pieces(w, ranks)
        used.update(applied)
        pieces.update(final)
    merges = [m for m in all_merges if m in used]  # keep CLIP's order, so the same merges fire
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    symbols = ["!", ",", ".", *letters] + [c + "</w>" for c in ["!", ",", ".", *letters]]
    tokens = symbols + sorted({"".join(m) for m in merges} - set(symbols)) + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=model_max_length)
    if trigger_word:
        add_trigger_word(tok, trigger_word)
    return tok


def storyworld_tokenizers(tokenizer: CLIPTokenizer | None = None) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's (tokenizer, tokenizer_2) for storyworld: the same vocabulary; the second pads with `!` (id 0)."""
    tok1 = tokenizer if tokenizer is not None else build_storyworld_tokenizer()
    tok2 = copy.deepcopy(tok1)
    tok2.pad_token = "!"
    return tok1, tok2


# ---------------------------------------------------------------- model sizes
@dataclass(frozen=True)
class StoryworldSizes:
    """Widths of the three models. `base` is what ships; `tiny` is for tests (seconds on CPU)."""

    vae_channels: tuple[int, ...] = (16, 32, 64)
    vae_groups: int = 8
    text_hidden: int = 128
    text_layers: int = 3
    vision_hidden: int = 96
    vision_layers: int = 3
    clip_heads: int = 4
    projection_dim: int = 128
    unet_channels: tuple[int, ...] = (32, 64, 64)
    unet_heads: tuple[int, ...] = (1, 2, 2)  # head width 32
    unet_groups: int = 16
    time_embed_dim: int = 8  # per added time id (SDXL: 256)

    @classmethod
    def named(cls, name: str) -> StoryworldSizes:
        if name == "base":
            return cls()
        if name == "tiny":
            return cls(vae_channels=(8, 8, 16), vae_groups=4, text_hidden=32, text_layers=2, vision_hidden=32,
                       vision_layers=2, clip_heads=2, projection_dim=32, unet_channels=(16, 32, 32),
                       unet_heads=(1, 2, 2), unet_groups=8, time_embed_dim=4)
        raise ValueError(f"unknown model size {name!r}: use 'base' (shipped) or 'tiny' (tests)")


def vae_config(sizes: StoryworldSizes) -> dict:
    """AutoencoderKL: 64x64x3 <-> 16x16x4 (two downsamplings)."""
    n = len(sizes.vae_channels)
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(sizes.vae_channels), layers_per_block=1, norm_num_groups=sizes.vae_groups,
        mid_block_add_attention=False,
    )


def build_vae(sizes: StoryworldSizes, seed: int = 0) -> AutoencoderKL:
    return seeded(seed, lambda: AutoencoderKL(**vae_config(sizes)))


def clip_config(sizes: StoryworldSizes, tokenizer: CLIPTokenizer) -> CLIPConfig:
    """A CLIP whose text tower reads `tokenizer`'s ids and whose vision tower sees 64x64 images (8x8 patches)."""
    text = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=sizes.text_hidden, intermediate_size=4 * sizes.text_hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=sizes.clip_heads,
        max_position_embeddings=tokenizer.model_max_length, projection_dim=sizes.projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
    )
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden, intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.clip_heads, image_size=IMAGE_SIZE,
        patch_size=8, projection_dim=sizes.projection_dim,
    )
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=sizes.projection_dim)


def build_clip(sizes: StoryworldSizes, tokenizer: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    return seeded(seed, lambda: CLIPModel(clip_config(sizes, tokenizer)))


def text_encoders_from_clip(clip: CLIPModel) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """SDXL's two text encoders, both copied from the CLIP text tower (the second keeps the projection).

    SDXL concatenates their penultimate hidden states (width 2 x hidden) and takes the pooled, projected
    `text_embeds` of the second as the added `text_embeds` condition.
    """
    te1 = copy.deepcopy(clip.text_model).eval()
    te2 = CLIPTextModelWithProjection(clip.text_model.config)
    te2.text_model.load_state_dict(clip.text_model.state_dict())
    te2.text_projection.load_state_dict(clip.text_projection.state_dict())
    return te1.requires_grad_(False), te2.eval().requires_grad_(False)


def unet_config(sizes: StoryworldSizes, text_hidden: int | None = None, projection_dim: int | None = None) -> dict:
    """SDXL-style UNet on 16x16x4 latents: cross-attention at 16x16 and 8x8, a plain 4x4 level, text_time added
    conditioning (6 size/crop ids + the pooled text embedding)."""
    text_hidden = text_hidden or sizes.text_hidden
    projection_dim = projection_dim or sizes.projection_dim
    n = len(sizes.unet_channels)
    down = ("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1)
    return dict(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn", block_out_channels=tuple(sizes.unet_channels),
        layers_per_block=1, transformer_layers_per_block=1, attention_head_dim=tuple(sizes.unet_heads),
        norm_num_groups=sizes.unet_groups, cross_attention_dim=2 * text_hidden, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=sizes.time_embed_dim,
        projection_class_embeddings_input_dim=6 * sizes.time_embed_dim + projection_dim,
    )


def build_unet(sizes: StoryworldSizes, seed: int = 0) -> UNet2DConditionModel:
    return seeded(seed, lambda: UNet2DConditionModel(**unet_config(sizes)))


def build_scheduler() -> DDIMScheduler:
    """SDXL's noise schedule (scaled linear, 1000 steps, epsilon); DDIM sampling with trailing timesteps."""
    return DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="trailing",
        prediction_type="epsilon",
    )


def assemble_pipeline(
    vae: AutoencoderKL, clip: CLIPModel, unet: UNet2DConditionModel, tokenizer: CLIPTokenizer,
    scheduler=None,
) -> StableDiffusionXLPipeline:
    """Glue the parts into a real `StableDiffusionXLPipeline` (both text encoders come from `clip`)."""
    te1, te2 = text_encoders_from_clip(clip)
    tokenizer, tok2 = storyworld_tokenizers(tokenizer)
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer, tokenizer_2=tok2, unet=unet,
        scheduler=scheduler or build_scheduler(), force_zeros_for_empty_prompt=True,
    )


def save_pipeline(pipe: StableDiffusionXLPipeline, clip: CLIPModel, folder: str | os.PathLike,
                  fp16: bool = False) -> Path:
    """`save_pretrained` the pipeline into `folder` and the full CLIPModel into `folder/clip`.

    With `fp16`, weights are stored in float16 (half the size); `load_storyworld` casts them back to float32.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if fp16 else torch.float32
    pipe = copy.deepcopy(pipe).to(dtype=dtype)
    pipe.save_pretrained(folder, safe_serialization=True)
    copy.deepcopy(clip).to(dtype).save_pretrained(folder / "clip", safe_serialization=True)
    pipe.tokenizer.save_pretrained(folder / "clip")
    return folder


def load_storyworld(device: str | torch.device = "cpu", folder: str | os.PathLike | None = None,
                    dtype: torch.dtype = torch.float32, unet: str | os.PathLike | None = None,
                    ) -> StableDiffusionXLPipeline:
    """The shipped storyworld SDXL pipeline (`StableDiffusionXLPipeline.from_pretrained(data/storyworld)`), offline.

    `unet`: a folder holding another storyworld UNet (`UNet2DConditionModel.save_pretrained`), used instead of the
    shipped one, e.g. the collage ablation's `ablation_unet_dir("no_collage_step6000")`."""
    folder = Path(folder) if folder is not None else storyworld_dir()
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(
            f"{folder} holds no pipeline (model_index.json missing): train it with "
            "`python -m sdlite.train storyworld --stage all --out runs/storyworld` or restore data/storyworld from git"
        )
    extra = {}
    if unet is not None:
        if not (Path(unet) / "config.json").is_file():
            raise FileNotFoundError(f"{unet} holds no UNet (config.json missing): pass a folder written by "
                                    "UNet2DConditionModel.save_pretrained")
        extra["unet"] = UNet2DConditionModel.from_pretrained(unet, dtype=dtype, local_files_only=True)
    check_pipeline_folder(folder)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=dtype, local_files_only=True, **extra)
    if unet is None:
        check_loaded_weights(pipe, folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_storyworld_clip(device: str | torch.device = "cpu", folder: str | os.PathLike | None = None,
                         ) -> tuple[CLIPModel, CLIPTokenizer]:
    """The full storyworld CLIPModel (text + vision towers) and its tokenizer, for CLIP-I/CLIP-T scores.

    Its vision tower takes images as float (B, 3, 64, 64) in [-1, 1] (no extra normalisation).
    """
    folder = Path(folder) if folder is not None else storyworld_dir()
    if not (folder / "clip" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'clip'} holds no CLIPModel: train it with `python -m sdlite.train "
                                "storyworld --stage clip` or restore data/storyworld from git")
    clip = CLIPModel.from_pretrained(folder / "clip", dtype=torch.float32, local_files_only=True)
    tok = CLIPTokenizer.from_pretrained(folder / "clip", local_files_only=True)
    return clip.to(device).eval(), tok


def tiny_storyworld_pipeline(folder=None, seed: int = 0):
    """The storyworld pipeline's architecture at its "tiny" sizes with random weights (seconds on CPU).

    With ``folder``, it is written in the shipped layout (``save_pipeline``: the pipeline plus ``clip/``), so
    ``load_storyworld(folder=...)`` and ``load_storyworld_clip(folder=...)`` load it like the real one.
    """
    sizes = StoryworldSizes.named("tiny")
    tok = build_storyworld_tokenizer()
    clip = build_clip(sizes, tok, seed=seed + 1)
    pipe = assemble_pipeline(build_vae(sizes, seed=seed + 2), clip, build_unet(sizes, seed=seed + 3), tok)
    if folder is not None:
        save_pipeline(pipe, clip, folder)
        pipe = load_storyworld("cpu", folder=folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load_storyworld_vae(folder: str | os.PathLike | None = None) -> AutoencoderKL:
    """The storyworld VAE alone (`data/storyworld/vae`), without the rest of the pipeline."""
    folder = Path(folder) if folder is not None else storyworld_dir()
    if not (folder / "vae" / "config.json").is_file():
        raise FileNotFoundError(f"{folder / 'vae'} holds no VAE: train it with `python -m sdlite.train storyworld "
                                "--stage vae` or restore data/storyworld from git")
    return AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32, local_files_only=True).eval()
