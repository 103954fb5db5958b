"""PhotoMaker's training, which PhotoMaker never released, in storyworld: `python -m sdlite.train id-encoder`.

The ID encoder (`sdlite.id_encoder.IDEncoder`, PhotoMaker v1's shape) is trained on pairs the renderer makes for
free: reference renders of a character in other scenes and poses -> a target render of the same character, captioned
with the trigger and with the identity left unsaid ("a girl img, waving on the beach"). Only the ID embedding can
tell the UNet the hair, shirt, trousers and hat, so the diffusion loss teaches the encoder to carry them. Two stages,
one run, one optimizer, one checkpoint (resumable at any step):

1. **tower** (`tower_steps`): storyworld CLIP's vision tower is fine-tuned, with one linear head per identity label
   (class word, hair, shirt, trousers, hat) on its pooled output, to *see* identity. The frozen tower reads hair and
   hat barely better than chance (a linear probe: notebook 02); a fuse MLP cannot carry what the tower does not see.
2. **fuse** (`steps`): PhotoMaker's recipe: the projections, the FuseModule and a LoRA on every attention layer of
   the UNet (peft, through diffusers' `add_adapter`) learn from the diffusion loss, min-SNR weighted and weighted up
   on the character's latent cells (storyworld knows them exactly) and on the noisiest timesteps (`noise_weight`:
   without it shirt and trousers were never learned); the tower goes on learning at a tenth of the rate,
   its label heads kept as a small auxiliary loss. A quarter of each batch are ordinary fully captioned renders
   without ID, so the LoRA'd UNet still follows text (delayed conditioning starts every ID panel text-only).

A run can also start from a trained encoder (`init`, `--init FOLDER`: its weights and LoRA, new label heads) to
fine-tune it with another recipe, e.g. stage 2 only with `hair_weight`: more loss on the hair's latent cells (about
10 of 256), the attribute the first recipe followed least. The exported `training.json` keeps the chain.

Held-out characters (`storyworld.datasets.is_held_out`, one combination in five) are never shown in training: the
evaluation (`python -m sdlite.eval photomaker`) takes its reference renders from them.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from torch import nn
from tqdm.auto import tqdm

from ..id_encoder import IDEncoder, IDEncoderConfig, fuse_id_embeddings, encode_id_prompts, save_id_encoder
from ..seeds import seeded, step_generator
from ..storyworld.datasets import IDPairDataset, ImageDataset, character_mask
from ..storyworld.world import ATTRIBUTES, labels, render
from .loop import CsvLog, save_checkpoint, start_run, warmup_hold_cooldown
from .storyworld import TrainConfig
from .unet import UnetTrainer, encode_text

ID_LABELS = ("class_word", "hair", "shirt", "trousers", "hat")  # what the tower's heads read
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # every attention layer's projections (self and cross)
EXPORT_SUBDIR = "id_encoder"  # data/storyworld/id_encoder
RECIPE_COMMAND = ("python -m sdlite.train id-encoder --out runs/id_encoder --export data/storyworld/id_encoder_base "
                  "--force --threads 1")  # the base run; `make train-id-encoder` then fine-tunes it (SHIPPED_RECIPE)
SHIPPED_RECIPE = "make train-id-encoder (the base run, then two hair fine-tunes with --init: see the Makefile)"


@dataclass(frozen=True)
class IDTrainConfig:
    """The ID encoder's recipe (validated; variants with `dataclasses.replace`)."""

    tower_steps: int = 600  # stage 1: tower + label heads on single renders
    tower_batch_size: int = 64
    tower_lr: float = 5e-4
    steps: int = 4000  # stage 2: the diffusion loss on ID pairs
    batch_size: int = 16  # images per step, of which text_fraction without ID
    lr: float = 5e-4  # projections, FuseModule, LoRA
    tower_lr_scale: float = 0.1  # the tower's rate in stage 2, relative to lr
    text_fraction: float = 0.25
    max_references: int = 3  # step s uses 1 + s % max_references reference renders per pair
    lora_rank: int = 16
    lora_targets: tuple[str, ...] = LORA_TARGETS  # UNet layers with a LoRA (PhotoMaker: attention; + "conv1", "conv2"
    #                                               puts one on each ResNet block's convolutions too)
    label_weight: float = 0.1  # stage 2: weight of the heads' cross-entropy (the tower keeps seeing identity)
    # stage 2: noisy timesteps weigh up to this many times more (x 1/SNR, as an x0 loss would): see `noise_weight`
    high_noise_weight: float = 20.0
    character_weight: float = 4.0
    hair_weight: float = 0.0  # extra loss weight on the hair's latent cells (about 10 of 256: otherwise barely seen)
    min_snr_gamma: float = 5.0
    caption_dropout: float = 0.1  # zeroed prompts (unconditional), for classifier-free guidance
    warmup: int = 100
    decay_steps: int = 1200  # stage 2's rate falls linearly to 0 over its last decay_steps
    log_every: int = 50
    ckpt_every: int = 250
    seed: int = 0

    def __post_init__(self):
        for name in ("tower_steps", "steps", "batch_size", "tower_batch_size", "max_references", "lora_rank",
                     "log_every", "ckpt_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "tower_steps" else 1):
                raise ValueError(f"{name}={value!r} must be a positive int")
        if not 0 <= self.text_fraction < 1:
            raise ValueError(f"text_fraction={self.text_fraction} must be in [0, 1): some of each batch needs ID")
        if min(self.lr, self.tower_lr) <= 0 or self.tower_lr_scale < 0 or self.decay_steps < 0 or self.warmup < 0:
            raise ValueError("learning rates must be > 0; tower_lr_scale, decay_steps and warmup >= 0")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ValueError(f"lora_targets={self.lora_targets!r}: name one or more UNet layers, e.g. {LORA_TARGETS}")
        if min(self.hair_weight, self.character_weight, self.label_weight) < 0 or self.high_noise_weight < 1:
            raise ValueError("hair_weight, character_weight and label_weight must be >= 0, high_noise_weight >= 1")

    @property
    def total_steps(self) -> int:
        return self.tower_steps + self.steps


class IDTraining(nn.Module):
    """What one run trains and checkpoints: the ID encoder, the tower's label heads, and the UNet with its LoRA."""

    def __init__(self, encoder: IDEncoder, unet, rank: int, targets: tuple[str, ...] = LORA_TARGETS):
        super().__init__()
        from peft import LoraConfig

        self.encoder = encoder
        hidden = encoder.config.vision["hidden_size"]
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, len(ATTRIBUTES[name])) for name in ID_LABELS})
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=list(targets)))
        self.unet = unet

    def label_loss(self, pooled: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        """Mean cross-entropy of the heads on the tower's pooled output (n, hidden), and their mean accuracy."""
        losses, correct = [], []
        for name, head in self.heads.items():
            logits = head(pooled)  # (n, classes)
            losses.append(F.cross_entropy(logits, labels[name]))
            correct.append((logits.argmax(-1) == labels[name]).float().mean())
        return torch.stack(losses).mean(), float(torch.stack(correct).mean())

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's LoRA in diffusers' format with "unet." keys: what `pipe.load_lora_weights` reads."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
        return {f"unet.{k}": v.detach().clone().contiguous() for k, v in state.items()}


def storyworld_id_encoder(pipe, clip, seed: int = 0) -> IDEncoder:
    """A storyworld ID encoder initialised from storyworld's CLIP: its vision tower and visual projection copied, the
    second projection and the FuseModule new (seeded)."""
    vision = clip.config.vision_config.to_dict()
    width = pipe.text_encoder.config.hidden_size  # each of storyworld's two text encoders (the same tower)
    config = IDEncoderConfig.storyworld(vision, width)
    encoder = seeded(seed, lambda: IDEncoder(config))
    encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    if tuple(clip.visual_projection.weight.shape) == tuple(encoder.visual_projection.weight.shape):
        encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    return encoder


def load_initial_weights(model: IDTraining, folder: str | Path) -> None:
    """Start from a trained ID encoder folder (`save_id_encoder`'s: encoder weights and its UNet LoRA), e.g. to
    fine-tune the shipped one with another recipe (`--init`). The tower's label heads start new."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    from ..id_encoder import load_id_encoder

    trained = load_id_encoder(folder)
    if trained.config != model.encoder.config:
        raise ValueError(f"--init {folder}: its ID encoder has another shape than this run's; start from scratch")
    lora = {k.removeprefix("unet."): v for k, v in trained.lora_weights.items()}
    if not lora:
        raise ValueError(f"--init {folder} holds no UNet LoRA (lora.safetensors): train one from scratch instead")
    model.encoder.load_state_dict(trained.state_dict())
    result = set_peft_model_state_dict(model.unet, convert_unet_state_dict_to_peft(lora))
    if result.unexpected_keys:
        raise ValueError(f"--init {folder}: its LoRA does not fit this UNet (e.g. {result.unexpected_keys[0]})")


def _param_groups(model: IDTraining, cfg: IDTrainConfig) -> list[dict]:
    tower = list(model.encoder.vision_model.parameters())
    heads = list(model.heads.parameters())
    fuse = [p for n, p in model.encoder.named_parameters() if not n.startswith("vision_model.")]
    lora = [p for n, p in model.unet.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    return [{"params": tower, "name": "tower"}, {"params": heads, "name": "heads"},
            {"params": fuse, "name": "fuse"}, {"params": lora, "name": "lora"}]


def learning_rates(cfg: IDTrainConfig, step: int) -> dict[str, float]:
    """Each parameter group's rate at `step`: stage 1 trains tower and heads only, stage 2 everything."""
    if step < cfg.tower_steps:
        f = warmup_hold_cooldown(step, cfg.tower_steps, cfg.warmup, cfg.tower_steps // 4)
        return {"tower": cfg.tower_lr * f, "heads": cfg.tower_lr * f, "fuse": 0.0, "lora": 0.0}
    s = step - cfg.tower_steps
    f = warmup_hold_cooldown(s, cfg.steps, cfg.warmup, cfg.decay_steps)
    return {"tower": cfg.lr * cfg.tower_lr_scale * f, "heads": cfg.lr * f, "fuse": cfg.lr * f, "lora": cfg.lr * f}


def noise_weight(snr: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-image loss weight max(1, min(1/SNR, cap)): 1 at low noise, up to `cap` at the noisiest timesteps.

    Why: the colours of large regions (shirt, trousers) are decided in the first, noisiest steps, where the
    epsilon error is small whatever the model draws (the noisy latent is almost all noise). With the plain min-SNR
    epsilon loss the ID encoder learned hair and hat but ignored shirt and trousers (`docs/storyworld-recipe.md`);
    weighting those timesteps as an x0 loss would (1/SNR), capped, gives the colours their share."""
    return torch.clamp(1.0 / snr, min=1.0, max=cap)


def _stack_labels(items: list[dict], device) -> dict[str, torch.Tensor]:
    return {name: torch.tensor([it["labels"][name] for it in items], device=device) for name in ID_LABELS}


class IDBatches:
    """Step s's data, a pure function of (seed, s): tower renders (stage 1), ID pairs and plain renders (stage 2)."""

    def __init__(self, cfg: IDTrainConfig):
        self.cfg = cfg
        n = cfg.total_steps * max(cfg.batch_size, cfg.tower_batch_size)
        self.pairs = [IDPairDataset(n, num_references=k, seed=cfg.seed + 100 + k) for k in
                      range(1, cfg.max_references + 1)]
        self.plain = ImageDataset(n, seed=cfg.seed + 200, drop_prob=0.5)
        self.n_text = int(round(cfg.text_fraction * cfg.batch_size))

    def tower(self, step: int) -> list[dict]:
        """Single renders of training characters (a pair's first reference and its identity labels)."""
        ds, n = self.pairs[0], self.cfg.tower_batch_size
        refs = [ds.panels(step * n + j)[0][0] for j in range(n)]
        return [{"references": render(p)[None], "labels": labels(p)} for p in refs]

    def fuse(self, step: int) -> tuple[list[dict], list[dict], int]:
        k = 1 + step % self.cfg.max_references
        ds = self.pairs[k - 1]
        n_id = self.cfg.batch_size - self.n_text
        pairs = [ds[step * n_id + j] for j in range(n_id)]
        plain = []
        for j in range(self.n_text):
            panel = self.plain.panel(step * self.n_text + j)[0]
            plain.append(self.plain[step * self.n_text + j] | {"mask": character_mask(panel),
                                                              "hair_mask": character_mask(panel, attributes=("hair",))})
        return pairs, plain, k


def _tower_step(model: IDTraining, data: IDBatches, step: int, device) -> dict:
    items = data.tower(step)
    pix = model.encoder.pixel_values([it["references"][0] for it in items], device)  # (n, 3, S, S)
    pooled = model.encoder.vision_model(pixel_values=pix).pooler_output  # (n, hidden)
    loss, acc = model.label_loss(pooled, _stack_labels(items, device))
    return {"loss": loss, "label_acc": acc}


def _fuse_step(model: IDTraining, data: IDBatches, trainer: UnetTrainer, tokenizers, step: int, gen, device) -> dict:
    cfg = data.cfg
    pairs, plain, k = data.fuse(step)
    enc = model.encoder
    # ID pairs: references -> ID embeddings fused into the ID prompts' class tokens
    refs = [im for it in pairs for im in it["references"]]  # n_id * k renders
    pix = enc.pixel_values(refs, device).unflatten(0, (len(pairs), k))  # (n_id, k, 3, S, S)
    pooled_img = enc.vision_model(pixel_values=pix.flatten(0, 1)).pooler_output  # (n_id * k, hidden)
    labels = {n: t.repeat_interleave(k) for n, t in _stack_labels(pairs, device).items()}
    label_loss, label_acc = model.label_loss(pooled_img, labels)
    id_embeds = enc.project(pooled_img).unflatten(0, (len(pairs), k))  # (n_id, k, D)
    with torch.no_grad():
        text, pooled, mask = encode_id_prompts(trainer.te1, trainer.te2, tokenizers, [it["caption"] for it in pairs],
                                               k, device)  # (n_id, L, D), (n_id, P), (n_id, L)
    text = fuse_id_embeddings(text, id_embeds, mask, enc.fuse_module)
    pixels = torch.stack([it["pixel_values"] for it in pairs])
    masks = [it["mask"] for it in pairs]
    hair = [it["hair_mask"] for it in pairs]
    if plain:  # ordinary captions, no ID: the text path stays as it was
        with torch.no_grad():
            t2, p2 = encode_text(trainer.te1, trainer.te2, trainer.tok1, trainer.tok2, [it["caption"] for it in plain])
        text, pooled = torch.cat([text, t2]), torch.cat([pooled, p2])
        pixels = torch.cat([pixels, torch.stack([it["pixel_values"] for it in plain])])
        masks += [it["mask"] for it in plain]
        hair += [it["hair_mask"] for it in plain]
    keep = (torch.rand(len(masks), generator=gen) >= cfg.caption_dropout).float().to(device)
    text, pooled = text * keep[:, None, None], pooled * keep[:, None]  # force_zeros_for_empty_prompt
    with torch.no_grad():
        latents = trainer.vae.encode(pixels.to(device)).latent_dist.mean * trainer.vae.config.scaling_factor
    h, w = pixels.shape[-2:]
    time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=text.dtype, device=device).repeat(len(masks), 1)
    timesteps = torch.randint(0, len(trainer.alphas_cumprod), (len(masks),), generator=gen)
    weight = noise_weight(compute_snr(trainer.scheduler, timesteps), cfg.high_noise_weight)
    cells = cfg.hair_weight * torch.stack(hair) if cfg.hair_weight else None  # (n, 16, 16)
    diffusion = trainer.loss(model.unet, latents, text, pooled, time_ids, torch.stack(masks), gen, timesteps=timesteps,
                             sample_weight=weight, cell_weight=cells)
    return {"loss": diffusion + cfg.label_weight * label_loss, "diffusion": diffusion, "label_acc": label_acc,
            "references": k}


def train_id_encoder(out: str | Path, cfg: IDTrainConfig, export: str | Path | None = None, resume: bool = False,
                     force: bool = False, max_minutes: float | None = None, progress: bool = True,
                     command: str = "", storyworld: str | Path | None = None,
                     init: str | Path | None = None) -> IDEncoder:
    """Train (or resume) a storyworld ID encoder in the run folder `out`; export it (an ID encoder folder with its
    LoRA and training.json) to `export` when the run is complete. Returns the encoder (with `lora_weights`).
    `init`: start from a trained ID encoder folder instead of storyworld's CLIP (`load_initial_weights`)."""
    from ..pipeline import load_pipeline
    from ..storyworld.models import load_storyworld_clip

    out = Path(out)
    if export is not None and Path(export).exists() and not force:
        raise FileExistsError(f"{export} exists: pass --force to replace it, or choose another --export")
    device = torch.device("cpu")
    pipe = load_pipeline(storyworld or "storyworld")
    clip, _ = load_storyworld_clip(folder=storyworld)
    model = seeded(cfg.seed, lambda: IDTraining(storyworld_id_encoder(pipe, clip, cfg.seed), pipe.unet, cfg.lora_rank,
                                                cfg.lora_targets))
    if init is not None:
        load_initial_weights(model, init)
    groups = _param_groups(model, cfg)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.01)
    ckpt = start_run(out, resume, model, opt)
    unet_cfg = TrainConfig(steps=1, batch_size=1, lr=1.0, character_weight=cfg.character_weight,
                           min_snr_gamma=cfg.min_snr_gamma, caption_dropout=cfg.caption_dropout)
    trainer = UnetTrainer(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2, unet_cfg,
                          device)
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False).eval()
    tokenizers = (pipe.tokenizer, pipe.tokenizer_2)  # storyworld's know the trigger word
    data = IDBatches(cfg)
    log = CsvLog(out / "log.csv", ["step", "stage", "loss", "diffusion", "label_acc", "references", "lr", "seconds"])
    seconds = float(ckpt.state.get("seconds", 0.0))
    start = time.time()
    bar = tqdm(range(ckpt.step, cfg.total_steps), initial=ckpt.step, total=cfg.total_steps, disable=not progress,
               desc="id-encoder")
    step = ckpt.step
    for step in bar:
        gen = step_generator(cfg.seed, step, 0)
        rates = learning_rates(cfg, step)
        for g in opt.param_groups:
            g["lr"] = rates[g["name"]]
        model.train()
        stage = "tower" if step < cfg.tower_steps else "fuse"
        out_step = (_tower_step(model, data, step, device) if stage == "tower" else
                    _fuse_step(model, data, trainer, tokenizers, step - cfg.tower_steps, gen, device))
        opt.zero_grad(set_to_none=True)
        out_step["loss"].backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        opt.step()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.total_steps:
            log.write({"step": done, "stage": stage, "lr": rates["fuse" if stage == "fuse" else "tower"],
                       "seconds": seconds + time.time() - start,
                       **{k: float(v.detach()) if torch.is_tensor(v) else v for k, v in out_step.items()}})
        over_time = max_minutes is not None and time.time() - start > 60 * max_minutes
        if done % cfg.ckpt_every == 0 or done == cfg.total_steps or over_time:
            save_checkpoint(out / "checkpoint", done, model, opt,
                            state={"seconds": seconds + time.time() - start, "config": dataclasses.asdict(cfg)})
        if over_time:
            break
    bar.close()
    model.eval()
    encoder = model.encoder
    encoder.lora_weights = model.lora_state_dict()
    finished = step + 1 >= cfg.total_steps  # False only when --max-minutes stopped the run early
    if export is not None and finished:
        save_id_encoder(encoder, export, force=force)
        total = seconds + time.time() - start
        record = {"command": command or RECIPE_COMMAND, "recipe": SHIPPED_RECIPE, "config": dataclasses.asdict(cfg),
                  "cpu_seconds": round(total, 1), "threads": torch.get_num_threads(),
                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "data": "sdlite.storyworld.datasets.IDPairDataset (training characters only: is_held_out False)",
                  "parameters": {"id_encoder": sum(p.numel() for p in encoder.parameters()),
                                 "lora": sum(v.numel() for v in encoder.lora_weights.values())}}
        if init is not None and (Path(init) / "training.json").is_file():  # the chain of commands that made it
            record["init"] = {"folder": str(init), "training": json.loads((Path(init) / "training.json").read_text())}
        (Path(export) / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        shutil.copyfile(out / "log.csv", Path(export) / "log.csv")  # the loss curves ship with the weights
    return encoder


# ----------------------------------------------------------------------------------------------------------
# The telling sign: is the loss lower with the character's own references than with another's?
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_loss_gap(pipe, encoder, n: int = 16, seed: int = 0, character_weight: float = 4.0) -> dict[str, float]:
    """The ID encoder's training loss on `n` held-out pairs at fixed timesteps and noise, with each target's own
    references and with the references of the next pair (another character). An encoder that carries identity
    denoises its own character better: `own` < `other`. `pipe.unet` should hold the encoder's LoRA
    (`fuse_photomaker_lora`), as at generation."""
    items = [IDPairDataset(n, num_references=1, seed=seed, held_out=True)[i] for i in range(n)]
    pix = encoder.pixel_values([it["references"][0] for it in items])[:, None]  # (n, 1, 3, S, S)
    text, pooled, mask = encode_id_prompts(pipe.text_encoder, pipe.text_encoder_2, (pipe.tokenizer, pipe.tokenizer_2),
                                           [it["caption"] for it in items], 1)
    trainer = UnetTrainer(pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.tokenizer, pipe.tokenizer_2,
                          TrainConfig(steps=1, batch_size=1, lr=1.0, character_weight=character_weight), "cpu")
    pixels = torch.stack([it["pixel_values"] for it in items])
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    gen = torch.Generator().manual_seed(seed)
    timesteps = torch.randint(100, 900, (n,), generator=gen)
    noise = torch.randn(latents.shape, generator=gen)
    time_ids = torch.tensor([64, 64, 0, 0, 64, 64], dtype=text.dtype).repeat(n, 1)
    masks = torch.stack([it["mask"] for it in items])
    ids = encoder.id_embeddings(pix)  # (n, 1, D)
    out = {}
    for name, order in (("own", torch.arange(n)), ("other", torch.arange(n).roll(1))):
        fused = fuse_id_embeddings(text, ids[order], mask, encoder.fuse_module)
        out[name] = float(trainer.loss(pipe.unet, latents, fused, pooled, time_ids, masks, gen, timesteps, noise))
    return out
