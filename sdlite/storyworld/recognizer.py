"""The attribute recognizer: a small CNN that reads every storyworld label off an image.

The renderer knows the truth of every picture it draws, so a classifier trained on renders can score
*generated* pictures: does the girl have the hair colour the prompt asked for, do the four panels of a
story show the same character? Generated pictures are blurrier and noisier than renders, so training
degrades the renders on the fly (`sdlite.train.recognizer.augment`: shifts, blur, VAE-like smoothing, colour/contrast jitter,
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

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..images import as_batch
from ..paths import data_dir
from . import world as sw

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




def _palette() -> torch.Tensor:
    """Every colour a character is drawn with (identity colours, skin, shoes, hats) and the scenes' key
    colours, in [-1, 1]: (P, 3)."""
    rgb = []
    for table in (sw.HAIR_RGB, sw.SHIRT_RGB, sw.TROUSERS_RGB, sw.HAT_RGB):
        rgb.extend(table.values())
    rgb += [sw.SKIN_RGB, sw.SHOES_RGB]
    rgb += [colour for scene in sw.SCENE_KEY_RGB.values() for colour in scene.values()]
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


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def render_set(n: int, seed: int, size: int = 64) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """n random panels rendered: uint8 (n, size, size, 3) and {name: LongTensor (n,)}."""
    rng = np.random.default_rng([int(seed), 7])
    panels = [sw.sample_panel(rng) for _ in range(n)]
    images = np.stack([sw.render(p, size) for p in panels]) if n else np.zeros((0, size, size, 3), np.uint8)
    labels = {name: torch.tensor([sw.labels(p)[name] for p in panels], dtype=torch.long)
              for name in sw.ATTRIBUTES}
    return images, labels


# ----------------------------------------------------------------------------------------------------------
# Scoring and loading
# ----------------------------------------------------------------------------------------------------------
def accuracy(model: Recognizer, images, labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Fraction correct per label name."""
    pred = model.predict(images)
    return {name: float((pred[name] == labels[name]).float().mean()) for name in sw.ATTRIBUTES}


def load_recognizer(path=None, arch: str = "a") -> Recognizer:
    """Load a shipped recognizer (`arch` "a": data/recognizer.safetensors, "b": data/recognizer_b.safetensors)
    or the file at `path`. Returns the model in eval mode (float32)."""
    if path is None:
        if arch not in ARCHS:
            raise ValueError(f"unknown recognizer arch {arch!r}: use one of {ARCHS}")
        path = data_dir() / DEFAULT_FILES[arch]
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no recognizer at {path}: train one with `python -m sdlite.train recognizer "
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
