"""Official PyTorch Vim checkpoints <-> Flax params (orbax), and a pure-PyTorch reference Vim.

The public contract: ``load_checkpoint(src, variant=None) -> (VimConfig, params)`` takes a
local ``.pth`` / ``.safetensors`` file, a converted orbax folder, a state dict or a hub id.
"""

from convert.checkpoint import export_state_dict, load_checkpoint, load_params, save_params

__all__ = ["export_state_dict", "load_checkpoint", "load_params", "save_params"]
