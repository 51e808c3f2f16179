"""The hidden attention of a bidirectional Mamba layer, tile by tile, as Pallas kernels for the
GPU Triton backend: channel statistics of the combined matrix without the [E, L, L] tensor.

For one image, branch r (0 forward, 1 backward in original positions) and channel d, the hidden
attention (SPEC section 3) is

    alpha_r[d, t, j] = sum_n C_r[t, n] exp(A_r[d, n] seg_r[d, t, j]) delta_r[j, d] B_r[j, n]
    seg_0[t, j] = sum_{k=j+1}^{t} delta_0[k]    (j <= t, else alpha_0 = 0)
    seg_1[t, j] = sum_{k=t}^{j-1} delta_1[k]    (j >= t, else alpha_1 = 0)

(the backward branch computed on the reversed sequence and flipped back: its inputs are flipped
to original positions first, after which it is the upper triangular mirror of the forward one),
and the combined matrix of the mixer is M[d] = w (alpha_0[d] + alpha_1[d]), w the branch weight.

Public API
----------
``combined_stats(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, *, weight, clamp)`` returns what
``xai.hidden_attention.channel_reduced_matrix`` returns: the channel mean of M (of max(M, 0) with
``clamp``) [Bsz, L, L] and its min and max over channels and positions ([Bsz] each;
``extremes=False`` leaves them out, for the exact rollout that needs the mean alone).
``combined_alpha(...)`` returns alpha itself, [Bsz, n_branches, E, L, L] (branch 1 in original
positions), for consumers of the full matrices. Backward inputs are given in scan order (as
``vim_apply(..., capture=True)`` captures them); ``delta_b=None`` for a one-branch model.

Kernel design
-------------
* Positions are cut into blocks of ``block`` (a power of two, at least 16), padded to
  Lp = nb * block with delta = B = C = 0 (padded entries are exactly 0 and left out of min/max).
  The statistics are two kernels, one over the off-diagonal tiles and one over the diagonal
  tiles, so that the lean off-diagonal loop is not held to the registers of the diagonal one
  (occupancy: the loop is bound by the latency of each channel's loads, not by arithmetic).
  Grid ``(Bsz, tiles, split)``: one program per image, (t-block p, j-block q) tile and group of
  ``E / split`` channels (``split`` > 1 only when the batch alone gives too few programs); it walks
  its channels with a ``fori_loop`` and keeps the tile's sum, min and max over channels in
  registers. Only the [block, block] tile of the reduction is ever written.
* Off-diagonal tiles (p != q) hold one branch (p > q forward, p < q backward). Their segment
  sums split at the block edges into seg = rv[t] + cv[j] + gap[p, q] with rv, cv block-local
  prefix / suffix sums and gap the sum of the blocks strictly between; all three are >= 0, so

      exp(A seg) = exp(A rv[t]) * exp(A (cv[j] + gap))      (both factors <= 1: no overflow)

  and the tile of one channel is one [block, N] x [N, block] matrix product of
  left = exp(A rv) C and right = exp(A (cv + gap)) w delta B: 2 block N exponentials per
  channel and tile instead of block^2 N (an underflowing factor only hides a product that is
  itself below float32's range).
* Diagonal tiles (p == q) hold both branches and the diagonal j == t, where the clamp applies
  to the sum of the two. There seg = rv[t] - rv[j] (rv block-local), factored around the
  middle c = tot / 2 of the block's total: exp(A (rv[t] - c)) * exp(-A (rv[j] - c)), each factor
  within exp(+-|A| tot / 2). When max_n |A[d, n]| tot <= ``RMAX`` (150: factors within e^75,
  whose tf32x3 split parts stay normal floats) the channel takes this product (one matrix product
  per branch, the masked triangle's overflow discarded by a select); else it falls back to the
  direct formula, N exponentials per entry. The statistics kernel's main loop has no branch: it
  leaves the flagged channels out (``half`` < 0, decided per image, block and branch in XLA),
  and a second loop walks only those, listed per image and block; the full-matrix kernel
  branches per channel and branch (``lax.cond``).
* rv, cv, gap and the block totals are computed once per layer in XLA as products with 0/1 triangular matrices at
  full float32 precision: sums of positive numbers inside one block (no prefix-sum differences,
  whose cancellation error grows with the position; ``ssm.segment_sums``).
* A is scaled by log2(e) once per layer and the kernels take exp2 (ex2 on the GPU: a few
  instructions fewer per exponential than libdevice's expf).
* The matrix products use Triton's tf32x3 (three tensor-core products, float32 accuracy) on the
  GPU and float32 in interpret mode; ``precision="ieee"`` asks for plain float32 FMAs.
* ``pallas_call`` always gets ``plt.CompilerParams`` (the Triton lowering; as
  ``pallas_scan``); interpret mode runs the same kernels on the CPU, for the tests.

Measured (H200, benchmarks/results/h200/runs/exact_split, README there): against the XLA
formulas, max |diff| / max |reference| <= 2.9e-7 for the statistics and 8.3e-7 for the full
matrices. At Vim-S's shape (E = 768, L = 197), one layer's statistics take 9.0 ms at batch 128
with the defaults (block 32, 1 warp; 7.6 ms for the sum alone), 2.6 ms at batch 32, 0.29 ms at
batch 1; the single kernel with 2 warps before it took 15.4 / 5.7 ms. Found by timing variants
that leave one stage out (``benchmarks/attention_ablation.py``): the per-channel loads' latency,
the diagonal tiles' per-channel branch and the registers it cost every program were the time,
not the arithmetic. ``prefetch`` (the next channel's loads issued first) and ``unroll``
(channels side by side) were slower on the GPU (run exact_sweep, and 10.1 against 8.9 ms for
unroll 2 here) and stay off.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mamba_jax.pallas_scan import _compiler_params, _masked_store

__all__ = ["ATTENTION_METHODS", "DEFAULTS", "RMAX", "combined_alpha", "combined_stats", "resolve_attention"]

_F32 = jnp.float32
RMAX = 150.0  # max_n |A| * (block total of delta) under which a diagonal tile is factored
_LOG2E = math.log2(math.e)  # A is scaled by it once per layer: the kernels take exp2
ATTENTION_METHODS = ("auto", "pallas", "xla")
_TARGET_PROGRAMS = 2112  # 16 per multiprocessor of an H100/H200 (132): below this, split channels
_PRECISIONS = {"tf32x3": lax.DotAlgorithmPreset.TF32_TF32_F32_X3, "ieee": lax.Precision.HIGHEST,
               "tf32": lax.DotAlgorithmPreset.TF32_TF32_F32}


def resolve_attention(method: str) -> str:
    """``"auto"``: the Pallas kernels on a GPU, the XLA formulas elsewhere (the oracle; interpret
    mode is for tests only). Other methods pass."""
    if method not in ATTENTION_METHODS:
        raise ValueError(f"unknown hidden-attention method {method!r}; expected one of {ATTENTION_METHODS}")
    if method != "auto":
        return method
    return "pallas" if jax.default_backend() == "gpu" else "xla"


# --------------------------------------------------------------------------
# Inputs: original positions, padded, block-local sums (XLA, once per layer).
# --------------------------------------------------------------------------
def _pow2_at_least(n, lo):
    return max(lo, 1 << max(0, math.ceil(math.log2(n))))


def _prepare(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, block):
    """Kernel inputs of both branches in original positions (branch axis first):
    d, rv, cv [2, Bsz, E, Lp]; gap [Bsz, E, nb * nb]; half [2, Bsz, E, nb]; A [2, E, Np] (times
    log2(e): the kernels take exp2); B, C [2, Bsz, Lp, Np]. half is half of each block's total,
    the centre of the diagonal tiles' factored exponentials, or -1 where max_n |A| times the total
    exceeds ``RMAX`` (that channel and block take the direct formula)."""
    Bsz, L, E = delta_f.shape
    N = A_f.shape[1]
    nb = -(-L // block)
    Lp, Np = nb * block, _pow2_at_least(N, 16)
    f32 = lambda x: jnp.asarray(x, _F32)
    if delta_b is None:  # one branch: a zero backward branch contributes exactly 0
        delta_b, B_b, C_b, A_b = jnp.zeros_like(delta_f), jnp.zeros_like(B_f), jnp.zeros_like(C_f), A_f
    flip = lambda x: jnp.flip(f32(x), axis=1)  # scan order -> original positions
    d = jnp.stack([f32(delta_f), flip(delta_b)])  # [2, Bsz, L, E]
    d = jnp.pad(jnp.swapaxes(d, -1, -2), [(0, 0)] * 3 + [(0, Lp - L)])  # [2, Bsz, E, Lp]
    blocks = d.reshape(2, Bsz, E, nb, block)
    k = jnp.arange(block)
    le = (k[:, None] <= k[None, :]).astype(_F32)  # le[x, l] = x <= l
    lt = (k[:, None] < k[None, :]).astype(_F32)
    # rv: forward sum_{x <= l} (from the block start, through t), backward sum_{x >= l} (from t
    # to the block end); cv: forward sum_{x > l} (after j, to the block end), backward
    # sum_{x < l} (from the block start, before j)
    hi = lax.Precision.HIGHEST
    rv = jnp.einsum("rbenx,rxl->rbenl", blocks, jnp.stack([le, le.T]), precision=hi).reshape(2, Bsz, E, Lp)
    cv = jnp.einsum("rbenx,rxl->rbenl", blocks, jnp.stack([lt.T, lt]), precision=hi).reshape(2, Bsz, E, Lp)
    tot = blocks.sum(-1)  # [2, Bsz, E, nb]
    p = jnp.arange(nb)
    P, Q, K = p[:, None, None], p[None, :, None], p[None, None, :]
    below = ((Q < K) & (K < P)).astype(_F32)  # forward tiles p > q: the blocks strictly between
    above = ((P < K) & (K < Q)).astype(_F32)  # backward tiles p < q
    gap = (jnp.einsum("bek,pqk->bepq", tot[0], below, precision=hi)
           + jnp.einsum("bek,pqk->bepq", tot[1], above, precision=hi)).reshape(Bsz, E, nb * nb)
    padn = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, Np - N)])
    padl = lambda x: jnp.pad(x, [(0, 0), (0, 0), (0, Lp - L), (0, 0)])
    Bm = padl(padn(jnp.stack([f32(B_f), flip(B_b)])))
    Cm = padl(padn(jnp.stack([f32(C_f), flip(C_b)])))
    A = padn(jnp.stack([f32(A_f), f32(A_b)])) * _LOG2E
    amax = jnp.max(jnp.abs(A), axis=-1)[:, None, :, None]  # [2, 1, E, 1]
    half = jnp.where(amax * tot <= RMAX * _LOG2E, 0.5 * tot, -1.0)
    return (d, rv, cv, gap, half, A, Bm, Cm), (Bsz, L, E, N, nb, Lp, Np)


def _choose_split(programs, E, split):
    """Channel groups per tile: the smallest divisor of E that gives ``_TARGET_PROGRAMS``."""
    if split is not None:
        if E % split:
            raise ValueError(f"split {split} must divide the {E} channels")
        return split
    need = -(-_TARGET_PROGRAMS // programs)
    return min(s for s in range(1, E + 1) if E % s == 0 and (s >= need or s == E))


# --------------------------------------------------------------------------
# Tiles of one channel.
# --------------------------------------------------------------------------
def _dot_nt(left, right, precision):
    """left [m, k] x right [n, k]^T -> [m, n] in float32."""
    return lax.dot_general(left, right, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=_F32)


class _Tile:
    """Per-program constants and the tile of one channel (shared by both kernels). A tile is
    computed in two steps, the loads (``load_off`` / ``load_diag``: a few rows of one channel)
    and the arithmetic (``off`` / ``diag``), so that a loop can issue the next channel's loads
    before this channel's arithmetic (``_channel_loop``)."""

    def __init__(self, refs, *, nb, block, N, weight, precision, tiles="all"):
        self.d_ref, self.rv_ref, self.cv_ref, self.gap_ref, self.half_ref, self.a_ref, self.b_ref, self.c_ref = refs
        self.b, k = pl.program_id(0), pl.program_id(1)
        self.k = k
        if tiles == "all":  # program k: tile (k // nb, k % nb)
            self.p, self.q = k // nb, k % nb
        elif tiles == "off":  # program k: the k-th off-diagonal tile, row by row
            self.p, qq = k // (nb - 1), k % (nb - 1)
            self.q = qq + (qq >= self.p).astype(qq.dtype)
        else:  # "diag": program k: tile (k, k)
            self.p = self.q = k
        self.tile = self.p * nb + self.q
        self.t0, self.j0 = self.p * block, self.q * block
        self.block, self.N, self.w, self.precision = block, N, weight, precision
        i = lax.broadcasted_iota(jnp.int32, (block, block), 0)
        j = lax.broadcasted_iota(jnp.int32, (block, block), 1)
        self.tri = (i >= j, i <= j)  # the diagonal tile's part of branch 0 (j <= t) and 1 (j >= t)

    def rows(self, ref, r, start):
        return ref[r, self.b, pl.ds(start, self.block), :]

    def load_off(self, r, e):
        """Channel e of branch r, off-diagonal tile: A [Np], rv [block], cv + gap [block], delta_j."""
        return (self.a_ref[r, e, :], self.rv_ref[r, self.b, e, pl.ds(self.t0, self.block)],
                self.cv_ref[r, self.b, e, pl.ds(self.j0, self.block)] + self.gap_ref[self.b, e, self.tile],
                self.d_ref[r, self.b, e, pl.ds(self.j0, self.block)])

    def off(self, vals, C_t, wB_j):
        """The tile (p != q) of one channel: left [block, Np] x right [block, Np]^T."""
        a, rv, cv, dj = vals
        left = jnp.exp2(rv[:, None] * a[None, :]) * C_t
        right = jnp.exp2(cv[:, None] * a[None, :]) * (dj[:, None] * wB_j)
        return _dot_nt(left, right, self.precision)

    def load_diag(self, r, e):
        """Channel e of branch r, diagonal tile: A [Np], rv [block], delta [block], half."""
        return (self.a_ref[r, e, :], self.rv_ref[r, self.b, e, pl.ds(self.t0, self.block)],
                self.d_ref[r, self.b, e, pl.ds(self.t0, self.block)], self.half_ref[r, self.b, e, self.p])

    def diag(self, r, e, vals, C_t, wB_t, guarded=True):
        """Branch r's part of the diagonal tile of channel e (0 outside its triangle). Unguarded:
        the factored product alone, meaningless where half < 0 (the caller masks those channels)."""
        a, rv, dj, half = vals
        mask = self.tri[r]

        def factored():  # exponents within +-|A| tot / 2 <= RMAX / 2
            left = jnp.exp2((rv - half)[:, None] * a[None, :]) * C_t
            right = jnp.exp2((half - rv)[:, None] * a[None, :]) * (dj[:, None] * wB_t)
            return _dot_nt(left, right, self.precision)

        if not guarded:
            return jnp.where(mask, factored(), 0.0)

        def direct():
            seg = jnp.where(mask, rv[:, None] - rv[None, :], 0.0)

            def term(n, x):
                c_n = self.c_ref[r, self.b, pl.ds(self.t0, self.block), n]
                b_n = self.b_ref[r, self.b, pl.ds(self.t0, self.block), n] * self.w
                return x + c_n[:, None] * jnp.exp2(seg * self.a_ref[r, e, n]) * (dj * b_n)[None, :]

            return lax.fori_loop(0, self.N, term, jnp.zeros((self.block, self.block), _F32))

        return jnp.where(mask, lax.cond(half >= 0.0, factored, direct), 0.0)


