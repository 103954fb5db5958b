"""Step 02: PhotoMaker's ID encoder and FuseModule, and delayed conditioning.

An ID image goes through a CLIP vision tower; its pooled output is projected twice (to the widths of SDXL's two
text encoders, 768 + 1280 = 2048) and concatenated: one ID embedding per image. The FuseModule merges each ID
embedding with the embedding of the class token ("man") it belongs to:

    fused = LayerNorm( mlp2( mlp1([class_emb, id_emb]) + class_emb ) )      mlp2 has its own residual

and the fused vectors replace the class tokens (the positions of `class_tokens_mask`) in the prompt embedding.
Module and parameter names follow PhotoMaker v1's checkpoint layout, so its `id_encoder` state dict loads as is.

On a real SDXL pipeline the rest of PhotoMaker's loader is here too: the trigger word registered on both tokenizers
(:func:`photomaker_tokenizers`), the checkpoint's `lora_weights` fused into the UNet (:func:`fuse_photomaker_lora`),
and ID photos resized and centre-cropped as CLIP's image processor does (:func:`id_pixel_values`).

Only PhotoMaker **v1** runs here. v2 adds face-recognition embeddings (InsightFace's ArcFace model, a separate
download with its own licence) through a Q-Former and 2 tokens per image; they cannot be computed offline, so a v2
checkpoint is refused with that reason (:func:`load_photomaker_id_encoder`).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from .tokenization import TRIGGER_WORD, add_trigger_word, encode_with_trigger_sdxl


class MLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear, with an optional residual (in_dim == out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        if use_residual and in_dim != out_dim:
            raise ValueError(f"a residual MLP needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in_dim) -> (..., out_dim)
        y = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return y + x if self.use_residual else y


class FuseModule(nn.Module):
    """Fuse class-token embeddings with ID embeddings, token by token: (..., M, D), (..., M, D) -> (..., M, D)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp1 = MLP(2 * embed_dim, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        x = torch.cat([class_embeds, id_embeds], dim=-1)  # (..., M, 2D)
        x = self.mlp1(x) + class_embeds  # (..., M, D): concat -> MLP, plus the class embedding added back
        x = self.mlp2(x)  # (..., M, D): residual MLP
        return self.layer_norm(x)


def fuse_id_embeddings(
    prompt_embeds: torch.Tensor,
    id_embeds: torch.Tensor,
    class_tokens_mask: torch.Tensor,
    fuse_module: FuseModule,
) -> torch.Tensor:
    """Replace the class tokens of `prompt_embeds` by their fusion with the ID embeddings (a new tensor).

    prompt_embeds: (B, L, D); class_tokens_mask: (B, L) or (L,) bool; id_embeds: (B, n, D) or (n, D).
    Each row's mask must mark n*k positions: with n ID embeddings each is used for k consecutive class tokens
    (k = 1 for PhotoMaker v1; with k tokens per image, pass n*k embeddings or let them repeat).
    """
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be (batch, length, dim), got shape {tuple(prompt_embeds.shape)}")
    B, L, D = prompt_embeds.shape
    if class_tokens_mask.ndim == 1 and class_tokens_mask.shape[0] == L:
        class_tokens_mask = class_tokens_mask.unsqueeze(0).expand(B, L)
    if id_embeds.ndim == 2:
        id_embeds = id_embeds.unsqueeze(0).expand(B, *id_embeds.shape)
    if class_tokens_mask.dtype != torch.bool:
        raise ValueError(f"class_tokens_mask must be a bool tensor, got {class_tokens_mask.dtype}: use mask.bool()")
    if tuple(class_tokens_mask.shape) != (B, L):
        raise ValueError(
            f"class_tokens_mask has shape {tuple(class_tokens_mask.shape)} but prompt_embeds is {(B, L, D)}: "
            "the mask needs one entry per prompt token"
        )
    if id_embeds.ndim != 3 or id_embeds.shape[0] != B or id_embeds.shape[2] != D:
        raise ValueError(
            f"id_embeds has shape {tuple(id_embeds.shape)}; expected (batch={B}, num_id_images, dim={D}) "
            "to match prompt_embeds"
        )
    if fuse_module.embed_dim != D:
        raise ValueError(f"fuse_module works on dim {fuse_module.embed_dim} but the embeddings have dim {D}")
    counts = class_tokens_mask.sum(dim=1)  # (B,)
    n = id_embeds.shape[1]
    if int(counts.min()) != int(counts.max()) or int(counts[0]) == 0 or int(counts[0]) % n != 0:
        raise ValueError(
            f"class_tokens_mask marks {counts.tolist()} tokens per prompt for {n} ID embeddings: each prompt needs "
            f"the same non-zero multiple of {n} (encode with encode_with_trigger(..., num_id_images={n}))"
        )
    k = int(counts[0]) // n
    ids = id_embeds.to(prompt_embeds.dtype).repeat_interleave(k, dim=1).reshape(-1, D)  # (B*n*k, D)
    fused = fuse_module(prompt_embeds[class_tokens_mask], ids)  # (B*n*k, D), in row-major mask order
    out = prompt_embeds.clone()
    out[class_tokens_mask] = fused
    return out


@dataclass(frozen=True)
class IDEncoderConfig:
    """The vision tower and the two projection widths (SDXL: 768 and 1280, whose sum is the fused width).
    Frozen and validated; named presets `photomaker_v1()` and `tiny()`."""

    vision: dict = field(default_factory=dict)  # CLIPVisionConfig keyword arguments
    projection_dim: int = 768  # visual_projection: hidden -> text_encoder width
    projection_dim_2: int = 1280  # visual_projection_2: hidden -> text_encoder_2 width
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # the tower's input normalisation (CLIP's)
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        for name in ("projection_dim", "projection_dim_2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int (SDXL: 768 and 1280)")
        if not isinstance(self.vision, dict):
            raise TypeError(f"vision must be a dict of CLIPVisionConfig arguments, got {type(self.vision).__name__}")
        for name in ("image_mean", "image_std"):
            value = tuple(getattr(self, name))
            if len(value) != 3 or not all(isinstance(v, (int, float)) for v in value) or \
                    (name == "image_std" and min(value) <= 0):
                raise ValueError(f"{name}={value!r} must be 3 numbers (one per RGB channel; std > 0)")
            object.__setattr__(self, name, tuple(float(v) for v in value))

    @classmethod
    def photomaker_v1(cls) -> "IDEncoderConfig":
        """CLIP ViT-L/14 at 224 px, as in PhotoMaker v1 (about 300 M parameters)."""
        vit_l = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                     image_size=224, patch_size=14)
        return cls(vision=vit_l, projection_dim=768, projection_dim_2=1280)

    @classmethod
    def tiny(cls, projection_dim: int = 16, projection_dim_2: int = 16, image_size: int = 32) -> "IDEncoderConfig":
        """A few thousand parameters: for tests, notebooks and storyworld."""
        small = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                     image_size=image_size, patch_size=8)
        return cls(vision=small, projection_dim=projection_dim, projection_dim_2=projection_dim_2)

    @classmethod
    def storyworld(cls, clip_vision_config: dict, text_width: int) -> "IDEncoderConfig":
        """storyworld's: its CLIP's vision tower (64 px renders in [-1, 1], so mean = std = 0.5) and two projections
        of half the UNet's cross-attention width each (storyworld's two text encoders are one, `text_width` wide)."""
        keys = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "image_size",
                "patch_size", "hidden_act", "layer_norm_eps")
        vision = {k: clip_vision_config[k] for k in keys if k in clip_vision_config}
        return cls(vision=vision, projection_dim=text_width, projection_dim_2=text_width,
                   image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))

    @property
    def embed_dim(self) -> int:
        return self.projection_dim + self.projection_dim_2


