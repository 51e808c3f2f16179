"""Figures of explanation maps and hidden attention matrices (matplotlib, Agg, no pyplot).

- ``upsample_map``: a patch-grid map -> image size (bilinear, torch align_corners=False),
  min-max normalized to [0, 1].
- ``overlay``: the official notebook's visualization: upsample, min-max, colormap blended
  with the image.
- ``methods_figure``: the image and one overlay per method (one row).
- ``modes_figure``: the same, one row per mode ("exact", "official").
- ``attention_matrices_figure``: the hidden attention matrices alpha of one layer, rows =
  branch (forward, backward), columns = channel.

Figures are ``matplotlib.figure.Figure`` objects with an Agg canvas, never registered with
pyplot (no global state, nothing shown); they display inline in a notebook and are saved
atomically (``atomic_write``: a temporary file in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xai.metrics import upsample

METHOD_TITLES = {
    "raw_attention": "Raw-Attention",
    "rollout": "Attn-Rollout",
    "mamba_attribution": "Mamba-Attribution",
}
BRANCH_NAMES = ("forward", "backward")
PANEL_INCHES = 2.6  # side of one image panel
ZERO_COLOR = "0.9"  # exact zeros of the attention matrices (the causal mask): light grey


# --------------------------------------------------------------------------- files
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file next to ``path``, then rename it to ``path``.

    Readers never see a half-written file; on failure the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` atomically; the format follows the suffix of ``path`` (png, pdf, svg, ...)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


# -------------------------------------------------------------- output folders
# The command lines write into a folder that is new or empty; the marker file lists what they
# wrote there, so that ``--overwrite`` replaces an earlier run's results and nothing else. Its
# first line is JSON ({"command": ...}), then one file name per line, appended before each file
# is written (appending keeps a long run's bookkeeping linear in its number of files).
OUTPUT_MARKER = ".mamba-jax-output.json"


class OutputDirError(ValueError):
    """An output folder that cannot be used; the message says why and what to do instead."""


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name  # atomic_write's temporary files


def _read_marker(out: Path) -> dict | None:
    """{"command", "files"} of a folder's marker; None without a readable one."""
    import json

    try:
        lines = (out / OUTPUT_MARKER).read_text().splitlines()
        head = json.loads(lines[0]) if lines else None
    except (OSError, ValueError):
        return None
    if not isinstance(head, dict) or "command" not in head:
        return None
    return {"command": head["command"], "files": [n for n in lines[1:] if n.strip()]}


