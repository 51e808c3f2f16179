"""Mamba language-model checkpoints: Hugging Face folders and hub ids, state-spaces files, orbax
save and restore, export back to PyTorch (a state dict, or a folder transformers loads).

Sources (``load_lm``):
    a folder with config.json and model.safetensors, pytorch_model.bin, or their sharded
        ``*.index.json`` (a ``save_pretrained`` folder, a hub snapshot, a state-spaces download);
    a hub id ``owner/name`` (state-spaces/mamba-130m-hf, state-spaces/mamba-130m): config.json and
        the weights through ``convert.checkpoint.hub_download`` (the hub cache; HF_HUB_OFFLINE=1
        honoured);
    a state dict or a single weights file, whose config is then inferred from its shapes.
The layout (transformers' or state-spaces') is recognized from the keys; config.json is read
through ``convert.lm_mapping``'s whitelist. File reading, finiteness checks, hub errors and
atomic folders are ``convert.checkpoint``'s, shared with Vim.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from convert.checkpoint import (
    _HUB_REPO,
    CONFIG_FILE,
    HUB_FILES,
    PARAMS_DIR,
    _atomic_dir,
    _looks_local,
    hub_download,
    read_state_dict,
    restore_params,
    save_folder,
    unwrap_state_dict,
)
from convert.lm_mapping import (
    HF,
    STATE_SPACES,
    infer_lm_config,
    lm_config_from_dict,
    lm_config_to_dict,
    lm_param_shapes,
    lm_params_to_state_dict,
    lm_state_dict_to_params,
    state_dict_format,
)
from convert.mapping import CheckpointError
from mamba_jax.config import MAMBA_LM_NAMES, MambaLMConfig, mamba_lm
from mamba_jax.files import atomic_write

# weight files of a folder, in the order they are looked for
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
FAMILY = "mamba_lm"  # the "family" field of a converted folder's config.json


# --------------------------------------------------------------------- reading
def is_lm_folder(path: Path) -> bool:
    """A folder of a Hugging Face or state-spaces language model: config.json and a weights file."""
    return (path / CONFIG_FILE).is_file() and any((path / f).is_file() for f in WEIGHT_FILES)


def is_converted_lm_folder(path: Path) -> bool:
    """A folder ``save_lm_params`` wrote (config.json with "family": "mamba_lm", and params/)."""
    if not ((path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()):
        return False
    try:
        return json.loads((path / CONFIG_FILE).read_text()).get("family") == FAMILY
    except (OSError, ValueError, AttributeError):
        return False


def is_lm_hub_id(text: str) -> bool:
    """``owner/name`` that is not a local path, without ``:file``, and not a known Vim repo: a
    language model's hub repo (config.json plus weights)."""
    return bool(_HUB_REPO.match(text)) and text not in HUB_FILES and not _looks_local(text) \
        and not Path(text).exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({e})") from e


def _read_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """One state dict from one or several (sharded) weight files; a key in two shards is an error."""
    sd: dict[str, np.ndarray] = {}
    for f in files:
        part = read_state_dict(f)
        twice = sorted(set(part) & set(sd))
        if twice:
            raise CheckpointError(f"{f}: keys {twice[:5]} are also in another shard")
        sd.update(part)
    return sd


