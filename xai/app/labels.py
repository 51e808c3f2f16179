"""Class names for a model's outputs."""

from __future__ import annotations

import functools
import json
from importlib import resources

from mamba_jax.config import VimConfig


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in index order (0 = 'tench, Tinca tinca')."""
    text = resources.files("xai").joinpath("assets/imagenet_class_names.json").read_text()
    return tuple(json.loads(text))


def class_names(config: VimConfig) -> tuple[str, ...]:
    """Names for the model's classes: the shapes of the demo model, ImageNet for 1000 classes,
    otherwise 'class i'."""
    from xai.eval.shapes import SHAPE_CLASSES

    if config.name == "demo":
        return tuple(SHAPE_CLASSES)
    if config.num_classes == 1000:
        return imagenet_class_names()
    return tuple(f"class {i}" for i in range(config.num_classes))