def _listing(names: Sequence[str], n: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def check_output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False, inputs=(),
                     option: str = "--out") -> Path:
    """Check an output folder before any work starts; nothing is created or changed.

    The folder must be new or empty. With ``overwrite`` it may instead hold the results of an
    earlier run of ``mamba-jax <command>`` (the files its marker lists) and nothing else. It must
    never hold one of ``inputs``, nor lie under a file. Raises ``OutputDirError`` naming the problem.
    """
    out = Path(path)
    what = f"{option} {out}"
    for existing in (out, *out.parents):
        if existing.exists():
            break
    if not existing.is_dir():
        raise OutputDirError(f"{what}: {existing} is a file, not a folder" if existing != out
                             else f"{what} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputDirError(f"{what}: cannot write in {existing} (permission denied)")
    if existing != out:
        return out  # created when the first result is written
    held = [str(f) for f in map(Path, inputs) if out.resolve() in Path(f).resolve().parents]
    if held:
        raise OutputDirError(f"{what} holds the input image(s) {_listing(held)}: the results would be written "
                             "among (and could replace) them; choose another output folder")
    entries = [e.name for e in os.scandir(out)]
    if not entries:
        return out
    usage = (f"choose a new or empty folder (--overwrite replaces only the results of an earlier "
             f"`mamba-jax {command}` run)")
    if not overwrite:
        raise OutputDirError(f"{what} is not empty ({_listing(entries)}): {usage}")
    marker = _read_marker(out)
    ours = set(marker["files"]) if marker is not None and marker.get("command") == command else set()
    foreign = [n for n in entries if n != OUTPUT_MARKER and n not in ours and not _is_temporary(n)]
    if marker is None or marker.get("command") != command or foreign:
        raise OutputDirError(f"{what} holds files that mamba-jax {command} did not write "
                             f"({_listing(foreign or entries)}): --overwrite replaces only the results of an "
                             f"earlier `mamba-jax {command}` run; choose another folder")
    return out


def open_output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False) -> Path:
    """Create the folder checked by ``check_output_dir`` and start its marker; under ``overwrite``
    first remove the files the earlier run listed in its marker (and its temporary files)."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    marker = _read_marker(out)
    if overwrite and marker is not None and marker.get("command") == command:
        for name in marker["files"]:
            target = out / name
            if name and Path(name).name == name and target.is_file():  # plain names in this folder only
                target.unlink()
        for name in os.listdir(out):
            if _is_temporary(name):
                (out / name).unlink(missing_ok=True)
    record_outputs(out, command, (), replace=True)
    return out


@contextlib.contextmanager
def output_dir(path: str | os.PathLike, *, command: str, overwrite: bool = False):
    """``open_output_dir`` for a block that writes the results: if the block fails before any
    result was recorded, the marker (and the folder, if this created it) is removed again, so a
    failed run does not leave a folder that a rerun would have to ``--overwrite``."""
    out = Path(path)
    created = not out.exists()
    out = open_output_dir(out, command=command, overwrite=overwrite)
    try:
        yield out
    except BaseException:
        marker = _read_marker(out)
        if marker is not None and not any((out / n).exists() for n in marker["files"]):
            (out / OUTPUT_MARKER).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def record_outputs(out: str | os.PathLike, command: str, names: Sequence[str], *, replace: bool = False) -> None:
    """Add ``names`` (files about to be written in ``out``) to its marker; ``replace`` starts a new one."""
    import json

    marker = Path(out) / OUTPUT_MARKER
    if replace or not marker.exists():
        header = json.dumps({"command": command}) + "\n"
        atomic_write(marker, lambda f: f.write(header.encode()))
    if names:
        with open(marker, "a") as f:
            f.write("".join(f"{n}\n" for n in names))


def _new_figure(rows: int, cols: int, width: float, height: float):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


# --------------------------------------------------------------------------- maps
def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(x)  # a constant map carries no ranking: show it all "low"
    return (x - lo) / (hi - lo)


def upsample_map(map_, size: int | tuple[int, int]) -> np.ndarray:
    """Map float [gh, gw] -> float32 [H, W] in [0, 1]: bilinear upsampling (torch's
    ``interpolate(mode="bilinear", align_corners=False)``), then min-max normalization.
    A constant map becomes all zeros."""
    map_ = np.asarray(map_, np.float32)
    if map_.ndim != 2:
        raise ValueError(f"a map must be [grid_h, grid_w], got shape {map_.shape}")
    up = np.asarray(upsample(map_[None], size)[0], np.float32)
    return _minmax(up).astype(np.float32)


def overlay(image01, map_, cmap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """The map over the image: float32 [H, W, 3] in [0, 1].

    The map [gh, gw] is upsampled to the image size (x H/gh, as the official notebook's
    x16 for 14 x 14 maps), min-max normalized, colored with ``cmap`` and blended:
    ``(1 - alpha) * image + alpha * cmap(map)``. (The official notebook adds the JET
    heatmap to the image and divides by the maximum; with alpha=0.5 this is the same blend
    without the data-dependent rescaling.)
    """
    image01 = np.asarray(image01, np.float32)
    if image01.ndim != 3 or image01.shape[-1] != 3:
        raise ValueError(f"image01 must be [H, W, 3], got shape {image01.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    heat = colormaps[cmap](upsample_map(map_, image01.shape[:2]))[..., :3].astype(np.float32)
    return np.clip((1.0 - alpha) * image01 + alpha * heat, 0.0, 1.0)


def _show(ax, image, title: str | None = None) -> None:
    ax.imshow(np.clip(np.asarray(image, np.float32), 0.0, 1.0), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=10)


def _method_title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def methods_figure(image01, maps: Mapping[str, np.ndarray], title: str | None = None,
                   path: str | os.PathLike | None = None, *, cmap: str = "jet", alpha: float = 0.5) -> Figure:
    """The image, then one overlay per method, side by side (the official notebook's figure).

    maps: method name -> map [gh, gw]. Saved atomically to ``path`` when given.
    """
    return modes_figure(image01, {"": maps}, path, title=title, cmap=cmap, alpha=alpha)


def modes_figure(image01, maps_by_mode: Mapping[str, Mapping[str, np.ndarray]],
                 path: str | os.PathLike | None = None, *, title: str | None = None, cmap: str = "jet",
                 alpha: float = 0.5) -> Figure:
    """A grid: one row per mode (labelled at the left), the image then one column per method.

    maps_by_mode: mode -> {method -> map [gh, gw]}; every mode must have the same methods.
    Saved atomically to ``path`` when given.
    """
    if not maps_by_mode:
        raise ValueError("maps_by_mode is empty")
    methods = list(next(iter(maps_by_mode.values())))
    for mode, maps in maps_by_mode.items():
        if list(maps) != methods:
            raise ValueError(f"mode {mode!r} has methods {list(maps)}, expected {methods}")
    rows, cols = len(maps_by_mode), 1 + len(methods)
    fig, axes = _new_figure(rows, cols, PANEL_INCHES * cols, PANEL_INCHES * rows + (0.35 if title else 0.0))
    for r, (mode, maps) in enumerate(maps_by_mode.items()):
        _show(axes[r, 0], image01, "image" if r == 0 else None)
        if mode:
            axes[r, 0].set_ylabel(mode, fontsize=11)
        for c, method in enumerate(methods, start=1):
            _show(axes[r, c], overlay(image01, maps[method], cmap, alpha), _method_title(method) if r == 0 else None)
    if title:
        fig.suptitle(title, fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig


# ------------------------------------------------------------------ attention matrices
def attention_matrices_figure(alpha, channels: Sequence[int], layer: int, path: str | os.PathLike | None = None,
                              cls_pos: int | None = None, *, decades: float = 4.0, cmap: str = "viridis") -> Figure:
    """Hidden attention matrices of one layer: rows = branch, columns = channel.

    alpha: float [n_branches, n_channels, L, L] (``hidden_attention(...)[b, layer]``; branch
    0 forward, 1 backward, both in original token positions); ``channels``: the channel
    index of each column (labels only). Each panel shows |alpha| on a log color scale
    spanning ``decades`` powers of ten below its maximum (the decay along a row is
    exponential, so a linear scale would show only the diagonal), with its own colorbar;
    values below the range take the lowest color, exact zeros (the other triangle) light
    grey. ``cls_pos`` marks the
    class-token row and column with dashed lines.
    """
    alpha = np.asarray(alpha, np.float32)
    if alpha.ndim != 4 or alpha.shape[-1] != alpha.shape[-2]:
        raise ValueError(f"alpha must be [n_branches, n_channels, L, L], got shape {alpha.shape}")
    n_branch, n_ch, L, _ = alpha.shape
    channels = list(channels)
    if len(channels) != n_ch:
        raise ValueError(f"{len(channels)} channel labels for {n_ch} channels")
    if cls_pos is not None and not 0 <= cls_pos < L:
        raise ValueError(f"cls_pos {cls_pos} outside 0..{L - 1}")
    fig, axes = _new_figure(n_branch, n_ch, 3.1 * n_ch, 2.75 * n_branch + 0.4)
    palette = colormaps[cmap].with_extremes(bad=ZERO_COLOR, under=colormaps[cmap](0.0))
    for b in range(n_branch):
        for c in range(n_ch):
            ax = axes[b, c]
            mag = np.abs(alpha[b, c])
            top = float(mag.max())
            top = top if np.isfinite(top) and top > 0 else 1.0
            norm = colors.LogNorm(vmin=top * 10.0 ** -decades, vmax=top, clip=False)
            im = ax.imshow(np.ma.masked_less_equal(mag, 0.0), cmap=palette, norm=norm, interpolation="nearest")
            if cls_pos is not None:
                for line in (ax.axhline, ax.axvline):
                    line(cls_pos, color="white", lw=0.7, ls="--", alpha=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if b == 0:
                ax.set_title(f"channel {channels[c]}", fontsize=10)
            if c == 0:
                name = BRANCH_NAMES[b] if n_branch == 2 else "causal"
                ax.set_ylabel(f"{name}\nquery i", fontsize=10)
            if b == n_branch - 1:
                ax.set_xlabel("key j", fontsize=9)
            cb = fig.colorbar(im, ax=ax, shrink=0.85, extend="min")
            cb.ax.tick_params(labelsize=7)
    mark = f", class token at {cls_pos} (dashed)" if cls_pos is not None else ""
    fig.suptitle(f"hidden attention |alpha|, layer {layer}{mark}", fontsize=11)
    if path is not None:
        save_figure(fig, path)
    return fig
