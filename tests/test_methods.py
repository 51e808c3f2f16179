"""The explanation methods (xai/methods.py) on a tiny random model: batch equals single and
jit, the two modes differ, gradients and targets, gradients from a later layer, argument errors,
min-max of constant maps, the official attribution where a layer has no positive attention.
The rollout itself is checked by hand in test_rollout.py.

Tolerances (float32, different summation orders only): batch vs single, and gradients or
intermediates from a later layer vs the full pass, 1e-6 absolute (of max(1, max |map|) or of
max |grad|); jit vs eager rtol 1e-6; summed gradients vs the positive-class gradient rtol 1e-5;
default vs given target 1e-7 absolute; targets and min-max by hand compared exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba_jax import VimConfig, init_params, vim_apply
from mamba_jax.options import Options
from xai.methods import METHODS, MODELESS, explain, forward_with_gradients

CFG = VimConfig(embed_dim=16, depth=3, img_size=32, patch_size=8, stride=8, num_classes=5)


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (3, 32, 32, 3))
    return params, images


@pytest.mark.parametrize("mode", ["exact", "official"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single_and_jit(model, method, mode):
    params, images = model
    maps = explain(CFG, params, images, method, start_layer=1, mode=mode)
    assert maps.shape == (3, 4, 4) and maps.dtype == jnp.float32
    assert np.all(np.isfinite(maps)) and np.all(np.asarray(maps) >= 0)
    for i in range(3):
        single = explain(CFG, params, images[i:i + 1], method, start_layer=1, mode=mode)
        np.testing.assert_allclose(maps[i:i + 1], single, rtol=0, atol=1e-6 * max(1.0, float(maps.max())))
    jitted = jax.jit(lambda p, x: explain(CFG, p, x, method, start_layer=1, mode=mode))
    np.testing.assert_allclose(jitted(params, images), maps, rtol=1e-6, atol=1e-9)


def test_modes_differ(model):
    params, images = model
    for method in set(METHODS) - set(MODELESS):
        a = explain(CFG, params, images, method, start_layer=0, mode="exact")
        b = explain(CFG, params, images, method, start_layer=0, mode="official")
        assert float(jnp.abs(a - b).max()) > 1e-4, method


def test_gradients_and_targets(model):
    params, images = model
    logits, _, grads, tgt = forward_with_gradients(CFG, params, images)
    np.testing.assert_array_equal(tgt, jnp.argmax(logits, -1))
    # residual_0 = patch tokens + pos_embed, so d (sum of target logits) / d pos_embed must equal
    # the per-image gradients at layer 0 summed over the batch
    def total(p):
        out = vim_apply(CFG, p, images)
        return jnp.take_along_axis(out, tgt[:, None], 1).sum()

    g_pos = jax.grad(total)(params)["pos_embed"][0]
    np.testing.assert_allclose(grads[0].sum(0), g_pos, rtol=1e-5, atol=1e-6 * float(jnp.abs(g_pos).max()))
    # and the layer-0 gradient is not trivially the last one's
    assert float(jnp.abs(grads[0] - grads[-1]).max()) > 1e-6
    m_default = explain(CFG, params, images, "mamba_attribution", start_layer=1)
    m_given = explain(CFG, params, images, "mamba_attribution", start_layer=1, target=tgt)
    np.testing.assert_allclose(m_default, m_given, atol=1e-7)
    other = (tgt + 1) % CFG.num_classes
    assert float(jnp.abs(explain(CFG, params, images, "mamba_attribution", start_layer=1, target=other)
                         - m_default).max()) > 1e-6


def test_gradients_from_a_later_layer_equal_the_full_backward(model):
    """start_layer=k runs layers < k forward only; the gradients and captures it returns must be
    rows k.. of the full ones (which the test above checks against d/d pos_embed)."""
    params, images = model
    logits, inter, grads, _ = forward_with_gradients(CFG, params, images)
    for k in (1, 2):
        logits_k, inter_k, grads_k, _ = forward_with_gradients(CFG, params, images, start_layer=k)
        assert grads_k.shape == (CFG.depth - k + 1, *grads.shape[1:])
        np.testing.assert_allclose(logits_k, logits, rtol=0, atol=1e-6)
        np.testing.assert_allclose(grads_k, grads[k:], rtol=0, atol=1e-6 * float(jnp.abs(grads).max()))
        np.testing.assert_allclose(inter_k["residual"], inter["residual"][k:], rtol=0, atol=1e-6)
        np.testing.assert_allclose(inter_k["bwd"]["delta"], inter["bwd"]["delta"][k:], rtol=0, atol=1e-6)
    # rematerialized backward: the same numbers, recomputed
    _, _, grads_r, _ = forward_with_gradients(CFG, params, images, start_layer=1,
                                            options=Options(remat=True))
    np.testing.assert_allclose(grads_r, grads[1:], rtol=0, atol=1e-6 * float(jnp.abs(grads).max()))
    a = explain(CFG, params, images, "mamba_attribution", start_layer=1, mode="official")
    b = explain(CFG, params, images, "mamba_attribution", start_layer=1, mode="official", options=Options(remat=True))
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_start_layer_arguments_are_checked(model):
    params, images = model
    with pytest.raises(ValueError, match="start_layer 3 is outside"):
        vim_apply(CFG, params, images, capture=True, start_layer=3)
    with pytest.raises(ValueError, match=r"perturb must have shape \(3, 3, 17, 16\)"):
        vim_apply(CFG, params, images, start_layer=1, perturb=jnp.zeros((2, 3, 17, 16)))


def test_bad_arguments(model):
    params, images = model
    with pytest.raises(ValueError, match="unknown method 'gradcam'"):
        explain(CFG, params, images, "gradcam")
    with pytest.raises(ValueError, match="unknown mode"):
        explain(CFG, params, images, "rollout", mode="approximate")
    with pytest.raises(ValueError, match="start_layer 3 is outside"):
        explain(CFG, params, images, "rollout", start_layer=3)
    with pytest.raises(ValueError, match="one class per image"):
        explain(CFG, params, images, "mamba_attribution", target=[1, 2], start_layer=1)
    with pytest.raises(ValueError, match="one class token"):
        explain(CFG.replace(cls_token="none"), params, images, "rollout")


def test_minmax_of_a_constant_tensor_is_zero_not_nan():
    """The official min-max divides 0 by 0 on a constant tensor; ours returns 0 there and the
    official formula elsewhere (hand-computed values)."""
    from xai.methods import _minmax

    x = jnp.array([[[0.0, 0.0, 0.0], [1.0, 3.0, 2.0]]])
    np.testing.assert_array_equal(_minmax(x, (-1,)), [[[0.0, 0.0, 0.0], [0.0, 1.0, 0.5]]])


def test_official_attribution_finite_where_the_last_layer_has_no_positive_attention():
    """Demo image 11 of the held-out set (seed 1000): the official class-token vector of the
    last layer is <= 0 everywhere, so the official code's map is NaN (0 / 0 in its min-max);
    ours is finite and that layer contributes the identity to the rollout."""
    from mamba_jax import normalize
    from xai.app.demo import DEMO_START_LAYER, demo_model
    from xai.eval.shapes import shapes_dataset01
    from xai.hidden_attention import official_cls_vector, per_layer

    config, params = demo_model()
    images01, _, _ = shapes_dataset01(12, seed=1000)
    x = normalize(images01[11:12])
    _, inter = vim_apply(config, params, x, capture=True, start_layer=config.depth - 1)
    vec = per_layer(config, params, inter, [config.depth - 1],
                    lambda br, A_f, A_b: official_cls_vector(br, A_f, A_b, config.cls_pos),
                    start_layer=config.depth - 1)
    assert float(vec.max()) <= 0.0  # the degenerate case this test is about
    for mode in ("official", "exact"):
        maps = explain(config, params, x, "mamba_attribution", mode=mode, start_layer=DEMO_START_LAYER)
        assert np.isfinite(np.asarray(maps)).all() and float(maps.max()) > 0, mode


def test_methods_without_modes_are_the_token_relevance(model):
    """mamba_lrp / gradient_x_input: the same map in both modes and at any start layer, equal to
    the relevance of ``xai.lrp.lrp_relevance`` on the patch tokens (with and without the rules)."""
    from mamba_jax.options import LRP_RULES
    from xai.lrp import lrp_relevance

    params, images = model
    for method, rules in (("mamba_lrp", LRP_RULES), ("gradient_x_input", ())):
        maps = explain(CFG, params, images, method, target=2, mode="exact")
        np.testing.assert_array_equal(maps, explain(CFG, params, images, method, target=2, mode="official",
                                                    start_layer=2))
        relevance = np.asarray(lrp_relevance(CFG, params, images, target=2, rules=rules))
        patches = np.maximum(relevance[:, list(CFG.patch_positions)], 0).reshape(3, *CFG.grid)
        np.testing.assert_allclose(maps, patches, rtol=0, atol=1e-6 * max(1.0, float(np.abs(patches).max())))
    assert float(jnp.abs(explain(CFG, params, images, "mamba_lrp", target=2)
                         - explain(CFG, params, images, "gradient_x_input", target=2)).max()) > 1e-4
