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
``clamp``) [Bsz, L, L] and its min and max over channels and positions ([Bsz] each).
``combined_alpha(...)`` returns alpha itself, [Bsz, n_branches, E, L, L] (branch 1 in original
positions), for consumers of the full matrices. Backward inputs are given in scan order (as
``vim_apply(..., capture=True)`` captures them); ``delta_b=None`` for a one-branch model.

Kernel design
-------------
* Positions are cut into blocks of ``block`` (a power of two, at least 16), padded to
  Lp = nb * block with delta = B = C = 0 (padded entries are exactly 0 and left out of min/max).
  Grid ``(Bsz, nb * nb, split)``: one program per image, (t-block p, j-block q) tile and group of
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
  direct formula, N exponentials per entry (``lax.cond`` per channel and branch).
* rv, cv and gap are computed once per layer in XLA as products with 0/1 triangular matrices at
  full float32 precision: sums of positive numbers inside one block (no prefix-sum differences,
  whose cancellation error grows with the position; ``ssm.segment_sums``).
* The matrix products use Triton's tf32x3 (three tensor-core products, float32 accuracy) on the
  GPU and float32 in interpret mode; ``precision="ieee"`` asks for plain float32 FMAs.
* ``pallas_call`` always gets ``plt.CompilerParams`` (the Triton lowering; as
  ``pallas_scan``); interpret mode runs the same kernels on the CPU, for the tests.

Measured (H200, benchmarks/results/h200/runs/exact_fused): against the XLA formulas, max |diff| /
max |reference| <= 2.5e-7 for the statistics and 1.7e-6 for the full matrices. At Vim-S's shape
(E = 768, L = 197), one layer's statistics take 16.7 ms at batch 128 with the defaults (block 32,
2 warps), 21.3 ms with block 64 and 4 warps, 33.6 ms with plain float32 products; 6.1 ms at
batch 32 (0.7 ms at batch 1, one call with its dispatch). That is ~900 multiprocessor cycles per
32 x 32 channel tile, several times the instructions it issues; not profiled yet, the likely cause
is the latency of each channel's loads and layout shuffles, with little independent work in
flight. ``prefetch`` (the next channel's loads issued before this channel's arithmetic) and
``unroll`` (channels side by side) target that; they are checked in interpret mode and lower to
Triton, but are not yet timed on the GPU (``benchmarks/attention_gpu_check.py --sweep-only``), so
they stay off by default.
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
ATTENTION_METHODS = ("auto", "pallas", "xla")
_TARGET_PROGRAMS = 528  # 4 per multiprocessor of an H100/H200 (132): below this, split channels
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
    d, rv, cv [2, Bsz, E, Lp]; gap [Bsz, E, nb * nb]; A [2, E, Np]; B, C [2, Bsz, Lp, Np]."""
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
    A = padn(jnp.stack([f32(A_f), f32(A_b)]))
    return (d, rv, cv, gap, A, Bm, Cm), (Bsz, L, E, N, nb, Lp, Np)


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

    def __init__(self, refs, *, nb, block, N, weight, precision):
        self.d_ref, self.rv_ref, self.cv_ref, self.gap_ref, self.a_ref, self.b_ref, self.c_ref = refs
        self.b, self.tile = pl.program_id(0), pl.program_id(1)
        self.p, self.q = self.tile // nb, self.tile % nb
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
        left = jnp.exp(rv[:, None] * a[None, :]) * C_t
        right = jnp.exp(cv[:, None] * a[None, :]) * (dj[:, None] * wB_j)
        return _dot_nt(left, right, self.precision)

    def load_diag(self, r, e):
        """Channel e of branch r, diagonal tile: A [Np], rv [block], delta [block]."""
        return (self.a_ref[r, e, :], self.rv_ref[r, self.b, e, pl.ds(self.t0, self.block)],
                self.d_ref[r, self.b, e, pl.ds(self.t0, self.block)])

    def diag(self, r, e, vals, C_t, wB_t):
        """Branch r's part of the diagonal tile of channel e (0 outside its triangle)."""
        a, rv, dj = vals
        tot = jnp.max(rv)  # rv runs from ~0 to the block total (padding adds 0)
        mask = self.tri[r]

        def factored():
            half = 0.5 * tot  # exponents within +-|A| tot / 2 <= RMAX / 2
            left = jnp.exp((rv - half)[:, None] * a[None, :]) * C_t
            right = jnp.exp((half - rv)[:, None] * a[None, :]) * (dj[:, None] * wB_t)
            return _dot_nt(left, right, self.precision)

        def direct():
            seg = jnp.where(mask, rv[:, None] - rv[None, :], 0.0)

            def term(n, x):
                c_n = self.c_ref[r, self.b, pl.ds(self.t0, self.block), n]
                b_n = self.b_ref[r, self.b, pl.ds(self.t0, self.block), n] * self.w
                return x + c_n[:, None] * jnp.exp(seg * self.a_ref[r, e, n]) * (dj * b_n)[None, :]

            return lax.fori_loop(0, self.N, term, jnp.zeros((self.block, self.block), _F32))

        return jnp.where(mask, lax.cond(jnp.max(jnp.abs(a)) * tot <= RMAX, factored, direct), 0.0)


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
_N_IN = 7  # d, rv, cv, gap, A, B, C


