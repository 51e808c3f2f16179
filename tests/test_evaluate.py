"""Tests of the evaluation loop, writers and command line (xai/eval/evaluate.py).

Hand-computable cases pass a fake classifier and a fake explainer (``evaluate(...,
classifier=, explainer=)``) whose hits are known exactly; the real tiny random model checks
padding invariance and the CLI.
Exact equality is asserted throughout: hits are integers and the padded and unpadded
runs compute every kept row with the same arithmetic.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mamba_jax
from mamba_jax import VimConfig
from xai.app import report
from xai.eval import evaluate as ev

TINY = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5)  # 4 x 4 grid
TINY224 = VimConfig(embed_dim=16, depth=2, img_size=224, patch_size=16, stride=16, num_classes=10)


def _cli(argv: list[str]) -> int:
    from xai.__main__ import main  # the command line's error handling: one line, exit status 2

    return main(["evaluate", *argv])


def _batches(images, labels, masks, batch_size):
    for i in range(0, len(images), batch_size):
        yield (images[i:i + batch_size], None if labels is None else labels[i:i + batch_size],
               None if masks is None else masks[i:i + batch_size])


# --------------------------------------------------------------------------- fakes
# Images are all ones; channel 1 at pixel (16, 16) tells the fake explainer which map to
# return; the fake classifier says class 1 iff pixel (0, 0) is intact, else class 0.


def _fake_classifier(x):
    intact = x[:, 0, 0, 0] > 0  # normalized: 1 -> positive, a removed pixel (0) -> negative
    return jax.nn.one_hot(jnp.where(intact, 1, 0), TINY.num_classes)


def _fake_explainer(x, method, mode, targets):
    corner = jnp.zeros(TINY.grid).at[0, 0].set(1.0)
    corner_high = (x[:, 16, 16, 1] > 0)[:, None, None]  # type A: pixel (0, 0) most relevant
    return jnp.where(corner_high, corner, 1.0 - corner)  # type B: pixel (0, 0) least relevant


FAKES = dict(classifier=_fake_classifier, explainer=_fake_explainer)


TYPES = np.array([1, 0, 1, 0, 0])  # A, B, A, B, B
LABELS = np.array([1, 1, 1, 0, 1], np.int32)


def _typed_images() -> np.ndarray:
    images = np.ones((len(TYPES), 32, 32, 3), np.float32)
    images[:, 16, 16, 1] = TYPES  # 1 -> A, 0 -> B
    return images


def _fake_run(target="predicted", batch_size=2, **kw):
    return ev.evaluate(TINY, {}, _batches(_typed_images(), LABELS, None, batch_size), methods=("rollout",),
                       modes=("exact",), start_layer=1, target=target, progress=False, **FAKES, **kw)


def test_perturbation_known_curves():
    # On 32 x 32, step k removes int(k * 1024) >= 102 pixels. The upsampled map equals the
    # corner cell on the 4 x 4 corner block (16 tied pixels, pixel (0, 0) first of its tie),
    # so pixel (0, 0) is removed at step 1 when it is most relevant (rank 0) and never at
    # <= 90% when least relevant (rank 1008 > 921).
    r = _fake_run()
    row = r["rows"]["rollout/exact"]
    pos, neg = row["perturbation"]["positive"], row["perturbation"]["negative"]
    assert pos["curve"] == [100.0] + [60.0] * 9  # the 3 B images keep their pixel
    assert neg["curve"] == [100.0] + [40.0] * 9  # the 2 A images keep theirs
    assert pos["auc"] == pytest.approx(0.1 * (80 + 8 * 60))  # 56
    assert neg["auc"] == pytest.approx(0.1 * (70 + 8 * 40))  # 39
    assert row["segmentation"] is None and row["method"] == "rollout" and row["mode"] == "exact"
    assert r["top1_accuracy"] == pytest.approx(80.0)
    assert r["counts"] == {"images": 5, "labeled": 5, "with_masks": 0, "batches": 3}
    assert r["steps"] == list(ev.PERTURBATION_STEPS)

    # Centre blob: the four corners are its minimum (64 tied pixels, pixel (0, 0) first).
    center = r["rows"]["center"]["perturbation"]
    assert center["positive"]["curve"] == [100.0] * 10 and center["positive"]["auc"] == pytest.approx(90.0)
    assert center["negative"]["curve"] == [100.0] + [0.0] * 9 and center["negative"]["auc"] == pytest.approx(5.0)
    rand = r["rows"]["random"]["perturbation"]["positive"]["curve"]
    assert rand[0] == 100.0 and all(0.0 <= c <= 100.0 for c in rand)
    assert list(r["rows"]) == ["rollout/exact", "random", "center"]


def test_perturbation_against_labels():
    # Image 3 (type B) is labelled 0: unperturbed it is a miss; once its pixel (0, 0) is
    # removed (negative test, step 1) the fake predicts 0, a hit.
    row = _fake_run(target="label")["rows"]["rollout/exact"]["perturbation"]
    assert row["positive"]["curve"] == [80.0] + [40.0] * 9
    assert row["negative"]["curve"] == [80.0] + [60.0] * 9
    assert row["positive"]["auc"] == pytest.approx(38.0)
    assert row["negative"]["auc"] == pytest.approx(55.0)


def test_evaluation_steps_equal_evaluate():
    # evaluate is Evaluation.step over the batches, then summary; the explainer is called once
    # per batch and row, on the padded batch (the last image repeated) and its targets.
    calls = []

    def explainer(x, method, mode, targets):
        calls.append((x.shape[0], method, mode, np.asarray(targets).tolist()))
        return _fake_explainer(x, method, mode, targets)

    kw = dict(methods=("rollout", "raw_attention"), modes=("exact",), start_layer=1, target="label")
    run = ev.Evaluation(TINY, _fake_classifier, explainer, **kw)
    for batch in _batches(_typed_images(), LABELS, None, 2):
        run.step(*batch)
    r = run.summary()
    assert calls == [(2, m, "exact", t) for t in ([1, 1], [1, 0], [1, 1]) for m in ("rollout", "raw_attention")]
    assert r == ev.evaluate(TINY, {}, _batches(_typed_images(), LABELS, None, 2), progress=False, **kw, **FAKES)
    assert r["rows"]["raw_attention/exact"]["perturbation"] == r["rows"]["rollout/exact"]["perturbation"]
    assert r["rows"]["rollout/exact"]["perturbation"]["positive"]["curve"] == [80.0] + [40.0] * 9


def test_segmentation_maps_equal_masks():
    # The fake explainer returns the mask (stored in channel 2) at full resolution: the
    # upsampling is the identity and the segmentation is perfect.
    rng = np.random.default_rng(0)
    masks = rng.random((5, 32, 32)) < 0.3
    masks[:, 0, 0], masks[:, 1, 1] = True, False  # both classes in every image
    images = np.ones((5, 32, 32, 3), np.float32)
    images[..., 2] = masks
    r = ev.evaluate(TINY, {}, _batches(images, None, masks, 2), methods=("raw_attention",), modes=("official",),
                    start_layer=1, tests=("segmentation",), progress=False, classifier=_fake_classifier,
                    explainer=lambda x, method, mode, targets: (x[..., 2] > 0).astype(jnp.float32))
    seg = r["rows"]["raw_attention/official"]["segmentation"]
    for key in ("pixel_accuracy", "iou_background", "iou_foreground", "miou", "map"):
        assert seg[key] == pytest.approx(100.0), key
    assert seg["num_images"] == 5
    assert r["rows"]["raw_attention/official"]["perturbation"] is None
    assert r["top1_accuracy"] is None and r["counts"]["with_masks"] == 5
    for base in ("random", "center"):
        assert r["rows"][base]["segmentation"]["miou"] < 90.0


def test_padding_invariance():
    config = TINY
    params = mamba_jax.init_params(config, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    images = rng.random((8, 32, 32, 3), dtype=np.float32)
    masks = rng.random((8, 32, 32)) < 0.5
    labels = np.arange(8, dtype=np.int32) % config.num_classes

    def run(n, bs):
        run = ev.Evaluation(config, ev.default_classifier(config, params), ev.default_explainer(config, params),
                            methods=("rollout",), modes=("exact",), start_layer=1)
        for batch in _batches(images[:n], labels[:n], masks[:n], bs):
            run.step(*batch)
        return run

    # Exact: the 5th image in a batch padded with copies of itself, and in a batch of the same size
    # holding 3 other images: the same arithmetic (one compiled shape), so the same hits and APs.
    padded, full = run(5, 4), run(8, 4)
    for key in ("rollout/exact", "random", "center"):
        a, b = (next(r for r in x.rows if r.key == key) for x in (padded, full))
        for test in ("positive", "negative"):
            hits_a, hits_b = (np.concatenate(getattr(r, test).hits) for r in (a, b))
            assert hits_a.shape == (5, 10) and (hits_a == hits_b[:5]).all(), (key, test)
        ap_a, ap_b = (np.concatenate(r.segmentation.ap) for r in (a, b))
        assert ap_a.shape == (5,) and (ap_a == ap_b[:5]).all(), key

    def summary(bs):
        r = run(5, bs).summary()
        assert r["settings"].pop("batch_size") == bs
        assert r["counts"].pop("batches") == -(-5 // bs)
        return r

    r3, r4 = summary(3), summary(4)
    # Batches of 3 and of 4 compile to different programs: XLA on the CPU may vectorize them
    # differently, so maps differ by float rounding (about 1e-7), enough to swap near-tied pixels
    # in an average precision or to flip a perturbed image of this random model near a decision
    # boundary. Structure, counts and every integer must be equal; the unperturbed step (no map
    # involved) too.
    flat3, flat4 = _flatten(r3), _flatten(r4)
    assert flat3.keys() == flat4.keys()
    for key, v in flat3.items():
        if not isinstance(v, float) or key.endswith("/curve/0"):
            assert v == flat4[key], key
    assert r3["counts"] == {"images": 5, "labeled": 5, "with_masks": 5}
    assert r3["rows"]["rollout/exact"]["segmentation"]["num_images"] == 5


def _flatten(tree, prefix=""):
    """A nested dict/list of results -> {"a/b/0": leaf}."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else None
    if items is None:
        return {prefix: tree}
    out = {}
    for k, v in items:
        out.update(_flatten(v, f"{prefix}/{k}"))
    return out


