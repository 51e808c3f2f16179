"""xai/app/plot.py: overlay values worked out by hand, upsampling by hand (torch bilinear,
align_corners=False), figures written atomically as PNGs, bad figure inputs named.

Tolerances: hand-computed upsampling and overlay values 1e-6 absolute (float32 colour
arithmetic), the rest at numpy's default rtol 1e-7 or exact; file checks are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.figure import Figure
from PIL import Image

from xai.app import plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a non-empty PNG"
    with Image.open(path) as im:
        assert im.size[0] > 50 and im.size[1] > 50


def _no_temp_files(folder):
    leftovers = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_upsample_2x2_by_hand():
    # torch bilinear, align_corners=False, 2 -> 4: source coordinates -0.25 (clamped to 0),
    # 0.25, 0.75, 1.25 (clamped to index 1), so each axis interpolates as (0, 1/4, 3/4, 1).
    up = plot.upsample_map(np.array([[0.0, 1.0], [2.0, 3.0]]), 4)
    t = np.array([0.0, 0.25, 0.75, 1.0])
    expected = (2.0 * t[:, None] + t[None, :]) / 3.0  # value 2 r + c, min 0, max 3
    np.testing.assert_allclose(up, expected, atol=1e-6)
    assert up.dtype == np.float32 and up.shape == (4, 4)


def test_upsample_rectangular_size_and_constant_map():
    up = plot.upsample_map(np.arange(6.0).reshape(2, 3), (4, 6))
    assert up.shape == (4, 6) and up.min() == 0.0 and up.max() == pytest.approx(1.0)
    np.testing.assert_array_equal(plot.upsample_map(np.full((3, 3), 7.0), 12), np.zeros((12, 12)))


def test_overlay_zero_map_is_image_blended_with_low_color():
    image = np.broadcast_to(np.array([0.2, 0.4, 0.6], np.float32), (32, 32, 3))
    low = np.array(colormaps["jet"](0.0)[:3])
    np.testing.assert_allclose(low, [0.0, 0.0, 0.5])  # jet starts at dark blue
    out = plot.overlay(image, np.zeros((2, 2)))
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    # 0.5 * (0.2, 0.4, 0.6) + 0.5 * (0, 0, 0.5)
    np.testing.assert_allclose(out[5, 7], [0.1, 0.2, 0.55], atol=1e-6)
    np.testing.assert_allclose(out, np.broadcast_to([0.1, 0.2, 0.55], out.shape), atol=1e-6)


def test_overlay_peak_and_alpha():
    image = np.zeros((16, 16, 3), np.float32)
    m = np.zeros((2, 2))
    m[1, 1] = 1.0
    full = plot.overlay(image, m, alpha=1.0)
    np.testing.assert_allclose(full[15, 15], colormaps["jet"](1.0)[:3], atol=1e-6)  # dark red
    np.testing.assert_allclose(full[0, 0], colormaps["jet"](0.0)[:3], atol=1e-6)
    np.testing.assert_allclose(plot.overlay(image + 0.3, m, alpha=0.0), image + 0.3)
    out = plot.overlay(np.ones((16, 16, 3), np.float32), m)
    assert out.min() >= 0.0 and out.max() <= 1.0
    with pytest.raises(ValueError, match="alpha"):
        plot.overlay(image, m, alpha=1.5)
    with pytest.raises(ValueError, match="H, W, 3"):
        plot.overlay(image[..., 0], m)


def _maps(rng, grid=(4, 4)):
    return {m: rng.random(grid) for m in ("raw_attention", "rollout", "mamba_attribution")}


def test_figures_written_atomically(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.random((64, 64, 3)).astype(np.float32)

    fig = plot.methods_figure(image, _maps(rng), title="a title", path=tmp_path / "methods.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    _assert_png(tmp_path / "methods.png")

    fig = plot.modes_figure(image, {"exact": _maps(rng), "official": _maps(rng)}, tmp_path / "modes.png")
    assert len(fig.axes) == 8
    _assert_png(tmp_path / "modes.png")

    L = 17
    alpha = np.tril(rng.random((2, 3, L, L)) * 10.0 ** -rng.integers(0, 5, (2, 3, L, L)))
    alpha[1] = alpha[1].transpose(0, 2, 1)  # backward branch: upper triangular
    fig = plot.attention_matrices_figure(alpha, [0, 5, 9], layer=3, path=tmp_path / "sub" / "attn.png",
                                         cls_pos=8)
    assert len([ax for ax in fig.axes if ax.images]) == 6  # 2 branches x 3 channels (+ colorbars)
    _assert_png(tmp_path / "sub" / "attn.png")

    plot.attention_matrices_figure(alpha[:1], [0, 5, 9], layer=0, path=tmp_path / "causal.png")  # one branch
    _assert_png(tmp_path / "causal.png")
    _no_temp_files(tmp_path)
    _no_temp_files(tmp_path / "sub")


def test_figure_inputs_checked():
    rng = np.random.default_rng(1)
    image = rng.random((32, 32, 3))
    with pytest.raises(ValueError, match="expected"):
        plot.modes_figure(image, {"exact": _maps(rng), "official": {"rollout": rng.random((4, 4))}})
    with pytest.raises(ValueError, match="channel labels"):
        plot.attention_matrices_figure(rng.random((2, 2, 5, 5)), [0], layer=0)
    with pytest.raises(ValueError, match="cls_pos"):
        plot.attention_matrices_figure(rng.random((2, 1, 5, 5)), [0], layer=0, cls_pos=5)
