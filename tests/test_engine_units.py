"""Engine pieces that need no launcher: schedule, weight-decay groups, DeepSpeed JSON, checkpoint bookkeeping."""

import json
from pathlib import Path

import pytest
import timm
import torch

from mimscale.config import load_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine.deepspeed import build_deepspeed_config
from mimscale.engine.metrics import MetricAccumulator, format_step_line
from mimscale.engine.optim import build_scheduler, param_groups, warmup_cosine
from mimscale.storage.atomic import atomic_write

REPO = Path(__file__).resolve().parents[1]


def test_warmup_then_cosine_to_min():
    lrs = [warmup_cosine(s, base_lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14) for s in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))  # monotone decay after warmup
    assert warmup_cosine(14, base_lr=1.0, min_lr=0.1, warmup_steps=4, max_steps=14) == pytest.approx(0.1)
    assert lrs[9] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi / 2)).item()))


def test_scheduler_matches_formula():
    cfg = load_config(None, ["optim.lr=0.01", "optim.min_lr=0.001", "optim.warmup_steps=3"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=cfg.optim.lr)
    sched = build_scheduler(opt, cfg.optim, max_steps=10)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [warmup_cosine(s, base_lr=0.01, min_lr=0.001, warmup_steps=3, max_steps=10) for s in range(10)]
    assert seen == pytest.approx(expected)


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, num_classes=0)
    model.mask_token = torch.nn.Parameter(torch.zeros(1, 1, 192))
    groups = param_groups(model, weight_decay=0.05)
    decayed = {id(p) for p in groups[0]["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert "blocks.0.attn.qkv.weight" in names and "patch_embed.proj.weight" in names
    for excluded in ("cls_token", "pos_embed", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"):
        assert excluded not in names
    assert groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_deepspeed_config_derived_from_ours():
    cfg = load_config(
        None,
        [
            "data.batch_size=8",
            "train.grad_accum_steps=4",
            "deepspeed.zero_stage=3",
            "deepspeed.precision=bf16",
            "optim.grad_clip=1.5",
            "deepspeed.extra={zero_optimization: {overlap_comm: false}}",
        ],
    )
    ds = build_deepspeed_config(cfg, world_size=16)
    assert ds["train_batch_size"] == 8 * 4 * 16 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is False
    json.dumps(ds)


def _fake_checkpoint(root, step, complete=True):
    tag_dir = root / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {}}, tag_dir / "mp_rank_00_model_states.pt")
    if complete:
        meta = {"step": step, "samples_seen": 0, "world_size": 1, "zero_stage": 0, "data_state": {}, "config": {}}
        (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    return tag_dir


def test_resume_skips_incomplete_newest_and_reports_it(tmp_path):
    _fake_checkpoint(tmp_path, 10)
    _fake_checkpoint(tmp_path, 20)
    _fake_checkpoint(tmp_path, 30, complete=False)
    messages = []
    found = ckpt.find_resume_checkpoint(tmp_path, log=messages.append)
    assert found.name == "step_00000020"
    assert len(messages) == 1 and "step_00000030" in messages[0] and "incomplete" in messages[0]
    assert ckpt.find_resume_checkpoint(tmp_path / "nothing-here") is None


def test_prune_keeps_last_k_every_m_and_the_protected_one(tmp_path):
    for step in (10, 20, 30, 40, 50, 60):
        _fake_checkpoint(tmp_path, step)
    incomplete = _fake_checkpoint(tmp_path, 70, complete=False)
    protected = tmp_path / ckpt.tag_for_step(10)
    removed = ckpt.prune_checkpoints(tmp_path, keep_last=2, keep_every=40, protect=[protected, None])
    left = sorted(p.name for p in ckpt.list_checkpoints(tmp_path))
    assert left == ["step_00000010", "step_00000040", "step_00000050", "step_00000060", "step_00000070"]
    assert {p.name for p in removed} == {"step_00000020", "step_00000030"}
    assert incomplete.exists()  # pruning never touches a checkpoint it cannot judge


def test_atomic_write_replaces_whole_file(tmp_path):
    target = tmp_path / "latest"
    atomic_write(target, "step_00000001")
    atomic_write(target, "step_00000002")
    assert target.read_text() == "step_00000002"
    assert not list(tmp_path.glob("*.tmp"))


def test_metric_accumulator_means_and_step_line():
    acc = MetricAccumulator()
    acc.add({"loss": torch.tensor(1.0)})
    acc.add({"loss": torch.tensor(3.0)})
    assert acc.pop_means() == {"loss": 2.0}
    assert acc.pop_means() == {}
    line = format_step_line(
        5, 100, {"train/loss": 0.5, "train/lr": 1e-4, "train/grad_norm": 2.0, "perf/images_per_sec": 10.0}
    )
    assert line.startswith("step   5/100 | loss 0.5000 | lr 1.00e-04 | grad_norm 2.000 | img/s 10.0")


def test_uint8_batches_are_normalised_like_the_worker_path():
    """GPU runs ship uint8 images and normalise on the device; the result must equal the CPU worker path."""
    from mimscale.engine.loop import _to_device
    from mimscale.pipeline.transforms import normalise_batch

    cfg = load_config(None)
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch = {"image": images, "mask": torch.ones(2, 1, 1, dtype=torch.bool), "label": torch.tensor([3, 4])}
    moved = _to_device(batch, torch.device("cpu"), torch.float32, cfg.data)
    assert torch.equal(moved["image"], normalise_batch(images, cfg.data.mean, cfg.data.std))
    assert moved["mask"].dtype == torch.bool and moved["label"].dtype == torch.int64
    as_bf16 = _to_device(batch, torch.device("cpu"), torch.bfloat16, cfg.data)["image"]
    assert as_bf16.dtype == torch.bfloat16 and torch.equal(as_bf16, moved["image"].to(torch.bfloat16))


def test_each_python_environment_gets_its_own_torch_extensions_folder(tmp_path, monkeypatch):
    """Two environments sharing ~/.cache/torch_extensions/py311_cpu rebuild DeepSpeed's CPU op at every start."""
    import subprocess
    import sys

    from mimscale.engine.deepspeed import pin_torch_extensions_dir

    mine = pin_torch_extensions_dir({"XDG_CACHE_HOME": str(tmp_path)})
    assert mine.startswith(f"{tmp_path}/torch_extensions/py") and mine == pin_torch_extensions_dir(
        {"XDG_CACHE_HOME": str(tmp_path)}
    )
    assert pin_torch_extensions_dir({"TORCH_EXTENSIONS_DIR": "/mine"}) == "/mine"  # the user's choice stands
    venv = tmp_path / "venv"  # another environment on the same Python: a different folder
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)], check=True)
    code = "import sys; sys.path.insert(0, sys.argv[1]); from mimscale.engine.deepspeed import pin_torch_extensions_dir"
    code += "; print(pin_torch_extensions_dir({'XDG_CACHE_HOME': sys.argv[2]}))"
    command = [str(venv / "bin" / "python"), "-c", code, str(REPO), str(tmp_path)]
    other = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
    assert other.startswith(f"{tmp_path}/torch_extensions/py") and other != mine
