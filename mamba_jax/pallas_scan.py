"""Fused selective scan (Mamba S6) as Pallas kernels for the GPU Triton backend.

Recurrence, per batch element b, channel e and state n::

    delta_t[e] = softplus(dt_t[e] + dt_bias[e])
    h_t[e, n]  = exp(delta_t[e] * A[e, n]) * h_{t-1}[e, n] + delta_t[e] * B_t[n] * u_t[e]
    y_t[e]     = sum_n h_t[e, n] * C_t[n] + D[e] * u_t[e]
    out_t[e]   = y_t[e] * silu(z_t[e])          (only when z is given)

Public API
----------
``selective_scan_pallas(u, dt, A, B, C, D, dt_bias, z=None, *, block_e=32,
chunk=16, num_warps=None, num_stages=None, save_states=False,
interpret=False)`` returns ``y`` of shape ``[B, L, E]`` (float32) and is
differentiable (``jax.custom_vjp``) with respect to every array argument.

``selective_scan_ref(u, dt, A, B, C, D, dt_bias, z=None)`` is the kernel's signature over
the sequential oracle ``ssm.scan_sequential``, for the tests.

Kernel design
-------------
* Grid ``(batch, cdiv(E, block_e))``.  Each program owns one batch element and
  ``block_e`` channels, keeps its ``[block_e, N]`` state in registers and walks
  the sequence with a ``lax.fori_loop`` over L (static trip count, so it lowers
  to ``scf.for``).  Per step it loads the ``[block_e]`` row slices of u / dt
  (/ z) and the ``[N]`` rows of B / C, and writes the ``[block_e]`` row of y, so
  every input is read once and y is written once.  The loads of step t+1 are
  issued before the arithmetic of step t (manual one-step prefetch carried
  through the loop) to hide global-memory latency in the sequential loop.
* No BlockSpecs: the kernels receive whole arrays and compute addresses from
  ``pl.program_id`` themselves.  All loads/stores along E are *masked*
  (``e < E``, masked loads return 0), so E need not be a multiple of
  ``block_e`` and nothing is padded or copied.  L is only a loop bound, so any
  L works.  Every loaded/stored tile is ``[block_e]``, ``[N]`` or
  ``[block_e, N]``: ``block_e`` must be a power of two, and when N is not a
  power of two the wrapper zero-pads A / B / C along N (the padded states stay
  exactly 0 and contribute nothing; their gradients are sliced away).
* Everything is float32 (inputs are cast, gradients are cast back by autodiff).
* ``pallas_call`` always gets ``plt.CompilerParams``: that is what selects the
  Triton lowering (without it jax >= 0.10 picks Mosaic GPU,
  ``jax_pallas_use_mosaic_gpu`` defaults to True).  jax 0.11 marks the Pallas
  Triton backend deprecated (a DeprecationWarning), but it still works.

Backward
--------
A second Pallas kernel (same grid) runs the reverse-time adjoint recurrence::

    lam_t = g_t C_t + exp(delta_{t+1} A) lam_{t+1}      (lam = dLoss/dh_t)

It needs h_{t-1} in reverse order.  The sequence is cut into chunks of
``chunk`` steps aligned to the *end* of the sequence (the first chunk starts
at t = L - n_chunks*chunk <= 0; steps with t < 0 are inert: their loads are
masked to 0 so the state stays exactly 0 and their stores are masked off).
The state at every chunk start ("checkpoint", ``[B, nE, n_chunks, block_e,
N]``) comes from the forward kernel:

* ``save_states=False`` (default, memory-lean): the forward pass saves only
  its inputs; the backward first re-runs the forward kernel in a
  checkpoint-only mode (no y written).
* ``save_states=True``: the forward kernel writes the checkpoints alongside y
  and they are kept as residuals (about ``n_chunks*N/L`` times the size of u;
  one forward recomputation less in the backward).

For each chunk, last to first, the backward kernel recomputes the chunk's
states from its checkpoint, writing them to a small per-program workspace
in global memory (``[B, nE, chunk, block_e, N]``; each program touches only
``chunk*block_e*N*4`` bytes of it, so it should mostly stay in L2: to be
confirmed on the GPU), then (after a CTA barrier, ``plt.debug_barrier``)
walks the chunk backwards reading them.
Reductions: dA, dD, d dt_bias are accumulated over time in registers and
written per (batch, E-block) program, summed over batch outside; dB, dC are
written per (E-block, t) and summed over E-blocks outside.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # Triton-specific helpers (masked load/store, compiler params).
    from jax.experimental.pallas import triton as plt
except ImportError:  # pragma: no cover - very old jax
    plt = None

__all__ = ["selective_scan_pallas", "selective_scan_ref"]

_F32 = jnp.float32


# --------------------------------------------------------------------------
# Version guards.
# --------------------------------------------------------------------------
def _masked_load(ref, idx, mask, other=0.0):
    """``ref[idx]`` where ``mask``, ``other`` elsewhere (never dereferenced)."""
    if plt is not None and hasattr(plt, "load"):  # jax >= ~0.7
        return plt.load(ref.at[idx], mask=mask, other=other)
    return pl.load(ref, idx, mask=mask, other=other)  # older jax


def _masked_store(ref, idx, val, mask):
    if plt is not None and hasattr(plt, "store"):
        plt.store(ref.at[idx], val, mask=mask)
    else:
        pl.store(ref, idx, val, mask=mask)


def _compiler_params(num_warps, num_stages):
    # Always pass Triton params: they are what selects the Triton lowering on
    # GPU (with none, jax >= 0.10 picks Mosaic GPU: jax_pallas_use_mosaic_gpu).
    cls = None
    if plt is not None:
        cls = getattr(plt, "CompilerParams", None) or getattr(
            plt, "TritonCompilerParams", None)  # name before jax 0.7
    if cls is None:  # pragma: no cover - very old jax
        return dict(triton=dict(num_warps=num_warps, num_stages=num_stages))
    return cls(num_warps=num_warps, num_stages=num_stages)


def _barrier(interpret):
    # Orders the workspace stores of one phase before the loads of the next
    # (threads of the CTA may own different elements of the [block_e, N]
    # tile).  Interpret mode is sequential and has no rule for it.
    if not interpret:
        plt.debug_barrier()


def _is_pow2(n):
    return n > 0 and (n & (n - 1)) == 0


# --------------------------------------------------------------------------
# Elementwise helpers (overflow-safe, lower to exp/log1p only).
# --------------------------------------------------------------------------
def _softplus(x):
    return jnp.maximum(x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


# --------------------------------------------------------------------------
# Shared per-step pieces.
# --------------------------------------------------------------------------
class _Ctx:
    """Per-program constants and row loaders shared by both kernels."""

    def __init__(self, u_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref,
                 z_ref, extra_refs, *, E, N, block_e):
        self.b = pl.program_id(0)
        self.j = pl.program_id(1)
        self.e0 = self.j * block_e
        self.es = pl.ds(self.e0, block_e)
        lane = lax.broadcasted_iota(jnp.int32, (block_e,), 0)
        self.emask = (self.e0 + lane) < E
        mask2 = jnp.broadcast_to(self.emask[:, None], (block_e, N))
        self.A = _masked_load(A_ref, (self.es, slice(None)), mask2)
        self.D = _masked_load(D_ref, (self.es,), self.emask)
        self.bias = _masked_load(bias_ref, (self.es,), self.emask)
        self.refs = (u_ref, dt_ref, z_ref) + tuple(extra_refs)
        self.B_ref, self.C_ref = B_ref, C_ref
        self.N = N

    def row_mask(self, t, may_be_negative):
        if not may_be_negative:
            return self.emask, t
        return self.emask & (t >= 0), jnp.maximum(t, 0)

    def load(self, t, may_be_negative, refs=None, with_C=True):
        """Row slices at time t: (u, dt, z, *extra, B_t[, C_t]); 0 where
        masked.  ``refs`` overrides the [B, L, E] refs to read."""
        m, tc = self.row_mask(t, may_be_negative)
        rows = tuple(
            None if r is None else _masked_load(r, (self.b, tc, self.es), m)
            for r in (self.refs if refs is None else refs))
        rows += (self.B_ref[self.b, tc, :],)
        if with_C:
            rows += (self.C_ref[self.b, tc, :],)
        return rows

    def discretize(self, dt):
        x = dt + self.bias
        delta = _softplus(x)
        dA = jnp.exp(delta[:, None] * self.A)
        return x, delta, dA


def _pipelined_loop(n, t_of, load_fn, body_fn, carry):
    """for i in range(n): carry = body_fn(t_of(i), load_fn(t_of(i)), carry),
    with the loads of iteration i+1 issued before the body of iteration i."""

    def body(i, c):
        carry, cur = c
        nxt = load_fn(t_of(jnp.minimum(i + 1, n - 1)))
        carry = body_fn(t_of(i), cur, carry)
        return carry, nxt

    first = load_fn(t_of(jnp.int32(0)))
    carry, _ = lax.fori_loop(0, n, body, (carry, first))
    return carry


# --------------------------------------------------------------------------
# Forward kernel.
# --------------------------------------------------------------------------
def _fwd_kernel(*refs, L, E, N, block_e, chunk, n_chunks, has_z, write_y,
                write_ck):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref = (
        next(it) for _ in range(7))
    z_ref = next(it) if has_z else None
    y_ref = next(it) if write_y else None
    ck_ref = next(it) if write_ck else None

    cx = _Ctx(u_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref,
              z_ref if write_y else None, (), E=E, N=N, block_e=block_e)
    neg = write_ck  # chunked time axis starts at L - n_chunks*chunk <= 0

    def body(t, ins, h):
        u, dt, z, Bt = ins[:4]
        _, delta, dA = cx.discretize(dt)
        h = dA * h + (delta * u)[:, None] * Bt[None, :]
        if write_y:
            y = jnp.sum(h * ins[4][None, :], axis=1) + cx.D * u
            if has_z:
                y = y * (z * _sigmoid(z))
            m, tc = cx.row_mask(t, neg)
            _masked_store(y_ref, (cx.b, tc, cx.es), y, m)
        return h

    load = functools.partial(cx.load, may_be_negative=neg, with_C=write_y)
    h0 = jnp.zeros((block_e, N), _F32)
    if not write_ck:
        _pipelined_loop(L, lambda i: i, load, body, h0)
        return

    off = n_chunks * chunk - L

    def chunk_body(c, h):
        ck_ref[cx.b, cx.j, c, :, :] = h  # state before the chunk's 1st step
        t0 = c * chunk - off
        return _pipelined_loop(chunk, lambda k: t0 + k, load, body, h)

    lax.fori_loop(0, n_chunks, chunk_body, h0)


# --------------------------------------------------------------------------
# Backward kernel.
# --------------------------------------------------------------------------
def _bwd_kernel(*refs, L, E, N, block_e, chunk, n_chunks, has_z, interpret):
    it = iter(refs)
    u_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref = (
        next(it) for _ in range(7))
    z_ref = next(it) if has_z else None
    dout_ref = next(it)
    ck_ref = next(it)
    du_ref, ddt_ref = next(it), next(it)
    dz_ref = next(it) if has_z else None
    dA_ref, dD_ref, dbias_ref, dB_ref, dC_ref, ws_ref = (
        next(it) for _ in range(6))

    cx = _Ctx(u_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,
              (dout_ref,), E=E, N=N, block_e=block_e)
    b, j, es = cx.b, cx.j, cx.es
    off = n_chunks * chunk - L
    def fwd_load(t):
        return cx.load(t, True, refs=(u_ref, dt_ref), with_C=False)

    def fwd_body(t0):
        def f(t, ins, h):
            u, dt, Bt = ins
            ws_ref[b, j, t - t0, :, :] = h  # h_{t-1}
            _, delta, dA = cx.discretize(dt)
            return dA * h + (delta * u)[:, None] * Bt[None, :]
        return f

    def bwd_load(t0):
        def f(t):
            return cx.load(t, True) + (ws_ref[b, j, t - t0, :, :],)
        return f

    def bwd_body(t, ins, carry):
        r, dA_acc, dD_acc, db_acc = carry
        u, dt, z, dout, Bt, Ct, h_prev = ins
        x, delta, dA = cx.discretize(dt)
        du_in = delta * u
        h = dA * h_prev + du_in[:, None] * Bt[None, :]
        if has_z:
            y = jnp.sum(h * Ct[None, :], axis=1) + cx.D * u
            sz = _sigmoid(z)
            g = dout * (z * sz)
            dz = dout * y * sz * (1.0 + z * (1.0 - sz))
        else:
            g = dout
        lam = g[:, None] * Ct[None, :] + r
        dC_t = jnp.sum(g[:, None] * h, axis=0)
        dB_t = jnp.sum(lam * du_in[:, None], axis=0)
        lB = jnp.sum(lam * Bt[None, :], axis=1)
        lah = lam * dA * h_prev
        ddelta = jnp.sum(lah * cx.A, axis=1) + u * lB
        ddt = ddelta * _sigmoid(x)
        du = delta * lB + cx.D * g

        m, tc = cx.row_mask(t, True)
        _masked_store(du_ref, (b, tc, es), du, m)
        _masked_store(ddt_ref, (b, tc, es), ddt, m)
        if has_z:
            _masked_store(dz_ref, (b, tc, es), dz, m)
        nmask = jnp.broadcast_to(t >= 0, (N,))
        _masked_store(dB_ref, (b, j, tc, slice(None)), dB_t, nmask)
        _masked_store(dC_ref, (b, j, tc, slice(None)), dC_t, nmask)
        return (dA * lam, dA_acc + delta[:, None] * lah, dD_acc + g * u,
                db_acc + ddt)

    def chunk_body(cc, carry):
        c = n_chunks - 1 - cc
        t0 = c * chunk - off
        h = ck_ref[b, j, c, :, :]
        _pipelined_loop(chunk, lambda k: t0 + k, fwd_load, fwd_body(t0),
                        h)
        _barrier(interpret)
        carry = _pipelined_loop(chunk, lambda k: t0 + chunk - 1 - k,
                                bwd_load(t0), bwd_body, carry)
        _barrier(interpret)
        return carry

    zeros_en = jnp.zeros((block_e, N), _F32)
    zeros_e = jnp.zeros((block_e,), _F32)
    _, dA_acc, dD_acc, db_acc = lax.fori_loop(
        0, n_chunks, chunk_body, (zeros_en, zeros_en, zeros_e, zeros_e))

    mask2 = jnp.broadcast_to(cx.emask[:, None], (block_e, N))
    _masked_store(dA_ref, (b, es, slice(None)), dA_acc, mask2)
    _masked_store(dD_ref, (b, es), dD_acc, cx.emask)
    _masked_store(dbias_ref, (b, es), db_acc, cx.emask)


# --------------------------------------------------------------------------
# pallas_call wrappers.
# --------------------------------------------------------------------------
def _dims(args, block_e, chunk):
    """(B, L, E, N, E-blocks, time chunks) of the scan's arguments (u, dt, A, ...)."""
    Bsz, L, E = args[0].shape
    return Bsz, L, E, args[2].shape[1], pl.cdiv(E, block_e), pl.cdiv(L, chunk)


