"""The method interface the engine trains: a student, a head, a mask kind and (optionally) frozen teachers."""

from __future__ import annotations

import torch
from torch import nn

from mimscale.models.students import Student


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, h, w] token mask -> [B, h*factor, w*factor] (each token covers factor x factor pixels)."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


class MIMMethod(nn.Module):
    """Base of every preset. Trainable parts are submodules; teachers are kept out of the module tree.

    Teachers are held in a plain list so they are not in ``parameters()`` / ``state_dict()`` and thus never
    reach the optimizer, ZeRO partitioning or checkpoints; the engine moves and casts them through
    ``frozen_modules()``.
    """

    def __init__(self, student: Student, head: nn.Module, mask_kind: str, teachers: tuple[nn.Module, ...] = ()):
        super().__init__()
        self.student = student
        self.head = head
        self.mask_kind = mask_kind
        self.token_stride = student.patch_size
        self._frozen: list[nn.Module] = list(teachers)

    @property
    def teacher(self) -> nn.Module:
        """The (first) frozen teacher, for presets that distil one."""
        if not self._frozen:
            raise AttributeError(f"{type(self).__name__} has no frozen teacher")
        return self._frozen[0]

    def frozen_modules(self) -> list[nn.Module]:
        """Frozen teachers (not registered submodules): the engine moves them to the device and casts them."""
        return list(self._frozen)

    def set_grad_checkpointing(self, enable: bool) -> None:
        """Activation checkpointing of the student's blocks (heads are small and teachers run without grad)."""
        self.student.set_grad_checkpointing(enable)

    def forward(self, batch: dict) -> dict:  # pragma: no cover - every preset overrides it
        raise NotImplementedError
