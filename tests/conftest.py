"""Shared test helpers.

Tolerances (float32 unless stated), each with its reason:
  float64 mathematical oracles ........ 1e-10  (pure reassociation error at double precision)
  float32 scan vs scan ................ 1e-5 relative to max |y| (different summation orders)
  float32 parity JAX vs PyTorch ....... 1e-5 relative to max |logit| (24 layers of float32 rounding)
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLE_IMAGES = sorted((SHARED / "data" / "images").glob("*.jpg")) if (SHARED / "data").is_dir() else []

os.environ.setdefault("TQDM_DISABLE", "1")
# The command lines keep a persistent compilation cache (xai.app.compile_cache): never in the
# home folder from the tests (tests/test_compile_cache.py gives its runs their own folder).
os.environ["MAMBA_JAX_CACHE"] = "off"


def pytest_configure(config):
    """The default suite (``-m 'not slow'``) compiles hundreds of small programs and runs each for
    moments: LLVM's optimizations of XLA's CPU code cost more than they save there (whole runs on
    2 cores: tests/test_methods.py 264 s -> 107 s, tests/parity/test_parity.py 188 s -> 144 s), so
    it compiles at optimization level 0; the slow tests run long programs (the demo model's
    evaluation took 954 s instead of 289 s that way) and keep XLA's default. Set before any test
    module imports and before JAX starts its backend; the command lines the tests run in
    subprocesses inherit it."""
    if config.option.markexpr == "not slow" and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Drop JAX's compiled programs after each test module: a whole-suite run otherwise keeps every
    module's executables (hundreds of configurations) in one process, whose memory grows into the
    gigabytes; a suite run on 2 cores / 24 GiB crashed inside XLA's compiler 60% of the way through."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@pytest.fixture
def x64():
    """Run a test with float64 enabled, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture
def sample_images():
    if not SAMPLE_IMAGES:
        pytest.skip("../shared/data/images is absent (only the development workspace has the sample photos)")
    return SAMPLE_IMAGES


def _as_float64(x):
    """numpy float64 view of an array, a JAX array or a torch tensor (detached, on the CPU)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x, np.float64)


def assert_close(actual, expected, *, rtol_of_max=None, atol=None, scale_floor=0.0, name="value"):
    """Assert |actual - expected| <= atol + rtol_of_max * scale elementwise, where
    scale = max(scale_floor, max |expected|), and that every value of ``actual`` is finite.

    ``rtol_of_max`` is a relative-to-scale bound that does not blow up on values near zero;
    ``scale_floor`` keeps the scale from falling below a floor (e.g. 1.0 for a bound that is
    absolute on small values and relative on large ones); ``atol`` is absolute.  Accepts numpy
    and JAX arrays and torch tensors.  Returns the worst absolute difference.
    """
    actual = _as_float64(actual)
    expected = _as_float64(expected)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    diff = np.abs(actual - expected)
    scale = max(float(scale_floor), float(np.max(np.abs(expected))) if expected.size else 0.0)
    tol = (atol or 0.0) + (rtol_of_max or 0.0) * scale
    worst = float(diff.max()) if diff.size else 0.0
    assert worst <= tol, (f"{name}: max |diff| {worst:.3e} > tol {tol:.3e} "
                          f"(mean |diff| {float(diff.mean()):.3e}, scale {scale:.3e})")
    return worst
