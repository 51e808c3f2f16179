"""The hidden attention of a Vim model, materialized from one captured forward pass.

All quantities come from ``vim_apply(..., capture=True)`` (one source of truth for
delta, A, B, C) and the formulas of ``mamba_jax.ssm``. Branch 0 is the forward scan;
branch 1 the backward scan, reported in original token positions (its matrices are
upper triangular).

Memory: one branch-layer of one image is E x L x L floats (Vim-T: 384 x 197 x 197 x 4 B
= 60 MB), and computing it needs E x L x L x N intermediates; the channel axis is
processed in chunks sized so that the intermediates of a whole batch stay under
``budget`` bytes (default 1 GiB).

Two implementations (``method``): "xla", the formulas of ``mamba_jax.ssm`` chunked over
channels (the oracle, and the CPU path), and "pallas", the tiled kernels of
``mamba_jax.pallas_attention`` (factored exponentials, no [E, L, L] intermediate for the channel
statistics; interpret mode off the GPU). "auto" (the default) takes the kernels on a GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from mamba_jax import pallas_attention, ssm
from mamba_jax.config import VimConfig
from mamba_jax.options import Options
from mamba_jax.vim import check_images, vim_apply

DEFAULT_BUDGET = 1 << 30


def layer_A(config: VimConfig, params, layer) -> tuple[jax.Array, jax.Array | None]:
    """A [E, N] of the forward and backward branch of ``layer`` (backward None without one)."""
    mixer = params["layers"]["mixer"]
    A_f = -jnp.exp(mixer["A_log"][layer])
    A_b = -jnp.exp(mixer["A_b_log"][layer]) if config.bimamba != "none" else None
    return A_f, A_b


def branch_weight(config: VimConfig) -> float:
    """How the mixer weighs each branch: 1/2 for bimamba v2 with divide-out, else 1."""
    return 0.5 if (config.bimamba == "v2" and config.divide_out) else 1.0


def _channel_chunk(n_channels: int, batch: int, L: int, N: int, budget: int) -> int:
    """The largest divisor of ``n_channels`` whose intermediates fit in ``budget`` bytes."""
    per_channel = max(1, batch * L * L * N * 4 * 2)  # decay tensor and its product, float32
    limit = max(1, budget // per_channel)
    return max(c for c in range(1, n_channels + 1) if n_channels % c == 0 and c <= limit)


def _split_channels(delta, A, chunk: int):
    """delta [B, L, E], A [E, N] -> [n_chunks, B, L, chunk], [n_chunks, chunk, N]."""
    return (rearrange(delta, "b l (n c) -> n b l c", c=chunk),
            rearrange(A, "(n c) s -> n c s", c=chunk))


def _chunked_channels(fn, delta, A, chunk: int):
    """Apply ``fn(delta [B, L, c], A [c, N]) -> [B, c, ...]`` over channel chunks; concat on axis 1."""
    out = jax.lax.map(lambda xs: fn(*xs), _split_channels(delta, A, chunk))  # [n, B, c, ...]
    return rearrange(out, "n b c ... -> b (n c) ...")


def branch_alpha(delta, A, B, C, *, budget: int = DEFAULT_BUDGET):
    """alpha [Bsz, E, L, L] of one branch in its own scan order; delta [Bsz, L, E], B, C [Bsz, L, N]."""
    chunk = _channel_chunk(A.shape[0], delta.shape[0], delta.shape[1], A.shape[1], budget)
    per_image = jax.vmap(ssm.hidden_attention, in_axes=(0, None, 0, 0))
    return _chunked_channels(lambda d, a: per_image(d, a, B, C), delta, A, chunk)


def _flip_both(x):
    return jnp.flip(x, axis=(-1, -2))


def layer_slice(inter, l):
    """One layer's captured branch tensors, ``{"fwd": {...}, "bwd": {...}}`` (``l`` may be traced)."""
    return {n: {k: v[l] for k, v in inter[n].items()} for n in ("fwd", "bwd") if n in inter}


