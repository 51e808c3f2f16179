"""Evaluation of the explanation methods with the protocols of SPEC section 5.

- ``evaluate``: streams batches (images in [0, 1], labels or None, masks or None)
  through the classifier and every (method, mode); accumulates the positive and
  negative perturbation tests and, where masks exist, the segmentation test.
  Two baseline rows go through the same metrics: ``random`` (a uniform random map
  per image, fixed seed) and ``center`` (a centred Gaussian blob), so every table
  shows how much better than a trivial map each method is.
- ``write_results``: ``results.json``, ``results.md`` and ``perturbation_curves.png``,
  each written atomically (a temporary file in the same folder, then ``os.replace``).
- ``add_parser``: the ``evaluate`` command of ``python -m xai``.

Segmentation settings are those of ``xai.metrics``: maps min-max normalized per
image (it changes only mAP) and the reference's pooled average precision.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mamba_jax.config import VimConfig
from mamba_jax.vim import vim_apply
from xai.data import normalize, pad_batch
from xai.methods import METHODS, MODES, default_start_layer, explain, resolve_start_layer
from xai.metrics import (
    PERTURBATION_STEPS,
    PerturbationAccumulator,
    SegmentationAccumulator,
    perturbation_hits,
    segmentation_stats,
)
from xai.plot import atomic_write, check_output_dir, output_dir, record_outputs

TESTS = ("perturbation", "segmentation")
TARGETS = ("predicted", "label")
BASELINES = ("random", "center")
DATA_SIZE = 224  # the protocols' image side (SPEC section 5); every data source here yields it
CENTER_SIGMA = 0.25  # std of the "center" blob as a fraction of the grid side
RESULTS_JSON, RESULTS_MD, CURVES_PNG = "results.json", "results.md", "perturbation_curves.png"

# Published Vim-S ImageNet figures (SPEC section 5): (AUC+, AUC-, pixel acc, mIoU, mAP).
PAPER_VIM_S = {
    "Raw-Attention": (17.27, 34.03, 67.64, 45.09, 74.88),
    "Attn-Rollout": (18.81, 41.86, 71.01, 51.51, 80.78),
    "Mamba-Attribution": (16.62, 39.63, 74.72, 54.24, 81.70),
}

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


# ---------------------------------------------------------------------------
# Writers.


def _fmt(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _table_values(row: dict) -> tuple[float | None, ...]:
    p, s = row["perturbation"], row["segmentation"]
    auc_pos = p["positive"]["auc"] if p else None
    auc_neg = p["negative"]["auc"] if p else None
    if s is None:
        return auc_pos, auc_neg, None, None, None
    return auc_pos, auc_neg, s["pixel_accuracy"], s["miou"], s["map"]


def markdown_table(results: dict) -> str:
    """The results as a markdown table: one row per method/mode, baselines last."""
    lines = ["| method | mode | AUC+ (lower better) | AUC- (higher better) | pixel acc | mIoU | mAP |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in results["rows"].values():
        name = f"{row['method']} (baseline)" if row["baseline"] else row["method"]
        values = " | ".join(_fmt(v) for v in _table_values(row))
        lines.append(f"| {name} | {row['mode'] or '-'} | {values} |")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """``results.md``: summary, the table, and the published Vim-S figures for reference."""
    m, s, c = results["model"], results["settings"], results["counts"]
    acc = results["top1_accuracy"]
    lines = [
        f"# Explanation evaluation: {m['name'] or 'model'}",
        "",
        f"Model: embed_dim {m['embed_dim']}, depth {m['depth']}, {m['num_classes']} classes, "
        f"{m['img_size']} x {m['img_size']} images. Start layer {s['start_layer']}; "
        f"explained class: {'the ground-truth label' if s['target'] == 'label' else 'the predicted top-1'}.",
        f"Data: {c['images']} images ({c['labeled']} labelled, {c['with_masks']} with masks); "
        f"top-1 accuracy: {'-' if acc is None else f'{acc:.2f}%'}.",
        "",
        markdown_table(results),
        "",
        "AUC: area under the accuracy curve (percent) as 0%, 10%, ..., 90% of the pixels are blacked out, "
        "most relevant first (AUC+) or least relevant first (AUC-). Segmentation (percent): maps upsampled "
        "bilinearly, min-max normalized per image, thresholded at their mean; mAP is the reference's pooled "
        "average precision. Baselines: `random` = a uniform random map per image, `center` = a centred "
        f"Gaussian blob (std {s['center_sigma']} x the grid side).",
        "",
        "## Reference: published figures for a different model and data",
        "",
        "Vim-S on ImageNet, as reported for \"The Hidden Attention of Mamba Models\" (SPEC section 5; not yet "
        "verified against the PDF). They are NOT comparable with the table above unless the model and data "
        "are the same.",
        "",
        "| method (Vim-S, ImageNet) | AUC+ | AUC- | pixel acc | mIoU | mAP |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | " + " | ".join(_fmt(v) for v in vals) + " |" for name, vals in PAPER_VIM_S.items()]
    return "\n".join(lines) + "\n"


def plot_curves(results: dict, path) -> None:
    """Positive and negative perturbation curves, one line per row, as a PNG at ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # An Agg canvas of its own: no pyplot, and the caller's backend is left alone.
    fig = Figure(figsize=(11, 4.2), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    x = 100.0 * np.asarray(results["steps"])
    for ax, test, better in ((axes[0], "positive", "lower"), (axes[1], "negative", "higher")):
        for key, row in results["rows"].items():
            if row["perturbation"] is None:
                continue
            r = row["perturbation"][test]
            style = {"linestyle": "--", "color": "0.5" if row["method"] == "random" else "0.25"} \
                if row["baseline"] else {"marker": "o", "markersize": 3}
            ax.plot(x, r["curve"], label=f"{key} ({r['auc']:.1f})", **style)
        ax.set_title(f"{test} perturbation (AUC {better} is better)")
        ax.set_xlabel("pixels removed (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(-2, 102)
    fig.savefig(path, format="png", dpi=110)  # a path or a binary file


def _non_finite_keys(obj, path: str = "") -> list[str]:
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path or "(value)"]
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _non_finite_keys(v, f"{path}/{key}" if path else str(key))]
    if isinstance(obj, (list, tuple)):
        return [k for i, v in enumerate(obj) for k in _non_finite_keys(v, f"{path}[{i}]")]
    return []


