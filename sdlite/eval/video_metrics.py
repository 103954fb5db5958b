"""Measures of transition videos (the paper's Table 2), each per clip.

- `psnr`, `ssim`: the generated in-between frames against the true ones;
- `clip_similarities`: the paper's CLIPSIM-first (frame 1 vs every frame) and CLIPSIM-frames (consecutive frames);
- `motion_amount`: how much a clip moves at all (a static clip scores well on CLIPSIM and poorly here);
- `frame_identity_agreement`: the share of a clip's frames whose recognised identity (class word, hair, shirt,
  trousers, hat) is the clip's majority identity. It is not the identity agreement of a story
  (`sdlite.eval.metrics.identity_agreement`, agreement between pairs of panels): the two read different things;
- `paired_difference_ci`: a method's per-clip lead over another, with a bootstrap interval.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..motion import ImageEmbedder

IDENTITY_LABELS = ("class_word", "hair", "shirt", "trousers", "hat")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of images in [-1, 1] over their last 3 dims: (..., 3, H, W) x2 -> (...)."""
    mse = ((x.float() - y.float()) / 2).pow(2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, size: int = 11) -> torch.Tensor:
    """SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, per channel, mean) of images in [-1, 1]:
    (..., 3, H, W) x2 -> (...)."""
    lead = x.shape[:-3]
    a = ((x.float() + 1) / 2).reshape(-1, *x.shape[-3:])
    b = ((y.float() + 1) / 2).reshape(-1, *y.shape[-3:])
    c = a.shape[1]
    r = torch.arange(size, dtype=torch.float32) - size // 2
    g1 = torch.exp(-r**2 / (2 * sigma**2))
    g1 = g1 / g1.sum()
    win = (g1[:, None] * g1[None]).expand(c, 1, size, size).to(a.device)

    def blur(t):
        return F.conv2d(t, win, groups=c)  # valid convolution

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)


def paired_difference_ci(a: torch.Tensor, b: torch.Tensor, resamples: int = 2000, seed: int = 0,
                         level: float = 0.95) -> dict[str, float]:
    """Mean of the per-clip differences a - b (N,) and its bootstrap confidence interval (clips resampled with
    replacement, seeded): is a method's lead over another bigger than the luck of which clips were drawn?"""
    d = (a.double() - b.double()).cpu().numpy()
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"need per-clip values of two methods on the same >= 2 clips, got shape {d.shape}")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(d.mean()), "ci_low": float(lo), "ci_high": float(hi), "level": level, "n": len(d)}


def frame_label_agreement(labels: torch.Tensor) -> torch.Tensor:
    """One attribute: per clip, the fraction of frames whose label equals the clip's majority label.
    (B, L) -> (B,)."""
    return (labels == torch.mode(labels, dim=1).values[:, None]).float().mean(dim=1)


def frame_identity_agreement(labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Frame identity agreement: per clip, the fraction of frames whose recognised identity (all of class word, hair, shirt, trousers, hat)
    equals the clip's majority identity. labels: {name: (B, L)} -> (B,)."""
    agree = None
    for name in IDENTITY_LABELS:
        lab = labels[name]  # (B, L)
        mode = torch.mode(lab, dim=1).values  # (B,)
        same = lab == mode[:, None]
        agree = same if agree is None else agree & same
    return agree.float().mean(dim=1)


def clip_similarities(embeds: torch.Tensor) -> dict[str, torch.Tensor]:
    """The paper's CLIPSIM-first (frame 1 vs every frame) and CLIPSIM-frames (consecutive frames), from frame
    embeddings (B, L, E) -> {"first": (B,), "frames": (B,)} (cosine similarities)."""
    e = F.normalize(embeds.float(), dim=-1)
    first = (e[:, :1] * e).sum(-1)[:, 1:].mean(1)
    frames = (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)
    return {"first": first, "frames": frames}


def motion_amount(video: torch.Tensor) -> torch.Tensor:
    """Mean absolute change between consecutive frames (pixel values in [0, 1]): (B, L, 3, H, W) -> (B,)."""
    return ((video[:, 1:].float() - video[:, :-1].float()).abs() / 2).mean(dim=(1, 2, 3, 4))


@torch.no_grad()
def video_metrics(video: torch.Tensor, truth: torch.Tensor, embedder: ImageEmbedder, true_embeds: torch.Tensor,
                  recognizer=None) -> dict[str, torch.Tensor]:
    """Every Table-2 metric of generated clips (B, L, 3, H, W) against the true clips, per clip (B,).
    PSNR/SSIM/embedding distance over the in-between frames; fidelity = PSNR of the first/last frame to the
    keyframes."""
    b, frames = video.shape[:2]
    e = embedder.pooled(embedder(video.reshape(-1, *video.shape[2:]))).reshape(b, frames, -1)  # (B, L, D)
    true_embeds = embedder.pooled(true_embeds)  # CLIP-I and the embedding errors read the pooled embedding
    sims = clip_similarities(e)
    out = {
        "psnr": psnr(video[:, 1:-1], truth[:, 1:-1]).mean(1),
        "ssim": ssim(video[:, 1:-1], truth[:, 1:-1]).mean(1),
        "embed_mse": (e - true_embeds)[:, 1:-1].pow(2).mean(dim=(1, 2)),
        "embed_cos": F.cosine_similarity(e[:, 1:-1], true_embeds[:, 1:-1], dim=-1).mean(1),
        "first_fidelity_psnr": psnr(video[:, 0], truth[:, 0]),
        "last_fidelity_psnr": psnr(video[:, -1], truth[:, -1]),
        "motion": motion_amount(video),
        "clipsim_first": sims["first"],
        "clipsim_frames": sims["frames"],
    }
    if recognizer is not None:
        pred = recognizer.predict(video.reshape(-1, *video.shape[2:]))
        labels = {k: pred[k].view(b, frames) for k in IDENTITY_LABELS}
        out["identity_agreement"] = frame_identity_agreement(labels)
        out.update({f"identity_{k}": frame_label_agreement(labels[k]) for k in IDENTITY_LABELS})
    return out
