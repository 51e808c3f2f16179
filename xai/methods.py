"""The three explanation methods of "The Hidden Attention of Mamba Models", as pure functions.

    raw_attention       per-layer class-token attention, min-max normalized, averaged
    rollout             attention rollout over the layers from ``start_layer`` on
    mamba_attribution   attention weighted by the positive gradient of the target logit
                        with respect to the residual stream, rolled out (official mode: the
                        stream leaving each layer, as the official hook sees it; exact mode:
                        the stream entering it, the more faithful on the demo model)
    unified_attribution the same gradient weighting over the unified implicit attention of
                        the follow-up paper (conv, SiLU, scan and gate in one matrix per
                        channel; ``xai.unified``, SPEC section 6)
    mamba_lrp           MambaLRP: input x gradient of the target logit at the embedded tokens,
                        through a forward whose factors are held constant so that relevance is
                        conserved (``xai.lrp``, SPEC section 7); no mode, no start layer
    gradient_x_input    the plain baseline MambaLRP improves on: input x gradient without the rules

Two modes (SPEC section 4):
  "official" reproduces the official code: the truncated class-token vector (no
     diagonal, decay stopping one step early) and the rank-one rollout I + 1 a^T;
  "exact" uses the exact hidden attention: the class-token row of the combined matrix
     w (alpha_fwd + alpha_bwd) (diagonal included), and a true L x L rollout over the
     channel mean of the positive part max(w (alpha_fwd + alpha_bwd), 0) of the combined
     matrices (deviation from a signed rollout: hidden attention is signed, and with signed
     matrices the row sums of I + A cross zero, so the row normalization blows up).
Both work on any batch size, class-token position and grid, under ``jax.jit``.
Gradients come from zero-valued inputs added to the residual stream (``perturb``) and
``jax.vjp``: no hooks, no state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from einops import rearrange

from mamba_jax.config import VimConfig
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import LRP_RULES, Options
from mamba_jax.vim import vim_apply
from xai.hidden_attention import (
    DEFAULT_BUDGET,
    channel_reduced_matrix,
    exact_cls_row,
    official_cls_vector,
    per_layer,
)
from xai.lrp import relevance_and_logits
from xai.rollout import rank_one, rollout
from xai.unified import layer_terms, unified_channel_reduced_matrix, unified_cls_vector

METHODS = ("raw_attention", "rollout", "mamba_attribution", "unified_attribution", "mamba_lrp", "gradient_x_input")
# the class-dependent methods (they take a target)
GRADIENT_METHODS = ("mamba_attribution", "unified_attribution", "mamba_lrp", "gradient_x_input")
MODELESS = ("mamba_lrp", "gradient_x_input")  # one computation whatever the mode (and start layer)
_LRP_RULES = {"mamba_lrp": LRP_RULES, "gradient_x_input": ()}
MODES = ("exact", "official")
OFFICIAL_START_LAYER, OFFICIAL_DEPTH = 15, 24


def method_modes(method: str, modes):
    """The modes in which ``method`` gives different results: ``modes`` itself, or (None,) for a
    method without modes (``MODELESS``): what a table of methods x modes has one row for."""
    return (None,) if method in MODELESS else tuple(modes)


def default_start_layer(config: VimConfig) -> int:
    """The official start layer (15 of 24) scaled to the model's depth: 5 for 8 layers."""
    return min(config.depth - 1, round(OFFICIAL_START_LAYER * config.depth / OFFICIAL_DEPTH))


def _scale(x, lo, hi):
    """(x - lo) / (hi - lo), and 0 where hi == lo.

    Deviation from the official code, which divides 0 by 0 there and returns NaN: a constant
    tensor happens in practice (on the demo model the official class-token vector of the last
    layer is <= 0 everywhere for 10 of 64 held-out images, so its positive part is all zero),
    and one NaN layer turns the whole rolled-out map into NaN. A layer with nothing to rank
    then contributes zeros. Elsewhere the result is the official one, bit for bit.
    """
    span = hi - lo
    return jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 0.0)


def _minmax(x, axes):
    return _scale(x, x.min(axis=axes, keepdims=True), x.max(axis=axes, keepdims=True))


