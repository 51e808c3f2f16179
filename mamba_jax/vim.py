"""Vision Mamba ("Vim") in Flax, parameter for parameter the official model.

The modules only own parameters; the mathematics lives in ``ssm.py``. Parameter
names follow the official state dict (``patch_embed.proj``, ``layers.i.norm``,
``layers.i.mixer.in_proj`` ...); the blocks are stacked along a leading ``depth``
axis under ``params["layers"]`` and run with ``jax.lax.scan`` (one compiled layer body;
two scans when the first layers are run uncaptured, see ``start_layer``).

Code name -> paper / official name:
    residual  the residual stream entering a block's norm (``residual`` in the
              official ``Block``; the quantity the attribution gradients are taken of)
    h         the normed block input (``hidden_states``)
    x, z      the two halves of ``in_proj(h)``: scan input and gate
    u         silu(causal_conv1d(x)), the scan input of ``ssm.selective_scan``
    delta, B, C   see ``ssm.py``; ``y`` the scan output before the gate
    fwd / bwd the forward branch and the backward branch (bimamba); backward-branch
              intermediates are kept in the backward scan's own (reversed) order.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mamba_jax import ssm
from mamba_jax.config import VimConfig
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options

Params = Any

# ---------------------------------------------------------------- initializers
def _a_log_init(key, shape, dtype=jnp.float32):
    """Mamba's S4D-real init: A = -(1, 2, ..., N) in every channel."""
    del key
    E, N = shape
    return jnp.log(jnp.broadcast_to(jnp.arange(1, N + 1, dtype=dtype), (E, N)))


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """softplus(bias) is log-uniform in [dt_min, dt_max] (Mamba's init)."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (math.log(dt_max) - math.log(dt_min))
                 + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus


def _uniform(scale):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -scale, scale)
    return init


_trunc_normal = nn.initializers.truncated_normal(0.02)


# --------------------------------------------------------------------- modules
class RMSNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * weight


class LayerNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * weight + bias


def make_norm(config: VimConfig, name: str) -> nn.Module:
    return (RMSNorm if config.rms_norm else LayerNorm)(eps=config.norm_eps, name=name)


class CausalConv1d(nn.Module):
    """Depthwise causal conv over the sequence: [B, L, E] -> [B, L, E].

    ``kernel[k, e]`` is the official ``conv1d.weight[e, 0, k]``; left zero padding
    ``width - 1`` makes output t depend on inputs t - width + 1 .. t.
    """

    width: int

    @nn.compact
    def __call__(self, x):
        E = x.shape[-1]
        scale = 1.0 / math.sqrt(self.width)
        kernel = self.param("kernel", _uniform(scale), (self.width, E))
        bias = self.param("bias", _uniform(scale), (E,))
        L = x.shape[-2]
        padded = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(self.width - 1, 0), (0, 0)])
        out = sum(padded[..., k:k + L, :] * kernel[k] for k in range(self.width))
        return out + bias


def _scan_batch(u, delta, A, B, C, D, method):
    scan = functools.partial(ssm.selective_scan, method=method)
    return jax.vmap(scan, in_axes=(0, 0, None, 0, 0, None))(u, delta, A, B, C, D)


class Mixer(nn.Module):
    """The (bidirectional) Mamba mixer of one block: h [B, L, D] -> (out [B, L, D], intermediates).

    The intermediates of a branch are the scan's inputs ``u, delta, B, C`` and the gate ``z``,
    the same on every scan path (the fused kernel never writes the pre-gate ``y`` to memory;
    ``ssm.selective_scan`` recomputes it from them exactly).
    """

    config: VimConfig
    options: Options = DEFAULT_OPTIONS

    def branch_inputs(self, x, s: str):
        """conv1d{s} -> silu -> x_proj{s} -> dt_proj{s}: u, dt, B, C, A, D (delta = softplus(dt)).

        ``s`` is "" for the forward branch and "_b" for the backward one, giving the
        official parameter names (``conv1d_b``, ``x_proj_b``, ``A_b_log``, ``D_b``).
        """
        cfg = self.config
        E, N, R = cfg.d_inner, cfg.d_state, cfg.rank
        u = nn.silu(CausalConv1d(cfg.d_conv, name=f"conv1d{s}")(x))
        o = self.options
        x_dbl = nn.Dense(R + 2 * N, use_bias=False, precision=o.precision, dtype=o.dtype, name=f"x_proj{s}")(u)
        dt_low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
        dt = nn.Dense(E, precision=o.precision, dtype=o.dtype, kernel_init=_uniform(R ** -0.5),
                      bias_init=_dt_bias_init, name=f"dt_proj{s}")(dt_low)
        A_log = self.param("A_b_log" if s else "A_log", _a_log_init, (E, N))
        D = self.param("D" + s, nn.initializers.ones, (E,))
        return u, dt, B, C, -jnp.exp(A_log), D

    def branch(self, u, dt, B, C, A, D, z):
        """The gated scan output y * silu(z) and the branch's intermediates."""
        u, dt, B, C, z = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (u, dt, B, C, z))
        delta = jax.nn.softplus(dt)
        method = ssm.resolve_scan(self.options.scan_method, u.shape[0])
        caps = dict(u=u, delta=delta, B=B, C=C, z=z)
        if method == "pallas":
            # fused GPU kernel: softplus, discretization, D skip and gate in one pass (interpret
            # mode off the GPU, for tests)
            from mamba_jax.pallas_scan import selective_scan_pallas

            return selective_scan_pallas(u, dt, A, B, C, D, jnp.zeros_like(D), z, block_e=64, num_warps=4,
                                         interpret=jax.default_backend() != "gpu"), caps
        y = _scan_batch(u, delta, A, B, C, D, method)
        return y * nn.silu(z), caps

    @nn.compact
    def __call__(self, h):
        cfg = self.config
        E = cfg.d_inner
        o = self.options
        xz = nn.Dense(2 * E, use_bias=False, precision=o.precision, dtype=o.dtype, name="in_proj")(h)
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
            A_b = -jnp.exp(self.param("A_b_log", _a_log_init, (E, cfg.d_state)))
            out_b, caps["bwd"] = self.branch(flip(u), flip(dt), flip(B), flip(C), A_b, D, flip(z))
            out = out + flip(out_b)  # the official v1 path never divides by 2
        out = nn.Dense(cfg.embed_dim, use_bias=False, precision=o.precision, dtype=o.dtype, name="out_proj")(out)
        return out.astype(jnp.promote_types(out.dtype, jnp.float32)), caps


