"""mamba-jax: Vision Mamba in JAX/Flax, with the hidden attention made explicit."""

from mamba_jax.config import OFFICIAL_NAMES, VimConfig, official, vim_base, vim_small, vim_tiny
from mamba_jax.preprocess import normalize, preprocess, to_unit
from mamba_jax.vim import VisionMamba, init_params, vim_apply

__all__ = [
    "OFFICIAL_NAMES", "VimConfig", "VisionMamba", "init_params", "normalize", "official", "preprocess",
    "to_unit", "vim_apply",
    "vim_base", "vim_small", "vim_tiny",
]
