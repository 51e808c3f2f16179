"""The Mamba block, shared by every model here: norms, causal conv, the selective-scan mixer.

Vim (``mamba_jax.vim``) and the Mamba language model run the same ``Block`` (fused add +
norm, then ``Mixer``); a config only has to provide the mixer's sizes and flags:

    embed_dim, d_inner, d_state, rank, d_conv   D, E, N, R, K
    bimamba, divide_out                         "none" (one causal branch) / "v1" / "v2"
    conv_bias, proj_bias                        bias of the conv; of in_proj and out_proj
    rms_norm, norm_eps                          the block norm

Code name -> paper / official name:
    residual  the residual stream entering a block's norm (``residual`` in the official
              ``Block``; the quantity the attribution gradients are taken of)
    h         the normed block input (``hidden_states``)
    x, z      the two halves of ``in_proj(h)``: scan input and gate
    u         silu(causal_conv1d(x)), the scan input of ``ssm.selective_scan``
    delta, B, C   see ``ssm.py``; ``y`` the scan output before the gate
    fwd / bwd the forward branch and the backward branch (bimamba); backward-branch
              intermediates are kept in the backward scan's own (reversed) order.

MambaLRP (``Options.lrp_rules``, SPEC section 7): each rule holds some factors of the forward
pass constant under differentiation (``jax.lax.stop_gradient``) without changing any value, so
that input x gradient conserves relevance:
    "norm"  RMSNorm / LayerNorm: the 1 / std factor is a constant
    "silu"  silu(x) = x * sg(sigmoid(x)), after the conv and in the gate
    "ssm"   y = sg(alpha) u + D u: delta, B and C get no gradient
    "gate"  the gated output y * silu(z) passes half of its gradient: 0.5 g + 0.5 sg(g)
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mamba_jax import ssm
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options

sg = jax.lax.stop_gradient


# ---------------------------------------------------------------- initializers
def a_log_init(key, shape, dtype=jnp.float32):
    """Mamba's S4D-real init: A = -(1, 2, ..., N) in every channel."""
    del key
    E, N = shape
    return jnp.log(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=dtype), (E, N)))


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's init)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
                 + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


# float32 parameters also under jax_enable_x64 (flax's ones/zeros default to the widest float)
_ones = functools.partial(nn.initializers.ones, dtype=jnp.float32)
_zeros = functools.partial(nn.initializers.zeros, dtype=jnp.float32)


def uniform(scale):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


# ------------------------------------------------------------------ LRP rules
def silu(x, lrp: bool = False):
    """silu(x); under the LRP "silu" rule x * sg(sigmoid(x)): the same value, a linear gradient."""
    return x * sg(jax.nn.sigmoid(x)) if lrp else nn.silu(x)


def half(x, lrp: bool = False):
    """x; under the LRP "gate" rule 0.5 x + 0.5 sg(x): the same value, half the gradient."""
    return 0.5 * x + 0.5 * sg(x) if lrp else x


# --------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    eps: float = 1e-5
    lrp: bool = False  # LRP "norm" rule: the scale 1 / rms(x) held constant

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", _ones, (x.shape[-1],))
        scale = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return x * (sg(scale) if self.lrp else scale) * weight


class LayerNorm(nn.Module):
    eps: float = 1e-5
    lrp: bool = False  # LRP "norm" rule: the scale 1 / std(x) held constant (the mean is not)

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", _ones, (x.shape[-1],))
        bias = self.param("bias", _zeros, (x.shape[-1],))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        scale = jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True) + self.eps)
        return (x - mean) * (sg(scale) if self.lrp else scale) * weight + bias