def _resolve_target(target, logits):
    if target is None:
        return jnp.argmax(logits, axis=-1)
    target = jnp.asarray(target, jnp.int32)
    return jnp.broadcast_to(target, logits.shape[:1])


def forward_with_gradients(config: VimConfig, params, images, target=None, *, start_layer: int = 0,
                           options: Options | None = None):
    """One forward and backward pass: (logits, intermediates, grads, target).

    grads [depth - start_layer + 1, B, L, D]: entry i is d logit_target / d r_k for
    k = start_layer + i, where r_k is the residual stream entering layer k's norm and the last
    entry, r_depth, the residual stream entering ``norm_f`` (total derivatives, per image: the
    images of a batch do not interact, so the gradient of the summed target logits is each
    image's own gradient). Intermediates are captured for layers start_layer .. depth - 1.
    The backward pass stops at ``start_layer``: the layers before it are run once, forward
    only. ``options.remat``: recompute the layers' internals in the backward pass
    (``jax.checkpoint``) instead of keeping them.
    """
    B = images.shape[0]
    perturb = jnp.zeros((config.depth - start_layer + 1, B, config.seq_len, config.embed_dim), jnp.float32)

    def f(p):
        logits, inter = vim_apply(config, params, images, capture=True, perturb=p, start_layer=start_layer,
                                  options=options)
        tgt = jax.lax.stop_gradient(_resolve_target(target, logits))
        return jnp.take_along_axis(logits, tgt[:, None], axis=1).sum(), (logits, inter, tgt)

    (_, (logits, inter, tgt)), grads = jax.value_and_grad(f, has_aux=True)(perturb)
    return logits, inter, grads, tgt


def official_gradients(config: VimConfig, grads):
    """What the official Block's gradient hook holds for each layer of ``grads``' range.

    grads: ``forward_with_gradients``' [n + 1, B, L, D] over r_k .. r_depth. The official
    Block registers its hook on the residual stream it returns. With the fused add + norm
    (``config.fused_add_norm``, every official model) that tensor is an output of the fused op
    and its only consumer is the next block's fused add (or the final add + ``norm_f``), so the
    hook of layer l sees d logit / d r_{l+1}; without the fused op the same tensor also feeds
    layer l's own norm, and the hook sees d logit / d r_l (SPEC section 4). Returns [n, B, L, D].
    """
    return grads[1:] if config.fused_add_norm else grads[:-1]


def _grad_relevance(grads_l):
    """s [..., L]: max over features of the positive gradient, min-max normalized over tokens."""
    s = jnp.maximum(grads_l, 0.0).max(-1)
    return _minmax(s, (-1,))


def _to_grid(config: VimConfig, token_map):
    """[B, L] over tokens -> [B, grid_h, grid_w] over patches (class tokens dropped), clamped at 0."""
    patches = token_map[:, jnp.asarray(config.patch_positions)]
    return jnp.maximum(rearrange(patches, "b (h w) -> b h w", h=config.grid[0]), 0.0)


# The gradient that weighs layer l's matrices in the exact Mamba-Attribution: "input" is
# d logit / d r_l, the gradient of the residual stream entering layer l; "output" is
# d logit / d r_{l+1}, the gradient at the output of layer l's mixer (what the official hook
# sees, and how transformer attribution weighs an attention map). Measured on the demo model
# (benchmarks/exact_gradient.py, held-out shapes, results/h200/exact_gradient): "input" is more
# faithful at every size, AUC- minus AUC+ 39.2 vs 33.9 (64 images), 39.1 vs 36.7 (512), 38.0 vs
# 36.3 (2000), with higher pixel accuracy, mIoU and mAP too. The reason is visible in the last
# layer: the head reads only the class token, so d logit / d r_depth is zero at every other
# token and "output" reduces the last layer's weights to a one-hot at the class token.
EXACT_GRADIENT = "input"


def _exact_gradients(grads, which: str):
    return grads[1:] if which == "output" else grads[:-1]


