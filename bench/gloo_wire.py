"""Bytes one rank sends on the wire for each gloo collective of a known size: the cost of the pieces a ZeRO step is
made of, to set beside bench/bench_multinode.py's per-step bytes (it starts this on each namespace node).

    python bench/gloo_wire.py --rank R --world 2 --master ADDR:PORT --elements N --dtype bf16 [--interface eth0]

Each rank reads its own network namespace's transmit counter (/proc/self/net/dev) around ``--repeat`` calls of each
op on a tensor of N elements (after one warm-up call and a barrier) and prints one JSON line: op -> bytes it sent
per call.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def sent_bytes(interface: str) -> int:
    for line in Path("/proc/self/net/dev").read_text().splitlines()[2:]:
        name, counters = line.split(":", 1)
        if name.strip() == interface:
            return int(counters.split()[8])
    raise RuntimeError(f"no interface {interface} here")


def operations(elements: int, dtype: torch.dtype, world: int) -> dict:
    full = torch.ones(elements, dtype=dtype)
    part = torch.ones(elements // world, dtype=dtype)
    return {
        "all_reduce": lambda: dist.all_reduce(full),
        "reduce_scatter_tensor": lambda: dist.reduce_scatter_tensor(part, full),
        "all_gather_into_tensor": lambda: dist.all_gather_into_tensor(full, part),
        "reduce": lambda: dist.reduce(full, dst=0),
        "broadcast": lambda: dist.broadcast(full, src=0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--master", required=True, help="ADDR:PORT of rank 0's store")
    parser.add_argument("--elements", type=int, required=True)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo", init_method=f"tcp://{args.master}", rank=args.rank, world_size=args.world)
    sent = {}
    for name, call in operations(args.elements, DTYPES[args.dtype], args.world).items():
        call()
        dist.barrier()
        before = sent_bytes(args.interface)
        for _ in range(args.repeat):
            call()
        after = sent_bytes(args.interface)
        dist.barrier()
        sent[name] = (after - before) / args.repeat
    print(json.dumps({"rank": args.rank, "elements": args.elements, "dtype": args.dtype, "sent": sent}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
