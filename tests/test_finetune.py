"""`mimscale eval finetune`: timm's layer-decay groups and schedule as configured, learning, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.eval.export import write_export
from mimscale.eval.finetune import Recipe, build_optimizer_and_schedule, finetune
from mimscale.models.students import build_student

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
DIGITS_VAL = str(REPO / "shards" / "digits" / "val-000.tar")


def tiny_vit(num_classes: int = 3, depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224", num_classes=num_classes, img_size=32, patch_size=8, depth=depth, embed_dim=48
    )


def test_layer_decay_scales_each_block_and_the_schedule_applies_them(one_torch_thread) -> None:
    model = tiny_vit(depth=2)
    recipe = Recipe(steps=10, lr=1e-3, layer_decay=0.5, warmup_steps=2, min_lr=0.0)
    optimizer, schedule, decay = build_optimizer_and_schedule(model, recipe)
    assert decay == 0.5
    schedule.step_update(2)  # end of warmup; the cosine runs over all steps, warmup included (as SimMIM sets it)
    peak = 1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 10))
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {
        names[id(p)]: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]
    }
    # stem (patch_embed, cls_token, pos_embed) = layer 0, block i = layer i + 1, final norm + head = layer 3
    assert lr_of["patch_embed.proj.weight"][0] == pytest.approx(peak * 0.5**3)
    assert lr_of["blocks.0.attn.qkv.weight"][0] == pytest.approx(peak * 0.5**2)
    assert lr_of["blocks.1.mlp.fc1.weight"][0] == pytest.approx(peak * 0.5)
    assert lr_of["head.weight"][0] == pytest.approx(peak)
    assert lr_of["blocks.1.mlp.fc1.weight"][1] == 0.05 and lr_of["blocks.1.norm1.weight"][1] == 0.0  # no decay on norms
    assert lr_of["pos_embed"][1] == 0.0 and lr_of["blocks.0.attn.qkv.bias"][1] == 0.0
    schedule.step_update(10)
    assert max(group["lr"] for group in optimizer.param_groups) == pytest.approx(0.0, abs=1e-12)
    swin = timm.create_model(
        "swin_tiny_patch4_window7_224", num_classes=2, img_size=32, embed_dim=24, depths=[1, 1], num_heads=[1, 2],
        window_size=4,
    )  # fmt: skip
    assert build_optimizer_and_schedule(swin, Recipe(steps=1))[2] == 0.9  # SimMIM's Swin default


def test_finetune_learns_a_separable_task(one_torch_thread) -> None:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=generator)
    images = torch.randn(96, 3, 32, 32, generator=generator) * 0.3
    images[torch.arange(96), labels] += 1.5  # the class is the dominant colour channel
    train, val = (images[:64], labels[:64]), (images[64:], labels[64:])
    recipe = Recipe(steps=30, batch_size=16, lr=2e-3, layer_decay=0.75, warmup_steps=3, eval_every=15)
    result = finetune(tiny_vit(depth=1), train, val, recipe, torch.device("cpu"), log=lambda *_: None)
    assert [entry["step"] for entry in result["history"]] == [15, 30]
    assert result["top1"] >= 0.9 and result["final_loss"] < 1.0  # chance is 1/3, and log(3) = 1.1


def test_finetune_cli_on_an_export_and_on_a_random_twin(tmp_path: Path, capsys, one_torch_thread) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {DEMO}\ndata:\n  image_size: 32\nmodel:\n  student_args: {{patch_size: 8, depth: 1}}\n")
    cfg = load_config(config, [])
    torch.manual_seed(cfg.run.seed)  # as random:<config> builds its twin
    write_export(build_student(cfg).backbone, cfg, tmp_path / "export", {"test": "finetune"})
    common = ["--train", DIGITS_VAL, "--val", DIGITS_VAL, "--steps", "2", "--batch-size", "16", "--json"]
    results = {}
    for name, model in (("export", str(tmp_path / "export")), ("random", f"random:{config}")):
        assert cli_main(["eval", "finetune", "--model", model, *common]) == 0
        results[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for result in results.values():
        assert result["num_classes"] == 10 and result["train_samples"] == 240 and result["image_size"] == 32
        assert result["recipe"]["lr"] == pytest.approx(1.25e-3 * 16 / 512) and result["layer_decay"] == 0.65
        assert result["recipe"]["label_smoothing"] == 0.1 and result["drop_path"] == 0.1
        assert 0.0 <= result["top1"] <= 1.0
    # the export holds the twin's very weights: same head init, same data order -> the same run
    assert results["export"]["final_loss"] == pytest.approx(results["random"]["final_loss"], rel=1e-4)
    assert (
        cli_main(["eval", "finetune", "--model", str(tmp_path / "export"), "--set", "data.image_size=64", *common]) == 2
    )
    assert "--set only applies to random:<config> models" in capsys.readouterr().err
    (tmp_path / "export" / "config.json").write_text('{"architecture": "vit_tiny_patch16_224"}')
    assert cli_main(["eval", "finetune", "--model", str(tmp_path / "export"), *common]) == 2
    assert "has no usable pretrained_cfg" in capsys.readouterr().err
