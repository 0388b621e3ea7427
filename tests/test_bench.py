"""The benchmark command runs (a seconds-long smoke run; the benchmark itself is not a test)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO


def test_bench_quick_runs(tmp_path: Path) -> None:
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["streams"]["proxy_correct"] == report["streams"]["count"]
    assert report["streams"]["reference_correct"] == report["streams"]["count"]
    assert report["streams"]["direct_correct"] == report["streams"]["count"]
    assert report["scale"]["errors"] == 0 and report["c64"]["errors"] == 0
    assert report["c64"]["proxy_rps"] > 0 and report["c64"]["reference_rps"] > 0
    assert report["c64"]["workers_auto_rps"] > 0 and report["c64"]["workers_auto_errors"] == 0
    # Every goal is printed with its verdict, judged from figures of this run.
    assert len(report["goals"]) == 8
    for goal in report["goals"]:
        verdict = "PASS" if goal["pass"] else "FAIL"
        assert any(
            line.startswith(goal["goal"]) and line.endswith(verdict)
            for line in result.stdout.splitlines()
        ), goal
