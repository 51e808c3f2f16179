"""README's promises: its first two commands exist, and CI runs exactly the test command."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```(?:bash|sh)?\n(.*?)```", text, re.S)
    assert block, "README.md must open with a code block holding the two commands"
    lines = [l for l in block.group(1).splitlines() if l.strip() and not l.startswith("#")]
    return lines


def test_readme_opens_with_main_job_and_tests():
    main_job, tests = readme_commands()[:2]
    assert "mamba-jax demo" in main_job
    assert "pytest" in tests


def test_ci_runs_exactly_the_readme_test_command():
    tests = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci, f"README test command {tests!r} is not a line of .ci/run"
