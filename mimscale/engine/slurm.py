"""SLURM without a wrapper: rendezvous from srun's environment, and the requeue marker the job script checks.

``srun python -m mimscale.train ...`` starts one task per GPU with SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS
and the allocation's node list. Rank 0 (task 0) runs on the first node of the step, so that node hosts the
process group (MASTER_ADDR, as ``scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1`` gives it) on a port
derived from the job id (MASTER_PORT = 20000 + SLURM_JOB_ID % 20000), the same on every task with no messages
exchanged. Neither mpi4py nor scontrol is needed.

Requeue: when a stop signal made every rank checkpoint, rank 0 writes ``$MIMSCALE_REQUEUE_MARKER`` after the
checkpoint is complete and before any rank exits. The job script requeues when the marker exists, whatever srun
returned: with ``--kill-on-bad-exit`` the first rank to exit 75 makes srun kill the others, and srun then reports
137 (128 + SIGKILL), not 75.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
from pathlib import Path

from mimscale.storage.atomic import atomic_write

REQUEUE_MARKER_ENV = "MIMSCALE_REQUEUE_MARKER"
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: 'a[1-2],b' -> ['a[1-2]', 'b']."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM host list {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth:
        raise ValueError(f"unbalanced '[' in SLURM host list {text!r}")
    parts.append("".join(current))
    return [part for part in parts if part]


def _expand_ranges(body: str, hostlist: str) -> list[str]:
    """'001-003,7' -> ['001', '002', '003', '7'] (zero padding kept, as scontrol keeps it)."""
    values = []
    for item in body.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"cannot read range {item!r} in SLURM host list {hostlist!r}")
        low, high = match.group(1), match.group(2) or match.group(1)
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in SLURM host list {hostlist!r}")
        width = len(low) if low.startswith("0") else 1
        values += [str(number).zfill(width) for number in range(int(low), int(high) + 1)]
    return values


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list -> host names, in order, like ``scontrol show hostnames``.

    'gpu[01-03,07],login1' -> gpu01 gpu02 gpu03 gpu07 login1; several bracket groups multiply
    ('rack[1-2]-n[1-2]' -> rack1-n1 rack1-n2 rack2-n1 rack2-n2).
    """
    hosts = []
    for pattern in _split_top_level(hostlist.strip()):
        pieces = re.split(r"(\[[^\]]*\])", pattern)
        choices = [_expand_ranges(p[1:-1], hostlist) if p.startswith("[") else [p] for p in pieces if p]
        hosts += ["".join(combo) for combo in itertools.product(*choices)]
    if not hosts:
        raise ValueError(f"empty SLURM host list {hostlist!r}")
    return hosts


def started_by_srun(environ=os.environ) -> bool:
    """True in a task that ``srun`` started. A job script itself (the batch step) also has SLURM_PROCID=0 and the
    job's SLURM_NTASKS, but no SLURM_STEP_ID: a plain ``mimscale train`` there is one process, and says so when
    the job asked for more tasks (taking SLURM_NTASKS as the world size would wait for ranks nobody starts)."""
    if "SLURM_PROCID" not in environ or "SLURM_NTASKS" not in environ:
        return False
    if "SLURM_STEP_ID" in environ:
        return True
    if environ["SLURM_NTASKS"] != "1":
        print(
            f"mimscale: this is a SLURM job script (SLURM_NTASKS={environ['SLURM_NTASKS']}, no srun step), so "
            "training runs as one process; start it with `srun` (see launch/slurm.sbatch) or `mimscale launch` "
            "to use the job's tasks",
            file=sys.stderr,
        )
    return False


def tasks_on_this_node(environ=os.environ) -> str | None:
    """The step's task count on this task's node: SLURM_STEP_TASKS_PER_NODE ('2(x3),1': 2 on each of the first 3
    nodes, then 1) at SLURM_NODEID; None when srun did not say."""
    counts = []
    for item in environ.get("SLURM_STEP_TASKS_PER_NODE", "").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            return None
        counts += [match.group(1)] * int(match.group(2) or 1)
    node = environ.get("SLURM_NODEID", "")
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None


def fill_rendezvous_env(environ=os.environ) -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT from srun's variables; values already
    set are kept. LOCAL_WORLD_SIZE (torchrun's name: ranks on this node) tells the interface check that the job
    spans nodes, so a first node whose name resolves to a loopback address there fails at once, naming what to set,
    instead of gloo advertising 127.0.1.1 to the other nodes."""
    environ.setdefault("RANK", environ["SLURM_PROCID"])
    environ.setdefault("WORLD_SIZE", environ.get("SLURM_STEP_NUM_TASKS") or environ["SLURM_NTASKS"])
    environ.setdefault("LOCAL_RANK", environ.get("SLURM_LOCALID", "0"))
    local_tasks = tasks_on_this_node(environ)
    if local_tasks:
        environ.setdefault("LOCAL_WORLD_SIZE", local_tasks)
    if "MASTER_ADDR" not in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError(
                "srun started this task but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST is set, so the "
                "rendezvous host is unknown: export MASTER_ADDR (the first node's address) before srun"
            )
        environ["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" not in environ:
        job_id = environ.get("SLURM_JOB_ID", "")
        if not job_id.isdigit():
            raise ValueError(f"SLURM_JOB_ID={job_id!r} is not a number: export MASTER_PORT before srun")
        environ["MASTER_PORT"] = str(20000 + int(job_id) % 20000)


def write_requeue_marker(tag_dir: Path | str) -> Path | None:
    """Rank 0, after a complete checkpoint on a stop signal: tell the job script to requeue (None if not asked).
    Written atomically without following a link planted at the marker's name."""
    marker = os.environ.get(REQUEUE_MARKER_ENV)
    if not marker:
        return None
    path = Path(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"{tag_dir}\n")
    return path


def requeue_stopped_startup(output_dir: str | Path | None, exit_code: int, requeue_code: int = 75) -> None:
    """A stop signal during start-up (nothing to save): rank 0 still asks the job script to requeue. The marker
    names the run's checkpoints folder (no new checkpoint), or says start-up when the config was not read yet."""
    if exit_code == requeue_code and os.environ.get("RANK", "0") == "0":
        where = Path(output_dir) / "checkpoints" if output_dir else "nothing new (stopped during start-up)"
        write_requeue_marker(where)
