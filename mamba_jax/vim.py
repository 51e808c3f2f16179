"""Vision Mamba ("Vim") in Flax, parameter for parameter the official model.

The modules only own parameters; the mathematics lives in ``ssm.py``. Parameter
names follow the official state dict (``patch_embed.proj``, ``layers.i.norm``,
``layers.i.mixer.in_proj`` ...); the blocks are stacked along a leading ``depth``
axis under ``params["layers"]`` and run with ``jax.lax.scan`` (one compiled layer body;
two scans when the first layers are run uncaptured, see ``start_layer``).

The block (norms, causal conv, mixer, fused add + norm) is ``mamba_jax.mixer``'s, shared with
the Mamba language model; its docstring is the glossary from code names to paper symbols.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from einops import rearrange

from mamba_jax.config import VimConfig
from mamba_jax.mixer import init_layers, make_norm, residual_stream
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options

Params = Any

_trunc_normal = nn.initializers.truncated_normal(0.02)


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

    ``intermediates`` holds ``tokens`` [B, L, D] (the embedded input: patches, class token and
    position embedding) and, with ``capture``, stacked over the layers
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

        carry = (tokens, jnp.zeros_like(tokens))
        stacked = self.param("layers", init_layers(cfg, self.options, carry))
        residual, caps = residual_stream(cfg, self.options, stacked, tokens, perturb, start_layer=self.start_layer,
                                         capture=self.capture)  # r_depth, the residual stream entering norm_f
        final = make_norm(cfg, "norm_f", self.options)(residual)
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
        inter = {"tokens": tokens}  # always: the input of relevance propagation (xai.lrp)
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