def _channel_loop(e0, ec, unroll, prefetch, load, body, carry):
    """for e in e0 .. e0 + ec - 1: carry = body(e, load(e), carry), ``unroll`` channels per
    iteration (independent work side by side); with ``prefetch`` the loads of the next iteration
    are issued before the arithmetic of this one (carried through the loop)."""
    if ec % unroll:
        unroll = 1
    n = ec // unroll
    loads = lambda i: [load(e0 + i * unroll + u) for u in range(unroll)]  # noqa: E731

    def step(i, cur, carry):
        for u in range(unroll):
            carry = body(e0 + i * unroll + u, cur[u], carry)
        return carry

    if not prefetch:
        return lax.fori_loop(0, n, lambda i, c: step(i, loads(i), c), carry)

    def pipelined(i, c):
        carry, cur = c
        nxt = loads(jnp.minimum(i + 1, n - 1))
        return step(i, cur, carry), nxt

    return lax.fori_loop(0, n, pipelined, (carry, loads(0)))[0]


# --------------------------------------------------------------------------
# Kernels.
# --------------------------------------------------------------------------
_N_IN = 8  # d, rv, cv, gap, half, A, B, C (the statistics kernels take two more: fallback list, count)


def _stats_kernel(*refs, L, nb, block, N, ec, weight, clamp, extremes, precision, unroll, prefetch, tiles):
    """The channel sum (and min / max) of the off-diagonal tiles (``tiles="off"``: one branch each)
    or of the diagonal ones (``"diag"``: both branches and the clamp of their sum). Two kernels,
    so that the lean off-diagonal loop gets registers (and occupancy) of its own.

    The diagonal loop takes every channel's factored product without a branch and leaves out
    the channels whose block needs the direct formula (half < 0 in either branch); those are
    listed per image and block (``fb_ref``, ``count_ref``: flagged channels first) and walked by
    a second loop in the first channel group's program, with the guarded tile."""
    fb_ref, count_ref = refs[_N_IN:_N_IN + 2]
    sum_ref, *range_refs = refs[_N_IN + 2:]
    tl = _Tile(refs[:_N_IN], nb=nb, block=block, N=N, weight=weight, precision=precision, tiles=tiles)
    s = pl.program_id(2)
    e0 = s * ec
    inf = jnp.full((block, block), jnp.inf, _F32)
    init = (jnp.zeros((block, block), _F32),) + ((inf, -inf) if extremes else ())

    def add(x, carry, ok=None):  # ok: a scalar, False leaves this channel out
        pos = jnp.maximum(x, 0.0) if clamp else x
        acc = carry[0] + (pos if ok is None else jnp.where(ok, pos, 0.0))
        if not extremes:
            return (acc,)
        lo, hi = (x, x) if ok is None else (jnp.where(ok, x, jnp.inf), jnp.where(ok, x, -jnp.inf))
        return acc, jnp.minimum(carry[1], lo), jnp.maximum(carry[2], hi)

    loop = functools.partial(_channel_loop, e0, ec, unroll, prefetch)
    if tiles == "off":
        r = jnp.where(tl.p > tl.q, 0, 1)
        C_t = tl.rows(tl.c_ref, r, tl.t0)
        wB_j = tl.rows(tl.b_ref, r, tl.j0) * weight
        carry = loop(lambda e: tl.load_off(r, e), lambda e, v, c: add(tl.off(v, C_t, wB_j), c), init)
        sum_ref[tl.b, s, pl.ds(tl.t0, block), pl.ds(tl.j0, block)] = carry[0]
        k = tl.k
    else:
        C_t = [tl.rows(tl.c_ref, r, tl.t0) for r in (0, 1)]
        wB_t = [tl.rows(tl.b_ref, r, tl.t0) * weight for r in (0, 1)]

        def body(e, v, carry):
            ok = (v[0][3] >= 0.0) & (v[1][3] >= 0.0)
            x = tl.diag(0, e, v[0], C_t[0], wB_t[0], guarded=False) + tl.diag(1, e, v[1], C_t[1], wB_t[1],
                                                                                guarded=False)
            return add(x, carry, ok)

        def fallback(i, carry):
            e = fb_ref[tl.b, tl.p, i]
            v = (tl.load_diag(0, e), tl.load_diag(1, e))
            return add(tl.diag(0, e, v[0], C_t[0], wB_t[0]) + tl.diag(1, e, v[1], C_t[1], wB_t[1]), carry)

        carry = loop(lambda e: (tl.load_diag(0, e), tl.load_diag(1, e)), body, init)
        carry = lax.fori_loop(0, jnp.where(s == 0, count_ref[tl.b, tl.p], 0), fallback, carry)
        sum_ref[tl.b, s, tl.p, :, :] = carry[0]
        k = tl.p
    if extremes:  # over the tile's entries inside the L x L matrix
        ii = tl.t0 + lax.broadcasted_iota(jnp.int32, (block, block), 0)
        jj = tl.j0 + lax.broadcasted_iota(jnp.int32, (block, block), 1)
        valid = (ii < L) & (jj < L)
        min_ref, max_ref = range_refs
        min_ref[tl.b, s, k, :] = jnp.min(jnp.where(valid, carry[1], jnp.inf), axis=1)
        max_ref[tl.b, s, k, :] = jnp.max(jnp.where(valid, carry[2], -jnp.inf), axis=1)


