"""The official evaluation transform of mamba_jax/preprocess.py: normalize, the resize and
centre-crop geometry by hand (truncation of the long side, Python's round for the crop), to_unit
against PIL's own bilinear resize plus crop, grey input made RGB, and a real JPEG.

(Moved from test_data.py: xai.eval.data re-exports these functions, and its load_image01 is
to_unit; test_data.py checks that load_image01 is exactly to_unit.)

Tolerances: normalize rtol 1e-6 (float32 division); everything else exact.
"""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mamba_jax.preprocess import IMAGENET_MEAN, IMAGENET_STD, center_crop_box, normalize, resized_size, to_unit

SHARED_IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "images"


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_normalize():
    x = np.zeros((1, 2, 2, 3), np.float32)
    got = np.asarray(normalize(x))
    want = -np.array(IMAGENET_MEAN) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(got[0, 0, 0], want, rtol=1e-6)


def test_resize_and_crop_geometry():
    assert resized_size(300, 200) == (336, 224)
    assert resized_size(333, 500) == (224, 336)  # int(336.34) truncated
    assert resized_size(500, 375) == (298, 224)  # int(298.67) truncated
    assert resized_size(224, 224) == (224, 224)
    assert center_crop_box(224, 336) == (0, 56)
    # Python's round: halves go to even.
    assert center_crop_box(225, 227) == (0, 2)
    assert center_crop_box(229, 231) == (2, 4)


def test_to_unit_resize_then_crop(tmp_path):
    img = _rgb(200, 301)  # w 301 -> int(224 * 301 / 200) = 337, crop left round(56.5) = 56
    path = tmp_path / "x.png"
    Image.fromarray(img).save(path)
    got = to_unit(path)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    resized = np.asarray(Image.fromarray(img).resize((337, 224), Image.BILINEAR))
    np.testing.assert_array_equal(got, resized[:, 56:280].astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(to_unit(Image.fromarray(img)), got)
    # Grey and RGBA inputs become RGB.
    Image.fromarray(img[..., 0]).save(tmp_path / "g.png")
    grey = to_unit(tmp_path / "g.png")
    np.testing.assert_array_equal(grey[..., 0], grey[..., 2])


@pytest.mark.skipif(not SHARED_IMAGES.is_dir(), reason="shared sample images absent (../shared)")
def test_load_shared_jpeg():
    x = to_unit(SHARED_IMAGES / "1.jpg")
    assert x.shape == (224, 224, 3) and 0.0 <= x.min() and x.max() <= 1.0
