"""How far the official and exact modes differ on the five sample photos (random Vim-T weights,
the same model as the parity tests). Needs ../shared/data/images (the development workspace).

    python benchmarks/modes_diff.py
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from convert.checkpoint import load_checkpoint  # noqa: E402
from mamba_jax import preprocess, vim_tiny  # noqa: E402
from tests.parity.test_parity import _reference  # noqa: E402
from xai import explain  # noqa: E402
from xai.methods import METHODS  # noqa: E402


def minmax(m):
    lo, hi = m.min(axis=(1, 2), keepdims=True), m.max(axis=(1, 2), keepdims=True)
    return (m - lo) / (hi - lo)


def main():
    paths = sorted((ROOT.parent / "shared" / "data" / "images").glob("*.jpg"))
    if not paths:
        sys.exit("../shared/data/images is absent")
    config = vim_tiny()
    _, params = load_checkpoint(_reference(config, 1).state_dict(), variant=config)
    x = np.stack([preprocess(p, config) for p in paths])
    out = {}
    for method in METHODS:
        a = minmax(np.asarray(explain(config, params, x, method, mode="exact")))
        b = minmax(np.asarray(explain(config, params, x, method, mode="official")))
        out[method] = dict(max_abs_diff_minmax_scaled=float(np.abs(a - b).max()),
                           mean_abs_diff_minmax_scaled=float(np.abs(a - b).mean()),
                           pearson_per_image=[round(float(np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1]), 3)
                                              for i in range(len(x))])
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
