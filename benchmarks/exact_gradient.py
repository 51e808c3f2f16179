"""Which gradient should weigh layer l in the exact Mamba-Attribution? Measured, not guessed.

    python benchmarks/exact_gradient.py --n-eval 64 512 --out benchmarks/results/exact_gradient

"output": d logit / d r_{l+1}, the gradient at the output of layer l's mixer (what the official
  code's fused add + norm hook sees, and how transformer attribution weighs an attention map);
"input":  d logit / d r_l, the gradient entering layer l's norm.
Both on the embedded demo model, held-out procedural shapes (seed 1000, the demo job's set),
perturbation (AUC+ lower better, AUC- higher better) and segmentation (pixel accuracy, mIoU,
mAP). Prints a markdown table and writes it with the JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import xai.methods as methods  # noqa: E402
from mamba_jax.files import atomic_write  # noqa: E402
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS  # noqa: E402
from xai.app.demo import DEMO_START_LAYER, demo_model  # noqa: E402
from xai.eval.evaluate import evaluate  # noqa: E402
from xai.eval.shapes import shapes_batches  # noqa: E402

CHOICES = ("output", "input")


def measure(config, params, which: str, n_eval: int, batch_size: int, seed: int) -> dict:
    def explainer(images, method, mode, targets):
        # what xai.explain runs for mamba_attribution (checks aside), with the private switch bound
        return methods._explain(config, params, images, targets, method=method, start_layer=DEMO_START_LAYER,
                                mode=mode, budget=methods.DEFAULT_BUDGET, options=DEFAULT_OPTIONS,
                                exact_gradient=which)

    batches = ((np.asarray(x), np.asarray(y), np.asarray(m))
               for x, y, m in shapes_batches(batch_size, seed, stop=n_eval, normalized=False))
    t0 = time.perf_counter()
    r = evaluate(config, params, batches, methods=["mamba_attribution"], modes=["exact"], baselines=(),
                 start_layer=DEMO_START_LAYER, progress=False, explainer=explainer)
    seconds = time.perf_counter() - t0
    row = r["rows"]["mamba_attribution/exact"]
    p, s = row["perturbation"], row["segmentation"]
    return {"gradient": which, "n_eval": n_eval, "auc_pos": p["positive"]["auc"], "auc_neg": p["negative"]["auc"],
            "pixel_accuracy": s["pixel_accuracy"], "miou": s["miou"], "map": s["map"], "seconds": seconds}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-eval", type=int, nargs="+", default=[64])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    config, params = demo_model()
    rows = [measure(config, params, w, n, args.batch_size, args.seed) for n in args.n_eval for w in CHOICES]
    lines = ["| images | gradient weighing layer l | AUC+ (lower better) | AUC- (higher better) | AUC- - AUC+ "
             "| pixel acc | mIoU | mAP |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "d logit / d r_{l+1} (output)" if r["gradient"] == "output" else "d logit / d r_l (input)"
        lines.append(f"| {r['n_eval']} | {name} | {r['auc_pos']:.2f} | {r['auc_neg']:.2f} | "
                     f"{r['auc_neg'] - r['auc_pos']:.2f} | {r['pixel_accuracy']:.2f} | {r['miou']:.2f} | "
                     f"{r['map']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("exact_gradient.md", table), ("exact_gradient.json", json.dumps(rows, indent=2,
                                                                                           allow_nan=False))):
            atomic_write(args.out / name, lambda f, text=text: f.write((text + "\n").encode()))


if __name__ == "__main__":
    main()
