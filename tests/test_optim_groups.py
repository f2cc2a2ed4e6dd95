"""Weight-decay groups of every preset, by parameter name, against each preset's reference repository's rule.

Our optimizer has one rule for every preset (engine/optim.py: no decay for 1-D tensors, biases, tokens, position
tables, relative position tables, SwinV2's cpb_mlp and logit_scale, MaskAlign's level mixing), because a
checkpoint's groups must be rebuilt from names and shapes alone. Each reference has its own; where ours exempts a
tensor the reference decays, the name is listed below as a departure, and the README's departures column says so.
We never decay a tensor a reference exempts.
"""

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


def timm_032_rule(name: str, param: torch.Tensor, skip: set[str], keywords: tuple[str, ...] = ()) -> bool:
    """No decay, as timm 0.3.2's add_weight_decay / the repos' set_weight_decay: 1-D, ``.bias``, a name in the
    model's no_weight_decay() (matched on the reference's own parameter name) or a keyword in the name."""
    own_name = name.removeprefix("student.backbone.").removeprefix("student.")
    return param.ndim <= 1 or name.endswith(".bias") or own_name in skip or any(k in name for k in keywords)


# preset -> (reference rule, names we exempt and the reference decays, by last name component)
REFERENCES = {
    # microsoft/SimMIM ViT: VisionTransformer.no_weight_decay() {pos_embed, cls_token}, no keywords; its
    # mask_token and the shared relative position table are decayed.
    "simmim_vit": (
        lambda n, p: timm_032_rule(n, p, {"pos_embed", "cls_token"}),
        {"mask_token", "relative_position_bias_table"},
    ),
    # microsoft/SimMIM Swin / SwinV2: {absolute_pos_embed, mask_token}, keywords relative_position_bias_table
    # (+ cpb_mlp, logit_scale for V2): equal to ours.
    "simmim_swin": (
        lambda n, p: timm_032_rule(
            n, p, {"absolute_pos_embed", "mask_token"}, ("relative_position_bias_table", "cpb_mlp", "logit_scale")
        ),
        set(),
    ),
    # unilm beit2 (MaskDistill's code base; EVA-01 the same): get_parameter_groups with no_weight_decay()
    # {pos_embed, cls_token}, exact names; mask_token and the shared relative position table are decayed.
    "maskdistill": (
        lambda n, p: timm_032_rule(n, p, {"pos_embed", "cls_token"}),
        {"mask_token", "relative_position_bias_table"},
    ),
    # OpenDriveLab/maskalign (MAE's code): add_weight_decay with skip_list ["distill_weights"] (our head.mixing):
    # the class token is decayed; the student's mask token is unused by a visible-only student; demo_maskalign
    # trains its position embedding (the paper preset keeps MAE's frozen table, which no optimizer sees).
    "maskalign": (
        lambda n, p: timm_032_rule(n, p, set()) or n == "head.mixing",
        {"cls_token", "mask_token", "pos_embed"},
    ),
    # facebookresearch/mae main_pretrain.py: optim_factory.add_weight_decay(model, wd), no skip list: the class
    # token and the decoder's mask token are decayed (the fixed position tables are not trained at all).
    "mae": (lambda n, p: timm_032_rule(n, p, set()), {"cls_token", "mask_token"}),
}


def reference_of(cfg) -> str | None:
    """Which reference a config's preset follows (None: our own objective, no reference to match)."""
    name = cfg.method.name
    if name == "simmim":
        return "simmim_swin" if "swin" in cfg.model.student else "simmim_vit"
    return name if name in REFERENCES else None


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_decay_groups_follow_the_reference_rule(path, one_torch_thread):
    overrides = list(REDUCED.get(path.name, []))
    if load_config(path).teacher.kind != "none":
        overrides += ["teacher.pretrained=", "teacher.random_init=true"]
    cfg = load_config(path, overrides)
    with torch.device("meta"):
        method = build_method(cfg)
    groups = param_groups(method, weight_decay=0.05)
    by_id = {id(p): name for name, p in method.named_parameters()}
    decayed = {by_id[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {by_id[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {name: p for name, p in method.named_parameters() if p.requires_grad}
    assert decayed | not_decayed == set(trainable) and not decayed & not_decayed
    assert any(name.endswith("qkv.weight") for name in decayed)
    reference = reference_of(cfg)
    if reference is None:
        return
    rule, departures = REFERENCES[reference]
    expected = {name for name, p in trainable.items() if rule(name, p)}
    assert not expected - not_decayed, f"we decay what {reference} exempts: {sorted(expected - not_decayed)}"
    departed = not_decayed - expected
    assert {name.rsplit(".", 1)[-1] for name in departed} <= departures, sorted(departed)
    if reference == "maskalign":
        assert "head.mixing" in not_decayed  # the bug this test was first written for: mixing weights were decayed


def test_the_listed_departures_are_real():
    """Each listed departure names a tensor some config trains and the reference decays while we do not."""
    seen: dict[str, set[str]] = {name: set() for name in REFERENCES}
    for path in CONFIGS:
        overrides = list(REDUCED.get(path.name, []))
        if load_config(path).teacher.kind != "none":
            overrides += ["teacher.pretrained=", "teacher.random_init=true"]
        cfg = load_config(path, overrides)
        reference = reference_of(cfg)
        if reference is None:
            continue
        with torch.device("meta"):
            method = build_method(cfg)
        rule, _ = REFERENCES[reference]
        exempt = {
            by_name for group in param_groups(method, 0.05) if group["weight_decay"] == 0 for by_name in group["params"]
        }
        for name, param in method.named_parameters():
            if param.requires_grad and any(param is p for p in exempt) and not rule(name, param):
                seen[reference].add(name.rsplit(".", 1)[-1])
    assert seen == {name: departures for name, (_, departures) in REFERENCES.items()}
