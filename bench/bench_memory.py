"""Per-rank model-state memory at ZeRO 0/1/2/3 on 2 CPU ranks (real `deepspeed` launcher), beside the planner's
prediction; then the activation-checkpointing memory saving and time cost on one process.

    python bench/bench_memory.py [--model vit_base_patch16_224] [--stages 0 1 2 3]

Each stage runs `deepspeed --num_gpus 2 bench/bench_memory.py --worker --stage S`: the workers build the model,
wrap it in our engine (mimscale.engine.deepspeed.initialize_engine, bf16), take two optimizer steps and report the
bytes of every live tensor storage in the process (gc walk, unique storages), before and after the engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

ROOT = Path(__file__).resolve().parents[1]
IMAGE = 32  # tiny images: activations are negligible next to the model states measured here


class PixelLoss(nn.Module):
    """A student with a stand-in loss: the engine only needs forward(batch) -> {'loss': ...}."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> dict:
        return {"loss": self.model.forward_features(batch["image"]).float().pow(2).mean()}


def bench_config(stage: int):
    from mimscale.config import load_config

    overrides = [f"deepspeed.zero_stage={stage}", "deepspeed.precision=bf16", "data.batch_size=2"]
    return load_config(None, overrides + [f"data.image_size={IMAGE}", "mask.patch_size=16"])


def live_tensor_bytes() -> int:
    """Bytes of every distinct storage reachable from a live Python tensor in this process."""
    gc.collect()
    storages = {}
    tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    tensors += [t.grad for t in tensors if t.grad is not None]  # .grad lives in C++, invisible to gc
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if tensor.device.type == "cpu" and storage.nbytes():
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def worker(args: argparse.Namespace) -> None:
    import timm

    from mimscale.engine.deepspeed import initialize_engine
    from mimscale.engine.distributed import init_distributed, shutdown

    info = init_distributed("cpu")
    cfg = bench_config(args.stage)
    before = live_tensor_bytes()
    torch.manual_seed(0)
    module = PixelLoss(timm.create_model(args.model, img_size=IMAGE, num_classes=0))
    params = sum(p.numel() for p in module.parameters())
    engine, _, _ = initialize_engine(module, cfg, info.world_size, info.device)
    batch = {"image": torch.randn(2, 3, IMAGE, IMAGE, dtype=torch.bfloat16)}
    at_step: list[int] = []  # the peak is inside the step: fp32 grad copies exist only until it returns
    hook = register_optimizer_step_pre_hook(lambda *_: at_step.append(live_tensor_bytes()))
    for _ in range(2):
        loss = engine(batch)["loss"]
        engine.backward(loss)
        engine.step()
    hook.remove()
    del loss
    after = live_tensor_bytes()
    measured = max(*at_step[len(at_step) // 2 :], after) - before - batch["image"].nbytes  # second step
    result = {"rank": info.rank, "stage": args.stage, "params": params, "bytes": measured, "at_step": len(at_step)}
    print("RESULT " + json.dumps(result))
    sys.stdout.flush()
    shutdown()


def run_stage(model: str, stage: int) -> list[dict]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = ["deepspeed", "--num_gpus", "2", __file__, "--worker", "--stage", str(stage), "--model", model]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in done.stdout.splitlines() if "RESULT " in line]
    if done.returncode or len(results) != 2:
        raise RuntimeError(
            f"stage {stage} failed (rc {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return results


def zero_table(model: str, stages: list[int]) -> None:
    import timm

    from mimscale.plan import GIB, largest_layer_params, model_state_bytes, reduce_bucket_elements

    with torch.device("meta"):
        meta = timm.create_model(model, img_size=IMAGE, num_classes=0)
    largest = largest_layer_params(meta)
    print(f"ZeRO model states per rank, {model} (img {IMAGE}), bf16, 2 CPU ranks, AdamW")
    print(
        f"{'stage':>5} {'predicted':>10} {'measured r0':>12} {'measured r1':>12} {'meas/pred':>9} "
        f"{'of it bucket':>12} {'launch s':>8}"
    )
    for stage in stages:
        start = time.perf_counter()
        results = sorted(run_stage(model, stage), key=lambda r: r["rank"])
        seconds = time.perf_counter() - start
        params = results[0]["params"]
        bucket = reduce_bucket_elements(bench_config(stage), 2)
        predicted = model_state_bytes(
            params, stage=stage, precision="bf16", gpus=2, largest_layer=largest, bucket_elements=bucket
        ).total
        r0, r1 = (r["bytes"] for r in results)
        print(
            f"{stage:>5} {predicted / GIB:>8.3f} G {r0 / GIB:>10.3f} G {r1 / GIB:>10.3f} G "
            f"{max(r0, r1) / predicted:>9.2f} {2 * bucket * (stage == 3) / GIB:>10.3f} G {seconds:>8.1f}"
        )


def saved_bytes(model: nn.Module, images: torch.Tensor) -> int:
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model.forward_features(images)
    del out
    return sum(storages.values())


def checkpointing_table(model_name: str, batch: int, repeats: int) -> None:
    """Saved activation bytes and fwd+bwd time with and without checkpointing, interleaved in one run."""
    import timm
    from timm.layers import set_reentrant_ckpt

    from mimscale.config import load_config
    from mimscale.engine.flops import build_on_meta
    from mimscale.plan import trace_student_activations

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=0)
    images = torch.randn(batch, 3, 224, 224)
    cfg = load_config(None, [f"model.student={model_name}", "data.image_size=224", "mask.patch_size=16"])
    trace = trace_student_activations(build_on_meta(cfg), cfg, "fp32")
    set_reentrant_ckpt(True)  # re-entrant checkpoints save block inputs where the hook sees them
    times = {False: [], True: []}
    memory = {}
    for _ in range(repeats):
        for checkpointing in (False, True):
            model.set_grad_checkpointing(checkpointing)
            memory[checkpointing] = saved_bytes(model, images)
            start = time.perf_counter()
            model.forward_features(images).pow(2).mean().backward()
            times[checkpointing].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    print(f"\nActivation checkpointing, {model_name} 224px, batch {batch}, fp32, 1 process, median of {repeats}")
    print(f"{'ckpt':>4} {'saved MiB':>10} {'planned MiB':>11} {'fwd+bwd s':>9}")
    for checkpointing in (False, True):
        planned = batch * trace.stored(checkpointing) / 2**20
        median = sorted(times[checkpointing])[len(times[checkpointing]) // 2]
        print(
            f"{'on' if checkpointing else 'off':>4} {memory[checkpointing] / 2**20:>10.1f} {planned:>11.1f} {median:>9.3f}"
        )
    off, on = (sorted(times[c])[repeats // 2] for c in (False, True))
    print(f"memory saved x{memory[False] / memory[True]:.1f}, time cost x{on / off:.2f} (recompute of every block)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--ckpt-model", default="vit_small_patch16_224")
    parser.add_argument("--ckpt-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.stages:
        zero_table(args.model, args.stages)
    if args.repeats:
        checkpointing_table(args.ckpt_model, args.ckpt_batch, args.repeats)


if __name__ == "__main__":
    main()
