"""The documented benchmark command keeps working: a one-scene run on the real model writes its full table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]


def test_simulation_benchmark_writes_every_measurement(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "simulation.md"
    run = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_simulation.py"), "--scenes", "1", "--roles", "1",
         "--steps", "1", "--rounds", "1", "--answer-tokens", "16", "--plan-tokens", "48", "--action-tokens", "16",
         "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=540,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = out.read_text(encoding="utf-8")
    assert report.strip() in run.stdout  # printed and written
    rows = {line.split(" | ")[0].lstrip("| "): line for line in report.splitlines() if line.startswith("| (")}
    for measurement in ("(a) simulation tokens/s ÷ raw tokens/s", "(b) speed-up over sequential (batch 1), wall "
                        "time per scene", "(c) warm / cold wall time (same store)", "(d) peak RSS after model load"):
        assert measurement in rows, f"missing row {measurement!r} in:\n{report}"
    assert "| 0 (cache hits" in rows["(c) backend calls in the warm run"]  # the warm run never reached the model
    assert "| yes |" in rows["(c) warm transcripts identical to cold"]
    assert "the same 1 scenes" in report  # the sequential run covered the same scene
    packed = int(report.split(" linear layers oneDNN-prepacked")[0].rsplit(" ", 1)[-1])
    assert packed > 0 or not torch.backends.mkldnn.is_available()
