"""mamba_jax/files.py: atomic_write leaves the old file intact and no temporary file behind
when the writer fails, and replaces the file when it succeeds.

Tolerances: none; the bytes are compared exactly.
"""

from __future__ import annotations

import pytest

from mamba_jax.files import atomic_write


def _no_temp_files(folder):
    leftovers = [p.name for p in folder.iterdir() if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_atomic_write_failure_leaves_nothing(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    _no_temp_files(tmp_path)
    atomic_write(target, lambda f: f.write(b"new"))
    assert target.read_bytes() == b"new"
