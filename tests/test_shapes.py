"""Tests of the procedural shapes data set (xai/shapes.py).

Small images (64 px) keep compilation and rendering fast on CPU; the geometry
is defined in fractions of the side, so nothing here depends on 224.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from xai.eval import shapes
from xai.eval.data import IMAGENET_MEAN, IMAGENET_STD

SIZE = 64


@pytest.fixture(scope="module")
def batch01():
    images, labels, masks, background = shapes.render_items(
        0, jnp.arange(48), img_size=SIZE, normalized=False, with_background=True
    )
    return tuple(np.asarray(a) for a in (images, labels, masks, background))


def test_classes():
    assert len(shapes.SHAPE_CLASSES) >= 8
    assert len(set(shapes.SHAPE_CLASSES)) == len(shapes.SHAPE_CLASSES)


def test_shapes_dtypes_and_ranges(batch01):
    images, labels, masks, _ = batch01
    assert images.shape == (48, SIZE, SIZE, 3) and images.dtype == np.float32
    assert labels.shape == (48,) and labels.dtype == np.int32
    assert masks.shape == (48, SIZE, SIZE) and masks.dtype == bool
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert labels.min() >= 0 and labels.max() < len(shapes.SHAPE_CLASSES)
    assert len(np.unique(labels)) >= 6  # 48 draws over 10 classes


def test_mask_properties(batch01):
    images, _, masks, background = batch01
    area = masks.mean(axis=(1, 2))
    # Diameter 20%-55% of the side: area between ~1% and ~30% of the image.
    assert area.min() > 0.005, area.min()
    assert area.max() < 0.4, area.max()
    # Mostly inside: the mask never covers a whole border row/column.
    for m in masks:
        assert not (m[0].all() or m[-1].all() or m[:, 0].all() or m[:, -1].all())
    # Object pixels differ from what was there before the object was drawn.
    diff = np.abs(images - background).sum(-1)
    for d, m in zip(diff, masks, strict=True):
        assert d[m].mean() > 0.3, d[m].mean()
        # Outside the mask only sensor noise changes the picture.
        assert d[~m].mean() < 0.2, d[~m].mean()


def test_inside_tests_on_reference_points():
    u = jnp.array([0.0, 0.99, 0.5, 0.0])
    v = jnp.array([0.0, 0.99, 0.0, 0.75])
    assert shapes._circle(u, v).tolist() == [True, False, True, True]
    assert shapes._square(u, v).tolist() == [True, False, True, False]
    assert shapes._ring(u, v).tolist() == [False, False, False, True]
    assert shapes._star(jnp.array([0.0, 0.95, 0.5]), jnp.array([0.0, 0.0, 0.45])).tolist() == [
        True,
        True,
        False,
    ]
    assert shapes._cross(jnp.array([0.0, 0.9, 0.6]), jnp.array([0.0, 0.1, 0.6])).tolist() == [
        True,
        True,
        False,
    ]
    # Every shape occupies a sizeable part of the unit square and stays near the unit disc.
    g = jnp.linspace(-1.5, 1.5, 301)
    uu, vv = jnp.meshgrid(g, g)
    outside_disc = uu**2 + vv**2 > 1.15**2
    for name, fn in zip(shapes.SHAPE_CLASSES, shapes._INSIDE, strict=True):
        inside = np.asarray(fn(uu, vv))
        assert inside.mean() > 0.08, name
        assert not inside[np.asarray(outside_disc)].any(), name


def test_deterministic_and_normalized():
    a = shapes.shapes_dataset(4, seed=3, img_size=SIZE)
    b = shapes.shapes_dataset(4, seed=3, img_size=SIZE)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    images01, labels01, masks01 = shapes.shapes_dataset01(4, seed=3, img_size=SIZE)
    np.testing.assert_array_equal(labels01, a[1])
    np.testing.assert_array_equal(masks01, a[2])
    expected = (images01 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(a[0], expected, rtol=1e-6, atol=1e-6)


def test_distinct_seeds_differ():
    a = shapes.shapes_dataset01(4, seed=0, img_size=SIZE)
    b = shapes.shapes_dataset01(4, seed=1, img_size=SIZE)
    assert np.abs(a[0] - b[0]).mean() > 0.05
    assert not np.array_equal(a[2], b[2])


def test_item_independent_of_n_and_chunking():
    small = shapes.shapes_dataset01(3, seed=5, img_size=SIZE)
    large = shapes.shapes_dataset01(7, seed=5, img_size=SIZE, chunk=4)  # padded last chunk
    np.testing.assert_array_equal(small[1], large[1][:3])
    np.testing.assert_array_equal(small[2], large[2][:3])
    np.testing.assert_allclose(small[0], large[0][:3], atol=1e-6)


def test_batches_match_dataset():
    data = shapes.shapes_dataset01(7, seed=2, img_size=SIZE, chunk=4)
    got = list(shapes.shapes_batches(4, seed=2, stop=7, img_size=SIZE, normalized=False))
    assert [len(b[1]) for b in got] == [4, 3]
    for k in range(3):
        np.testing.assert_allclose(np.concatenate([np.asarray(b[k]) for b in got]), data[k], atol=1e-6)
    # An endless generator starting later yields the later items.
    later = next(shapes.shapes_batches(2, seed=2, start=4, img_size=SIZE, normalized=False))
    np.testing.assert_array_equal(np.asarray(later[1]), data[1][4:6])