# Unified-Attribution's exact matrices are computed a slice of the batch at a time: XLA keeps
# about 1 GiB of intermediates per Vim-S image for them whatever the channel chunking (measured
# on the H200: a batch of 128 at once asked for 132 GiB; mamba-130m, 1024 tokens, batch 16 at
# once asked for 867 GiB), so the batch is cut into slices of this many 197-token images,
# scaled by (197 / L)^2 for other lengths (one 1024-token sequence at a time).
UNIFIED_IMAGES_AT_ONCE = 8
_PER_IMAGE = ("x", "c", "z", "u", "delta", "B", "C")  # the layer terms with a batch axis


def unified_slice(L: int) -> int:
    """How many inputs of ``L`` tokens Unified-Attribution's exact matrices take at once."""
    return max(1, int(UNIFIED_IMAGES_AT_ONCE * (197 / L) ** 2))


def _images_at_a_time(fn, terms, n: int | None = None):
    """fn(terms) -> [B, ...], computed on slices of ``n`` inputs (``jax.lax.map``; default
    ``unified_slice`` of the terms' length)."""
    per_image = {br: {k: v for k, v in t.items() if k in _PER_IMAGE} for br, t in terms.items()}
    shared = {br: {k: v for k, v in t.items() if k not in _PER_IMAGE} for br, t in terms.items()}
    n = unified_slice(next(iter(terms.values()))["delta"].shape[1]) if n is None else n

    def one(image):
        t = {br: {**shared[br], **{k: v[None] for k, v in image[br].items()}} for br in terms}
        return fn(t)[0]

    return jax.lax.map(one, per_image, batch_size=n)


def unified_exact_matrices(config, terms, budget: int):
    """[n, B, L, L]: per layer of ``terms`` (``layer_terms`` of each), the channel mean of the
    clamped unified matrix min-max scaled by its own channel and position extremes, computed
    ``unified_slice`` inputs at a time. The exact mode of Unified-Attribution, images and tokens."""
    def weighted(t):
        mean, lo, hi = unified_channel_reduced_matrix(config, t, clamp=True, budget=budget)
        return _scale(mean, lo[:, None, None], hi[:, None, None])

    return jnp.stack([_images_at_a_time(weighted, t) for t in terms])


def mode_gradients(config, grads, mode: str, exact_gradient: str = EXACT_GRADIENT):
    """The per-layer gradients [n, B, L, D] that weigh the matrices in ``mode``, from
    ``forward_with_gradients``' [n + 1, ...]: the official hook's (``official_gradients``) or
    the exact mode's choice (``EXACT_GRADIENT``)."""
    return official_gradients(config, grads) if mode == "official" else _exact_gradients(grads, exact_gradient)