def _alpha_kernel(*refs, L, nb, block, N, ec, n_out, precision):
    (out_ref,) = refs[_N_IN:]
    tl = _Tile(refs[:_N_IN], nb=nb, block=block, N=N, weight=1.0, precision=precision)
    e0 = pl.program_id(2) * ec
    ii = tl.t0 + lax.broadcasted_iota(jnp.int32, (block, block), 0)
    jj = tl.j0 + lax.broadcasted_iota(jnp.int32, (block, block), 1)
    valid = (ii < L) & (jj < L)
    zeros = jnp.zeros((block, block), _F32)

    def store(r, e, x):
        if r < n_out:
            _masked_store(out_ref, (tl.b, jnp.int32(r), e, pl.ds(tl.t0, block), pl.ds(tl.j0, block)), x, valid)

    def loop(fn):
        def body(i, carry):
            fn(e0 + i)
            return carry
        lax.fori_loop(0, ec, body, 0)

    @pl.when(tl.p > tl.q)
    def _():
        C_t, B_j = tl.rows(tl.c_ref, 0, tl.t0), tl.rows(tl.b_ref, 0, tl.j0)

        def one(e):
            store(0, e, tl.off(tl.load_off(0, e), C_t, B_j))
            store(1, e, zeros)
        loop(one)

    @pl.when(tl.p < tl.q)
    def _():
        C_t, B_j = tl.rows(tl.c_ref, 1, tl.t0), tl.rows(tl.b_ref, 1, tl.j0)

        def one(e):
            store(0, e, zeros)
            if n_out > 1:
                store(1, e, tl.off(tl.load_off(1, e), C_t, B_j))
        loop(one)

    @pl.when(tl.p == tl.q)
    def _():
        C_t = [tl.rows(tl.c_ref, r, tl.t0) for r in range(n_out)]
        B_t = [tl.rows(tl.b_ref, r, tl.t0) for r in range(n_out)]

        def one(e):
            for r in range(n_out):
                store(r, e, tl.diag(r, e, tl.load_diag(r, e), C_t[r], B_t[r]))
        loop(one)


