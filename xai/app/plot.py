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
atomically (``mamba_jax.files.atomic_write``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mamba_jax.files import atomic_write
from xai.eval.metrics import upsample

METHOD_TITLES = {
    "raw_attention": "Raw-Attention",
    "rollout": "Attn-Rollout",
    "mamba_attribution": "Mamba-Attribution",
    "unified_attribution": "Unified-Attribution",
    "mamba_lrp": "MambaLRP",
    "gradient_x_input": "Gradient x Input",
}
BRANCH_NAMES = ("forward", "backward")
PANEL_INCHES = 2.6  # side of one image panel
ZERO_COLOR = "0.9"  # exact zeros of the attention matrices (the causal mask): light grey


# --------------------------------------------------------------------------- files
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` atomically; the format follows the suffix of ``path`` (png, pdf, svg, ...)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight"))


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
