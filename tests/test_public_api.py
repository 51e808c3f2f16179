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
