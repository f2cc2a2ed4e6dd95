"""Methods: a preset names one component of each kind; ``build_method(cfg)`` assembles it.

| preset      | target             | norm      | student input        | head          | loss      | mask          |
|-------------|--------------------|-----------|----------------------|---------------|-----------|---------------|
| simmim      | pixels             | none      | all + mask token     | linear/pshuf. | l1        | random_cells  |
| maskdistill | CLIP last block    | layernorm | all + mask token     | linear        | smooth_l1 | blockwise     |
| maskalign   | CLIP top-k blocks  | layernorm | visible tokens only  | dynamic_align | smooth_l1 | random_tokens |
| relaxmim    | own full view (sg) | none      | all + mask token     | mlp           | infonce   | random_tokens |

``method.head``, ``method.loss``, ``method.target_norm`` and ``mask.kind`` override the preset's choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from mimscale.config import Config, ConfigError
from mimscale.methods.base import MIMMethod
from mimscale.models.students import Student, build_student

__all__ = ["MIMMethod", "PRESETS", "Preset", "build_method", "resolve_preset"]


@dataclass(frozen=True)
class Preset:
    head: str
    loss: str
    target_norm: str
    mask_kind: str
    teacher_output: str = "block"


PRESETS: dict[str, Preset] = {
    "simmim": Preset(head="auto", loss="l1", target_norm="none", mask_kind="random_cells"),
    "maskdistill": Preset(
        head="linear", loss="smooth_l1", target_norm="layernorm", mask_kind="blockwise", teacher_output="projected"
    ),
    "maskalign": Preset(head="dynamic_align", loss="smooth_l1", target_norm="layernorm", mask_kind="random_tokens"),
    "relaxmim": Preset(head="mlp", loss="infonce", target_norm="none", mask_kind="random_tokens"),
}
DATA_MASK_KINDS = ("random_cells", "blockwise", "random_tokens")


def resolve_preset(cfg: Config) -> Preset:
    """The preset with the config's overrides applied ("auto" keeps the preset's choice)."""
    preset = PRESETS[cfg.method.name]
    mask_kind = preset.mask_kind if cfg.mask.kind == "auto" else cfg.mask.kind
    allowed_masks = DATA_MASK_KINDS + (("attention_guided",) if cfg.method.name == "maskalign" else ())
    if mask_kind not in allowed_masks:
        raise ConfigError(
            f"mask.kind={mask_kind!r} is not valid for method.name={cfg.method.name}; choose auto or one of "
            f"{', '.join(allowed_masks)}"
        )
    output = cfg.teacher.output if cfg.teacher.output != "auto" else preset.teacher_output
    if cfg.teacher.output == "auto" and output == "projected" and cfg.teacher.kind == "timm":
        output = "norm"  # timm towers built with num_classes=0 have no projection: their final-norm tokens
    return Preset(
        head=preset.head if cfg.method.head == "auto" else cfg.method.head,
        loss=preset.loss if cfg.method.loss == "auto" else cfg.method.loss,
        target_norm=preset.target_norm if cfg.method.target_norm == "auto" else cfg.method.target_norm,
        mask_kind=mask_kind,
        teacher_output=output,
    )


def build_method(cfg: Config) -> MIMMethod:
    """Build the method the config names: student, head, loss, target norm, mask kind, frozen teacher."""
    preset = resolve_preset(cfg)
    student = build_student(cfg)
    builder = {
        "simmim": _build_simmim,
        "maskdistill": _build_maskdistill,
        "maskalign": _build_maskalign,
        "relaxmim": _build_relaxmim,
    }[cfg.method.name]
    return builder(cfg, preset, student)


def _build_simmim(cfg: Config, preset: Preset, student: Student) -> MIMMethod:
    from mimscale.methods.components import build_regression_loss
    from mimscale.methods.simmim import SimMIM
    from mimscale.models.heads import LinearPixelHead, PixelShuffleHead

    head_name = preset.head
    if head_name == "auto":
        head_name = "pixelshuffle" if student.family == "swin" else "linear"
    if head_name == "linear" and student.family == "vit":
        head = LinearPixelHead(student.num_features, student.out_stride)
    elif head_name == "pixelshuffle" and student.family == "swin":
        head = PixelShuffleHead(student.num_features, student.out_stride)
    else:
        raise ConfigError(
            f"method.head={head_name!r} does not fit a {student.family} student for simmim; use auto "
            "(linear for ViT, pixelshuffle for Swin)"
        )
    if preset.target_norm not in ("none", "patch_pixel"):
        raise ConfigError(f"method.target_norm={preset.target_norm!r} is not valid for simmim; use none or patch_pixel")
    loss = build_regression_loss(preset.loss, cfg.method.loss_args)
    return SimMIM(student, head, preset.mask_kind, loss, target_norm=preset.target_norm)


def _build_maskdistill(cfg: Config, preset: Preset, student: Student) -> MIMMethod:
    from mimscale.methods.maskdistill import build_maskdistill

    return build_maskdistill(cfg, preset, student)


def _build_maskalign(cfg: Config, preset: Preset, student: Student) -> MIMMethod:
    from mimscale.methods.maskalign import build_maskalign

    return build_maskalign(cfg, preset, student)


def _build_relaxmim(cfg: Config, preset: Preset, student: Student) -> MIMMethod:
    from mimscale.methods.relaxmim import build_relaxmim

    return build_relaxmim(cfg, preset, student)
