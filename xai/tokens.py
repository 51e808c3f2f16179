"""The explanation methods on Mamba language models: which earlier tokens a next-token prediction used.

A causal language model has no class token: the row explained is that of the predicting position
``position`` (default the last), and the target is the next-token id predicted there (default
its top-1). Every method returns a relevance per token position, [B, T] (0 after ``position``:
the model is causal):

    raw_attention        row ``position`` of each layer's hidden attention, min-max normalized,
                         averaged over channels and the layers from ``start_layer`` on
    rollout              attention rollout of those layers, row ``position``
    mamba_attribution    the rollout with each layer's attention weighted by the positive gradient
                         of the target logit with respect to the residual stream
    unified_attribution  the same over the unified implicit attention (``xai.unified``: conv,
                         SiLU, scan and gate as one matrix per channel)
    mamba_lrp            MambaLRP: embeddings x gradient of the target logit under the four
                         relevance rules (``mamba_jax.options.LRP_RULES``), summed over features;
                         signed, and it sums to the target logit when the conv biases are zero
    gradient_x_input     the same without the rules: the plain baseline MambaLRP improves on

What ``mode`` means here. The official explainability code exists for Vim only; on a causal
model ``mode="official"`` applies its computations with the explained position in place of the
class token: the truncated row (no diagonal, a decay product stopping one step early), the
rank-one rollout I + 1 a^T, and the gradient of the residual stream leaving each layer
(d logit / d r_{l+1}, what the official Block's hook sees with ``fused_add_norm``). ``mode="exact"``
(the default) uses the exact hidden attention: row ``position`` with its diagonal, a true T x T
rollout over the channel mean of the positive part of each layer's matrix, and the gradient of
the residual stream entering each layer (``xai.methods.EXACT_GRADIENT``). ``mamba_lrp`` and
``gradient_x_input`` have no modes (``xai.methods.MODELESS``, as for Vim) and use every layer.
The Vim-specific parts of the official code (the middle class token, the second branch, the
14 x 14 grid) have no counterpart here.

Explaining position p of a sequence is explaining the last position of its first p + 1 tokens (the
model is causal; ``explain_tokens`` runs only those, so that the later tokens do not enter the
per-layer min-max normalizations either). The attention methods' maps are clamped at 0, as Vim's;
batches of any size, under ``jax.jit``.
The same captures feed ``lm_hidden_attention`` / ``lm_unified_attention`` ([B, layers, 1, E, T, T],
the one causal branch) and ``lm_lrp_relevance``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.config import MambaLMConfig
from mamba_jax.lm import _lm_apply, check_options, check_tokens
from mamba_jax.options import LRP_RULES, Options
from xai.hidden_attention import (
    DEFAULT_BUDGET,
    _as_index,
    _layer_alpha,
    _lowest,
    class_token_rows,
)
from xai.methods import (
    GRADIENT_METHODS,
    MODELESS,
    MODES,
    _scale,
    attention_map,
    check_index_target,
    default_start_layer,
)

# the methods of xai.methods (Vim), in its order; GRADIENT_METHODS take a target, MODELESS have no modes
TOKEN_METHODS = ("raw_attention", "rollout", "mamba_attribution", "unified_attribution", "mamba_lrp",
                 "gradient_x_input")
LRP_METHOD_RULES = {"mamba_lrp": LRP_RULES, "gradient_x_input": ()}


# ------------------------------------------------------------------ arguments
def resolve_position(position, length: int) -> int:
    """``position`` (negative counts from the end) as an index in [0, length); a ValueError otherwise."""
    if isinstance(position, bool) or not isinstance(position, (int, np.integer)):
        raise ValueError(f"position must be an integer token index, got {position!r}")
    if not -length <= position < length:
        raise ValueError(f"position {position} is outside the sequence of {length} tokens")
    return int(position) % length


def check_target(config: MambaLMConfig, target, batch: int):
    """``target``: None (each sequence's top-1 next token), an int, or one token id per sequence,
    in [0, vocab_size); returns it as int32 (or None). Values are checked unless traced."""
    if target is None:
        return None
    check_index_target(target, batch, config.vocab_size, per="a token id or one token id per sequence",
                       kind="integer token ids", outside=f"the vocabulary 0..{config.vocab_size - 1}")
    return jnp.broadcast_to(jnp.asarray(target, jnp.int32), (batch,))


def resolve_start_layer(config: MambaLMConfig, start_layer) -> int:
    """None -> ``xai.methods.default_start_layer`` (the official 15 of 24 scaled to the depth)."""
    if start_layer is None:
        return default_start_layer(config)
    if isinstance(start_layer, bool) or not isinstance(start_layer, (int, np.integer)):
        raise ValueError(f"start_layer must be an integer layer index (or None), got {start_layer!r}")
    if not 0 <= start_layer < config.depth:
        raise ValueError(f"start_layer {start_layer} is outside the model's {config.depth} layers "
                         f"(0..{config.depth - 1})")
    return int(start_layer)


def _check_config(config):
    if not isinstance(config, MambaLMConfig):
        raise ValueError(f"these functions explain Mamba language models (MambaLMConfig); got "
                         f"{type(config).__name__} (for Vim use xai.explain)")


# --------------------------------------------------------------- one pass
def forward_with_gradients(config: MambaLMConfig, params, tokens, target=None, *, start_layer: int = 0,
                           options: Options):
    """One forward and backward pass for the prediction at the LAST position of ``tokens`` (callers
    cut the sequence after the explained position): (logits [B, V] there, intermediates, grads, target).

    grads [depth - start_layer + 1, B, T, D]: d logit / d r_k of the target logit for
    k = start_layer .. depth (r_depth enters ``norm_f``), as ``xai.methods.forward_with_gradients``.
    """
    B, T = tokens.shape
    perturb = jnp.zeros((config.depth - start_layer + 1, B, T, config.embed_dim), jnp.float32)

    def f(p):
        logits, inter = _lm_apply(config, params, tokens, p, capture=True, start_layer=start_layer, options=options,
                                  last_only=True)
        at = logits[:, -1]
        tgt = jax.lax.stop_gradient(jnp.argmax(at, -1) if target is None else target)
        return jnp.take_along_axis(at, tgt[:, None], axis=1).sum(), (at, inter, tgt)

    (_, (logits, inter, tgt)), grads = jax.value_and_grad(f, has_aux=True)(perturb)
    return logits, inter, grads, tgt


def _lrp(config, params, tokens, target, options):
    """(relevance [B, T], logits [B, V] at the last position, target [B]): input x gradient of the
    modified forward, for the last position."""
    logits, inter, grads, tgt = forward_with_gradients(config, params, tokens, target, start_layer=0,
                                                       options=options)
    return (inter["tokens"] * grads[0]).sum(-1), logits, tgt


def position_map(config: MambaLMConfig, params, inter, grads, pos: int, *, method: str, mode: str, start_layer: int,
                 budget: int, options: Options):
    """The token map [B, T] of an attention method for row ``pos``, from one captured pass (``inter``
    from ``start_layer`` on; ``grads`` as ``forward_with_gradients``' for the gradient methods).
    The formulas are ``xai.methods``' with ``pos`` in place of the class token."""
    valid = jnp.arange(inter["tokens"].shape[1]) <= pos  # the causal row: nothing after pos

    def minmax(x):
        """min-max over the channels and the valid positions (the structural zeros after ``pos`` excluded)."""
        lo = jnp.where(valid, x, jnp.inf).min(axis=(-2, -1), keepdims=True)
        hi = jnp.where(valid, x, -jnp.inf).max(axis=(-2, -1), keepdims=True)
        return jnp.where(valid, _scale(x, lo, hi), 0.0)

    return attention_map(
        config, params, inter, grads, pos, method=method, mode=mode, start_layer=start_layer, budget=budget,
        options=options, raw_minmax=minmax,
        official_rows=lambda br, A_f, A_b: class_token_rows(br, A_f, A_b, pos, official=True)[0],
        exact_rows=lambda br, A_f, A_b: class_token_rows(br, A_f, A_b, pos, official=False)[0])


@functools.partial(jax.jit, static_argnames=("config", "method", "mode", "start_layer", "budget", "options"))
def _explain_tokens(config, params, tokens, target, *, method, mode, start_layer, budget, options):
    """The map [B, T] of the prediction at the last position of ``tokens``."""
    if method in MODELESS:
        return _lrp(config, params, tokens, target, options.replace(lrp_rules=LRP_METHOD_RULES[method]))[0]
    if method in GRADIENT_METHODS:
        _, inter, grads, _ = forward_with_gradients(config, params, tokens, target, start_layer=start_layer,
                                                    options=options)
    else:
        _, inter = _lm_apply(config, params, tokens, None, capture=True, start_layer=start_layer, options=options,
                             last_only=True)
        grads = None
    token_map = position_map(config, params, inter, grads, tokens.shape[1] - 1, method=method, mode=mode,
                             start_layer=start_layer, budget=budget, options=options)
    return jnp.maximum(token_map, 0.0)


def explain_tokens(config: MambaLMConfig, params, tokens, method: str, *, position: int = -1, target=None,
                   mode: str = "exact", start_layer: int | None = None, budget: int = DEFAULT_BUDGET,
                   options: Options | None = None):
    """Token relevance float32 [B, T] for the next-token prediction at ``position``.

    tokens: integer token ids [B, T]. method: one of ``TOKEN_METHODS`` (module docstring).
    position: the predicting position explained (negative counts from the end; default the last).
    target (the gradient methods): the next-token id explained: None = each sequence's top-1 at
    ``position``, an int, or one id per sequence. mode: "exact" or "official" (module docstring).
    start_layer: the first layer the attention methods use (None: ``default_start_layer``, the
    official 15 of 24 scaled to the depth; the LRP methods always use every layer). options: the
    numerics (``mamba_jax.options.Options``; ``remat`` for long sequences under the gradient
    methods). Arguments are checked first (ValueError naming the problem).
    """
    _check_config(config)
    tokens = check_tokens(config, tokens)
    if method not in TOKEN_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {TOKEN_METHODS}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    position = resolve_position(position, tokens.shape[1])
    start_layer = resolve_start_layer(config, start_layer)
    target = check_target(config, target, tokens.shape[0])
    options = check_options(options)
    if method not in GRADIENT_METHODS:
        target, options = None, options.replace(remat=False)
    if method in MODELESS:
        mode, start_layer = "exact", 0  # one computation whatever the mode: one compilation
    # the model is causal: explaining position p of a sequence is explaining the last position of its
    # first p + 1 tokens; running only those also keeps later tokens out of the per-layer min-max
    length = tokens.shape[1]
    out = _explain_tokens(config, params, tokens[:, :position + 1], target, method=method, mode=mode,
                          start_layer=start_layer, budget=budget, options=options)
    return jnp.pad(out, ((0, 0), (0, length - position - 1)))


# ------------------------------------------------------------ MambaLRP alone
_lrp_jit = jax.jit(_lrp, static_argnames=("config", "options"))


def lm_lrp_relevance(config: MambaLMConfig, params, tokens, *, target=None, position: int = -1, rules=LRP_RULES,
                     options: Options | None = None, return_logits: bool = False):
    """MambaLRP relevance float32 [B, T] of the next-token logit ``target`` at ``position``.

    relevance[t] = sum over features of e_t x d logit / d e_t, taken through a forward pass with
    ``rules`` (default all four of ``LRP_RULES``; ``()``: plain gradient x input). With all four
    and zero conv (and projection) biases it sums to the target logit. With ``return_logits``:
    (relevance, logits [B, V] at ``position``, target [B]).
    """
    _check_config(config)
    tokens = check_tokens(config, tokens)
    position = resolve_position(position, tokens.shape[1])
    target = check_target(config, target, tokens.shape[0])
    options = check_options(options).replace(lrp_rules=tuple(rules), remat=False)
    relevance, logits, tgt = _lrp_jit(config, params, tokens[:, :position + 1], target, options)
    relevance = jnp.pad(relevance, ((0, 0), (0, tokens.shape[1] - position - 1)))  # 0 after: the model is causal
    return (relevance, logits, tgt) if return_logits else relevance


# --------------------------------------------------------- full matrices
@functools.partial(jax.jit, static_argnames=("config", "budget", "start_layer", "options", "unified"))
def _matrices(config, params, tokens, layers, channels, budget, start_layer, options, unified):
    _, inter = _lm_apply(config, params, tokens, None, capture=True, start_layer=start_layer, options=options)

    def one(layer):  # [B, 1, n_channels, T, T]: the Vim functions with one (forward) branch
        if unified:
            from xai.unified import _layer_matrices

            return _layer_matrices(config, params, inter, layer, channels, budget, start_layer, options)
        return _layer_alpha(config, params, inter, layer, channels, budget, start_layer)

    return jnp.stack([one(layers[i]) for i in range(layers.shape[0])], axis=1)


def _lm_matrices(config, params, tokens, layers, channels, budget, options, unified):
    _check_config(config)
    tokens = check_tokens(config, tokens)
    layers = _as_index(layers, config.depth, "layers")
    channels = _as_index(channels, config.d_inner, "channels")
    return _matrices(config, params, tokens, layers, channels, budget, _lowest(layers), check_options(options),
                     unified)


def lm_hidden_attention(config: MambaLMConfig, params, tokens, *, layers=None, channels=None,
                        budget: int = DEFAULT_BUDGET, options: Options | None = None):
    """The hidden attention alpha of a language model: float32 [B, n_layers, 1, n_channels, T, T]
    (one causal branch, lower triangular; y_t = sum_j alpha[t, j] u_j + D u_t, SPEC section 3).
    ``layers`` / ``channels``: 0-based indices (None = all). Size B * layers * E * T^2 * 4 bytes
    (mamba-130m, 1024 tokens: 6.4 GB per layer and sequence): select layers and channels."""
    return _lm_matrices(config, params, tokens, layers, channels, budget, options, unified=False)


def lm_unified_attention(config: MambaLMConfig, params, tokens, *, layers=None, channels=None,
                         budget: int = DEFAULT_BUDGET, options: Options | None = None):
    """The unified implicit attention M (SPEC section 6) of a language model: float32
    [B, n_layers, 1, n_channels, T, T], lower triangular; M x plus the conv-bias and D terms is
    the gated branch output (``xai.unified``)."""
    return _lm_matrices(config, params, tokens, layers, channels, budget, options, unified=True)


# ------------------------------------------------ one name for both families
# Ready for ``xai/__init__.py`` to export under the names (xai.hidden_attention,
# xai.unified_attention, xai.lrp_relevance): a MambaLMConfig goes to the functions above, anything
# else to Vim's (``xai.hidden_attention``, ``xai.unified``, ``xai.lrp``), unchanged.
def hidden_attention(config, params, inputs, **kwargs):
    """``lm_hidden_attention`` for a language model (token ids), else Vim's ``hidden_attention`` (images)."""
    if isinstance(config, MambaLMConfig):
        return lm_hidden_attention(config, params, inputs, **kwargs)
    from xai.hidden_attention import hidden_attention as vim_hidden_attention

    return vim_hidden_attention(config, params, inputs, **kwargs)


def unified_attention(config, params, inputs, **kwargs):
    """``lm_unified_attention`` for a language model (token ids), else Vim's ``unified_attention`` (images)."""
    if isinstance(config, MambaLMConfig):
        return lm_unified_attention(config, params, inputs, **kwargs)
    from xai.unified import unified_attention as vim_unified_attention

    return vim_unified_attention(config, params, inputs, **kwargs)


def lrp_relevance(config, params, inputs, *, target=None, position=None, **kwargs):
    """``lm_lrp_relevance`` for a language model ([B, T], ``position`` default -1), else Vim's
    ``xai.lrp.lrp_relevance`` ([B, L]; ``position`` does not apply)."""
    if isinstance(config, MambaLMConfig):
        return lm_lrp_relevance(config, params, inputs, target=target, position=-1 if position is None else position,
                                **kwargs)
    if position is not None:
        raise ValueError("position applies to language models; a Vim explains its class token")
    from xai.lrp import lrp_relevance as vim_lrp_relevance

    return vim_lrp_relevance(config, params, inputs, target=target, **kwargs)
