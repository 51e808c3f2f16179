"""Token explanations of a language model (xai/tokens.py) against independent computations.

Oracles: the full hidden-attention matrices (y = alpha u + D u, SPEC section 3) and the unified
matrices (y silu(z) = M x + bias and D terms, section 6) rebuilt here from the captures; raw
attention and rollout recomputed by hand in numpy from those matrices; batch = single sequences;
MambaLRP's conservation (section 7) and plain gradient x input without rules.

Tolerances (float32): identities 2e-5 of max (sequential scan vs matrix products); maps 1e-5 of
max (the same numbers, other summation orders); conservation 1e-5 relative.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from mamba_jax import MambaLMConfig, VimConfig, init_lm_params, lm_apply
from mamba_jax.ssm import scan_sequential
from xai.methods import METHODS, MODELESS
from xai.tokens import (
    MODES,
    TOKEN_METHODS,
    explain_tokens,
    lm_hidden_attention,
    lm_lrp_relevance,
    lm_unified_attention,
)

CFG = MambaLMConfig(vocab_size=29, hidden_size=16, num_hidden_layers=3, state_size=4, conv_kernel=3,
                    time_step_rank=3)
NO_BIAS = CFG.replace(use_conv_bias=False)
TOKENS = np.array([[3, 7, 1, 28, 5, 5, 0, 12, 9], [2, 2, 14, 6, 8, 20, 1, 3, 4]])
POS = 6


@functools.cache
def model(config=CFG):
    params = init_lm_params(config, jax.random.PRNGKey(3))
    # spread the structured inits so that every term matters
    mixer = params["layers"]["mixer"]
    k = iter(jax.random.split(jax.random.PRNGKey(4), 8))
    mixer["A_log"] = mixer["A_log"] + 0.5 * jax.random.normal(next(k), mixer["A_log"].shape)
    mixer["D"] = mixer["D"] + jax.random.normal(next(k), mixer["D"].shape)
    mixer["dt_proj"]["bias"] = mixer["dt_proj"]["bias"] + jax.random.normal(next(k), mixer["dt_proj"]["bias"].shape)
    return params


def _captures(config, params):
    return lm_apply(config, params, TOKENS, capture=True)[1]


def test_hidden_attention_identity():
    params = model()
    alpha = np.asarray(lm_hidden_attention(CFG, params, TOKENS))  # [B, L, 1, E, T, T]
    assert alpha.shape == (2, 3, 1, CFG.d_inner, 9, 9)
    assert np.all(np.triu(alpha, 1) == 0), "causal: alpha is lower triangular"
    inter = _captures(CFG, params)
    for l in range(3):
        f = {k: v[l] for k, v in inter["fwd"].items()}
        A = -jnp.exp(params["layers"]["mixer"]["A_log"][l])
        D = params["layers"]["mixer"]["D"][l]
        y = jax.vmap(scan_sequential, in_axes=(0, 0, None, 0, 0, None))(f["u"], f["delta"], A, f["B"], f["C"], D)
        via_alpha = np.einsum("betj,bje->bte", alpha[:, l, 0], f["u"]) + np.asarray(D * f["u"])
        assert_close(via_alpha, y, rtol_of_max=2e-5, name=f"alpha u + D u, layer {l}")
    sub = lm_hidden_attention(CFG, params, TOKENS, layers=[2], channels=[0, 5])
    assert_close(sub, alpha[:, 2:3, :, [0, 5]], atol=1e-7, name="selected layers and channels")


def test_unified_attention_identity():
    """M x + silu(z) (alpha (sigmoid(c) b) + D u) = y silu(z) on the language model's layers."""
    from xai.unified import layer_terms

    params = model()
    M = np.asarray(lm_unified_attention(CFG, params, TOKENS, layers=[0, 2]))
    assert M.shape == (2, 2, 1, CFG.d_inner, 9, 9) and np.all(np.triu(M, 1) == 0)
    inter = _captures(CFG, params)
    alpha = np.asarray(lm_hidden_attention(CFG, params, TOKENS, layers=[0, 2]))
    for i, l in enumerate((0, 2)):
        t = layer_terms(CFG, params, inter, l)["fwd"]
        y = jax.vmap(scan_sequential, in_axes=(0, 0, None, 0, 0, None))(t["u"], t["delta"], t["A"], t["B"], t["C"],
                                                                         t["D"])
        gate = jax.nn.silu(t["z"])
        bias_term = np.einsum("betj,bje->bte", alpha[:, i, 0], jax.nn.sigmoid(t["c"]) * t["bias"])
        rhs = np.einsum("betj,bje->bte", M[:, i, 0], t["x"]) + gate * (bias_term + t["D"] * t["u"])
        assert_close(rhs, y * gate, rtol_of_max=2e-5, name=f"unified identity, layer {l}")


