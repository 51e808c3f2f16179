"""The unified implicit attention of a Vim layer (SPEC section 6).

Zimerman, Ali, Wolf, "Explaining Modern Gated-Linear RNNs via a Unified Implicit Attention
Formulation" (ICLR 2025; code Itamarzimm/UnifiedImplicitAttnRepr). The hidden attention alpha
(``xai.hidden_attention``) covers the selective scan alone; the unified form folds the whole
branch (causal conv, SiLU, scan, gate) into one data-dependent matrix per channel, acting on
the in_proj output x before the conv.

Glossary (code name -> paper symbol), one branch, channel d, in the branch's own scan order:
    x       [B, L, E]   the in_proj output before the conv: what M multiplies
    c       [B, L, E]   conv(x) + conv bias, the conv's pre-activation; u = silu(c)
    z       [B, L, E]   the gate input; the branch outputs y * silu(z)
    kernel  [K, E]      the depthwise conv (Flax layout: kernel[k, d] = conv1d.weight[d, 0, k]);
                        bias [E] its bias b
    T       [E, L, L]   the conv's Toeplitz matrix, T_d[t, s] = kernel[K-1-(t-s), d] for
                        0 <= t - s < K (``conv_toeplitz``): c_d = T_d x_d + b_d
    alpha   [E, L, L]   the scan's hidden attention (``mamba_jax.ssm.hidden_attention``)
    M       [E, L, L]   diag(silu(z_d)) alpha_d diag(sigmoid(c_d)) T_d, lower triangular
    w                   the mixer's branch weight (``branch_weight``: 1/2 for official Vim)
The exact identity (the bias and the D skip are left out of M, as in the official code):
    y_d * silu(z_d) = M_d x_d + silu(z_d) * [alpha_d (sigmoid(c_d) * b_d) + D_d u_d].
The backward branch runs on the flipped sequence; in original positions its matrix is J M^b J
(J the exchange matrix; upper triangular: for bimamba "v1", whose backward scan reads the
forward conv, nonzero also K - 1 diagonals below). The mixer's combined matrix is
M_bi = M^f + J M^b J, and the mixer output is out_proj(w (M_bi x + the bias and D terms)).
Branch 0 of every result is the forward branch, branch 1 the backward one in original positions.

Where x and c come from: the model captures u = silu(c), delta, B, C and z per branch, not x
or c, and inverting silu is ill-posed (it is not monotone: two preimages for u in (-0.28, 0),
an infinite slope of the inverse at its minimum). So x and c are recomputed from the captured
residual stream r_l entering the layer, with that layer's parameters (``params["layers"]``):
h = norm_l(r_l), x = first half of in_proj(h), c = conv(x) + b (backward branch: x flipped,
``conv1d_b``). Small pure functions here do it (``layer_terms``), with the model's matmul
dtype and precision; tests/test_unified.py checks silu(c) against the captured u and the
recomputed z against the captured z in float64, so a change of the model shows there.
bimamba "v1" (one conv for both scans) is covered too: its backward branch reads flip(c), so in
its own order the conv matrix is J T J, anticausal (``causal=False`` below).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from einops import rearrange

from mamba_jax import ssm
from mamba_jax.config import VimConfig
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options
from mamba_jax.vim import check_images, vim_apply
from xai.hidden_attention import (
    DEFAULT_BUDGET,
    _as_index,
    _channel_chunk,
    _flip_both,
    _lowest,
    branch_weight,
    layer_A,
    layer_slice,
)

__all__ = ["branch_matrix", "conv_toeplitz", "depthwise_conv", "layer_terms", "own_order_causal", "times_conv",
           "unified_attention", "unified_channel_reduced_matrix", "unified_class_token_rows", "unified_cls_vector",
           "unified_rows"]


# ------------------------------------------------------------------ the conv
def depthwise_conv(x, kernel, bias=None):
    """c = T x + b: the causal depthwise conv with left zero padding K - 1, before the SiLU.

    x: [..., L, E]; kernel: [K, E]; bias: [E] or None. Returns [..., L, E]
    (c[t, d] = b[d] + sum_k kernel[k, d] x[t - K + 1 + k, d], x = 0 at negative times).
    """
    K, L = kernel.shape[0], x.shape[-2]
    padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(K - 1, 0), (0, 0)])
    out = sum(padded[..., k:k + L, :] * kernel[k] for k in range(K))
    return out if bias is None else out + bias


def conv_toeplitz(kernel, L: int, *, causal: bool = True):
    """T [E, L, L], the conv as a matrix: T[d, t, s] = kernel[K-1-(t-s), d] for 0 <= t - s < K,
    else 0 (``depthwise_conv(x) - b = T x`` per channel). ``causal=False``: J T J, the same conv
    run on the reversed sequence (T[d, t, s] = kernel[K-1-(s-t), d] for 0 <= s - t < K)."""
    K = kernel.shape[0]
    i = jnp.arange(L)
    lag = (i[:, None] - i[None, :]) if causal else (i[None, :] - i[:, None])
    taps = kernel[jnp.clip(K - 1 - lag, 0, K - 1)]  # [L, L, E]
    return jnp.moveaxis(jnp.where(((lag >= 0) & (lag < K))[..., None], taps, 0.0), -1, 0)


def times_conv(rows, kernel, *, causal: bool = True):
    """``rows @ T`` over the last axis without T: O(L K) per row instead of O(L^2).

    rows: [B, E, ..., L] (channel axis 1: rows of M or of alpha, one set per channel);
    kernel: [K, E]. Causal: out[..., s] = sum_q rows[..., s + q] kernel[K-1-q] (rows past L are
    0); ``causal=False`` (J T J): out[..., s] = sum_k rows[..., s - K + 1 + k] kernel[k].
    """
    K, E = kernel.shape
    L = rows.shape[-1]
    w = kernel.reshape((K, E) + (1,) * (rows.ndim - 2))  # broadcast over the axes after E
    pad = [(0, 0)] * (rows.ndim - 1) + [(0, K - 1) if causal else (K - 1, 0)]
    p = jnp.pad(rows, pad)
    if causal:
        return sum(p[..., q:q + L] * w[K - 1 - q] for q in range(K))
    return sum(p[..., k:k + L] * w[k] for k in range(K))


# ------------------------------------------------- the inputs of one layer
def _norm(config: VimConfig, p, r):
    """The block norm of ``mamba_jax`` (RMSNorm or LayerNorm) with explicit parameters."""
    if config.rms_norm:
        return r * jax.lax.rsqrt(jnp.mean(r * r, axis=-1, keepdims=True) + config.norm_eps) * p["weight"]
    mean = jnp.mean(r, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(r - mean), axis=-1, keepdims=True)
    return (r - mean) * jax.lax.rsqrt(var + config.norm_eps) * p["weight"] + p["bias"]


def _dense(x, p, options: Options):
    """x @ kernel (+ bias) as the model's ``nn.Dense``: the options' dtype and precision."""
    kernel = p["kernel"]
    dtype = options.dtype if options.dtype is not None else jnp.result_type(x, kernel)  # (a dtype is falsy)
    out = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (((x.ndim - 1,), (0,)), ((), ())),
                              precision=options.precision)
    if "bias" in p:
        out = out + p["bias"].astype(dtype)
    return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def own_order_causal(config: VimConfig, name: str) -> bool:
    """Whether branch ``name``'s conv matrix is causal in that branch's own scan order: always,
    except the backward branch of bimamba "v1", which reads the forward conv's output reversed."""
    return not (name == "bwd" and config.bimamba == "v1")