# --------------------------------------------------------------------------
# Wrappers.
# --------------------------------------------------------------------------
# Tuning defaults of the public functions (None arguments): the fastest configuration on the H200
# (benchmarks/attention_ablation.py, run exact_split); diag_warps: the diagonal kernel's warps (None:
# num_warps). A benchmark may update them before its first trace (bench.py --attention-config).
DEFAULTS = dict(block=32, num_warps=1, num_stages=None, precision="tf32x3", unroll=1, prefetch=False,
                diag_warps=None)


def _config(interpret, **given):
    cfg = {k: DEFAULTS[k] if given.get(k) is None else given[k] for k in DEFAULTS}
    block = cfg["block"] = int(cfg["block"])
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if cfg["precision"] not in _PRECISIONS:
        raise ValueError(f"unknown precision {cfg['precision']!r}; expected one of {tuple(_PRECISIONS)}")
    if interpret:
        cfg["precision"] = "ieee"
    cfg["unroll"], cfg["prefetch"] = int(cfg["unroll"]), bool(cfg["prefetch"])
    return cfg


def combined_stats(delta_f, B_f, C_f, A_f, delta_b=None, B_b=None, C_b=None, A_b=None, *, weight=1.0,
                   clamp=False, extremes=True, block=None, num_warps=None, num_stages=None, split=None,
                   precision=None, unroll=None, prefetch=None, diag_warps=None, interpret=False):
    """Channel statistics of M = weight (alpha_f + alpha_b) of one layer, as
    ``xai.hidden_attention.channel_reduced_matrix``: (mean over channels [Bsz, L, L], min [Bsz],
    max [Bsz]) of M, or of max(M, 0) with ``clamp``; ``extremes=False`` leaves the min and max
    out (returned as None: the kernel then keeps only the sum).

    delta_* [Bsz, L, E], B_*, C_* [Bsz, L, N], A_* [E, N]; the backward branch in scan order
    (None: one branch). block: tile size (power of two >= 16); split: channel groups per tile
    (None: enough programs for the GPU); precision: the in-kernel matrix products ("tf32x3",
    "ieee" or "tf32"); unroll: channels per loop iteration; prefetch: issue the next
    iteration's loads first; None takes ``DEFAULTS``. interpret: Pallas interpret mode (CPU
    tests; float32 products).
    """
    cfg = _config(interpret, block=block, num_warps=num_warps, num_stages=num_stages, precision=precision,
                  unroll=unroll, prefetch=prefetch, diag_warps=diag_warps)
    return _combined_stats(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, weight=float(weight),
                           clamp=bool(clamp), extremes=bool(extremes), split=split, interpret=bool(interpret),
                           **cfg)


