"""Launch scripts under the tools they are written for.

launch/slurm.sbatch runs under `srun` / `scontrol` stand-ins (tests/slurm_standin) that follow the srun man page:
signals forwarded to the tasks, --kill-on-bad-exit kills the other tasks as soon as one exits non-zero, and the
exit status is the highest exit code or 128 + signal. launch/multi_node.sh runs the real `deepspeed` launcher with
a one-host hostfile. Both runs train the same tiny model on 2 CPU ranks; the second resumes the first.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from mimscale.engine.slurm import expand_hostlist, fill_rendezvous_env, write_requeue_marker

REPO = Path(__file__).resolve().parents[1]
STANDIN = REPO / "tests" / "slurm_standin"
TINY = [
    "model.student_args.depth=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.max_steps=40",
    "train.log_every=1",
    "train.progress_bar=false",
    "checkpoint.every_steps=1000",
    "eval.knn_every=0",
]


def test_hostlist_expansion_follows_scontrol_show_hostnames() -> None:
    assert expand_hostlist("node1") == ["node1"]
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("a[8-10]") == ["a8", "a9", "a10"]
    assert expand_hostlist("a[098-101]") == ["a098", "a099", "a100", "a101"]
    assert expand_hostlist("rack[1-2]-n[1-2]") == ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]
    assert expand_hostlist("x1,y[3-4],z") == ["x1", "y3", "y4", "z"]
    for bad in ("node[1-2", "node]1", "node[3-1]", "node[a-b]", ""):
        with pytest.raises(ValueError, match="SLURM host list"):
            expand_hostlist(bad)


def test_bare_srun_environment_gives_the_rendezvous() -> None:
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "16", "SLURM_LOCALID": "3", "SLURM_JOB_ID": "123456"}
    fill_rendezvous_env(dict(env, SLURM_JOB_NODELIST="x"))  # a list with one host is enough
    derived = dict(env, SLURM_JOB_NODELIST="gpu[07-08]")
    fill_rendezvous_env(derived)
    assert (derived["RANK"], derived["WORLD_SIZE"], derived["LOCAL_RANK"]) == ("3", "16", "3")
    assert (derived["MASTER_ADDR"], derived["MASTER_PORT"]) == ("gpu07", str(20000 + 123456 % 20000))
    step = dict(env, SLURM_JOB_NODELIST="gpu[01-08]", SLURM_STEP_NODELIST="gpu[05-06]", MASTER_PORT="1234")
    fill_rendezvous_env(step)  # task 0 of the step runs on the step's first node; a set MASTER_PORT is kept
    assert (step["MASTER_ADDR"], step["MASTER_PORT"]) == ("gpu05", "1234")
    assert "LOCAL_WORLD_SIZE" not in derived  # srun did not say how many tasks share the node
    for node, local in (("0", "2"), ("2", "2"), ("3", "1"), ("4", None)):
        spread = dict(env, SLURM_JOB_NODELIST="n[1-4]", SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID=node)
        fill_rendezvous_env(spread)
        assert spread.get("LOCAL_WORLD_SIZE") == local
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        fill_rendezvous_env(dict(env))
    with pytest.raises(ValueError, match="export MASTER_PORT"):
        fill_rendezvous_env({**env, "SLURM_JOB_NODELIST": "n1", "SLURM_JOB_ID": ""})


def test_a_job_script_without_srun_trains_as_one_process(capsys) -> None:
    """The batch step has SLURM_PROCID=0 and the job's SLURM_NTASKS but no SLURM_STEP_ID: a plain `mimscale train`
    there is a world of 1 (taking SLURM_NTASKS=4 would wait for 3 ranks nobody starts), and it says how to use the
    4 tasks; a task srun started (SLURM_STEP_ID set) joins the step's world."""
    from mimscale.engine.distributed import fill_single_process_env

    saved = dict(os.environ)
    try:
        for name in [key for key in os.environ if key.startswith(("SLURM_", "MASTER_"))] + ["RANK", "WORLD_SIZE"]:
            os.environ.pop(name, None)
        os.environ.update(
            SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="4", SLURM_JOB_ID="9", SLURM_JOB_NODELIST="gpu[01-02]"
        )
        fill_single_process_env()
        assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
        assert "SLURM_NTASKS=4, no srun step" in capsys.readouterr().err
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            del os.environ[name]
        os.environ.update(SLURM_STEP_ID="0", SLURM_STEP_NUM_TASKS="2")  # `srun -n 2` in a 4-task job: a world of 2
        fill_single_process_env()
        assert (os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == (
            "2",
            "gpu01",
            "20009",
        )
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_requeue_marker_only_when_the_job_script_asks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("MIMSCALE_REQUEUE_MARKER", raising=False)
    assert write_requeue_marker(tmp_path / "step_00000003") is None
    monkeypatch.setenv("MIMSCALE_REQUEUE_MARKER", str(tmp_path / "logs" / "requeue-7"))
    marker = write_requeue_marker(tmp_path / "step_00000003")
    assert marker.read_text().strip() == str(tmp_path / "step_00000003")


FAKE_TRAINER = """#!/usr/bin/env bash
# stands in for `python -m mimscale.train`: task 0 writes the marker (as after a complete checkpoint) and is slow
# to exit; task 1 exits 75 first, so srun's --kill-on-bad-exit kills task 0 and srun returns 137
[ -n "$FAIL" ] && [ "$SLURM_PROCID" = 1 ] && exit 1
if [ "$SLURM_PROCID" = 0 ]; then
    [ -z "$FAIL" ] && echo checkpoint > "$MIMSCALE_REQUEUE_MARKER"
    sleep 60
fi
while [ -z "$FAIL" ] && [ ! -f "$MIMSCALE_REQUEUE_MARKER" ]; do sleep 0.05; done
exit 75
"""


def test_sbatch_requeues_on_the_marker_whatever_srun_returns(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_TRAINER)
    (bin_dir / "python").chmod(0o755)
    env = _base_env(tmp_path)
    env.update(
        PATH=f"{STANDIN}:{bin_dir}:{env['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(REPO),
        MIMSCALE_REQUEUE_MARKER=str(tmp_path / "marker"),
        SCONTROL_STANDIN_LOG=str(tmp_path / "scontrol.log"),
    )
    start = time.monotonic()
    job = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30  # task 0 was killed, not waited for
    assert job.returncode == 0, job.stdout + job.stderr
    assert "srun: error: task 1: Exited with exit code 75" in job.stderr
    assert "(srun exit 137); requeueing job 77" in job.stdout  # the status the old `status -eq 75` test missed
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"

    env["FAIL"] = "1"  # a crash: no marker, no requeue, srun's status is the job's
    job = subprocess.run(["bash", "launch/slurm.sbatch"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert job.returncode == 137 and "requeue" not in job.stdout
    assert (tmp_path / "scontrol.log").read_text() == "requeue 77\n"


def _job_id_with_free_port() -> int:
    """A job id whose derived MASTER_PORT (20000 + id % 20000) is free right now."""
    for _ in range(100):
        port = random.randint(20000, 39999)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return 100000 + port - 20000
    raise RuntimeError("no free port in 20000-39999")


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"'{text}' not seen in {timeout:.0f} s:\n{path.read_text()[-4000:] if path.exists() else ''}")


def _base_env(tmp_path: Path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("MIMSCALE_INJECT_FAULT", None)
    for name in [key for key in env if key.startswith(("SLURM_", "MASTER_", "MIMSCALE_REQUEUE"))]:
        env.pop(name)
    return env


@pytest.mark.slow
def test_sbatch_requeues_after_signal_checkpoint_and_one_host_hostfile_resumes(tmp_path: Path) -> None:
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    job_id = _job_id_with_free_port()
    env = _base_env(tmp_path)
    env.update(
        PATH=f"{STANDIN}:{env['PATH']}",
        SLURM_JOB_ID=str(job_id),
        SLURM_JOB_NODELIST="localhost",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(REPO),
        CONFIG="configs/demo_cpu.yaml",
        MIMSCALE_REQUEUE_MARKER=str(tmp_path / "marker"),
        SCONTROL_STANDIN_LOG=str(tmp_path / "scontrol.log"),
        SRUN_STANDIN_PID_FILE=str(tmp_path / "srun.pid"),
    )
    args = [arg for item in [*TINY, f"run.output_dir={run_dir}"] for arg in ("--set", item)]
    with open(log, "w") as out:
        job = subprocess.Popen(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, stdout=out, stderr=out)
        try:
            _wait_for(log, "step  2/40", job, timeout=240)  # both ranks are training
            os.kill(int((tmp_path / "srun.pid").read_text()), signal.SIGUSR1)  # as --signal=USR1@180 would
            job.wait(timeout=240)
        finally:
            if job.poll() is None:
                job.kill()
    text = log.read_text()
    assert job.returncode == 0, text[-4000:]
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {job_id}\n", text[-4000:]
    assert "requeueing job" in text and not (tmp_path / "marker").exists()
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "mimscale.json").is_file()
    step = int(tag.split("_")[1])
    assert 2 <= step < 40

    # The requeued run, here through the deepspeed launcher and a one-host hostfile (no ssh on this machine).
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# one node\nlocalhost slots=2\n")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _base_env(tmp_path)
    env.update(HOSTFILE=str(hostfile), CONFIG="configs/demo_cpu.yaml", MASTER_PORT=str(port))
    resumed = subprocess.run(
        ["launch/multi_node.sh", "--num_gpus", "2", "--", *args, "--set", f"train.stop_at_step={step + 1}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / tag} at step {step}" in output
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{step + 1:08d}"
