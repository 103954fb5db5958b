"""Step 02: PhotoMaker's ID encoder and FuseModule, and delayed conditioning.

An ID image goes through a CLIP vision tower; its pooled output is projected twice (to the widths of SDXL's two
text encoders, 768 + 1280 = 2048) and concatenated: one ID embedding per image. The FuseModule merges each ID
embedding with the embedding of the class token ("man") it belongs to:

    fused = LayerNorm( mlp2( mlp1([class_emb, id_emb]) + class_emb ) )      mlp2 has its own residual

and the fused vectors replace the class tokens (the positions of `class_tokens_mask`) in the prompt embedding.
Module and parameter names follow PhotoMaker v1's checkpoint layout, so its `id_encoder` state dict loads as is.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection


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
    """Fuse class-token embeddings with ID embeddings, token by token: (M, D), (M, D) -> (M, D)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.embed_dim = embed_dim
        self.mlp1 = MLP(2 * embed_dim, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        x = torch.cat([class_embeds, id_embeds], dim=-1)  # (M, 2D)
        x = self.mlp1(x) + class_embeds  # (M, D): concat -> MLP, plus the class embedding added back
        x = self.mlp2(x)  # (M, D): residual MLP
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

    def __post_init__(self):
        for name in ("projection_dim", "projection_dim_2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int (SDXL: 768 and 1280)")
        if not isinstance(self.vision, dict):
            raise TypeError(f"vision must be a dict of CLIPVisionConfig arguments, got {type(self.vision).__name__}")

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

    def id_embeddings(self, id_pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, n, 3, H, W) ID images -> (B, n, D) ID embeddings, D = projection_dim + projection_dim_2."""
        if id_pixel_values.ndim != 5:
            raise ValueError(
                f"id_pixel_values must be (batch, num_id_images, 3, H, W), got {tuple(id_pixel_values.shape)}; "
                "add the num_id_images axis with .unsqueeze(1) for one image per prompt"
            )
        B, n = id_pixel_values.shape[:2]
        pooled = self.vision_model(pixel_values=id_pixel_values.flatten(0, 1)).pooler_output  # (B*n, hidden)
        embeds = torch.cat([self.visual_projection(pooled), self.visual_projection_2(pooled)], dim=-1)
        return embeds.view(B, n, -1)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor):
        """Prompt embeddings (B, L, D) with their class tokens replaced by the fused ID embeddings."""
        return fuse_id_embeddings(prompt_embeds, self.id_embeddings(id_pixel_values), class_tokens_mask,
                                  self.fuse_module)


def load_photomaker_id_encoder(
    checkpoint: str | Path | dict, config: IDEncoderConfig | None = None
) -> IDEncoder:
    """Build an IDEncoder from a PhotoMaker v1 checkpoint: a file (or dict) with keys `id_encoder` and `lora_weights`.

    `config` defaults to PhotoMaker v1's (ViT-L/14). Wrong keys or shapes give a ValueError naming them.
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
    return encoder


def save_photomaker_checkpoint(encoder: IDEncoder, path: str | Path, lora_weights: dict | None = None) -> Path:
    """Write `encoder` in PhotoMaker v1's layout ({'id_encoder': ..., 'lora_weights': ...}); never overwrites."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} exists: choose another path (checkpoints are never overwritten)")
    torch.save({"id_encoder": encoder.state_dict(), "lora_weights": dict(lora_weights or {})}, path)
    return path


def start_merge_step(num_steps: int, style_strength_ratio: float = 20.0, max_step: int = 30) -> int:
    """PhotoMaker's delayed conditioning: the first `style_strength_ratio`% of the steps use the text-only prompt."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one denoising step")
    if not 0 <= style_strength_ratio <= 100:
        raise ValueError(f"style_strength_ratio={style_strength_ratio} is a percentage: use a value in [0, 100]")
    return min(int(style_strength_ratio / 100 * num_steps), max_step)


def delayed_conditioning_schedule(num_steps: int, merge_step: int) -> list[bool]:
    """For each denoising step, True when the fused ID embeddings are used (steps >= merge_step), else text-only."""
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}: need at least one denoising step")
    if merge_step < 0:
        raise ValueError(f"merge_step={merge_step} must be >= 0 (0 = use the ID embeddings from the first step)")
    return [step >= merge_step for step in range(num_steps)]