def per_layer(config: VimConfig, params, inter, layers, fn, axis: int = 0, start_layer: int = 0):
    """``fn(layer_slice, A_f, A_b)`` for every layer in ``layers``, stacked along ``axis``.

    ``start_layer``: the model layer of ``inter``'s index 0 (``vim_apply(..., start_layer=...)``).
    """
    return jnp.stack([fn(layer_slice(inter, l - start_layer), *layer_A(config, params, l)) for l in layers],
                     axis=axis)


def _as_index(arg, n: int, what: str):
    """0-based indices (negative ones count from the end) as an int32 array; a ValueError names
    non-integer, empty, nested or out-of-range indices (values unchecked for tracers)."""
    if arg is None:
        return jnp.arange(n)
    if not isinstance(arg, jax.core.Tracer):
        import numpy as np

        a = np.asarray(jax.device_get(arg))
        if a.dtype == bool or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
            raise ValueError(f"{what} must be integer indices, got {arg!r}")
        if a.ndim > 1:
            raise ValueError(f"{what} must be an int or a list of ints, got shape {a.shape}")
        if a.size == 0:
            raise ValueError(f"{what} is empty: pass at least one index, or None for all {n}")
    idx = jnp.atleast_1d(jnp.asarray(arg, jnp.int32))
    bad = [int(i) for i in jax.device_get(idx) if not -n <= int(i) < n] if not isinstance(
        idx, jax.core.Tracer) else []
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {n}")
    return idx % n


def _lowest(idx) -> int:
    """The lowest layer index, when it is known outside a trace (else 0): captures start there."""
    return 0 if isinstance(idx, jax.core.Tracer) else int(jax.device_get(idx).min())


def _layer_alpha(config: VimConfig, params, inter, layer, channels, budget: int, start_layer: int = 0,
                 method: str = "auto"):
    """alpha [B, n_branches, n_channels, L, L] of one layer (``layer`` may be traced; ``inter``
    captured from layer ``start_layer`` on)."""
    A = dict(zip(("fwd", "bwd"), layer_A(config, params, layer)))
    br = layer_slice(inter, layer - start_layer)
    if pallas_attention.resolve_attention(method) == "pallas":
        args = [br["fwd"]["delta"][..., channels], br["fwd"]["B"], br["fwd"]["C"], A["fwd"][channels]]
        if "bwd" in br:
            args += [br["bwd"]["delta"][..., channels], br["bwd"]["B"], br["bwd"]["C"], A["bwd"][channels]]
        return pallas_attention.combined_alpha(*args, interpret=jax.default_backend() != "gpu")
    branches = []
    for name, b in br.items():
        alpha = branch_alpha(b["delta"][..., channels], A[name][channels], b["B"], b["C"], budget=budget)
        branches.append(_flip_both(alpha) if name == "bwd" else alpha)
    return jnp.stack(branches, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "budget", "start_layer", "options", "method"))
def _hidden_attention(config, params, images, layers, channels, budget, start_layer, options, method):
    _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)
    return jnp.stack([_layer_alpha(config, params, inter, layers[i], channels, budget, start_layer, method)
                      for i in range(layers.shape[0])], axis=1)


@functools.partial(jax.jit, static_argnames=("config", "fn", "budget", "options", "method"))
def map_hidden_attention(config: VimConfig, params, images, fn, *, budget: int = DEFAULT_BUDGET,
                         options: Options | None = None, method: str = "auto"):
    """``fn`` applied to every layer's full hidden attention, one layer at a time.

    fn: alpha [B, n_branches, E, L, L] -> any pytree (e.g. a reduction); returns its results
    stacked over layers. One captured forward pass; the layers run in a ``lax.map``, so only
    one layer's matrices exist at a time (Vim-T: 2 x 384 x 197 x 197 floats per image).
    method: "auto" (the Pallas kernel on a GPU), "pallas" or "xla" (module docstring).
    """
    _, inter = vim_apply(config, params, images, capture=True, options=options)
    channels = jnp.arange(config.d_inner)
    return jax.lax.map(lambda l: fn(_layer_alpha(config, params, inter, l, channels, budget, method=method)),
                       jnp.arange(config.depth))