def layer_terms(config: VimConfig, params, inter, layer, *, start_layer: int = 0, options: Options | None = None):
    """Everything the unified attention of one layer needs, per branch in its own scan order.

    Returns {"fwd": t, "bwd": t} ("bwd" absent for bimamba "none") with t holding x, c, z, u,
    delta [B, L, E]; B, C [B, L, N]; A [E, N]; D [E]; kernel [K, E]; bias [E].
    ``inter``: ``vim_apply(..., capture=True, start_layer=start_layer)``'s intermediates;
    ``layer``: the model layer (may be traced). x and c are recomputed from the captured residual
    stream (module docstring); u, delta, B, C and z are the captured ones.
    """
    options = DEFAULT_OPTIONS if options is None else options
    E = config.d_inner
    p = jax.tree.map(lambda a: a[layer], params["layers"])
    mixer = p["mixer"]
    cap = layer_slice(inter, layer - start_layer)
    h = _norm(config, p["norm"], inter["residual"][layer - start_layer])
    x = _dense(h, mixer["in_proj"], options)[..., :E]
    A_f, A_b = layer_A(config, params, layer)

    def conv_params(name):
        bias = mixer[name].get("bias")
        return mixer[name]["kernel"], jnp.zeros((E,), x.dtype) if bias is None else bias

    kernel, bias = conv_params("conv1d")
    c = depthwise_conv(x, kernel, bias)
    terms = {"fwd": dict(cap["fwd"], x=x, c=c, A=A_f, D=mixer["D"], kernel=kernel, bias=bias)}
    if "bwd" in cap:
        x_b = jnp.flip(x, axis=-2)
        if config.bimamba == "v2":
            kernel_b, bias_b = conv_params("conv1d_b")
            terms["bwd"] = dict(cap["bwd"], x=x_b, c=depthwise_conv(x_b, kernel_b, bias_b), A=A_b, D=mixer["D_b"],
                                kernel=kernel_b, bias=bias_b)
        else:  # v1: the forward conv's output read reversed, the forward D
            terms["bwd"] = dict(cap["bwd"], x=x_b, c=jnp.flip(c, axis=-2), A=A_b, D=mixer["D"], kernel=kernel,
                                bias=bias)
    return terms


