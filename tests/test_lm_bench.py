"""benchmarks/lm_bench.py on the CPU with --smoke: its rows, JSON and table."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_lm_bench_smoke(tmp_path):
    cmd = [sys.executable, "benchmarks/lm_bench.py", "--smoke", "--batches", "1", "--methods", "rollout,mamba_lrp",
           "--modes", "exact", "--out", str(tmp_path)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "results.json").read_text())
    assert [r["work"] for r in data["rows"]] == ["forward", "rollout/exact", "mamba_lrp", "hidden_attention layer 1"]
    for r in data["rows"]:
        assert r["seconds"] > 0 and abs(r["tokens_per_s"] * r["seconds"] - r["batch"] * r["seq_len"]) < 1e-6
        assert r["compile_s"] > 0
    assert data["meta"]["argv"][:3] == ["python", "benchmarks/lm_bench.py", "--smoke"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert "| batch | work | ms | tokens/s | peak GiB | compile s |" in table and len(table) == 6 + 4