# --------------------------------------------------------------------------- writers


def test_writers(tmp_path):
    r = _fake_run()
    paths = report.write_results(r, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [report.RESULTS_JSON, report.RESULTS_MD, report.CURVES_PNG])  # no temporary files left behind
    assert json.loads(paths["json"].read_text()) == r
    assert paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["markdown"].read_text()
    assert "| rollout | exact | 56.00 | 39.00 | - | - | - |" in md
    assert "| random (baseline) | - |" in md and "| center (baseline) | - | 90.00 | 5.00 |" in md
    assert "different model and data" in md and "| Raw-Attention | 17.27 | 34.03 | 67.64 | 45.09 | 74.88 |" in md
    report.write_results(r, tmp_path / "out")  # overwriting is fine


# --------------------------------------------------------------------------- errors


def test_evaluate_errors():
    images = np.zeros((2, 16, 16, 3), np.float32)
    with pytest.raises(ev.DataError, match=r"16 x 16.*32 x 32"):
        ev.evaluate(TINY, {}, [(images, None, None)], progress=False)
    with pytest.raises(ev.DataError, match="no data"):
        ev.evaluate(TINY, {}, iter(()), progress=False)
    with pytest.raises(ev.DataError, match="label"):
        ev.evaluate(TINY, {}, [(np.zeros((2, 32, 32, 3), np.float32), None, None)], target="label",
                    progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        ev.evaluate(TINY, {}, [], methods=("gradcam",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from convert.checkpoint import export_state_dict, save_params

    d = tmp_path_factory.mktemp("ckpt")
    export_state_dict(TINY224, mamba_jax.init_params(TINY224, jax.random.PRNGKey(0)), d / "m.pth")
    # A .pth file does not record img_size (its loader assumes 224): a converted folder does.
    save_params(d / "m32", TINY, mamba_jax.init_params(TINY, jax.random.PRNGKey(0)))
    return d


def test_cli_errors(checkpoints, tmp_path, capsys):
    ckpt = str(checkpoints / "m.pth")
    out = ["--out", str(tmp_path / "o")]
    missing = tmp_path / "nope" / "gtsegs_ijcv.mat"
    assert _cli(["--checkpoint", ckpt, "--imagenet-seg", str(missing), *out]) == 2
    assert str(missing) in capsys.readouterr().err
    assert _cli(["--checkpoint", ckpt, "--imagenet-val", str(tmp_path / "val"), *out]) == 2
    assert str(tmp_path / "val") in capsys.readouterr().err
    assert _cli(["--checkpoint", str(checkpoints / "m32"), "--shapes", "2", *out]) == 2
    err = capsys.readouterr().err
    assert "224 x 224" in err and "32 x 32" in err
    assert _cli(["--checkpoint", ckpt, "--shapes", "0", *out]) == 2
    assert "no data" in capsys.readouterr().err
    assert _cli(["--checkpoint", ckpt, "--shapes", "2", "--start-layer", "7", *out]) == 2
    assert "--start-layer 7" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # exactly one data source
        _cli(["--checkpoint", ckpt, "--shapes", "2", "--imagenet-seg", str(missing)])
    with pytest.raises(SystemExit):
        _cli(["--checkpoint", ckpt, "--shapes", "2", "--methods", "gradcam"])


def test_cli_shapes_end_to_end(checkpoints, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = _cli(["--checkpoint", str(checkpoints / "m.pth"), "--shapes", "6", "--limit", "5", "--batch-size", "4",
               "--methods", "raw_attention", "--mode", "exact", "--out", str(out), "--no-progress"])
    assert rc == 0
    r = json.loads((out / report.RESULTS_JSON).read_text())
    assert list(r["rows"]) == ["raw_attention/exact", "random", "center"]
    assert r["counts"] == {"images": 5, "labeled": 5, "with_masks": 5, "batches": 2}
    assert r["settings"]["start_layer"] == 1  # round(15 * 2 / 24)
    assert "seed 1000" in r["settings"]["data"]
    for row in r["rows"].values():
        assert row["segmentation"]["num_images"] == 5
        assert len(row["perturbation"]["positive"]["curve"]) == 10
    assert (out / report.CURVES_PNG).is_file() and (out / report.RESULTS_MD).is_file()
    stdout = capsys.readouterr().out
    assert "| raw_attention | exact |" in stdout and "| center (baseline) |" in stdout


# --------------------------------------------------------------------------- numerics flags


def test_cli_numerics_flags_reach_the_options(tmp_path, monkeypatch):
    # --bf16, --scan-method and --remat become one Options, handed to the model's classifier and
    # explainer (spied on: fakes stand in for the demo model, so nothing large compiles) and
    # recorded in results.json; --tests and --baselines choose the rows and tests.
    from mamba_jax.options import Options

    seen = []

    def classifier(config, params, *, devices=None, options=None):
        seen.append(("classifier", options))
        return lambda x: jax.nn.one_hot(jnp.zeros(x.shape[0], jnp.int32), config.num_classes)

    def explainer(config, params, *, start_layer=None, devices=None, options=None):
        seen.append(("explainer", options))
        return lambda x, method, mode, targets: jnp.broadcast_to(jnp.arange(196.0).reshape(14, 14),
                                                                 (x.shape[0], 14, 14))

    monkeypatch.setattr(ev, "default_classifier", classifier)
    monkeypatch.setattr(ev, "default_explainer", explainer)
    common = ["--shapes", "2", "--batch-size", "2", "--methods", "mamba_attribution", "--mode", "official",
              "--no-progress"]
    assert _cli([*common, "--bf16", "--scan-method", "associative", "--remat", "--tests", "segmentation",
                 "--baselines", "center", "--out", str(tmp_path / "fast")]) == 0
    want = Options(dtype=jnp.bfloat16, scan_method="associative", remat=True)
    assert seen == [("classifier", want), ("explainer", want)]
    r = json.loads((tmp_path / "fast" / report.RESULTS_JSON).read_text())
    assert r["settings"]["options"] == {"dtype": "bfloat16", "precision": "highest", "scan_method": "associative",
                                        "remat": True}
    assert r["settings"]["tests"] == ["segmentation"] and list(r["rows"]) == ["mamba_attribution/official", "center"]
    assert all(row["perturbation"] is None and row["segmentation"] for row in r["rows"].values())

    seen.clear()
    assert _cli([*common, "--baselines", "none", "--out", str(tmp_path / "default")]) == 0
    assert seen == [("classifier", Options()), ("explainer", Options())]
    r = json.loads((tmp_path / "default" / report.RESULTS_JSON).read_text())
    assert r["settings"]["options"] == {"dtype": "float32", "precision": "highest", "scan_method": "auto",
                                        "remat": False}
    assert list(r["rows"]) == ["mamba_attribution/official"] and r["rows"]["mamba_attribution/official"]["perturbation"]
    with pytest.raises(SystemExit):
        _cli([*common, "--scan-method", "fastest", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit):
        _cli([*common, "--baselines", "zeros", "--out", str(tmp_path / "x")])

