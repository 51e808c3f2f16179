"""``mamba-jax explain`` end to end on a tiny random model saved as an official .pth."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from conftest import assert_close
from PIL import Image

from convert.checkpoint import load_checkpoint, save_params
from mamba_jax import VimConfig, init_params, preprocess, vim_apply
from xai import explain
from xai.__main__ import main
from xai.app.explain_cli import find_images, map_name
from xai.methods import METHODS, MODES, default_start_layer, method_modes

CONFIG = VimConfig(embed_dim=16, depth=2, img_size=64, patch_size=16, stride=16, num_classes=5)
SIZES = ((80, 64), (64, 64), (70, 100))  # (width, height): landscape, square, portrait
BATCH = 2  # 3 images -> a full batch and a padded one


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    # a converted folder keeps the config (a .pth of a 64-pixel model does not say its image size)
    ckpt = save_params(root / "tiny", CONFIG, init_params(CONFIG, jax.random.PRNGKey(0)))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"img{i}.jpg")
    (images / "notes.txt").write_text("not an image")
    out = root / "out"
    rc = main(["explain", str(images), "--checkpoint", str(ckpt), "--methods", "all", "--mode", "both",
               "--batch-size", str(BATCH), "--start-layer", "1", "--attention-layer", "0", "--out", str(out)])
    assert rc == 0
    return {"ckpt": ckpt, "images": images, "out": out, "files": sorted(images.glob("*.jpg"))}


def test_maps_equal_library_explain(setup):
    config, params = load_checkpoint(setup["ckpt"])
    x = np.stack([preprocess(f, config) for f in setup["files"]])
    # the same batch shape as the command (so the compiled functions are reused); the
    # images of a batch do not interact, so the filler image does not matter
    batches = [x[0:2], np.stack([x[2], x[0]])]
    for method in METHODS:
        for mode in method_modes(method, MODES):  # one file for the methods without modes
            ref = np.concatenate([np.asarray(explain(config, params, b, method, start_layer=1, mode=mode or "exact"))
                                  for b in batches])[:3]
            for f, expected in zip(setup["files"], ref):
                got = np.load(setup["out"] / map_name(f.stem, method, mode))
                assert got.shape == CONFIG.grid == (4, 4) and got.dtype == np.float32
                assert_close(got, expected, rtol_of_max=1e-6, atol=1e-7, name=f"{f.stem} {method} {mode}")


def test_predictions_and_figures(setup, capsys):
    out = setup["out"]
    preds = json.loads((out / "predictions.json").read_text())
    assert preds["start_layer"] == 1 and preds["modes"] == list(MODES) and preds["methods"] == list(METHODS)
    assert [r["image"] for r in preds["images"]] == [f.name for f in setup["files"]]

    config, params = load_checkpoint(setup["ckpt"])
    x = np.stack([preprocess(f, config) for f in setup["files"]])
    probs = np.asarray(jax.nn.softmax(vim_apply(config, params, x), axis=-1))
    for row, p in zip(preds["images"], probs):
        top = row["top5"]
        assert top["indices"] == [int(i) for i in np.argsort(-p, kind="stable")]  # 5 classes: all of them
        assert top["classes"] == [f"class {i}" for i in top["indices"]]
        np.testing.assert_allclose(top["probabilities"], p[top["indices"]], rtol=1e-5)
        assert top["probabilities"] == sorted(top["probabilities"], reverse=True)

    for f in setup["files"]:
        with Image.open(out / f"{f.stem}.png") as im:
            assert im.size[0] > im.size[1] > 100  # 2 rows (modes) x 4 columns
    assert (out / "img0_attention_layer0.png").stat().st_size > 1000
    expected = {"predictions.json", "img0_attention_layer0.png"} | {f"{f.stem}.png" for f in setup["files"]} | {
        map_name(f.stem, m, mode) for f in setup["files"] for m in METHODS for mode in method_modes(m, MODES)}
    assert "img0_mamba_lrp.npy" in expected and "img0_mamba_lrp_exact.npy" not in expected
    assert {p.name for p in out.iterdir()} == expected | {".mamba-jax-output.json"}  # no temporary files
    # the marker lists exactly what the run wrote (what a later --overwrite may replace)
    marker = (out / ".mamba-jax-output.json").read_text().splitlines()
    assert json.loads(marker[0]) == {"command": "explain"} and set(marker[1:]) == expected


def test_single_mode_and_method_subset(setup, tmp_path, capsys):
    rc = main(["explain", str(setup["files"][1]), "--checkpoint", str(setup["ckpt"]), "--methods",
               "rollout,raw_attention", "--batch-size", str(BATCH), "--start-layer", "1", "--target", "3",
               "--out", str(tmp_path)])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == ["img1_raw_attention_exact.npy", "img1_rollout_exact.npy"]
    printed = capsys.readouterr().out
    assert "img1.jpg" in printed and "top-1" in printed


def test_remat_and_bf16_flags(setup, tmp_path):
    """--remat recomputes the same maps; --bf16 moves them only a little (against the float32 run)."""
    f = setup["files"][1]
    # start layer 0: with the last layer alone (the default 1 of 2) the official map is all zero,
    # since d logit / d r_depth lives on the class token, whose official attention is 0
    maps = {}
    for flag in ("", "--remat", "--bf16"):
        out = tmp_path / (flag.strip("-") or "plain")
        rc = main(["explain", str(f), "--checkpoint", str(setup["ckpt"]), "--methods", "mamba_attribution",
                   "--mode", "official", "--start-layer", "0", *([flag] if flag else []), "--out", str(out)])
        assert rc == 0
        maps[flag] = np.load(out / f"{f.stem}_mamba_attribution_official.npy")
    ref = maps[""]
    assert float(ref.max()) > 0
    for flag, tol in (("--remat", 1e-5), ("--bf16", 0.05)):
        got = maps[flag]
        worst = assert_close(got, ref, rtol_of_max=tol, name=f"{flag} map")
        if flag == "--bf16":
            assert worst > 1e-6 * float(np.abs(ref).max()), "--bf16 changed nothing: is it passed on?"


def test_numerics_flags_are_the_shared_ones(monkeypatch, tmp_path):
    """explain and evaluate parse --bf16, --scan-method and --remat with one helper into one Options, and
    explain hands it to every explanation (spied on: nothing runs)."""
    import argparse

    import jax.numpy as jnp

    from mamba_jax.options import Options
    from xai.app import evaluate_cli, explain_cli
    from xai.app.models import numerics_options

    sub = argparse.ArgumentParser().add_subparsers()
    parsers = {"explain": explain_cli.add_parser(sub), "evaluate": evaluate_cli.add_parser(sub)}
    fixed = {"explain": ["a.jpg", "--out", "o"], "evaluate": ["--shapes", "1"]}
    for name, parser in parsers.items():
        args = parser.parse_args([*fixed[name], "--bf16", "--scan-method", "sequential", "--remat"])
        assert numerics_options(args) == Options(dtype=jnp.bfloat16, scan_method="sequential", remat=True), name
        assert numerics_options(parser.parse_args(fixed[name])) == Options(), name

    seen = []

    class Stop(Exception):
        pass

    def spy(*a, options=None, **k):
        seen.append(options)
        raise Stop

    monkeypatch.setattr(explain_cli, "explain", spy)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    args = parsers["explain"].parse_args([str(image), "--checkpoint", "demo", "--scan-method", "associative",
                                          "--out", str(tmp_path / "o")])
    with pytest.raises(Stop):
        explain_cli.run(args)
    assert seen == [Options(scan_method="associative")]


def _fails(argv) -> str:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["explain", *argv]) == 2
    assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()  # one line, no traceback
    return err.getvalue()


def test_errors(setup, tmp_path):
    ckpt, good = str(setup["ckpt"]), str(setup["files"][0])
    common = ["--checkpoint", ckpt, "--out", str(tmp_path / "o")]

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    assert "no images found" in _fails([str(empty), *common])
    assert "no such file or folder" in _fails([str(tmp_path / "missing.jpg"), *common])

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    msg = _fails([good, str(bad), *common])
    assert "cannot read image" in msg and "broken.jpg" in msg

    msg = _fails([good, "--methods", "rollout,gradcam", *common])
    assert "unknown method 'gradcam'" in msg and all(m in msg for m in METHODS)

    msg = _fails([good, "--start-layer", "2", *common])
    assert "--start-layer 2 is out of range" in msg and "2 layers" in msg
    assert "--target 5 is out of range" in _fails([good, "--target", "5", *common])
    assert "--attention-layer" in _fails([good, "--attention-layer", "-1", *common])
    assert not (tmp_path / "o").exists()  # nothing written before the arguments were checked


def test_find_images_expands_folders_sorted(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", "d.jpeg", "e.txt", "f.gif"):
        (tmp_path / name).write_bytes(b"")
    single = tmp_path / "sub"
    single.mkdir()
    (single / "z.jpg").write_bytes(b"")
    found = find_images([tmp_path, single / "z.jpg"])
    assert [p.name for p in found] == ["a.jpg", "b.PNG", "c.webp", "d.jpeg", "z.jpg"]
    (single / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match="share the name 'a'"):
        find_images([tmp_path, single])


def test_default_start_layer():
    assert default_start_layer(VimConfig()) == 15
    assert default_start_layer(VimConfig(depth=12)) == 8  # round(7.5)
    assert default_start_layer(VimConfig(depth=8)) == 5
    assert default_start_layer(CONFIG) == 1
