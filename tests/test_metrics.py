"""Tests of the evaluation metrics (xai/metrics.py) against hand-computed values.

Tolerances: upsample vs torch 1e-5 (float32 bilinear weights, sums of <= 4
terms); AP vs a float64 numpy oracle 1e-6 (float32 precision ratios).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xai.eval import metrics
from xai.eval.data import IMAGENET_MEAN, IMAGENET_STD

# --------------------------------------------------------------------------- upsample


@pytest.mark.parametrize(
    "hw, size",
    [((14, 14), (224, 224)), ((7, 5), (16, 11)), ((3, 4), (3, 4)), ((16, 12), (5, 7)), ((1, 6), (4, 9))],
)
def test_upsample_matches_torch(hw, size):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(2, *hw)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], size=size, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    got = np.asarray(metrics.upsample(x, size))
    err = np.abs(got - want)
    assert got.shape == want.shape
    assert err.max() < 1e-5, f"max {err.max():.3g} mean {err.mean():.3g}"


def test_upsample_scale_factor_16_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).random((3, 14, 14), dtype=np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x)[:, None], scale_factor=16, mode="bilinear", align_corners=False
    )[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(metrics.upsample(x, 224)), want, atol=1e-5, rtol=0)


def test_upsample_hand_values():
    # 1 x 2 -> 1 x 4: src x = (i + 0.5) / 2 - 0.5 = -0.25 (clamped 0), 0.25, 0.75, 1.25 (clamped).
    got = metrics.upsample(jnp.array([[[0.0, 4.0]]]), (1, 4))
    np.testing.assert_allclose(np.asarray(got)[0, 0], [0.0, 1.0, 3.0, 4.0], atol=1e-6)


# --------------------------------------------------------------------------- perturbation


def test_perturbation_counts():
    assert metrics.perturbation_counts(16) == (0, 1, 3, 4, 6, 8, 9, 11, 12, 14)
    counts = metrics.perturbation_counts(224 * 224)
    assert counts == (0, 5017, 10035, 15052, 20070, 25088, 30105, 35123, 40140, 45158)


def test_removal_ranks_4x4():
    m = jnp.arange(16.0).reshape(1, 4, 4)
    pos = np.asarray(metrics.removal_ranks(m, (4, 4), positive=True))[0]
    neg = np.asarray(metrics.removal_ranks(m, (4, 4), positive=False))[0]
    np.testing.assert_array_equal(pos, 15 - np.arange(16).reshape(4, 4))
    np.testing.assert_array_equal(neg, np.arange(16).reshape(4, 4))
    # Ties: lower row-major index removed first, in both tests.
    tied = jnp.array([[[1.0, 2.0], [2.0, 1.0]]])
    np.testing.assert_array_equal(np.asarray(metrics.removal_ranks(tied, (2, 2), positive=True))[0], [[2, 0], [1, 3]])
    np.testing.assert_array_equal(np.asarray(metrics.removal_ranks(tied, (2, 2), positive=False))[0], [[0, 2], [3, 1]])


def test_perturb_top_half_of_4x4():
    images = jnp.ones((1, 4, 4, 3))
    ranks = metrics.removal_ranks(jnp.arange(16.0).reshape(1, 4, 4), (4, 4), positive=True)
    out = np.asarray(metrics.perturb(images, ranks, 8))[0]  # k = 0.5 of 16
    np.testing.assert_array_equal(out[:2], 1.0)
    np.testing.assert_array_equal(out[2:], 0.0)
    out = np.asarray(metrics.perturb(images, ranks, 1))[0]  # k = 0.1: int(1.6) = 1
    assert out[3, 3].tolist() == [0.0, 0.0, 0.0] and out.sum() == 45.0


def _corner_classifier(images):
    """Class 1 while pixel (0, 0) is not black (in normalized units), else class 0."""
    black = -jnp.asarray(IMAGENET_MEAN) / jnp.asarray(IMAGENET_STD)
    is_black = jnp.all(jnp.abs(images[:, 0, 0] - black) < 1e-5, axis=-1)
    return jnp.stack([is_black, ~is_black], axis=-1).astype(jnp.float32)


def test_perturbation_hits_hand_example():
    images = jnp.full((2, 4, 4, 3), 0.5)
    m = jnp.stack([jnp.arange(16.0), -jnp.arange(16.0)]).reshape(2, 4, 4)
    targets = jnp.array([1, 1])
    # Image 0: pixel (0, 0) has the lowest value; image 1: the highest.
    pos = np.asarray(metrics.perturbation_hits(_corner_classifier, images, m, targets, positive=True))
    neg = np.asarray(metrics.perturbation_hits(_corner_classifier, images, m, targets, positive=False))
    assert pos.shape == (2, 10) and pos.dtype == bool
    np.testing.assert_array_equal(pos[0], True)  # 14 of 16 removed at k=0.9, never (0, 0)
    np.testing.assert_array_equal(pos[1], [True] + [False] * 9)
    np.testing.assert_array_equal(neg[0], [True] + [False] * 9)
    np.testing.assert_array_equal(neg[1], True)
    # targets=None: the unperturbed top-1 is the target, so k=0 is always a hit.
    top1 = np.asarray(metrics.perturbation_hits(_corner_classifier, images, m, positive=True))
    np.testing.assert_array_equal(top1, pos)
    # Jittable with predict_fn and the flags static; maps upsampled to the image size.
    fn = jax.jit(functools.partial(metrics.perturbation_hits, _corner_classifier, positive=False))
    small = jnp.stack([jnp.arange(4.0), -jnp.arange(4.0)]).reshape(2, 2, 2)
    np.testing.assert_array_equal(np.asarray(fn(images, small, targets)), neg)


def test_curve_and_auc():
    hits = np.array([[1] * 10, [1] * 5 + [0] * 5])
    curve = metrics.perturbation_curve(hits)
    np.testing.assert_allclose(curve, [100] * 5 + [50] * 5)
    assert metrics.auc([100.0] * 10) == pytest.approx(90.0)
    # trapezoid: 0.1 * (sum - (first + last) / 2)
    assert metrics.auc(curve) == pytest.approx(0.1 * (750 - 75))
    acc = metrics.PerturbationAccumulator()
    acc.update(hits[:1])
    acc.update(hits[1:])
    res = acc.result()
    assert res["num_images"] == 2 and res["auc"] == pytest.approx(metrics.auc(curve))


# --------------------------------------------------------------------------- average precision


def _ap_oracle(scores, labels):
    """sklearn's definition, float64: sum over distinct thresholds of dRecall * Precision."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    num_pos = labels.sum()
    if num_pos == 0:
        return 0.0
    ap, prev_recall = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        sel = scores >= t
        tp = (labels & sel).sum()
        recall = tp / num_pos
        ap += (recall - prev_recall) * tp / sel.sum()
        prev_recall = recall
    return ap