def write_results(results: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md`` and ``perturbation_curves.png`` to ``out_dir``."""
    out = Path(out_dir)
    bad = _non_finite_keys(results)
    if bad:
        raise DataError(f"the results hold non-finite numbers (NaN or inf) at {', '.join(bad[:5])}: not written")
    text_json = json.dumps(results, indent=2, allow_nan=False)  # strict JSON
    paths = {
        "json": atomic_write(out / RESULTS_JSON, lambda f: f.write(text_json.encode())),
        "markdown": atomic_write(out / RESULTS_MD, lambda f: f.write(markdown_report(results).encode())),
    }
    if any(row["perturbation"] for row in results["rows"].values()):
        paths["curves"] = atomic_write(out / CURVES_PNG, lambda f: plot_curves(results, f))
    return paths


# ---------------------------------------------------------------------------
# Command line.


def _parse_methods(text: str) -> tuple[str, ...]:
    if text == "all":
        return METHODS
    names = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad}; expected 'all' or a comma list of {METHODS}")
    return names


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Adds the ``evaluate`` command to ``subparsers``."""
    p = subparsers.add_parser(
        "evaluate", help="perturbation and segmentation tests of the explanation methods",
        description="Perturbation (positive/negative) and segmentation tests of the explanation methods "
                    "(SPEC section 5), with random and centre-blob baselines. Writes results.json, results.md "
                    "and perturbation_curves.png.")
    p.add_argument("--checkpoint", default="demo", metavar="SRC",
                   help="'demo' (the embedded shapes model, default), a checkpoint file, a converted folder or a "
                        "hub id")
    p.add_argument("--variant", default=None, help="official variant name (default: inferred)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--imagenet-seg", metavar="FILE", help="ImageNet-Segmentation gtsegs_ijcv.mat")
    data.add_argument("--imagenet-val", metavar="DIR", help="ImageNet validation folder")
    data.add_argument("--shapes", type=_non_negative_int, metavar="N", help="N procedural shapes images (xai.shapes)")
    p.add_argument("--labels", metavar="FILE", help="labels file for a flat --imagenet-val folder")
    p.add_argument("--seed", type=int, default=1000,
                   help="seed of the --shapes set (default 1000, held out from training seeds)")
    p.add_argument("--methods", type=_parse_methods, default=METHODS, metavar="all|LIST",
                   help=f"'all' (default) or a comma list of {', '.join(METHODS)}")
    p.add_argument("--mode", choices=(*MODES, "both"), default="both", help="method mode (default both)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=_non_negative_int, default=None, help="evaluate only the first N images")
    p.add_argument("--start-layer", type=int, default=None,
                   help="first layer of the methods (default round(15 * depth / 24); 5 for the demo model)")
    p.add_argument("--target", choices=TARGETS, default="predicted",
                   help="class explained and tested: the predicted top-1 (default) or the label")
    p.add_argument("--out", default="out/evaluate", metavar="DIR",
                   help="output folder (default out/evaluate), new or empty: checked before the evaluation starts; "
                        "a rerun into a non-empty folder is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the results of an earlier `mamba-jax evaluate` run in --out (only the files it "
                        "wrote; a folder holding anything else is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--all-devices", action="store_true",
                   help="spread each batch over all local devices (data parallel; batch size per step)")
    p.set_defaults(run=run)
    return p


def _load_model(args) -> tuple[VimConfig, dict, int]:
    if args.checkpoint == "demo":
        from xai.demo import demo_model

        config, params = demo_model()
    else:
        from convert.checkpoint import load_checkpoint

        config, params = load_checkpoint(args.checkpoint, args.variant)
    start = default_start_layer(config) if args.start_layer is None else args.start_layer
    if not 0 <= start < config.depth:
        raise DataError(f"--start-layer {start} is outside the model's {config.depth} layers (0..{config.depth - 1})")
    return config, params, start


def _open_data(args, num_classes: int) -> tuple[str, int, Callable[[], Iterable[Batch]]]:
    """(description, number of images, a function returning the batch iterator); labels that
    the model cannot have are refused here, before any work."""
    bs, limit = args.batch_size, args.limit
    if args.labels and not args.imagenet_val:
        raise DataError("--labels is for --imagenet-val only")
    if args.imagenet_seg:
        from xai.data import ImagenetSegmentation

        ds = ImagenetSegmentation(args.imagenet_seg, size=DATA_SIZE)
        n = len(ds) if limit is None else min(len(ds), limit)
        return f"ImageNet-Segmentation {args.imagenet_seg}", n, lambda: (
            (x, None, m) for x, m in ds.batches(bs, progress=False, limit=limit))
    if args.imagenet_val:
        from xai.data import ImageNetVal

        ds = ImageNetVal(args.imagenet_val, args.labels, size=DATA_SIZE)
        n = len(ds) if limit is None else min(len(ds), limit)
        bad = sorted({lb for _, lb in ds.samples[:n] if not -1 <= lb < num_classes})
        if bad:
            raise DataError(f"label(s) {bad[:10]} in {args.labels or args.imagenet_val} outside the model's "
                            f"{num_classes} classes (0..{num_classes - 1})")
        return f"ImageNet validation folder {args.imagenet_val}", n, lambda: (
            (x, y, None) for x, y, _ in ds.batches(bs, progress=False, limit=limit))
    from xai.shapes import shapes_batches

    n = args.shapes if limit is None else min(args.shapes, limit)
    return f"{n} procedural shapes (seed {args.seed})", n, lambda: (
        (np.asarray(x), np.asarray(y), np.asarray(m))
        for x, y, m in shapes_batches(bs, args.seed, stop=n, img_size=DATA_SIZE, normalized=False))


def run(args) -> int:
    """The ``evaluate`` command; errors propagate to ``python -m xai``'s handler (one line, exit 2).
    The output folder is checked before any work and written only at the end."""
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_dir(args.out, command="evaluate", overwrite=args.overwrite)
    config, params, start_layer = _load_model(args)
    if config.img_size != DATA_SIZE:
        raise DataError(f"the data set's images are {DATA_SIZE} x {DATA_SIZE} but the model expects "
                        f"{config.img_size} x {config.img_size} (img_size={config.img_size})")
    source, n, make_batches = _open_data(args, config.num_classes)
    if n == 0:
        raise DataError(f"no data: {source} has no images to evaluate")
    modes = MODES if args.mode == "both" else (args.mode,)
    print(f"evaluating {config.name or 'model'} on {source}: {n} images, methods {', '.join(args.methods)}, "
          f"modes {', '.join(modes)}, start layer {start_layer}", file=sys.stderr)
    results = evaluate(config, params, make_batches(), methods=args.methods, modes=modes,
                       start_layer=start_layer, target=args.target, progress=not args.no_progress,
                       total=math.ceil(n / args.batch_size),
                       devices=jax.devices() if args.all_devices else None)
    results["settings"]["data"] = source
    results["settings"]["checkpoint"] = args.checkpoint
    print(markdown_table(results))  # first: the results are on the screen even if writing fails
    if results["top1_accuracy"] is not None:
        print(f"top-1 accuracy: {results['top1_accuracy']:.2f}% over {results['counts']['labeled']} images")
    with output_dir(args.out, command="evaluate", overwrite=args.overwrite) as out:
        record_outputs(out, "evaluate", [RESULTS_JSON, RESULTS_MD, CURVES_PNG])
        paths = write_results(results, out)
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0