def attention_map(config, params, inter, grads, pos: int, *, method: str, mode: str, start_layer: int, budget: int,
                  options, official_rows, exact_rows, raw_minmax, exact_gradient: str = EXACT_GRADIENT):
    """The token map [B, L] of an attention method (raw_attention, rollout, mamba_attribution,
    unified_attribution) at row ``pos``, from one captured pass: ``inter`` from ``start_layer``
    on, ``grads`` as ``forward_with_gradients``' (None for the methods without gradients).
    One set of formulas for Vim (``pos`` its class token) and the language models (``xai.tokens``:
    the explained position); what differs is given: ``official_rows`` / ``exact_rows``
    (br, A_f, A_b) -> [B, E, L], the official truncated vector and the exact row of the combined
    matrix, and ``raw_minmax``, Raw-Attention's per-layer normalization of [n, B, E, L].

    official: rank-one rollouts of the official vectors (SPEC section 4; Unified-Attribution:
    v_l = clamp(row pos of M^f + J M^b J, 0), no 1/2 and no out_proj, as the official code);
    exact: true L x L rollouts over the channel mean of the clamped combined matrices, min-max
    normalized per layer for the gradient methods (which cancels the branch weight), times
    ``_grad_relevance`` of ``mode_gradients``."""
    layers = range(start_layer, config.depth)
    stack = functools.partial(per_layer, start_layer=start_layer)  # fn over layers, stacked
    s = None if grads is None else _grad_relevance(mode_gradients(config, grads, mode, exact_gradient))  # [n, B, L]
    if method == "unified_attribution":
        terms = [layer_terms(config, params, inter, l, start_layer=start_layer, options=options) for l in layers]
        if mode == "official":
            vec = jnp.stack([unified_cls_vector(config, t, pos) for t in terms])  # [n, B, E, L]
            return rollout(rank_one(_minmax(jnp.maximum(vec, 0.0).mean(-2) * s, (-1,))), pos)
        return rollout(unified_exact_matrices(config, terms, budget) * s[:, :, None, :], pos)

    if mode == "official":
        vec = stack(config, params, inter, layers, official_rows)  # [n, B, E, L]
        if method == "raw_attention":
            return raw_minmax(vec).mean(-2).mean(0)
        if method == "rollout":
            return rollout(rank_one(vec.mean(-2)), pos)
        a = _minmax(jnp.maximum(vec, 0.0), (-2, -1)).mean(-2)  # [n, B, L]
        return rollout(rank_one(a * s), pos)
    if method == "raw_attention":
        return raw_minmax(stack(config, params, inter, layers, exact_rows)).mean(-2).mean(0)
    if method == "rollout":
        # the positive part: signed matrices make the row sums of I + A cross zero (on the
        # demo model they span -122 .. 41), which makes the row normalization ill-conditioned
        mats = stack(config, params, inter, layers,
                     lambda br, A_f, A_b: channel_reduced_matrix(config, br, A_f, A_b, clamp=True, budget=budget,
                                                                extremes=False)[0])
        return rollout(mats, pos)

    def weighted(br, A_f, A_b):
        mean, lo, hi = channel_reduced_matrix(config, br, A_f, A_b, clamp=True, budget=budget)
        return _scale(mean, lo[:, None, None], hi[:, None, None])

    mats = stack(config, params, inter, layers, weighted)  # [n, B, L, L]
    return rollout(mats * s[:, :, None, :], pos)


@functools.partial(jax.jit, static_argnames=("config", "method", "start_layer", "mode", "budget", "options",
                                             "exact_gradient"))
def _explain(config, params, images, target, *, method, start_layer, mode, budget, options,
             exact_gradient=EXACT_GRADIENT):
    if method in MODELESS:  # relevance of the embedded tokens, class tokens dropped by _to_grid
        options = (DEFAULT_OPTIONS if options is None else options).replace(lrp_rules=_LRP_RULES[method])
        return _to_grid(config, relevance_and_logits(config, params, images, target, options)[0])
    pos = config.cls_pos
    # only the layers from start_layer on are captured (and, for the gradient, back-propagated)
    if method in GRADIENT_METHODS:
        _, inter, grads, _ = forward_with_gradients(config, params, images, target, start_layer=start_layer,
                                                    options=options)
    else:
        _, inter = vim_apply(config, params, images, capture=True, start_layer=start_layer, options=options)
        grads = None
    token_map = attention_map(
        config, params, inter, grads, pos, method=method, mode=mode, start_layer=start_layer, budget=budget,
        options=options, exact_gradient=exact_gradient, raw_minmax=lambda x: _minmax(x, (-2, -1)),
        official_rows=lambda br, A_f, A_b: official_cls_vector(br, A_f, A_b, pos),
        exact_rows=lambda br, A_f, A_b: exact_cls_row(config, br, A_f, A_b, pos))
    return _to_grid(config, token_map)


def resolve_start_layer(config: VimConfig, start_layer) -> int:
    """``start_layer`` checked: None -> ``default_start_layer(config)``; else an int in [0, depth)."""
    if start_layer is None:
        return default_start_layer(config)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) and not (
            hasattr(start_layer, "dtype") and getattr(start_layer, "ndim", 1) == 0
            and jnp.issubdtype(start_layer.dtype, jnp.integer)):
        raise ValueError(f"start_layer must be an integer layer index (or None), got {start_layer!r}")
    start_layer = int(start_layer)
    if not 0 <= start_layer < config.depth:
        raise ValueError(f"start_layer {start_layer} is outside the model's {config.depth} layers "
                         f"(0..{config.depth - 1})")
    return start_layer