def test_average_precision_hand_examples():
    ap = metrics.average_precision
    assert float(ap(jnp.array([0.9, 0.8, 0.7, 0.6]), jnp.array([1, 0, 1, 0]))) == pytest.approx((1 + 2 / 3) / 2)
    # A tie: both items at 0.5 share precision 1/2.
    assert float(ap(jnp.array([0.5, 0.5, 0.2]), jnp.array([1, 0, 1]))) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert float(ap(jnp.array([0.3, 0.1]), jnp.array([1, 1]))) == pytest.approx(1.0)
    assert float(ap(jnp.array([0.3, 0.1]), jnp.array([0, 0]))) == 0.0
    # All tied: the positive rate.
    assert float(ap(jnp.zeros(8), jnp.array([1, 0, 0, 1, 0, 0, 0, 0]))) == pytest.approx(0.25)


def test_average_precision_matches_oracle_with_ties():
    rng = np.random.default_rng(0)
    n = 257  # one shape: one compilation
    for trial in range(20):
        scores = np.round(rng.random(n), int(rng.integers(1, 3))).astype(np.float32)  # many ties
        labels = rng.random(n) < rng.random()
        got = float(metrics.average_precision(jnp.asarray(scores), jnp.asarray(labels)))
        assert got == pytest.approx(_ap_oracle(scores, labels), abs=1e-6), trial


def test_average_precision_matches_sklearn():
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(500), 2).astype(np.float32)
    labels = rng.random(500) < 0.3
    want = sk.average_precision_score(labels, scores)
    assert float(metrics.average_precision(scores, labels)) == pytest.approx(want, abs=1e-6)


# --------------------------------------------------------------------------- segmentation


def test_segmentation_perfect_and_inverted():
    rng = np.random.default_rng(0)
    masks = rng.random((3, 8, 8)) < 0.3
    perfect = metrics.SegmentationAccumulator()
    perfect.update(masks.astype(np.float32), masks)
    res = perfect.result()
    for key in ("pixel_accuracy", "iou_background", "iou_foreground", "miou", "map"):
        assert res[key] == pytest.approx(100.0), key
    inverted = metrics.SegmentationAccumulator()
    inverted.update((~masks).astype(np.float32), masks)
    res = inverted.result()
    for key in ("pixel_accuracy", "iou_background", "iou_foreground", "miou"):
        assert res[key] == pytest.approx(0.0), key
    # Pooled AP: all H*W negatives tied at score 1 above all H*W positives tied at 0.
    assert res["map"] == pytest.approx(50.0)
    for mode in ("pooled", "mean_of_classes"):
        acc = metrics.SegmentationAccumulator(ap_mode=mode)
        acc.update(masks.astype(np.float32), masks)
        assert acc.result()["map"] == pytest.approx(100.0)