class IDEncoder(nn.Module):
    """CLIP vision tower + two projections + FuseModule (PhotoMaker v1's `PhotoMakerIDEncoder`)."""

    def __init__(self, config: IDEncoderConfig):
        super().__init__()
        self.config = config
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**config.vision, projection_dim=config.projection_dim))
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection  # hidden -> projection_dim (no bias)
        hidden = clip.config.hidden_size
        self.visual_projection_2 = nn.Linear(hidden, config.projection_dim_2, bias=False)
        self.fuse_module = FuseModule(config.embed_dim)
        # the checkpoint's UNet LoRA (PhotoMaker v1 trains one next to the encoder): kept with the encoder so that
        # generate_story can fuse it into the pipeline's UNet (fuse_photomaker_lora), and saved with it
        self.lora_weights: dict[str, torch.Tensor] = {}

    def pixel_values(self, images, device=None) -> torch.Tensor:
        """ID images (PIL or uint8 arrays) -> (n, 3, S, S) as this encoder's tower takes them (`id_pixel_values` at
        its image size and normalisation, on its device and dtype unless `device` says otherwise)."""
        p = next(self.parameters())
        return id_pixel_values(images, self.config.vision["image_size"], device or p.device, p.dtype,
                               self.config.image_mean, self.config.image_std)

    def id_embeddings(self, id_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, n, 3, H, W) ID images -> (B, n, D) ID embeddings, D = projection_dim + projection_dim_2."""
        if id_pixel_values.ndim != 5:
            raise ValueError(
                f"id_pixel_values must be (batch, num_id_images, 3, H, W), got {tuple(id_pixel_values.shape)}; "
                "add the num_id_images axis with .unsqueeze(1) for one image per prompt"
            )
        B, n = id_pixel_values.shape[:2]
        pooled = self.vision_model(pixel_values=id_pixel_values.flatten(0, 1)).pooler_output  # (B*n, hidden)
        return self.project(pooled).view(B, n, -1)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The tower's pooled output (..., hidden) -> ID embeddings (..., D): both projections, concatenated."""
        return torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor):
        """Prompt embeddings (B, L, D) with their class tokens replaced by the fused ID embeddings."""
        return fuse_id_embeddings(prompt_embeds, self.id_embeddings(id_pixel_values), class_tokens_mask,
                                  self.fuse_module)


