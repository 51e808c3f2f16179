"""The Flax Vim (mamba_jax/vim.py) on every scan path: the fused Pallas kernel (interpret mode on
the CPU) and the associative scan against the sequential oracle, through ``vim_apply``.

Tolerances (float32, matmul precision "highest"): logits and intermediates 1e-5 of their max
(different summation orders in the scan); gradients 1e-4 of their max (reductions reordered
over time, batch and channels in the kernel's backward pass).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close

from mamba_jax import VimConfig, init_params, vim_apply
from mamba_jax.options import Options

CFG = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5, d_state=5)


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.PRNGKey(0))
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    return params, images


def _run(params, images, scan):
    opts = Options(scan_method=scan)
    perturb = jnp.zeros((CFG.depth + 1, 2, CFG.seq_len, CFG.embed_dim))

    def f(p):
        logits, inter = vim_apply(CFG, params, images, capture=True, perturb=p, options=opts)
        return logits[:, 1].sum(), (logits, inter)

    (_, (logits, inter)), grads = jax.value_and_grad(f, has_aux=True)(perturb)
    return logits, inter, grads


@pytest.mark.parametrize("scan", ["pallas", "associative"])
def test_scan_paths_match_the_sequential_oracle(model, scan):
    params, images = model
    logits, inter, grads = _run(params, images, "sequential")
    logits_s, inter_s, grads_s = _run(params, images, scan)
    assert_close(logits_s, logits, rtol_of_max=1e-5, name=f"{scan} logits")
    # the same intermediates on every scan path
    assert jax.tree.structure(inter_s) == jax.tree.structure(inter)
    for branch in ("fwd", "bwd"):
        assert sorted(inter_s[branch]) == ["B", "C", "delta", "u", "z"]
        for key in ("u", "delta", "B", "C", "z"):
            assert_close(inter_s[branch][key], inter[branch][key], rtol_of_max=1e-5, name=f"{scan} {branch}.{key}")
    for k in range(CFG.depth + 1):
        assert_close(grads_s[k], grads[k], rtol_of_max=1e-4, name=f"{scan} d logit / d r_{k}")


def test_pallas_forward_without_capture(model):
    """The plain forward pass on the kernel: the same logits as the oracle."""
    params, images = model
    a = vim_apply(CFG, params, images, options=Options(scan_method="pallas"))
    b = vim_apply(CFG, params, images, options=Options(scan_method="sequential"))
    assert_close(a, b, rtol_of_max=1e-5, name="logits")
    assert np.isfinite(np.asarray(a)).all()


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown scan method 'fast'"):
        Options(scan_method="fast")
    with pytest.raises(ValueError, match="matmul precision"):
        Options(precision="float32")
    assert Options(dtype="bfloat16") == Options(dtype=jnp.bfloat16)  # one spelling per dtype: one compile
    with pytest.raises(TypeError, match="options must be"):
        vim_apply(CFG, {}, jnp.zeros((1, 32, 32, 3)), options="bfloat16")
