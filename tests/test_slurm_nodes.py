"""SLURM across nodes: launch/slurm.sbatch on the two namespace nodes of tests/cluster.py, under the srun stand-in.

The job script runs on node 1 (where SLURM runs a batch script: the allocation's first node); the srun stand-in
starts one task per node through a slurmstepd stand-in reached over ssh, with SLURM_NODEID, SLURMD_NODENAME and
a two-host SLURM_STEP_NODELIST. The nodelist carries the nodes' host names in SLURM's compressed form
(`<name>-node[1-2]`), as a real allocation does; on a real cluster those names resolve, so the test gives both
nodes an /etc/hosts naming them (a bind mount inside each node's own mount namespace, removed afterwards), and
mimscale's MASTER_ADDR is the first name, resolved on every node. One job is preempted by SIGUSR1 to srun (what
`--signal=USR1@180` does), requeues through the scontrol stand-in, and its requeued run (same job id) resumes and
gives the losses of an uninterrupted run step for step (three training launches). Two cheap tests check the
stand-in itself and a first node whose name is loopback there. The file takes about 78 CPU-seconds (3.2 min at
load average 12 on the 2-core machine; a quiet one was not available to time it: 40 s at the least).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_train_e2e import DEMO, REPO, env_with, overrides, scalars

STANDIN = REPO / "tests" / "slurm_standin"
STOP_AT = 10  # the uninterrupted run and the requeued job stop here
SETTINGS = [
    "deepspeed.zero_stage=3",
    "deepspeed.precision=bf16",
    "train.max_steps=40",
    f"train.stop_at_step={STOP_AT}",
    "checkpoint.every_steps=1000",  # the only checkpoints: the signal's and the one at STOP_AT
    "train.progress_bar=false",
]
LAUNCH_LIMIT_S = 400  # one launch at load average 6 (20-40 s on a quiet machine)
STOP_LIMIT_S = 180  # from SIGUSR1 to the job script's exit
JOB_ID = 4242  # MASTER_PORT = 20000 + 4242 on node 1's own network (no other job there uses it)


def _job_env(cluster, tmp_path: Path) -> dict:
    """What sbatch gives the job script (2 nodes, 2 tasks), plus where the stand-ins find the nodes and write."""
    env = env_with()
    for name in [key for key in env if key.startswith(("SLURM", "MASTER_", "GLOO_", "RANK", "WORLD_SIZE", "LOCAL_"))]:
        env.pop(name)
    env.update(
        PATH=f"{STANDIN}:{env['PATH']}",
        CONFIG=str(DEMO),
        SLURM_JOB_ID=str(JOB_ID),
        SLURM_JOB_NODELIST=f"{cluster.name}-node[1-2]",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SRUN_STANDIN_NODE_ADDRS=",".join(f"{cluster.hostname(n)}={cluster.address(n)}" for n in (1, 2)),
        SRUN_STANDIN_PID_FILE=str(tmp_path / "srun.pid"),
        MIMSCALE_REQUEUE_MARKER=str(tmp_path / "marker"),
        SCONTROL_STANDIN_LOG=str(tmp_path / "scontrol.log"),
    )
    return env


class NodeNames:
    """/etc/hosts naming both nodes, bound over the file inside each node's mount namespace only. With
    ``loopback_on``, that node's own name maps to 127.0.1.1 there, as Debian's installer writes it."""

    def __init__(self, cluster, tmp_path: Path, loopback_on: int | None = None) -> None:
        self.cluster, self.files = cluster, {}
        for node in range(1, cluster.nodes + 1):
            names = "".join(
                f"{'127.0.1.1' if n == loopback_on == node else cluster.address(n)} {cluster.hostname(n)}\n"
                for n in range(1, cluster.nodes + 1)
            )
            self.files[node] = tmp_path / f"hosts-node{node}"
            self.files[node].write_text(Path("/etc/hosts").read_text() + names)

    def __enter__(self) -> NodeNames:
        for node in range(1, self.cluster.nodes + 1):
            self.cluster.exec(node, ["mount", "--bind", str(self.files[node]), "/etc/hosts"], check=True)
        return self

    def __exit__(self, *_) -> None:
        for node in range(1, self.cluster.nodes + 1):
            self.cluster.exec(node, ["umount", "/etc/hosts"], capture_output=True)


class Job:
    """launch/slurm.sbatch started on node 1; a thread collects its output (the tasks' too, node 2's through ssh)."""

    def __init__(self, cluster, env: dict, run_dir: Path) -> None:
        self.lines: list[str] = []
        command = ["bash", "launch/slurm.sbatch", *overrides(run_dir, *SETTINGS)]
        self.process = cluster.popen(1, command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line)

    def wait_for_step(self, step: int) -> None:
        """Until rank 0 logs ``step`` (the step lines pad the number: 'step   2/40 | loss ...')."""
        pattern, deadline = re.compile(rf"\bstep +{step}/"), time.monotonic() + LAUNCH_LIMIT_S
        while not pattern.search(self.output) and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pattern.search(self.output), self.output[-4000:]

    def finish(self, timeout: float) -> int:
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job still ran {timeout} s later:\n{self.output[-4000:]}")
        self.reader.join(timeout=30)
        return self.process.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def _task_env_on_node_2(cluster, run_dir: Path) -> dict:
    trainers = [p for p in cluster.processes_mentioning(2, str(run_dir)) if "mimscale.train" in p.cmdline()]
    tasks = [p for p in trainers if p.ppid() not in {t.pid for t in trainers}]  # not its DataLoader worker
    assert len(tasks) == 1, [p.cmdline() for p in tasks]
    return tasks[0].environ()


TASK = """#!/usr/bin/env bash
# a task that says where it runs, then waits; USR1 ends it with 70 + its rank; FAIL_RANK exits 3 at once
out=$OUT_DIR/task$SLURM_PROCID
[ "$SLURM_PROCID" = "$FAIL_RANK" ] && exit 3
trap 'echo USR1 > $out.signal; exit $((70 + SLURM_PROCID))' USR1
echo "$SLURM_PROCID $SLURM_LOCALID $SLURM_NODEID $SLURMD_NODENAME $(hostname) $SLURM_STEP_NODELIST $SLURM_NTASKS" > $out.tmp
mv $out.tmp $out.env
while :; do sleep 0.1; done
"""


def _srun(cluster, tmp_path: Path, *options: str, fail_rank: str = "") -> subprocess.Popen:
    (tmp_path / "task.sh").write_text(TASK)
    env = dict(_job_env(cluster, tmp_path), OUT_DIR=str(tmp_path), FAIL_RANK=fail_rank)
    command = [str(STANDIN / "srun"), *options, "bash", str(tmp_path / "task.sh")]
    return cluster.popen(1, command, env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_files(paths: list[Path], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in paths) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(path.exists() for path in paths), [path.name for path in paths if not path.exists()]


def test_srun_standin_places_tasks_on_both_nodes_forwards_signals_and_kills_the_step(cluster, tmp_path):
    """3 tasks on 2 nodes (block distribution: 2 + 1): each task's SLURM_* variables name the node it really runs
    on; USR1 to srun reaches every task on both nodes and srun exits with the highest code; with -K a task that
    exits non-zero on node 2 gets node 1's tasks killed at once (137); a srun killed with SIGKILL takes its tasks
    on both nodes with it (each node's stepd sees its input end). Nothing is left on either node."""
    try:
        nodelist, names = f"{cluster.name}-node[1-2]", [cluster.hostname(1), cluster.hostname(1), cluster.hostname(2)]
        srun = _srun(cluster, tmp_path, "-n", "3")
        _wait_for_files([tmp_path / f"task{rank}.env" for rank in range(3)])
        for rank, line in enumerate((tmp_path / f"task{rank}.env").read_text().split() for rank in range(3)):
            local, node = str([0, 1, 0][rank]), str([0, 0, 1][rank])
            assert line == [str(rank), local, node, names[rank], names[rank], nodelist, "3"]
        srun_pid = (tmp_path / "srun.pid").read_text().strip()
        cluster.exec(1, ["kill", "-USR1", srun_pid], check=True)
        assert srun.wait(timeout=60) == 72, srun.stderr.read()  # 70 + rank for each task: the highest wins
        assert all((tmp_path / f"task{rank}.signal").read_text() == "USR1\n" for rank in range(3))
        assert f"srun: error: {cluster.hostname(2)}: task 2: Exited with exit code 72" in srun.stderr.read()

        start, srun = time.monotonic(), _srun(cluster, tmp_path, "--kill-on-bad-exit=1", "-n", "2", fail_rank="1")
        assert srun.wait(timeout=60) == 137 and time.monotonic() - start < 30  # task 0 killed, not waited for
        assert f"srun: error: {cluster.hostname(2)}: task 1: Exited with exit code 3" in srun.stderr.read()

        for path in tmp_path.glob("task*.env"):
            path.unlink()
        srun = _srun(cluster, tmp_path, "-n", "2")
        _wait_for_files([tmp_path / "task0.env", tmp_path / "task1.env"])
        cluster.exec(1, ["kill", "-KILL", (tmp_path / "srun.pid").read_text().strip()], check=True)
        srun.wait(timeout=60)
        marks, deadline = (str(tmp_path / "task.sh"), f"--step={JOB_ID}."), time.monotonic() + 30
        while (
            cluster.alive_mentioning(*marks) and time.monotonic() < deadline
        ):  # each stepd kills its tasks, then exits
            time.sleep(0.2)
        assert not cluster.alive_mentioning(*marks)
    finally:  # whatever failed: no task, stepd or srun of this test stays on a node
        cluster.kill_mentioning(str(tmp_path / "task.sh"))


RENDEZVOUS = """
from mimscale.engine.distributed import choose_socket_interface, fill_single_process_env
fill_single_process_env()  # what `python -m mimscale.train` does first under srun
try:
    print(choose_socket_interface("cpu"))
except RuntimeError as err:
    print("error:", err)
"""


def test_a_first_node_whose_name_is_loopback_there_fails_at_once_naming_the_variable(cluster, tmp_path):
    """Node 1 resolves its own name to 127.0.1.1 (Debian's /etc/hosts), node 2 to node 1's address: task 1 takes
    the interface toward node 1, task 0 (the master) refuses to start instead of letting gloo advertise 127.0.1.1,
    because srun's SLURM_STEP_TASKS_PER_NODE tells it the job spans nodes."""
    env = _job_env(cluster, tmp_path)
    command = [str(STANDIN / "srun"), "-n", "2", sys.executable, "-c", RENDEZVOUS]
    with NodeNames(cluster, tmp_path, loopback_on=1):
        result = cluster.exec(1, command, cwd=REPO, env=env, capture_output=True, text=True, timeout=LAUNCH_LIMIT_S)
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith(("error:", "network:")))
    assert len(lines) == 2, result.stdout + result.stderr
    assert "is a loopback address (127.0.1.1) but the job spans nodes (WORLD_SIZE=2, 1 ranks here)" in lines[0]
    assert "set GLOO_SOCKET_IFNAME" in lines[0] and f"MASTER_ADDR={cluster.hostname(1)}" in lines[0]
    assert lines[1].startswith(f"network: GLOO_SOCKET_IFNAME=eth0 ({cluster.address(2)}, the route to MASTER_ADDR")


