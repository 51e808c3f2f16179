"""Checkpoints <-> Flax params (orbax) for Vim and the Mamba language model, and a pure-PyTorch reference Vim.

The public contract: ``load_checkpoint(src, variant=None) -> (config, params)`` takes a Vim
``.pth`` / ``.safetensors`` file or hub id, a Mamba language model's Hugging Face or state-spaces
folder, hub id or weights file, a converted orbax folder, or a state dict (``convert.api``
dispatches to ``convert.checkpoint`` for Vim and ``convert.lm_checkpoint`` for language models).
"""

from convert.api import export_state_dict, load_checkpoint, load_params, save_params

__all__ = ["export_state_dict", "load_checkpoint", "load_params", "save_params"]
