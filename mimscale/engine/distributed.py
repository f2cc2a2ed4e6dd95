"""Rank helpers. The only place besides engine/deepspeed.py that touches torch.distributed.

One code path for every launch: under `deepspeed`/`torchrun`/SLURM the environment carries RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a plain `mimscale train` fills them in for a single process.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import ipaddress
import os
import socket
from dataclasses import dataclass

import torch

from mimscale.storage.shard_cache import ranks_on_this_node


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill_single_process_env() -> None:
    """Make a launcher-less run look like rank 0 of a world of 1 (or a task of ``srun``'s step)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return
    from mimscale.engine.slurm import fill_rendezvous_env, started_by_srun

    if started_by_srun():  # srun without a wrapper script
        fill_rendezvous_env()  # MASTER_ADDR/PORT from the node list and job id: no mpi4py discovery
        return
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def resolve_device_kind(requested: str) -> str:
    """'cuda' or 'cpu' for run.device (auto picks CUDA when a GPU is visible)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device=cuda but no CUDA device is visible; set run.device=cpu or auto")
    return requested


IFNAME_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


def _interface_with_address(address: str) -> str | None:
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(entry.address.split("%")[0] == address for entry in addresses):
            return name
    return None


def choose_socket_interface(device_kind: str, environ=os.environ) -> str | None:
    """Set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface this node reaches MASTER_ADDR through.

    Left alone, gloo binds to whatever this machine's hostname resolves to, often 127.0.1.1 (Debian's /etc/hosts),
    and advertises it to ranks on other nodes, which then cannot connect ("connectFullMesh failed ...
    remote=[127.0.0.1]"). The route the kernel would take to the master is the one the cluster network uses, so
    its local address names the interface. A variable the user set is kept. A job that spans nodes (WORLD_SIZE
    above the local rank count) with a loopback master, or whose route leaves through a loopback interface, fails
    here, naming the variable to set. Returns a line for rank 0's log, or None when nothing was chosen.
    """
    master = environ.get("MASTER_ADDR", "")
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    local = ranks_on_this_node(environ, default=world)
    variable = IFNAME_VARIABLES[1] if device_kind == "cuda" else IFNAME_VARIABLES[0]
    if not master or environ.get(variable):
        return f"network: {variable}={environ[variable]} (set by the job)" if environ.get(variable) else None
    how = f"set {variable} to the interface of the cluster network on every node (e.g. in .deepspeed_env)"
    try:
        address = socket.getaddrinfo(master, None, proto=socket.IPPROTO_UDP)[0][4][0]
    except OSError as err:
        raise RuntimeError(f"MASTER_ADDR={master} does not resolve on {socket.gethostname()}: {err}") from err
    if ipaddress.ip_address(address).is_loopback:
        if world > local:
            raise RuntimeError(
                f"MASTER_ADDR={master} is a loopback address ({address}) but the job spans nodes (WORLD_SIZE={world}, "
                f"{local} ranks here): give the launcher the master node's address on the cluster network "
                f"(--master_addr), or {how}"
            )
        return None
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:  # connect() on UDP only looks the route up
        probe.connect((address, int(environ.get("MASTER_PORT", "29500") or 29500)))
        local_address = probe.getsockname()[0]
    interface = _interface_with_address(local_address)
    if interface is None or ipaddress.ip_address(local_address).is_loopback or interface.startswith("lo"):
        raise RuntimeError(
            f"the route from {socket.gethostname()} to MASTER_ADDR={master} leaves through {interface or '?'} "
            f"({local_address}), a loopback interface that ranks on other nodes cannot reach: {how}"
        )
    environ[variable] = interface if device_kind != "cuda" else f"={interface}"  # NCCL: '=' means this exact name
    if device_kind == "cuda":
        environ.setdefault(IFNAME_VARIABLES[0], interface)
    return f"network: {variable}={environ[variable]} ({local_address}, the route to MASTER_ADDR={master})"


def init_distributed(device_kind: str, timeout_s: float = 900.0) -> DistInfo:
    """Initialise the process group (NCCL on GPU, gloo on CPU) through DeepSpeed, which also reads MPI/SLURM envs.

    ``timeout_s`` bounds joining the rendezvous (a rank connecting to the store before rank 0 has opened it, as
    happens on a loaded node) and every collective until ``set_collective_timeout`` narrows it once training runs.
    """
    if device_kind == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # must be set before deepspeed is imported
    fill_single_process_env()
    chosen = choose_socket_interface(device_kind)
    if chosen and os.environ.get("RANK", "0") == "0":
        print(chosen, flush=True)
    import deepspeed

    deepspeed.init_distributed(
        dist_backend="nccl" if device_kind == "cuda" else "gloo",
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    import torch.distributed as dist

    if device_kind == "cpu":
        dist.barrier()  # every rank has mapped every peer's shared-memory buffer
        _unlink_shm_allreduce_buffer(dist.get_rank())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def set_collective_timeout(timeout_s: float) -> None:
    """From now on a collective waiting longer than ``timeout_s`` fails (start-up ran under the rendezvous timeout)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # dist.set_timeout is public only in recent torch; older ones (2.11 on the lent GPU machine) have the
        # private c10d function it wraps
        set_timeout = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
        set_timeout(datetime.timedelta(seconds=timeout_s))


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove this rank's /dev/shm file of DeepSpeed's CPU all-reduce once all ranks have mapped it.

    DeepSpeed never deletes these 66 MB files (one per rank per master port); on a machine that runs many jobs
    they fill /dev/shm until the OOM killer ends a run. The mappings stay valid after the unlink, and a run
    killed later leaks nothing.
    """
    port = os.environ.get("MASTER_PORT", "*")
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_max(*values: float) -> list[float]:
    """Element-wise max of host floats over all ranks, in one collective (to agree on 'stop now', 'bad step')."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    backend = dist.get_backend()
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor.tolist()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def broadcast_object(value):
    """Rank 0's ``value`` on every rank (a picklable host object; our own values only, never file contents)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def all_reduce_mean(values: dict[str, float]) -> dict[str, float]:
    """Average host floats over ranks in one collective (log steps only: the step line shows global means)."""
    import torch.distributed as dist

    if not values or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    backend = dist.get_backend()
    names = sorted(values)
    tensor = torch.tensor([values[name] for name in names], dtype=torch.float64)
    tensor = tensor.to("cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {name: float(total) / dist.get_world_size() for name, total in zip(names, tensor.tolist(), strict=True)}


def all_reduce_sum(value: float) -> float:
    """Sum of a host float over ranks (float64: exact for integers below 2**53)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item())


