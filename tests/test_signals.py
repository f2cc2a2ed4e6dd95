"""Every signal at every moment (issue 20, section 6), through the real `mimscale train` command on one CPU rank.

- SIGTERM in the first seconds of start-up: exit 75 at once, nothing saved, the requeue marker written.
- Ctrl-C (SIGINT) mid-run: one complete checkpoint, exit 130; a second Ctrl-C exits 130 at once.
- A rank wedged before its first step: past run.stop_timeout_s it prints its Python stack and exits 124.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.student_args.depth=2",
    "data.batch_size=4",
    "data.num_workers=1",
    "train.log_every=1",
    "train.max_steps=400",
    "checkpoint.every_steps=1000",
    "eval.knn_every=0",
]

pytestmark = pytest.mark.slow


class Run:
    """`mimscale train` in its own session, its merged output collected by a thread so waits never block."""

    def __init__(self, run_dir: Path, *extra: str, **env: str):
        sets = [arg for item in [*TINY, f"run.output_dir={run_dir}", *extra] for arg in ("--set", item)]
        command = [sys.executable, "-m", "mimscale.cli", "train", "--config", str(REPO / "configs" / "demo_cpu.yaml")]
        environ = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **env)
        if "MIMSCALE_INJECT_FAULT" not in env:
            environ.pop("MIMSCALE_INJECT_FAULT", None)
        self.process = subprocess.Popen(
            [*command, *sets],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while text not in self.output:
            if self.process.poll() is not None or time.time() > deadline:
                self.kill()
                pytest.fail(f"never printed {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float) -> int:
        """The exit code; past ``timeout`` the whole session is killed and the test fails (old code hung here)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"still running {timeout} s after the signal:\n{self.output[-4000:]}")
        time.sleep(0.2)  # the collector thread reads the last lines
        return code

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def handles(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` installed (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if (p / "mimscale.json").is_file())


def test_sigterm_in_the_first_seconds_of_start_up_exits_75_with_nothing_to_save(tmp_path):
    marker = tmp_path / "requeue"
    run = Run(tmp_path / "run", MIMSCALE_REQUEUE_MARKER=str(marker))
    deadline = time.time() + 60
    while not handles(run.process.pid, signal.SIGTERM):  # mimscale.cli installs it before its slow imports
        assert run.process.poll() is None and time.time() < deadline, run.output[-3000:]
        time.sleep(0.005)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 75, run.output[-3000:]
    assert "stopped by signal 15 during start-up" in run.output and "nothing to save" in run.output
    assert checkpoints(tmp_path / "run") == [] and marker.is_file()


def test_ctrl_c_checkpoints_and_exits_130_without_asking_for_a_requeue(tmp_path):
    marker = tmp_path / "requeue"
    run = Run(tmp_path / "run", MIMSCALE_REQUEUE_MARKER=str(marker))
    run.wait_for("step   2/400")
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=180) == 130, run.output[-3000:]
    assert "stopped by signal 2 at step" in run.output and "KeyboardInterrupt" not in run.output
    assert len(checkpoints(tmp_path / "run")) == 1 and not marker.exists()


def test_a_second_ctrl_c_exits_at_once_even_from_a_wedged_rank(tmp_path):
    run = Run(tmp_path / "run", MIMSCALE_INJECT_FAULT="hang:rank=0:step=1")
    run.wait_for("fault injection: rank 0 hangs at step 1")
    run.process.send_signal(signal.SIGINT)
    time.sleep(1)
    assert run.process.poll() is None, run.output[-3000:]  # the first one waits for a step boundary
    run.process.send_signal(signal.SIGINT)
    assert run.finish(timeout=60) == 130, run.output[-3000:]
    assert "second Ctrl-C: exiting now without a checkpoint" in run.output and checkpoints(tmp_path / "run") == []


def test_a_rank_wedged_before_its_first_step_prints_its_stack_and_exits_124_after_the_stop_deadline(tmp_path):
    run = Run(tmp_path / "run", "run.stop_timeout_s=3", MIMSCALE_INJECT_FAULT="hang:rank=0:step=1")
    run.wait_for("fault injection: rank 0 hangs at step 1")
    sent = time.time()
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=120) == 124, run.output[-3000:]
    assert time.time() - sent >= 3
    assert "has not reached a step boundary to act on it (run.stop_timeout_s=3)" in run.output
    assert "in maybe_hang" in run.output and "Current thread" in run.output  # faulthandler's stack of the rank
