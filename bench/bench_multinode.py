"""Bytes each rank sends per step, and the step time, for ZeRO-1/2/3: 1 node x 2 ranks vs 2 nodes x 1 rank,
measured on the namespace cluster of tests/cluster.py (root only) and compared with the traffic the ZeRO papers
predict for the model's parameter count.

    OMP_NUM_THREADS=1 nice -n 10 python bench/bench_multinode.py [--stages 1 2 3] [--precisions bf16 fp32]
                                                                  [--warm 10 --window 20]

Every run trains configs/demo_cpu.yaml (ViT-Tiny, 8-px patches, 64 px) for warm + window steps, logging every
``--log-every`` steps, with checkpoints and in-run evaluation off. The network counters (the kernel's per-interface
``tx_bytes``, the figure ``/sys/class/net/<if>/statistics/tx_bytes`` and ``ip -n NETNS -s link`` show inside each
namespace, read here from ``/proc/<pid of a process in that namespace>/net/dev``) are read when rank 0's step line
for step ``warm`` appears and again at step ``warm + window``: the difference holds only those ``window`` steps,
so start-up traffic (rendezvous, the initial parameter broadcast, the data-order plan) cancels, as it would between
a run of N and one of 2N steps. The counters are also read before the launch and after its exit, which gives the
fixed per-run traffic (total minus steps x per-step bytes).

- 1 node x 2 ranks: ``mimscale launch --num_gpus 2`` inside node 1; both ranks talk over that node's loopback,
  whose counter holds the bytes of both ranks (every byte is counted once, as sent), so per rank = lo / 2.
- 2 nodes x 1 rank: ``launch/multi_node.sh`` on node 1 with a 2-host hostfile; each node's eth0 (its veth into the
  bridge) carries only its own rank's traffic (plus the ssh session that carries node 2's output, and TCP ACKs).

Prediction (ring collectives, N ranks, P trainable parameters, b bytes per element in the precision used; a ring
reduce-scatter or all-gather of P elements sends (N-1)/N x P x b per rank, an all-reduce twice that):
ZeRO-1/2: reduce-scatter of the gradients + all-gather of the updated parameters = 2 (N-1)/N P b per rank per step;
ZeRO-3: all-gather in forward + all-gather in backward + reduce-scatter of gradients = 3 (N-1)/N P b.
With N = 2: P b (ZeRO-1/2) and 1.5 P b (ZeRO-3). P comes from ``mimscale plan`` (student + head parameters).

``--variants`` adds 2-node runs with DeepSpeed keys changed and ``--collectives`` measures what gloo sends per call of
each collective on its own (bench/gloo_wire.py); bench/count_collectives.py lists the collectives DeepSpeed issues in
one step. Together they take a gap to the prediction apart (bench/RESULTS.md, "Network bytes per step").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from cluster import Cluster, unavailable_reason  # noqa: E402

DEMO = REPO / "configs" / "demo_cpu.yaml"
BYTES_PER_ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
LAUNCH_LIMIT_S = 600
STEP_LINE = re.compile(r"\bstep +(\d+)/")
# Runs that take the prediction apart (2 nodes x 1 rank; `--variants`): ZeRO stage and DeepSpeed keys changed.
VARIANTS = {
    # DeepSpeed 0.19 reduces ZeRO-1/2 gradient buckets with an all-reduce by default; this makes it reduce each
    # rank's slice to its owner instead (the papers' reduce-scatter, done as one reduce per owner).
    "zero2-reduce": (2, ["deepspeed.extra.zero_optimization.use_multi_rank_bucket_allreduce=false"]),
    # ZeRO-3 keeps parameters under 1e5 elements gathered for good ("persistent"); 0 gathers every one each step.
    "zero3-no-persist": (3, ["deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"]),
    # DeepSpeed documents stage3_max_reuse_distance (1e9 elements) as how far ahead a released parameter's reuse may
    # be for it to stay gathered; 0 should release each after use, so backward gathers again (the papers' count).
    # Measured on this model: it changes nothing, DeepSpeed still gathers once per step (bench/RESULTS.md).
    "zero3-regather": (3, ["deepspeed.extra.zero_optimization.stage3_max_reuse_distance=0"]),
}


def bench_settings(stage: int, precision: str, steps: int, log_every: int, batch: int) -> list[str]:
    return [
        f"deepspeed.zero_stage={stage}",
        f"deepspeed.precision={precision}",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        "train.progress_bar=false",
        f"data.batch_size={batch}",
        "data.num_workers=1",
        "eval.knn_every=0",
        f"checkpoint.every_steps={100 * steps}",
    ]


def trainable_params(settings: list[str]) -> int:
    """Student + head parameters of the run's model, from `mimscale plan` (what DeepSpeed partitions)."""
    command = [sys.executable, "-m", "mimscale.cli", "plan", str(DEMO), "--gpus", "2", "--json"]
    for item in settings:
        command += ["--set", item]
    result = subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300, check=True)
    plan = json.loads(result.stdout[result.stdout.index("{") :])
    return int(plan["student_params"] + plan["head_params"])


