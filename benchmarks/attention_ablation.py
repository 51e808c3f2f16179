"""Where the time of the fused statistics kernel goes (mamba_jax/pallas_attention.py): variants
that leave one stage out, timed at Vim-S's shape (E = 768, L = 197, N = 16, clamp, weight 1/2).

    python benchmarks/attention_ablation.py [--batches 128,32] [--variants default,tf32,...] [--once]

Variants (each traced fresh; the outputs of the ablated ones are wrong on purpose, only timed):
  default   the kernel as shipped (tf32x3 products)
  tf32      one tensor-core pass per product instead of three (the cost of float32 accuracy)
  noexp     the exponentials replaced by their argument (the cost of the special-function unit)
  nodot     the [block, N] x [N, block] product replaced by an outer product of row sums
  noload    every channel reads channel e0's vectors (loop-invariant then: the compiler may hoist the
            tile's whole computation out of the loop, so this bounds the loads' cost from above)
  nostats   the clamped sum alone (``extremes=False``: what the exact rollout needs)
  programs2k  channel groups split until 2112 programs (16 per multiprocessor), not 528
  nocond    the diagonal tiles always factored, no per-channel branch to the direct formula
  nodiag    the diagonal tiles' kernel walks no channel (the off-diagonal kernel's share)
  nooff     the off-diagonal tiles' kernel walks no channel (the diagonal kernel's share)
``--once``: one call of the default variant at the first batch, for a profiler (ncu).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from attention_gpu_check import median_ms  # noqa: E402

from mamba_jax import pallas_attention as pa  # noqa: E402

E, L, N = 768, 197, 16
REFERENCE = dict(precision="ieee", block=32, num_warps=2)  # plain float32 products: the oracle of the checks
VARIANTS = ("default", "tf32", "noexp", "nodot", "noload", "nostats", "nodiag", "nooff",
            "programs2k", "nocond")


def synthetic(Bsz, E=E, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.normal(size=s).astype(np.float32)  # noqa: E731
    out = []
    for _ in range(2):
        out += [np.logaddexp(0.0, normal(Bsz, L, E) - 3.0).astype(np.float32), normal(Bsz, L, N),
                normal(Bsz, L, N), -np.exp(normal(E, N))]
    return [jnp.asarray(a) for a in out]


def patched(variant):
    """(restore, kwargs): monkeypatches of the module for one variant."""
    saved = dict(diag=pa._Tile.diag, programs=pa._TARGET_PROGRAMS, off=pa._Tile.off, load_off=pa._Tile.load_off,
                 dot=pa._dot_nt, kernel=pa._stats_kernel)
    kw = {}
    if variant == "tf32":
        kw["precision"] = "tf32"
    elif variant == "noexp":
        def off(self, vals, C_t, wB_j):
            a, rv, cv, dj = vals
            left = (rv[:, None] * a[None, :]) * C_t
            right = (cv[:, None] * a[None, :]) * (dj[:, None] * wB_j)
            return pa._dot_nt(left, right, self.precision)
        pa._Tile.off = off
    elif variant == "nodot":
        pa._dot_nt = lambda left, right, precision: left.sum(1)[:, None] * right.sum(1)[None, :]
    elif variant == "noload":
        def load_off(self, r, e):
            return saved["load_off"](self, r, 0 * e)
        pa._Tile.load_off = load_off
    elif variant in ("nodiag", "nooff"):  # the other kernel's programs do no channel at all
        skip = "diag" if variant == "nodiag" else "off"

        def kernel(*refs, **kw):
            return saved["kernel"](*refs, **dict(kw, ec=0) if kw["tiles"] == skip else kw)
        pa._stats_kernel = kernel
    elif variant == "programs2k":
        pa._TARGET_PROGRAMS = 2112
    elif variant == "nocond":  # the diagonal tiles always factored (the inputs here never need the fallback)
        def diag(self, r, e, vals, C_t, wB_t, guarded=True):
            a, rv, dj, half = vals
            left = jnp.exp2((rv - half)[:, None] * a[None, :]) * C_t
            right = jnp.exp2((half - rv)[:, None] * a[None, :]) * (dj[:, None] * wB_t)
            return jnp.where(self.tri[r], pa._dot_nt(left, right, self.precision), 0.0)
        pa._Tile.diag = diag
    elif variant == "nostats":
        kw["extremes"] = False

    def restore():
        pa._Tile.off, pa._Tile.load_off, pa._dot_nt = saved["off"], saved["load_off"], saved["dot"]
        pa._stats_kernel = saved["kernel"]
        pa._TARGET_PROGRAMS, pa._Tile.diag = saved["programs"], saved["diag"]
    return restore, kw


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="128,32")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--configs", default="[]", help="JSON list of combined_stats keyword sets, timed after the variants")
    p.add_argument("--once", action="store_true")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (a CPU smoke test)")
    p.add_argument("--channels", type=int, default=E)
    args = p.parse_args(argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    batches = [int(b) for b in args.batches.split(",")]
    if args.once:
        x = synthetic(batches[0], args.channels)
        jax.block_until_ready(pa.combined_stats(*x, weight=0.5, clamp=True, interpret=args.interpret))
        print("once done", flush=True)
        return
    for Bsz in batches:
        x = synthetic(Bsz, args.channels)
        named = [(v, None) for v in args.variants.split(",") if v]
        for variant, extra in named + [(json.dumps(c), c) for c in json.loads(args.configs)]:
            restore, kw = patched(variant) if extra is None else ((lambda: None), dict(extra))
            try:
                kw = {"clamp": True, "interpret": args.interpret, **kw}
                pa._combined_stats.clear_cache()
                t = time.perf_counter()
                fn = lambda *a, kw=kw: pa.combined_stats(*a, weight=0.5, **kw)  # noqa: E731
                ms = median_ms(fn, *x)
                err = ""
                if extra is not None or variant in ("default", "nostats"):
                    pa._combined_stats.clear_cache()
                    ref = jax.jit(lambda *a: pa.combined_stats(*a, weight=0.5, clamp=True, interpret=args.interpret,
                                                               **REFERENCE))(*x)
                    got = fn(*x)
                    err = " error of max: " + " ".join(
                        f"{float(jnp.abs(g - r).max() / jnp.maximum(jnp.abs(r).max(), 1e-30)):.1e}"
                        for g, r in zip(got, ref) if g is not None)
                print(f"batch {Bsz:4d}  {variant:8s} {ms:8.3f} ms per layer{err}  ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            except Exception as e:  # a variant that does not lower is reported, the rest go on
                print(f"batch {Bsz:4d}  {variant:8s} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            finally:
                restore()


if __name__ == "__main__":
    main()