def make_norm(config, name: str, options: Options = DEFAULT_OPTIONS) -> nn.Module:
    norm = RMSNorm if config.rms_norm else LayerNorm
    return norm(eps=config.norm_eps, lrp="norm" in options.lrp_rules, name=name)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over the sequence: [B, L, E] -> [B, L, E].

    ``kernel[k, e]`` is the official ``conv1d.weight[e, 0, k]``; left zero padding
    ``width - 1`` makes output t depend on inputs t - width + 1 .. t.
    """

    width: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        E = x.shape[-1]
        scale = 1.0 / math.sqrt(self.width)
        kernel = self.param("kernel", uniform(scale), (self.width, E))
        L = x.shape[-2]
        padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(self.width - 1, 0), (0, 0)])
        out = sum(padded[..., k:k + L, :] * kernel[k] for k in range(self.width))
        if self.use_bias:
            out = out + self.param("bias", uniform(scale), (E,))
        return out


def _scan_batch(u, delta, A, B, C, D, method):
    scan = functools.partial(ssm.selective_scan, method=method)
    return jax.vmap(scan, in_axes=(0, 0, None, 0, 0, None))(u, delta, A, B, C, D)


class Mixer(nn.Module):
    """The (bidirectional) Mamba mixer of one block: h [B, L, D] -> (out [B, L, D], intermediates).

    ``config.bimamba == "none"``: one causal branch (the Mamba language model's mixer);
    "v2" adds a backward branch with its own parameters (official Vim), "v1" one sharing
    the conv and projections. The intermediates of a branch are the scan's inputs
    ``u, delta, B, C`` and the gate ``z``, the same on every scan path (the fused kernel never
    writes the pre-gate ``y`` to memory; ``ssm.selective_scan`` recomputes it from them exactly).
    """

    config: object
    options: Options = DEFAULT_OPTIONS

    def branch_inputs(self, x, s: str):
        """conv1d{s} -> silu -> x_proj{s} -> dt_proj{s}: u, dt, B, C, A, D (delta = softplus(dt)).

        ``s`` is "" for the forward branch and "_b" for the backward one, giving the
        official parameter names (``conv1d_b``, ``x_proj_b``, ``A_b_log``, ``D_b``).
        """
        cfg, o = self.config, self.options
        E, N, R = cfg.d_inner, cfg.d_state, cfg.rank
        u = silu(CausalConv1d(cfg.d_conv, cfg.conv_bias, name=f"conv1d{s}")(x), "silu" in o.lrp_rules)
        x_dbl = nn.Dense(R + 2 * N, use_bias=False, precision=o.precision, dtype=o.dtype, name=f"x_proj{s}")(u)
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        dt = nn.Dense(E, precision=o.precision, dtype=o.dtype, kernel_init=uniform(R ** -0.5),
                      bias_init=dt_bias_init, name=f"dt_proj{s}")(dt_low)
        A_log = self.param("A_b_log" if s else "A_log", a_log_init, (E, N))
        D = self.param("D" + s, _ones, (E,))
        return u, dt, B, C, -jnp.exp(A_log), D

    def branch(self, u, dt, B, C, A, D, z):
        """The gated scan output y * silu(z) and the branch's intermediates."""
        rules = self.options.lrp_rules
        u, dt, B, C, z = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (u, dt, B, C, z))
        delta = jax.nn.softplus(dt)
        caps = dict(u=u, delta=delta, B=B, C=C, z=z)
        if "ssm" in rules:  # y = sg(alpha) u + D u: the scan is linear in u, nothing flows to delta, B, C
            dt, delta, B, C, A = sg(dt), sg(delta), sg(B), sg(C), sg(A)
        method = ssm.resolve_scan(self.options.scan_method, u.shape[0])
        if method == "pallas":
            # fused GPU kernel: softplus, discretization, D skip and gate in one pass (interpret
            # mode off the GPU, for tests); under LRP rules the gate is applied outside, where the
            # rules can hold its factors
            from mamba_jax.pallas_scan import selective_scan_pallas

            y = selective_scan_pallas(u, dt, A, B, C, D, jnp.zeros_like(D), None if rules else z, block_e=64,
                                      num_warps=4, interpret=jax.default_backend() != "gpu")
            if not rules:
                return y, caps
        else:
            y = _scan_batch(u, delta, A, B, C, D, method)
        return half(y * silu(z, "silu" in rules), "gate" in rules), caps

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        E = cfg.d_inner
        o = self.options
        xz = nn.Dense(2 * E, use_bias=cfg.proj_bias, precision=o.precision, dtype=o.dtype, name="in_proj")(h)
        x, z = xz[..., :E], xz[..., E:]
        flip = functools.partial(jnp.flip, axis=-2)

        u, dt, B, C, A, D = self.branch_inputs(x, "")
        out, cap_f = self.branch(u, dt, B, C, A, D, z)
        caps = {"fwd": cap_f}
        if cfg.bimamba == "v2":
            out_b, caps["bwd"] = self.branch(*self.branch_inputs(flip(x), "_b"), flip(z))
            out = out + flip(out_b)
            if cfg.divide_out:
                out = out / 2
        elif cfg.bimamba == "v1":
            # official bimamba_inner_fn: one conv and projection on the forward sequence;
            # the backward scan reads them reversed, with its own A (A_b_log) and the same D.
            A_b = -jnp.exp(self.param("A_b_log", a_log_init, (E, cfg.d_state)))
            out_b, caps["bwd"] = self.branch(flip(u), flip(dt), flip(B), flip(C), A_b, D, flip(z))
            out = out + flip(out_b)  # the official v1 path never divides by 2
        out = nn.Dense(cfg.embed_dim, use_bias=cfg.proj_bias, precision=o.precision, dtype=o.dtype,
                       name="out_proj")(out)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32)), caps


