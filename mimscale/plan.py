"""Plan a run before booking a cluster: parameters, per-rank memory, largest micro-batch, FLOPs and speed.

Models are built at random init on the "meta" device, so a billion-parameter config plans in seconds with no
memory. Model-state bytes follow the ZeRO paper's 2+2+12 bytes/param rule plus the fp32 gradient copy DeepSpeed
keeps for the optimizer step (that makes them equal DeepSpeed's own estimators). Activation bytes are not
guessed: one forward of the real student on the meta device, in the training precision, records every tensor
autograd saves for backward (per block, so activation checkpointing can be planned too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mimscale.config import Config, ConfigError, load_config
from mimscale.engine.deepspeed import DTYPES
from mimscale.engine.flops import build_on_meta, image_flops, masked_tokens
from mimscale.methods.base import MIMMethod, count_params

GIB = 2**30
# CUDA context, NCCL/DeepSpeed communication buckets and allocator fragmentation: kept free on every card.
RUNTIME_RESERVE_FRACTION = 0.10
FROZEN_DTYPE = "bf16"  # the engine casts frozen teachers to bf16 on GPUs


def dtype_bytes(precision: str) -> int:
    return DTYPES[precision].itemsize


def largest_layer_params(module: nn.Module) -> int:
    """Most parameters held directly by one module: what ZeRO-3 gathers at once."""
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules()), default=0)


# ----------------------------------------------------------------------------------------------- model states


@dataclass
class ModelStateBytes:
    """Bytes per rank of what training keeps besides activations, split by kind."""

    params: float
    grads: float
    master_params: float
    fp32_grads: float
    optimizer: float
    gathered_layer: float
    buckets: float = 0.0
    offloaded_to_cpu: float = 0.0

    @property
    def total(self) -> float:
        states = self.params + self.grads + self.master_params + self.fp32_grads + self.optimizer
        return states + self.gathered_layer + self.buckets


def model_state_bytes(
    params: int,
    *,
    stage: int,
    precision: str,
    gpus: int,
    largest_layer: int = 0,
    bucket_elements: float = 0,
    offload_optimizer: bool = False,
) -> ModelStateBytes:
    """ZeRO partitioning (stage 1: optimizer state, 2: + gradients, 3: + parameters) of Adam training states.

    Mixed precision keeps 2-byte params and grads, an fp32 master copy, the fp32 gradient copy the optimizer step
    reads and two fp32 Adam moments (2+2+4+4+8 bytes); fp32 training keeps 4+4+8. ZeRO-3 also gathers one layer's
    16-bit params and grads at a time and keeps a gradient reduce bucket of `bucket_elements` (measured on 2 CPU
    ranks in bench/bench_memory.py; DeepSpeed's estimate_zero3_model_states_mem_needs omits the bucket and the
    16-bit gradient partition, which it also holds at the step).
    """
    if precision not in DTYPES:
        raise ConfigError(f"deepspeed.precision={precision!r} is not valid; choose fp32, bf16 or fp16")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_stage={stage} is not valid; choose 0, 1, 2 or 3")
    mixed = precision != "fp32"
    width = dtype_bytes(precision)

    def share(bytes_per_param: float, from_stage: int) -> float:
        return params * bytes_per_param / (gpus if stage >= from_stage else 1)

    states = ModelStateBytes(
        params=share(width, 3),
        grads=share(width, 2),
        master_params=share(4, 1) if mixed else 0.0,
        fp32_grads=share(4, 1) if mixed else 0.0,
        optimizer=share(8, 1),
        gathered_layer=2 * width * largest_layer if stage == 3 else 0.0,
        buckets=width * bucket_elements if stage == 3 else 0.0,
    )
    if offload_optimizer and stage >= 1:
        states.offloaded_to_cpu = states.master_params + states.fp32_grads + states.optimizer
        states.master_params = states.fp32_grads = states.optimizer = 0.0
    return states


# ----------------------------------------------------------------------------------------------- activations


class _FusedAttentionShapes(torch.autograd.Function):
    """Stands in for a fused attention kernel on the meta device: saves q, k, v, out and the row log-sum-exp.

    On GPUs (and on CPU) scaled_dot_product_attention runs flash/memory-efficient kernels that never store the
    N x N attention matrix; on the meta device PyTorch falls back to the math path, which would.
    """

    @staticmethod
    def forward(ctx, q, k, v, attn_mask):
        # fused kernels write the output token-major, so the usual transpose(1, 2).reshape after them is a view
        if q.ndim == 4:
            out = q.new_empty((q.shape[0], q.shape[2], q.shape[1], v.shape[-1])).transpose(1, 2)
        else:
            out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        saved = (q, k, v, out, lse) + ((attn_mask,) if attn_mask is not None else ())
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the planner never runs backward
        raise RuntimeError("shape-only attention has no backward")


@contextlib.contextmanager
def _fused_attention_on_meta() -> Iterator[None]:
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def shape_only(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if q.device.type != "meta":
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return _FusedAttentionShapes.apply(q, k, v, attn_mask)

    functional.scaled_dot_product_attention = shape_only
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


@dataclass
class ActivationTrace:
    """Bytes autograd saves for backward during one forward, split by checkpointing unit."""

    outside_blocks: int = 0
    per_block: list[int] = field(default_factory=list)
    block_inputs: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.outside_blocks + sum(self.per_block)

    def stored(self, checkpointing: bool) -> int:
        """What stays alive from the forward to the backward."""
        return self.outside_blocks + sum(self.block_inputs) if checkpointing else self.total

    def peak(self, checkpointing: bool) -> int:
        """Stored bytes plus, with checkpointing, the one block recomputed at a time in the backward."""
        return self.stored(checkpointing) + (max(self.per_block, default=0) if checkpointing else 0)


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def trace_saved_activations(
    forward: Callable[[torch.Tensor], object], images: torch.Tensor, model: nn.Module, units: list[nn.Module]
) -> ActivationTrace:
    """Sum the unique storages autograd saves for backward, excluding ``model``'s parameters and buffers.

    Each storage is counted once, charged to the checkpointing unit (block) of ``units`` that first saved it; a
    block's input is what checkpointing keeps instead of the block's saved tensors.
    """
    excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers()]}
    seen: set[int] = set()
    trace = ActivationTrace()
    current: list[int | None] = [None]

    def charge(key: int, nbytes: int) -> None:
        if key in excluded or key in seen:
            return
        seen.add(key)
        if current[0] is None:
            trace.outside_blocks += nbytes
        else:
            trace.per_block[current[0]] += nbytes

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        charge(_storage_key(tensor), tensor.untyped_storage().nbytes())
        return tensor

    def enter(index: int) -> Callable:
        def hook(_module, args):
            current[0] = index
            trace.block_inputs[index] = args[0].untyped_storage().nbytes() if args else 0

        return hook

    def leave(_module, _args, _output):
        current[0] = None

    trace.per_block = [0] * len(units)
    trace.block_inputs = [0] * len(units)
    handles = [u.register_forward_pre_hook(enter(i)) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward(images)
    finally:
        for handle in handles:
            handle.remove()
    return trace


def trace_student_activations(method: MIMMethod, cfg: Config, precision: str) -> ActivationTrace:
    """Per-sample saved bytes of the method's trained forwards in the training precision (meta device, batch 1)."""
    dtype = DTYPES[precision]
    method.to(dtype)  # student and head (teachers are not submodules)
    size = cfg.data.image_size
    images = torch.empty(1, 3, size, size, device="meta", dtype=dtype)
    trained = [forward.run for forward in method.counted_forwards(masked_tokens(cfg, method)) if forward.trained]
    with _fused_attention_on_meta():
        return trace_saved_activations(lambda x: [run(x) for run in trained], images, method, method.trained_blocks())


