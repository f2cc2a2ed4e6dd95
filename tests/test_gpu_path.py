"""The GPU path, exercised on CPU: ZeRO-3 in-run kNN at real parameter sizes, compile, host syncs, AdamW resume.

Everything here runs without a GPU; the same code paths run on one when there is one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_ranks(*settings: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MIMSCALE_INJECT_FAULT", None)
    command = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "mimscale.train",
               "--config", str(DEMO)]  # fmt: skip
    for item in settings:
        command += ["--set", item]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_zero3_in_run_knn_with_partitioned_pos_embed(tmp_path):
    """Persistence threshold 0 partitions every parameter, as ViT-B's 151k-element pos_embed is above the default
    1e5: the in-run kNN calls forward_features directly and must still see the gathered pos_embed/cls_token."""
    run_dir = tmp_path / "run"
    result = _launch_two_ranks(
        "model.student_args.depth=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "train.max_steps=1",
        "train.log_every=1",
        "train.progress_bar=false",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=bf16",
        "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
        "eval.knn_every=1",
        "eval.train_shards=shards/sample-val/*.tar",
        "eval.val_shards=shards/sample-val/*.tar",
        f"run.output_dir={run_dir}",
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "eval step 1 | knn_top1" in result.stdout
    assert '"stage3_param_persistence_threshold": 0' in (run_dir / "deepspeed_config.json").read_text()
