"""Load official Vim checkpoints (local file, safetensors, hub id, or a converted folder),
save and restore converted Flax params with orbax, and export back to PyTorch.

Every write goes to a temporary path beside the target and is renamed into place,
so an interrupted save never leaves a half-written checkpoint under the final name; SIGINT and
SIGTERM are held while orbax's background threads write, so the temporary folder is removed too.
Converted folders hold a marker file (``OUTPUT_MARKER``): ``overwrite=True`` replaces only those.
Every loaded weight must be finite: a NaN or inf is an error naming the parameter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
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
from mamba_jax.files import OUTPUT_MARKER, atomic_write

# Default file of each official hub repository (SPEC section 1).
HUB_FILES = {
    "hustvl/Vim-tiny-midclstok": "vim_t_midclstok_76p1acc.pth",
    "hustvl/Vim-small-midclstok": "vim_s_midclstok_80p5acc.pth",
    "hustvl/Vim-base-midclstok": "vim_b_midclstok_81p9acc.pth",
}
_HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_CKPT_SUFFIXES = _TORCH_SUFFIXES + (".safetensors",)
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
        _check_finite(sd[k], k, source)
    # checkpoints saved from DistributedDataParallel prefix every key with "module."
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _check_finite(value, name: str, source: str) -> None:
    """A NaN or inf weight is an error naming the parameter (it would make every output NaN)."""
    if np.asarray(value).dtype.kind not in "fc":
        return
    finite = np.isfinite(value)
    if not finite.all():
        n = int(finite.size - np.count_nonzero(finite))
        raise CheckpointError(f"{source}: parameter {name!r} holds {n} non-finite value(s) (NaN or inf) among "
                              f"{finite.size}: the checkpoint is damaged")


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
    if filename is None:
        filename = HUB_FILES.get(repo_id)
    if filename is None:
        raise CheckpointError(f"no local file or folder {repo_id!r}, and no default file known for a hub repo of "
                              f"that name; name one as '{repo_id}:FILE' (known repos: {sorted(HUB_FILES)})")
    import huggingface_hub

    try:
        return huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename)
    except Exception as e:  # huggingface_hub's errors: say which repo, and how to work without the hub
        raise CheckpointError(_hub_error(repo_id, filename, e)) from e


def _hub_error(repo_id: str, filename: str, err: Exception) -> str:
    from huggingface_hub import errors

    offline = (f"To work offline, download the file once where there is a connection "
               f"(`hf download {repo_id} {filename}`, or from https://huggingface.co/{repo_id}) and pass its "
               "local path; HF_HUB_OFFLINE=1 makes the local cache the only source")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"hub repo {repo_id!r} not found (nor a local file or folder of that name); "
                "a private or gated repo needs `hf auth login`")
    if isinstance(err, errors.LocalEntryNotFoundError):
        return (f"cannot get {filename!r} of hub repo {repo_id!r}: offline or no connection, and it is not in "
                f"the local cache. {offline}")
    if isinstance(err, errors.EntryNotFoundError):
        return f"hub repo {repo_id!r} has no file {filename!r} (name another one as '{repo_id}:FILE')"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"cannot get {filename!r} of hub repo {repo_id!r}: {first}. {offline}"


def _looks_local(text: str) -> bool:
    """A path rather than a hub id ``owner/name``: it starts like a path ("/", "./", "~"), has a
    backslash or more than one "/", ends in a checkpoint suffix, or its first part is a local folder."""
    if text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") != 1:
        return True
    return text.lower().endswith(_CKPT_SUFFIXES) or Path(text.split("/")[0]).is_dir()


def resolve(src: str | os.PathLike) -> Path:
    """A local path as is; ``owner/name`` that is not a local path, or ``owner/name:file``, is
    downloaded from the hub. A path that looks local and does not exist is a FileNotFoundError."""
    path = Path(src)
    if path.exists():
        return path
    text = str(src)
    repo_id, colon, filename = text.partition(":")
    if _HUB_REPO.match(repo_id) and (colon or not _looks_local(text)):
        return Path(hub_download(repo_id, filename or None))
    hint = ""
    if _HUB_REPO.match(repo_id) and not colon and not text.lower().endswith(_CKPT_SUFFIXES):
        hint = f" ({repo_id.split('/')[0]}/ is a local folder; for the hub repo write '{repo_id}:FILE')"
    raise FileNotFoundError(f"no such file or folder: {text!r}{hint}")


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
def _is_converted(folder: Path) -> bool:
    """A folder this module wrote: it has the marker (or, written before markers, exactly
    config.json and params/)."""
    names = set(os.listdir(folder))
    if OUTPUT_MARKER in names:  # first line {"command": ...}, then the names written
        try:
            return json.loads((folder / OUTPUT_MARKER).read_text().splitlines()[0]).get("command") == "convert"
        except (OSError, ValueError, AttributeError, IndexError):
            return False
    return names == {CONFIG_FILE, PARAMS_DIR}


def check_out_dir(out_dir, *, overwrite: bool = False) -> Path:
    """Check a conversion's output folder before any work: it must be new or empty, or, with
    ``overwrite``, a folder converted earlier (nothing else is ever replaced)."""
    out = Path(out_dir)
    for existing in (out, *out.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise NotADirectoryError(f"{out} is a file, not a folder" if existing == out
                                 else f"{out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: cannot write in {existing} (permission denied)")
    if existing != out or not os.listdir(out):
        return out
    if not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose a new or empty folder, or pass "
                              "overwrite=True (--overwrite) to replace a folder converted earlier")
    if not _is_converted(out):
        shown = ", ".join(sorted(os.listdir(out))[:4])
        raise FileExistsError(f"{out} is not a converted checkpoint folder (it holds {shown}; no "
                              f"{OUTPUT_MARKER}): overwrite replaces only folders this program wrote, and it "
                              "did not write this one; choose another folder")
    return out


@contextlib.contextmanager
def _interrupts_held():
    """Hold SIGINT and SIGTERM until the block ends, then raise KeyboardInterrupt: orbax writes in
    background threads, which an interrupt of the main thread would leave writing into the
    temporary folder while it is removed (it reappeared, half-written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, frame):
        if not received:
            print("interrupted: finishing the current write, then cleaning up", file=sys.stderr)
        received.append(signum)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, hold)
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    if received:
        raise KeyboardInterrupt


