"""The Mamba-1 language model in Flax: embedding, the shared blocks, norm_f, a tied head.

    tokens [B, T] -> embeddings r_0 [B, T, D] -> Block_0 .. Block_{n-1} (``mamba_jax.mixer``:
    fused add + norm, then the causal Mixer) -> r_n = r_{n-1} + m_{n-1} -> norm_f -> logits
    = final @ embeddings^T (or ``lm_head`` when ``tie_word_embeddings`` is False) [B, T, V]

The blocks are Vim's (one causal branch: ``MambaLMConfig.bimamba == "none"``), stacked along a
leading layer axis under ``params["layers"]`` and run with ``jax.lax.scan``
(``mamba_jax.mixer.residual_stream``), so everything that reads a Vim's captures (hidden
attention, the methods) reads the language model's too. Parameter names follow transformers'
``MambaForCausalLM`` (``backbone.embeddings``, ``backbone.layers.i.{norm, mixer.*}``,
``backbone.norm_f``, ``lm_head``); ``convert.lm_mapping`` is the table.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mamba_jax.config import MambaLMConfig
from mamba_jax.mixer import init_layers, make_norm, residual_stream
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import Options

Params = Any

_normal = nn.initializers.normal(0.02)


class MambaLM(nn.Module):
    """The causal language model: token ids [B, T] -> (logits [B, T, V], intermediates).

    ``intermediates`` always holds ``tokens`` [B, T, D], the embedded input r_0 (the input of
    relevance propagation); with ``capture``, as ``VisionMamba``'s: ``residual`` [n, B, T, D]
    (the residual stream entering each of the layers ``start_layer .. depth - 1``), ``fwd`` (the
    one branch's scan inputs ``u, delta`` and gate ``z`` [n, B, T, E], ``B, C`` [n, B, T, N]),
    ``residual_final`` [B, T, D] (r_depth, the residual stream entering ``norm_f``) and ``final``
    [B, T, D] (after ``norm_f``). ``perturb`` [n + 1, B, T, D]: entry i is added to
    r_{start_layer + i}, the last entry to r_depth, the residual stream entering ``norm_f``.
    """

    config: MambaLMConfig
    options: Options = DEFAULT_OPTIONS
    capture: bool = False
    start_layer: int = 0
    last_only: bool = False  # logits of the last position alone, [B, 1, V] (what an explanation needs)

    @nn.compact
    def __call__(self, token_ids, perturb=None):
        cfg, o = self.config, self.options
        embed = nn.Embed(cfg.vocab_size, cfg.embed_dim, embedding_init=_normal, name="embeddings")
        tokens = embed(token_ids)
        tokens = tokens.astype(jnp.promote_types(tokens.dtype, jnp.float32))  # residual_in_fp32
        stacked = self.param("layers", init_layers(cfg, o, (tokens, jnp.zeros_like(tokens))))
        residual, caps = residual_stream(cfg, o, stacked, tokens, perturb, start_layer=self.start_layer,
                                         capture=self.capture)
        final = make_norm(cfg, "norm_f", o)(residual)
        read = final[:, -1:] if self.last_only else final  # the head is V x D per position: skip the unused ones
        if cfg.tie_word_embeddings:
            dtype = o.dtype or jnp.result_type(read, embed.embedding)
            logits = jnp.einsum("btd,vd->btv", read.astype(dtype), embed.embedding.astype(dtype),
                                precision=o.precision)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, precision=o.precision, dtype=o.dtype,
                              kernel_init=_normal, name="lm_head")(read)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
        inter = {"tokens": tokens}
        if self.capture:
            inter = dict(caps, tokens=tokens, residual_final=residual, final=final)
        return logits, inter


# ------------------------------------------------------------------ public API
def check_tokens(config: MambaLMConfig, tokens) -> jax.Array:
    """Raise a ValueError naming the problem unless ``tokens`` is a non-empty batch [B, T] of
    integer token ids in [0, vocab_size); return it as an int32 array.

    Shape and dtype are checked always (also under ``jax.jit``), the values only for concrete
    arrays (an out-of-range id would silently read a clamped embedding row).
    """
    if not hasattr(tokens, "shape"):
        try:
            tokens = np.asarray(tokens)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"tokens must be a rectangular batch [B, T] of token ids ({e})") from None
    shape = tuple(tokens.shape)
    if len(shape) != 2:
        hint = " (one sequence: add a batch axis, tokens[None])" if len(shape) == 1 else ""
        raise ValueError(f"tokens must be a batch of token ids [B, T], got shape {shape}{hint}")
    if 0 in shape:
        raise ValueError(f"tokens of shape {shape} are empty: pass at least one sequence of at least one token")
    if tokens.dtype == bool or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be integer token ids, got dtype {tokens.dtype} (a tokenizer's output, "
                         "not embeddings or text)")
    if not isinstance(tokens, jax.core.Tracer) and getattr(tokens, "is_fully_addressable", True):
        values = np.asarray(jax.device_get(tokens))
        bad = values[(values < 0) | (values >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id(s) {sorted(set(bad.tolist()))[:10]} are outside the model's vocabulary "
                             f"0..{config.vocab_size - 1}")
    return jnp.asarray(tokens, jnp.int32)


def check_options(options) -> Options:
    """``options`` or the default; a TypeError unless it is an ``Options``."""
    options = DEFAULT_OPTIONS if options is None else options
    if not isinstance(options, Options):
        raise TypeError(f"options must be a mamba_jax.options.Options, got {type(options).__name__}")
    return options


def init_lm_params(config: MambaLMConfig, key: jax.Array) -> Params:
    """Randomly initialized parameters (Mamba's initializers for the blocks, N(0, 0.02) for the
    embedding), as a plain nested dict."""
    return jax.jit(MambaLM(config).init)(key, jnp.zeros((1, 1), jnp.int32))["params"]


@functools.partial(jax.jit, static_argnames=("config", "capture", "start_layer", "options", "last_only"))
def _lm_apply(config, params, tokens, perturb, *, capture, start_layer, options, last_only=False):
    return MambaLM(config, options, capture, start_layer, last_only).apply({"params": params}, tokens, perturb)


def lm_apply(config: MambaLMConfig, params: Params, tokens, *, capture: bool = False, perturb=None,
             start_layer: int = 0, options: Options | None = None):
    """Next-token logits float32 [B, T, V] of integer ``tokens`` [B, T] (jitted).

    Returns ``logits``, or ``(logits, intermediates)`` when ``capture`` (layout: ``MambaLM``).
    ``perturb`` [depth - start_layer + 1, B, T, D] (optional) is added to the residual streams
    r_start_layer .. r_depth (r_0 is the embedded tokens; r_depth enters ``norm_f``): its
    gradient at zero is the gradient with respect to them, as for ``vim_apply``.
    ``start_layer``: layers before it are neither captured nor perturbed. ``options``: the
    numerics (``mamba_jax.options.Options``). Bad tokens are a ValueError naming the problem.
    """
    tokens = check_tokens(config, tokens)
    options = check_options(options)
    if isinstance(start_layer, bool) or not isinstance(start_layer, int) or not 0 <= start_layer < config.depth:
        raise ValueError(f"start_layer {start_layer!r} is not a layer of the model's {config.depth} "
                         f"(0..{config.depth - 1})")
    if perturb is not None:
        want = (config.depth - start_layer + 1, *tokens.shape, config.embed_dim)
        if tuple(perturb.shape) != want:
            raise ValueError(f"perturb must have shape {want} (residual streams {start_layer}..{config.depth}, "
                             f"batch, tokens, hidden_size), got {tuple(perturb.shape)}")
    logits, inter = _lm_apply(config, params, tokens, perturb, capture=capture, start_layer=start_layer,
                              options=options)
    return (logits, inter) if capture else logits