def load_photomaker_id_encoder(
    checkpoint: str | Path | dict, config: IDEncoderConfig | None = None
) -> IDEncoder:
    """Build an IDEncoder from a PhotoMaker v1 checkpoint: a file (or dict) with keys `id_encoder` and `lora_weights`.

    `config` defaults to PhotoMaker v1's (ViT-L/14). The checkpoint's `lora_weights` stay on the encoder
    (``encoder.lora_weights``): :func:`sdlite.pipeline.generate_story` fuses them into the UNet, as PhotoMaker's
    loader does. Wrong keys or shapes give a ValueError naming them; a v2 checkpoint is refused (see the module).
    """
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file at {path}: download photomaker-v1.bin or pass its path")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "id_encoder" not in checkpoint:
        found = sorted(checkpoint)[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"not a PhotoMaker checkpoint: expected a dict with keys 'id_encoder' and 'lora_weights', found {found}"
        )
    state = checkpoint["id_encoder"]
    if any(k.startswith("qformer_perceiver.") for k in state):
        raise ValueError(
            "this is a PhotoMaker v2 checkpoint (its ID encoder has a qformer_perceiver): v2 also needs face-recognition"
            " embeddings of every ID photo (InsightFace's ArcFace model, a separate download), which cannot be "
            "computed offline here; sdlite runs PhotoMaker v1: use photomaker-v1.bin"
        )
    lora = checkpoint.get("lora_weights") or {}
    if not isinstance(lora, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in lora.items()):
        raise ValueError("the checkpoint's lora_weights must be a dict of name -> tensor (PhotoMaker v1: the UNet "
                         "LoRA in diffusers' format); pass {} when there is none")
    encoder = IDEncoder(config or IDEncoderConfig.photomaker_v1())
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"the id_encoder state dict does not fit this IDEncoderConfig: {len(missing)} missing keys "
            f"{missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}; is it a PhotoMaker v1 checkpoint "
            "(v2 has another ID encoder)?"
        )
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(expected[name].shape)}; "
                "pass the IDEncoderConfig the checkpoint was made with"
            )
    encoder.load_state_dict(state)
    encoder.lora_weights = dict(lora)
    return encoder


