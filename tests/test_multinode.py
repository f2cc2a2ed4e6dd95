"""Many nodes for real: `mimscale launch --hostfile` across the namespace cluster of tests/cluster.py.

Two nodes x 1 CPU rank (gloo over the nodes' veths) against the same world size and global batch on one node:
the same losses step for step (ZeRO-3 bf16, and ZeRO-1), a stop signal to the runner on node 1 or only to node 2's
processes ends in one checkpoint by every rank and exit 75, the relaunch continues exactly (on 1 node or on 2, or
by torchrun's c10d rendezvous), a node whose processes are killed, that is cut off during a save, or that fails to
start ends the job quickly, naming it, and no process of a run is left on any node. 2 nodes x 2 ranks read shards
over HTTP from the cluster's storage host into node-local caches: each node fetches its own streams' shards once.
Nine launches (two one-node references, seven multi-node), each checked for several things: the file takes about
10 minutes on the 2-core machine at load average 10 (2026-12-02); less when it is quiet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_e2e import DEMO, REPO, env_with, overrides, scalars

from mimscale.engine.fanout import FAIL_GRACE_S

STOP_AT = 10  # the reference stops here; a preempted run stops earlier
SETTINGS = [
    "deepspeed.zero_stage=3",
    "deepspeed.precision=bf16",
    "train.max_steps=40",
    f"train.stop_at_step={STOP_AT}",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=10",
    "train.progress_bar=false",
]
ZERO1_STOP_AT = 12
ZERO1 = ["deepspeed.zero_stage=1", f"train.stop_at_step={ZERO1_STOP_AT}"]
LAUNCH_LIMIT_S = 400  # one launch at load average 6 (the runs take 30-50 s on a quiet machine)
STOP_LIMIT_S = 180  # from a stop signal to the job's exit
NODE_LOSS_LIMIT_S = 90  # from a node's death to the job's exit (the fan-out waits 10 s, then kills: see README)
NODE_START_LIMIT_S = 150  # from the launch to the exit when a node cannot start (not run.startup_timeout_s=900)
PARTITION_LIMIT_S = 150  # ssh keep-alive 30 s + 10 s grace, or the node launcher's 30 s of silence, plus load
_ports = iter(range(29400, 29500))
SAMPLE = REPO / "shards" / "sample"


def _env(tmp_path: Path, *lines: str) -> dict:
    """The test environment, plus the variables every node needs, in a DeepSpeed environment file (as a user's
    .deepspeed_env): only PYTHON*-prefixed variables reach other nodes by themselves."""
    env_file = tmp_path / "deepspeed_env"
    env_file.write_text("".join(f"{line}\n" for line in ["HF_HUB_OFFLINE=1", "OMP_NUM_THREADS=1", *lines]))
    return env_with(DS_ENV_FILE=str(env_file))


def _one_node(run_dir: Path, *extra: str, timeout: float = LAUNCH_LIMIT_S) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mimscale.cli", "launch", "--num_gpus", "2", "--master_port", str(next(_ports))]
    command += ["--module", "mimscale.train", "--config", str(DEMO), *overrides(run_dir, *SETTINGS, *extra)]
    result = subprocess.run(command, cwd=REPO, env=env_with(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


class TwoNodeRun:
    """launch/multi_node.sh (`mimscale launch --hostfile`) started on node 1 as a user would, its master address the
    hostfile's first host; read line by line; the fixture leaves no process of it on any node."""

    def __init__(self, cluster, tmp_path: Path, run_dir: Path, *extra: str, slots: int = 1, port: int = 0,
                 ssh_args: str = "", node_env: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.cluster, self.run_dir, self.lines = cluster, run_dir, []
        env = dict(_env(tmp_path, *node_env), HOSTFILE=str(cluster.hostfile(slots)), CONFIG=str(DEMO),
                   MASTER_PORT=str(port or next(_ports)), PDSH_SSH_ARGS_APPEND=ssh_args)  # fmt: skip
        command = ["launch/multi_node.sh", *overrides(run_dir, *SETTINGS, *extra)]  # exec's `mimscale launch`
        self.process = cluster.popen(1, command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip

    @property
    def runner(self):
        import psutil

        return psutil.Process(self.process.pid).children()[0]  # nsenter's child: the runner, on node 1

    def wait_for_step(self, step: int, timeout: float = LAUNCH_LIMIT_S) -> None:
        """Read the output until rank 0 logs ``step`` (the step lines pad the number: 'step   2/40 | loss ...')."""
        self.wait_for(rf"\bstep +{step}/", timeout)

    def wait_for(self, pattern: str, timeout: float = LAUNCH_LIMIT_S) -> None:
        """Read the output until a line matches ``pattern`` (a regular expression)."""
        found = re.compile(pattern)
        deadline = time.monotonic() + timeout
        for line in iter(self.process.stdout.readline, ""):
            self.lines.append(line)
            if found.search(line):
                return
            if time.monotonic() > deadline:
                break
        pytest.fail(f"no line matching {pattern!r} within {timeout} s:\n{self.output[-4000:]}")

    def finish(self, timeout: float) -> tuple[int, float]:
        """(exit code, seconds it took) once the runner has exited."""
        start = time.monotonic()
        try:
            rest = self.process.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the job still ran {timeout} s later:\n{self.output[-4000:]}")
        self.lines.append(rest)
        return self.process.returncode, time.monotonic() - start

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def leftovers(self) -> dict[int, list[str]]:
        """The processes of this run still alive on each node (found by its run folder in their command lines)."""
        return self.cluster.alive_mentioning(str(self.run_dir))

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.cluster.kill_mentioning(str(self.run_dir))


@pytest.fixture
def two_node_run(cluster, tmp_path):
    """Start two-node runs; whatever a test asserts, every process of them is killed on every node afterwards."""
    runs: list[TwoNodeRun] = []

    def start(run_dir: Path, *extra: str, **options) -> TwoNodeRun:
        runs.append(TwoNodeRun(cluster, tmp_path, run_dir, *extra, **options))
        return runs[-1]

    yield start
    for run in runs:
        run.kill()


def _python_processes_of(cluster, node: int, run_dir: Path) -> list:
    """The run's Python processes on ``node`` (node launcher, ranks, DataLoader workers), not the ssh shell."""
    return [p for p in cluster.processes_mentioning(node, str(run_dir)) if "python" in Path(p.cmdline()[0]).name]


def _stopped_step(run_dir: Path) -> int:
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / tag / "mimscale.json").is_file()
    return int(tag.split("_")[1])


def _assert_every_rank_saved(run_dir: Path, step: int, ranks: int) -> None:
    saved = sorted(p.name for p in (run_dir / "checkpoints" / f"step_{step:08d}").glob("*optim_states.pt"))
    assert len(saved) == ranks, saved


def run_reference(run_dir: Path) -> Path:
    """One node, 2 ranks, the same global batch: the losses every two-node run must reproduce (the session fixture
    ``multinode_reference`` in conftest.py runs it once for this file and tests/test_slurm_nodes.py)."""
    _one_node(run_dir)
    return run_dir


@pytest.fixture
def reference(multinode_reference) -> Path:
    return multinode_reference


@pytest.fixture(scope="module")
def reference_zero1(tmp_path_factory) -> Path:
    """The same with ZeRO-1, to step ZERO1_STOP_AT."""
    run_dir = tmp_path_factory.mktemp("one-node-zero1") / "run"
    _one_node(run_dir, *ZERO1)
    return run_dir


@pytest.mark.slow
def test_two_nodes_train_like_one_stop_together_on_sigterm_and_resume_on_one_node(reference, two_node_run, tmp_path):
    run_dir = tmp_path / "two-nodes"
    run = two_node_run(run_dir)
    run.wait_for_step(2)
    run.runner.send_signal(signal.SIGTERM)  # what a scheduler sends to the job's first node
    code, took = run.finish(STOP_LIMIT_S)
    output = run.output
    assert code == 75, output[-4000:]
    assert took < STOP_LIMIT_S
    assert "network: GLOO_SOCKET_IFNAME=eth0 (10." in output  # rank 0 says which interface it chose
    step = _stopped_step(run_dir)
    assert 2 <= step < STOP_AT and "stopped by signal 15" in output
    _assert_every_rank_saved(run_dir, step, ranks=2)
    assert not run.leftovers()
    losses = scalars(run_dir, "train/loss")
    expected = scalars(reference, "train/loss")
    assert losses == {s: v for s, v in expected.items() if s <= step}  # same training, step for step
    from mimscale.engine.checkpoint import verify_checkpoint
    from mimscale.eval.export import export_checkpoint

    tag = f"step_{step:08d}"  # written by ranks of both nodes on the shared filesystem: verifies and exports
    assert verify_checkpoint(run_dir / "checkpoints" / tag) == []  # what `mimscale ckpt info` checks: sizes, sha256
    exported = export_checkpoint(run_dir, tmp_path / "export", tag=tag)  # in this process: no second start-up
    assert (exported / "model.safetensors").is_file() and (exported / "config.json").is_file()

    end = min(step + 4, STOP_AT)  # the same job relaunched on one node, 2 ranks: continues exactly
    resumed = _one_node(run_dir, f"train.stop_at_step={end}")
    assert f"at step {step}" in resumed.stdout
    assert scalars(run_dir, "train/loss") == {s: v for s, v in expected.items() if s <= end}
    ids = scalars(reference, "data/sample_id_sum")
    assert scalars(run_dir, "data/sample_id_sum") == {s: v for s, v in ids.items() if s <= end}


@pytest.mark.slow
def test_one_node_zero1_checkpoint_resumes_on_two_nodes_and_a_signal_to_node_2_only_stops_all(
    reference_zero1, two_node_run, cluster, tmp_path
):
    """ZeRO-1 (the other tests run ZeRO-3): a one-node run's step-4 checkpoint continues on 2 nodes x 1 rank with the
    one-node run's losses, step for step; SIGUSR1 to node 2's processes only ends the job with one checkpoint by
    every rank and exit 75."""
    run_dir = tmp_path / "grown"
    shutil.copytree(reference_zero1 / "checkpoints" / "step_00000004", run_dir / "checkpoints" / "step_00000004")
    (run_dir / "checkpoints" / "latest").write_text("step_00000004")
    run = two_node_run(run_dir, *ZERO1)
    run.wait_for_step(6)
    victims = _python_processes_of(cluster, 2, run_dir)
    assert victims, run.output[-3000:]
    for process in victims:  # as a scheduler may signal one node's share of the job (SLURM's --signal=USR1@T)
        process.send_signal(signal.SIGUSR1)
    code, _ = run.finish(STOP_LIMIT_S)
    output = run.output
    assert code == 75, output[-4000:]
    assert "at step 4" in output and f"stopped by signal {int(signal.SIGUSR1)}" in output
    step = _stopped_step(run_dir)
    assert 6 <= step < ZERO1_STOP_AT
    _assert_every_rank_saved(run_dir, step, ranks=2)
    assert not run.leftovers()
    expected = scalars(reference_zero1, "train/loss")
    assert scalars(run_dir, "train/loss") == {s: v for s, v in expected.items() if 4 < s <= step}


def _shards_each_node_reads(ranks_per_node: int, nodes: int, batch_size: int, streams: int) -> dict[int, set[str]]:
    """{node: the shards its ranks' canonical streams read}, from the order code (pipeline/order.py) and the demo's
    seed and shuffle window: what each node's cache must hold, and nothing else."""
    from mimscale.config import load_config
    from mimscale.pipeline.order import EpochPlan, arrangement
    from mimscale.shards.sets import open_shard_set

    cfg = load_config(DEMO)
    table = open_shard_set(str(SAMPLE / "*.tar"), "data.shards", counts=True)
    names = [Path(location).name for location in table.locations]
    global_batch = batch_size * ranks_per_node * nodes
    found = {}
    for node in range(1, nodes + 1):
        ranks = range((node - 1) * ranks_per_node, node * ranks_per_node)
        rows = [rank * batch_size + row for rank in ranks for row in range(batch_size)]
        node_streams = {arrangement(row, global_batch, streams)[0] for row in rows}
        found[node] = set()
        for epoch in (0, 1):  # a stream's shards are fixed for the run; the next epoch's first window is read ahead
            plan = EpochPlan(
                table.counts, seed=cfg.run.seed, epoch=epoch, streams=streams, window=cfg.data.shuffle_window
            )
            found[node] |= {names[shard] for stream in node_streams for shard in plan.streams[stream].shard}
    return found


def _cached_shards(disk: Path) -> set[str]:
    """The shard names in a node cache's shard folder (entries are '<16 hex>-<name>'; .part files are hidden)."""
    return {path.name.split("-", 1)[1] for path in disk.glob("*.tar") if not path.name.startswith(".")}


def _wait_for_caches(cluster, folder: str, expected: dict[int, set[str]], timeout: float = 60.0) -> dict:
    """The shards in each node's data.cache_dir (``folder`` on its own disk) once they include what they must
    (prefetches finish in the background)."""
    deadline = time.monotonic() + timeout
    while True:
        cached = {node: _cached_shards(cluster.disk(node) / folder / "shards") for node in expected}
        if all(expected[node] <= cached[node] for node in expected) or time.monotonic() > deadline:
            return cached
        time.sleep(0.5)


LOSS_STEPS = 4  # the 2 x 2 run's steps compared with the reference before node 2 is killed


@pytest.mark.slow
def test_two_nodes_of_two_ranks_cache_their_own_shards_train_like_one_node_and_survive_nothing_of_a_dead_node(
    reference, two_node_run, cluster, tmp_path
):
    """2 nodes x 2 ranks (world 4, data.batch_size=2: the reference's global batch of 8, and its data.streams=2)
    read the sample shards over HTTP from the storage host into data.cache_dir on each node's own disk; then every
    process of the run on node 2 is killed (kill -9).

    Data: node n's cache holds exactly the shards its ranks' streams read (computed from the order code), and the
    server saw one GET per shard from each node that reads it, none from the other: both ranks of a node read the
    same stream (W=4 > C=2), so the second rank's reads are the first one's download (the node cache's flock).
    Training: the first LOSS_STEPS losses match the one-node reference to 1e-3 relative; bits are not asserted: the
    logged loss is the mean over 4 ranks' losses of 2 samples instead of 2 ranks' of 4, and ZeRO-3's bf16
    reduce-scatter sums the gradients of 4 ranks in another order (the 2 x 1 runs, the reference's world size,
    are compared exactly)."""
    run_dir, folder = tmp_path / "node-dies", f"cache-{tmp_path.name}"
    with cluster.serve(SAMPLE, port=next(_ports)) as storage:
        data = [f"data.shards={storage.url('sample-{000..003}.tar')}", f"data.cache_dir={cluster.node_local / folder}"]
        run = two_node_run(run_dir, *data, "data.streams=2", "data.batch_size=2", "train.stop_at_step=0", slots=2)
        run.wait_for_step(LOSS_STEPS)
        assert run.output.count("dist_world_size=4") == 2  # both node launchers started 2 ranks of a world of 4
        expected = _shards_each_node_reads(ranks_per_node=2, nodes=2, batch_size=2, streams=2)
        assert expected[1] ^ expected[2], expected  # a shard only one node reads: the check below means something
        cached = _wait_for_caches(cluster, folder, expected)
        fetched = [(client, name) for client, method, name in storage.requests() if name.endswith(".tar")]
    assert cached == expected, (cached, expected)
    for name in expected[1] | expected[2]:
        readers = sorted(cluster.address(node) for node in expected if name in expected[node])
        assert sorted(client for client, fetched_name in fetched if fetched_name == name) == readers, fetched
    assert not (cluster.node_local / folder).exists()  # on the nodes' own disks, not on the machine's

    for process in cluster.processes_mentioning(2, str(run_dir)):  # every process of the run on node 2
        process.kill()
    code, took = run.finish(NODE_LOSS_LIMIT_S)
    output = run.output
    print(f"node 2 killed: the job exited {code} after {took:.1f} s\n{output[-3000:]}")
    assert code != 0 and took < NODE_LOSS_LIMIT_S, output[-4000:]
    assert f"node rank 1 ({cluster.address(2)}) exited with code" in output, output[-4000:]
    # node 1's rank names who went away ("Connection closed by peer [A]:port" or "Read error [A]:port: ...reset")
    assert re.search(rf"\[{re.escape(cluster.address(2))}\]:\d+", output), output[-4000:]
    assert not run.leftovers()
    losses, expected_losses = scalars(run_dir, "train/loss"), scalars(reference, "train/loss")
    assert LOSS_STEPS in losses, losses
    print("2 x 2 vs 1 x 2 loss, relative:", {s: abs(v / expected_losses[s] - 1) for s, v in losses.items()})
    for step, loss in losses.items():
        assert loss == pytest.approx(expected_losses[step], rel=1e-3), (step, losses, expected_losses)


SAVE_CUT = 8  # the partitioned run's save that never completes; the one of step 4 must be resumed


@pytest.mark.slow
def test_a_partition_during_a_save_ends_the_job_on_both_sides_and_torchrun_resumes_the_last_complete_checkpoint(
    reference, two_node_run, cluster, tmp_path
):
    """Node 2's link goes down while the step-8 checkpoint is being saved (its rank stalls after writing its shards,
    injected, and the link is cut then): the runner's ssh to node 2 gives up (keep-alive 3 x 2 s, set through
    PDSH_SSH_ARGS_APPEND, which wins over the default 3 x 10 s), node 1's ranks are killed 10 s later and the job
    exits naming node 2; node 2's launcher, hearing no heartbeat for 30 s, kills its ranks. Nothing of the run is
    left on either side, and step 8 has no mimscale.json (incomplete).

    Relaunched by torchrun's multi-node rendezvous (`--nnodes 2 --rdzv-backend c10d`, one torchrun per node: node 1
    hosts the store, `is_host`, since the nodes' hostnames do not resolve; each names its own address with
    `--local-addr`), the run names step 8 as incomplete, skips it, resumes step 4 (written by ranks of both nodes)
    and trains steps 5-8 exactly as the one-node reference."""
    run_dir = tmp_path / "partition"
    keepalive = "-o ServerAliveInterval=2 -o ServerAliveCountMax=3"
    stall = f"MIMSCALE_INJECT_FAULT=stall_in_save:rank=1:step={SAVE_CUT}"  # rank 1 runs on node 2
    run = two_node_run(run_dir, ssh_args=keepalive, node_env=(stall,))
    run.wait_for(rf"rank 1 stalls in save at step {SAVE_CUT}\b")
    link = ["ip", "-n", cluster.netns(2), "link", "set", "eth0"]
    subprocess.run([*link, "down"], check=True)
    try:
        code, took = run.finish(PARTITION_LIMIT_S)
        deadline = time.monotonic() + PARTITION_LIMIT_S
        while run.leftovers().get(2) and time.monotonic() < deadline:
            time.sleep(1)
        left = run.leftovers()
    finally:
        subprocess.run([*link, "up"], check=True)
    output = run.output
    print(f"node 2 cut off during a save: the job exited {code} after {took:.1f} s")
    assert code != 0 and f"node rank 1 ({cluster.address(2)}) exited with code 255" in output, output[-4000:]
    assert took < 6 + FAIL_GRACE_S + 20  # the keep-alive given, not the default 30 s (20 s: margin for load)
    assert not left
    cut = run_dir / "checkpoints" / f"step_{SAVE_CUT:08d}"
    assert cut.is_dir() and not (cut / "mimscale.json").exists() and _stopped_step(run_dir) == 4

    outputs = _torchrun_on_two_nodes(cluster, run_dir, "train.stop_at_step=8")
    assert f"checkpoint {cut} is incomplete" in outputs[0] and "skipping it" in outputs[0], outputs[0][-3000:]
    assert "at step 4" in outputs[0] and "network: GLOO_SOCKET_IFNAME=eth0" in outputs[0]
    expected = scalars(reference, "train/loss")
    assert scalars(run_dir, "train/loss") == {s: v for s, v in expected.items() if s <= 8}


def _torchrun_on_two_nodes(cluster, run_dir: Path, *extra: str) -> list[str]:
    """One torchrun per node, c10d rendezvous hosted on node 1; both must exit 0. Their outputs."""
    port, runs = next(_ports), []
    try:
        for node in (1, 2):
            command = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                       "--rdzv-endpoint", f"{cluster.address(1)}:{port}", "--rdzv-id", "multinode-test",
                       "--rdzv-conf", f"is_host={int(node == 1)}", "--local-addr", cluster.address(node),
                       "-m", "mimscale.train", "--config", str(DEMO), *overrides(run_dir, *SETTINGS, *extra)]  # fmt: skip
            runs.append(cluster.popen(node, command, cwd=REPO, env=env_with(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))  # fmt: skip
        outputs = [run.communicate(timeout=LAUNCH_LIMIT_S)[0] for run in runs]
    finally:
        for run in runs:
            run.kill()
        cluster.kill_mentioning(str(run_dir))
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


@pytest.mark.slow
def test_a_node_that_cannot_start_ends_the_job_at_once_naming_it(two_node_run, cluster, tmp_path):
    """The master port is taken on node 1: its rank fails to open the store, and node 2's rank, waiting in the
    rendezvous, is stopped within seconds instead of after run.startup_timeout_s."""
    run_dir = tmp_path / "no-start"
    port = next(_ports)
    blocker = cluster.popen(1, [sys.executable, "-c", f"import socket,time; s=socket.socket(); "
                            f"s.bind(('0.0.0.0', {port})); s.listen(); time.sleep(600)"])  # fmt: skip
    try:
        run = two_node_run(run_dir, "run.startup_timeout_s=900", port=port)
        code, took = run.finish(LAUNCH_LIMIT_S)
    finally:
        blocker.kill()
    output = run.output
    print(f"node 1 could not start: the job exited {code} {took:.1f} s after the launch")
    assert code != 0 and took < NODE_START_LIMIT_S, output[-4000:]
    assert "EADDRINUSE" in output and f"node rank 0 ({cluster.address(1)}) exited with code 1" in output
    assert not run.leftovers()


CHOOSE = """
import json, os, sys
from mimscale.engine.distributed import choose_socket_interface
for device, variables in json.loads(sys.argv[1]):
    environ = dict(os.environ, **variables)
    try:
        print(choose_socket_interface(device, environ), environ.get("NCCL_SOCKET_IFNAME"))
    except RuntimeError as err:
        print("error:", err)
"""


def test_ranks_take_the_interface_that_routes_to_the_master_and_refuse_loopback_routes(tmp_path):
    """In a namespace with a cluster interface (data0, 10.213.10.1/24) and an address on lo: the route to a master
    on the cluster subnet names data0 (NCCL gets '=data0'); a master whose route is the loopback interface, or a
    loopback master for a job spanning nodes, fails at once naming the variable to set; a set variable is kept."""
    from cluster import unavailable_reason

    if unavailable_reason():
        pytest.skip(unavailable_reason())
    netns = f"mtif{os.getpid()}"
    setup = [["netns", "add", netns], ["-n", netns, "link", "add", "data0", "type", "veth", "peer", "name", "data1"],
             ["-n", netns, "addr", "add", "10.213.10.1/24", "dev", "data0"], ["-n", netns, "link", "set", "data0", "up"],
             ["-n", netns, "link", "set", "data1", "up"], ["-n", netns, "link", "set", "lo", "up"],
             ["-n", netns, "addr", "add", "10.213.9.1/32", "dev", "lo"]]  # fmt: skip
    cases = [
        ("cpu", {"MASTER_ADDR": "10.213.10.7"}),
        ("cuda", {"MASTER_ADDR": "10.213.10.7"}),
        ("cpu", {"MASTER_ADDR": "10.213.9.1"}),
        ("cpu", {"MASTER_ADDR": "127.0.0.1"}),
        ("cpu", {"MASTER_ADDR": "127.0.0.1", "LOCAL_SIZE": "2"}),
        ("cpu", {"MASTER_ADDR": "10.213.9.1", "GLOO_SOCKET_IFNAME": "data1"}),
    ]
    env = env_with(WORLD_SIZE="2", LOCAL_SIZE="1", MASTER_PORT="29500")
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        env.pop(name, None)
    try:
        for step in setup:
            subprocess.run(["ip", *step], check=True, capture_output=True)
        command = ["ip", "netns", "exec", netns, sys.executable, "-c", CHOOSE, json.dumps(cases)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        chosen, nccl, through_lo, loopback, one_node, kept = result.stdout.splitlines()[-len(cases) :]
        assert "network: GLOO_SOCKET_IFNAME=data0 (10.213.10.1, the route to MASTER_ADDR=10.213.10.7)" in chosen
        assert "NCCL_SOCKET_IFNAME==data0 " in nccl
        assert through_lo.startswith("error:") and "leaves through lo" in through_lo
        assert "set GLOO_SOCKET_IFNAME to the interface of the cluster network" in through_lo
        assert "loopback address" in loopback and "--master_addr" in loopback and "WORLD_SIZE=2" in loopback
        assert one_node.startswith("None")  # one node on loopback: nothing to choose
        assert "GLOO_SOCKET_IFNAME=data1 (set by the job)" in kept
    finally:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)


def test_the_node_cache_counts_the_ranks_of_its_node_under_deepspeed_and_torchrun(server, tmp_path, monkeypatch):
    """DeepSpeed's launcher (and `mimscale launch`) tells a rank how many share its node in LOCAL_SIZE, torchrun in
    LOCAL_WORLD_SIZE: the cache room check and the interface choice read both through one helper. A cache limit
    that holds 2 windows for one rank is refused, named, when DeepSpeed starts 2 ranks on the node."""
    from mimscale.config import load_config
    from mimscale.pipeline.masking import build_mask_generator
    from mimscale.pipeline.stream import build_train_loader
    from mimscale.storage.remote import RemoteError
    from mimscale.storage.shard_cache import ranks_on_this_node

    assert ranks_on_this_node({"LOCAL_SIZE": "2"}) == 2 and ranks_on_this_node({"LOCAL_WORLD_SIZE": "3"}) == 3
    assert ranks_on_this_node({}) == 1 and ranks_on_this_node({"LOCAL_WORLD_SIZE": ""}, default=4) == 4
    with pytest.raises(ValueError, match="LOCAL_SIZE='two' is not a number of ranks"):
        ranks_on_this_node({"LOCAL_SIZE": "two"})
    mask = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)
    settings = [f"data.shards={server.url('sample-{000..003}.tar')}", "data.image_size=32", "data.shuffle_window=2",
                f"data.cache_dir={tmp_path / 'cache'}", "data.cache_limit_gb=0.004"]  # fmt: skip
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    build_train_loader(load_config(None, settings), rank=0, world_size=1, mask_generator=mask)  # 2.8 MB: fits
    for name in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(name, "2")
        with pytest.raises(RemoteError, match=r"smaller than 2 windows .* x 2 rank\(s\) on this node"):
            build_train_loader(load_config(None, settings), rank=0, world_size=1, mask_generator=mask)
        monkeypatch.delenv(name)


def test_the_fan_out_reads_deepspeeds_pdsh_command_and_combines_node_exit_codes():
    from mimscale.engine.fanout import combine_exit_codes, split_pdsh_command

    hosts, parts = split_pdsh_command(["pdsh", "-S", "-f", "1024", "-w", "a,b", "export X=1; ", "cd /r;", "python",
                                       "-u", "-m", "mimscale.engine.node_launcher", "--node_rank=%n", "train.py"])  # fmt: skip
    assert hosts == ["a", "b"] and parts[0] == "export X=1; " and parts[-2:] == ["--node_rank=%n", "train.py"]
    with pytest.raises(ValueError, match="--launcher_args"):
        split_pdsh_command(
            ["pdsh", "-S", "-f", "1", "-w", "a", "-R", "rsh", "cd /r;", "python", "-m", "mimscale.engine.node_launcher"]
        )
    assert combine_exit_codes([0, 0]) == 0
    assert combine_exit_codes([75, 75]) == 75 and combine_exit_codes([0, 75]) == 75  # one node had finished
    assert combine_exit_codes([255, 1]) == 255 and combine_exit_codes([75, 1]) == 1  # the first failure wins
