"""Effect of the bfloat16 projections on the demo model: logits and maps against float32.

    python benchmarks/bf16_effect.py        # runs on a CPU: about 3 minutes on 2 cores
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from mamba_jax import normalize, vim_apply  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from xai import explain  # noqa: E402
from xai.app.demo import DEMO_START_LAYER, demo_model  # noqa: E402
from xai.eval.shapes import shapes_dataset01  # noqa: E402
from xai.methods import METHODS, MODES  # noqa: E402


def main():
    config, params = demo_model()
    images01, labels, _ = shapes_dataset01(64, seed=1000)
    x = normalize(images01)
    l32 = vim_apply(config, params, x)
    l16 = vim_apply(config, params, x, options=Options(dtype=jnp.bfloat16))
    report = {
        "logits_max_abs_diff_rel_to_max": float(jnp.abs(l32 - l16).max() / jnp.abs(l32).max()),
        "top1_agreement": float((l32.argmax(-1) == l16.argmax(-1)).mean()),
        "accuracy_f32": float((l32.argmax(-1) == labels).mean()),
        "accuracy_bf16": float((l16.argmax(-1) == labels).mean()),
    }
    for method in METHODS:
        for mode in MODES:
            a = explain(config, params, x[:8], method, start_layer=DEMO_START_LAYER, mode=mode)
            b = explain(config, params, x[:8], method, start_layer=DEMO_START_LAYER, mode=mode,
                        options=Options(dtype=jnp.bfloat16))
            report[f"{method}/{mode} max |map diff| / max map"] = float(jnp.abs(a - b).max() / jnp.abs(a).max())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
