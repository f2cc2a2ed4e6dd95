"""Methods: a preset names a builder and its default components; ``build_method(cfg)`` assembles it.

| preset      | target             | norm      | student input        | head          | loss      | mask          |
|-------------|--------------------|-----------|----------------------|---------------|-----------|---------------|
| simmim      | pixels             | none      | all + mask token     | linear/pshuf. | l1        | random_cells  |
| maskdistill | CLIP last block    | layernorm | all + mask token     | linear        | smooth_l1 | blockwise     |
| maskalign   | CLIP top-k blocks  | layernorm | visible tokens only  | dynamic_align | smooth_l1 | random_tokens |
| relaxmim    | own patch content  | none      | all + mask token     | mlp           | infonce   | random_tokens |

``method.loss``, ``method.target_norm`` and ``mask.kind`` override the preset's choice, by name from the registries
in ``methods/components.py`` (``LOSSES``, ``TARGET_NORMS``) and ``pipeline/masking.py`` (``MASK_KINDS``); the builder
checks that the choice fits its target (a regression loss for regression targets, a pixel or feature norm). The
head is the method's own (it is fixed by the target: pixels on the student's grid, teacher width, ...).

A new method is its own file (a ``MIMMethod`` subclass and a builder) plus one entry in ``PRESETS``
(``mimscale/presets.py``, plain data that config.py reads to check ``method.name``): the loop, the
planner, FLOP counting and export read everything else from the method object.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from mimscale.config import Config, ConfigError, check_method_choice
from mimscale.methods.base import MIMMethod
from mimscale.models.students import build_student
from mimscale.pipeline.masking import MASK_KINDS
from mimscale.presets import PRESETS, Preset

__all__ = ["MIMMethod", "PRESETS", "Preset", "build_method", "resolve_preset"]


def resolve_preset(cfg: Config) -> Preset:
    """The preset with the config's overrides applied ("auto" keeps the preset's choice)."""
    check_method_choice(cfg)  # again: a config may be changed after loading
    preset = PRESETS[cfg.method.name]
    mask_kind = preset.mask_kind if cfg.mask.kind == "auto" else cfg.mask.kind
    allowed_masks = MASK_KINDS + preset.own_mask_kinds
    if mask_kind not in allowed_masks:
        raise ConfigError(
            f"mask.kind={mask_kind!r} is not valid for method.name={cfg.method.name}; choose auto or one of "
            f"{', '.join(allowed_masks)}"
        )
    output = cfg.teacher.output if cfg.teacher.output != "auto" else preset.teacher_output
    if cfg.teacher.output == "auto" and output == "projected" and cfg.teacher.kind == "timm":
        output = "norm"  # timm towers built with num_classes=0 have no projection: their final-norm tokens
    return dataclasses.replace(
        preset,
        loss=preset.loss if cfg.method.loss == "auto" else cfg.method.loss,
        target_norm=preset.target_norm if cfg.method.target_norm == "auto" else cfg.method.target_norm,
        mask_kind=mask_kind,
        teacher_output=output,
    )


def _builder(preset: Preset) -> Callable:
    if callable(preset.build):
        return preset.build
    module, _, function = preset.build.partition(":")
    return getattr(importlib.import_module(module), function)


def build_method(cfg: Config) -> MIMMethod:
    """Build the method the config names: student, head, loss, target norm, mask kind, frozen teacher."""
    preset = resolve_preset(cfg)
    return _builder(preset)(cfg, preset, build_student(cfg))