def _shards(index: Path) -> list[str]:
    """The shard file names of a ``*.index.json`` (its ``weight_map`` values)."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, Mapping) or not weight_map:
        raise CheckpointError(f"{index}: no 'weight_map' of parameter names to shard files")
    names = sorted(set(weight_map.values()))
    bad = [n for n in names if not isinstance(n, str) or Path(n).name != n]
    if bad:
        raise CheckpointError(f"{index}: shard names must be plain file names, got {bad[:3]}")
    return names


def folder_weight_files(path: Path) -> list[Path]:
    """The weight files of a language-model folder (the first of ``WEIGHT_FILES`` present)."""
    for name in WEIGHT_FILES:
        f = path / name
        if f.is_file():
            if name.endswith(".index.json"):
                files = [path / n for n in _shards(f)]
                absent = [p.name for p in files if not p.is_file()]
                if absent:
                    raise CheckpointError(f"{f} lists shard(s) missing from {path}: {absent[:5]}")
                return files
            return [f]
    raise CheckpointError(f"{path} has {CONFIG_FILE} but no weights (looked for {', '.join(WEIGHT_FILES)})")


def _named(config: MambaLMConfig, hint: str = "") -> MambaLMConfig:
    """The config with a published model's name when its architecture is one (``hint``: a hub id
    or folder name that names it, preferred)."""
    if config.name:
        return config
    names = list(MAMBA_LM_NAMES)
    short = hint.removeprefix("state-spaces/").removesuffix("-hf")
    if short in names:
        names.insert(0, names.pop(names.index(short)))
    def canonical(c):
        return c.replace(name="", time_step_rank=c.rank)

    for name in names:
        if canonical(mamba_lm(name)) == canonical(config):
            return config.replace(name=name)
    return config


def load_lm_state_dict(sd: Mapping, config: MambaLMConfig | None = None, *, source: str = "state dict",
                       config_dict: Mapping | None = None, hint: str = "") -> tuple[MambaLMConfig, dict]:
    """(config, params) of a language model's state dict (either layout). The config is ``config``
    if given, else read from ``config_dict`` (a config.json), else inferred from the shapes."""
    sd = unwrap_state_dict(sd, source)
    fmt = state_dict_format(sd)
    if fmt is None:
        raise CheckpointError(f"{source}: not a Mamba language model checkpoint: no 'backbone.*' keys "
                              f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")
    if config is None:
        config = lm_config_from_dict(config_dict, where=f"{source} config.json") if config_dict is not None \
            else infer_lm_config(sd)
    params = lm_state_dict_to_params(config, sd, fmt)
    return _named(config, hint), jax.tree_util.tree_map(jnp.asarray, params)


def load_lm_folder(path, config: MambaLMConfig | None = None) -> tuple[MambaLMConfig, dict]:
    """(config, params) of a Hugging Face or state-spaces folder (config.json + weights)."""
    path = Path(path)
    cfg = _read_json(path / CONFIG_FILE)
    sd = _read_weights(folder_weight_files(path))
    return load_lm_state_dict(sd, config, source=str(path), config_dict=cfg, hint=path.name)


def _download_optional(repo_id: str, filename: str, offline_misses: list | None = None) -> Path | None:
    """A hub file, or None when the repo has no such file. With ``offline_misses``, a file that is
    neither in the local cache nor reachable (offline) is also None, its error appended there."""
    from huggingface_hub import errors

    try:
        return Path(hub_download(repo_id, filename))
    except CheckpointError as e:
        cause = e.__cause__
        if isinstance(cause, errors.LocalEntryNotFoundError):
            if offline_misses is None:
                raise
            offline_misses.append(e)
            return None
        if isinstance(cause, errors.EntryNotFoundError):
            return None
        raise


def load_lm_hub(repo_id: str, config: MambaLMConfig | None = None) -> tuple[MambaLMConfig, dict]:
    """(config, params) of a hub repository: its config.json, then the first of ``WEIGHT_FILES``
    it has (shards included), through ``convert.checkpoint.hub_download`` (offline: the first one
    in the local cache)."""
    cfg_path = _download_optional(repo_id, CONFIG_FILE)
    if cfg_path is None:
        raise CheckpointError(f"hub repo {repo_id!r} has no {CONFIG_FILE}: not a Hugging Face or state-spaces "
                              f"language model; for a Vim checkpoint name its file as '{repo_id}:FILE' "
                              f"(known Vim repos: {sorted(HUB_FILES)})")
    cfg = _read_json(cfg_path)
    offline: list[CheckpointError] = []
    for name in WEIGHT_FILES:
        f = _download_optional(repo_id, name, offline)
        if f is None:
            continue
        files = [Path(hub_download(repo_id, n)) for n in _shards(f)] if name.endswith(".index.json") else [f]
        return load_lm_state_dict(_read_weights(files), config, source=f"hub repo {repo_id}", config_dict=cfg,
                                  hint=repo_id)
    if offline:
        raise offline[0]
    raise CheckpointError(f"hub repo {repo_id!r} has {CONFIG_FILE} but none of {', '.join(WEIGHT_FILES)}")


# --------------------------------------------------------------- saving (orbax)
def save_lm_params(out_dir, config: MambaLMConfig, params, *, overwrite: bool = False) -> Path:
    """Write ``config.json`` (with "family": "mamba_lm") and an orbax checkpoint of ``params`` to
    ``out_dir``, atomically (``convert.checkpoint.save_params``' rules for the folder)."""
    return save_folder(out_dir, {"family": FAMILY, **dataclasses.asdict(config)}, params, overwrite=overwrite)


def load_lm_params(path) -> tuple[MambaLMConfig, dict]:
    """Read a folder written by ``save_lm_params``."""
    path = Path(path).absolute()
    cfg_file = path / CONFIG_FILE
    fields = _read_json(cfg_file)
    if fields.pop("family", None) != FAMILY:
        raise CheckpointError(f"{cfg_file}: not a language model folder written by save_params")
    try:
        config = MambaLMConfig(**fields)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: not a model config written by save_params ({e})") from e
    return config, restore_params(path, lm_param_shapes(config))


# ---------------------------------------------------------------------- export
def export_lm(config: MambaLMConfig, params, path, *, fmt: str = HF, overwrite: bool = False) -> Path:
    """Write a language model back to PyTorch, atomically.

    ``path`` ending in ``.safetensors``: that file; ``.bin`` / ``.pth`` / ``.pt``: a ``torch.save``d
    bare state dict; anything else: a folder with config.json and model.safetensors that
    ``transformers.MambaForCausalLM.from_pretrained`` loads (transformers' layout only).
    ``fmt``: "hf" (transformers' keys) or "state-spaces" (``backbone.embedding``, lm_head kept).
    """
    if fmt not in (HF, STATE_SPACES):
        raise ValueError(f"unknown layout {fmt!r}; expected {HF!r} or {STATE_SPACES!r}")
    path = Path(path).absolute()
    suffix = path.suffix.lower()
    sd = lm_params_to_state_dict(config, params, fmt)
    if suffix in (".safetensors", ".bin", ".pth", ".pt"):
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        if suffix == ".safetensors":
            from safetensors.numpy import save

            atomic_write(path, lambda f: f.write(save(sd, metadata={"format": "pt"})))
        else:
            import torch

            state = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
            atomic_write(path, lambda f: torch.save(state, f))
        return path
    if fmt != HF:
        raise ValueError("a folder is written in transformers' layout only: pass fmt='hf', or a file name")
    cfg = lm_config_to_dict(config)

    def write(tmp: Path):
        from safetensors.numpy import save

        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        (tmp / "model.safetensors").write_bytes(save(sd, metadata={"format": "pt"}))

    return _atomic_dir(path, overwrite, write)


def lm_source_kind(src) -> str | None:
    """What ``src`` is, for the dispatcher: "converted", "folder", "hub", or None (a file, a state
    dict or something else: decided by its keys)."""
    if isinstance(src, Mapping):
        return None
    path = Path(os.fspath(src))
    if path.is_dir():
        if is_converted_lm_folder(path):
            return "converted"
        if is_lm_folder(path):
            return "folder"
        return None
    if is_lm_hub_id(str(src)):
        return "hub"
    return None
