"""The GPU path, exercised on CPU: ZeRO-3 in-run kNN at real parameter sizes, compile, host syncs, AdamW resume.

Everything here runs without a GPU; the same code paths run on one when there is one.
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_two_ranks(*settings: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("MIMSCALE_INJECT_FAULT", None)
    command = [
        "deepspeed",
        "--num_gpus",
        "2",
        "--master_port",
        str(_free_port()),
        "--module",
        "mimscale.train",
        "--config",
        str(DEMO),
    ]
    for item in settings:
        command += ["--set", item]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_zero3_in_run_knn_with_partitioned_pos_embed(tmp_path):
    """Persistence threshold 0 partitions every parameter, as ViT-B's 151k-element pos_embed is above the default
    1e5: the in-run kNN calls forward_features directly and must still see the gathered pos_embed/cls_token.
    The same run takes its images through data.decode=device."""
    run_dir = tmp_path / "run"
    result = _launch_two_ranks(
        "model.student_args.depth=2",
        "data.batch_size=4",
        "data.num_workers=0",
        "train.max_steps=1",
        "train.log_every=1",
        "train.progress_bar=false",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=bf16",
        "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0",
        "eval.knn_every=1",
        "eval.train_shards=shards/sample-val/*.tar",
        "eval.val_shards=shards/sample-val/*.tar",
        "data.decode=device",  # the engine's batch handling decodes the JPEGs (on the CPU here)
        f"run.output_dir={run_dir}",
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "eval step 1 | knn_top1" in result.stdout
    assert '"stage3_param_persistence_threshold": 0' in (run_dir / "deepspeed_config.json").read_text()


# --------------------------------------------------------------------------------------------- model.compile


def _build_cfg(config: str | None, *settings: str):
    from mimscale.config import load_config

    return load_config(REPO / "configs" / config if config else None, list(settings))


@pytest.mark.parametrize(
    ("student", "args", "size", "max_graphs"),
    [
        ("vit_tiny_patch16_224", "{patch_size: 8, depth: 12, embed_dim: 48, num_heads: 2}", 64, 2),
        ("swin_tiny_patch4_window7_224", "{window_size: 4, embed_dim: 24, depths: [2,2], num_heads: [1,2]}", 64, 6),
    ],
)
def test_compile_parts_trace_without_breaks_or_hitting_the_recompile_limit(
    student, args, size, max_graphs, one_torch_thread
):
    """Whole blocks differ in baked-in drop-path probabilities (8 graphs, then eager); their attention and MLP do
    not. Traced with dynamo's eager backend (the same graphs inductor would compile, in a fraction of the time)."""
    import torch
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from mimscale.methods import build_method

    cfg = _build_cfg(
        None,
        f"model.student={student}",
        f"model.student_args={args}",
        f"data.image_size={size}",
        "model.drop_path_rate=0.1",
        "mask.patch_size=32",
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    reference = build_method(cfg)
    reference.load_state_dict(method.state_dict())
    blocks = method.student.arch.blocks
    dynamo.reset()
    counters.clear()
    assert method.compile_for_training(backend="eager") == 2 * len(blocks)
    image = torch.randn(2, 3, size, size)
    mask = torch.zeros(2, size // method.token_stride, size // method.token_stride, dtype=torch.bool)
    mask[:, ::2] = True
    for _ in range(2):
        out = method({"image": image, "mask": mask})["loss"]
        out.backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= max_graphs < dynamo.config.recompile_limit
    method.eval(), reference.eval()  # drop path off: both must give the same loss
    with torch.no_grad():
        ours, theirs = (m({"image": image, "mask": mask})["loss"] for m in (method, reference))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    dynamo.reset()


def test_compile_leaves_the_student_eager_under_zero3():
    from mimscale.methods import build_method

    method = build_method(_build_cfg("demo_maskdistill.yaml", "model.student_args.depth=2"))
    forwards = [part.forward for block in method.student.arch.blocks for part in (block.attn, block.mlp)]
    assert method.compile_for_training(zero_stage=3, backend="eager") == len(method.frozen_modules()) == 1
    assert forwards == [part.forward for block in method.student.arch.blocks for part in (block.attn, block.mlp)]


# --------------------------------------------------------------------------------------------- host syncs


class SyncCounter:
    """CUDA-free proxy for host syncs: calls made *from mimscale's code* of the tensor methods that wait for the
    device (item, tolist, bool/int/float conversion, nonzero) and of torch.tensor (a blocking host-to-device copy
    when the target is a GPU). On a GPU each of these is a sync point; on CPU they are just counted."""

    WAITING = ("item", "tolist", "__bool__", "__int__", "__float__", "nonzero")

    def __init__(self, monkeypatch):
        import sys

        import torch

        self.calls: list[str] = []
        root = str(REPO / "mimscale")

        def wrap(owner, name):
            original = getattr(owner, name)

            def counted(*args, **kwargs):
                caller = sys._getframe(1).f_code
                if caller.co_filename.startswith(root):
                    self.calls.append(f"{name} in {caller.co_name}")
                return original(*args, **kwargs)

            monkeypatch.setattr(owner, name, counted)

        for name in self.WAITING:
            wrap(torch.Tensor, name)
        wrap(torch, "tensor")


@pytest.mark.parametrize("nan_guard", [True, False])
def test_host_syncs_per_micro_batch(monkeypatch, nan_guard, one_torch_thread, one_rank):
    """MaskAlign (visible-only student, teacher normalisation, attention-guided masks), uint8 images normalised
    in the engine: after a warm-up step, mimscale's own code waits on the device once per micro-batch (the NaN
    guard's agreed flag) and never otherwise; with train.nan_guard=false, never."""
    import numpy as np
    import torch

    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import Trainer
    from mimscale.pipeline.masking import mask_generator_for

    cfg = _build_cfg(
        "demo_maskalign.yaml",
        "model.student_args.depth=2",
        "data.batch_size=4",
        "run.device=cpu",
        "deepspeed.zero_stage=0",
        "deepspeed.precision=fp32",
        "train.grad_accum_steps=2",
        f"train.nan_guard={str(nan_guard).lower()}",
    )
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # undone below, so later launcher tests on a GPU box use CUDA
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info)
    generator, rng = mask_generator_for(cfg, trainer.method), np.random.default_rng(0)
    size = cfg.data.image_size

    def batches():
        while True:
            yield {
                "image": torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8),
                "mask": torch.from_numpy(np.stack([generator(rng) for _ in range(4)])),
                "sample_id": torch.arange(4),
            }

    source = batches()
    trainer.train_step(source)  # warm-up: constants made once
    counter = SyncCounter(monkeypatch)
    trainer.train_step(source)
    trainer.train_step(source)
    monkeypatch.undo()
    micro_batches = 2 * cfg.train.grad_accum_steps
    expected = ["tolist in agree_bad_loss_and_stop"] * micro_batches if nan_guard else []
    assert counter.calls == expected