ID_ENCODER_WEIGHTS = "id_encoder.safetensors"  # an ID encoder folder: the encoder's state dict,
ID_ENCODER_LORA = "lora.safetensors"  # its UNet LoRA (diffusers' format, "unet." keys; may be absent),
ID_ENCODER_CONFIG = "config.json"  # and its IDEncoderConfig


def save_id_encoder(encoder: IDEncoder, folder: str | Path, force: bool = False) -> Path:
    """Write an ID encoder folder (safetensors + config.json), the format of storyworld's shipped encoder and of
    what `python -m sdlite.train id-encoder` exports. An existing folder is replaced only with `force`."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not force:
        raise FileExistsError(f"{folder} exists: choose another folder or pass force=True (--force) to replace it")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, str(folder / ID_ENCODER_WEIGHTS))
    lora = {k: v.detach().contiguous() for k, v in (encoder.lora_weights or {}).items()}
    if lora:
        save_file(lora, str(folder / ID_ENCODER_LORA))
    elif (folder / ID_ENCODER_LORA).exists():
        (folder / ID_ENCODER_LORA).unlink()
    cfg = dataclasses.asdict(encoder.config)
    (folder / ID_ENCODER_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    return folder


def load_id_encoder(path: str | Path) -> IDEncoder:
    """An ID encoder from an ID encoder folder (`save_id_encoder`: storyworld's, e.g. `data/storyworld/id_encoder`)
    or a PhotoMaker v1 checkpoint file (`photomaker-v1.bin`, :func:`load_photomaker_id_encoder`). Its UNet LoRA rides
    on ``encoder.lora_weights``; `generate_story` fuses it. Errors name the file and what to pass instead."""
    import json

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_photomaker_id_encoder(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no ID encoder at {path}: pass an ID encoder folder (with {ID_ENCODER_WEIGHTS}) or "
                                "a PhotoMaker v1 checkpoint file (photomaker-v1.bin)")
    for name in (ID_ENCODER_WEIGHTS, ID_ENCODER_CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not an ID encoder folder: {name} is missing (write one with "
                                    "sdlite.id_encoder.save_id_encoder)")
    try:
        config = IDEncoderConfig(**json.loads((path / ID_ENCODER_CONFIG).read_text()))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path / ID_ENCODER_CONFIG} is not a valid IDEncoderConfig: {err}") from None
    try:
        state = load_file(str(path / ID_ENCODER_WEIGHTS))
        lora = load_file(str(path / ID_ENCODER_LORA)) if (path / ID_ENCODER_LORA).is_file() else {}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} holds a damaged weights file ({err}): restore it (git checkout) or retrain")
    return load_photomaker_id_encoder({"id_encoder": state, "lora_weights": lora}, config)


def save_photomaker_checkpoint(encoder: IDEncoder, path: str | Path, lora_weights: dict | None = None) -> Path:
    """Write `encoder` in PhotoMaker v1's layout ({'id_encoder': ..., 'lora_weights': ...}); never overwrites.
    `lora_weights` defaults to the encoder's own (those of the checkpoint it was loaded from, else none)."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another path (checkpoints are never overwritten)")
    lora = getattr(encoder, "lora_weights", {}) if lora_weights is None else lora_weights
    torch.save({"id_encoder": encoder.state_dict(), "lora_weights": dict(lora)}, path)
    return path


def start_merge_step(num_steps: int, style_strength_ratio: float = 20.0, max_step: int = 30) -> int:
    """PhotoMaker's switch point: min(floor(ratio / 100 * steps), 30). Steps 0 ... start_merge_step use the text-only
    prompt (:func:`delayed_conditioning_schedule`)."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one denoising step")
    if not 0 <= style_strength_ratio <= 100:
        raise ValueError(f"style_strength_ratio={style_strength_ratio} is a percentage: use a value in [0, 100]")
    return min(int(style_strength_ratio / 100 * num_steps), max_step)


def delayed_conditioning_schedule(num_steps: int, merge_step: int) -> list[bool]:
    """For each denoising step, True when the ID prompt is used (its fused token embeddings and its pooled
    embedding), else the text-only prompt. As PhotoMaker's pipeline: text-only while ``step <= merge_step``, so
    ``merge_step + 1`` text-only steps (at least one), the ID prompt from step ``merge_step + 1`` on."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one denoising step")
    if merge_step < 0:
        raise ValueError(f"merge_step={merge_step} must be >= 0 (0 = the ID prompt from the second step on)")
    return [step > merge_step for step in range(num_steps)]