@pytest.mark.slow
def test_two_node_slurm_job_is_preempted_by_usr1_requeues_and_resumes_exactly(cluster, multinode_reference, tmp_path):
    """Losses and sample order against tests/test_multinode.py's one-node reference (the same settings but for
    checkpoint frequency, which training does not depend on)."""
    from test_multinode import SETTINGS as REFERENCE_SETTINGS

    def training(settings: list[str]) -> list[str]:
        return [item for item in settings if not item.startswith("checkpoint.")]

    assert training(SETTINGS) == training(REFERENCE_SETTINGS)
    reference, run_dir = multinode_reference, tmp_path / "run"
    env, nodelist = _job_env(cluster, tmp_path), f"{cluster.name}-node[1-2]"
    marks = (str(run_dir), f"--step={JOB_ID}.")  # the tasks, and every node's slurmstepd stand-in
    with NodeNames(cluster, tmp_path):
        job = Job(cluster, env, run_dir)
        try:
            job.wait_for_step(2)
            task = _task_env_on_node_2(cluster, run_dir)  # rank 1 runs on node 2, started by that node's stepd
            srun_pid = (tmp_path / "srun.pid").read_text().strip()  # a pid in node 1's process namespace
            cluster.exec(1, ["kill", "-USR1", srun_pid], check=True)  # as --signal=USR1@180 does
            code = job.finish(STOP_LIMIT_S)
        finally:
            job.process.kill()
            cluster.kill_mentioning(str(run_dir))
        output = job.output
        assert code == 0, output[-4000:]
        assert {k: task[k] for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURMD_NODENAME")} == {
            "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NODEID": "1", "SLURMD_NODENAME": cluster.hostname(2)
        }  # fmt: skip
        assert task["SLURM_STEP_NODELIST"] == nodelist and task["SLURM_NNODES"] == "2"
        # MASTER_ADDR: the first host of the step's node list, resolved on node 1 to its cluster address
        assert (
            f"GLOO_SOCKET_IFNAME=eth0 ({cluster.address(1)}, the route to MASTER_ADDR={cluster.hostname(1)})" in output
        )
        assert f"stopped by signal {int(signal.SIGUSR1)}" in output, output[-4000:]
        assert f"requeueing job {JOB_ID}" in output and (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
        checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
        assert len(checkpoints) == 1, checkpoints  # every task checkpointed once, together
        step = int(checkpoints[0].split("_")[1])
        assert 2 <= step < STOP_AT and (run_dir / "checkpoints" / "latest").read_text().strip() == checkpoints[0]
        assert len(list((run_dir / "checkpoints" / checkpoints[0]).glob("*optim_states.pt"))) == 2  # both ranks
        assert not cluster.alive_mentioning(*marks)

        requeued = Job(cluster, env, run_dir)  # a requeued job keeps its id and its nodes
        try:
            code = requeued.finish(LAUNCH_LIMIT_S)
        finally:
            requeued.process.kill()
            cluster.kill_mentioning(str(run_dir))
    output = requeued.output
    assert code == 0 and "requeue" not in output, output[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / checkpoints[0]} at step {step}" in output
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB_ID}\n"
    assert not cluster.alive_mentioning(*marks)
    expected = scalars(reference, "train/loss")
    assert sorted(expected) == list(range(1, STOP_AT + 1))
    assert scalars(run_dir, "train/loss") == expected  # steps 1..k before the signal, k+1..STOP_AT requeued
    assert scalars(run_dir, "data/sample_id_sum") == scalars(reference, "data/sample_id_sum")