# ------------------------------------------------------------ full matrices
_PER_CHANNEL = ("delta", "c", "z", "kernel")  # the branch arrays whose last axis is the channel


def _split(t, chunk: int):
    """A branch's per-channel arrays as [n_chunks, ..., chunk] (A: [n_chunks, chunk, N])."""
    out = {k: rearrange(t[k], "... (n c) -> n ... c", c=chunk) for k in _PER_CHANNEL}
    return out | {"A": rearrange(t["A"], "(n c) s -> n c s", c=chunk)}


def _select(t, channels):
    """The branch restricted to ``channels`` (B and C are shared by all channels)."""
    return {k: t[k][..., channels] for k in _PER_CHANNEL} | {"A": t["A"][channels], "B": t["B"], "C": t["C"]}


def _chunk_matrix(ch, B, C, causal: bool):
    """M [Bsz, c, L, L] of a chunk of c channels, in the branch's own order."""
    alpha = jax.vmap(ssm.hidden_attention, in_axes=(0, None, 0, 0))(ch["delta"], ch["A"], B, C)
    gate = jax.nn.silu(jnp.swapaxes(ch["z"], -1, -2))[..., :, None]       # [Bsz, c, L, 1]
    act = jax.nn.sigmoid(jnp.swapaxes(ch["c"], -1, -2))[..., None, :]     # [Bsz, c, 1, L]
    return times_conv(gate * alpha * act, ch["kernel"], causal=causal)