class Block(nn.Module):
    """One residual block with fused add + norm, the ``lax.scan`` body over layers.

    carry = (residual_{l-1}, m_{l-1}); residual_l = residual_{l-1} + m_{l-1} + perturb_l.
    ``perturb_l`` is zero in a plain forward pass; its gradient is d out / d residual_l.
    """

    config: VimConfig
    options: Options = DEFAULT_OPTIONS
    capture: bool = False

    @nn.compact
    def __call__(self, carry, perturb):
        residual, m = carry
        residual = residual + m + perturb
        h = make_norm(self.config, "norm")(residual)
        m, caps = Mixer(self.config, self.options, name="mixer")(h)
        out = {"residual": residual, **caps} if self.capture else None
        return (residual, m), out


class PatchEmbed(nn.Module):
    config: VimConfig
    options: Options = DEFAULT_OPTIONS

    @nn.compact
    def __call__(self, images):
        cfg = self.config
        x = nn.Conv(cfg.embed_dim, (cfg.patch_size, cfg.patch_size), strides=(cfg.stride, cfg.stride),
                    padding="VALID", precision=self.options.precision, dtype=self.options.dtype, name="proj")(images)
        return rearrange(x, "b h w d -> b (h w) d")  # row-major over the grid


class VisionMamba(nn.Module):
    """The Vim classifier: NHWC images -> (logits, intermediates).

    ``intermediates`` is empty unless ``capture``; then it holds, stacked over the layers
    ``start_layer .. depth - 1`` (n of them): ``residual`` [n, B, L, D], and per branch
    ``fwd`` / ``bwd`` the scan inputs ``u, delta`` and the gate ``z`` [n, B, L, E] and ``B, C``
    [n, B, L, N]; plus ``tokens`` [B, L, D] (embedded input) and ``final`` [B, L, D]
    (after ``norm_f``). ``perturb`` [n + 1, B, L, D]: entry i is added to the residual stream
    r_{start_layer + i} entering layer start_layer + i, the last entry to r_depth, the
    residual stream entering ``norm_f``. The layers before ``start_layer`` run as a separate
    scan whose output does not depend on ``perturb``: a gradient with respect to ``perturb``
    does not pass back through them.
    """

    config: VimConfig
    options: Options = DEFAULT_OPTIONS
    capture: bool = False
    start_layer: int = 0  # the first layer captured and perturbed

    @nn.compact
    def __call__(self, images, perturb=None):
        cfg = self.config
        x = PatchEmbed(cfg, self.options, name="patch_embed")(images)
        Bsz, M, Dm = x.shape

        def token(name):
            return jnp.broadcast_to(self.param(name, _trunc_normal, (1, 1, Dm)), (Bsz, 1, Dm))

        if cfg.cls_token == "middle":
            x = jnp.concatenate([x[:, :M // 2], token("cls_token"), x[:, M // 2:]], axis=1)
        elif cfg.cls_token == "head":
            x = jnp.concatenate([token("cls_token"), x], axis=1)
        elif cfg.cls_token == "double":
            x = jnp.concatenate([token("cls_token_head"), x, token("cls_token_tail")], axis=1)
        if cfg.abs_pos_embed:
            x = x + self.param("pos_embed", _trunc_normal, (1, cfg.seq_len, Dm))
        # residual_in_fp32: the residual stream is at least float32 (float64 stays float64)
        tokens = x.astype(jnp.promote_types(x.dtype, jnp.float32))

        block = functools.partial(Block, cfg, self.options, parent=None)
        carry = (tokens, jnp.zeros_like(tokens))
        no_perturb = jnp.zeros((1, 1, 1), tokens.dtype)

        def init_layers(key):  # depth independent initializations, stacked along axis 0
            one = lambda k: block().init(k, carry, no_perturb)["params"]  # noqa: E731
            return jax.vmap(one)(jax.random.split(key, cfg.depth))

        stacked = self.param("layers", init_layers)

        def run(first, last, carry, perturb, capture, remat=False):
            """Layers first .. last - 1 as one lax.scan (one compiled block body)."""
            n = last - first
            if perturb is None:
                perturb = jnp.zeros((n, 1, 1, 1), tokens.dtype)
            segment = jax.tree.map(lambda a: a[first:last], stacked)
            body = lambda c, xs: block(capture=capture).apply({"params": xs[0]}, c, xs[1])  # noqa: E731
            if remat:  # keep only each layer's input carry (and its captures) for the backward
                body = jax.checkpoint(body)
            return jax.lax.scan(body, carry, (segment, perturb))

        k = self.start_layer
        if k:  # layers before k: no capture and no perturbation (a gradient wrt perturb stops at k)
            carry, _ = run(0, k, carry, None, False)
        layer_perturb = final_perturb = None
        if perturb is not None:  # entries for r_k .. r_{depth-1}, and r_depth (entering norm_f)
            layer_perturb, final_perturb = perturb[:-1], perturb[-1]
        (residual, m), caps = run(k, cfg.depth, carry, layer_perturb, self.capture, self.options.remat)
        residual = residual + m  # r_depth, the residual stream entering norm_f
        if final_perturb is not None:
            residual = residual + final_perturb
        final = make_norm(cfg, "norm_f")(residual)
        head = nn.Dense(cfg.num_classes, precision=self.options.precision, dtype=self.options.dtype,
                        kernel_init=_trunc_normal,
                        name="head")

        if cfg.cls_token != "none":
            features = jnp.mean(final[:, list(cfg.cls_positions)], axis=1)
            logits = head(features)
        elif cfg.final_pool == "none":
            logits = head(final[:, -1])
        elif cfg.final_pool == "mean":
            logits = head(jnp.mean(final, axis=1))
        elif cfg.final_pool == "max":
            logits = jnp.max(head(final), axis=1)
        else:  # "all": per-token logits
            logits = head(final)
        inter = {}
        if self.capture:
            inter = dict(caps, tokens=tokens, final=final)
        return logits, inter


# ------------------------------------------------------------------ public API
def check_images(config: VimConfig, images, *, max_abs: float = 20.0) -> jax.Array:
    """Raise a ValueError naming the problem unless images are a non-empty batch [B, H, W, C] as
    the config wants, of normalized float pixels; return them as a float32 (or float64) array.

    Layout, dtype and an empty batch are checked always (also under ``jax.jit``): integer or
    bool pixels are refused (0..255 is not the model's input). The values are checked only for
    concrete arrays, not tracers: each must be finite and within +-``max_abs``. Normalized
    images hold about -2.1 .. 2.6 (ImageNet mean and std); the bound 20 leaves room for other
    normalizations and random test inputs, while pixels in 0..255 exceed it unless the image is
    nearly black.
    """
    import numpy as np

    if not hasattr(images, "shape"):
        images = np.asarray(images)
    shape = tuple(images.shape)
    want = (config.img_size, config.img_size, config.channels)
    if len(shape) != 4:
        raise ValueError(f"images must be a batch [B, H, W, C] (NHWC) of shape [B, *{want}], got shape {shape}")
    if shape[1:] != want:
        hint = ""
        if shape[1] == config.channels and shape[2:] == want[:2]:
            hint = " (this looks like NCHW: transpose to NHWC with images.transpose(0, 2, 3, 1))"
        elif shape[3] != config.channels:
            hint = f" (expected {config.channels} channels, got {shape[3]})"
        else:
            hint = f" (expected {config.img_size} x {config.img_size} pixels; resize with mamba_jax.preprocess)"
        raise ValueError(f"images of shape {shape} do not fit the model: expected [B, *{want}]{hint}")
    if shape[0] == 0:
        raise ValueError(f"empty batch: images has shape {shape}; pass at least one image")
    use = "use mamba_jax.preprocess (files, PIL images, uint8 arrays) or mamba_jax.normalize(images / 255)"
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images are {images.dtype}: the model takes normalized float images, not raw pixels; "
                         f"{use}")
    # values: concrete arrays only (not tracers, not a multi-host array this host cannot read whole)
    if not isinstance(images, jax.core.Tracer) and getattr(images, "is_fully_addressable", True):
        xp = np if isinstance(images, np.ndarray) else jnp
        finite = xp.isfinite(images).reshape(shape[0], -1).all(axis=1)
        largest = xp.abs(xp.where(xp.isfinite(images), images, 0)).max()
        finite, largest = np.asarray(finite), float(largest)
        if not finite.all():
            raise ValueError(f"images are not finite: image(s) {np.flatnonzero(~finite).tolist()[:10]} hold NaN "
                             "or inf values")
        if largest > max_abs:
            raise ValueError(f"images hold values up to {largest:.4g}: they look like pixels in 0..255, not "
                             f"normalized model inputs (|x| <= {max_abs:g}); {use}")
    images = jnp.asarray(images)
    return images if images.dtype == jnp.float64 else images.astype(jnp.float32)


def init_params(config: VimConfig, key: jax.Array) -> Params:
    """Randomly initialized parameters (Mamba's initializers), as a plain nested dict."""
    model = VisionMamba(config)
    images = jnp.zeros((1, config.img_size, config.img_size, config.channels), jnp.float32)
    return jax.jit(model.init)(key, images)["params"]


@functools.partial(jax.jit, static_argnames=("config", "capture", "start_layer", "options"))
def vim_apply(config: VimConfig, params: Params, images, *, capture: bool = False, perturb=None,
              start_layer: int = 0, options: Options | None = None):
    """Run the classifier on normalized float32 NHWC ``images`` [B, H, W, C].

    Returns ``logits`` [B, num_classes] (per-token [B, L, classes] for final_pool="all"),
    or ``(logits, intermediates)`` when ``capture`` (layout: ``VisionMamba``).
    ``perturb`` [depth - start_layer + 1, B, L, D] (optional) is added to the residual
    streams r_start_layer .. r_depth (r_l enters block l's norm; r_depth enters ``norm_f``):
    its gradient at zero is the gradient with respect to those residual streams.
    ``start_layer`` (default 0): layers before it are neither captured nor perturbed, which
    saves their memory and, under ``jax.grad`` with respect to ``perturb``, their backward pass.
    ``options`` (``mamba_jax.options.Options``; default: float32, matmul precision "highest",
    scan "auto", no remat) sets how it computes: the projections' dtype (the residual stream,
    norms, scan and logits stay float32), the matmul precision, the scan, and ``remat``
    (under a gradient, recompute each layer from ``start_layer`` on in the backward pass).
    """
    images = check_images(config, images)
    options = DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, Options):
        raise TypeError(f"options must be a mamba_jax.options.Options, got {type(options).__name__}")
    if not 0 <= start_layer < config.depth:
        raise ValueError(f"start_layer {start_layer} is outside the model's {config.depth} layers")
    if perturb is not None:
        want = (config.depth - start_layer + 1, images.shape[0], config.seq_len, config.embed_dim)
        if tuple(perturb.shape) != want:
            raise ValueError(f"perturb must have shape {want} (residual streams {start_layer}..{config.depth}, "
                             f"batch, tokens, embed_dim), got {tuple(perturb.shape)}")
    model = VisionMamba(config, options, capture, start_layer)
    logits, inter = model.apply({"params": params}, images, perturb)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return (logits, inter) if capture else logits