def head_activation_bytes(method: MIMMethod, cfg: Config, precision: str) -> int:
    """Per-sample bytes the head saves for backward, as the method declares them."""
    return method.head_activation_elements(cfg.data.image_size, masked_tokens(cfg, method)) * dtype_bytes(precision)


# ----------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """Everything `mimscale plan` prints; bytes are per rank, activations per sample."""

    student: str
    teacher: str
    method: str
    gpus: int
    zero_stage: int
    precision: str
    activation_checkpointing: bool
    student_params: int
    head_params: int
    teacher_params: int
    student_tokens: int
    gpu_memory_bytes: float
    model_states: dict
    model_state_bytes: float
    teacher_bytes: float
    reserve_bytes: float
    activation_bytes_per_sample: float
    activation_bytes_per_sample_other_mode: float
    max_micro_batch: int
    flops_per_image: float
    student_forward_flops: float  # forwards with gradient
    teacher_forward_flops: float  # no-grad forwards: frozen teachers, stop-grad targets
    no_grad_forwards: list[str]
    mfu: float
    peak_tflops: float
    images_per_second_per_gpu: float
    images_per_second: float
    notes: list[str] = field(default_factory=list)


def reduce_bucket_elements(cfg: Config, gpus: int) -> float:
    """The gradient reduce bucket the engine's DeepSpeed JSON asks for (DeepSpeed's default when unset)."""
    from mimscale.engine.deepspeed import build_deepspeed_config

    zero = build_deepspeed_config(cfg, gpus).get("zero_optimization", {})
    return float(zero.get("reduce_bucket_size", 5e8))