PROGRESS_KEY = "mimscale/progress/{rank}"


def report_progress(rank: int, step: int, micro: int) -> None:
    """Record in the rendezvous store how far this rank got, so a timeout can name the rank that stalled."""
    try:
        from torch.distributed import distributed_c10d

        distributed_c10d._get_default_store().set(PROGRESS_KEY.format(rank=rank), f"{step}.{micro}")
    except (RuntimeError, AttributeError, ValueError):  # no store (single process without init): nothing to report
        pass


def describe_stall(world_size: int) -> str:
    """'rank 1 at step 3.0 (behind)' lines from the store; best effort, never raises."""
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=5))
        progress = {}
        for rank in range(world_size):
            key = PROGRESS_KEY.format(rank=rank)
            progress[rank] = tuple(map(int, store.get(key).decode().split("."))) if store.check([key]) else (0, 0)
    except Exception as err:  # noqa: BLE001 - diagnostics must not mask the original error
        return f"(could not read rank progress: {err})"
    furthest = max(progress.values())
    behind = [rank for rank, value in progress.items() if value < furthest]
    lines = [f"rank {rank} reached step {s} micro-batch {m}" for rank, (s, m) in sorted(progress.items())]
    verdict = f"stalled rank(s): {', '.join(map(str, behind))}" if behind else "no rank is behind (a network problem?)"
    return verdict + "; " + "; ".join(lines)


def shutdown() -> None:
    """Leave cleanly: without this, gloo's threads abort the interpreter at exit ("terminate called ...")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
