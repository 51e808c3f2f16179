"""GPU check and benchmark of the fused Pallas selective scan (run on the H200).

    python benchmarks/scan_gpu_check.py

1. Correctness of the compiled (non-interpret) Triton kernels, forward and VJP, against
   ``selective_scan_ref`` at B=32, L=197, E=384, N=16 (with and without z).
2. Forward sweep of block_e x num_warps at B=128, E=384 (run before the timing table
   because it is cheap and the most useful for choosing defaults).
3. Timing (median of 20 runs after warm-up) of forward and forward+backward for the
   kernel, the sequential ``lax.scan`` reference and a ``lax.associative_scan`` version,
   for B in (1, 32, 128) and E in (384, 768).

Every configuration is guarded: a failure is printed and the script continues.
Designed to finish in under 3 minutes (later sections are skipped past a time budget).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from mamba_jax.pallas_scan import selective_scan_pallas, selective_scan_ref  # noqa: E402

T_START = time.perf_counter()
BUDGET_S = float(os.environ.get("SCAN_CHECK_BUDGET_S", "165"))
L_SEQ, N_STATE = 197, 16
NAMES = ("u", "dt", "A", "B", "C", "D", "dt_bias", "z")


def log(*a):
    print(*a, flush=True)


def elapsed():
    return time.perf_counter() - T_START


def selective_scan_assoc(u, dt, A, B, C, D, dt_bias, z=None):
    """Parallel-prefix version over the full [B, L, E, N] state (lax.associative_scan)."""
    delta = jax.nn.softplus(dt + dt_bias)
    dA = jnp.exp(delta[..., None] * A)  # [B, L, E, N]
    dBu = (delta * u)[..., None] * B[:, :, None, :]

    def combine(a, b):
        return a[0] * b[0], b[0] * a[1] + b[1]

    _, h = lax.associative_scan(combine, (dA, dBu), axis=1)
    y = jnp.einsum("blen,bln->ble", h, C) + D * u
    if z is not None:
        y = y * jax.nn.silu(z)
    return y


def make_inputs(Bsz, L, E, N, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *s: rng.normal(size=s).astype(np.float32)
    args = [normal(Bsz, L, E), normal(Bsz, L, E) - 1.0, -np.exp(normal(E, N)), normal(Bsz, L, N),
            normal(Bsz, L, N), normal(E), 0.5 * normal(E), normal(Bsz, L, E)]
    return [jnp.asarray(a) for a in args]


def median_ms(fn, args, reps=20, warmup=2):
    for _ in range(warmup):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
    if time.perf_counter() - t > 0.25:  # very slow baseline: fewer runs, stay in budget
        reps = 5
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return 1e3 * statistics.median(ts)


def kernel_fn(**kw):
    return lambda u, dt, A, B, C, D, bias, z: selective_scan_pallas(u, dt, A, B, C, D, bias, z, **kw)


def fwd_bwd(fn):
    """jit(value_and_grad) of <fn(...), ct> w.r.t. every input."""

    def loss(args, ct):
        return jnp.sum(fn(*args) * ct)

    g = jax.jit(jax.value_and_grad(loss))
    return lambda *args: g(args[:-1], args[-1])


# --------------------------------------------------------------------------------------
def check_correctness():
    log("\n== 1. correctness: compiled kernel vs selective_scan_ref (B=32, L=197, E=384, N=16)")
    args = make_inputs(32, L_SEQ, 384, N_STATE, seed=1)
    ct = jnp.asarray(np.random.default_rng(2).normal(size=(32, L_SEQ, 384)).astype(np.float32))
    for has_z in (True, False):
        for kw in (dict(), dict(save_states=True), dict(block_e=64, num_warps=4)):
            tag = f"z={has_z} {kw or 'defaults'}"
            try:
                n = 8 if has_z else 7

                def kern(*a, kw=kw, has_z=has_z):
                    return selective_scan_pallas(*a[:7], a[7] if has_z else None, **kw)

                def ref(*a, has_z=has_z):
                    return selective_scan_ref(*a[:7], a[7] if has_z else None)

                @jax.jit
                def both(*a, kern=kern, ref=ref):
                    yk, pk = jax.vjp(kern, *a)
                    yr, pr = jax.vjp(ref, *a)
                    return (yk,) + pk(ct), (yr,) + pr(ct)

                outk, outr = both(*args[:n])
                worst = 0.0
                parts = []
                for name, a, b in zip(("y",) + tuple("d" + s for s in NAMES), outk, outr, strict=False):
                    diff = float(jnp.max(jnp.abs(a - b)))
                    rel = diff / max(float(jnp.max(jnp.abs(b))), 1e-30)
                    finite = bool(jnp.all(jnp.isfinite(a)))
                    worst = max(worst, rel)
                    parts.append(f"{name}: abs {diff:.2e} rel {rel:.2e}{'' if finite else ' NONFINITE'}")
                verdict = "OK" if worst < 1e-4 else "MISMATCH"
                log(f"[{verdict}] {tag}: worst rel-to-max {worst:.2e}")
                for p in parts:
                    log("    " + p)
            except Exception as e:  # noqa: BLE001
                log(f"[FAIL] {tag}: {type(e).__name__}: {e}")
                traceback.print_exc()
                sys.stderr.flush()


# --------------------------------------------------------------------------------------
def bench_impls():
    log("\n== 3. timing, median of 20 (ms), L=197, N=16, with z")
    log(f"{'B':>4} {'E':>4} {'impl':<22} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd GB/s':>9}")
    impls = {
        "pallas(be=32)": kernel_fn(),
        "pallas(be=32,save)": kernel_fn(save_states=True),
        "pallas(be=64,w=4)": kernel_fn(block_e=64, num_warps=4),
        "ref lax.scan": selective_scan_ref,
        "associative_scan": selective_scan_assoc,
    }
    for Bsz in (128, 32, 1):  # largest first: the most relevant if the time budget runs out
        for E in (384, 768):
            args = make_inputs(Bsz, L_SEQ, E, N_STATE)
            ct = jnp.ones((Bsz, L_SEQ, E), jnp.float32)
            nbytes = 4 * (4 * Bsz * L_SEQ * E + 2 * Bsz * L_SEQ * N_STATE)  # u, dt, z, y; B, C
            for name, fn in impls.items():
                if elapsed() > BUDGET_S:
                    log(f"{Bsz:>4} {E:>4} {name:<22} skipped (time budget)")
                    continue
                f_ms = b_ms = float("nan")
                err = ""
                try:
                    f_ms = median_ms(jax.jit(fn), args)
                except Exception as e:  # noqa: BLE001
                    err += f" fwd failed: {type(e).__name__}: {str(e)[:200]}"
                try:
                    b_ms = median_ms(fwd_bwd(fn), args + [ct])
                except Exception as e:  # noqa: BLE001
                    err += f" bwd failed: {type(e).__name__}: {str(e)[:200]}"
                gbs = nbytes / (f_ms * 1e-3) / 1e9 if f_ms == f_ms else float("nan")
                log(f"{Bsz:>4} {E:>4} {name:<22} {f_ms:>9.3f} {b_ms:>11.3f} {gbs:>9.1f}{err}")


# --------------------------------------------------------------------------------------
def sweep():
    Bsz, E = 128, 384
    log(f"\n== 2. forward sweep at B={Bsz}, E={E}, L={L_SEQ}, N={N_STATE}, with z: median ms")
    args = make_inputs(Bsz, L_SEQ, E, N_STATE)
    warps = (1, 2, 4, 8)
    log(f"{'block_e':>8} " + " ".join(f"{'warps=' + str(w):>10}" for w in warps))
    for be in (16, 32, 64, 128):
        row = []
        for w in warps:
            if elapsed() > BUDGET_S:
                row.append("skipped")
                continue
            try:
                ms = median_ms(jax.jit(kernel_fn(block_e=be, num_warps=w)), args)
                row.append(f"{ms:.3f}")
            except Exception as e:  # noqa: BLE001
                row.append("FAIL")
                log(f"  block_e={be} num_warps={w} failed: {type(e).__name__}: {str(e)[:300]}")
        log(f"{be:>8} " + " ".join(f"{c:>10}" for c in row))


def main():
    log(f"jax {jax.__version__}, devices {jax.devices()}")
    if jax.default_backend() != "gpu":
        log("WARNING: no GPU backend; the Pallas Triton kernels need one (use interpret=True on CPU).")
    for section in (check_correctness, sweep, bench_impls):
        try:
            section()
        except Exception as e:  # noqa: BLE001
            log(f"section {section.__name__} crashed: {type(e).__name__}: {e}")
            traceback.print_exc()
        log(f"[elapsed {elapsed():.1f} s]")


if __name__ == "__main__":
    main()
