"""mamba-jax: Vision Mamba and the Mamba language model in JAX/Flax, with the hidden attention made explicit."""

from mamba_jax.config import (
    MAMBA_LM_NAMES,
    OFFICIAL_NAMES,
    MambaLMConfig,
    VimConfig,
    mamba_lm,
    official,
    vim_base,
    vim_small,
    vim_tiny,
)
from mamba_jax.lm import MambaLM, init_lm_params, lm_apply
from mamba_jax.preprocess import normalize, preprocess, to_unit
from mamba_jax.vim import VisionMamba, init_params, vim_apply

__all__ = [
    "MAMBA_LM_NAMES", "OFFICIAL_NAMES", "MambaLM", "MambaLMConfig", "VimConfig", "VisionMamba", "init_lm_params",
    "init_params", "lm_apply", "mamba_lm", "normalize", "official", "preprocess", "to_unit", "vim_apply",
    "vim_base", "vim_small", "vim_tiny",
]