# --------------------------------------------------------------------------------------------- AdamW, TF32, peaks


def test_fused_adamw_choice_and_device_steps_survive_loading_a_foreach_checkpoint():
    """A checkpoint written by a foreach AdamW (CPU run) loaded into a fused one: torch's load_state_dict copies
    the saved flags (so the run would silently go foreach); restoring puts back fused and float32 step tensors on
    the parameters' device, and the next step equals a fused optimizer that never went through a checkpoint."""
    import torch

    from mimscale.engine.optim import restore_adamw_implementation

    torch.manual_seed(0)
    start = torch.randn(6, 4)
    grads = [torch.randn(6, 4) for _ in range(3)]

    def run(optimizer, param, steps):
        for grad in steps:
            param.grad = grad.clone()
            optimizer.step()

    saved_param = torch.nn.Parameter(start.clone())
    saved = torch.optim.AdamW([saved_param], lr=0.1, foreach=True)
    run(saved, saved_param, grads[:2])

    param = torch.nn.Parameter(saved_param.detach().clone())
    resumed = torch.optim.AdamW([param], lr=0.1, fused=True)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.param_groups[0]["foreach"] and not resumed.param_groups[0]["fused"]  # the trap
    restore_adamw_implementation(resumed, fused=True)
    assert resumed.param_groups[0]["fused"] and resumed.param_groups[0]["foreach"] is None
    assert resumed.state[param]["step"].dtype == torch.float32 and resumed.state[param]["step"].device == param.device
    run(resumed, param, grads[2:])

    reference_param = torch.nn.Parameter(start.clone())
    reference = torch.optim.AdamW([reference_param], lr=0.1, fused=True)
    run(reference, reference_param, grads)
    torch.testing.assert_close(param.detach(), reference_param.detach(), rtol=1e-6, atol=1e-7)


