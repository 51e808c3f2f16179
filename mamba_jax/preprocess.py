"""The official evaluation transform, in NHWC float32.

resize (shorter side -> 224, PIL bilinear; the longer side becomes int(224 * long / short))
-> center crop 224 x 224 with top-left (round((h - 224) / 2), round((w - 224) / 2))
-> scale to [0, 1] -> normalize with the ImageNet mean and std.
A config with another ``img_size`` uses that size in place of 224.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from mamba_jax.config import VimConfig

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def to_pil(image) -> Image.Image:
    """A path, PIL image or HWC array (uint8, or float in [0, 1]) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image not found: {image}")
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, ValueError) as err:
            raise OSError(f"cannot read image {image}: {err}") from err
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"an image array must be [H, W], [H, W, 3] or [H, W, 4] (HWC), got {arr.shape}")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if arr.size == 0:
        raise ValueError(f"an image array must not be empty, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"an image array must be uint8 (0..255) or float in [0, 1], got {arr.dtype}"
                             + (": scale 16-bit pixels with (arr / 65535)" if arr.dtype == np.uint16 else ""))
        if not np.isfinite(arr).all():
            raise ValueError("a float image array must be finite: it holds NaN or inf values")
        if arr.min() < 0 or arr.max() > 1:
            raise ValueError("a float image array must hold values in [0, 1] (or pass uint8 in [0, 255])")
        arr = np.round(arr * 255).astype(np.uint8)
    return Image.fromarray(arr[..., :3])


def resized_size(width: int, height: int, size: int = 224) -> tuple[int, int]:
    """(new_width, new_height): shorter side ``size``, longer ``int(size * long / short)`` (truncated)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(height: int, width: int, size: int = 224) -> tuple[int, int]:
    """Top-left (top, left) of the centre crop, rounded with Python's ``round``."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_center_crop(image, size: int = 224) -> Image.Image:
    """Shorter side to ``size`` (PIL bilinear), then the centered ``size`` x ``size`` crop."""
    im = to_pil(image)
    new_w, new_h = resized_size(*im.size, size)
    if (new_w, new_h) != im.size:
        im = im.resize((new_w, new_h), Image.BILINEAR)
    top, left = center_crop_box(new_h, new_w, size)
    return im.crop((left, top, left + size, top + size))


def to_unit(image, size: int = 224) -> np.ndarray:
    """The transform up to [0, 1]: float32 [size, size, 3] (what perturbation tests edit)."""
    return np.asarray(resize_center_crop(image, size), np.float32) / 255.0


def normalize(images01, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[0, 1] pixels -> the model's input, (x - mean) / std over the channel axis, any leading
    dims, NHWC. NumPy in, NumPy out; a JAX array (also a traced one) in, a JAX array out.
    Integer (0..255) or bool pixels are refused: divide by 255 first."""
    dtype = getattr(images01, "dtype", None)
    if dtype is not None and (np.issubdtype(dtype, np.bool_) or np.issubdtype(dtype, np.integer)):
        raise ValueError(f"normalize takes float pixels in [0, 1], got {dtype}: divide 0..255 pixels by 255 first "
                         "(or use mamba_jax.preprocess)")
    return (images01 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def denormalize(images):
    return images * IMAGENET_STD + IMAGENET_MEAN


def preprocess(image, config: VimConfig | None = None) -> np.ndarray:
    """A path, PIL image or HWC array -> the model input, float32 [H, W, 3] (NHWC without B)."""
    size = config.img_size if config is not None else 224
    if config is not None and config.channels != 3:
        raise ValueError(f"preprocess makes RGB images; the config wants {config.channels} channels")
    return normalize(to_unit(image, size)).astype(np.float32)


def pad_batch(x, size: int):
    """Pad axis 0 to ``size`` by repeating the last row (NumPy or JAX arrays alike), so that every
    batch has one shape and compiles once; callers drop the padded rows from their results."""
    n = x.shape[0]
    if n == size:
        return x
    return x[np.concatenate([np.arange(n), np.full(size - n, n - 1)])]
