"""Parity on the GPU: the JAX model and methods (fused Pallas scan for batches >= 8, the
associative scan below) against the pure-PyTorch reference (float32, TF32 off, on the GPU
when torch sees one, else on the CPU).

    python benchmarks/gpu_parity.py --out benchmarks/results/h200/parity.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from convert.checkpoint import load_checkpoint  # noqa: E402
from convert.reference import VimReference, attention_rollout, mamba_attribution, raw_attention  # noqa: E402
from mamba_jax import official, vim_apply  # noqa: E402
from mamba_jax.options import Options  # noqa: E402
from xai.methods import explain  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--models", default="vim_tiny,vim_small")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": jax.devices()[0].device_kind, "reference_device": dev}
    for name in args.models.split(","):
        config = official(name)
        ref = VimReference(config).eval()
        _, params = load_checkpoint(ref.state_dict(), variant=config)
        ref = ref.to(dev)
        x = np.random.default_rng(0).normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
        with torch.no_grad():
            ref_logits = ref(xt).cpu().numpy()
        r = {}
        for scan in ("pallas", "associative"):
            logits = np.asarray(vim_apply(config, params, x, options=Options(scan_method=scan)))
            r[f"logits_{scan}_max_abs_rel_to_max"] = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        for method, fn in (("raw_attention", raw_attention), ("rollout", attention_rollout),
                           ("mamba_attribution", mamba_attribution)):
            ours = np.asarray(explain(config, params, x[:2], method, mode="official"))
            theirs = fn(ref, xt[:2], start_layer=15).detach().cpu().numpy()
            r[f"{method}_official_map_max_abs"] = float(np.abs(ours - theirs).max())
            ours8 = np.asarray(explain(config, params, x, method, mode="official"))  # batch 8: Pallas path
            r[f"{method}_official_map_max_abs_batch{args.batch}_vs_batch2"] = float(np.abs(ours8[:2] - ours).max())
        report[name] = r
        print(name, json.dumps(r, indent=1), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
