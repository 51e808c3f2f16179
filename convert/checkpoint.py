"""Load official Vim checkpoints (local file, safetensors, hub id, or a converted folder),
save and restore converted Flax params with orbax, and export back to PyTorch.

Every write goes to a temporary path beside the target and is renamed into place,
so an interrupted save never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.mapping import (
    CheckpointError,
    infer_config,
    param_shapes,
    params_to_state_dict,
    state_dict_to_params,
)
from mamba_jax.config import VimConfig, official

# Default file of each official hub repository (SPEC section 1).
HUB_FILES = {
    "hustvl/Vim-tiny-midclstok": "vim_t_midclstok_76p1acc.pth",
    "hustvl/Vim-small-midclstok": "vim_s_midclstok_80p5acc.pth",
    "hustvl/Vim-base-midclstok": "vim_b_midclstok_81p9acc.pth",
}
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"


# --------------------------------------------------------------------- reading
def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor; bfloat16/float16 are widened to float32
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, np.ndarray]:
    """Accept ``{"model": sd}``, ``{"state_dict": sd}`` or a bare ``sd``; values -> numpy."""
    if isinstance(obj, Mapping):
        for wrapper in ("model", "state_dict", "model_state_dict"):
            if wrapper in obj and isinstance(obj[wrapper], Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: not a state dict (got {type(obj).__name__})")
    sd = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{source}: state dict key {k!r} is not a string")
        if not (hasattr(v, "detach") or isinstance(v, np.ndarray)):
            raise CheckpointError(f"{source}: value of {k!r} is a {type(v).__name__}, not a tensor")
        sd[k] = _to_numpy(v)
    # checkpoints saved from DistributedDataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a local ``.pth``/``.pt`` (``torch.load(weights_only=True)``: no code is
    unpickled) or ``.safetensors`` file into a dict of numpy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            return unwrap_state_dict(load_file(str(path)), str(path))
        except Exception as e:  # safetensors raises its own error types
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading .pth checkpoints needs PyTorch: pip install 'mamba-jax[torch]'") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a PyTorch checkpoint that loads with weights_only=True "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    return unwrap_state_dict(obj, str(path))


def hub_download(repo_id: str, filename: str | None = None) -> str:
    """Download (or find in the local cache) a file of a hub repository.

    ``HF_HUB_OFFLINE=1`` is honoured by huggingface_hub: then only the cache is used.
    """
    from huggingface_hub import hf_hub_download

    if filename is None:
        filename = HUB_FILES.get(repo_id)
    if filename is None:
        raise ValueError(f"no default file known for hub repo {repo_id!r}; name one as "
                         f"'{repo_id}:FILE' (known repos: {sorted(HUB_FILES)})")
    return hf_hub_download(repo_id=repo_id, filename=filename)


def resolve(src: str | os.PathLike) -> Path:
    """A local path as is; ``owner/name[:file]`` that is not a local path -> hub download."""
    path = Path(src)
    if path.exists():
        return path
    text = str(src)
    repo_id, colon, filename = text.partition(":")
    if _HUB_REPO.match(repo_id) and (colon or not text.endswith(_TORCH_SUFFIXES + (".safetensors",))):
        return Path(hub_download(repo_id, filename or None))
    raise FileNotFoundError(f"checkpoint not found: {text!r} is neither a local path nor a hub id "
                            "like 'hustvl/Vim-small-midclstok'")


# --------------------------------------------------------------------- loading
def _resolve_variant(variant) -> VimConfig | None:
    if variant is None or isinstance(variant, VimConfig):
        return variant
    return official(variant)


def load_checkpoint(src, variant: str | VimConfig | None = None) -> tuple[VimConfig, dict]:
    """Load a checkpoint as ``(config, params)`` with params as jax arrays.

    ``src``: an official ``.pth``/``.pt``/``.safetensors`` file, a hub id
    (``hustvl/Vim-small-midclstok`` or ``owner/name:file.pth``), a folder written by
    ``save_params``, or an in-memory state dict. ``variant``: an official name (or
    alias such as ``vim_small``) or a ``VimConfig``; by default it is inferred from the
    checkpoint's shapes. Missing, unexpected or misshaped keys raise ``CheckpointError``
    naming them.
    """
    config = _resolve_variant(variant)
    if isinstance(src, Mapping):
        sd = unwrap_state_dict(src, "state dict")
    else:
        path = resolve(src)
        if path.is_dir():
            saved_config, params = load_params(path)
            if config is not None and config.replace(name="") != saved_config.replace(name=""):
                raise CheckpointError(f"{path} holds {saved_config.name or saved_config}, "
                                      f"not the requested variant {config.name or config}")
            return saved_config, params
        sd = read_state_dict(path)
    if config is None:
        config = infer_config(sd)
    params = state_dict_to_params(config, sd)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


# --------------------------------------------------------------- saving (orbax)
def _atomic_dir(out_dir: Path, overwrite: bool, write) -> Path:
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        write(tmp)
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_params(out_dir, config: VimConfig, params, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` and an orbax checkpoint of ``params`` to ``out_dir``, atomically."""
    import orbax.checkpoint as ocp

    def write(tmp: Path):
        (tmp / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, jax.tree_util.tree_map(jnp.asarray, params))
            ckptr.wait_until_finished()

    return _atomic_dir(Path(out_dir), overwrite, write)


def load_params(path) -> tuple[VimConfig, dict]:
    """Read a folder written by ``save_params``."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not a converted checkpoint folder "
                              f"(expected {CONFIG_FILE} and {PARAMS_DIR}/)")
    config = VimConfig(**json.loads(cfg_file.read_text()))
    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32),
                                    param_shapes(config), is_leaf=lambda x: isinstance(x, tuple))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(path / PARAMS_DIR, target)
    return config, params


def export_state_dict(config: VimConfig, params, path, *, overwrite: bool = False) -> Path:
    """Write Flax params as an official-format PyTorch checkpoint ``{"model": sd}``
    (or a ``.safetensors`` file), atomically."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    sd = params_to_state_dict(config, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.numpy import save_file

            save_file(sd, tmp)
        else:
            import torch

            torch.save({"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
