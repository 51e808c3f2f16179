"""Evaluation of the explanation methods with the protocols of SPEC section 5.

- ``evaluate``: streams batches (images in [0, 1], labels or None, masks or None)
  through the classifier and every (method, mode); accumulates the positive and
  negative perturbation tests and, where masks exist, the segmentation test.
  Two baseline rows go through the same metrics: ``random`` (a uniform random map
  per image, fixed seed) and ``center`` (a centred Gaussian blob), so every table
  shows how much better than a trivial map each method is.
Writing the results is the application's (``xai.app.report``), and so is the ``evaluate``
command line (``xai.app.evaluate_cli``).

Segmentation settings are those of ``xai.eval.metrics``: maps min-max normalized per
image (it changes only mAP) and the reference's pooled average precision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mamba_jax.config import VimConfig
from mamba_jax.preprocess import normalize, pad_batch
from mamba_jax.vim import vim_apply
from xai.eval.metrics import (
    PERTURBATION_STEPS,
    PerturbationAccumulator,
    SegmentationAccumulator,
    perturbation_hits,
    segmentation_stats,
)
from xai.methods import METHODS, MODES, explain, resolve_start_layer

TESTS = ("perturbation", "segmentation")
TARGETS = ("predicted", "label")
BASELINES = ("random", "center")
DATA_SIZE = 224  # the protocols' image side (SPEC section 5); every data source here yields it
CENTER_SIGMA = 0.25  # std of the "center" blob as a fraction of the grid side

Batch = tuple[Any, Any, Any]  # (images01 [B, H, W, 3], labels [B] or None, masks [B, H, W] or None)


class DataError(ValueError):
    """Data that cannot be evaluated (no images, wrong image size or range, non-finite values,
    labels out of range or missing for target="label", a non-finite model output)."""


def _check_finite(values, what: str) -> None:
    values = np.asarray(values)
    if not np.isfinite(values).all():
        bad = np.flatnonzero(~np.isfinite(values.reshape(values.shape[0], -1)).all(1)).tolist()
        raise DataError(f"non-finite values (NaN or inf) in {what} of image(s) {bad[:10]} of the batch: no "
                        "result is computed from them (damaged weights or images?)")


# ---------------------------------------------------------------------------
# Baseline maps.


def random_maps(grid: tuple[int, int], indices: Sequence[int], seed: int = 0) -> np.ndarray:
    """Uniform [0, 1) maps float32 [B, gh, gw]; image i's map depends only on (seed, i)."""
    return np.stack([np.random.default_rng((seed, int(i))).random(grid, dtype=np.float32) for i in indices])


def center_map(grid: tuple[int, int], sigma: float = CENTER_SIGMA) -> np.ndarray:
    """A Gaussian blob centred on the grid, float32 [gh, gw], std ``sigma`` x each side."""
    gh, gw = grid
    y = np.arange(gh, dtype=np.float64) - (gh - 1) / 2
    x = np.arange(gw, dtype=np.float64) - (gw - 1) / 2
    blob = np.exp(-0.5 * ((y[:, None] / (sigma * gh)) ** 2 + (x[None, :] / (sigma * gw)) ** 2))
    return blob.astype(np.float32)


# ---------------------------------------------------------------------------
# The evaluation loop.


def _add_segmentation(acc: SegmentationAccumulator, maps, masks, n: int) -> None:
    """``acc.update`` on a padded batch, counting only its first ``n`` rows.

    The statistics are computed on the full (padded) batch so that
    ``segmentation_stats`` keeps one compiled shape; the padded rows are cut here.
    """
    stats = segmentation_stats(maps, masks, minmax=acc.minmax, ap_mode=acc.ap_mode)
    stats = {k: np.asarray(v)[:n] for k, v in stats.items()}
    acc.correct += int(stats["correct"].astype(np.int64).sum())
    acc.labeled += int(stats["labeled"].astype(np.int64).sum())
    acc.intersection += stats["intersection"].astype(np.int64).sum(0)
    acc.union += stats["union"].astype(np.int64).sum(0)
    acc.ap.append(stats["ap"].astype(np.float64))