def hidden_attention(config: VimConfig, params, images, *, layers=None, channels=None,
                     budget: int = DEFAULT_BUDGET, options: Options | None = None, method: str = "auto"):
    """The exact hidden attention matrices alpha (SPEC section 3).

    Returns float32 [B, n_layers, n_branches, n_channels, L, L]: branch 0 forward (lower
    triangular), branch 1 backward in original positions (upper triangular); n_branches is
    2 for bidirectional models. ``layers`` / ``channels``: 0-based indices (None = all).
    The result itself is B * n_layers * 2 * n_channels * L * L * 4 bytes (all of Vim-T for
    one image: 2.9 GB); use ``layers`` and ``channels`` or ``channel_mean_attention`` to keep it small.
    method: "auto" (the Pallas kernel on a GPU), "pallas" or "xla" (module docstring).
    """
    images = check_images(config, images)
    layers = _as_index(layers, config.depth, "layers")
    channels = _as_index(channels, config.d_inner, "channels")
    pallas_attention.resolve_attention(method)  # a bad name fails here, before any computation
    return _hidden_attention(config, params, images, layers, channels, budget, _lowest(layers), options, method)


# -------------------------------------------------------- reduced quantities
def class_token_rows(inter, A_f, A_b, pos: int, *, official: bool):
    """Per-branch class-token rows of one layer, in original positions: ([B, E, L], [B, E, L] | None).

    ``inter`` holds one layer's captured branch tensors ``{"fwd": {...}, "bwd": {...}}``.
    The backward row is computed on the reversed sequence at position L - 1 - pos, then flipped.
    """
    def rows(br, A, p):
        return jax.vmap(functools.partial(ssm.class_token_row, pos=p, official=official),
                        in_axes=(0, None, 0, 0))(br["delta"], A, br["B"], br["C"])

    fwd = rows(inter["fwd"], A_f, pos)
    if "bwd" not in inter:
        return fwd, None
    L = fwd.shape[-1]
    bwd = jnp.flip(rows(inter["bwd"], A_b, L - 1 - pos), axis=-1)
    return fwd, bwd


def official_cls_vector(inter, A_f, A_b, pos: int):
    """The official explainability code's class-token vector of one layer [B, E, L].

    Positions 0..pos from the forward branch (truncated decay, zero at pos), positions
    pos+1..L-1 from the backward branch computed on the reversed sequence. Where the
    official code reuses index ``pos`` in the reversed sequence (the same token only when
    L is odd and the class token is in the middle), this uses L - 1 - pos, the class token's
    true reversed position, so any grid and class-token position is handled.
    """
    fwd, bwd = class_token_rows(inter, A_f, A_b, pos, official=True)
    if bwd is None:
        return fwd
    after = jnp.arange(fwd.shape[-1]) > pos
    return jnp.where(after, bwd, fwd)


def exact_cls_row(config: VimConfig, inter, A_f, A_b, pos: int):
    """The class-token row of the mixer's combined hidden attention [B, E, L] (diagonal included):
    w * (alpha_fwd[pos] + alpha_bwd[pos]), w the mixer's branch weight."""
    fwd, bwd = class_token_rows(inter, A_f, A_b, pos, official=False)
    if bwd is None:
        return fwd
    return branch_weight(config) * (fwd + bwd)


