"""bench/gpu_suite.py --smoke: every section of the GPU suite runs end to end on CPU and writes its table."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_suite_smoke_runs_every_section_and_writes_its_table(tmp_path):
    results = tmp_path / "RESULTS.md"
    before = (
        "# Results\n\n## Other section\n\nkept\n\n<!-- gpu_suite:begin -->\nold table\n<!-- gpu_suite:end -->\n\ntail\n"
    )
    results.write_text(before)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [
        sys.executable,
        str(REPO / "bench" / "gpu_suite.py"),
        "--smoke",
        "--results",
        str(results),
        "--out-dir",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    rows = json.loads((tmp_path / "out" / "rows.json").read_text())
    sections = {row["section"] for row in rows}
    assert sections == {"vit", "swin", "distill", "decode", "planner", "zero3"}
    assert all(row["verdict"] == "smoke" for row in rows), [row for row in rows if row["verdict"] != "smoke"]
    assert sum("model.compile" in row["what"] for row in rows) == 2
    text = results.read_text()
    assert "old table" not in text and "kept" in text and text.rstrip().endswith("tail")
    assert text.count("| decode |") >= 3 and "| zero3 |" in text  # worker, worker side, one row per decoder
    assert (tmp_path / "out" / "RESULTS.md").read_text() == text
