"""The explicit table between official PyTorch state-dict keys and Flax parameter paths.

Every Flax leaf has exactly one official key. Per-layer keys (``layers.{i}.…``) are
stacked along the leading ``depth`` axis of ``params["layers"]``. Layout changes:

    linear   torch [out, in]            -> Flax kernel [in, out]       (transpose)
    conv2d   torch OIHW [D, C, p, p]    -> Flax HWIO [p, p, C, D]
    conv1d   torch depthwise [E, 1, K]  -> Flax [K, E]
    same     unchanged

Numpy only: torch is needed just to read ``.pth`` files (``convert.checkpoint``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import jax
import numpy as np

from mamba_jax.config import VimConfig
from mamba_jax.vim import init_params

# (official key template, Flax path, layout). "{i}" marks a per-layer key; "{s}" is
# "" (forward branch) or "_b" (backward branch).
_GLOBAL = [
    ("patch_embed.proj.weight", ("patch_embed", "proj", "kernel"), "conv2d"),
    ("patch_embed.proj.bias", ("patch_embed", "proj", "bias"), "same"),
    ("cls_token", ("cls_token",), "same"),
    ("cls_token_head", ("cls_token_head",), "same"),
    ("cls_token_tail", ("cls_token_tail",), "same"),
    ("pos_embed", ("pos_embed",), "same"),
    ("norm_f.weight", ("norm_f", "weight"), "same"),
    ("norm_f.bias", ("norm_f", "bias"), "same"),
    ("head.weight", ("head", "kernel"), "linear"),
    ("head.bias", ("head", "bias"), "same"),
]
_LAYER = [
    ("layers.{i}.norm.weight", ("norm", "weight"), "same"),
    ("layers.{i}.norm.bias", ("norm", "bias"), "same"),
    ("layers.{i}.mixer.in_proj.weight", ("mixer", "in_proj", "kernel"), "linear"),
    ("layers.{i}.mixer.out_proj.weight", ("mixer", "out_proj", "kernel"), "linear"),
    ("layers.{i}.mixer.A_log", ("mixer", "A_log"), "same"),
    ("layers.{i}.mixer.A_b_log", ("mixer", "A_b_log"), "same"),
]
for _s in ("", "_b"):
    _LAYER += [
        (f"layers.{{i}}.mixer.conv1d{_s}.weight", ("mixer", f"conv1d{_s}", "kernel"), "conv1d"),
        (f"layers.{{i}}.mixer.conv1d{_s}.bias", ("mixer", f"conv1d{_s}", "bias"), "same"),
        (f"layers.{{i}}.mixer.x_proj{_s}.weight", ("mixer", f"x_proj{_s}", "kernel"), "linear"),
        (f"layers.{{i}}.mixer.dt_proj{_s}.weight", ("mixer", f"dt_proj{_s}", "kernel"), "linear"),
        (f"layers.{{i}}.mixer.dt_proj{_s}.bias", ("mixer", f"dt_proj{_s}", "bias"), "same"),
        (f"layers.{{i}}.mixer.D{_s}", ("mixer", f"D{_s}"), "same"),
    ]

GLOBAL_TABLE = {path: (key, layout) for key, path, layout in _GLOBAL}
LAYER_TABLE = {path: (key, layout) for key, path, layout in _LAYER}

# Buffers or bookkeeping some checkpoints carry that are not parameters of the model.
_IGNORED = re.compile(r"(^|\.)num_batches_tracked$")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message names every offending key."""


