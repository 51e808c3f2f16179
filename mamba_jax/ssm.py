"""The selective state-space scan (Mamba's S6) as pure functions on unbatched arrays.

Glossary, code name -> paper symbol (Gu & Dao 2023; Ali et al. 2024):

    u        [L, E]      x_t, the scan input of each channel (after conv and SiLU)
    delta    [L, E]      Delta_t, the input-dependent step size (softplus applied)
    A        [E, N]      A, the diagonal (negative real) state matrix of each channel
    B        [L, N]      B_t, the input-dependent input matrix (shared by channels)
    C        [L, N]      C_t, the input-dependent output matrix
    D        [E]         D, the skip connection
    A_bar    [..., E, N] exp(Delta_t A)        (zero-order hold)
    B_bar_u  [..., E, N] Delta_t B_t u_t       (Euler step for B, as Mamba does)
    h        [L, E, N]   the hidden state, h_t = A_bar_t h_{t-1} + B_bar_u_t, h_{-1} = 0
    y        [L, E]      y_t = C_t h_t + D u_t
    alpha    [E, L, L]   the hidden attention: y_t = sum_j alpha[:, t, j] u_j + D u_t

Two scans share one discretization: ``scan_associative`` (``jax.lax.associative_scan``,
logarithmic depth, the GPU path) and ``scan_sequential`` (``jax.lax.scan`` with the
discretization fused into the step; the oracle, and the faster one on CPU).
Batching is the caller's ``vmap``.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

ScanMethod = Literal["auto", "pallas", "associative", "sequential"]
SCAN_METHODS: tuple[str, ...] = ("auto", "pallas", "associative", "sequential")
PALLAS_MIN_BATCH = 8


def discretize(delta: jax.Array, A: jax.Array, B: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A_bar = exp(Delta A) and B_bar u = Delta B u, for any leading dims.

    delta, u: [..., E]; A: [E, N]; B: [..., N]  ->  A_bar, B_bar_u: [..., E, N].
    """
    A_bar = jnp.exp(delta[..., None] * A)
    B_bar_u = (delta * u)[..., None] * B[..., None, :]
    return A_bar, B_bar_u


def _compose(earlier, later):
    """Compose two affine maps h -> a h + b (earlier first): the scan's monoid."""
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def scan_associative(u, delta, A, B, C, D):
    """y [L, E] via a parallel prefix scan over the affine maps (A_bar_t, B_bar_u_t)."""
    A_bar, B_bar_u = discretize(delta, A, B, u)
    _, h = jax.lax.associative_scan(_compose, (A_bar, B_bar_u), axis=0)
    return jnp.einsum("len,ln->le", h, C) + D * u


def scan_sequential(u, delta, A, B, C, D):
    """y [L, E] via a sequential ``lax.scan``, one time step at a time (the oracle)."""

    def step(h, inputs):
        u_t, delta_t, B_t, C_t = inputs
        A_bar, B_bar_u = discretize(delta_t, A, B_t, u_t)
        h = A_bar * h + B_bar_u
        return h, h @ C_t

    h0 = jnp.zeros(A.shape, jnp.result_type(u, delta, A, B))
    _, y = jax.lax.scan(step, h0, (u, delta, B, C))
    return y + D * u


def resolve_scan(method: str, batch: int) -> str:
    """The one resolver of ``method="auto"``, from H200 and CPU measurements (README,
    MEASUREMENTS.md): on a GPU the fused Pallas kernel from batch ``PALLAS_MIN_BATCH`` on
    (2.2x the associative scan at batch 128, half as fast at batch 1), else the associative
    scan; on a CPU the sequential scan (12x the associative one there). Other methods pass."""
    if method not in SCAN_METHODS:
        raise ValueError(f"unknown scan method {method!r}; expected one of {SCAN_METHODS}")
    if method != "auto":
        return method
    if jax.default_backend() == "cpu":
        return "sequential"
    return "pallas" if batch >= PALLAS_MIN_BATCH else "associative"