@functools.partial(jax.jit, static_argnames=("weight", "clamp", "extremes", "block", "num_warps", "num_stages",
                                             "split", "precision", "unroll", "prefetch", "diag_warps", "interpret"))
def _combined_stats(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, *, weight, clamp, extremes, block, num_warps,
                    num_stages, split, precision, unroll, prefetch, diag_warps, interpret):
    args, (Bsz, L, E, N, nb, Lp, Np) = _prepare(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, block)
    sds = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    half = args[4]  # [2, Bsz, E, nb] (d, rv, cv, gap, half, ...): < 0 where the direct formula is needed
    flagged = jnp.swapaxes((half < 0.0).any(axis=0), 1, 2)  # [Bsz, nb, E]: the direct formula's channels
    fallback = (jnp.argsort(~flagged, axis=-1, stable=True).astype(jnp.int32),
                flagged.sum(-1, dtype=jnp.int32))

    def run(tiles, n_tiles, sum_shape):
        sp = _choose_split(Bsz * n_tiles, E, split)
        kernel = functools.partial(_stats_kernel, L=L, nb=nb, block=block, N=N, ec=E // sp, weight=weight,
                                   clamp=clamp, extremes=extremes, precision=_PRECISIONS[precision],
                                   unroll=unroll, prefetch=prefetch, tiles=tiles)
        out_shape = [sds(Bsz, sp, *sum_shape)] + [sds(Bsz, sp, n_tiles, block)] * (2 if extremes else 0)
        sums, *ranges = pl.pallas_call(
            kernel, grid=(Bsz, n_tiles, sp), interpret=interpret, out_shape=out_shape,
            compiler_params=_compiler_params(diag_warps or num_warps if tiles == "diag" else num_warps, num_stages),
            name=f"attention_stats_{tiles}",
        )(*args, *fallback)
        return sums.sum(1), ranges

    diag, diag_ranges = run("diag", nb, (nb, block, block))  # [Bsz, nb, block, block]
    full = diag[:, :, :, None, :]  # [Bsz, nb, block, 1, block]: tile (p, p) at row block p
    if nb > 1:  # the off-diagonal kernel leaves the diagonal tiles unwritten: selected away here
        off, off_ranges = run("off", nb * (nb - 1), (Lp, Lp))
        eye = jnp.eye(nb, dtype=bool)[None, :, None, :, None]
        full = jnp.where(eye, full, off.reshape(Bsz, nb, block, nb, block))
    mean = full.reshape(Bsz, Lp, Lp)[:, :L, :L] / E
    if not extremes:
        return mean, None, None
    ranges = [diag_ranges] + ([off_ranges] if nb > 1 else [])
    lo = jnp.min(jnp.stack([r[0].min(axis=(1, 2, 3)) for r in ranges]), axis=0)
    hi = jnp.max(jnp.stack([r[1].max(axis=(1, 2, 3)) for r in ranges]), axis=0)
    if delta_b is None and L > 1:  # the zeros above the diagonal belong to the one-branch tensor
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if clamp:
        lo, hi = jnp.maximum(lo, 0.0), jnp.maximum(hi, 0.0)
    return mean, lo, hi