def check_index_target(target, n: int, size: int, *, per: str, kind: str, outside: str) -> None:
    """Check a target of ``n`` inputs: None, an int, or one int per input, each in [0, size);
    values are checked unless ``target`` is a tracer or spans other processes. The messages name
    the problem with the caller's words: ``per`` (the shape), ``kind`` (the values), ``outside``
    (the range). Shared by images (classes) and language models (token ids)."""
    if target is None:
        return
    shape = tuple(getattr(target, "shape", np.shape(target)))
    if len(shape) > 1 or (len(shape) == 1 and shape[0] != n):
        raise ValueError(f"target must be {per} ({n}), got shape {shape}")
    if isinstance(target, jax.core.Tracer) or not getattr(target, "is_fully_addressable", True):
        return
    t = np.asarray(jax.device_get(target))
    if t.dtype == bool or not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"target must be {kind}, got {target!r} ({t.dtype})")
    bad = t[(t < 0) | (t >= size)]
    if bad.size:
        raise ValueError(f"target {bad.tolist()[:10] if t.ndim else int(t)} is outside {outside}")


def check_target(config: VimConfig, target, n_images: int) -> None:
    """``target``: None, an int, or one int per image, each in [0, num_classes) (values are
    checked unless ``target`` is a tracer)."""
    check_index_target(target, n_images, config.num_classes, per="an int or one class per image",
                       kind="integer class indices",
                       outside=f"the model's {config.num_classes} classes (0..{config.num_classes - 1})")


def check_arguments(config: VimConfig, method: str, mode: str, start_layer: int | None, target, n_images: int):
    """Raise a ValueError naming the problem with ``explain``'s arguments; return the target
    to use (None for the methods that do not depend on the class)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    if config.cls_token in ("none", "double"):
        raise ValueError(f"the explanation methods follow one class token; this model has cls_token="
                         f"{config.cls_token!r}")
    resolve_start_layer(config, start_layer)
    check_target(config, target, n_images)  # also when the method ignores it: a bad target is a mistake
    if target is not None and method not in GRADIENT_METHODS:
        return None  # only the gradient methods depend on the class
    return target


def explain(config: VimConfig, params, images, method: str, *, target=None, start_layer: int | None = None,
            mode: str = "exact", budget: int = DEFAULT_BUDGET, options: Options | None = None):
    """Explanation maps float32 [B, grid_h, grid_w] (class token removed, clamped at 0).

    images: normalized float NHWC images [B, H, W, C] (``mamba_jax.preprocess``); a non-empty
    batch of finite values (``mamba_jax.vim.check_images``: integer pixels or values beyond
    +-20, i.e. 0..255 pixels, are refused).
    method: one of ``METHODS`` ("raw_attention", "rollout", "mamba_attribution",
    "unified_attribution", "mamba_lrp", "gradient_x_input"); mode: "exact" or "official" (the
    last two, ``MODELESS``, ignore it and ``start_layer``: relevance propagates to the input).
    target (the gradient methods, ``GRADIENT_METHODS``, only): None = each image's top-1 class, an
    int, or one class per image, in [0, num_classes). start_layer: the first layer used (0-based); None (the
    default) = ``default_start_layer(config)``, the official 15 of 24 scaled to the model's depth.
    options: how the model computes (``mamba_jax.options.Options``: ``dtype=jnp.bfloat16`` for
    the fast path, the matmul precision, the scan; ``remat=True`` bounds the memory of the
    gradient method on large batches for one more forward pass of the layers).
    All arguments are checked before any computation (ValueError naming the problem).
    """
    from mamba_jax.vim import check_images

    images = check_images(config, images)
    start_layer = resolve_start_layer(config, start_layer)
    target = check_arguments(config, method, mode, start_layer, target, images.shape[0])
    options = DEFAULT_OPTIONS if options is None else options
    if method not in GRADIENT_METHODS:  # remat only matters under a gradient: one compilation either way
        options = options.replace(remat=False)
    if method in MODELESS:  # one compilation whatever the mode and start layer
        mode, start_layer = MODES[0], 0
    return _explain(config, params, images, target, method=method, start_layer=start_layer, mode=mode,
                    budget=budget, options=options)