def test_peak_table_picks_the_variant_and_precision():
    from mimscale.engine.metrics import lookup_peak_tflops

    assert lookup_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert lookup_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert lookup_peak_tflops("NVIDIA H100 NVL", "fp16") == 835.0
    assert lookup_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert lookup_peak_tflops("NVIDIA H200 NVL", "bf16") == 835.0
    assert lookup_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 156.0  # TF32
    assert lookup_peak_tflops("NVIDIA B200", "bf16") == 2250.0
    assert lookup_peak_tflops("NVIDIA L40S", "bf16") == 362.0 and lookup_peak_tflops("NVIDIA L4", "bf16") == 121.0
    assert lookup_peak_tflops("Some Future GPU", "bf16") is None


def test_swin_window_attention_runs_fused_with_the_same_result(one_torch_thread):
    import timm
    import torch

    from mimscale.models.students import use_fused_window_attention

    torch.manual_seed(0)
    kwargs = {"img_size": 64, "window_size": 4, "embed_dim": 24, "depths": (2, 2), "num_heads": (1, 2)}
    eager = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **kwargs).eval()
    fused = timm.create_model("swin_tiny_patch4_window7_224", num_classes=0, **kwargs).eval()
    fused.load_state_dict(eager.state_dict())
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert use_fused_window_attention(fused) == 4
    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fused(image), eager(image), rtol=1e-4, atol=1e-5)


def test_teacher_and_visible_only_student_compile_without_graph_breaks(one_torch_thread):
    """MaskAlign: the frozen teacher's whole forward (normalisation constants, class-token attention) and the
    visible-only student's attention/MLP trace as graphs, with none broken."""
    import numpy as np
    import torch
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from mimscale.methods import build_method
    from mimscale.pipeline.masking import mask_generator_for

    cfg = _build_cfg("demo_maskalign.yaml", "model.student_args.depth=2", "data.batch_size=4")
    method = build_method(cfg)
    dynamo.reset()
    counters.clear()
    assert method.compile_for_training(backend="eager") == 2 * 2 + 1
    generator, rng = mask_generator_for(cfg, method), np.random.default_rng(0)
    for _ in range(2):
        masks = torch.from_numpy(np.stack([generator(rng) for _ in range(4)]))
        method({"image": torch.randn(4, 3, 64, 64), "mask": masks})["loss"].backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 3  # attention, MLP, teacher
    dynamo.reset()


def test_tf32_only_for_fp32_runs_on_a_gpu():
    import torch

    from mimscale.engine.loop import configure_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        configure_matmul_precision(torch.device("cpu"), "fp32")
        configure_matmul_precision(torch.device("cuda"), "bf16")
        assert torch.get_float32_matmul_precision() == "highest"
        configure_matmul_precision(torch.device("cuda"), "fp32")  # sets the flag; needs no GPU to do so
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
