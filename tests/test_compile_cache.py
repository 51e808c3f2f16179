"""Tests of the command lines' persistent compilation cache (xai/app/compile_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from xai.app.compile_cache import CACHE_ENV, MIN_SECS_ENV, cache_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_from_environment(tmp_path):
    assert cache_dir({"HOME": "/h"}) == Path.home() / ".cache" / "mamba-jax" / "jax"
    assert cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "mamba-jax" / "jax"
    assert cache_dir({CACHE_ENV: str(tmp_path / "c")}) == tmp_path / "c"
    assert cache_dir({CACHE_ENV: "  "}) == Path.home() / ".cache" / "mamba-jax" / "jax"  # empty = the default
    for off in ("off", "OFF", "0", "false", "no", "none"):
        assert cache_dir({CACHE_ENV: off}) is None, off


def _evaluate(cache: Path, out: Path) -> subprocess.CompletedProcess:
    # the demo model, one method in one mode, two images, no baselines: the cheapest real run; every
    # program is kept (JAX's own minimum compile time, which the command leaves alone when given, at
    # 0), so that the check does not depend on how fast this machine compiles (the forward pass alone
    # compiles in about MIN_COMPILE_SECS on 2 cores, and was once left out)
    env = {**os.environ, CACHE_ENV: str(cache), "TQDM_DISABLE": "1", MIN_SECS_ENV: "0"}
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
    # the explanation and the classifier's forward are there (JAX names entries after the function),
    # and the small programs too: the command left JAX's minimum compile time at the 0 given (with its
    # own MIN_COMPILE_SECS only one to three of these 15 programs are kept)
    assert any(name.startswith("jit__explain") for name in entries), entries
    assert any(name.startswith("jit__top1_and_finite") for name in entries), entries
    assert len(entries) >= 10, entries
    second = _evaluate(cache, tmp_path / "two")
    assert second.returncode == 0, second.stderr[-2000:]
    # every program of the second run came from the cache: not one new entry
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert (tmp_path / "two" / "results.json").read_text() == (tmp_path / "one" / "results.json").read_text()