def branch_matrix(t, *, causal: bool = True, budget: int = DEFAULT_BUDGET):
    """M [Bsz, E, L, L] of one branch in its own scan order, chunked over channels so that the
    O(E L^2 N) intermediates of the batch stay under ``budget`` bytes. t: ``layer_terms``' branch."""
    E, N = t["A"].shape
    Bsz, L = t["delta"].shape[:2]
    chunk = _channel_chunk(E, Bsz, L, N, budget)
    out = jax.lax.map(lambda ch: _chunk_matrix(ch, t["B"], t["C"], causal), _split(t, chunk))
    return rearrange(out, "n b c ... -> b (n c) ...")


def _layer_matrices(config, params, inter, layer, channels, budget, start_layer, options):
    """M [B, n_branches, n_channels, L, L] of one layer, original positions."""
    terms = layer_terms(config, params, inter, layer, start_layer=start_layer, options=options)
    out = []
    for name, t in terms.items():
        m = branch_matrix(_select(t, channels), causal=own_order_causal(config, name), budget=budget)
        out.append(_flip_both(m) if name == "bwd" else m)
    return jnp.stack(out, axis=1)


@functools.partial(jax.jit, static_argnames=("config", "budget", "start_layer", "options"))
def _unified_attention(config, params, images, layers, channels, budget, start_layer, options):
    _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)
    return jnp.stack([_layer_matrices(config, params, inter, layers[i], channels, budget, start_layer, options)
                      for i in range(layers.shape[0])], axis=1)


def _options(options):
    options = DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, Options):
        raise ValueError(f"options must be a mamba_jax.options.Options, got {type(options).__name__}")
    return options


def unified_attention(config: VimConfig, params, images, *, layers=None, channels=None,
                      budget: int = DEFAULT_BUDGET, options: Options | None = None):
    """The unified implicit attention matrices M (SPEC section 6) of each layer and branch.

    Returns float32 [B, n_layers, n_branches, n_channels, L, L] (float64 for float64 params and
    images under ``jax_enable_x64``): branch 0 the forward M^f (lower triangular), branch 1 the
    backward J M^b J in original positions (upper triangular; bimamba "v1": plus K - 1 diagonals
    below, its backward scan reading the forward conv); n_branches is 2 for bidirectional
    models. M x plus the bias and D terms is each branch's gated output (module docstring);
    w (M^f + J M^b J) is the mixer's combined matrix before out_proj.
    images: normalized NHWC [B, H, W, C]. ``layers`` / ``channels``: 0-based indices (None = all).
    Size as ``hidden_attention``'s (all of Vim-T for one image: 2.9 GB): select layers and
    channels, or use ``unified_class_token_rows``. Computed chunk by chunk over channels within
    ``budget`` bytes of intermediates.
    """
    images = check_images(config, images)
    layers = _as_index(layers, config.depth, "layers")
    channels = _as_index(channels, config.d_inner, "channels")
    return _unified_attention(config, params, images, layers, channels, budget, _lowest(layers), _options(options))


# ------------------------------------------------------ reduced quantities
def _branch_row(t, pos: int, causal: bool):
    """Row ``pos`` of one branch's M in its own order, [B, E, L], in O(E L N + E L K): the exact
    alpha row (diagonal included), times sigmoid(c), times T, times silu(z[pos])."""
    a = jax.vmap(functools.partial(ssm.class_token_row, pos=pos, official=False),
                 in_axes=(0, None, 0, 0))(t["delta"], t["A"], t["B"], t["C"])       # [B, E, L]
    temp = a * jax.nn.sigmoid(jnp.swapaxes(t["c"], -1, -2))
    return jax.nn.silu(t["z"][:, pos, :])[..., None] * times_conv(temp, t["kernel"], causal=causal)


