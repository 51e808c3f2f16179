"""The Flax Mamba language model (mamba_jax/lm.py): inputs checked, capture and perturb semantics,
the layer split at start_layer, and the published configs. Parity with transformers is in
tests/parity/test_transformers_lm.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from mamba_jax import MambaLMConfig, init_lm_params, lm_apply

CFG = MambaLMConfig(vocab_size=23, hidden_size=16, num_hidden_layers=3, state_size=4, tie_word_embeddings=False)
TOKENS = np.array([[1, 5, 7, 2, 22, 0, 3], [4, 4, 9, 11, 0, 1, 2]])


@pytest.fixture(scope="module")
def params():
    return init_lm_params(CFG, jax.random.PRNGKey(0))


@pytest.mark.parametrize("tokens, message", [
    (np.array([1, 2, 3]), r"got shape \(3,\) \(one sequence: add a batch axis"),
    (np.zeros((2, 3), np.float32), "tokens must be integer token ids, got dtype float32"),
    (np.zeros((2, 3), bool), "tokens must be integer token ids, got dtype bool"),
    (np.array([[1, 23, -1]]), r"token id\(s\) \[-1, 23\] are outside the model's vocabulary 0..22"),
    (np.zeros((0, 4), np.int32), "are empty"),
    ([[1, 2], [3]], "rectangular batch"),
])
def test_bad_tokens_are_named(params, tokens, message):
    with pytest.raises(ValueError, match=message):
        lm_apply(CFG, params, tokens)


def test_other_arguments_checked(params):
    with pytest.raises(TypeError, match="options must be"):
        lm_apply(CFG, params, TOKENS, options="bfloat16")
    with pytest.raises(ValueError, match="perturb must have shape"):
        lm_apply(CFG, params, TOKENS, perturb=jnp.zeros((3, 2, 7, 16)))
    with pytest.raises(ValueError, match="start_layer 3 is not a layer"):
        lm_apply(CFG, params, TOKENS, start_layer=3)
    with pytest.raises(ValueError, match="hidden_size must be positive"):
        MambaLMConfig(hidden_size=0)
    assert MambaLMConfig(time_step_rank="auto").rank == 48


def test_capture_layout_and_start_layer(params):
    logits, inter = lm_apply(CFG, params, TOKENS, capture=True)
    B, T = TOKENS.shape
    assert logits.shape == (B, T, CFG.vocab_size) and logits.dtype == jnp.float32
    assert inter["residual"].shape == (3, B, T, 16) and inter["fwd"]["u"].shape == (3, B, T, CFG.d_inner)
    assert inter["fwd"]["B"].shape == (3, B, T, 4) and "bwd" not in inter
    assert_close(inter["tokens"], params["embeddings"]["embedding"][TOKENS], atol=0, name="embedded tokens")
    assert_close(inter["residual"][0], inter["tokens"], atol=0, name="r_0")
    logits2, inter2 = lm_apply(CFG, params, TOKENS, capture=True, start_layer=2)
    assert_close(logits2, logits, rtol_of_max=1e-6, name="logits with start_layer")
    assert inter2["residual"].shape[0] == 1
    assert_close(inter2["fwd"]["delta"][0], inter["fwd"]["delta"][2], rtol_of_max=1e-6, name="layer 2 delta")
    assert_close(inter2["residual_final"], inter["residual_final"], rtol_of_max=1e-6, name="r_depth")


def test_causal(params):
    """Changing a later token leaves every earlier position's logits unchanged."""
    other = TOKENS.copy()
    other[:, 4:] = (other[:, 4:] + 1) % CFG.vocab_size
    a, b = lm_apply(CFG, params, TOKENS), lm_apply(CFG, params, other)
    np.testing.assert_array_equal(np.asarray(a[:, :4]), np.asarray(b[:, :4]))
    assert not np.allclose(np.asarray(a[:, 4:]), np.asarray(b[:, 4:]))


def test_perturb_gradient_is_the_embedding_gradient(params):
    """d out / d perturb[0] = d out / d r_0: summed over a token's positions it is the gradient
    with respect to that row of the (untied) embedding matrix."""
    cot = jax.random.normal(jax.random.PRNGKey(1), (2, 7, CFG.vocab_size))

    def via_perturb(p):
        return (lm_apply(CFG, params, TOKENS, perturb=p) * cot).sum()

    def via_table(table):
        q = dict(params, embeddings={"embedding": table})
        return (lm_apply(CFG, q, TOKENS) * cot).sum()

    g = jax.grad(via_perturb)(jnp.zeros((4, 2, 7, 16)))[0]
    g_table = jax.grad(via_table)(params["embeddings"]["embedding"])
    expected = jnp.zeros_like(g_table).at[TOKENS.reshape(-1)].add(g.reshape(-1, 16))
    assert_close(g_table, expected, rtol_of_max=1e-5, name="embedding-table gradient")