def to_flax(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv2d":
        return x.transpose(2, 3, 1, 0)
    if layout == "conv1d":
        return x[:, 0, :].T
    return x


def to_torch(x: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return x.T
    if layout == "conv2d":
        return x.transpose(3, 2, 0, 1)
    if layout == "conv1d":
        return x.T[:, None, :]
    return x


def _flatten(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, Mapping):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _set(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


class Table:
    """One model family's key table: Flax path -> (key template, layout), for the global leaves
    and the per-layer ones (stacked along the leading axis, ``{i}`` in their keys); ``rename``
    maps a key to another layout's name for it (the identity for Vim)."""

    def __init__(self, global_table, layer_table, rename=lambda key: key):
        self.global_table, self.layer_table, self.rename = global_table, layer_table, rename

    def entries(self, shapes, depth):
        """(Flax path, key, layout, torch shape, layer or None) for every key of a parameter tree."""
        for path, shape in _flatten(shapes):
            if path[0] == "layers":
                key, layout = self.layer_table[path[1:]]
                torch_shape = tuple(to_torch(np.empty(shape[1:], np.int8), layout).shape)
                for i in range(depth):
                    yield path, key.format(i=i), layout, torch_shape, i
            else:
                key, layout = self.global_table[path]
                yield path, self.rename(key), layout, tuple(to_torch(np.empty(shape, np.int8), layout).shape), None

    def to_params(self, shapes, depth, sd: Mapping[str, np.ndarray], dtype) -> dict:
        """A checked state dict (numpy values) -> the Flax tree of ``shapes``."""
        params: dict = {}
        for path, _ in _flatten(shapes):
            if path[0] == "layers":
                key, layout = self.layer_table[path[1:]]
                value = np.stack([to_flax(np.asarray(sd[key.format(i=i)]), layout) for i in range(depth)])
            else:
                key, layout = self.global_table[path]
                value = to_flax(np.asarray(sd[self.rename(key)]), layout)
            _set(params, path, np.ascontiguousarray(value, dtype=dtype))
        return params

    def to_state_dict(self, params, depth) -> dict[str, np.ndarray]:
        """Flax params -> a state dict (numpy values, C order), the inverse of ``to_params``."""
        sd = {}
        for path, value in _flatten(jax.device_get(params)):
            value = np.asarray(value)
            if path[0] == "layers":
                key, layout = self.layer_table[path[1:]]
                for i in range(depth):
                    sd[key.format(i=i)] = np.array(to_torch(value[i], layout), order="C")
            else:
                key, layout = self.global_table[path]
                sd[self.rename(key)] = np.array(to_torch(value, layout), order="C")
        return sd


def key_report(want: Mapping[str, tuple], sd: Mapping[str, np.ndarray],
               optional: Mapping[str, tuple] | None = None) -> list[str]:
    """The lines of a ``CheckpointError``: every missing, unexpected and misshaped key of ``sd``
    against the expected shapes (``optional`` keys may be absent); [] when it fits."""
    have = {k: tuple(np.shape(v)) for k, v in sd.items() if not _IGNORED.search(k)}
    expect = {**want, **(optional or {})}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(expect))
    misshaped = sorted(k for k in set(expect) & set(have) if expect[k] != have[k])
    lines = []
    if missing:
        lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing[:20])
                     + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected[:20])
                     + (" ..." if len(unexpected) > 20 else ""))
    for k in misshaped[:20]:
        lines.append(f"  wrong shape for {k}: checkpoint {list(have[k])}, model expects {list(expect[k])}")
    return lines


VIM_TABLE = Table(GLOBAL_TABLE, LAYER_TABLE)


@functools.lru_cache(maxsize=64)
def param_shapes(config: VimConfig) -> dict:
    """The Flax parameter tree of ``config`` as shapes, without allocating anything."""
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.PRNGKey(0))
    return jax.tree_util.tree_map(lambda s: tuple(s.shape), shapes)


def expected_torch_shapes(config: VimConfig) -> dict[str, tuple[int, ...]]:
    """Every official state-dict key of ``config`` with its torch shape."""
    return {key: shape for _, key, _, shape, _ in VIM_TABLE.entries(param_shapes(config), config.depth)}


def check_state_dict(config: VimConfig, sd: Mapping[str, np.ndarray]) -> None:
    """Raise CheckpointError listing every missing, unexpected and misshaped key."""
    lines = key_report(expected_torch_shapes(config), sd)
    if lines:
        raise CheckpointError("\n".join([f"checkpoint does not match the model {config.name or config}:"] + lines))