def _run_fwd(cfg, args, *, write_y, write_ck):
    block_e, chunk, num_warps, num_stages, interpret, has_z = cfg
    Bsz, L, E, N, nE, n_chunks = _dims(args, block_e, chunk)
    out_shape = []
    if write_y:
        out_shape.append(jax.ShapeDtypeStruct((Bsz, L, E), _F32))
    if write_ck:
        out_shape.append(
            jax.ShapeDtypeStruct((Bsz, nE, n_chunks, block_e, N), _F32))
    kernel = functools.partial(
        _fwd_kernel, L=L, E=E, N=N, block_e=block_e, chunk=chunk,
        n_chunks=n_chunks, has_z=has_z, write_y=write_y, write_ck=write_ck)
    outs = pl.pallas_call(
        kernel, grid=(Bsz, nE), out_shape=out_shape, interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages),
    )(*args)
    return tuple(outs)


def _run_bwd(cfg, args, dout, ck):
    block_e, chunk, num_warps, num_stages, interpret, has_z = cfg
    Bsz, L, E, N, nE, n_chunks = _dims(args, block_e, chunk)
    sds = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    out_shape = [sds(Bsz, L, E), sds(Bsz, L, E)]
    if has_z:
        out_shape.append(sds(Bsz, L, E))
    out_shape += [sds(Bsz, E, N), sds(Bsz, E), sds(Bsz, E),
                  sds(Bsz, nE, L, N), sds(Bsz, nE, L, N),
                  sds(Bsz, nE, chunk, block_e, N)]  # last: workspace
    kernel = functools.partial(
        _bwd_kernel, L=L, E=E, N=N, block_e=block_e, chunk=chunk,
        n_chunks=n_chunks, has_z=has_z, interpret=interpret)
    outs = pl.pallas_call(
        kernel, grid=(Bsz, nE), out_shape=out_shape, interpret=interpret,
        compiler_params=_compiler_params(num_warps, num_stages),
    )(*args, dout, ck)
    outs = list(outs[:-1])
    du, ddt = outs.pop(0), outs.pop(0)
    dz = outs.pop(0) if has_z else None
    dA_p, dD_p, db_p, dB_p, dC_p = outs
    grads = (du, ddt, dA_p.sum(0), dB_p.sum(1), dC_p.sum(1), dD_p.sum(0),
             db_p.sum(0))
    return grads + ((dz,) if has_z else ())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(cfg, save_states, *args):
    return _run_fwd(cfg, args, write_y=True, write_ck=False)[0]


