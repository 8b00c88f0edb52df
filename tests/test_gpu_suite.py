"""The GPU suite's ``--tiny --device cpu`` mode: the same code a GPU run executes, end to end, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_suite_runs_tiny_on_cpu_and_writes_its_report(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    subprocess.run(
        [sys.executable, "bench/gpu_suite.py", "--tiny", "--device", "cpu", "--out", str(out)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
        timeout=300,
        capture_output=True,
    )
    report = json.loads((out / "results.json").read_text())
    assert set(report["base_decode"]) == {"1", "4", "8"}
    assert all(cell["tokens_per_s"] > 0 and cell["roofline_fraction"] > 0 for cell in report["base_decode"].values())
    assert set(report["adapters"]) == {"4", "8"} and all(c["vs_base"] > 0 for c in report["adapters"].values())
    assert report["resident_10k"]["resident"] >= 100
    assert set(report["peers"]) == {"generate_batch", "peft_one_adapter"}
    assert report["ttft"]["ms"] > 0
    table = (out / "results.md").read_text()
    assert "| base decode | 8 |" in table and "peft_one_adapter" in table
