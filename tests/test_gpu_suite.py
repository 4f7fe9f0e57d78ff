"""``benchmarks/gpu_suite.py --dry-run``: every GPU check runs on the CPU at tiny sizes and prints
the same table, so the suite cannot rot between the runs on a GPU machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run_runs_every_check(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry-run", "--report", str(report),
         "--tmp", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(report.read_text())
    assert not data["errors"]
    assert set(data["seconds"]) == {"pytest", "embed", "bert", "tier0", "train"}
    checks = {f["check"].split(",")[0] for f in data["figures"]}
    assert checks == {"pytest -m gpu", "embed", "tier 0 + funnel", "training"}
    for line in ("machine:", "driver:", "torch:", "faiss:"):
        assert line in proc.stdout
    figures = {f["figure"]: f for f in data["figures"]}
    assert all(f["value"] > 0 for f in data["figures"] if f["check"] != "pytest -m gpu")
    assert any(name.startswith("funnel recall@10") and f["value"] >= 0.99 for name, f in figures.items())
    assert sum(1 for f in data["figures"] if f["figure"].startswith("pipeline")) == 2  # default encoder, BERT
    assert data["table"] in proc.stdout
