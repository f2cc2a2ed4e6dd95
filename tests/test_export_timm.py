"""Exports as timm users meet them (fine-tuning with a new head, another input size) and our checkpoints under
DeepSpeed's own universal converter, run as its users run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.eval.export import write_export
from mimscale.models.students import build_student

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"
FAMILIES = {
    "vit": ["model.student_args={patch_size: 8, depth: 2}", "data.image_size=32"],
    "swin": [
        "model.student=swin_tiny_patch4_window7_224",
        "model.student_args={embed_dim: 24, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 4}",
        "mask.patch_size=32",
        "model.pos_embed_init=timm",
    ],
    "swinv2": [
        "model.student=swinv2_tiny_window8_256",
        "model.student_args={embed_dim: 24, depths: [1, 1, 1, 1], num_heads: [1, 1, 2, 2], window_size: 4}",
        "mask.patch_size=32",
        "model.pos_embed_init=timm",
    ],
    "beit": [  # SimMIM's ViT as the presets build it: one shared relative position bias, no absolute embedding
        "model.student=beit_base_patch16_224",
        "model.student_args={patch_size: 8, depth: 2, embed_dim: 48, num_heads: 3, use_abs_pos_emb: false, "
        "use_rel_pos_bias: false, use_shared_rel_pos_bias: true, init_values: 0.1, use_fc_norm: false}",
        "data.image_size=32",
        "model.pos_embed_init=timm",
    ],
}
# timm's own default pretrained_cfg for each family: the head module and the stem
EXPECTED = {"vit": ("head", "patch_embed.proj"), "swin": ("head.fc", "patch_embed.proj")}
EXPECTED["swinv2"] = EXPECTED["swin"]
EXPECTED["beit"] = EXPECTED["vit"]


def _export(family: str, out: Path) -> tuple[torch.nn.Module, dict]:
    cfg = load_config(DEMO, FAMILIES[family])
    torch.manual_seed(0)
    backbone = build_student(cfg).backbone.eval()
    write_export(backbone, cfg, out, {"test": family})
    return backbone, cfg


@pytest.mark.parametrize("family", list(FAMILIES))
@torch.no_grad()
def test_export_fine_tunes_in_plain_timm_with_new_head_and_size(family: str, tmp_path: Path, one_torch_thread) -> None:
    backbone, cfg = _export(family, tmp_path)
    pcfg = json.loads((tmp_path / "config.json").read_text())["pretrained_cfg"]
    assert (pcfg["classifier"], pcfg["first_conv"]) == EXPECTED[family]
    assert pcfg["num_classes"] == 0 and pcfg["input_size"] == [3, cfg.data.image_size, cfg.data.image_size]
    assert not {"url", "hf_hub_id", "tag", "license"} & set(pcfg)

    # the call every timm fine-tuning script makes: pretrained backbone, fresh 7-way head
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=7).eval()
    assert model.num_classes == 7
    head = model.get_classifier()
    assert head.weight.shape == (7, backbone.num_features)
    state = model.state_dict()
    for name, tensor in backbone.state_dict().items():
        assert torch.equal(state[name], tensor), name
    size = cfg.data.image_size
    images = torch.randn(2, 3, size, size)
    features = model.forward_head(model.forward_features(images), pre_logits=True)
    assert torch.allclose(features, backbone(images), atol=1e-5)  # the student's Swin attention is the fused kernel

    # fine-tuning at another resolution: timm resamples the ViT position embedding / rebuilds the Swin windows
    bigger = timm.create_model(f"local-dir:{tmp_path}", pretrained=True, num_classes=7, img_size=2 * size).eval()
    assert bigger(torch.randn(2, 3, 2 * size, 2 * size)).shape == (2, 7)
    if family == "vit":
        grid = (2 * size // 8) ** 2
        assert bigger.pos_embed.shape[1] == grid + 1 and bigger.pos_embed.shape[1] != backbone.pos_embed.shape[1]
        assert torch.equal(bigger.blocks[0].attn.qkv.weight, backbone.blocks[0].attn.qkv.weight)


@pytest.mark.slow
def test_plain_ds_to_universal_converts_a_zero2_checkpoint_as_is(tmp_path: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_eval import TINY_VIT, train_run  # pytest puts tests/ on sys.path (no __init__.py)

    run = train_run(tmp_path / "run", TINY_VIT, 2, "bf16")
    tag_dir = run / "checkpoints" / "step_00000002"
    out = tmp_path / "universal"
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir)]
    done = subprocess.run(
        [*command, "--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"],
        capture_output=True,
        text=True,
        timeout=240,
    )  # no --inject_missing_state: the checkpoint carries universal_checkpoint_info itself
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    reference = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    name = "student.backbone.blocks.0.attn.qkv.weight"
    converted = torch.load(out / "zero" / name / "fp32.pt", weights_only=False)
    converted = converted["param"] if isinstance(converted, dict) else converted
    assert torch.equal(converted, reference[name])
    assert {path.name for path in (out / "zero").iterdir() if path.is_dir()} == set(reference)

    # and the same run exports to a folder timm fine-tunes from
    export = tmp_path / "export"
    assert cli_main(["export", str(run), str(export)]) == 0
    model = timm.create_model(f"local-dir:{export}", pretrained=True, num_classes=3)
    assert torch.equal(model.blocks[0].attn.qkv.weight, reference[name])
