"""MambaLRP (Jafari et al., NeurIPS 2024): conservative relevance propagation for Mamba.

Relevance is input x gradient of a forward pass that computes the same values as the model
but holds some factors constant under differentiation (``Options.lrp_rules``, implemented in
``mamba_jax.mixer``; SPEC section 7):

    "norm"  RMSNorm / LayerNorm divide by a constant: x * sg(rsqrt(mean(x^2) + eps)) * w
    "silu"  silu(x) = x * sg(sigmoid(x)) (after the conv and in the gate)
    "ssm"   y = sg(alpha) u + D u (delta, B and C get no gradient)
    "gate"  y * silu(z) passes half of its gradient to each factor: 0.5 g + 0.5 sg(g)

With all four rules every block is homogeneous of degree one in the embedded tokens apart
from the biases (conv bias, head bias, LayerNorm bias), so by Euler's identity the relevance
sums to the target logit when those are zero. Without rules it is plain gradient x input.
The relevance is taken of the embedded tokens after the class token is inserted and the
position embedding added (Vim: L values, class tokens included).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mamba_jax.config import VimConfig
from mamba_jax.options import DEFAULT as DEFAULT_OPTIONS
from mamba_jax.options import LRP_RULES, Options
from mamba_jax.vim import VisionMamba, check_images


@functools.partial(jax.jit, static_argnames=("config", "options"))
def relevance_and_logits(config: VimConfig, params, images, target, options: Options):
    """(relevance [B, L], logits [B, classes], target [B]) of one forward and backward pass, with
    the rules of ``options.lrp_rules`` (arguments unchecked: ``lrp_relevance`` checks them)."""
    model = VisionMamba(config, options)
    B = images.shape[0]
    # entry 0 of perturb is added to the embedded tokens r_0: its gradient is d logit / d tokens
    perturb = jnp.zeros((config.depth + 1, B, config.seq_len, config.embed_dim), jnp.float32)

    def f(p):
        logits, inter = model.apply({"params": params}, images, p)
        logits = logits.astype(jnp.float32)
        tgt = jnp.argmax(logits, -1) if target is None else jnp.broadcast_to(target, (B,))
        tgt = jax.lax.stop_gradient(tgt)
        return jnp.take_along_axis(logits, tgt[:, None], axis=1).sum(), (logits, inter["tokens"], tgt)

    grads, (logits, tokens, tgt) = jax.grad(f, has_aux=True)(perturb)
    return (tokens * grads[0]).sum(-1), logits, tgt


def lrp_relevance(config: VimConfig, params, images, *, target=None, rules=LRP_RULES,
                  options: Options | None = None, return_logits: bool = False):
    """Token relevance float32 [B, L] of the target logit (class tokens included).

    images: normalized float NHWC [B, H, W, C]; target: None (each image's top-1), an int, or
    one class per image. rules: the MambaLRP rules applied (default all four; ``()`` gives plain
    gradient x input, the baseline it improves on). ``options``: the numerics
    (``mamba_jax.options.Options``; its ``lrp_rules`` are replaced by ``rules``).
    With ``return_logits``: (relevance, logits [B, classes], target [B]).
    """
    from xai.methods import check_target

    images = check_images(config, images)
    check_target(config, target, images.shape[0])
    options = (DEFAULT_OPTIONS if options is None else options).replace(lrp_rules=tuple(rules), remat=False)
    if target is not None:
        target = jnp.asarray(target, jnp.int32)
    relevance, logits, tgt = relevance_and_logits(config, params, images, target, options)
    return (relevance, logits, tgt) if return_logits else relevance