def _stats_kernel(*refs, L, nb, block, N, ec, weight, clamp, precision, unroll, prefetch):
    sum_ref, min_ref, max_ref = refs[_N_IN:]
    tl = _Tile(refs[:_N_IN], nb=nb, block=block, N=N, weight=weight, precision=precision)
    s = pl.program_id(2)
    e0 = s * ec
    ii = tl.t0 + lax.broadcasted_iota(jnp.int32, (block, block), 0)
    jj = tl.j0 + lax.broadcasted_iota(jnp.int32, (block, block), 1)
    valid = (ii < L) & (jj < L)
    inf = jnp.full((block, block), jnp.inf, _F32)
    init = (jnp.zeros((block, block), _F32), inf, -inf)

    def add(x, carry):
        acc, lo, hi = carry
        return acc + (jnp.maximum(x, 0.0) if clamp else x), jnp.minimum(lo, x), jnp.maximum(hi, x)

    def finish(carry):
        acc, lo, hi = carry
        sum_ref[tl.b, s, pl.ds(tl.t0, block), pl.ds(tl.j0, block)] = acc
        min_ref[tl.b, s, tl.tile, :] = jnp.min(jnp.where(valid, lo, jnp.inf), axis=1)
        max_ref[tl.b, s, tl.tile, :] = jnp.max(jnp.where(valid, hi, -jnp.inf), axis=1)

    loop = functools.partial(_channel_loop, e0, ec, unroll, prefetch)

    @pl.when(tl.p != tl.q)
    def _():
        r = jnp.where(tl.p > tl.q, 0, 1)
        C_t = tl.rows(tl.c_ref, r, tl.t0)
        wB_j = tl.rows(tl.b_ref, r, tl.j0) * weight
        finish(loop(lambda e: tl.load_off(r, e), lambda e, v, c: add(tl.off(v, C_t, wB_j), c), init))

    @pl.when(tl.p == tl.q)
    def _():
        C_t = [tl.rows(tl.c_ref, r, tl.t0) for r in (0, 1)]
        wB_t = [tl.rows(tl.b_ref, r, tl.t0) * weight for r in (0, 1)]

        def body(e, v, carry):
            return add(tl.diag(0, e, v[0], C_t[0], wB_t[0]) + tl.diag(1, e, v[1], C_t[1], wB_t[1]), carry)

        finish(loop(lambda e: (tl.load_diag(0, e), tl.load_diag(1, e)), body, init))


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
# Tuning defaults of the public functions (None arguments): the fastest configuration of the H200
# sweep (benchmarks/attention_gpu_check.py, run exact_fused); a benchmark may update them before
# its first trace (bench.py --attention-config).
DEFAULTS = dict(block=32, num_warps=2, num_stages=None, precision="tf32x3", unroll=1, prefetch=False)


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
                   clamp=False, block=None, num_warps=None, num_stages=None, split=None, precision=None,
                   unroll=None, prefetch=None, interpret=False):
    """Channel statistics of M = weight (alpha_f + alpha_b) of one layer, as
    ``xai.hidden_attention.channel_reduced_matrix``: (mean over channels [Bsz, L, L], min [Bsz],
    max [Bsz]) of M, or of max(M, 0) with ``clamp``.

    delta_* [Bsz, L, E], B_*, C_* [Bsz, L, N], A_* [E, N]; the backward branch in scan order
    (None: one branch). block: tile size (power of two >= 16); split: channel groups per tile
    (None: enough programs for the GPU); precision: the in-kernel matrix products ("tf32x3",
    "ieee" or "tf32"); unroll: channels per loop iteration; prefetch: issue the next
    iteration's loads first; None takes ``DEFAULTS``. interpret: Pallas interpret mode (CPU
    tests; float32 products).
    """
    cfg = _config(interpret, block=block, num_warps=num_warps, num_stages=num_stages, precision=precision,
                  unroll=unroll, prefetch=prefetch)
    return _combined_stats(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, weight=float(weight),
                           clamp=bool(clamp), split=split, interpret=bool(interpret), **cfg)


@functools.partial(jax.jit, static_argnames=("weight", "clamp", "block", "num_warps", "num_stages", "split",
                                             "precision", "unroll", "prefetch", "interpret"))
def _combined_stats(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, *, weight, clamp, block, num_warps,
                    num_stages, split, precision, unroll, prefetch, interpret):
    args, (Bsz, L, E, N, nb, Lp, Np) = _prepare(delta_f, B_f, C_f, A_f, delta_b, B_b, C_b, A_b, block)
    split = _choose_split(Bsz * nb * nb, E, split)
    sds = lambda *s: jax.ShapeDtypeStruct(s, _F32)
    kernel = functools.partial(_stats_kernel, L=L, nb=nb, block=block, N=N, ec=E // split, weight=weight,
                               clamp=clamp, precision=_PRECISIONS[precision], unroll=unroll, prefetch=prefetch)
    sums, lows, highs = pl.pallas_call(
        kernel, grid=(Bsz, nb * nb, split), interpret=interpret,
        out_shape=[sds(Bsz, split, Lp, Lp), sds(Bsz, split, nb * nb, block), sds(Bsz, split, nb * nb, block)],
        compiler_params=_compiler_params(num_warps, num_stages),
    )(*args)
    lo, hi = lows.min(axis=(1, 2, 3)), highs.max(axis=(1, 2, 3))
    if delta_b is None and L > 1:  # the zeros above the diagonal belong to the one-branch tensor
        lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if clamp:
        lo, hi = jnp.maximum(lo, 0.0), jnp.maximum(hi, 0.0)
    return sums.sum(1)[:, :L, :L] / E, lo, hi


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
        kernel, grid=(Bsz, nb * nb, split), interpret=interpret,
        out_shape=jax.ShapeDtypeStruct((Bsz, n_out, E, L, L), _F32),
        compiler_params=_compiler_params(num_warps, num_stages),
    )(*args)