def unified_rows(config: VimConfig, terms, pos: int):
    """Row ``pos`` of each branch's unified matrix in original positions: (fwd [B, E, L],
    bwd [B, E, L] | None). terms: ``layer_terms``. The backward row is computed on the reversed
    sequence at L - 1 - pos (the class token's reversed position), then flipped.

    The official explanation's class-token vector is fwd + bwd, with neither the 1/2 nor out_proj.
    """
    fwd = _branch_row(terms["fwd"], pos, own_order_causal(config, "fwd"))
    if "bwd" not in terms:
        return fwd, None
    L = fwd.shape[-1]
    # deviation: the official code hard-codes index 98 in both orders, the class token's reversed
    # position only when L is odd and the token in the middle (every official model); L - 1 - pos always
    bwd = _branch_row(terms["bwd"], L - 1 - pos, own_order_causal(config, "bwd"))
    return fwd, jnp.flip(bwd, axis=-1)


def unified_cls_vector(config: VimConfig, terms, pos: int):
    """The official unified class-token vector of one layer, [B, E, L]: row ``pos`` of
    M^f + J M^b J, the two branch rows summed with neither the mixer's 1/2 nor out_proj (the
    official Vim code). Its forward part is 0 after ``pos`` and its backward part 0 before it;
    both share position ``pos`` (the diagonals add)."""
    fwd, bwd = unified_rows(config, terms, pos)
    return fwd if bwd is None else fwd + bwd


def unified_channel_reduced_matrix(config: VimConfig, terms, *, clamp: bool = False, budget: int = DEFAULT_BUDGET):
    """Channel statistics of one layer's combined matrix w (M^f + J M^b J), original positions:
    its channel mean [B, L, L] and its min and max over channels and positions ([B] each), as
    ``hidden_attention.channel_reduced_matrix`` (``clamp``: max(., 0) first). Chunked over
    channels: the [E, L, L] tensor never exists at once."""
    f, b = terms["fwd"], terms.get("bwd")
    E, N = f["A"].shape
    Bsz, L = f["delta"].shape[:2]
    chunk = _channel_chunk(E, Bsz, L, N, budget // (2 if b is not None else 1))
    causal_f, causal_b = own_order_causal(config, "fwd"), own_order_causal(config, "bwd")

    def stats(xs):
        m = _chunk_matrix(xs[0], f["B"], f["C"], causal_f)  # [B, c, L, L]
        if b is not None:
            m = branch_weight(config) * (m + _flip_both(_chunk_matrix(xs[1], b["B"], b["C"], causal_b)))
        if clamp:
            m = jnp.maximum(m, 0.0)
        return m.sum(1), m.min(axis=(1, 2, 3)), m.max(axis=(1, 2, 3))

    xs = (_split(f, chunk),) + ((_split(b, chunk),) if b is not None else ())
    sums, lows, highs = jax.lax.map(stats, xs)
    return sums.sum(0) / E, lows.min(0), highs.max(0)


@functools.partial(jax.jit, static_argnames=("config", "start_layer", "options"))
def _class_token_rows(config, params, images, layers, start_layer, options):
    _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)

    def rows(layer):
        terms = layer_terms(config, params, inter, layer, start_layer=start_layer, options=options)
        fwd, bwd = unified_rows(config, terms, config.cls_pos)
        return jnp.stack([fwd] if bwd is None else [fwd, bwd], axis=1)

    return jnp.stack([rows(layers[i]) for i in range(layers.shape[0])], axis=1)


def unified_class_token_rows(config: VimConfig, params, images, *, layers=None, options: Options | None = None):
    """Row cls_pos of each branch's unified matrix, [B, n_layers, n_branches, E, L], original
    positions, in O(E L N + E L K) per layer (no L x L matrix): branch 0 row cls_pos of M^f,
    branch 1 of J M^b J. Their sum over the branch axis is the official class-token vector
    (SPEC section 6); times w, the class-token row of the mixer's combined matrix."""
    if config.cls_token not in ("head", "middle"):
        raise ValueError(f"class-token rows need exactly one class token; this model has cls_token="
                         f"{config.cls_token!r}")
    images = check_images(config, images)
    layers = _as_index(layers, config.depth, "layers")
    return _class_token_rows(config, params, images, layers, _lowest(layers), _options(options))