def _minmax(x):
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def _rollout(mats, row):
    """Row ``row`` of prod (I + A_l) / rowsum, later layers on the left, by hand."""
    r = np.eye(mats.shape[-1])[row]
    for m in mats[::-1]:
        m = m + np.eye(m.shape[-1])
        r = r @ (m / m.sum(-1, keepdims=True))
    return r


def test_exact_maps_from_the_full_matrices():
    params = model()
    alpha = np.asarray(lm_hidden_attention(CFG, params, TOKENS), np.float64)[:, :, 0]  # [B, L, E, T, T]
    raw = np.asarray(explain_tokens(CFG, params, TOKENS, "raw_attention", position=POS, start_layer=1))
    roll = np.asarray(explain_tokens(CFG, params, TOKENS, "rollout", position=POS, start_layer=1))
    for b in range(2):
        rows = alpha[b, 1:, :, POS, :POS + 1]  # layers 1, 2; the valid positions
        want = np.zeros(9)
        want[:POS + 1] = np.mean([_minmax(r).mean(0) for r in rows], axis=0)
        assert_close(raw[b], want, rtol_of_max=1e-5, name=f"raw attention, sequence {b}")
        mats = np.maximum(alpha[b, 1:], 0).mean(1)  # channel mean of the positive part
        assert_close(roll[b], np.maximum(_rollout(mats, POS), 0), rtol_of_max=1e-5, name=f"rollout, sequence {b}")


@pytest.mark.parametrize("mode", [m if m == "exact" else pytest.param(m, marks=pytest.mark.slow) for m in MODES])
def test_every_method_in_both_modes(mode):
    """Every method: [B, T], finite, nothing after the explained position, attention maps >= 0.
    (The official mode, 10 more compilations, is slow; explain-text and the demo job run it too.)"""
    params = model()
    for method in TOKEN_METHODS:
        full = np.asarray(explain_tokens(CFG, params, TOKENS, method, position=POS, mode=mode, start_layer=0))
        assert full.shape == TOKENS.shape and np.isfinite(full).all()
        assert np.all(full[:, POS + 1:] == 0), f"{method}: relevance after the explained position"
        assert np.abs(full[:, :POS + 1]).max() > 0, f"{method} ({mode}): an all-zero map"
        if method not in MODELESS:  # the attention methods; the LRP methods are signed
            assert np.all(full >= 0)


@pytest.mark.parametrize("method", ["mamba_attribution", "unified_attribution"])
def test_batch_equals_single_sequences(method):
    """The sequences of a batch do not interact; position p of a sequence = the last position of
    its first p + 1 tokens."""
    params = model()
    full = np.asarray(explain_tokens(CFG, params, TOKENS, method, position=POS, start_layer=0))
    for b in range(2):
        alone = np.asarray(explain_tokens(CFG, params, TOKENS[b:b + 1, :POS + 1], method, start_layer=0))
        assert_close(full[b, :POS + 1], alone[0], rtol_of_max=1e-5, atol=1e-7, name=f"{method} b={b}")


def test_target_defaults_to_the_top1():
    params = model()
    top = np.asarray(lm_apply(CFG, params, TOKENS)[:, POS].argmax(-1))
    for method in ("mamba_attribution", "mamba_lrp"):
        a = explain_tokens(CFG, params, TOKENS, method, position=POS, start_layer=0)
        b = explain_tokens(CFG, params, TOKENS, method, position=POS, target=top, start_layer=0)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        c = explain_tokens(CFG, params, TOKENS, method, position=POS, target=(top + 1) % 29, start_layer=0)
        assert not np.allclose(np.asarray(a), np.asarray(c)), f"{method} ignores the target"