class Block(nn.Module):
    """One residual block with fused add + norm, the ``lax.scan`` body over layers.

    carry = (residual_{l-1}, m_{l-1}); residual_l = residual_{l-1} + m_{l-1} + perturb_l.
    ``perturb_l`` is zero in a plain forward pass; its gradient is d out / d residual_l.
    """

    config: object
    options: Options = DEFAULT_OPTIONS
    capture: bool = False

    @nn.compact
    def __call__(self, carry, perturb):
        residual, m = carry
        residual = residual + m + perturb
        h = make_norm(self.config, "norm", self.options)(residual)
        m, caps = Mixer(self.config, self.options, name="mixer")(h)
        out = {"residual": residual, **caps} if self.capture else None
        return (residual, m), out


# ------------------------------------------------------------ the layer stack
def init_layers(config, options: Options, carry):
    """A ``self.param`` initializer: ``config.depth`` independently initialized Blocks, their
    parameters stacked along a leading layer axis (``params["layers"]``)."""
    block = Block(config, options, parent=None)
    no_perturb = jnp.zeros((1, 1, 1), carry[0].dtype)

    def init(key):
        return jax.vmap(lambda k: block.init(k, carry, no_perturb)["params"])(jax.random.split(key, config.depth))

    return init


def run_layers(config, options: Options, stacked, carry, perturb=None, *, first: int = 0, last: int | None = None,
               capture: bool = False, remat: bool = False):
    """Blocks ``first .. last - 1`` of the stacked parameters as one ``jax.lax.scan`` (one
    compiled block body): ((residual, m), captures stacked over those layers, or None).

    ``perturb`` [last - first, B, L, D] (None: zeros) is added to the residual stream entering
    each block; ``remat`` keeps only each block's input carry (and captures) for the backward pass.
    """
    last = config.depth if last is None else last
    if perturb is None:
        perturb = jnp.zeros((last - first, 1, 1, 1), carry[0].dtype)
    segment = jax.tree.map(lambda a: a[first:last], stacked)
    block = Block(config, options, capture, parent=None)
    body = lambda c, xs: block.apply({"params": xs[0]}, c, xs[1])  # noqa: E731
    if remat:
        body = jax.checkpoint(body)
    return jax.lax.scan(body, carry, (segment, perturb))


def residual_stream(config, options: Options, stacked, tokens, perturb=None, *, start_layer: int = 0,
                    capture: bool = False):
    """The residual stream of a whole model from its embedded ``tokens`` r_0 [B, L, D]:
    (r_depth, the residual stream entering the final norm; captures of layers start_layer .. depth - 1).

    ``perturb`` [depth - start_layer + 1, B, L, D]: entry i is added to r_{start_layer + i}, the last
    one to r_depth. The layers before ``start_layer`` run as a separate scan, neither captured nor
    perturbed: a gradient with respect to ``perturb`` does not pass back through them.
    """
    carry = (tokens, jnp.zeros_like(tokens))
    k = start_layer
    if k:
        carry, _ = run_layers(config, options, stacked, carry, first=0, last=k)
    layer_perturb = final_perturb = None
    if perturb is not None:  # entries for r_k .. r_{depth-1}, and r_depth
        layer_perturb, final_perturb = perturb[:-1], perturb[-1]
    (residual, m), caps = run_layers(config, options, stacked, carry, layer_perturb, first=k, capture=capture,
                                     remat=options.remat)
    residual = residual + m
    if final_perturb is not None:
        residual = residual + final_perturb
    return residual, caps
