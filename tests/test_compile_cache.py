"""Tests of the command lines' persistent compilation cache (xai/app/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xai.app.compile_cache import CACHE_ENV, cache_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_from_environment(tmp_path):
    assert cache_dir({"HOME": "/h"}) == Path.home() / ".cache" / "mamba-jax" / "jax"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mamba-jax" / "jax"
    assert cache_dir({CACHE_ENV: str(tmp_path / "c")}) == tmp_path / "c"
    assert cache_dir({CACHE_ENV: "  "}) == Path.home() / ".cache" / "mamba-jax" / "jax"  # empty = the default
    for off in ("off", "OFF", "0", "false", "no", "none"):
        assert cache_dir({CACHE_ENV: off}) is None, off


def _evaluate(cache: Path, out: Path) -> subprocess.CompletedProcess:
    # the demo model, one method in one mode, two images, no baselines: the cheapest real run
    env = {**os.environ, CACHE_ENV: str(cache), "TQDM_DISABLE": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "xai", "evaluate", "--shapes", "2", "--batch-size", "2",
                           "--methods", "raw_attention", "--mode", "official", "--tests", "segmentation",
                           "--baselines", "none", "--no-progress", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)


def test_cli_run_fills_the_cache_and_a_second_run_reuses_it(tmp_path):
    cache = tmp_path / "cache"
    first = _evaluate(cache, tmp_path / "one")
    assert first.returncode == 0, first.stderr[-2000:]
    entries = sorted(p.name for p in cache.iterdir())
    # the model's forward pass and the explanation are there (JAX names entries after the function)
    assert any(name.startswith("jit__explain") for name in entries), entries
    assert len(entries) >= 2, entries
    second = _evaluate(cache, tmp_path / "two")
    assert second.returncode == 0, second.stderr[-2000:]
    # every program cached by the first run came from the cache: no second entry of its function (a small
    # program whose compile time crossed the threshold only this time may be added; JAX caches those
    # that take longer than MIN_COMPILE_SECS)
    again = sorted(p.name for p in cache.iterdir())
    assert set(entries) <= set(again)
    function = lambda name: name.rsplit("-", 2)[0]  # noqa: E731  (jit_<name>-<hash>-cache)
    for name in {function(e) for e in entries}:
        assert [function(e) for e in again].count(name) == [function(e) for e in entries].count(name), name
    assert (tmp_path / "two" / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()
