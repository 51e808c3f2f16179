"""Data-parallel explanation on several (forced) CPU devices equals the single-device result."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    from mamba_jax import VimConfig, init_params, vim_apply
    from xai.distributed import data_mesh, explain_sharded, predict_sharded
    from xai.methods import explain
    assert jax.device_count() == 4, jax.devices()
    cfg = VimConfig(embed_dim=16, depth=2, img_size=32, patch_size=8, stride=8, num_classes=5)
    params = init_params(cfg, jax.random.PRNGKey(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 32, 32, 3))   # 6 images on 4 devices: padded
    for method in ("raw_attention", "rollout", "mamba_attribution"):
        for mode in ("exact", "official"):
            a = explain_sharded(cfg, params, x, method, start_layer=1, mode=mode)
            b = explain(cfg, params, x, method, start_layer=1, mode=mode)
            assert a.shape == b.shape == (6, 4, 4), (a.shape, b.shape)
            err = float(np.abs(np.asarray(a) - np.asarray(b)).max())
            assert err <= 1e-6, (method, mode, err)
    t = explain_sharded(cfg, params, x, "mamba_attribution", target=[1, 2, 3, 4, 0, 1], start_layer=1)
    u = explain(cfg, params, x, "mamba_attribution", target=[1, 2, 3, 4, 0, 1], start_layer=1)
    assert float(np.abs(np.asarray(t) - np.asarray(u)).max()) <= 1e-6
    two = data_mesh(jax.devices()[:2])
    assert np.allclose(predict_sharded(cfg, params, x, two), vim_apply(cfg, params, x), atol=1e-6)
    from xai.distributed import _sharded_predict
    predict_sharded(cfg, params, x, two)  # the compiled program is reused, not rebuilt per call
    assert _sharded_predict.cache_info().hits >= 1, _sharded_predict.cache_info()
    from xai.eval.evaluate import evaluate
    from xai.eval.shapes import shapes_dataset01
    cfg2 = VimConfig(embed_dim=16, depth=2, img_size=224, patch_size=16, stride=16, num_classes=10)
    p2 = init_params(cfg2, jax.random.PRNGKey(0))
    im, lb, mk = shapes_dataset01(6, seed=5)
    kw = dict(methods=("rollout",), modes=("official",), start_layer=1, progress=False)
    one = evaluate(cfg2, p2, [(im, lb, mk)], **kw)
    four = evaluate(cfg2, p2, [(im, lb, mk)], devices=jax.devices(), **kw)
    # equal up to float rounding (the sharded programs reduce in another order: mAP moved 7e-6)
    def leaves(tree, key=""):
        if isinstance(tree, dict):
            return [x for k, v in sorted(tree.items()) for x in leaves(v, key + "/" + k)]
        if isinstance(tree, list):
            return [x for i, v in enumerate(tree) for x in leaves(v, key + "/" + str(i))]
        return [(key, tree)]
    l1, l4 = leaves(one["rows"]), leaves(four["rows"])
    assert [k for k, _ in l1] == [k for k, _ in l4]
    for (k, a), (_, b) in zip(l1, l4):
        assert (abs(a - b) <= 1e-4) if isinstance(a, float) else a == b, (k, a, b)
    print("OK", jax.device_count())
""")


def test_sharded_equals_single_device():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK 4" in out.stdout


def test_scaling_benchmark_runs_on_forced_devices(tmp_path):
    """benchmarks/scaling.py on 2 forced CPU devices: both device counts, consistent figures."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    cmd = [sys.executable, "benchmarks/scaling.py", "--model", "demo", "--per-device", "1", "--methods", "rollout",
           "--reps", "1", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    assert report["meta"]["n_devices"] == 2
    rows = report["rows"]
    assert [(r["devices"], r["batch"], r["work"]) for r in rows] == [
        (1, 1, "forward"), (1, 1, "rollout/official"), (2, 2, "forward"), (2, 2, "rollout/official")]
    for r in rows:
        assert abs(r["img_per_s"] - r["batch"] / r["seconds"]) < 1e-6 * r["img_per_s"]
        single = next(s for s in rows if s["devices"] == 1 and s["work"] == r["work"])
        assert abs(r["efficiency"] - r["img_per_s"] / (r["devices"] * single["img_per_s"])) < 1e-9
    assert "| 2 | 2 | rollout/official |" in (tmp_path / "scaling.md").read_text()
