"""Evaluation of explanation maps (SPEC section 5), batched and jit-friendly.

- ``upsample``: bilinear resize equal to torch ``F.interpolate(mode="bilinear",
  align_corners=False)`` (no antialiasing), as two small interpolation matrices.
- Perturbation test: ``perturbation_hits`` -> hits [B, 10] at the fractions
  ``PERTURBATION_STEPS`` = 0, 0.1, ..., 0.9; ``perturbation_curve`` (hit rate in
  percent) and ``auc`` (trapezoid, x spacing 0.1); ``PerturbationAccumulator``.
- Segmentation test: ``segmentation_stats`` (per-image counts and AP) and
  ``SegmentationAccumulator`` (pixel accuracy, IoU per class, mIoU, mAP).

Conventions follow the public explainability evaluation code these papers use
(Chefer et al., ``pertubation_eval_from_hdf5.py`` and ``imagenet_seg_eval.py``);
each deliberate choice is stated where it is made.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from xai.eval.data import IMAGENET_MEAN, IMAGENET_STD

# Fraction of pixels removed at each step; written as literals so that
# int(k * H * W) is evaluated exactly as the reference's int(base_size * step).
PERTURBATION_STEPS: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

ApMode = Literal["pooled", "mean_of_classes"]


# ---------------------------------------------------------------------------
# Bilinear upsampling.


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear rule with align_corners=False.

    src = (dst + 0.5) * n_in / n_out - 0.5, clamped below at 0; i0 = floor(src),
    i1 = min(i0 + 1, n_in - 1), weights (1 - frac, frac).
    """
    dst = np.arange(n_out, dtype=np.float64)
    src = np.maximum((dst + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), i1), frac)
    return w.astype(np.float32)


