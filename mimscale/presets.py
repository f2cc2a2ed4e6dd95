"""The method presets as plain data: each names its builder ("module:function", imported when used) and its default
components (see mimscale/methods/__init__.py for the table). It imports nothing from mimscale, so config.py checks
``method.name`` against it while the methods package imports config.py, without a cycle."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    """A method's builder and default components.

    ``build``: ``"module:function"`` (imported when used) or the function itself, called as
    ``build(cfg, preset, student)`` with the resolved preset. ``needs_teacher``: the config must name a frozen
    teacher. ``own_mask_kinds``: mask kinds the method makes itself from the batch (beyond the data's).
    ``objective_version``: bumped whenever the preset's objective changes (what is computed and optimised, not a
    default value); every checkpoint records it, and resume refuses a checkpoint of another version
    (engine/ckpt_meta.py, ``objective_change``), since its weights and optimizer state were trained for another loss.
    """

    build: str | Callable
    loss: str
    target_norm: str
    mask_kind: str
    teacher_output: str = "block"
    needs_teacher: bool = False
    own_mask_kinds: tuple[str, ...] = ()
    objective_version: int = 1


PRESETS: dict[str, Preset] = {
    "simmim": Preset("mimscale.methods.simmim:build_simmim", loss="l1", target_norm="none", mask_kind="random_cells"),
    "maskdistill": Preset(
        "mimscale.methods.maskdistill:build_maskdistill",
        loss="smooth_l1",
        target_norm="layernorm",
        mask_kind="blockwise",
        teacher_output="projected",
        needs_teacher=True,
    ),
    "maskalign": Preset(
        "mimscale.methods.maskalign:build_maskalign",
        loss="smooth_l1",
        target_norm="layernorm",
        mask_kind="random_tokens",
        needs_teacher=True,
        own_mask_kinds=("attention_guided",),
    ),
    "relaxmim": Preset(  # 2: the paper's two-view form (issue 22); version 1 is now patch_content_nce
        "mimscale.methods.relaxmim:build_relaxmim",
        loss="infonce",
        target_norm="none",
        mask_kind="random_tokens",
        objective_version=2,
    ),
    "patch_content_nce": Preset(
        "mimscale.methods.patch_content_nce:build_patch_content_nce",
        loss="infonce",
        target_norm="none",
        mask_kind="random_tokens",
    ),
    "mae": Preset("mimscale.methods.mae:build_mae", loss="mse", target_norm="patch_pixel", mask_kind="random_tokens"),
}

# An objective a preset no longer trains, by (name, objective version), and the (name, version) that trains it now:
# a checkpoint of the former resumes under the latter's name.
FORMER_OBJECTIVES: dict[tuple[str, int], tuple[str, int]] = {
    ("relaxmim", 1): ("patch_content_nce", 1),  # issue 22: relaxmim became the paper's two-view InfoNCE
}