def channel_reduced_matrix(config: VimConfig, inter, A_f, A_b, *, clamp: bool = False,
                           budget: int = DEFAULT_BUDGET, method: str = "auto", extremes: bool = True):
    """Channel statistics of one layer's combined matrix w * (alpha_fwd + alpha_bwd):
    its channel mean [B, L, L] and its min and max over channels and positions ([B] each),
    so that the channel mean of the per-image min-max normalized tensor is
    (mean - min) / (max - min). ``clamp`` applies max(alpha, 0) first (Mamba-Attribution).
    The [E, L, L] tensor never exists at once: "xla" computes it chunk by chunk over channels,
    "pallas" (the default on a GPU: ``method="auto"``) tile by tile in registers
    (``mamba_jax.pallas_attention.combined_stats``). ``extremes=False``: the min and max are not
    needed (returned as None; the kernel then keeps only the sum)."""
    f, b = inter["fwd"], inter.get("bwd")
    if pallas_attention.resolve_attention(method) == "pallas":
        args = [f["delta"], f["B"], f["C"], A_f]
        if b is not None:
            args += [b["delta"], b["B"], b["C"], A_b]
        return pallas_attention.combined_stats(*args, weight=branch_weight(config) if b is not None else 1.0,
                                               clamp=clamp, extremes=extremes,
                                               interpret=jax.default_backend() != "gpu")
    E, N = A_f.shape
    Bsz, L = f["delta"].shape[:2]
    chunk = _channel_chunk(E, Bsz, L, N, budget // (2 if b is not None else 1))
    alpha = jax.vmap(ssm.hidden_attention, in_axes=(0, None, 0, 0))

    def stats(xs):
        m = alpha(xs[0], xs[1], f["B"], f["C"])  # [B, c, L, L]
        if b is not None:
            m = branch_weight(config) * (m + _flip_both(alpha(xs[2], xs[3], b["B"], b["C"])))
        if clamp:
            m = jnp.maximum(m, 0.0)
        return m.sum(1), m.min(axis=(1, 2, 3)), m.max(axis=(1, 2, 3))

    xs = _split_channels(f["delta"], A_f, chunk)
    if b is not None:
        xs = xs + _split_channels(b["delta"], A_b, chunk)
    sums, lows, highs = jax.lax.map(stats, xs)
    if not extremes:
        return sums.sum(0) / E, None, None
    return sums.sum(0) / E, lows.min(0), highs.max(0)


# ------------------------------------------------------------ public reductions
@functools.partial(jax.jit, static_argnames=("config", "official", "start_layer", "options"))
def _cls_attention(config, params, images, layers, official, start_layer, options):
    _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)

    def rows(br, A_f, A_b):
        fwd, bwd = class_token_rows(br, A_f, A_b, config.cls_pos, official=official)
        return jnp.stack([fwd] if bwd is None else [fwd, bwd], axis=1)

    return per_layer(config, params, inter, layers, rows, axis=1, start_layer=start_layer)


def class_token_attention(config: VimConfig, params, images, *, layers=None, official: bool = False,
                          options: Options | None = None):
    """The class-token rows alone, [B, n_layers, n_branches, E, L], in original positions:
    ``alpha[..., cls_pos, :]`` of each branch without materializing L x L (O(E L N) per layer).
    ``official=True`` gives the official code's truncated rows instead (SPEC section 3)."""
    images = check_images(config, images)
    layers = _as_index(layers, config.depth, "layers")
    return _cls_attention(config, params, images, layers, official, _lowest(layers), options)


@functools.partial(jax.jit, static_argnames=("config", "budget", "start_layer", "options"))
def _channel_mean(config, params, images, layers, budget, start_layer, options):
    _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)

    def mean(br, A_f, A_b):
        return channel_reduced_matrix(config, br, A_f, A_b, budget=budget, extremes=False)[0]

    return per_layer(config, params, inter, layers, mean, axis=1, start_layer=start_layer)


def channel_mean_attention(config: VimConfig, params, images, *, layers=None, budget: int = DEFAULT_BUDGET,
                           options: Options | None = None):
    """The channel mean of each layer's combined matrix w (alpha_fwd + alpha_bwd), [B, n_layers, L, L],
    computed chunk by chunk over channels (w: the mixer's branch weight, 1/2 for official Vim)."""
    images = check_images(config, images)
    layers = _as_index(layers, config.depth, "layers")
    return _channel_mean(config, params, images, layers, budget, _lowest(layers), options)
