"""The official evaluation transform, in NHWC float32.

resize (shorter side -> 224, PIL bilinear; the longer side becomes int(224 * long / short))
-> center crop 224 x 224 with top-left (round((h - 224) / 2), round((w - 224) / 2))
-> scale to [0, 1] -> normalize with the ImageNet mean and std.
A config with another ``img_size`` uses that size in place of 224.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from mamba_jax.config import VimConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
        with Image.open(image) as im:
            return im.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4] (HWC), got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.dtype != np.uint8:
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1] (or pass uint8 in [0, 255])")
        arr = np.round(arr * 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def resize_center_crop(image, size: int = 224) -> Image.Image:
    """Shorter side to ``size`` (PIL bilinear), then the centered ``size`` x ``size`` crop."""
    im = _to_pil(image)
    w, h = im.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def to_unit(image, size: int = 224) -> np.ndarray:
    """The transform up to [0, 1]: float32 [size, size, 3] (what perturbation tests edit)."""
    return np.asarray(resize_center_crop(image, size), np.float32) / 255.0


def normalize(images01):
    """[0, 1] pixels -> the model's input (ImageNet mean/std), any leading dims, NHWC."""
    return (images01 - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images):
    return images * IMAGENET_STD + IMAGENET_MEAN


def preprocess(image, config: VimConfig | None = None) -> np.ndarray:
    """A path, PIL image or HWC array -> the model input, float32 [H, W, 3] (NHWC without B)."""
    size = config.img_size if config is not None else 224
    if config is not None and config.channels != 3:
        raise ValueError(f"preprocess makes RGB images; the config wants {config.channels} channels")
    return normalize(to_unit(image, size)).astype(np.float32)