def selective_scan(u, delta, A, B, C, D, *, method: ScanMethod = "auto"):
    """y [L, E] = the selective scan of one sequence; ``method`` picks the algorithm
    ("pallas" is a batched kernel: ``vim.Mixer`` calls it, this unbatched function does not)."""
    method = resolve_scan(method, 1)
    if method == "associative":
        return scan_associative(u, delta, A, B, C, D)
    if method == "sequential":
        return scan_sequential(u, delta, A, B, C, D)
    raise ValueError(f"scan method {method!r} has no unbatched form; use 'associative' or 'sequential'")


def segment_sums(delta: jax.Array) -> jax.Array:
    """seg[..., t, j] = sum_{k=j+1}^{t} delta[k] for j <= t, else 0.  delta: [..., L].

    Computed as masked cumulative sums rather than differences of prefix sums, so
    that no cancellation error grows with t (exp(A * seg) is then accurate to float
    precision even for long sequences).
    """
    L = delta.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((L, L), bool), k=-1)
    # x[..., t, j] = delta[t] where j < t: column j sums delta over k in (j, t].
    x = jnp.where(strictly_lower, delta[..., :, None], 0.0)
    return jnp.cumsum(x, axis=-2) * jnp.tril(jnp.ones((L, L), x.dtype))


def hidden_attention(delta, A, B, C):
    """The hidden attention matrices of one branch: alpha [E, L, L].

    alpha[e, t, j] = sum_n C_t[n] exp(A[e, n] (S_t - S_j)) Delta_j[e] B_j[n] for j <= t, else 0,
    with S_t = sum_{k <= t} Delta_k[e].  Exact identity: y = alpha u + D u.

    delta: [L, E]; A: [E, N]; B, C: [L, N]. Memory is O(E L^2 N) inside; callers chunk
    over channels (slice ``delta`` and ``A``) to bound it.
    """
    L = delta.shape[0]
    seg = segment_sums(delta.T)  # [E, L, L], finite everywhere (0 above the diagonal)
    decay = jnp.exp(seg[..., None] * A[:, None, None, :])  # [E, L(t), L(j), N]
    alpha = jnp.einsum("tn,etjn,jn->etj", C, decay, B)
    causal = jnp.tril(jnp.ones((L, L), alpha.dtype))
    return alpha * delta.T[:, None, :] * causal


def class_token_row(delta, A, B, C, pos: int, *, official: bool = False):
    """Row ``pos`` of the hidden attention of one branch: [E, L], without the L x L matrix.

    Exact (``official=False``): alpha[e, pos, j] for j <= pos (diagonal included), 0 after.
    Official (``official=True``): the vector the official explainability code computes,
    whose decay product stops at pos - 1 (it omits exp(Delta_pos A)) and whose diagonal
    entry is 0:  v[e, j] = sum_n C_pos[n] prod_{k=j+1}^{pos-1} exp(Delta_k A) Delta_j B_j[n], j < pos.

    The decay exponents are suffix sums of positive numbers (no cancellation), taken as a
    product with a strictly upper triangular 0/1 matrix in full float32 precision: with
    ``jnp.cumsum`` (an associative scan on GPU) XLA took 3 minutes to compile the
    reduction below in Vim-S's batch-128 attribution (jax 0.11.2, H200); this way the whole
    attribution compiles in 15 s (benchmarks/results/h200, run b128_suffix_matmul).
    """
    L = delta.shape[0]
    k = jnp.arange(L)
    last = pos if official else pos + 1  # decay factors k in (j, last)
    d = jnp.where((k < last)[:, None], delta, 0.0)  # [L, E]
    # seg[j] = sum_{k > j} d[k]: exclusive suffix sum
    after = (k[None, :] > k[:, None]).astype(d.dtype)  # after[j, k] = 1 where k > j
    seg = jnp.einsum("jk,ke->je", after, d, precision=jax.lax.Precision.HIGHEST)
    decay = jnp.exp(seg[:, :, None] * A[None])  # [L(j), E, N]
    row = jnp.einsum("n,jen,jn->ej", C[pos], decay, B) * delta.T
    valid = (k < pos) if official else (k <= pos)
    return jnp.where(valid[None, :], row, 0.0)