def max_micro_batch(free_bytes: float, bytes_per_sample: float) -> int:
    """Largest micro-batch whose activations fit in what the model states leave free (0 = none fits)."""
    if bytes_per_sample <= 0:
        raise ValueError("activation bytes per sample must be positive")
    return max(0, int(free_bytes // bytes_per_sample))


def make_plan(cfg: Config, *, gpus: int, gpu_memory_bytes: float, mfu: float = 0.4, peak_tflops: float = 989.0) -> Plan:
    """Plan one config on `gpus` data-parallel ranks with `gpu_memory_bytes` each."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be at least 1, got {gpus}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    ds = cfg.deepspeed
    method = build_on_meta(cfg)
    student_params = count_params(method.student)
    head_params = count_params(method) - student_params
    states = model_state_bytes(
        student_params + head_params,
        stage=ds.zero_stage,
        precision=ds.precision,
        gpus=gpus,
        largest_layer=largest_layer_params(method),  # ZeRO-3 gathers module by module, head included
        bucket_elements=reduce_bucket_elements(cfg, gpus),
        offload_optimizer=ds.offload_optimizer,
    )
    frozen = method.frozen_modules()
    teacher_params = sum(count_params(module) for module in frozen)
    teacher_bytes = teacher_params * dtype_bytes(FROZEN_DTYPE)
    flops = image_flops(method, cfg)
    trace = trace_student_activations(method, cfg, ds.precision)
    head = head_activation_bytes(method, cfg, ds.precision)
    per_sample = trace.peak(ds.activation_checkpointing) + head
    other = trace.peak(not ds.activation_checkpointing) + head
    reserve = RUNTIME_RESERVE_FRACTION * gpu_memory_bytes
    batch = max_micro_batch(gpu_memory_bytes - reserve - states.total - teacher_bytes, per_sample)
    per_gpu = mfu * peak_tflops * 1e12 / flops.total
    return Plan(
        student=cfg.model.student,
        teacher=f"{cfg.teacher.kind}:{cfg.teacher.name}" if frozen else "none",
        method=cfg.method.name,
        gpus=gpus,
        zero_stage=ds.zero_stage,
        precision=ds.precision,
        activation_checkpointing=ds.activation_checkpointing,
        student_params=student_params,
        head_params=head_params,
        teacher_params=teacher_params,
        student_tokens=method.student_tokens(cfg.data.image_size, masked_tokens(cfg, method)),
        gpu_memory_bytes=gpu_memory_bytes,
        model_states=asdict(states),
        model_state_bytes=states.total,
        teacher_bytes=float(teacher_bytes),
        reserve_bytes=reserve,
        activation_bytes_per_sample=float(per_sample),
        activation_bytes_per_sample_other_mode=float(other),
        max_micro_batch=batch,
        flops_per_image=flops.total,
        student_forward_flops=flops.trained_forward,
        teacher_forward_flops=flops.no_grad_forward,
        no_grad_forwards=[f.name for f in method.counted_forwards(0) if not f.trained],
        mfu=mfu,
        peak_tflops=peak_tflops,
        images_per_second_per_gpu=per_gpu,
        images_per_second=per_gpu * gpus,
        notes=_advice(cfg, batch, method),
    )


def _advice(cfg: Config, batch: int, method: MIMMethod) -> list[str]:
    notes = []
    if method.visible_only:
        kept = method.student_tokens(cfg.data.image_size, masked_tokens(cfg, method))
        notes.append(
            f"visible-only student: {kept} of {method.grid_tokens(cfg.data.image_size)} tokens (+ prefix) per image"
        )
    if batch == 0:
        fixes = []
        if cfg.deepspeed.zero_stage < 3:
            fixes.append(f"raise deepspeed.zero_stage (now {cfg.deepspeed.zero_stage})")
        if not cfg.deepspeed.activation_checkpointing:
            fixes.append("set deepspeed.activation_checkpointing=true")
        fixes.append("use more GPUs or larger cards")
        notes.append("DOES NOT FIT: not even one sample per rank; " + ", ".join(fixes))
    elif batch < cfg.data.batch_size:
        notes.append(f"data.batch_size={cfg.data.batch_size} does not fit; at most {batch} per rank")
    return notes


# ----------------------------------------------------------------------------------------------- output


def _human(value: float, unit: str = "") -> str:
    for suffix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}{unit}"
    return f"{value:.0f} {unit}".rstrip()


def format_plan(plan: Plan) -> str:
    """A readable table of the plan."""
    gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
    ckpt = "on" if plan.activation_checkpointing else "off"
    states = plan.model_states
    rows = [
        ("model", f"{plan.method}: student {plan.student}, teacher {plan.teacher}"),
        (
            "setup",
            f"{plan.gpus} GPUs x {gib(plan.gpu_memory_bytes)}, ZeRO-{plan.zero_stage}, {plan.precision}, "
            f"activation checkpointing {ckpt}",
        ),
        (
            "parameters",
            f"student {_human(plan.student_params)}, head {_human(plan.head_params)}, "
            f"teacher {_human(plan.teacher_params)} (frozen)",
        ),
        ("params / grads", f"{gib(states['params'])} / {gib(states['grads'])} per rank"),
        (
            "optimizer states",
            f"{gib(states['master_params'] + states['fp32_grads'] + states['optimizer'])} per rank "
            f"(fp32 master, fp32 grads, Adam m+v)",
        ),
        (
            "model states",
            f"{gib(plan.model_state_bytes)} per rank"
            + (f" (+ {gib(states['offloaded_to_cpu'])} on CPU)" if states["offloaded_to_cpu"] else ""),
        ),
        ("teacher weights", f"{gib(plan.teacher_bytes)} per rank (replicated)"),
        ("runtime reserve", f"{gib(plan.reserve_bytes)} per rank ({RUNTIME_RESERVE_FRACTION:.0%} of the card)"),
        (
            "activations",
            f"{plan.activation_bytes_per_sample / 2**20:.1f} MiB per sample (checkpointing {ckpt}; "
            f"{plan.activation_bytes_per_sample_other_mode / 2**20:.1f} MiB with it "
            f"{'off' if plan.activation_checkpointing else 'on'})",
        ),
        ("max micro-batch", f"{plan.max_micro_batch} per rank ({plan.student_tokens} student tokens per image)"),
        (
            "FLOPs per image",
            f"{_human(plan.flops_per_image, 'FLOP')} (student fwd {_human(plan.student_forward_flops)}"
            f" x3{' +1 recompute' if plan.activation_checkpointing else ''}, "
            f"{' + '.join(plan.no_grad_forwards) or 'teacher'} fwd {_human(plan.teacher_forward_flops)})",
        ),
        (
            "ideal speed",
            f"{plan.images_per_second_per_gpu:,.0f} img/s per GPU, {plan.images_per_second:,.0f} img/s "
            f"total at MFU {plan.mfu:.0%} of {plan.peak_tflops:g} TFLOP/s",
        ),
    ]
    rows += [("note", note) for note in plan.notes]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


_MEMORY = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GIB|GB|G|MIB|MB|M|TIB|TB|T)?\s*$", re.IGNORECASE)


def parse_memory(text: str) -> float:
    """'80GB', '80GiB', '81920MB' -> bytes; a card's 'GB' is its marketing GiB (an 80 GB H100 has 80 GiB)."""
    match = _MEMORY.match(str(text))
    if not match:
        raise ConfigError(f"--gpu-memory {text!r} is not a size; write it like 80GB, 141GiB or 40960MB")
    value, unit = float(match.group(1)), (match.group(2) or "GB").upper()
    scale = {"T": 2**40, "G": 2**30, "M": 2**20}[unit[0]]
    return value * scale


def run_plan_command(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set or [])
    plan = make_plan(
        cfg, gpus=args.gpus, gpu_memory_bytes=parse_memory(args.gpu_memory), mfu=args.mfu, peak_tflops=args.peak_tflops
    )
    print(json.dumps(asdict(plan), indent=2) if args.json else format_plan(plan))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="Will it fit? Parameters, per-rank memory, largest micro-batch, FLOPs and ideal speed."
    )
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--gpus", type=int, required=True, help="data-parallel ranks (GPUs) in total")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB (H100), 141GB (H200)")
    parser.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for the speed")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak TFLOP/s per GPU (H100 bf16 dense)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override, e.g. data.batch_size=64")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run_plan_command)