def upsample(maps: jax.Array, size: int | tuple[int, int]) -> jax.Array:
    """Bilinear resize of maps [B, h, w] to [B, H, W] (torch align_corners=False)."""
    H, W = (size, size) if isinstance(size, int) else size
    maps = jnp.asarray(maps, jnp.float32)
    h, w = maps.shape[-2:]
    wy = jnp.asarray(_interp_matrix(h, H))
    wx = jnp.asarray(_interp_matrix(w, W))
    return jnp.einsum("Hh,bhw,Ww->bHW", wy, maps, wx, precision=jax.lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------
# Perturbation test.


def perturbation_counts(num_pixels: int, steps=PERTURBATION_STEPS) -> tuple[int, ...]:
    """Pixels removed at each step: ``int(k * num_pixels)`` (truncated)."""
    return tuple(int(num_pixels * k) for k in steps)


@functools.partial(jax.jit, static_argnames=("size", "positive"))
def removal_ranks(maps: jax.Array, size: tuple[int, int], *, positive: bool) -> jax.Array:
    """Order in which pixels are removed, int32 [B, H, W] (0 = removed first).

    The map is upsampled to ``size``; the positive test removes the highest
    values first, the negative test the lowest (= highest of the negated map).
    Ties are broken by the row-major pixel index, lower index first, in both
    tests (torch.topk leaves tie order unspecified).
    """
    up = upsample(maps, size)
    B = up.shape[0]
    flat = up.reshape(B, -1)
    order = jnp.argsort(flat, axis=-1, descending=positive, stable=True)
    n = flat.shape[1]
    ranks = jnp.zeros((B, n), jnp.int32)
    ranks = ranks.at[jnp.arange(B)[:, None], order].set(jnp.arange(n, dtype=jnp.int32))
    return ranks.reshape(up.shape)


@jax.jit
def perturb(images01: jax.Array, ranks: jax.Array, count: int | jax.Array) -> jax.Array:
    """Sets the ``count`` first-removed pixels to 0 in all channels (NHWC)."""
    keep = (ranks >= count)[..., None]
    return jnp.where(keep, images01, jnp.zeros((), images01.dtype))


@jax.jit
def _perturbed_input(images01, ranks, count, mean, std):
    """``perturb`` then the normalization (x - mean) / std, one compiled function (the count is
    traced: one compilation serves every step)."""
    return (perturb(images01, ranks, count) - mean) / std


@jax.jit
def _hits(preds, targets):
    """preds int [steps, B], targets int [B] -> bool [B, steps]."""
    return (preds == targets[None]).T


def perturbation_hits(
    predict_fn: Callable[[jax.Array], jax.Array],
    images01: jax.Array,
    maps: jax.Array,
    targets: jax.Array | None = None,
    *,
    positive: bool = True,
    steps: tuple[float, ...] = PERTURBATION_STEPS,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    unperturbed=None,
) -> jax.Array:
    """Perturbation test for one batch: bool [B, len(steps)], a device array (no host sync).

    Args:
      predict_fn: normalized images [B, H, W, 3] -> logits [B, classes].
      images01: images in [0, 1], [B, H, W, 3] (keep them on the device: each test reads them
        len(steps) times).
      maps: explanation maps [B, h, w], upsampled bilinearly to H x W.
      targets: class explained per image [B]; None = the unperturbed top-1.
      positive: remove the most relevant pixels first (True) or the least (False).
      unperturbed: the predicted classes of the intact images, if the caller has them
        (the step that removes no pixel then needs no forward pass).

    At step k, ``int(k * H * W)`` pixels (truncated, k=0 removes none) are set to
    0 in all channels: those of highest upsampled map value (positive) or lowest
    (negative), ties broken by lower row-major index (see ``removal_ranks``).
    The perturbed image is normalized with (mean, std) and classified; a hit is
    argmax(logits) == target. Pure JAX apart from ``predict_fn``, so the whole
    function can be jitted with predict_fn and the keywords static; called eagerly it
    dispatches, per step, one compiled masking, ``predict_fn`` and one argmax, and waits
    for none of them.
    """
    images01 = jnp.asarray(images01, jnp.float32)
    H, W = images01.shape[1:3]
    ranks = removal_ranks(maps, (int(H), int(W)), positive=positive)
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    preds = []
    for count in perturbation_counts(H * W, steps):
        if count == 0 and unperturbed is not None:
            pred = jnp.asarray(unperturbed, jnp.int32)
        else:
            pred = _top1(predict_fn(_perturbed_input(images01, ranks, count, mean, std)))
        preds.append(pred)
    targets = preds[0] if targets is None else jnp.asarray(targets, jnp.int32)  # None: the first step fixes it
    return _hits(jnp.stack(preds), targets)


@jax.jit
def _top1(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def perturbation_curve(hits) -> np.ndarray:
    """Hit rate in percent per step, float64 [steps], from hits [N, steps]."""
    return 100.0 * np.asarray(hits, np.float64).mean(axis=0)


def auc(curve_percent, dx: float = 0.1) -> float:
    """Trapezoid area under the curve with x spacing ``dx`` (0.1 for 0, 0.1, ..., 0.9)."""
    c = np.asarray(curve_percent, np.float64)
    return float(dx * (c[1:] + c[:-1]).sum() / 2.0)


@dataclasses.dataclass
class PerturbationAccumulator:
    """Streams ``perturbation_hits`` batches; ``result()`` -> curve (percent) and AUC."""

    hits: list[np.ndarray] = dataclasses.field(default_factory=list)

    def update(self, hits) -> None:
        """Adds one batch of hits bool [B, steps]."""
        self.hits.append(np.asarray(hits, bool))

    @property
    def num_images(self) -> int:
        return int(sum(map(len, self.hits)))

    def result(self) -> dict:
        if not self.hits:
            raise ValueError("no batches accumulated")
        curve = perturbation_curve(np.concatenate(self.hits))
        return {"curve": curve, "auc": auc(curve), "num_images": self.num_images}


# ---------------------------------------------------------------------------
# Segmentation test.


@jax.jit
def average_precision(scores: jax.Array, labels: jax.Array) -> jax.Array:
    """Non-interpolated average precision of one ranking, float32 [].

    sklearn's ``average_precision_score``: AP = sum_t (R_t - R_{t-1}) P_t over
    the distinct score thresholds t in decreasing order, P_t / R_t the precision
    / recall of "score >= t". Without ties this is the mean, over positives, of
    the precision at each positive's rank; tied scores form one threshold, so
    every positive in a tie gets the precision at the end of its tie group.
    With no positives the AP is 0 (the reference's nan_to_num of sklearn's nan).
    """
    scores = jnp.ravel(scores)
    labels = jnp.ravel(labels).astype(bool)
    n = scores.shape[0]
    order = jnp.argsort(scores, descending=True)
    s, y = scores[order], labels[order]
    tp = jnp.cumsum(y.astype(jnp.int32))
    idx = jnp.arange(n, dtype=jnp.int32)
    is_end = jnp.concatenate([s[1:] != s[:-1], jnp.ones((1,), bool)])
    # Index of the end of each element's tie group: first group end at or after it.
    end = jax.lax.cummin(jnp.where(is_end, idx, n - 1), reverse=True)
    precision_at_end = tp[end].astype(jnp.float32) / (end + 1).astype(jnp.float32)
    num_pos = tp[-1]
    total = jnp.sum(jnp.where(y, precision_at_end, 0.0))
    return jnp.where(num_pos > 0, total / jnp.maximum(num_pos, 1), 0.0)


@functools.partial(jax.jit, static_argnames=("minmax", "ap_mode"))
def segmentation_stats(
    maps: jax.Array,
    masks: jax.Array,
    *,
    minmax: bool = True,
    ap_mode: ApMode = "pooled",
) -> dict[str, jax.Array]:
    """Per-image statistics of the segmentation test.

    Args:
      maps: explanation maps [B, h, w]; upsampled bilinearly to the mask size.
      masks: ground-truth foreground bool [B, H, W].
      minmax: min-max normalize each upsampled map to [0, 1] (the reference
        does; it changes only the AP). A constant map has no range: like the
        reference (whose 0/0 NaNs are then set to 0) it predicts all background
        and both AP score channels are 0.
      ap_mode: "pooled" (the reference's ``get_ap_scores``): ONE average
        precision over the 2*H*W pairs (1 - map, pixel is background) and
        (map, pixel is foreground), i.e. both one-hot channels flattened
        together. "mean_of_classes": the mean of the AP of 1 - map for the
        background and the AP of map for the foreground (a class absent from
        the mask contributes 0).

    Returns float32/int32 arrays: ``correct`` [B] (pixels where "map > its
    per-image mean" equals the mask), ``labeled`` [B] (H*W), ``intersection``
    and ``union`` [B, 2] (background, foreground), ``ap`` [B].
    """
    masks = jnp.asarray(masks, bool)
    m = upsample(maps, masks.shape[1:])
    valid = jnp.ones(m.shape[:1], bool)
    if minmax:
        lo = m.min(axis=(1, 2), keepdims=True)
        hi = m.max(axis=(1, 2), keepdims=True)
        rng = hi - lo
        valid = rng[:, 0, 0] > 0
        m = jnp.where(rng > 0, (m - lo) / jnp.where(rng > 0, rng, 1.0), 0.0)
    thr = m.mean(axis=(1, 2), keepdims=True)
    pred = (m > thr) & valid[:, None, None]
    gt = masks
    correct = jnp.sum(pred == gt, axis=(1, 2))
    inter = jnp.stack([jnp.sum(~pred & ~gt, (1, 2)), jnp.sum(pred & gt, (1, 2))], -1)
    union = jnp.stack([jnp.sum(~pred | ~gt, (1, 2)), jnp.sum(pred | gt, (1, 2))], -1)

    v = valid[:, None, None]
    fg_score = jnp.where(v, m, 0.0)
    bg_score = jnp.where(v, 1.0 - m, 0.0)
    B = m.shape[0]
    if ap_mode == "pooled":
        scores = jnp.concatenate([bg_score.reshape(B, -1), fg_score.reshape(B, -1)], 1)
        labels = jnp.concatenate([~gt.reshape(B, -1), gt.reshape(B, -1)], 1)
        ap = jax.vmap(average_precision)(scores, labels)
    elif ap_mode == "mean_of_classes":
        ap_bg = jax.vmap(average_precision)(bg_score.reshape(B, -1), ~gt.reshape(B, -1))
        ap_fg = jax.vmap(average_precision)(fg_score.reshape(B, -1), gt.reshape(B, -1))
        ap = (ap_bg + ap_fg) / 2
    else:
        raise ValueError(f"unknown ap_mode {ap_mode!r}")
    labeled = jnp.full((B,), gt.shape[1] * gt.shape[2], jnp.int32)
    return {"correct": correct, "labeled": labeled, "intersection": inter, "union": union, "ap": ap}


@dataclasses.dataclass
class SegmentationAccumulator:
    """Streams the segmentation test over batches.

    ``update(maps [B, h, w], masks bool [B, H, W], count=None)`` per batch; ``result()``
    returns, in percent: ``pixel_accuracy`` (total correct / total pixels),
    ``iou_background``, ``iou_foreground`` (total intersection / total union
    of that class over the data set), ``miou`` (their mean) and ``map`` (mean
    over images of the per-image AP, see ``segmentation_stats``), plus
    ``num_images``.
    """

    minmax: bool = True
    ap_mode: ApMode = "pooled"
    correct: int = 0
    labeled: int = 0
    intersection: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
    union: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(2, np.int64))
    ap: list[np.ndarray] = dataclasses.field(default_factory=list)

    def stats(self, maps, masks) -> dict[str, jax.Array]:
        """The per-image statistics of one batch as device arrays (``segmentation_stats`` with this
        accumulator's settings); nothing waits for them: ``add`` them once they are on the host."""
        return segmentation_stats(maps, masks, minmax=self.minmax, ap_mode=self.ap_mode)

    def add(self, stats, *, count: int | None = None) -> dict[str, np.ndarray]:
        """Adds per-image statistics (``stats``; device or host arrays) of the first ``count`` images
        (the rest is padding); returns them as host arrays."""
        stats = {k: np.asarray(v)[:count] for k, v in stats.items()}
        self.correct += int(stats["correct"].astype(np.int64).sum())
        self.labeled += int(stats["labeled"].astype(np.int64).sum())
        self.intersection += stats["intersection"].astype(np.int64).sum(0)
        self.union += stats["union"].astype(np.int64).sum(0)
        self.ap.append(stats["ap"].astype(np.float64))
        return stats

    def update(self, maps, masks, *, count: int | None = None) -> dict[str, np.ndarray]:
        """Adds one batch; returns its per-image statistics (host arrays).

        ``count``: add only the first ``count`` images (the rest is padding); the statistics
        are computed on the whole batch, so that ``segmentation_stats`` keeps one compiled shape.
        """
        return self.add(self.stats(maps, masks), count=count)

    @property
    def num_images(self) -> int:
        return int(sum(map(len, self.ap)))

    def result(self) -> dict[str, float]:
        if not self.ap:
            raise ValueError("no batches accumulated")
        eps = np.spacing(1.0)  # the reference's guard against an empty union
        iou = self.intersection / (eps + self.union)
        return {
            "pixel_accuracy": 100.0 * self.correct / (eps + self.labeled),
            "iou_background": 100.0 * float(iou[0]),
            "iou_foreground": 100.0 * float(iou[1]),
            "miou": 100.0 * float(iou.mean()),
            "map": 100.0 * float(np.concatenate(self.ap).mean()),
            "num_images": self.num_images,
        }
