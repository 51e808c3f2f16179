"""Evaluation of the explanation methods with the protocols of SPEC section 5.

- ``evaluate``: streams batches (images in [0, 1], labels or None, masks or None)
  through the classifier and every (method, mode); accumulates the positive and
  negative perturbation tests and, where masks exist, the segmentation test.
  Two baseline rows go through the same metrics: ``random`` (a uniform random map
  per image, fixed seed) and ``center`` (a centred Gaussian blob), so every table
  shows how much better than a trivial map each method is.
- ``Evaluation``: the same, one batch at a time (``step``, then ``summary``), for a
  given ``Classifier`` and ``Explainer`` (plain callables: tests pass fakes);
  ``evaluate`` builds them with ``default_classifier`` and ``default_explainer``.
Writing the results is the application's (``xai.app.report``), and so is the ``evaluate``
command line (``xai.app.evaluate_cli``).

Segmentation settings are those of ``xai.eval.metrics``: maps min-max normalized per
image (it changes only mAP) and the reference's pooled average precision.

Speed: a batch goes to the device once and stays there; the explanations, the perturbation
forwards and the segmentation statistics of every row are dispatched without waiting, and
the batch's results come back to the host in one transfer at its end (before any of them is
counted, every map is checked to be finite). ``evaluate`` reads the data a few batches ahead
in a background thread (``xai.eval.data.prefetch``), copying them to the device there.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mamba_jax.config import VimConfig
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options
from mamba_jax.preprocess import normalize, pad_batch
from mamba_jax.vim import vim_apply
from xai.eval.data import prefetch as prefetch_batches
from xai.eval.metrics import (
    PERTURBATION_STEPS,
    PerturbationAccumulator,
    SegmentationAccumulator,
    perturbation_hits,
)
from xai.methods import METHODS, MODES, explain, method_modes, resolve_start_layer

TESTS = ("perturbation", "segmentation")
TARGETS = ("predicted", "label")
BASELINES = ("random", "center")
DATA_SIZE = 224  # the protocols' image side (SPEC section 5); every data source here yields it
CENTER_SIGMA = 0.25  # std of the "center" blob as a fraction of the grid side

Batch = tuple[Any, Any, Any]  # (images01 [B, H, W, 3], labels [B] or None, masks [B, H, W] or None)


class DataError(ValueError):
    """Data that cannot be evaluated (no images, wrong image size or range, non-finite values,
    labels out of range or missing for target="label", a non-finite model output)."""


def _check_finite(finite, what: str) -> None:
    """A DataError naming the images whose ``finite`` flag (bool [B], host) is False."""
    finite = np.asarray(finite, bool)
    if not finite.all():
        bad = np.flatnonzero(~finite).tolist()
        raise DataError(f"non-finite values (NaN or inf) in {what} of image(s) {bad[:10]} of the batch: no "
                        "result is computed from them (damaged weights or images?)")


@jax.jit
def _finite_rows(values):
    """bool [B]: every value of row b is finite."""
    return jnp.isfinite(values).reshape(values.shape[0], -1).all(axis=1)


@jax.jit
def _pixel_summary(images01):
    """(finite [B], smallest value, largest value) of a batch, in one pass on its device."""
    return _finite_rows(images01), jnp.min(images01), jnp.max(images01)


@jax.jit
def _top1_and_finite(logits):
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), _finite_rows(logits)


_normalize = jax.jit(normalize)


def options_record(options: Options | None) -> dict:
    """``Options`` as JSON-ready settings: dtype name, matmul precision, scan method, remat."""
    o = DEFAULT_OPTIONS if options is None else options
    return {"dtype": "float32" if o.dtype is None else str(o.dtype), "precision": o.precision,
            "scan_method": o.scan_method, "remat": o.remat}


def to_device(batch: Batch) -> Batch:
    """A batch with its float images and bool masks copied to the default device (other parts,
    and anything that is not a NumPy array, as given: ``Evaluation.step`` checks them)."""
    images01, labels, masks = batch
    if isinstance(images01, np.ndarray) and images01.dtype.kind == "f":
        images01 = jax.device_put(images01)
    if isinstance(masks, np.ndarray) and masks.dtype == bool:
        masks = jax.device_put(masks)
    return images01, labels, masks


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
# The classifier and the explainer.

Classifier = Callable[[Any], jax.Array]
"""images normalized float [B, H, W, 3] -> logits float [B, classes]."""

Explainer = Callable[[Any, str, str, jax.Array], jax.Array]
"""(images normalized float [B, H, W, 3], method, mode, targets int [B]) -> maps float [B, gh, gw]."""


def default_classifier(config: VimConfig, params, *, devices: Sequence | None = None,
                       options: Options | None = None) -> Classifier:
    """``vim_apply`` jitted (params an argument, not a closure constant: large models then compile
    quickly); with several ``devices``, ``xai.distributed.predict_sharded`` over them."""
    if devices is not None and len(devices) > 1:
        from xai.distributed import data_mesh, predict_sharded

        mesh = data_mesh(devices)
        return lambda x: predict_sharded(config, params, x, mesh, options=options)
    if options is not None:
        options = options.replace(remat=False)  # remat only matters under a gradient: one compilation
    classify = jax.jit(lambda p, x: vim_apply(config, p, x, options=options))
    return lambda x: classify(params, x)


def default_explainer(config: VimConfig, params, *, start_layer: int | None = None, devices: Sequence | None = None,
                      options: Options | None = None) -> Explainer:
    """``xai.methods.explain`` at ``start_layer``; with several ``devices``,
    ``xai.distributed.explain_sharded`` over them."""
    if devices is not None and len(devices) > 1:
        from xai.distributed import data_mesh, explain_sharded

        mesh = data_mesh(devices)
        return lambda x, method, mode, targets: explain_sharded(config, params, x, method, target=targets,
                                                                start_layer=start_layer, mode=mode, mesh=mesh,
                                                                options=options)
    return lambda x, method, mode, targets: explain(config, params, x, method, target=targets,
                                                    start_layer=start_layer, mode=mode, options=options)


# ---------------------------------------------------------------------------
# The evaluation loop.


class _Row:
    """Accumulators of one table row (a method in one mode, a method without modes, or a baseline)."""

    def __init__(self, method: str, mode: str | None):
        self.method, self.mode = method, mode
        self.positive = PerturbationAccumulator()
        self.negative = PerturbationAccumulator()
        self.segmentation = SegmentationAccumulator()

    @property
    def key(self) -> str:
        return self.method if self.mode is None else f"{self.method}/{self.mode}"

    def dispatch(self, classifier: Classifier, images01, maps, targets, unperturbed, masks, *,
                 perturbation: bool) -> dict:
        """Starts the tests of one padded batch and returns their device arrays (nothing waits):
        images01 float [B, H, W, 3] in [0, 1] and maps float [B, gh, gw], both best on the device,
        targets and unperturbed (the intact images' top-1) int [B], masks bool [B, H, W] or None
        (no segmentation test). ``add`` the result once it is on the host."""
        out = {}
        if perturbation:
            for name, positive in (("positive", True), ("negative", False)):
                out[name] = perturbation_hits(classifier, images01, maps, targets, positive=positive,
                                              unperturbed=unperturbed)
        if masks is not None:
            out["segmentation"] = self.segmentation.stats(maps, masks)
        return out

    def add(self, out: dict, n: int) -> None:
        """Counts the first ``n`` images (the rest is padding) of ``dispatch``'s results."""
        if "positive" in out:
            self.positive.update(np.asarray(out["positive"])[:n])
            self.negative.update(np.asarray(out["negative"])[:n])
        if "segmentation" in out:
            self.segmentation.add(out["segmentation"], count=n)

    def result(self) -> dict:
        def curve(acc: PerturbationAccumulator):
            if not acc.num_images:
                return None
            r = acc.result()
            return {"curve": [float(c) for c in r["curve"]], "auc": float(r["auc"])}

        seg = None
        if self.segmentation.num_images:
            seg = {k: (int(v) if k == "num_images" else float(v)) for k, v in self.segmentation.result().items()}
        return {
            "method": self.method,
            "mode": self.mode,
            "baseline": self.method in BASELINES,
            "perturbation": None if not self.positive.num_images else {
                "positive": curve(self.positive), "negative": curve(self.negative)},
            "segmentation": seg,
        }


class Evaluation:
    """The tests of ``evaluate``, one batch at a time: ``step`` per batch, then ``summary``.

    Args:
      config: the model's shapes (img_size, channels, num_classes, grid) and its name.
      classifier: normalized images -> logits (``Classifier``).
      explainer: (normalized images, method, mode, targets) -> maps (``Explainer``).
      methods, modes, start_layer, tests, target, baselines, seed: as for ``evaluate``
        (``start_layer`` is only recorded in the settings: the explainer applies it).
      options: the numerics the classifier and explainer were built with, recorded in the
        settings (None: the default ``Options()``).

    Every batch is padded to the largest batch size seen so far (the first batch's, where only
    the last batch is short; its last image repeated), so the classifier, the methods and the
    metrics compile once; padded rows are dropped from every statistic.
    """

    def __init__(
        self,
        config: VimConfig,
        classifier: Classifier,
        explainer: Explainer,
        *,
        methods: Sequence[str] = METHODS,
        modes: Sequence[str] = MODES,
        start_layer: int | None = None,
        tests: Sequence[str] = TESTS,
        target: Literal["predicted", "label"] = "predicted",
        baselines: Sequence[str] = BASELINES,
        seed: int = 0,
        options: Options | None = None,
    ):
        for what, given, known in (("method", methods, METHODS), ("mode", modes, MODES), ("test", tests, TESTS),
                                   ("baseline", baselines, BASELINES)):
            unknown = set(given) - set(known)
            if unknown:
                raise ValueError(f"unknown {what}(s) {sorted(unknown)}; expected some of {known}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.config, self.classifier, self.explainer = config, classifier, explainer
        self.methods, self.modes, self.tests, self.baselines = list(methods), list(modes), list(tests), list(baselines)
        self.start_layer = resolve_start_layer(config, start_layer)
        self.target, self.seed, self.options = target, seed, options
        self.rows = ([_Row(m, mode) for m in methods for mode in method_modes(m, modes)]
                     + [_Row(b, None) for b in baselines])
        self.batch_size = 0  # every batch is padded to this size
        self.images = self.labeled = self.correct = self.with_masks = self.batches = 0

    def _check(self, images01, labels, masks):
        """The batch as float32 images and bool masks on the device, int32 labels on the host, or a
        DataError naming what is wrong."""
        config, size = self.config, self.config.img_size
        if not isinstance(images01, jax.Array):
            images01 = np.asarray(images01, np.float32)
        if images01.ndim != 4 or images01.shape[-1] != config.channels:
            raise DataError(f"images must be [B, H, W, {config.channels}] (NHWC), got shape {images01.shape}")
        if images01.shape[1:3] != (size, size):
            raise DataError(f"the data's images are {images01.shape[1]} x {images01.shape[2]} but the model "
                            f"expects {size} x {size} (img_size={size})")
        n = images01.shape[0]
        if n == 0:
            return images01, None, None
        images01 = jnp.asarray(images01, jnp.float32)  # onto the device, once (no copy if there already)
        finite, lo, hi = jax.device_get(_pixel_summary(images01))
        _check_finite(finite, "the pixels")
        lo, hi = float(lo), float(hi)
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
        if self.target == "label" and (labels is None or (labels < 0).any()):
            raise DataError('target="label" needs a ground-truth label for every image; this data has '
                            + ("none" if labels is None else "unknown labels (-1)"))
        if masks is not None and "segmentation" in self.tests:
            if not isinstance(masks, jax.Array):
                masks = np.asarray(masks)
            if masks.shape != images01.shape[:3]:
                raise DataError(f"masks of shape {masks.shape} do not match images of shape {images01.shape}")
            masks = jnp.asarray(masks, bool)
        else:
            masks = None
        return images01, labels, masks

    def _maps(self, row: _Row, x_norm, targets, start: int):
        """Maps float [B, gh, gw] of one row for a padded batch whose first image is number ``start``
        (not waited for: their finiteness is checked with the batch's results)."""
        grid, B = self.config.grid, x_norm.shape[0]
        if row.method not in BASELINES:  # a method without modes (MODELESS) ignores the mode it is given
            return self.explainer(x_norm, row.method, row.mode or self.modes[0], targets)
        if row.method == "random":
            return random_maps(grid, range(start, start + B), self.seed)
        return np.broadcast_to(center_map(grid), (B, *grid))

    def step(self, images01, labels=None, masks=None) -> None:
        """Adds one batch: images01 float [B, H, W, 3] in [0, 1], labels int [B] or None (a label
        < 0 means unknown), masks bool [B, H, W] or None. An empty batch is skipped."""
        images01, labels, masks = self._check(images01, labels, masks)
        n = images01.shape[0]
        if n == 0:
            return
        self.batch_size = pad_to = max(self.batch_size, n)

        x01 = pad_batch(images01, pad_to)  # on the device, as are all the batch's arrays from here
        x_norm = _normalize(x01)
        preds_device, finite = _top1_and_finite(self.classifier(x_norm))
        preds, finite = jax.device_get((preds_device, finite))
        _check_finite(finite[:n], "the model's output")
        targets = preds_device if self.target == "predicted" else jnp.asarray(pad_batch(labels, pad_to))
        masks_p = None if masks is None else pad_batch(masks, pad_to)

        perturbation = "perturbation" in self.tests
        pending = []
        for row in self.rows:
            maps = self._maps(row, x_norm, targets, self.images)
            out = row.dispatch(self.classifier, x01, maps, targets, preds_device, masks_p, perturbation=perturbation)
            out["finite"] = None if row.method in BASELINES else _finite_rows(maps)
            pending.append(out)
        done = jax.device_get(pending)  # the batch's one wait for the device
        for row, out in zip(self.rows, done):
            if out["finite"] is not None:
                what = f"the {row.method} ({row.mode}) map" if row.mode else f"the {row.method} map"
                _check_finite(out["finite"][:n], what)

        if labels is not None:
            known = labels >= 0
            self.labeled += int(known.sum())
            self.correct += int((preds[:n] == labels)[known].sum())
        if masks is not None:
            self.with_masks += n
        for row, out in zip(self.rows, done):
            row.add(out, n)
        self.images += n
        self.batches += 1

    def summary(self) -> dict:
        """The results so far, a JSON-ready dict (see ``evaluate``); a DataError before any image."""
        if self.images == 0:
            raise DataError("no data: the batches held no images")
        config = self.config
        return {
            "model": {"name": config.name, "img_size": config.img_size, "embed_dim": config.embed_dim,
                      "depth": config.depth, "num_classes": config.num_classes},
            "settings": {"methods": list(self.methods), "modes": list(self.modes), "start_layer": self.start_layer,
                         "tests": list(self.tests), "target": self.target, "baselines": list(self.baselines),
                         "seed": self.seed, "batch_size": self.batch_size, "segmentation_minmax": True,
                         "segmentation_ap": "pooled", "center_sigma": CENTER_SIGMA,
                         "options": options_record(self.options)},
            "counts": {"images": self.images, "labeled": self.labeled, "with_masks": self.with_masks,
                       "batches": self.batches},
            "top1_accuracy": 100.0 * self.correct / self.labeled if self.labeled else None,
            "steps": list(PERTURBATION_STEPS),
            "rows": {row.key: row.result() for row in self.rows},
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
    options: Options | None = None,
    classifier: Classifier | None = None,
    explainer: Explainer | None = None,
    prefetch: int = 2,
) -> dict:
    """Runs the perturbation and segmentation tests over ``batches`` (``Evaluation``).

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
      options: the numerics (``mamba_jax.options.Options``) of the default classifier and
        explainer; None = their default.
      classifier, explainer: replace ``default_classifier(config, params, ...)`` and
        ``default_explainer(config, params, ...)`` (``devices`` and ``options`` then apply to
        neither; ``options`` is still recorded in the settings).
      prefetch: read this many batches ahead in a background thread, copying their images and
        masks to the device there (``xai.eval.data.prefetch``); 0 reads each batch when it is due.

    Every batch is padded to the size of the first (repeating its last image), so
    the classifier, the methods and the metrics compile once; padded rows are
    dropped from every statistic (``Evaluation.step``).

    Returns a JSON-ready dict (see ``xai.app.report.write_results``): ``model``, ``settings``,
    ``counts``, ``top1_accuracy`` (percent, None without labels), ``steps`` and
    ``rows``, a dict "method/mode" (or the baseline name) -> ``{"method", "mode",
    "baseline", "perturbation": {"positive"|"negative": {"curve": [10 percents],
    "auc"}} or None, "segmentation": {pixel_accuracy, iou_background,
    iou_foreground, miou, map, num_images} or None}``.
    """
    start_layer = resolve_start_layer(config, start_layer)
    if classifier is None:
        classifier = default_classifier(config, params, devices=devices, options=options)
    if explainer is None:
        explainer = default_explainer(config, params, start_layer=start_layer, devices=devices, options=options)
    run = Evaluation(config, classifier, explainer, methods=methods, modes=modes, start_layer=start_layer,
                     tests=tests, target=target, baselines=baselines, seed=seed, options=options)
    ahead = prefetch_batches(batches, prefetch, transform=to_device)
    try:
        for images01, labels, masks in tqdm(ahead, total=total, unit="batch", disable=not progress,
                                            desc="evaluate"):
            run.step(images01, labels, masks)
    finally:
        ahead.close()  # on an error too: the reading thread stops now, not when the traceback is freed
    return run.summary()
