"""BEiT-style students (timm Beit: shared relative position bias, no absolute position embedding, layer scale)
work wherever a ViT student does: mask token, every method that keeps the full grid, planner, export to plain timm,
attention analysis. ZeRO-3 and activation checkpointing run through the launcher in test_train_e2e."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from mimscale.config import ConfigError, load_config
from mimscale.methods import build_method
from mimscale.pipeline.masking import mask_generator_for

BEIT_ARGS = (
    "model.student_args={patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2, use_abs_pos_emb: false, "
    "use_rel_pos_bias: false, use_shared_rel_pos_bias: true, init_values: 0.1, use_fc_norm: false}"
)
BEIT = ["model.student=beit_base_patch16_224", BEIT_ARGS, "data.image_size=32", "mask.patch_size=16"]
TINY_CLIP = [
    "teacher.kind=open_clip",
    "teacher.name=ViT-B-16",
    "teacher.random_init=true",
    "teacher.model_args={embed_dim: 32, vision_cfg: {image_size: 32, layers: 2, width: 64, patch_size: 8, "
    "head_width: 32}, text_cfg: {context_length: 8, vocab_size: 64, width: 32, heads: 2, layers: 1}}",
]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _build(extra):
    cfg = load_config(None, BEIT + extra)
    torch.manual_seed(0)
    return build_method(cfg), cfg


def _batch(method, cfg, size=2):
    gen = mask_generator_for(cfg, method)
    rng = np.random.default_rng(0)
    return {
        "image": torch.randn(size, 3, cfg.data.image_size, cfg.data.image_size),
        "mask": torch.from_numpy(np.stack([gen(rng) for _ in range(size)])),
    }


def test_beit_student_is_the_papers_shape_and_masks_with_its_token():
    method, cfg = _build(["method.name=simmim"])
    backbone = method.student.backbone
    assert type(backbone).__name__ == "Beit" and method.student.arch.name == "beit"
    assert backbone.pos_embed is None and backbone.rel_pos_bias is not None  # one shared table, no absolute one
    assert all(block.attn.relative_position_bias_table is None for block in backbone.blocks)
    assert torch.allclose(backbone.blocks[0].gamma_1, torch.full_like(backbone.blocks[0].gamma_1, 0.1))
    batch = _batch(method, cfg)
    out = method(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and method.student.mask_token.grad.abs().sum() > 0
    assert backbone.rel_pos_bias.relative_position_bias_table.grad.abs().sum() > 0
    # masked tokens really are the mask token: changing masked pixels does not change the student's output
    image = batch["image"].clone()
    pixel_mask = batch["mask"].repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(image)
    method.eval()
    with torch.no_grad():
        a = method.student(image, batch["mask"]).tokens
        b = method.student(torch.where(pixel_mask, torch.randn_like(image), image), batch["mask"]).tokens
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["maskdistill", "relaxmim"])
def test_feature_methods_train_a_beit_student(name):
    method, cfg = _build([f"method.name={name}"] + (TINY_CLIP if name == "maskdistill" else []))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch(method, cfg, size=4)
    for _ in range(2):
        loss = method(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)


def test_visible_only_and_fc_norm_are_clear_errors():
    with pytest.raises(ConfigError, match="drops masked tokens, which beit students cannot"):
        _build(["method.name=maskalign", "mask.kind=random_tokens", "teacher.layers=[-1]"] + TINY_CLIP)
    with pytest.raises(ConfigError, match="use_fc_norm: false"):
        _build(["method.name=simmim", BEIT_ARGS.replace(", use_fc_norm: false", "")])


def test_activation_checkpointing_gives_the_same_gradients():
    method, cfg = _build(["method.name=simmim"])
    batch = _batch(method, cfg)
    method.eval()
    method(batch)["loss"].backward()
    plain = [p.grad.clone() for p in method.parameters()]
    method.zero_grad()
    method.set_grad_checkpointing(True)
    method(batch)["loss"].backward()
    for grad, param in zip(plain, method.parameters(), strict=True):
        torch.testing.assert_close(param.grad, grad)


def test_export_loads_in_plain_timm_with_the_same_features(tmp_path):
    from mimscale.eval.export import write_export

    method, cfg = _build(["method.name=simmim"])
    backbone = method.student.backbone.eval()
    out = write_export(backbone, cfg, tmp_path / "beit", {"test": True})
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert type(loaded).__name__ == "Beit" and loaded.pos_embed is None and loaded.rel_pos_bias is not None
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(image), backbone.forward_features(image))


def test_attention_maps_are_beits_own_with_relative_position_bias():
    from mimscale.eval.analysis import analyze_model, vit_attention_and_features

    method, _ = _build(["method.name=simmim"])
    backbone = method.student.backbone.eval()
    with torch.no_grad():  # a visible bias: otherwise a random table is almost zero
        backbone.rel_pos_bias.relative_position_bias_table.normal_(std=1.0)
    image = torch.randn(2, 3, 32, 32)
    ours, _ = vit_attention_and_features(backbone, image)
    theirs = []
    for block in backbone.blocks:  # timm's own non-fused path hands the softmaxed map to attn_drop
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_pre_hook(lambda m, args: theirs.append(args[0]))
    with torch.no_grad():
        backbone.forward_features(image)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b)
    result = analyze_model(backbone, image, ratios=(0.0, 0.5))
    assert result["family"] == "vit" and len(result["attention_distance"]) == 2 and "note" not in result


def test_planner_counts_a_beit_student():
    from mimscale.plan import make_plan, parse_memory

    cfg = load_config(None, BEIT + ["method.name=simmim"])
    plan = make_plan(cfg, gpus=1, gpu_memory_bytes=parse_memory("80GB"))
    assert plan.student_forward_flops > 0
