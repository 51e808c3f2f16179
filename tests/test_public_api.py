"""The public contract, importable from the package top level exactly as the issues name it."""

import inspect

import numpy as np


def test_contract_names_import_from_the_top_level():
    import convert
    import mamba_jax
    import xai
    from convert import load_checkpoint
    from xai import demo_model, explain, hidden_attention, shapes_dataset

    assert list(inspect.signature(load_checkpoint).parameters) == ["src", "variant"]
    assert inspect.signature(load_checkpoint).parameters["variant"].default is None
    sig = inspect.signature(shapes_dataset)
    assert list(sig.parameters)[:2] == ["n", "seed"] and sig.parameters["seed"].default == 0
    assert inspect.signature(explain).parameters["start_layer"].default is None
    for module, names in ((convert, ["load_checkpoint"]), (xai, ["demo_model", "shapes_dataset", "explain",
                                                                 "hidden_attention"]),
                          (mamba_jax, ["vim_apply", "preprocess", "VimConfig"])):
        for name in names:
            assert name in module.__all__, f"{module.__name__}.{name} is not exported"
    assert callable(demo_model) and callable(hidden_attention)


def test_demo_model_explained_with_the_defaults():
    """``xai.explain(*demo_model(), images, method)`` works on the 8-layer demo model: the
    default start layer is the official 15 of 24 scaled to its depth (5)."""
    from xai import default_start_layer, demo_model, explain, shapes_dataset

    config, params = demo_model()
    images, labels, masks = shapes_dataset(2, seed=3)
    assert images.shape == (2, 224, 224, 3) and labels.shape == (2,) and masks.shape == (2, 224, 224)
    assert default_start_layer(config) == 5
    maps = explain(config, params, images, "raw_attention")
    np.testing.assert_array_equal(maps, explain(config, params, images, "raw_attention", start_layer=5))
    assert maps.shape == (2, *config.grid) and np.isfinite(np.asarray(maps)).all()


def test_language_model_contract():
    """Issues 12 and 14 name these: importable as written, with the named keyword defaults, and
    the three shared names take either model family."""
    import jax.numpy as jnp

    import mamba_jax
    import xai
    from mamba_jax import lm_apply
    from xai import demo_lm, explain_tokens, hidden_attention, lrp_relevance, unified_attention

    for name in ("lm_apply", "MambaLMConfig"):
        assert name in mamba_jax.__all__
    for name in ("explain_tokens", "lrp_relevance", "unified_attention", "hidden_attention", "demo_lm"):
        assert name in xai.__all__
    assert inspect.signature(lm_apply).parameters["capture"].default is False
    p = inspect.signature(explain_tokens).parameters
    assert (p["position"].default, p["target"].default, p["mode"].default) == (-1, None, "exact")
    config, params = demo_lm()
    tokens = jnp.zeros((2, 9), jnp.int32)
    assert lm_apply(config, params, tokens).shape == (2, 9, config.vocab_size)
    assert lrp_relevance(config, params, tokens).shape == (2, 9)
    assert hidden_attention(config, params, tokens, layers=[0], channels=[0]).shape == (2, 1, 1, 1, 9, 9)
    assert unified_attention(config, params, tokens, layers=[1], channels=[0, 1]).shape == (2, 1, 1, 2, 9, 9)
    vim_config, vim_params = xai.demo_model()
    images, _, _ = xai.shapes_dataset(1, seed=3)
    assert lrp_relevance(vim_config, vim_params, images).shape == (1, vim_config.seq_len)