def test_segmentation_hand_example():
    mask = np.array([[[True, False], [False, False]]])
    m = np.array([[[0.9, 0.6], [0.1, 0.2]]], np.float32)
    # min-max: [[1, .625], [0, .125]], mean .4375 -> predicted foreground [[1, 1], [0, 0]].
    stats = metrics.segmentation_stats(m, mask)
    assert int(stats["correct"][0]) == 3 and int(stats["labeled"][0]) == 4
    np.testing.assert_array_equal(np.asarray(stats["intersection"])[0], [2, 1])
    np.testing.assert_array_equal(np.asarray(stats["union"])[0], [3, 2])
    # Pooled ranking: 1 (bg+), 1 (fg+) tied; .875 (bg+); .625 (fg-); .375 (bg+); ...
    assert float(stats["ap"][0]) == pytest.approx((1 + 1 + 1 + 4 / 5) / 4)
    classes = metrics.segmentation_stats(m, mask, ap_mode="mean_of_classes")
    ap_bg = _ap_oracle([0.0, 0.375, 1.0, 0.875], [0, 1, 1, 1])
    ap_fg = _ap_oracle([1.0, 0.625, 0.0, 0.125], [1, 0, 0, 0])
    assert float(classes["ap"][0]) == pytest.approx((ap_bg + ap_fg) / 2)
    acc = metrics.SegmentationAccumulator()
    acc.update(m, mask)
    res = acc.result()
    assert res["pixel_accuracy"] == pytest.approx(75.0)
    assert res["iou_background"] == pytest.approx(200 / 3)
    assert res["iou_foreground"] == pytest.approx(50.0)
    assert res["miou"] == pytest.approx((200 / 3 + 50) / 2)


def test_segmentation_minmax_changes_only_ap():
    rng = np.random.default_rng(2)
    m = rng.random((2, 4, 4)).astype(np.float32) * 3 + 1
    masks = rng.random((2, 16, 16)) < 0.4
    a = metrics.segmentation_stats(m, masks, minmax=True)
    b = metrics.segmentation_stats(m, masks, minmax=False)
    for key in ("correct", "intersection", "union"):
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]))
    assert not np.allclose(np.asarray(a["ap"]), np.asarray(b["ap"]))


def test_segmentation_constant_map_and_streaming():
    masks = np.zeros((2, 4, 4), bool)
    masks[:, :2] = True
    stats = metrics.segmentation_stats(np.ones((2, 2, 2), np.float32), masks)
    # Predicts all background; both AP channels 0 -> AP = positive rate 1/2.
    np.testing.assert_array_equal(np.asarray(stats["correct"]), [8, 8])
    np.testing.assert_allclose(np.asarray(stats["ap"]), [0.5, 0.5])
    # Streaming two batches equals one batch of both.
    rng = np.random.default_rng(3)
    m = rng.random((4, 2, 2)).astype(np.float32)
    mk = rng.random((4, 8, 8)) < 0.5
    one, two = metrics.SegmentationAccumulator(), metrics.SegmentationAccumulator()
    one.update(m, mk)
    two.update(m[:1], mk[:1])
    two.update(m[1:], mk[1:])
    r1, r2 = one.result(), two.result()
    assert r1.keys() == r2.keys() and r1["num_images"] == 4
    for key in r1:
        assert r1[key] == pytest.approx(r2[key], abs=1e-9), key


def test_perturbation_reuses_unperturbed_predictions():
    import jax.numpy as jnp

    from xai.eval.metrics import perturbation_hits

    calls = []

    def predict(x):
        calls.append(x.shape[0])
        return jnp.stack([x[:, 0, 0, 0], -x[:, 0, 0, 0]], axis=-1)  # class 0 while pixel (0,0) is bright

    images = jnp.ones((2, 4, 4, 3))
    maps = jnp.zeros((2, 2, 2)).at[:, 0, 0].set(1.0)
    a = perturbation_hits(predict, images, maps, jnp.array([0, 0]))
    n_full = len(calls)
    b = perturbation_hits(predict, images, maps, jnp.array([0, 0]), unperturbed=jnp.array([0, 0]))
    assert len(calls) - n_full == n_full - 1  # one forward pass fewer
    assert (a == b).all()