def test_lrp_conserves_the_target_logit():
    params = model(NO_BIAS)
    rel, logits, tgt = lm_lrp_relevance(NO_BIAS, params, TOKENS, position=POS, return_logits=True)
    assert logits.shape == (2, 29)
    logit = np.asarray(logits)[np.arange(2), np.asarray(tgt)]
    assert_close(np.asarray(rel).sum(-1), logit, rtol_of_max=1e-5, name="sum of relevance vs logit")
    # not conserved without the rules (plain gradient x input)
    plain = lm_lrp_relevance(NO_BIAS, params, TOKENS, position=POS, rules=())
    assert np.abs(np.asarray(plain).sum(-1) - logit).max() > 1e-2 * np.abs(logit).max()


def test_plain_gradient_times_input_without_rules():
    params = model()
    tgt = np.array([4, 17])

    def logit(e):  # the embedded tokens as the input
        p = jnp.zeros((CFG.depth + 1, 2, 9, 16)).at[0].set(e - params["embeddings"]["embedding"][TOKENS])
        return lm_apply(CFG, params, TOKENS, perturb=p)[np.arange(2), POS, tgt].sum()

    e = params["embeddings"]["embedding"][TOKENS]
    want = (e * jax.grad(logit)(e)).sum(-1)
    got = lm_lrp_relevance(CFG, params, TOKENS, position=POS, target=tgt, rules=())
    assert_close(got, want, rtol_of_max=1e-5, name="gradient x input")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="attention"), "unknown method 'attention'"),
    (dict(method="rollout", mode="fast"), "unknown mode 'fast'"),
    (dict(method="rollout", position=9), "position 9 is outside the sequence of 9 tokens"),
    (dict(method="rollout", position=1.5), "position must be an integer"),
    (dict(method="mamba_lrp", target=29), r"target 29 is outside the vocabulary 0..28"),
    (dict(method="mamba_lrp", target=[1, 2, 3]), "one token id per sequence"),
    (dict(method="rollout", start_layer=3), "start_layer 3 is outside the model's 3 layers"),
])
def test_bad_arguments_are_named(kwargs, message):
    method = kwargs.pop("method")
    with pytest.raises(ValueError, match=message):
        explain_tokens(CFG, model(), TOKENS, method, **kwargs)


def test_the_same_methods_as_vim():
    assert TOKEN_METHODS == METHODS


def test_vim_configs_are_refused():
    with pytest.raises(ValueError, match="explain Mamba language models"):
        explain_tokens(VimConfig(), {}, TOKENS, "rollout")


def test_one_name_for_both_families():
    from xai import tokens

    params = model()
    np.testing.assert_array_equal(tokens.hidden_attention(CFG, params, TOKENS, layers=[2], channels=[0, 5]),
                                  lm_hidden_attention(CFG, params, TOKENS, layers=[2], channels=[0, 5]))
    np.testing.assert_array_equal(tokens.lrp_relevance(CFG, params, TOKENS, position=POS),
                                  lm_lrp_relevance(CFG, params, TOKENS, position=POS))
    with pytest.raises(ValueError, match="position applies to language models"):
        tokens.lrp_relevance(VimConfig(), {}, np.zeros((1, 224, 224, 3)), position=3)


def test_unified_matrices_in_slices_equal_all_at_once():
    """Unified-Attribution's exact matrices are computed a slice of the batch at a time (one
    1024-token sequence at a time, ``xai.methods.unified_slice``): slices of one sequence give the
    batch's numbers."""
    from xai.methods import _images_at_a_time, unified_slice
    from xai.unified import layer_terms, unified_channel_reduced_matrix

    assert unified_slice(197) == 8 and unified_slice(1024) == 1 and unified_slice(64) == 75
    params = model()
    terms = layer_terms(CFG, params, _captures(CFG, params), 1, start_layer=0, options=None)

    def mean(t):
        return unified_channel_reduced_matrix(CFG, t, clamp=True)[0]

    assert_close(_images_at_a_time(mean, terms, n=1), mean(terms), rtol_of_max=1e-6, name="one at a time")
