"""The attribute recognizer: a small CNN that reads every storyworld label off an image.

The renderer knows the truth of every picture it draws, so a classifier trained on renders can score
*generated* pictures: does the girl have the hair colour the prompt asked for, do the four panels of a
story show the same character? Generated pictures are blurrier and noisier than renders, so training
degrades the renders on the fly (`augment`: shifts, blur, VAE-like smoothing, colour/contrast jitter,
noise, blockiness).

Two independent scorers ship, so labels of generated images can be cross-checked:
- "a" (`data/recognizer.safetensors`): convolutions, then a flattened 4x4 map (it knows *where* things are);
- "b" (`data/recognizer_b.safetensors`): a *colour reader* (`ColourReader`): no convolutions, it counts
  palette colours in a 16x8 grid of image cells (where hair, shirt, trousers and hat sit) and reads the
  labels with linear heads fitted in closed form (ridge regression) on other renders (another seed).
  It is reliable for shirt, trousers and scene, weaker for the small or shape-defined labels (hair, hat,
  class word, action): see data/recognizer_b.json. Use it to cross-check shirt/trousers/scene labels.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from . import storyworld as sw
from .paths import check_writable, data_dir

ARCHS = ("a", "b")
DEFAULT_FILES = {"a": "recognizer.safetensors", "b": "recognizer_b.safetensors"}
# A third scorer: the CNN "a" trained from another seed on other renders (1000 steps), the independent
# cross-check for hair / hat / class word: load_recognizer(data_dir() / SEED1_FILE).
SEED1_FILE = "recognizer_a_seed1.safetensors"


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------
def _block(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# The large background colours of the storyworld scenes (sky, ground, landmarks), as `storyworld` draws them.
_SCENE_KEY_RGB = [(95, 170, 255), (70, 175, 60), (25, 110, 35), (120, 200, 255), (20, 110, 205),
                  (240, 212, 140), (205, 215, 230), (110, 110, 120), (75, 75, 80), (250, 225, 120),
                  (165, 180, 205), (250, 252, 255), (8, 12, 45), (25, 55, 40), (245, 245, 205),
                  (236, 206, 160), (150, 95, 50)]


def _palette() -> torch.Tensor:
    """Every colour a character is drawn with (identity colours, skin, shoes, hats) and the scenes' key
    colours, in [-1, 1]: (P, 3)."""
    rgb = []
    for table in (sw._HAIR_RGB, sw._SHIRT_RGB, sw._TROUSERS_RGB, sw._HAT_RGB):
        rgb.extend(table.values())
    rgb += [sw._SKIN, sw._SHOES]
    rgb += _SCENE_KEY_RGB
    unique = sorted(set(rgb))
    return torch.tensor(unique, dtype=torch.float32) / 127.5 - 1.0


class ColourReader(nn.Module):
    """The second scorer's eyes: no convolutions, only colour counting where the body parts are.

    Each pixel of a 32x32 (2x average-pooled) copy is softly assigned to the nearest palette colours (or to
    "none of them"); the assignments are averaged over a 16 (rows) x 8 (columns) grid of cells.
    (B, 3, 64, 64) -> (B, (P + 1) * 16 * 8). The heads on top are linear, fitted in closed form (ridge).
    """

    def __init__(self, bands: tuple[int, int] = (16, 8), temperature: float = 0.03):
        super().__init__()
        self.register_buffer("palette", _palette())                      # (P, 3)
        self.bands, self.temperature = bands, temperature
        self.out_features = (self.palette.shape[0] + 1) * bands[0] * bands[1]

    def histograms(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(x, 2)                                                      # (B, 3, 32, 32)
        d2 = ((x[:, None] - self.palette[None, :, :, None, None]) ** 2).sum(2)     # (B, P, 32, 32)
        none = torch.full_like(d2[:, :1], 0.06)                                    # "background" distance
        w = torch.softmax(-torch.cat([d2, none], 1) / self.temperature, dim=1)      # (B, P+1, 32, 32)
        return F.adaptive_avg_pool2d(w, self.bands)                                # (B, P+1, 16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.histograms(x).flatten(1)                                       # (B, out_features)


class Recognizer(nn.Module):
    """CNN with one linear head per entry of `storyworld.ATTRIBUTES`.

    forward: float (B, 3, H, W) in [-1, 1] (H = W = 64) -> {name: logits (B, len(ATTRIBUTES[name]))}.
    """

    def __init__(self, arch: str = "a", size: int = 64):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown recognizer arch {arch!r}: use one of {ARCHS}")
        if size != 64:
            raise ValueError(f"size={size}: the recognizer reads 64x64 images; resize them to 64 first")
        self.arch, self.size = arch, size
        if arch == "a":
            self.features = nn.Sequential(
                _block(3, 16, 4, 2),                     # (B, 16, 32, 32)
                _block(16, 32, 3, 2),                    # (B, 32, 16, 16)
                _block(32, 48), nn.MaxPool2d(2),         # (B, 48, 8, 8)
                _block(48, 64), nn.MaxPool2d(2),         # (B, 64, 4, 4)
            )
            feat = 64 * 4 * 4
        else:
            self.features = ColourReader()
            feat = self.features.out_features
        self.dropout = nn.Dropout(0.1)
        self.heads = nn.ModuleDict({name: nn.Linear(feat, len(vals)) for name, vals in sw.ATTRIBUTES.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(x)
        h = h.flatten(1)                                               # (B, feat)
        h = self.dropout(h)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> dict[str, torch.Tensor]:
        """Predicted label indices {name: LongTensor (B,)} for a float batch (B, 3, H, W) in [-1, 1] or
        uint8 numpy images (B, H, W, 3) / (H, W, 3)."""
        x = as_batch(images)
        was_training = self.training
        self.eval()
        out = {name: [] for name in sw.ATTRIBUTES}
        for i in range(0, x.shape[0], batch_size):
            logits = self(x[i:i + batch_size])
            for name in out:
                out[name].append(logits[name].argmax(1))
        self.train(was_training)
        return {name: torch.cat(v) if v else torch.zeros(0, dtype=torch.long) for name, v in out.items()}


def as_batch(images) -> torch.Tensor:
    """uint8 numpy (H, W, 3) / (B, H, W, 3), or float tensor (3, H, W) / (B, 3, H, W) in [-1, 1] ->
    float32 (B, 3, 64, 64) in [-1, 1] (other sizes are resized with area averaging / bilinear)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3), got {images.dtype}: "
                            "pass floats as a torch tensor in [-1, 1]")
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be (B, H, W, 3), got shape {images.shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    elif isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"tensor images must be (B, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    else:
        raise TypeError(f"images must be a uint8 numpy array or a float torch tensor, got {type(images).__name__}")
    if x.shape[-2:] != (64, 64):
        if x.shape[-1] > 64:
            x = F.adaptive_avg_pool2d(x, 64)
        else:
            x = F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    return x


# ----------------------------------------------------------------------------------------------------------
# Data and augmentation
# ----------------------------------------------------------------------------------------------------------
def render_set(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """n random panels rendered: uint8 (n, size, size, 3) and {name: LongTensor (n,)}."""
    rng = np.random.default_rng([int(seed), 7])
    panels = [sw.sample_panel(rng) for _ in range(n)]
    images = np.stack([sw.render(p, size) for p in panels]) if n else np.zeros((0, size, size, 3), np.uint8)
    labels = {name: torch.tensor([sw.labels(p)[name] for p in panels], dtype=torch.long)
              for name in sw.ATTRIBUTES}
    return images, labels


def _gauss_kernel(sigma: float) -> torch.Tensor:
    r = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return (k[:, None] * k[None, :]).expand(3, 1, 5, 5).contiguous()  # depthwise (3, 1, 5, 5)


def augment(x: torch.Tensor, generator: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Degrade a batch of renders (B, 3, H, W) in [-1, 1] the way generated images differ from them.

    Small shift/scale, blur of random strength, VAE-like smoothing (2x down / up), blockiness,
    brightness/contrast/saturation jitter and a small per-channel gain (identity colours stay apart), and
    gaussian noise. Every random draw comes from `generator`.
    """
    b = x.shape[0]

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(b, *shape, generator=generator)

    s = strength
    # shift (+-3 px) and scale (+-6%) with a border-replicating affine warp
    scale = 1 + u(-0.06, 0.06) * s
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = u(-3 / 32, 3 / 32, 2) * s
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    # blur: mix with a gaussian-blurred copy by a random amount
    blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), _gauss_kernel(1.0), groups=3)
    mix = (u(0, 1, 1, 1, 1) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.6)) * s
    x = x + mix * (blurred - x)
    # VAE-like smoothing: downsample 2x and back up (bilinear)
    smooth = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    pick = (torch.rand(b, 1, 1, 1, generator=generator) < 0.3 * s).float()
    x = x + pick * (smooth - x)
    # blockiness (JPEG-like): 4x4 block means mixed in a little
    blocks = F.interpolate(F.avg_pool2d(x, 4), scale_factor=4, mode="nearest")
    pick = (torch.rand(b, 1, 1, 1, generator=generator) < 0.15 * s).float() * u(0.1, 0.35, 1, 1, 1)
    x = x + pick * (blocks - x)
    # colour: saturation, contrast, brightness, per-channel gain
    grey = x.mean(1, keepdim=True)
    x = grey + (1 + u(-0.15, 0.15, 1, 1, 1) * s) * (x - grey)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (1 + u(-0.15, 0.15, 1, 1, 1) * s) * (x - mean)
    x = x + u(-0.08, 0.08, 1, 1, 1) * s
    x = (x + 1) * (1 + u(-0.04, 0.04, 3, 1, 1) * s) - 1
    # noise
    x = x + u(0, 0.1, 1, 1, 1) * s * torch.randn(x.shape, generator=generator)
    return x.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------------------
# Training, evaluation, files
# ----------------------------------------------------------------------------------------------------------
def accuracy(model: Recognizer, images, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction correct per label name."""
    pred = model.predict(images)
    return {name: float((pred[name] == labels[name]).float().mean()) for name in sw.ATTRIBUTES}


def train_recognizer(steps: int = 1500, seed: int = 0, arch: str = "a", batch_size: int = 48,
                     n_train: int = 12000, lr: float = 3e-3, threads: int | None = 2,
                     log: Callable[[str], None] | None = print, log_every: int = 100) -> tuple[Recognizer, dict]:
    """Train a recognizer on `n_train` renders (seed `seed`), augmented on the fly.

    Returns (model in eval mode, history {"step", "loss", "seconds"}). One-cycle learning rate, AdamW.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown recognizer arch {arch!r}: use one of {ARCHS}")
    if steps < 1 or batch_size < 1 or n_train < batch_size:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, n_train={n_train}: need steps >= 1 and "
                         "n_train >= batch_size >= 1")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    images, labels = render_set(n_train, seed=1000 + seed)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, 3, 64, 64)
    if log:
        log(f"rendered {n_train} training images in {time.perf_counter() - t0:.1f}s")
    # a small held-out set (another seed) to watch the accuracy while training
    monitor = render_set(300, seed=500_000 + seed) if log else None
    model = Recognizer(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    history = {"step": [], "loss": [], "seconds": []}
    model.train()
    running = 0.0
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        x = augment(data[idx].float().div(127.5).sub(1.0), gen)
        logits = model(x)
        loss = sum(F.cross_entropy(logits[name], labels[name][idx]) for name in sw.ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += float(loss.detach())
        if step % log_every == 0 or step == steps:
            n = log_every if step % log_every == 0 else step % log_every
            history["step"].append(step)
            history["loss"].append(running / n)
            history["seconds"].append(time.perf_counter() - t0)
            if log:
                msg = f"step {step}/{steps}  loss {running / n:.4f}  {time.perf_counter() - t0:.0f}s"
                if monitor is not None and (step % (log_every * 5) == 0 or step == steps):
                    acc = accuracy(model, *monitor)
                    model.train()
                    msg += "  held-out min acc %.3f (%s)" % (min(acc.values()), min(acc, key=acc.get))
                log(msg)
            running = 0.0
    model.eval()
    return model, history


@torch.no_grad()
def fit_colour_reader(seed: int = 1, n_train: int = 12000, ridge: float = 1.0, threads: int | None = 2,
                      log: Callable[[str], None] | None = print) -> tuple[Recognizer, dict]:
    """The second scorer (arch "b"): colour histograms + linear heads fitted in closed form.

    Features of `n_train` augmented renders (seed 1000 + `seed`); one-hot targets of every label;
    W = (X^T X + ridge I)^-1 X^T Y. Returns (model in eval mode, {"seconds": [...]}).
    """
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = Recognizer("b").eval()
    gen = torch.Generator().manual_seed(seed)
    images, labels = render_set(n_train, seed=1000 + seed)
    feats = []
    for i in range(0, n_train, 500):
        feats.append(model.features(augment(as_batch(images[i:i + 500]), gen)))
    x = torch.cat(feats)                                                # (N, F)
    x = torch.cat([x, torch.ones(len(x), 1)], 1)                        # (N, F + 1): bias column
    y = torch.cat([F.one_hot(labels[n], len(v)).float() for n, v in sw.ATTRIBUTES.items()], 1)  # (N, 34)
    if x.shape[0] >= x.shape[1]:  # primal: (X^T X + ridge I) W = X^T Y
        gram = x.T @ x                                                  # (F + 1, F + 1)
        w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), x.T @ y)  # (F + 1, 34)
    else:  # dual (fewer samples than features), the same W: X^T (X X^T + ridge I)^-1 Y
        gram = x @ x.T                                                  # (N, N)
        w = x.T @ torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0]), y)
    j = 0
    for name, values in sw.ATTRIBUTES.items():
        head = model.heads[name]
        head.weight.copy_(w[:-1, j:j + len(values)].T)
        head.bias.copy_(w[-1, j:j + len(values)])
        j += len(values)
    seconds = time.perf_counter() - t0
    if log:
        log(f"fitted the colour reader on {n_train} augmented renders in {seconds:.0f}s")
    return model, {"step": [], "loss": [], "seconds": [seconds]}


def save_recognizer(model: Recognizer, path, metadata: dict | None = None, force: bool = False) -> Path:
    """Write the weights (float16: half the size, same predictions) and the architecture to safetensors."""
    path = check_writable(path, force)
    meta = {"arch": model.arch, "size": str(model.size)}
    meta.update({k: json.dumps(v) if not isinstance(v, str) else v for k, v in (metadata or {}).items()})
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_recognizer(path=None, arch: str = "a") -> Recognizer:
    """Load a shipped recognizer (`arch` "a": data/recognizer.safetensors, "b": data/recognizer_b.safetensors)
    or the file at `path`. Returns the model in eval mode (float32)."""
    if path is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown recognizer arch {arch!r}: use one of {ARCHS}")
        path = data_dir() / DEFAULT_FILES[arch]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recognizer at {path}: train one with `python -m sdlite.recognizer "
                                f"--arch {arch}` (writes data/{DEFAULT_FILES.get(arch, 'recognizer.safetensors')})")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = Recognizer(meta.get("arch", arch), int(meta.get("size", 64)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    model.load_state_dict(state)
    return model.eval()


def predict(images, recognizer: Recognizer | None = None) -> dict[str, torch.Tensor]:
    """Predicted label indices {name: LongTensor (B,)} (loads the shipped recognizer "a" when None)."""
    if recognizer is None:
        recognizer = load_recognizer()
    return recognizer.predict(images)


def main(argv=None) -> None:
    import argparse
    import datetime

    ap = argparse.ArgumentParser(description="Train the storyworld attribute recognizer")
    ap.add_argument("--arch", default="a", choices=ARCHS)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=12000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--out", default=None, help="default: data/recognizer.safetensors (b: recognizer_b...)")
    ap.add_argument("--force", action="store_true", help="overwrite --out")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else data_dir() / DEFAULT_FILES[args.arch]
    check_writable(out, args.force)
    if args.arch == "b":
        model, history = fit_colour_reader(args.seed, n_train=args.n_train)
    else:
        model, history = train_recognizer(args.steps, args.seed, args.arch, n_train=args.n_train)
    test_images, test_labels = render_set(args.n_test, seed=999_000 + args.seed)
    clean = accuracy(model, test_images, test_labels)
    gen = torch.Generator().manual_seed(12345)
    degraded = accuracy(model, augment(as_batch(test_images), gen), test_labels)
    info = {
        "command": "python -m sdlite.recognizer " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "arch": args.arch, "seed": args.seed, "n_train": args.n_train,
        "training": (f"{args.steps} AdamW steps, batch 48, augmented" if args.arch == "a"
                     else "closed-form ridge (lambda 1.0) on colour histograms of augmented renders"),
        "train_data": f"storyworld.render_set({args.n_train}, seed={1000 + args.seed})",
        "test_data": f"storyworld.render_set({args.n_test}, seed={999_000 + args.seed}) (held out)",
        "heldout_accuracy": clean, "heldout_accuracy_min": min(clean.values()),
        "heldout_augmented_accuracy": degraded,
        "train_seconds": round(history["seconds"][-1], 1), "torch_threads": torch.get_num_threads(),
        "loss_history": {"step": history["step"], "loss": [round(v, 5) for v in history["loss"]]},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    save_recognizer(model, out, {"heldout_accuracy_min": info["heldout_accuracy_min"], "seed": args.seed},
                    force=True)
    out.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("heldout_accuracy", "heldout_augmented_accuracy", "train_seconds")},
                     indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
