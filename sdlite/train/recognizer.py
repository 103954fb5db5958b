"""Training storyworld's attribute recognizers (`sdlite.storyworld.recognizer`): the CNN "a" by gradient descent on
augmented renders, the colour reader "b" in closed form; and the augmentation that makes renders look generated.

    python -m sdlite.train recognizer --arch a --steps 1500 --force
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from ..images import as_batch
from ..paths import check_writable
from ..storyworld import world as sw
from ..storyworld.recognizer import ARCHS, Recognizer, accuracy, render_set


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


def train_recognizer(steps: int = 1500, seed: int = 0, arch: str = "a", batch_size: int = 48,
                     n_train: int = 12000, lr: float = 3e-3,
                     log: Callable[[str], None] | None = print, log_every: int = 100) -> tuple[Recognizer, dict]:
    """Train a recognizer on `n_train` renders (seed `seed`), augmented on the fly.

    Returns (model in eval mode, history {"step", "loss", "seconds"}). One-cycle learning rate, AdamW.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown recognizer arch {arch!r}: use one of {ARCHS}")
    if steps < 1 or batch_size < 1 or n_train < batch_size:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, n_train={n_train}: need steps >= 1 and "
                         "n_train >= batch_size >= 1")
    with torch.random.fork_rng(devices=[]):  # the weights' initialisation is seeded without touching global state
        torch.manual_seed(seed)
        return _train_recognizer(steps, seed, arch, batch_size, n_train, lr, log, log_every)


def _train_recognizer(steps, seed, arch, batch_size, n_train, lr, log, log_every) -> tuple[Recognizer, dict]:
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
def fit_colour_reader(seed: int = 1, n_train: int = 12000, ridge: float = 1.0,
                      log: Callable[[str], None] | None = print) -> tuple[Recognizer, dict]:
    """The second scorer (arch "b"): colour histograms + linear heads fitted in closed form.

    Features of `n_train` augmented renders (seed 1000 + `seed`); one-hot targets of every label;
    W = (X^T X + ridge I)^-1 X^T Y. Returns (model in eval mode, {"seconds": [...]}).
    """
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


def train_or_fit(arch: str, steps: int, seed: int, n_train: int) -> tuple[Recognizer, dict]:
    """Recognizer "a" trained by gradient descent, "b" (the colour reader) fitted in closed form."""
    if arch == "b":
        return fit_colour_reader(seed, n_train=n_train)
    return train_recognizer(steps, seed, arch, n_train=n_train)


def recognizer_record(model: Recognizer, history: dict, arch: str, seed: int, steps: int, n_train: int,
                      n_test: int, command: str) -> dict:
    """What is written next to a recognizer (`<file>.json`): how it was made and its held-out accuracy, on clean
    renders and on augmented ones."""
    import datetime

    test_images, test_labels = render_set(n_test, seed=999_000 + seed)
    clean = accuracy(model, test_images, test_labels)
    degraded = accuracy(model, augment(as_batch(test_images), torch.Generator().manual_seed(12345)), test_labels)
    return {
        "command": command, "arch": arch, "seed": seed, "n_train": n_train,
        "training": (f"{steps} AdamW steps, batch 48, augmented" if arch == "a"
                     else "closed-form ridge (lambda 1.0) on colour histograms of augmented renders"),
        "train_data": f"storyworld.render_set({n_train}, seed={1000 + seed})",
        "test_data": f"storyworld.render_set({n_test}, seed={999_000 + seed}) (held out)",
        "heldout_accuracy": clean, "heldout_accuracy_min": min(clean.values()),
        "heldout_augmented_accuracy": degraded,
        "train_seconds": round(history["seconds"][-1], 1), "torch_threads": torch.get_num_threads(),
        "loss_history": {"step": history["step"], "loss": [round(v, 5) for v in history["loss"]]},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
