"""The fused Pallas selective scan (interpret mode, CPU) against the lax.scan reference.

Tolerances (float32): forward 1e-5 of max |y| (different summation order only);
gradients 1e-4 of max |grad| per input (reductions over batch, time and channels in
a different order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from mamba_jax.pallas_scan import selective_scan_pallas, selective_scan_ref

jax.config.update("jax_enable_x64", False)

NAMES = ("u", "dt", "A", "B", "C", "D", "dt_bias", "z")
E = 40  # not a multiple of any block_e used below


def make_inputs(seed, Bsz, L, E, N, dt_shift=-1.0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    u = normal(Bsz, L, E)
    dt = normal(Bsz, L, E) + np.float32(dt_shift)
    A = -np.exp(normal(E, N))
    B = normal(Bsz, L, N)
    C = normal(Bsz, L, N)
    D = normal(E)
    dt_bias = np.float32(0.5) * normal(E)
    z = normal(Bsz, L, E)
    return [u, dt, A, B, C, D, dt_bias, z]


def vjp_both(args, has_z, ct, **kw):
    """Cotangent pulled back through the kernel and through the reference (both jitted)."""
    n = 8 if has_z else 7

    def kernel(*a):
        return selective_scan_pallas(*a[:7], a[7] if has_z else None, interpret=True, **kw)

    def ref(*a):
        return selective_scan_ref(*a[:7], a[7] if has_z else None)

    @jax.jit
    def run(*a):
        yk, pull_k = jax.vjp(kernel, *a)
        yr, pull_r = jax.vjp(ref, *a)
        return yk, yr, pull_k(ct), pull_r(ct)

    return run(*args[:n])


@pytest.mark.parametrize("L,N,has_z,block_e", [(13, 16, True, 16), (37, 4, False, 8),
                                               (37, 16, False, 32)])
def test_forward_matches_reference(L, N, has_z, block_e):
    args = make_inputs(L * 100 + N, 2, L, E, N)
    z = args[7] if has_z else None
    y = jax.jit(lambda *a: selective_scan_pallas(*a, block_e=block_e, interpret=True))(*args[:7], z)
    y_ref = selective_scan_ref(*args[:7], z)
    assert y.shape == (2, L, E) and y.dtype == jnp.float32
    diff = float(jnp.max(jnp.abs(y - y_ref)))
    assert diff <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(y_ref)))), diff
    assert_close(y, y_ref, rtol_of_max=1e-5, scale_floor=1e-30, name="y")


@pytest.mark.parametrize(
    "L,N,has_z,block_e,chunk,save_states",
    [(13, 16, True, 16, 4, False),    # several chunks, first one partial (13 = 4*4 - 3)
     (37, 4, False, 8, 16, True),     # forward-saved checkpoints, partial chunk
     (37, 16, True, 16, 64, False),   # one chunk longer than L
     (13, 5, False, 32, 8, False)],   # N padded to 8, one partial E block of 32
)
def test_gradients_match_reference(L, N, has_z, block_e, chunk, save_states):
    args = make_inputs(L + N, 2, L, E, N)
    ct = np.random.default_rng(7).normal(size=(2, L, E)).astype(np.float32)
    y, y_ref, grads, grads_ref = vjp_both(args, has_z, ct, block_e=block_e, chunk=chunk,
                                          save_states=save_states)
    assert_close(y, y_ref, rtol_of_max=1e-5, scale_floor=1e-30, name="y")
    assert len(grads) == (8 if has_z else 7)
    for name, g, g_ref in zip(NAMES[: len(grads)], grads, grads_ref, strict=True):
        assert_close(g, g_ref, rtol_of_max=1e-4, scale_floor=1e-30, name=f"d{name}")


def test_extreme_dt_is_finite_and_matches():
    L, N = 37, 16
    args = make_inputs(3, 2, L, E, N)
    # dt + bias spans softplus's linear regime (exp(delta*A) underflows to 0) and its
    # exponentially small regime (delta ~ 1e-26, h barely moves), mixed along time.
    pattern = np.array([60.0, -60.0, 15.0, -15.0, 0.0, 90.0, -90.0], np.float32)
    args[1] = args[1] * np.float32(0.1) + np.resize(pattern, (L,))[None, :, None]
    ct = np.random.default_rng(8).normal(size=(2, L, E)).astype(np.float32)
    y, y_ref, grads, grads_ref = vjp_both(args, True, ct, block_e=16, chunk=8)
    assert_close(y, y_ref, rtol_of_max=1e-5, scale_floor=1e-30, name="y")
    for name, g, g_ref in zip(NAMES[: len(grads)], grads, grads_ref, strict=True):
        assert np.all(np.isfinite(np.asarray(g_ref))), name
        assert_close(g, g_ref, rtol_of_max=1e-4, scale_floor=1e-30, name=f"d{name}")


def test_rejects_bad_block_and_shapes():
    args = make_inputs(0, 1, 5, 8, 4)
    with pytest.raises(ValueError, match="power of two"):
        selective_scan_pallas(*args[:7], block_e=12, interpret=True)
    with pytest.raises(ValueError):
        selective_scan_pallas(args[0], args[1], args[2][:, :3], *args[3:7], interpret=True)
