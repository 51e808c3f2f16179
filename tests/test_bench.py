"""benchmarks/bench.py on the CPU: one tiny case, its JSON and table, and --merge of two runs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_and_merge(tmp_path):
    run = tmp_path / "one"
    cmd = [sys.executable, "benchmarks/bench.py", "--models", "tiny", "--batches", "1", "--modes", "official",
           "--methods", "raw_attention", "--reps", "1", "--remat-batches", "", "--out", str(run)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    first = json.loads((run / "results.json").read_text())
    rows = first["rows"]
    assert [r["work"] for r in rows] == ["forward", "raw_attention/official"]
    for r in rows:
        assert r["seconds"] > 0 and abs(r["img_per_s"] * r["seconds"] - 1) < 1e-9
        assert r["compile_s"] > 0 and r["peak_gib"] > 0
    table = (run / "results.md").read_text().splitlines()
    assert table[2] == "| model | batch | work | path | ms | img/s | peak GiB | compile s |"
    assert len(table) == 4 + len(rows)

    other = tmp_path / "two"
    other.mkdir()
    (other / "results.json").write_text(json.dumps(dict(meta=dict(first["meta"], reps=3), rows=rows[:1])))
    merged = tmp_path / "merged"
    subprocess.run([sys.executable, "benchmarks/bench.py", "--merge", f"{run},{other}", "--out", str(merged)],
                   cwd=ROOT, check=True, capture_output=True, timeout=600)
    out = json.loads((merged / "results.json").read_text())
    assert [r["run"] for r in out["rows"]] == ["one", "one", "two"]
    assert out["meta"]["reps"] == "1/3" and [m["folder"] for m in out["meta"]["runs"]] == ["one", "two"]
    lines = (merged / "results.md").read_text().splitlines()
    assert lines[2].endswith("| compile s | run |") and lines[-1].endswith("| two |")


def test_attention_ablation_interpret():
    """benchmarks/attention_ablation.py in interpret mode: the shipped kernel and its sum-only
    variant agree with the plain-float32 reference (exactly, on the CPU), and a variant that
    leaves a stage out restores the module afterwards (the next default row is right again)."""
    cmd = [sys.executable, "benchmarks/attention_ablation.py", "--interpret", "--channels", "4", "--batches", "1",
           "--variants", "default,nodot,nostats", "--configs", '[{"split": 2}]']
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True, timeout=600).stdout
    rows = [line for line in out.splitlines() if line.startswith("batch")]
    assert len(rows) == 4 and not any("FAILED" in r for r in rows), out
    for r in (rows[0], rows[2], rows[3]):
        errors = [float(x) for x in r.split("error of max:")[1].split("(")[0].split()]
        assert errors and max(errors) < 1e-6, r
