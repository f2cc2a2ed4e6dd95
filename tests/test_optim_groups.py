"""Weight-decay groups of every preset, by parameter name, against the reference repositories' rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimscale.config import load_config
from mimscale.engine.optim import param_groups
from mimscale.methods import build_method

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
REDUCED = {  # the giants at reduced depth: the names per block are what matters
    "maskdistill_vit_giant_1b.yaml": ["model.student_args.depth=2"],
    "simmim_swinv2_giant_3b.yaml": ["model.student_args.depths=[1,1,1,1]"],
}
# Names each reference excludes from weight decay, besides timm's add_weight_decay rule (1-D or ".bias", which
# covers norms, biases, layer scales): BEiT / BEiT v2 no_weight_decay() {pos_embed, cls_token} and the keyword
# relative_position_bias_table; SimMIM {mask_token}, Swin {absolute_pos_embed} and keyword
# relative_position_bias_table, SwinV2 {cpb_mlp, logit_scale}; MaskAlign skip_list ["distill_weights"] (ours:
# head.mixing). dist_token / reg_token: timm ViT's no_weight_decay().
REFERENCE_SKIP_NAMES = {"pos_embed", "cls_token", "mask_token", "absolute_pos_embed", "dist_token", "reg_token"}
REFERENCE_SKIP_KEYWORDS = ("relative_position_bias_table", "cpb_mlp", "logit_scale")
MASKALIGN_MIXING = "head.mixing"


def reference_no_decay(name: str, param: torch.Tensor) -> bool:
    if param.ndim == 1 or name.endswith(".bias"):  # timm 0.3.2 add_weight_decay (MAE, MaskAlign, BEiT, SimMIM)
        return True
    if name.rsplit(".", 1)[-1] in REFERENCE_SKIP_NAMES:
        return True
    return any(keyword in name for keyword in REFERENCE_SKIP_KEYWORDS) or name == MASKALIGN_MIXING


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_decay_groups_follow_the_reference_rule(path, one_torch_thread):
    overrides = list(REDUCED.get(path.name, []))
    if load_config(path).teacher.kind != "none":
        overrides += ["teacher.pretrained=", "teacher.random_init=true"]
    with torch.device("meta"):
        method = build_method(load_config(path, overrides))
    groups = param_groups(method, weight_decay=0.05)
    by_id = {id(p): name for name, p in method.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {name: p for name, p in method.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == set(trainable) and not decayed & not_decayed
    expected = {name for name, p in trainable.items() if reference_no_decay(name, p)}
    assert not_decayed == expected, (sorted(not_decayed - expected), sorted(expected - not_decayed))
    assert "student.mask_token" in not_decayed or load_config(path).method.name == "maskalign"
    if load_config(path).method.name == "maskalign":
        assert MASKALIGN_MIXING in not_decayed  # the bug this test was written for: mixing weights were decayed
    assert any(name.endswith("qkv.weight") for name in decayed)
