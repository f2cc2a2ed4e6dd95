"""A new method is its own code plus one PRESETS entry: the toy feature-regression method below is planned,
trained by the real loop and exported without a change anywhere else in mimscale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mimscale.config import Config, load_config
from mimscale.methods import PRESETS, MIMMethod, Preset
from mimscale.methods.components import build_loss, build_target_norm
from mimscale.models.heads import TokenLinearHead
from mimscale.models.students import Student

REPO = Path(__file__).resolve().parents[1]
WIDTH = 24  # the frozen projection's output width


class PatchFeatureRegression(MIMMethod):
    """Toy: regress the whitened features of a frozen random patch projection at the masked tokens."""

    def __init__(self, student: Student, head: nn.Module, mask_kind: str, projection: nn.Module, loss, norm):
        super().__init__(student, head, mask_kind, teachers=(projection,))
        self.loss_fn = loss
        self.target_norm = norm

    def forward(self, batch: dict) -> dict:
        image, mask = batch["image"], batch["mask"].bool()
        with torch.no_grad():
            target = self.teacher(image.to(self.teacher.weight.dtype)).flatten(2).transpose(1, 2)
        pred = self.head(self.student(image, mask).tokens)
        return {"loss": self.loss_fn(pred.float(), self.target_norm(target), mask.flatten(1))}


def build_patch_feature_regression(cfg: Config, preset: Preset, student: Student) -> PatchFeatureRegression:
    patch = student.patch_size
    projection = nn.Conv2d(3, WIDTH, patch, stride=patch).requires_grad_(False).eval()
    loss = build_loss(preset.loss, cfg.method.loss_args, kind="regression")
    norm = build_target_norm(preset.target_norm, "feature")
    head = TokenLinearHead(student.num_features, WIDTH)
    return PatchFeatureRegression(student, head, preset.mask_kind, projection, loss, norm)


RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
TOY = Preset(build_patch_feature_regression, loss="mse", target_norm="layernorm", mask_kind="random_tokens")
OVERRIDES = [
    "method.name=patch_feature_regression",
    "model.student=vit_tiny_patch16_224",
    "model.student_args={patch_size: 8, depth: 2}",
    "data.image_size=32",
    "mask.patch_size=8",
    "mask.ratio=0.5",
]


# The training run is a real `mimscale train` process (no in-process process group left behind); it registers the
# toy preset the same way a new method's file would be listed, then runs the unchanged CLI.
TRAIN_WITH_TOY = """
import sys
sys.path.insert(0, {tests!r})
import test_new_method
from mimscale.cli import main
from mimscale.methods import PRESETS
PRESETS["patch_feature_regression"] = test_new_method.TOY
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.usefixtures("one_torch_thread")
def test_a_new_method_is_planned_trained_and_exported(tmp_path, monkeypatch):
    import timm

    from mimscale.eval.export import export_checkpoint, load_student
    from mimscale.plan import make_plan, parse_memory

    monkeypatch.setitem(PRESETS, "patch_feature_regression", TOY)
    cfg = load_config(None, OVERRIDES)
    plan = make_plan(cfg, gpus=1, gpu_memory_bytes=parse_memory("80GB"))
    assert plan.no_grad_forwards == ["teacher"] and plan.teacher_params == WIDTH * 3 * 8 * 8 + WIDTH
    assert plan.teacher_forward_flops == 2 * 16 * WIDTH * 3 * 8 * 8  # 16 patches x (3*8*8 -> WIDTH)
    assert plan.head_params == 192 * WIDTH + WIDTH and plan.max_micro_batch > 0

    run = tmp_path / "run"
    sets = OVERRIDES + [f"run.output_dir={run}", f"data.shards={REPO / 'shards' / 'sample' / '*.tar'}"]
    sets += ["data.num_workers=0", "data.batch_size=4", "train.max_steps=2", "train.log_every=1"]
    sets += ["checkpoint.every_steps=2", "train.progress_bar=false", "optim.warmup_steps=1"]
    (tmp_path / "toy.yaml").write_text("method:\n  name: patch_feature_regression\n")
    command = [sys.executable, "-c", TRAIN_WITH_TOY.format(tests=str(Path(__file__).parent)), "train"]
    command += ["--config", str(tmp_path / "toy.yaml")]
    command += [arg for item in sets for arg in ("--set", item)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")  # PYTHONPATH kept: the tree under test
    for name in RANK_ENV:  # left behind by in-process tests that initialised a process group
        env.pop(name, None)
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (
        "step 2/2 | loss" in done.stdout
        and json.loads((run / "checkpoints" / "step_00000002" / "mimscale.json").read_text())["step"] == 2
    )

    out = export_checkpoint(run, tmp_path / "export")
    exported = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    student, _, meta, _ = load_student(run)
    assert meta["step"] == 2 and meta["config"]["method"]["name"] == "patch_feature_regression"
    for name, tensor in student.backbone.state_dict().items():
        assert torch.equal(exported.state_dict()[name], tensor), name