def _scan_fwd(cfg, save_states, *args):
    if save_states:
        y, ck = _run_fwd(cfg, args, write_y=True, write_ck=True)
    else:
        (y,), ck = _run_fwd(cfg, args, write_y=True, write_ck=False), None
    return y, (args, ck)


def _scan_bwd(cfg, save_states, res, dout):
    args, ck = res
    if ck is None:
        (ck,) = _run_fwd(cfg, args, write_y=False, write_ck=True)
    return _run_bwd(cfg, args, dout.astype(_F32), ck)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_pallas(u, dt, A, B, C, D, dt_bias, z=None, *, block_e=32,
                          chunk=16, num_warps=None, num_stages=None,
                          save_states=False, interpret=False):
    """Fused selective scan. Shapes: u, dt, z [B, L, E]; A [E, N]; B, C
    [B, L, N]; D, dt_bias [E].  Returns y [B, L, E] float32.

    block_e: channels per program (power of two; E need not be a multiple).
    chunk: time steps per backward chunk (checkpoint spacing).
    num_warps / num_stages: Triton compiler parameters (None = defaults).
    save_states: keep per-chunk states from the forward pass as residuals
      instead of recomputing them in the backward pass.
    interpret: run the kernels in Pallas interpret mode (CPU testing).
    """
    if not _is_pow2(block_e):
        raise ValueError(f"block_e must be a power of two, got {block_e}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    Bsz, L, E = u.shape
    N = A.shape[1]
    if dt.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("u, dt (and z) must share the shape [B, L, E]")
    if A.shape != (E, N) or B.shape != (Bsz, L, N) or C.shape != (Bsz, L, N):
        raise ValueError("A must be [E, N] and B, C [B, L, N]")
    if D.shape != (E,) or dt_bias.shape != (E,):
        raise ValueError("D and dt_bias must be [E]")
    f32 = lambda x: jnp.asarray(x, _F32)
    u, dt, A, B, C, D, dt_bias = map(f32, (u, dt, A, B, C, D, dt_bias))
    Np = 1 << max(0, math.ceil(math.log2(N)))
    if Np != N:  # pad the state dim to a power of two with inert zeros
        pad = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Np - N)])
        A, B, C = pad(A), pad(B), pad(C)
    args = (u, dt, A, B, C, D, dt_bias)
    if z is not None:
        args += (f32(z),)
    cfg = (int(block_e), int(chunk), num_warps, num_stages, bool(interpret),
           z is not None)
    return _scan(cfg, bool(save_states), *args)


# --------------------------------------------------------------------------
# Reference.
# --------------------------------------------------------------------------
def selective_scan_ref(u, dt, A, B, C, D, dt_bias, z=None):
    """The kernel's signature over the project's one oracle, ``ssm.scan_sequential`` (vmapped
    over the batch): softplus(dt + dt_bias), the sequential scan, the D skip, the gate."""
    from mamba_jax import ssm

    f32 = lambda x: jnp.asarray(x, _F32)
    u, dt, A, B, C, D, dt_bias = map(f32, (u, dt, A, B, C, D, dt_bias))
    delta = jax.nn.softplus(dt + dt_bias)  # [B, L, E]
    y = jax.vmap(ssm.scan_sequential, in_axes=(0, 0, None, 0, 0, None))(u, delta, A, B, C, D)
    if z is not None:
        y = y * jax.nn.silu(f32(z))
    return y