class _Row:
    """Accumulators of one table row (a method in one mode, or a baseline)."""

    def __init__(self, method: str, mode: str | None):
        self.method, self.mode = method, mode
        self.positive = PerturbationAccumulator()
        self.negative = PerturbationAccumulator()
        self.segmentation = SegmentationAccumulator()

    @property
    def key(self) -> str:
        return self.method if self.mode is None else f"{self.method}/{self.mode}"

    def result(self) -> dict:
        def curve(acc: PerturbationAccumulator):
            if not acc.hits:
                return None
            r = acc.result()
            return {"curve": [float(c) for c in r["curve"]], "auc": float(r["auc"])}

        seg = None
        if self.segmentation.ap:
            seg = {k: (int(v) if k == "num_images" else float(v)) for k, v in self.segmentation.result().items()}
        return {
            "method": self.method,
            "mode": self.mode,
            "baseline": self.mode is None,
            "perturbation": None if not self.positive.hits else {
                "positive": curve(self.positive), "negative": curve(self.negative)},
            "segmentation": seg,
        }


def evaluate(
    config: VimConfig,
    params,
    batches: Iterable[Batch],
    *,
    methods: Sequence[str] = METHODS,
    modes: Sequence[str] = MODES,
    start_layer: int | None = None,
    tests: Sequence[str] = TESTS,
    target: Literal["predicted", "label"] = "predicted",
    baselines: Sequence[str] = BASELINES,
    seed: int = 0,
    progress: bool = True,
    total: int | None = None,
    devices: Sequence | None = None,
) -> dict:
    """Runs the perturbation and segmentation tests over ``batches``.

    Args:
      config, params: the classifier.
      batches: yields (images01 float [B, H, W, 3] in [0, 1], labels int [B] or
        None (a label < 0 means unknown), masks bool [B, H, W] or None).
      methods, modes: the explanation methods and modes (every combination is a row).
      start_layer: first layer used by the methods (None: ``default_start_layer(config)``, the
        official 15 of 24 scaled to the model's depth).
      tests: any of "perturbation", "segmentation" (the latter only where masks exist).
      target: the class explained and tested: "predicted" (the unperturbed top-1)
        or "label" (the ground truth; every image needs one).
      baselines: baseline rows, any of "random", "center".
      seed: seed of the random baseline.
      progress: show a tqdm bar over batches; ``total``: the number of batches, for the bar.
      devices: spread every batch over these devices (``xai.distributed``); None = one device.

    Every batch is padded to the size of the first (repeating its last image), so
    the classifier, the methods and the metrics compile once; padded rows are
    dropped from every statistic.

    Returns a JSON-ready dict (see ``write_results``): ``model``, ``settings``,
    ``counts``, ``top1_accuracy`` (percent, None without labels), ``steps`` and
    ``rows``, a dict "method/mode" (or the baseline name) -> ``{"method", "mode",
    "baseline", "perturbation": {"positive"|"negative": {"curve": [10 percents],
    "auc"}} or None, "segmentation": {pixel_accuracy, iou_background,
    iou_foreground, miou, map, num_images} or None}``.
    """
    for what, given, known in (("method", methods, METHODS), ("mode", modes, MODES), ("test", tests, TESTS),
                               ("baseline", baselines, BASELINES)):
        unknown = set(given) - set(known)
        if unknown:
            raise ValueError(f"unknown {what}(s) {sorted(unknown)}; expected some of {known}")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    start_layer = resolve_start_layer(config, start_layer)

    # Params are an argument, not a closure constant: large models then compile quickly.
    if devices is not None and len(devices) > 1:
        from xai.distributed import data_mesh, explain_sharded, predict_sharded

        mesh = data_mesh(devices)
        predict: Callable[[jax.Array], jax.Array] = lambda x: predict_sharded(config, params, x, mesh)
        explain_fn = functools.partial(explain_sharded, mesh=mesh)
    else:
        classify = jax.jit(lambda p, x: vim_apply(config, p, x))
        predict = lambda x: classify(params, x)
        explain_fn = explain

    rows = [_Row(m, mode) for m in methods for mode in modes] + [_Row(b, None) for b in baselines]
    size = config.img_size
    pad_to = 0
    n_images = n_labeled = n_correct = n_masks = n_batches = 0

    for images01, labels, masks in tqdm(batches, total=total, unit="batch", disable=not progress,
                                        desc="evaluate"):
        images01 = np.asarray(images01, np.float32)
        if images01.ndim != 4 or images01.shape[-1] != config.channels:
            raise DataError(f"images must be [B, H, W, {config.channels}] (NHWC), got shape {images01.shape}")
        if images01.shape[1:3] != (size, size):
            raise DataError(f"the data's images are {images01.shape[1]} x {images01.shape[2]} but the model "
                            f"expects {size} x {size} (img_size={size})")
        n = images01.shape[0]
        if n == 0:
            continue
        _check_finite(images01, "the pixels")
        lo, hi = float(images01.min()), float(images01.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"images must hold pixels in [0, 1] (before normalization), got {lo:.4g} .. {hi:.4g}"
                            + (": divide 0..255 pixels by 255" if hi > 1.5 else ""))
        labels = None if labels is None else np.asarray(labels)
        if labels is not None:
            if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
                raise DataError(f"labels must be {n} integers (one per image, -1 = unknown), got {labels.dtype} "
                                f"of shape {labels.shape}")
            out_of_range = labels[(labels < -1) | (labels >= config.num_classes)]
            if out_of_range.size:
                raise DataError(f"label(s) {sorted(set(out_of_range.tolist()))[:10]} outside the model's "
                                f"{config.num_classes} classes (0..{config.num_classes - 1}; -1 = unknown)")
            labels = labels.astype(np.int32)
        if target == "label" and (labels is None or (labels < 0).any()):
            raise DataError('target="label" needs a ground-truth label for every image; this data has '
                            + ("none" if labels is None else "unknown labels (-1)"))
        pad_to = max(pad_to, n)

        x01 = pad_batch(images01, pad_to)
        logits = np.asarray(predict(normalize(x01)))
        _check_finite(logits[:n], "the model's output")
        preds = logits.argmax(-1).astype(np.int32)
        if labels is not None:
            known = labels >= 0
            n_labeled += int(known.sum())
            n_correct += int((preds[:n] == labels)[known].sum())
        targets = preds if target == "predicted" else pad_batch(labels, pad_to)
        masks_p = None
        if masks is not None and "segmentation" in tests:
            masks = np.asarray(masks, bool)
            if masks.shape != images01.shape[:3]:
                raise DataError(f"masks of shape {masks.shape} do not match images of shape {images01.shape}")
            masks_p = pad_batch(masks, pad_to)
            n_masks += n

        x_norm = normalize(x01)
        for row in rows:
            if row.mode is None:
                if row.method == "random":
                    maps = random_maps(config.grid, range(n_images, n_images + pad_to), seed)
                else:
                    maps = np.broadcast_to(center_map(config.grid), (pad_to, *config.grid))
            else:
                maps = explain_fn(config, params, x_norm, row.method, target=jnp.asarray(targets),
                                  start_layer=start_layer, mode=row.mode)
                _check_finite(np.asarray(maps)[:n], f"the {row.method} ({row.mode}) map")
            if "perturbation" in tests:
                for acc, positive in ((row.positive, True), (row.negative, False)):
                    hits = perturbation_hits(predict, x01, maps, jnp.asarray(targets), positive=positive,
                                             unperturbed=preds)
                    acc.update(np.asarray(hits)[:n])
            if masks_p is not None:
                _add_segmentation(row.segmentation, maps, masks_p, n)
        n_images += n
        n_batches += 1

    if n_images == 0:
        raise DataError("no data: the batches held no images")
    return {
        "model": {"name": config.name, "img_size": config.img_size, "embed_dim": config.embed_dim,
                  "depth": config.depth, "num_classes": config.num_classes},
        "settings": {"methods": list(methods), "modes": list(modes), "start_layer": start_layer,
                     "tests": list(tests), "target": target, "baselines": list(baselines), "seed": seed,
                     "batch_size": pad_to, "segmentation_minmax": True, "segmentation_ap": "pooled",
                     "center_sigma": CENTER_SIGMA},
        "counts": {"images": n_images, "labeled": n_labeled, "with_masks": n_masks, "batches": n_batches},
        "top1_accuracy": 100.0 * n_correct / n_labeled if n_labeled else None,
        "steps": list(PERTURBATION_STEPS),
        "rows": {row.key: row.result() for row in rows},
    }
