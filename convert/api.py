"""The public entry points of ``convert``, for both model families (Vim and the Mamba language model).

``load_checkpoint(src)`` looks at what ``src`` is and hands it to the family's loader:
    a converted folder            -> its config.json says which family (``load_params``)
    a Hugging Face / state-spaces folder (config.json + weights), or a hub id of a language
        model (not a known Vim repo, no ``:file``)            -> ``convert.lm_checkpoint``
    a file, ``owner/name:file`` or a state dict -> read once; ``backbone.*`` keys make it a
        language model, anything else goes to the Vim loader (``convert.checkpoint``).
``save_params``, ``load_params`` and ``export_state_dict`` dispatch on the config's type.
(The dispatch lives here, not in ``convert.checkpoint``, because the language-model loader
reuses that module's readers: the import graph stays acyclic.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from convert import checkpoint as vim
from convert import lm_checkpoint as lm
from convert.lm_mapping import state_dict_format
from mamba_jax.config import MAMBA_LM_NAMES, MambaLMConfig, VimConfig, mamba_lm

Config = VimConfig | MambaLMConfig


def _lm_variant(variant) -> MambaLMConfig | None:
    if isinstance(variant, MambaLMConfig):
        return variant
    if isinstance(variant, str) and variant.removeprefix("state-spaces/").removesuffix("-hf") in MAMBA_LM_NAMES:
        return mamba_lm(variant)
    return None


def load_checkpoint(src, variant: str | Config | None = None) -> tuple[Config, dict]:
    """Load a checkpoint of either family as ``(config, params)`` with params as jax arrays.

    ``src``: a Vim ``.pth``/``.safetensors`` file or hub id (``hustvl/Vim-small-midclstok``,
    ``owner/name:file``); a Mamba language model's Hugging Face or state-spaces folder
    (config.json + model.safetensors or pytorch_model.bin), hub id (``state-spaces/mamba-130m-hf``)
    or weights file; a folder written by ``save_params``; or an in-memory state dict.
    ``variant``: a config (``VimConfig`` / ``MambaLMConfig``) or a published name (``vim_small``,
    ``mamba-130m``); by default it is read from config.json or inferred from the shapes.
    Missing, unexpected or misshaped keys and unknown config fields raise ``CheckpointError``
    naming them.
    """
    lm_config = _lm_variant(variant)
    kind = lm.lm_source_kind(src)
    if kind == "hub":
        return lm.load_lm_hub(str(src), lm_config)
    if kind == "folder":
        return lm.load_lm_folder(src, lm_config)
    if kind == "converted":
        config, params = lm.load_lm_params(src)
        if lm_config is not None and lm_config.replace(name="") != config.replace(name=""):
            raise vim.CheckpointError(f"{src} holds {config.name or config}, not the requested {lm_config}")
        return config, params
    if isinstance(src, Mapping):
        sd = vim.unwrap_state_dict(src, "state dict")
    else:
        path = vim.resolve(src)
        if path.is_dir():
            return vim.load_checkpoint(path, variant)
        sd = vim.read_state_dict(path)
        source = str(path)
    if lm_config is not None or state_dict_format(sd) is not None:
        return lm.load_lm_state_dict(sd, lm_config, source=source if not isinstance(src, Mapping) else "state dict")
    return vim.load_checkpoint(sd, variant)


def save_params(out_dir, config: Config, params, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` and an orbax checkpoint of ``params`` to ``out_dir``, atomically."""
    if isinstance(config, MambaLMConfig):
        return lm.save_lm_params(out_dir, config, params, overwrite=overwrite)
    return vim.save_params(out_dir, config, params, overwrite=overwrite)


def load_params(path) -> tuple[Config, dict]:
    """Read a folder written by ``save_params`` (either family)."""
    path = Path(path)
    try:
        family = json.loads((path / vim.CONFIG_FILE).read_text()).get("family")
    except (OSError, ValueError, AttributeError):
        family = None
    return lm.load_lm_params(path) if family == lm.FAMILY else vim.load_params(path)


def export_state_dict(config: Config, params, path, *, overwrite: bool = False) -> Path:
    """Write Flax params back to PyTorch, atomically: Vim as an official checkpoint
    (``{"model": sd}`` or ``.safetensors``); a language model as a transformers state dict file
    (``.bin`` / ``.safetensors``) or, for a folder name, a folder ``MambaForCausalLM.from_pretrained``
    loads (``convert.lm_checkpoint.export_lm`` also writes the state-spaces layout)."""
    if isinstance(config, MambaLMConfig):
        return lm.export_lm(config, params, path, overwrite=overwrite)
    return vim.export_state_dict(config, params, path, overwrite=overwrite)
