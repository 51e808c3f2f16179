"""The results of ``xai.eval.evaluate`` as files: strict JSON, a markdown report, the curves.

- ``write_results``: ``results.json``, ``results.md`` and ``perturbation_curves.png``, each
  written atomically (``mamba_jax.files.atomic_write``); non-finite numbers are refused.
- ``markdown_table`` / ``markdown_report``: one row per method/mode, baselines last.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from mamba_jax.files import atomic_write
from xai.eval.evaluate import DataError

RESULTS_JSON, RESULTS_MD, CURVES_PNG = "results.json", "results.md", "perturbation_curves.png"

# Published Vim-S ImageNet figures (SPEC section 5): (AUC+, AUC-, pixel acc, mIoU, mAP).
PAPER_VIM_S = {
    "Raw-Attention": (17.27, 34.03, 67.64, 45.09, 74.88),
    "Attn-Rollout": (18.81, 41.86, 71.01, 51.51, 80.78),
    "Mamba-Attribution": (16.62, 39.63, 74.72, 54.24, 81.70),
}


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