def _env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def tx_bytes(cluster: Cluster, node: int, interface: str) -> int:
    """The kernel's transmit-byte counter of ``interface`` in ``node``'s network namespace."""
    for line in Path(f"/proc/{cluster.init_pids[node - 1]}/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() == interface:
            return int(counters.split()[8])  # receive: 8 fields, then transmit bytes
    raise RuntimeError(f"no interface {interface} on node {node}")


@dataclass
class Measurement:
    layout: str
    stage: int
    precision: str
    ranks: int
    variant: str = ""
    per_step_bytes: list[float] = field(default_factory=list)  # per rank, over the window
    step_s: float = 0.0
    total_bytes: list[int] = field(default_factory=list)  # per rank, whole run
    steps: int = 0


def run_and_count(cluster: Cluster, layout: str, command: list[str], env: dict, counters: list[tuple[int, str]],
                  warm: int, window: int) -> tuple[list[int], list[int], list[int], list[int], float]:  # fmt: skip
    """Launch on node 1; counter readings before, at step ``warm``, at ``warm + window`` and after; window seconds."""
    read = lambda: [tx_bytes(cluster, node, interface) for node, interface in counters]  # noqa: E731
    before = read()
    process = cluster.popen(1, command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    at_warm = at_end = None
    t_warm = t_end = 0.0
    lines = []
    deadline = time.monotonic() + LAUNCH_LIMIT_S
    for line in iter(process.stdout.readline, ""):
        lines.append(line)
        found = STEP_LINE.search(line)
        if found and int(found.group(1)) == warm:
            at_warm, t_warm = read(), time.monotonic()
        elif found and int(found.group(1)) == warm + window:
            at_end, t_end = read(), time.monotonic()
        if time.monotonic() > deadline:
            process.kill()
            break
    code = process.wait()
    after = read()
    if code != 0 or at_warm is None or at_end is None:
        raise RuntimeError(f"{layout} run failed (exit {code}):\n{''.join(lines)[-4000:]}")
    return before, at_warm, at_end, after, t_end - t_warm


def measure(
    cluster: Cluster, layout: str, stage: int, precision: str, args, port: int, variant: str = ""
) -> Measurement:
    steps = args.warm + args.window
    run_dir = Path(args.runs) / f"{layout}-zero{stage}-{precision}{variant and '-' + variant}"
    settings = [*bench_settings(stage, precision, steps, args.log_every, args.batch), f"run.output_dir={run_dir}"]
    settings += VARIANTS[variant][1] if variant else []
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time: an old run folder would be resumed
    overrides = [part for item in settings for part in ("--set", item)]
    if layout == "1x2":  # one node, two ranks: both on node 1's loopback
        command = [sys.executable, "-m", "mimscale.cli", "launch", "--num_gpus", "2", "--master_port", str(port),
                   "--module", "mimscale.train", "--config", str(DEMO), *overrides]  # fmt: skip
        env, counters, ranks_per_counter = _env(), [(1, "lo")], 2
    else:  # two nodes, one rank each: each node's eth0
        env_file = Path(args.runs) / "deepspeed_env"
        env_file.write_text("HF_HUB_OFFLINE=1\nOMP_NUM_THREADS=1\n")
        env = _env(DS_ENV_FILE=str(env_file), HOSTFILE=str(cluster.hostfile(1)), CONFIG=str(DEMO),
                   MASTER_PORT=str(port))  # fmt: skip
        command, counters, ranks_per_counter = ["launch/multi_node.sh", *overrides], [(1, "eth0"), (2, "eth0")], 1
    before, at_warm, at_end, after, seconds = run_and_count(cluster, layout, command, env, counters, args.warm,
                                                            args.window)  # fmt: skip
    result = Measurement(layout, stage, precision, 2, variant, step_s=seconds / args.window, steps=steps)
    for index in range(len(counters)):
        for _ in range(ranks_per_counter):
            result.per_step_bytes.append((at_end[index] - at_warm[index]) / args.window / ranks_per_counter)
            result.total_bytes.append((after[index] - before[index]) // ranks_per_counter)
    return result


def predicted_bytes(stage: int, params: int, precision: str, ranks: int = 2) -> float:
    collectives = 3 if stage == 3 else 2
    return collectives * (ranks - 1) / ranks * params * BYTES_PER_ELEMENT[precision]


def _per_rank(values: list[float]) -> str:
    return " / ".join(f"{value / 1e6:.2f}" for value in values)


def table(results: list[Measurement], params: dict[str, int]) -> str:
    rows = [
        "| ZeRO | precision | layout (variant) | s/step | MB sent/rank/step | predicted MB | measured/predicted "
        "| fixed MB/rank/run | 2x1/1x2 step time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_key = {(r.layout, r.stage, r.precision, r.variant): r for r in results}
    for r in results:
        sent = sum(r.per_step_bytes) / len(r.per_step_bytes)
        predicted = predicted_bytes(r.stage, params[r.precision], r.precision)
        fixed = [
            total - r.steps * sent_by_rank for total, sent_by_rank in zip(r.total_bytes, r.per_step_bytes, strict=True)
        ]
        other = by_key.get(("1x2", r.stage, r.precision, ""))
        ratio = f"{r.step_s / other.step_s:.2f}" if r.layout == "2x1" and other and not r.variant else ""
        layout = {"1x2": "1 node x 2 ranks", "2x1": "2 nodes x 1 rank"}[r.layout] + (
            f" ({r.variant})" if r.variant else ""
        )
        per_rank = _per_rank(r.per_step_bytes) if r.layout == "2x1" else f"{sent / 1e6:.2f}"
        fixed_text = _per_rank(fixed) if r.layout == "2x1" else f"{fixed[0] / 1e6:.2f}"
        rows.append(
            f"| {r.stage} | {r.precision} | {layout} | {r.step_s:.3f} "
            f"| {per_rank} | {predicted / 1e6:.2f} | {sent / predicted:.2f} | {fixed_text} | {ratio} |"
        )
    return "\n".join(rows)


def gloo_wire_bytes(cluster: Cluster, elements: int, precision: str, port: int) -> list[dict]:
    """bench/gloo_wire.py on both nodes: bytes each rank sends per call of each gloo collective of ``elements``."""
    master = f"{cluster.address(1)}:{port}"
    processes = [
        cluster.popen(
            node,
            [
                sys.executable,
                "bench/gloo_wire.py",
                "--rank",
                str(node - 1),
                "--master",
                master,
                "--elements",
                str(elements),
                "--dtype",
                precision,
            ],
            cwd=REPO,
            env=_env(GLOO_SOCKET_IFNAME="eth0"),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in (1, 2)
    ]
    return [
        json.loads(process.communicate(timeout=LAUNCH_LIMIT_S)[0].strip().splitlines()[-1]) for process in processes
    ]


def wire_table(wire: list[dict], precision: str) -> str:
    """Bytes sent per rank per call, against the ring's (N-1)/N of the tensor (twice that for an all-reduce)."""
    elements, size = wire[0]["elements"], wire[0]["elements"] * BYTES_PER_ELEMENT[precision]
    ring = {"all_reduce": size, "reduce_scatter_tensor": size / 2, "all_gather_into_tensor": size / 2,
            "reduce": size / 2, "broadcast": size / 2}  # fmt: skip  # 2 ranks; broadcast: the source's size, averaged
    rows = [f"gloo, 2 nodes x 1 rank, {elements:,} {precision} elements per collective (rank 0 / rank 1 MB per call):",
            "| op | MB sent rank 0 / rank 1 | ring MB per rank | measured mean / ring |", "|---|---|---|---|"]  # fmt: skip
    for op in wire[0]["sent"]:
        sent = [w["sent"][op] for w in wire]
        rows.append(f"| {op} | {_per_rank(sent)} | {ring[op] / 1e6:.2f} | {sum(sent) / 2 / ring[op]:.2f} |")
    return "\n".join(rows)


def _report(r: Measurement) -> None:
    print(f"{r.layout} ZeRO-{r.stage} {r.precision} {r.variant}: {r.step_s:.3f} s/step, per rank per step "
          f"{[round(b) for b in r.per_step_bytes]} B, whole run {r.total_bytes} B", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=sorted(BYTES_PER_ELEMENT))
    parser.add_argument("--layouts", nargs="*", default=["1x2", "2x1"], choices=["1x2", "2x1"])
    parser.add_argument("--variants", nargs="*", default=[], choices=sorted(VARIANTS), help="extra 2x1 runs")
    parser.add_argument("--collectives", action="store_true", help="also the gloo collectives on their own")
    parser.add_argument("--warm", type=int, default=10, help="steps before the counted window")
    parser.add_argument("--window", type=int, default=20, help="steps counted")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="images per rank per step")
    parser.add_argument("--runs", default="/tmp/mimscale-bench-multinode")
    parser.add_argument("--subnet", default="10.213.9")
    args = parser.parse_args(argv)
    if args.warm % args.log_every or args.window % args.log_every:
        parser.error("--warm and --window must be multiples of --log-every (the counters are read at step lines)")
    reason = unavailable_reason()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    params = {p: trainable_params(bench_settings(1, p, 1, 1, args.batch)) for p in args.precisions}
    print(f"trainable parameters (mimscale plan): {params}", flush=True)
    start = time.monotonic()
    print(f"load average at start {os.getloadavg()}", flush=True)
    results = []
    cluster = Cluster(nodes=2, name="bmn", subnet=args.subnet).up()
    try:
        port = 29650
        if args.collectives:
            wire = gloo_wire_bytes(cluster, params[args.precisions[0]], args.precisions[0], port - 1)
        for precision in args.precisions:
            for stage in args.stages:
                for layout in args.layouts:
                    port += 1
                    results.append(measure(cluster, layout, stage, precision, args, port))
                    _report(results[-1])
        for variant in args.variants:
            port += 1
            results.append(measure(cluster, "2x1", VARIANTS[variant][0], args.precisions[0], args, port, variant))
            _report(results[-1])
    finally:
        cluster.down()
    print(f"\n{len(results)} runs in {time.monotonic() - start:.0f} s; load average {os.getloadavg()}\n")
    print(table(results, params))
    if args.collectives:
        print("\n" + wire_table(wire, args.precisions[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