def combined_alpha(delta_f, B_f, C_f, A_f, delta_b=None, B_b=None, C_b=None, A_b=None, *, block=None,
                   num_warps=None, num_stages=None, split=None, precision=None, interpret=False):
    """The hidden attention alpha [Bsz, n_branches, E, L, L] of one layer: branch 0 forward
    (lower triangular), branch 1 backward in original positions (upper triangular), as
    ``ssm.hidden_attention`` per branch. Arguments as ``combined_stats`` (one channel per
    iteration, no prefetch: this kernel is bound by its stores)."""
    cfg = _config(interpret, block=block, num_warps=num_warps, num_stages=num_stages, precision=precision)
    return _combined_alpha(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, block=cfg["block"],
                           num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], split=split,
                           precision=cfg["precision"], interpret=bool(interpret))


@functools.partial(jax.jit, static_argnames=("block", "num_warps", "num_stages", "split", "precision",
                                             "interpret"))
def _combined_alpha(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, *, block, num_warps, num_stages, split,
                    precision, interpret):
    n_out = 1 if delta_b is None else 2
    args, (Bsz, L, E, N, nb, Lp, Np) = _prepare(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, block)
    split = _choose_split(Bsz * nb * nb, E, split)
    kernel = functools.partial(_alpha_kernel, L=L, nb=nb, block=block, N=N, ec=E // split, n_out=n_out,
                               precision=_PRECISIONS[precision])
    return pl.pallas_call(
        kernel, grid=(Bsz, nb * nb, split), interpret=interpret, name="attention_alpha",
        out_shape=jax.ShapeDtypeStruct((Bsz, n_out, E, L, L), _F32),
        compiler_params=_compiler_params(num_warps, num_stages),
    )(*args)