# ----------------------------------------------------------------------------------------------------
# PhotoMaker on an SDXL pipeline: ID photos, the trigger word, the checkpoint's LoRA
# ----------------------------------------------------------------------------------------------------
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's image normalisation (PhotoMaker's CLIPImageProcessor)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def id_pixel_values(images, size: int, device=None, dtype=None, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """ID photos (PIL images or uint8 (H, W, 3) arrays, any aspect) -> CLIP-normalised (n, 3, size, size).

    As PhotoMaker's ``CLIPImageProcessor``: the shorter side resized to ``size`` (bicubic, the aspect kept), the
    centre ``size`` x ``size`` cropped, then scaled to [0, 1] and normalised with ``mean`` and ``std`` (CLIP's by
    default; storyworld's tower takes [-1, 1], i.e. 0.5 and 0.5). A non-square photo is never squashed: a face in the
    middle of a portrait photo keeps its proportions.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive int (the ID encoder's image_size, 224 for PhotoMaker v1)")
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of ID photos (PIL images or uint8 H x W x 3 arrays)")
    mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    out = []
    for im in images:
        im = (im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8))).convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)  # the shorter side becomes `size`, the longer one keeps the aspect
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.array(im)).float().permute(2, 0, 1) / 255  # (3, size, size)
        out.append((x - mean) / std)
    return torch.stack(out).to(device=device, dtype=dtype)


def photomaker_tokenizers(pipe, trigger_word: str = TRIGGER_WORD) -> tuple:
    """The pipeline's two tokenizers with PhotoMaker's trigger word registered (one special token on both, as
    PhotoMaker's loader does): the tokenizers themselves when they know it already (storyworld's), otherwise copies
    with it added. The pipeline's own tokenizers are left as they are, so that a story run without ID images tokenizes
    exactly as before. The text encoders need no new embedding row: the trigger is dropped before any token reaches
    them (:func:`sdlite.tokenization.encode_with_trigger`). A copy takes about half a second on a CPU (CLIP's 49k-word
    vocabulary), so the pipeline keeps its copies: one per tokenizer and trigger word, made again if a tokenizer
    is replaced."""
    copies = pipe.__dict__.setdefault("_photomaker_tokenizers", {})  # (slot, trigger) -> (original, copy)
    tokenizers = []
    for slot in ("tokenizer", "tokenizer_2"):
        tok = getattr(pipe, slot, None)
        if tok is None:
            raise ValueError("the PhotoMaker path needs an SDXL pipeline with two tokenizers (tokenizer, tokenizer_2)")
        if trigger_word not in tok.get_added_vocab():
            original, registered = copies.get((slot, trigger_word), (None, None))
            if original is not tok:
                registered = copy.deepcopy(tok)
                add_trigger_word(registered, trigger_word)
                copies[slot, trigger_word] = (tok, registered)
            tok = registered
        tokenizers.append(tok)
    return tuple(tokenizers)


def encode_id_prompts(text_encoder, text_encoder_2, tokenizers, prompts: list[str], num_id_images: int,
                      device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding of ID prompts ("a girl img, waving"), as PhotoMaker's pipeline does it: the class
    token repeated once per ID image, the trigger dropped; penultimate hidden states of both text encoders
    concatenated -> embeds (B, L, D1 + D2), the second encoder's pooled projection -> (B, P), and the class-token
    mask (B, L) that says where the fused ID embeddings go. Training and `generate_story` both call this."""
    encodings = [encode_with_trigger_sdxl(tokenizers, p, num_id_images=num_id_images) for p in prompts]
    ids1 = torch.stack([e1.input_ids for e1, _ in encodings]).to(device)  # (B, L)
    ids2 = torch.stack([e2.input_ids for _, e2 in encodings]).to(device)
    h1 = text_encoder(ids1, output_hidden_states=True).hidden_states[-2]  # (B, L, D1)
    out2 = text_encoder_2(ids2, output_hidden_states=True)
    embeds = torch.cat([h1, out2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
    mask = torch.stack([e1.class_tokens_mask for e1, _ in encodings]).to(device)  # (B, L)
    return embeds, out2[0], mask  # out2[0]: text_embeds, the pooled projection


def lora_fingerprint(lora_weights: dict) -> str:
    """A short digest of a LoRA state dict (names, shapes, sums): the same LoRA gives the same digest."""
    digest = hashlib.sha256()
    for name in sorted(lora_weights):
        t = lora_weights[name]
        digest.update(f"{name}{tuple(t.shape)}{float(t.double().sum()):.10e}".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _diffusers_errors_only():
    """diffusers warns once per text encoder that a UNet-only LoRA has no keys for it: expected here, so hidden."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(before)


def fuse_photomaker_lora(pipe, lora_weights: dict, adapter_name: str = "photomaker") -> bool:
    """Fuse a PhotoMaker checkpoint's `lora_weights` into the pipeline's UNet, as PhotoMaker's loader does:
    diffusers' ``load_lora_weights`` (any format it reads, e.g. PhotoMaker v1's ``unet....processor.to_q_lora.down``
    keys), ``fuse_lora`` (W += scale * up @ down), then ``unload_lora_weights``, which leaves plain layers holding the
    fused weights. Done once per pipeline: the same LoRA again is a no-op (returns False), another one is refused.
    An empty dict does nothing. Returns True when it fused."""
    if not lora_weights:
        return False
    fused = getattr(pipe.unet, "photomaker_lora", None)
    mark = lora_fingerprint(lora_weights)
    if fused == mark:
        return False
    if fused is not None:
        raise ValueError("this pipeline's UNet has another PhotoMaker LoRA fused into it already: load the pipeline "
                         "again (load_pipeline) before using a second checkpoint")
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} cannot load a LoRA: PhotoMaker needs a StableDiffusionXLPipeline")
    if any(pipe.get_list_adapters().values()):  # unload_lora_weights below would drop them
        raise ValueError(f"the pipeline has LoRA adapters loaded ({pipe.get_list_adapters()}): fuse_lora() and "
                         "unload_lora_weights() them, or unload them, before PhotoMaker's LoRA is fused")
    with _diffusers_errors_only():
        unreadable = (f"lora_weights hold no UNet LoRA that diffusers can read (first keys: {sorted(lora_weights)[:2]}"
                      "): expected PhotoMaker v1's, e.g. 'unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
                      ".processor.to_q_lora.down.weight'")
        try:
            pipe.load_lora_weights(dict(lora_weights), adapter_name=adapter_name)  # a copy: diffusers pops keys
        except ValueError as err:
            if "PEFT backend" in str(err):
                raise ValueError("fusing PhotoMaker's LoRA needs the peft package: pip install peft") from None
            raise ValueError(f"{unreadable}; diffusers says: {err}") from None
        if adapter_name not in pipe.get_list_adapters().get("unet", []):
            pipe.unload_lora_weights()
            raise ValueError(unreadable)
        pipe.fuse_lora(adapter_names=[adapter_name])
        pipe.unload_lora_weights()
    pipe.unet.photomaker_lora = mark
    return True
