"""Image formats, converted in one place.

sdlite meets pictures in four forms: uint8 arrays (H, W, 3) as renderers and PIL give them, float tensors
(3, H, W) in [-1, 1] as VAEs and UNets take them, PIL images and files on disk. Every conversion between them
lives here, so that each module states which form it wants and none re-implements the scaling.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def unit_to_uint8(images: np.ndarray) -> np.ndarray:
    """float numpy in [0, 1] (a pipeline's `output_type="np"`) -> uint8, rounded, clipped."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def as_batch(images, size: int = 64) -> torch.Tensor:
    """uint8 numpy (H, W, 3) / (B, H, W, 3), or float tensor (3, H, W) / (B, 3, H, W) in [-1, 1] ->
    float32 (B, 3, size, size) in [-1, 1] (larger images are area-averaged down, smaller ones resized bilinearly)."""
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
    if x.shape[-2:] != (size, size):
        if x.shape[-1] > size:
            x = F.adaptive_avg_pool2d(x, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x


def as_image_tensor(image, what: str = "keyframe") -> torch.Tensor:
    """One picture as float (3, H, W) in [-1, 1]: from a tensor, a uint8 (H, W, 3) array, a PIL image or a path.
    `what` names the picture in error messages."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        if not Path(image).is_file():
            raise FileNotFoundError(f"{what} {image} does not exist: pass the path of a PNG/JPEG picture")
        image = Image.open(image)
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a {what} array must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        return to_tensor(image.copy())
    if torch.is_tensor(image):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"a {what} tensor must be float (3, H, W) in [-1, 1], got {tuple(image.shape)}")
        return image.float()
    raise TypeError(f"a {what} must be a path, PIL image, uint8 array or tensor, got {type(image).__name__}")


def fit_square(image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1] -> (3, size, size), bicubic (a no-op when it already has that size)."""
    if image.shape[-1] == size and image.shape[-2] == size:
        return image
    return F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


MAX_PICTURE_SIDE = 8192  # px: a keyframe or a reference image is scaled to the model's size anyway


def check_picture_file(path: str | os.PathLike, what: str = "picture") -> Path:
    """A picture file the user names (a keyframe, a reference image) must exist and be a whole, readable picture of
    a sane size: checked (the file read, not decoded) before any model loads. Errors name the file and what to do."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        state = "is a folder" if p.is_dir() else "does not exist"
        raise FileNotFoundError(f"{what} {p} {state}: pass the path of a PNG/JPEG picture")
    try:
        with Image.open(p) as im:
            size = im.size
            im.verify()  # reads the whole file: a truncated picture fails here
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"{what} {p} is not a readable picture ({err}): pass a PNG/JPEG file") from None
    except Image.DecompressionBombError:
        raise ValueError(f"{what} {p} is far too large to be a {what}: resize it (e.g. to 512 x 512)") from None
    if max(size) > MAX_PICTURE_SIDE:
        raise ValueError(f"{what} {p} is {size[0]} x {size[1]} px: resize it to at most {MAX_PICTURE_SIDE} px a side "
                         "(it is scaled to the model's size anyway)")
    return p


def read_picture(path: str | os.PathLike, what: str = "picture"):
    """A checked picture file as an RGB PIL image (loaded into memory; the file is closed)."""
    from PIL import Image

    with Image.open(check_picture_file(path, what)) as im:
        return im.convert("RGB")