def _atomic_dir(out_dir: Path, overwrite: bool, write) -> Path:
    out_dir = check_out_dir(Path(out_dir), overwrite=overwrite).absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        with _interrupts_held():
            write(tmp)
            (tmp / OUTPUT_MARKER).write_text(json.dumps({"command": "convert"}) + "\n"
                                             + "".join(f"{n}\n" for n in sorted(os.listdir(tmp))))
        with _interrupts_held():  # the swap is one step: finished before an interrupt is honoured
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
    return save_folder(out_dir, dataclasses.asdict(config), params, overwrite=overwrite)


def save_folder(out_dir, config_fields: dict, params, *, overwrite: bool = False) -> Path:
    """``config_fields`` as ``config.json`` and an orbax checkpoint of ``params`` in ``out_dir``,
    written in a temporary folder and renamed (``_atomic_dir``); both model families use it."""
    import orbax.checkpoint as ocp

    def write(tmp: Path):
        (tmp / CONFIG_FILE).write_text(json.dumps(config_fields, indent=2))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS_DIR, jax.tree_util.tree_map(jnp.asarray, params))
            ckptr.wait_until_finished()

    return _atomic_dir(Path(out_dir), overwrite, write)


def load_params(path) -> tuple[VimConfig, dict]:
    """Read a folder written by ``save_params``."""
    path = Path(path).absolute()
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file() or not (path / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{path} is not a converted checkpoint folder "
                              f"(expected {CONFIG_FILE} and {PARAMS_DIR}/)")
    try:
        config = VimConfig(**json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: not a model config written by save_params ({e})") from e
    return config, restore_params(path, param_shapes(config))


def restore_params(path: Path, shapes) -> dict:
    """The float32 parameters of ``shapes`` (a tree of shape tuples) from ``path``'s orbax folder;
    a damaged folder or a non-finite value is a ``CheckpointError`` naming it."""
    import orbax.checkpoint as ocp

    target = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), shapes,
                                    is_leaf=lambda x: isinstance(x, tuple))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            params = ckptr.restore(path / PARAMS_DIR, target)
    except Exception as e:  # orbax/tensorstore raise many types for damaged folders
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path / PARAMS_DIR}: cannot restore the parameters ({first})") from e
    for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not bool(jnp.isfinite(leaf).all()):
            name = "/".join(str(getattr(k, "key", k)) for k in keys)
            _check_finite(np.asarray(leaf), name, str(path))
    return params


def export_state_dict(config: VimConfig, params, path, *, overwrite: bool = False) -> Path:
    """Write Flax params as an official-format PyTorch checkpoint ``{"model": sd}``
    (or a ``.safetensors`` file), atomically."""
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    sd = params_to_state_dict(config, params)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save

        atomic_write(path, lambda f: f.write(save(sd)))
    else:
        import torch

        state = {"model": {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}}
        atomic_write(path, lambda f: torch.save(state, f))
    return path