def state_dict_to_params(config: VimConfig, sd: Mapping[str, np.ndarray], dtype=np.float32) -> dict:
    """Official state dict (numpy values) -> Flax params, after ``check_state_dict``."""
    check_state_dict(config, sd)
    return VIM_TABLE.to_params(param_shapes(config), config.depth, sd, dtype)


def params_to_state_dict(config: VimConfig, params) -> dict[str, np.ndarray]:
    """Flax params -> official state dict (numpy values), the inverse of ``state_dict_to_params``."""
    return VIM_TABLE.to_state_dict(params, config.depth)


def infer_config(sd: Mapping[str, np.ndarray], img_size: int = 224) -> VimConfig:
    """The VimConfig that a state dict's keys and shapes describe.

    What shapes cannot tell is taken from the official models: a single class token sits
    in the middle, and bimamba v2 divides the two branches by 2.
    """
    def shape(key):
        if key not in sd:
            raise CheckpointError(f"not a Vim checkpoint: key {key!r} is missing "
                                  f"(found {len(sd)} keys, e.g. {sorted(sd)[:5]})")
        return tuple(np.shape(sd[key]))

    D, C, p, _ = shape("patch_embed.proj.weight")
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids:
        raise CheckpointError("not a Vim checkpoint: no 'layers.{i}.*' keys")
    depth = max(layer_ids) + 1
    two_E, _ = shape("layers.0.mixer.in_proj.weight")
    E, N = shape("layers.0.mixer.A_log")
    _, R = shape("layers.0.mixer.dt_proj.weight")
    K = shape("layers.0.mixer.conv1d.weight")[-1]
    num_classes = shape("head.weight")[0]
    if "cls_token_head" in sd:
        cls = "double"
    elif "cls_token" in sd:
        cls = "middle"
    else:
        cls = "none"
    if "layers.0.mixer.conv1d_b.weight" in sd:
        bimamba = "v2"
    elif "layers.0.mixer.A_b_log" in sd:
        bimamba = "v1"
    else:
        bimamba = "none"
    abs_pos = "pos_embed" in sd
    stride = p
    if abs_pos:
        n_tokens = shape("pos_embed")[1] - {"none": 0, "middle": 1, "double": 2}[cls]
        side = int(round(n_tokens ** 0.5))
        if side * side != n_tokens:
            raise CheckpointError(f"pos_embed has {n_tokens} patch positions, not a square grid")
        if side > 1:
            stride = (img_size - p) // (side - 1)
        # a stride above the patch size would skip pixels: no Vim does that, so the image
        # size must be another one (shapes cannot tell it; the caller must)
        if (img_size - p) // stride + 1 != side or (side > 1 and (img_size - p) % (side - 1)) or stride > p:
            raise CheckpointError(f"pos_embed of a {side}x{side} grid does not fit img_size {img_size} with patch "
                                  f"{p}: pass the model's VimConfig as variant (or img_size to infer_config)")
    config = VimConfig(embed_dim=D, depth=depth, patch_size=p, stride=stride, img_size=img_size,
                       channels=C, num_classes=num_classes, d_state=N, d_conv=K,
                       expand=two_E // (2 * D), dt_rank=None if R == -(-D // 16) else R,
                       rms_norm="norm_f.bias" not in sd,
                       bimamba=bimamba, cls_token=cls, abs_pos_embed=abs_pos)
    if E != config.d_inner:
        raise CheckpointError(f"in_proj gives d_inner {two_E // 2} but A_log has {E} channels")
    return _with_official_name(config)


def _with_official_name(config: VimConfig) -> VimConfig:
    from mamba_jax.config import OFFICIAL_NAMES, official

    for name in OFFICIAL_NAMES:
        if official(name).replace(name="") == config.replace(name=""):
            return official(name)
    return config
