"""Step 04b: StoryDiffusion on any SDXL or SD1.5 pipeline: a parsed story -> consistent panels.

:func:`generate_story` takes an unmodified diffusers ``StableDiffusionXLPipeline`` (storyworld's, or real SDXL in
fp16 on a GPU) or ``StableDiffusionPipeline`` (SD1.5: one text encoder, no pooled embeddings or size conditioning;
everything else is the same code) and a :class:`~sdlite.story.Story`, and:

1. checks every prompt against the pipeline's tokenizer (length, and vocabulary on storyworld);
2. installs consistent self-attention (CSA, :mod:`sdlite.attention`) on the chosen self-attention layers;
3. **write**: generates each character's reference panels (its first ``id_length`` solo panels) together, in one
   batch whose images attend to each other, and stores a sample of their tokens in the bank, per step and layer;
4. **read**: generates the other panels in batches of ``read_batch``; each attends to its own tokens plus the
   bank of the characters it names ([NC] panels use plain attention);
5. removes the processors (also on error).

Only public pipeline arguments are used: ``prompt_embeds`` (from ``pipe.encode_prompt``, or the PhotoMaker fused
embeddings), one ``torch.Generator`` per panel, and ``callback_on_step_end`` to tell CSA the denoising step.
Peak memory depends on the largest batch (``max(id_length, read_batch)`` panels) plus the bank, which does not
grow with the story: a 32-panel story needs no more memory than an 8-panel one (``benchmarks/story_memory.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .attention import (
    OFFICIAL_SKIP_SCHEDULE,
    SkipSchedule,
    csa_layer_names,
    install_consistent_attention,
    layer_scale,
)
from .bank import BankLayer, ConsistencyBank, estimate_bank_nbytes
from .id_selection import candidate_seeds, check_candidates, pick_closest
from .token_sampling import check_sampling
from .story import Story, check_story_prompts

__all__ = [
    "Batch",
    "CSAConfig",
    "SEED_POLICIES",
    "StoryResult",
    "bank_settings",
    "check_bank_settings",
    "estimate_story_bank",
    "new_bank",
    "generate_story",
    "PIPELINE_CLASSES",
    "is_sdxl",
    "is_storyworld",
    "load_pipeline",
    "pipeline_class_name",
    "model_defaults",
    "panel_seeds",
    "plan_batches",
]

SEED_POLICIES = ("per_panel", "shared")
MODEL_DEFAULT = "model"  # a CSAConfig field left to the model (model_defaults)


# ----------------------------------------------------------------------------------------------------
# Settings
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CSAConfig:
    """How consistent self-attention runs during a story.

    rate: share of the other images' tokens each image samples; None = the model's default (:func:`model_defaults`:
        0.5 on SDXL, as the paper and the official code; 1.0 on storyworld, whose UNet was pre-trained with joint
        attention at rates 1 and 0.5 and measures the largest gain at 1, see docs/storyworld-recipe.md).
    tile: images per CSA window inside a batch (None: the whole batch); stride: window step (None: = tile).
    layers: "up" (official: up-block self-attention), "all", "down", "mid", or None = the model's default
        ("all" on storyworld, whose UNet was pre-trained with joint attention in every layer; "up" on SDXL).
    id_length: reference panels per character, generated together and written to the bank (None: all its solo
        panels: the whole story of one character in one CSA batch, where tiles matter).
    read_batch: panels per batch in the read phase.
    first_steps_without_csa: plain attention for steps 0..n-1; None = the model's default (official SDXL: 1;
        storyworld: 0, as its 20 steps set the composition early and it was trained with joint attention).
    skip_schedule: random plain-attention layer calls (official: 0.3 before step 20, 0.1 after); None: never.
    enabled: False = no CSA at all (plain SDXL, same batches and seeds: the baseline).
    sampling: "exact" (sdlite's: each image draws exactly round(r * pool) tokens per layer call) or "official"
        (the official code's: per step one random keep-mask per source image, shared by all layers of a resolution
        and both guidance halves); :mod:`sdlite.token_sampling` explains both.
    rate_by_scale: a rate per resolution, ``{32: 0.5, 16: 0.5}`` = the official sa32 / sa64 (layers whose tokens
        span 32 / 16 pixels, :func:`sdlite.attention.layer_scale`); other layers take ``rate``. None: one rate.
    bank_steps: store (and read) the bank for the first n denoising steps only; later steps of read panels use
        plain attention. None: every step. "model": the model's default (:func:`model_defaults`).
    bank_device: where the bank lives ("cpu": out of GPU memory; None: with the model).
    bank_dtype: "float16" halves a float32 bank (None: the model's type).

    ``id_length`` and ``bank_steps`` default to "model": storyworld keeps every step and 4 references; real SDXL /
    SD1.5 store 2 references and 20 steps, so that the bank of two characters at 1024 px fits a 24 GB card next to
    SDXL (:func:`estimate_story_bank`; README "Running on real weights").
    """

    rate: float | None = None
    tile: int | None = None
    stride: int | None = None
    layers: str | None = None
    id_length: int | None | str = MODEL_DEFAULT
    read_batch: int = 4
    first_steps_without_csa: int | None = None
    skip_schedule: SkipSchedule | None = None
    enabled: bool = True
    sampling: str = "exact"
    rate_by_scale: tuple | dict | None = None
    bank_steps: int | None | str = MODEL_DEFAULT
    bank_device: str | None = None
    bank_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.rate is not None and (isinstance(self.rate, bool) or not isinstance(self.rate, (int, float))
                                      or not 0 <= self.rate <= 1):
            raise ValueError(f"rate must be in [0, 1], got {self.rate!r}: e.g. rate=0.5")
        f = self.first_steps_without_csa
        if f is not None and (isinstance(f, bool) or not isinstance(f, int) or f < 0):
            raise ValueError(f"first_steps_without_csa must be an int >= 0 or None (model default), got {f!r}")
        for name in ("tile", "id_length", "bank_steps"):
            v = getattr(self, name)
            if name != "tile" and v == MODEL_DEFAULT:
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an int >= 1 or None, got {v!r}")
        check_sampling(self.sampling)
        if self.rate_by_scale is not None:
            pairs = self.rate_by_scale.items() if isinstance(self.rate_by_scale, dict) else self.rate_by_scale
            try:
                pairs = tuple(sorted((int(k), float(v)) for k, v in pairs))
            except (TypeError, ValueError):
                raise ValueError(f"rate_by_scale must map a scale to a rate, e.g. {{32: 0.5, 16: 0.5}}, got "
                                 f"{self.rate_by_scale!r}") from None
            if any(k < 1 or not 0 <= v <= 1 for k, v in pairs):
                raise ValueError(f"rate_by_scale needs scales >= 1 and rates in [0, 1], got {dict(pairs)}")
            object.__setattr__(self, "rate_by_scale", pairs)  # a tuple of (scale, rate): hashable, JSON-able
        if self.bank_dtype not in (None, "float16", "bfloat16", "float32"):
            raise ValueError(f"bank_dtype must be 'float16', 'bfloat16', 'float32' or None, got {self.bank_dtype!r}")
        if self.tile == 1:
            raise ValueError("tile=1 puts every image alone in its window (no consistency): use tile >= 2, "
                             "None (whole batch), or enabled=False for no CSA")
        if self.stride is not None and (self.tile is None or not 1 <= self.stride <= self.tile):
            raise ValueError(f"stride={self.stride!r} needs a tile and 1 <= stride <= tile: e.g. tile=4, stride=2")
        if isinstance(self.read_batch, bool) or not isinstance(self.read_batch, int) or self.read_batch < 1:
            raise ValueError(f"read_batch must be an int >= 1, got {self.read_batch!r}")
        if self.layers not in (None, "up", "all", "down", "mid"):
            raise ValueError(f"layers must be 'up', 'all', 'down', 'mid' or None (model default), got {self.layers!r}")

    def with_model_defaults(self, defaults: dict) -> CSAConfig:
        """This setting with what the model decides filled in (layers, rate, first_steps_without_csa when None),
        from :func:`model_defaults`: the setting that actually runs, and equal settings compare equal."""
        first = self.first_steps_without_csa
        return dataclasses.replace(
            self, layers=self.layers or defaults["layers"], rate=defaults["rate"] if self.rate is None else self.rate,
            first_steps_without_csa=defaults["first_steps_without_csa"] if first is None else first,
            id_length=defaults["id_length"] if self.id_length == MODEL_DEFAULT else self.id_length,
            bank_steps=defaults["bank_steps"] if self.bank_steps == MODEL_DEFAULT else self.bank_steps)

    @property
    def references(self) -> int | None:
        """id_length as a number (the "model" default read as 4, storyworld's, when no model is at hand)."""
        return 4 if self.id_length == MODEL_DEFAULT else self.id_length

    @classmethod
    def official(cls, **overrides) -> CSAConfig:
        """The official demo's setting: up-blocks, rate 0.5 at both resolutions (sa32, sa64), official sampling,
        no CSA at step 0, random skips (0.3 before step 20, 0.1 after), one reference panel per character, every
        step in the bank. (Its size, 768 px, and shared seed are arguments of generate_story: ``sdlite story
        --preset official`` sets them all.)"""
        return cls(**{"layers": "up", "rate": 0.5, "rate_by_scale": {32: 0.5, 16: 0.5}, "sampling": "official",
                      "first_steps_without_csa": 1, "skip_schedule": OFFICIAL_SKIP_SCHEDULE, "id_length": 1,
                      "bank_steps": None, **overrides})


# Real models' bank defaults: two characters of SDXL at 1024 px, 35 steps, fp16 store 2 x 4.4 GB (instead of
# 2 x 15.4 GB with 4 references and every step), next to SDXL's 6.9 GB of weights on a 24 GB card.
REAL_ID_LENGTH = 2  # the official app.py's id_length
REAL_BANK_STEPS = 20  # the official skip schedule's switch step: later steps only refine details


def is_storyworld(pipe) -> bool:
    """True for a pipeline with a small-vocabulary tokenizer (storyworld's), False for CLIP's 49408 tokens."""
    from .story import is_small_vocabulary

    return is_small_vocabulary(pipe.tokenizer)


def is_sdxl(pipe) -> bool:
    """True for an SDXL-style pipeline (two text encoders, pooled embeddings; storyworld's is one), False for SD1.5."""
    return getattr(pipe, "text_encoder_2", None) is not None


def model_defaults(pipe) -> dict:
    """Defaults that depend on the model: steps, guidance, CSA layers and rate (size: the pipeline's own default).
    SD1.5 takes diffusers' guidance 7.5; the CSA settings are the official SDXL ones (the up-blocks' self-attention)."""
    if is_storyworld(pipe):
        return {"steps": 20, "guidance_scale": 5.0, "layers": "all", "first_steps_without_csa": 0, "rate": 1.0,
                "id_length": 4, "bank_steps": None}
    guidance = 5.0 if is_sdxl(pipe) else 7.5
    return {"steps": 35, "guidance_scale": guidance, "layers": "up", "first_steps_without_csa": 1, "rate": 0.5,
            "id_length": REAL_ID_LENGTH, "bank_steps": REAL_BANK_STEPS}


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def is_hub_id(model: str) -> bool:
    """True for `namespace/name` that is not a local path: a mistyped local folder (`./m/nope`, `runs/x/export`,
    `m/nope` where `m/` exists) is never sent to the Hub."""
    if not _HUB_ID.match(model) or model.startswith("."):
        return False
    namespace = model.split("/", 1)[0]
    return not Path(namespace).exists()


def load_tokenizer(model: str | Path = "storyworld"):
    """Only the (first) tokenizer of a pipeline: 'storyworld', or a local pipeline folder's `tokenizer/`; None for a
    hub id (nothing is fetched). Cheap: a story's words and prompt lengths are checked with it before the model loads."""
    from transformers import CLIPTokenizer

    if str(model) == "storyworld":
        from .storyworld.models import storyworld_dir

        folder = storyworld_dir() / "tokenizer"
    else:
        folder = Path(model) / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        return None
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)


PIPELINE_CLASSES = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")


def pipeline_class_name(config: dict, where: str) -> str:
    """The ``_class_name`` of a pipeline's ``model_index.json`` (already read into ``config``), checked: one of
    :data:`PIPELINE_CLASSES`, else a ValueError naming what the folder holds."""
    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in PIPELINE_CLASSES:
        raise ValueError(f"{where} holds a {name or 'pipeline without _class_name'}: sdlite story runs "
                         "StableDiffusionXLPipeline (SDXL) and StableDiffusionPipeline (SD1.5) folders; pass one of "
                         "those (e.g. stabilityai/stable-diffusion-xl-base-1.0) or 'storyworld'")
    return name


def _read_model_index(path: Path) -> dict:
    import json

    try:
        return json.loads((path / "model_index.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path / 'model_index.json'} is not valid JSON ({err}): restore the pipeline folder") from None


def load_pipeline(model: str | Path = "storyworld", device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """``"storyworld"`` (the shipped tiny model), a local pipeline folder, or a hub id such as
    ``"stabilityai/stable-diffusion-xl-base-1.0"`` (needs the weights in the local cache or a network).

    The pipeline class comes from the folder's ``model_index.json``: ``StableDiffusionXLPipeline`` (SDXL) or
    ``StableDiffusionPipeline`` (SD1.5, loaded without its safety checker); any other class is refused.
    dtype defaults to float16 on CUDA and float32 elsewhere (storyworld: always float32).
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no GPU: use --device cpu (storyworld runs on CPU)")
    if str(model) == "storyworld":
        from .storyworld.models import load_storyworld

        return load_storyworld(device)
    import diffusers

    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"{path} is not a diffusers pipeline folder (no model_index.json): pass a folder "
                                    "written by save_pretrained, a hub id, or 'storyworld'")
        from .storyworld.models import storyworld_dir

        if path.resolve() == storyworld_dir().resolve():
            from .storyworld.models import load_storyworld

            return load_storyworld(device, folder=path)
        from .checkpoints import check_loaded_weights, check_pipeline_folder

        cls = getattr(diffusers, pipeline_class_name(_read_model_index(path), str(path)))
        check_pipeline_folder(path)
        pipe = cls.from_pretrained(path, dtype=dtype, local_files_only=True, **_no_safety_checker(cls))
        check_loaded_weights(pipe, path)
    else:
        if not is_hub_id(str(model)):
            raise FileNotFoundError(f"--model {model!r}: no such folder (and not a hub id of the form 'namespace/name'"
                                    "): check the path, or pass 'storyworld' or a hub id like "
                                    "'stabilityai/stable-diffusion-xl-base-1.0'")
        try:
            cls = getattr(diffusers, pipeline_class_name(diffusers.DiffusionPipeline.load_config(str(model)),
                                                         str(model)))
            extra = _no_safety_checker(cls)
            try:  # the fp16 weight files when asking for fp16 (half the download), else the default ones
                pipe = cls.from_pretrained(str(model), dtype=dtype, use_safetensors=True,
                                           variant="fp16" if dtype == torch.float16 else None, **extra)
            except (OSError, ValueError):
                if dtype != torch.float16:
                    raise
                pipe = cls.from_pretrained(str(model), dtype=dtype, use_safetensors=True, **extra)
        except OSError as err:
            raise FileNotFoundError(
                f"--model {model!r} was taken as a hub id (no local folder of that name), and could not be loaded "
                f"({err.__class__.__name__}): without a network the weights must be in the "
                "Hugging Face cache (run once online: `huggingface-cli download stabilityai/stable-diffusion-xl-base"
                "-1.0`) or in a local folder passed as --model PATH") from err
    return pipe.to(device)


def _no_safety_checker(cls) -> dict:
    """SD1.5 folders name a safety checker: sdlite loads the pipeline without it, as the official StoryDiffusion
    demo does (SDXL has none), so that an SD1.5 story is judged by the same rules as an SDXL one."""
    if cls.__name__ == "StableDiffusionPipeline":
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


# ----------------------------------------------------------------------------------------------------
# The plan: which panels go together, in which CSA mode
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """Panels generated in one pipeline call. mode: "write" (a character's references), "read" (attend to the
    bank of ``characters``), "plain" (no CSA: [NC] panels, or CSA disabled)."""

    mode: str
    characters: tuple[str, ...]
    panels: tuple[int, ...]


def plan_batches(story: Story, csa: CSAConfig | None, stored: tuple[str, ...] = ()) -> list[Batch]:
    """The write batches (one per character, its reference panels), then the other panels in story order,
    grouped by the characters they name into read batches of at most ``read_batch``. Characters in ``stored``
    are in the bank already (loaded from a character file): they get no write batch, all their panels read."""
    if csa is None or not csa.enabled:
        size = (csa or CSAConfig()).read_batch
        size = max(size, (csa or CSAConfig()).references or len(story))
        idx = list(range(len(story)))
        return [Batch("plain", (), tuple(idx[i:i + size])) for i in range(0, len(idx), size)]
    refs = {name: panels for name, panels in story.reference_panels(csa.references).items() if name not in stored}
    plan = [Batch("write", (name,), tuple(panels)) for name, panels in refs.items()]
    done = {i for panels in refs.values() for i in panels}
    pending: dict[tuple[str, ...], list[int]] = {}
    for p in story.panels:
        if p.index in done:
            continue
        group = pending.setdefault(p.characters, [])
        group.append(p.index)
        if len(group) == csa.read_batch:
            plan.append(Batch("read" if p.characters else "plain", p.characters, tuple(group)))
            pending[p.characters] = []
    for chars, group in pending.items():
        if group:
            plan.append(Batch("read" if chars else "plain", chars, tuple(group)))
    return plan


def panel_seeds(n: int, seed: int, policy: str = "per_panel") -> list[int]:
    """The noise seed of every panel: ``seed + i`` (independent noise) or ``seed`` for all (the official
    demo's habit, "shared")."""
    if policy not in SEED_POLICIES:
        raise ValueError(f"seed_policy must be one of {SEED_POLICIES}, got {policy!r}")
    return [seed + i if policy == "per_panel" else seed for i in range(n)]


# ----------------------------------------------------------------------------------------------------
# The bank: its size before generating, its settings in character files
# ----------------------------------------------------------------------------------------------------
def new_bank(csa: CSAConfig) -> ConsistencyBank:
    """An empty bank where ``csa`` asks for it (bank_device, bank_dtype)."""
    return ConsistencyBank(device=csa.bank_device, dtype=getattr(torch, csa.bank_dtype) if csa.bank_dtype else None)


def _image_size(pipe, height, width) -> tuple[int, int]:
    default = pipe.unet.config.sample_size * pipe.vae_scale_factor  # the pipelines' own default size
    return height or default, width or default


def estimate_story_bank(pipe, story: Story, csa: CSAConfig | None = None, steps: int | None = None,
                        height: int | None = None, width: int | None = None,
                        guidance_scale: float | None = None) -> dict[str, int]:
    """Bytes the bank will hold per character for this story and setting, before generating anything
    (:func:`sdlite.bank.estimate_bank_nbytes` over the CSA layers of ``pipe``). Exact for ``sampling="exact"``
    (equal to the measured ``ConsistencyBank.nbytes``); the expected size for "official" sampling."""
    defaults = model_defaults(pipe)
    csa = (csa or CSAConfig()).with_model_defaults(defaults)
    if not csa.enabled:
        return {name: 0 for name in story.characters}
    steps = defaults["steps"] if steps is None else steps
    guidance = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    h, w = _image_size(pipe, height, width)
    latent_h, latent_w = h // pipe.vae_scale_factor, w // pipe.vae_scale_factor
    rates = dict(csa.rate_by_scale or ())
    layers = []
    for name in csa_layer_names(pipe.unet, csa.layers):
        scale = layer_scale(pipe.unet, name, pipe.vae_scale_factor)
        down = scale // pipe.vae_scale_factor  # the latent grid is halved log2(down) times to reach this layer
        # each stride-2 downsampler rounds an odd side up (a 40-px storyworld image: latent 10 -> 5 -> 3 tokens)
        tokens = -(-latent_h // down) * -(-latent_w // down)
        module = pipe.unet.get_submodule(name)
        layers.append(BankLayer(name, tokens, module.to_q.in_features, rates.get(scale, csa.rate)))
    dtype = getattr(torch, csa.bank_dtype) if csa.bank_dtype else pipe.unet.dtype
    stored = steps if csa.bank_steps is None else min(steps, csa.bank_steps)
    return {name: estimate_bank_nbytes(layers, len(panels), stored, 2 if guidance > 1 else 1,
                                       torch.empty((), dtype=dtype).element_size(), csa.sampling)
            for name, panels in story.reference_panels(csa.id_length).items()}


def bank_settings(pipe, csa: CSAConfig, steps: int, height: int | None, width: int | None,
                  guidance_scale: float) -> dict:
    """What a character's stored tokens depend on: a character file made under other settings cannot be read."""
    h, w = _image_size(pipe, height, width)
    return {"unet": type(pipe.unet).__name__, "cross_attention_dim": pipe.unet.config.cross_attention_dim,
            "block_out_channels": list(pipe.unet.config.block_out_channels), "height": h, "width": w,
            "steps": steps, "guidance_halves": guidance_scale > 1, "layers": csa.layers,
            "layer_names": csa_layer_names(pipe.unet, csa.layers), "bank_steps": csa.bank_steps}


def check_bank_settings(name: str, saved: dict, wanted: dict) -> None:
    """A loaded character's settings against this run's: a ValueError naming the first difference."""
    for key, value in wanted.items():
        if saved.get(key) != value:
            shown = "(the list differs)" if isinstance(value, list) else f"{saved.get(key)!r} in the file, {value!r} now"
            raise ValueError(f"character file of {name!r} was made with other settings: {key} {shown}; generate with "
                             "the same model, size, steps, guidance and CSA layers, or write the character again")


# ----------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------
@dataclass
class StoryResult:
    images: list[Image.Image]  # one per panel, story order
    story: Story
    seeds: list[int]
    plan: list[Batch]
    settings: dict = field(default_factory=dict)
    bank_nbytes: int = 0  # bytes held by the CSA bank at the end of the story

    @property
    def captions(self) -> list[str]:
        return self.story.captions

    def arrays(self) -> np.ndarray:
        """uint8 (n, H, W, 3)."""
        return np.stack([np.asarray(im.convert("RGB")) for im in self.images])


def _encode(pipe, prompts: list[str], negative: str, do_cfg: bool, device):
    """(prompt, negative, pooled, negative pooled) embeddings; the pooled ones are None on SD1.5."""
    negatives = [negative] * len(prompts) if negative else None
    if not is_sdxl(pipe):  # SD1.5: one text encoder, its last hidden state; no pooled embedding
        pe, npe = pipe.encode_prompt(prompts, device, 1, do_cfg, negative_prompt=negatives)
        return pe, npe, None, None
    return pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=do_cfg,
                              negative_prompt=negatives)


def _fused_embeds(pipe, story: Story, panel_ids, id_encoder, id_images, device, text_embeds, text_pooled,
                  tokenizers):
    """PhotoMaker path: the ID prompts of a batch, (B, L, D) with the class tokens of the trigger word fused with
    the ID images, and their pooled embeddings (B, P) (the second text encoder's, of the ID prompt's tokens: class
    token repeated, trigger dropped, as PhotoMaker's pipeline). Panels without ID images keep their text-only rows.
    Returns (None, None) when no panel of the batch has ID images."""
    from .id_encoder import encode_id_prompts

    rows, pooled_rows = [], []
    any_id = False
    for j, i in enumerate(panel_ids):
        p = story.panels[i]
        name = p.characters[0] if p.solo else None
        if name is None or name not in id_images or not re.search(r"(?<!\w)img(?!\w)", p.id_prompt, re.IGNORECASE):
            rows.append(text_embeds[j])
            pooled_rows.append(text_pooled[j])
            continue
        any_id = True
        imgs = id_images[name]
        embeds, pooled, mask = encode_id_prompts(pipe.text_encoder, pipe.text_encoder_2, tokenizers, [p.id_prompt],
                                                 len(imgs), device)  # (1, L, D), (1, P), (1, L)
        enc_dtype = next(id_encoder.parameters()).dtype  # e.g. an fp32 encoder next to an fp16 SDXL
        pix = id_encoder.pixel_values(imgs, device)[None]  # (1, n, 3, S, S)
        fused = id_encoder(pix, embeds.to(enc_dtype), mask)  # (1, L, D)
        rows.append(fused[0].to(text_embeds.dtype))
        pooled_rows.append(pooled[0].to(text_pooled.dtype))
    return (torch.stack(rows), torch.stack(pooled_rows)) if any_id else (None, None)


def _checked_settings(pipe, story: Story, csa, steps, guidance_scale, id_images, id_encoder):
    """Step 1 of `generate_story`: the inputs checked, the model's defaults filled in -> (csa, steps, guidance)."""
    defaults = model_defaults(pipe)
    csa = CSAConfig() if csa is None else csa
    if not isinstance(csa, CSAConfig):
        raise TypeError(f"csa must be a CSAConfig, got {type(csa).__name__}: e.g. CSAConfig(rate=0.5)")
    if not isinstance(story, Story):
        raise TypeError(f"story must be a parsed Story, got {type(story).__name__}: use sdlite.story.parse_story(text)")
    csa = csa.with_model_defaults(defaults)
    steps = defaults["steps"] if steps is None else steps
    guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if (id_images is None) != (id_encoder is None):
        raise ValueError("the PhotoMaker path needs both id_images={name: [images]} and id_encoder=IDEncoder(...)")
    if id_images is not None and not is_sdxl(pipe):
        raise ValueError("the PhotoMaker path needs an SDXL pipeline (PhotoMaker fuses into both SDXL text encoders'"
                         " tokens): load an SDXL model, or drop id_images for SD1.5")
    if id_images is not None:
        unknown = sorted(set(id_images) - set(story.characters))
        if unknown:
            raise ValueError(f"id_images names {unknown}, not characters of the story ({list(story.characters)})")
        if any(len(v) < 1 for v in id_images.values()):
            raise ValueError("every character in id_images needs at least one image")
    return csa, steps, guidance_scale


def _attention_mode(handle, csa: CSAConfig, batch: Batch, seed: int, n: int):
    """The context one batch of panels is generated in: CSA reseeded and tiled for this batch, then writing a
    character's references to the bank, reading them, or plain attention. (A no-op context without CSA.)"""
    if handle is None:
        return contextlib.nullcontext()
    handle.set_step(0)
    handle.reseed(seed)
    # the window cannot be larger than this batch: a tile >= the batch is one window over it
    tile = None if csa.tile is None or csa.tile >= n else csa.tile
    handle.set_tiles(tile, None if tile is None or csa.stride is None else min(csa.stride, tile))
    if batch.mode == "write":
        return handle.write(batch.characters[0])
    if batch.mode == "read":
        return handle.read(*batch.characters)
    return handle.off()


def _batch_embeds(pipe, story: Story, ids: list[int], do_cfg: bool, device, id_images, id_encoder, tokenizers):
    """The prompt embeddings of one batch of panels: (prompt, negative, pooled, negative pooled) of the text-only
    prompts, and with the PhotoMaker path the ID prompts' (fused tokens, pooled) or (None, None)."""
    prompts = [story.panels[i].prompt for i in ids]
    pe, npe, pooled, npooled = _encode(pipe, prompts, story.negative_prompt, do_cfg, device)
    fused = fused_pooled = None
    if id_images is not None:
        fused, fused_pooled = _fused_embeds(pipe, story, ids, id_encoder, id_images, device, pe, pooled, tokenizers)
    return pe, npe, pooled, npooled, fused, fused_pooled


def _step_callback(handle, merge: int, do_cfg: bool, npe, npooled, fused=None, fused_pooled=None):
    """The pipeline's `callback_on_step_end`: tells CSA the next step's index (it keys the bank and drives the
    skips) and, at the end of step `merge`, switches to the ID prompt, its fused token embeddings and its pooled
    embedding (PhotoMaker's delayed conditioning: text-only while step <= merge)."""

    def on_step_end(_pipe, i, _t, kwargs):
        if handle is not None:
            handle.set_step(i + 1)
        if fused is None or i != merge:
            return {}
        out = {"prompt_embeds": torch.cat([npe, fused]) if do_cfg else fused}
        if fused_pooled is not None:
            out["add_text_embeds"] = torch.cat([npooled, fused_pooled]) if do_cfg else fused_pooled
        return out

    return on_step_end


@torch.no_grad()
def generate_story(
    pipe,
    story: Story,
    *,
    csa: CSAConfig | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    seed_policy: str = "per_panel",
    progress: bool = True,
    id_images: dict | None = None,
    id_encoder=None,
    style_strength_ratio: float = 20.0,
    bank: ConsistencyBank | None = None,
    candidates: int = 1,
) -> StoryResult:
    """Generate the panels of ``story`` with consistent self-attention on an SDXL or SD1.5 pipeline.

    Args:
        pipe: a ``StableDiffusionXLPipeline`` (storyworld via ``load_pipeline()``, or real SDXL) or a
            ``StableDiffusionPipeline`` (SD1.5).
        csa: a :class:`CSAConfig` (default: ``CSAConfig()`` with the model's default layers);
            ``CSAConfig(enabled=False)`` for the no-CSA baseline with the same batches and noise.
        steps / guidance_scale: default per model (:func:`model_defaults`); height/width: the pipeline's default.
        seed, seed_policy: panel i's noise comes from ``torch.Generator().manual_seed(seed + i)`` ("per_panel")
            or ``seed`` for every panel ("shared"); CSA's sampling is seeded from ``seed`` too.
        id_images: {character name: [ID images]} and ``id_encoder`` (:class:`sdlite.id_encoder.IDEncoder`): the
            PhotoMaker path (SDXL; PhotoMaker v1, see :mod:`sdlite.id_encoder` on v2). Solo panels of those
            characters whose description carries the trigger word ("a man img") use the text-only prompt for
            steps 0 ... ``start_merge_step(steps, style_strength_ratio)``, then the ID prompt (its class tokens
            fused with the ID embeddings, and its pooled embedding), as PhotoMaker's pipeline. The trigger word is
            registered on copies of the tokenizers (the pipeline's stay as they are), and the checkpoint's LoRA
            (``id_encoder.lora_weights``) is fused into ``pipe.unet`` on the first such call, as PhotoMaker's
            loader does: it stays fused for later calls on this pipeline.
        bank: a :class:`~sdlite.bank.ConsistencyBank` the caller keeps (default: a new one, emptied at the end).
            Characters it holds already (e.g. loaded from character files) are not written again: all their
            panels read it. After the call it holds every character of the story: save them to go on next page.
        candidates: with id_images, the story is drawn this many times (seeds ``candidate_seeds(seed, K)``:
            draw j at ``seed + j * CANDIDATE_SEED_STRIDE``, so draw 0 is the single draw) and each solo panel of a referenced character keeps the draw
            whose ID embedding is closest to the references' (:mod:`sdlite.id_selection`). 1: a single draw. With
            a ``bank`` you keep, draw 0 writes the characters it does not hold yet and the later draws read them.
    Returns:
        :class:`StoryResult` with one PIL image per panel in story order.
    """
    from tqdm.auto import tqdm

    from .id_encoder import fuse_photomaker_lora, photomaker_tokenizers, start_merge_step

    if check_candidates(candidates) > 1:
        if id_images is None:
            raise ValueError(f"candidates={candidates} chooses each panel by its closeness to the reference images: "
                             "pass id_images and id_encoder (sdlite story --ref), or leave candidates at 1")
        draws = tqdm(candidate_seeds(seed, candidates), desc=f"draws of {len(story)} panels", unit="draw",
                     disable=not progress)
        runs = [generate_story(pipe, story, csa=csa, steps=steps, guidance_scale=guidance_scale, height=height,
                               width=width, seed=draw_seed, seed_policy=seed_policy,
                               progress=False, id_images=id_images, id_encoder=id_encoder,
                               style_strength_ratio=style_strength_ratio, bank=bank)
                for draw_seed in draws]
        return pick_closest(id_encoder, runs, id_images)
    csa, steps, guidance_scale = _checked_settings(pipe, story, csa, steps, guidance_scale, id_images, id_encoder)
    tokenizers = None
    if id_images is not None:
        tokenizers = photomaker_tokenizers(pipe)  # the trigger word registered (on copies)
        check_story_prompts(story, tokenizers[0], use_trigger=True)
        fuse_photomaker_lora(pipe, getattr(id_encoder, "lora_weights", None) or {})
    else:
        check_story_prompts(story, pipe.tokenizer, use_trigger=False)
    seeds = panel_seeds(len(story), seed, seed_policy)
    stored = tuple(c for c in (bank.characters if bank is not None else ()) if c in story.characters)
    plan = plan_batches(story, csa, stored)
    device = pipe._execution_device
    do_cfg = guidance_scale > 1.0
    merge = start_merge_step(steps, style_strength_ratio) if id_images is not None else 0

    handle = None
    own_bank = bank is None
    if csa.enabled:
        bank = new_bank(csa) if own_bank else bank
        handle = install_consistent_attention(
            pipe.unet, rate=csa.rate, tile=None, layers=csa.layers, guidance_halves=do_cfg,
            first_steps_without_csa=csa.first_steps_without_csa, skip_schedule=csa.skip_schedule, seed=seed,
            sampling=csa.sampling, rate_by_scale=dict(csa.rate_by_scale or ()), bank=bank,
            vae_scale_factor=pipe.vae_scale_factor, bank_steps=csa.bank_steps)
    images: list[Image.Image | None] = [None] * len(story)
    saved_bar = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(story), desc="panels", unit="panel", disable=not progress)
    try:
        for b, batch in enumerate(plan):
            ids = list(batch.panels)
            pe, npe, pooled, npooled, fused, fused_pooled = _batch_embeds(pipe, story, ids, do_cfg, device, id_images,
                                                                          id_encoder, tokenizers)
            generators = [torch.Generator().manual_seed(s) for s in (seeds[i] for i in ids)]
            on_step_end = _step_callback(handle, merge, do_cfg, npe, npooled, fused, fused_pooled)
            pooled_kwargs = {} if pooled is None else {"pooled_prompt_embeds": pooled,
                                                        "negative_pooled_prompt_embeds": npooled}  # SDXL only
            with _attention_mode(handle, csa, batch, seed * 1_000_003 + b, len(ids)):
                out = pipe(prompt_embeds=pe, negative_prompt_embeds=npe, **pooled_kwargs, num_inference_steps=steps,
                           guidance_scale=guidance_scale, height=height, width=width, generator=generators,
                           callback_on_step_end=on_step_end,
                           callback_on_step_end_tensor_inputs=["prompt_embeds"] + (["add_text_embeds"] if pooled
                                                                                   is not None else []),
                           output_type="pil")
            for i, im in zip(ids, out.images):
                images[i] = im
            bar.update(len(ids))
    finally:
        bar.close()
        pipe.set_progress_bar_config(**saved_bar)
        bank_nbytes = handle.bank.nbytes() if handle is not None else 0
        if handle is not None:
            if own_bank:
                handle.bank.clear()
            handle.remove()
    settings = {"csa": dataclasses.asdict(csa), "steps": steps, "guidance_scale": guidance_scale,
                "height": height, "width": width, "seed": seed, "seed_policy": seed_policy,
                "style": story.style.name, "id_images": sorted(id_images) if id_images else []}
    return StoryResult(images, story, seeds, plan, settings, bank_nbytes)
