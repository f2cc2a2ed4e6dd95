"""The method interface the engine trains: a student, a head, a mask kind and (optionally) frozen teachers.

A method also describes itself to the tools around the loop: which forwards one training image costs (for FLOPs
and MFU), how many tokens its student processes, what its head keeps for backward, and how to compile itself.
The planner and the engine read these; they never ask which method it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from mimscale.models.students import Student


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """[B, h, w] token mask -> [B, h*factor, w*factor] (each token covers factor x factor pixels)."""
    return mask.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def count_params(module: nn.Module | None) -> int:
    """Unique parameters (tied weights once), as DeepSpeed counts them."""
    if module is None:
        return 0
    return sum({id(p): p.numel() for p in module.parameters()}.values())


@dataclass(frozen=True)
class CountedForward:
    """One forward a training image costs. ``run(images)`` works on the meta device (shapes only).

    ``trained``: runs with gradient (counted forward + backward = 3x, +1x when blocks are recomputed under
    activation checkpointing); otherwise a no-grad forward counted once (a frozen teacher, a stop-grad target).
    """

    name: str
    module: nn.Module
    run: Callable[[torch.Tensor], object]
    trained: bool


class MIMMethod(nn.Module):
    """Base of every preset. Trainable parts are submodules; teachers are kept out of the module tree.

    Teachers are held in a plain list so they are not in ``parameters()`` / ``state_dict()`` and thus never
    reach the optimizer, ZeRO partitioning or checkpoints; the engine moves and casts them through
    ``frozen_modules()``.
    """

    visible_only: bool = False  # the student runs on the visible tokens only (masked ones dropped)

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

    # ------------------------------------------------------------------ self-description for planner and engine
    def trained_blocks(self) -> list[nn.Module]:
        """Every transformer block that trains, in forward order: the units activation checkpointing recomputes,
        the planner charges activations to and compilation works on (the student's; MAE adds its decoder's)."""
        return self.student.arch.blocks

    def grid_tokens(self, image_size: int) -> int:
        """Patch tokens of a full ``image_size`` image on the student's grid."""
        height, width = self.student.arch.grid(image_size)
        return height * width

    def student_tokens(self, image_size: int, masked: int) -> int:
        """Tokens the student's blocks process per image with ``masked`` tokens masked (prefix tokens included)."""
        tokens = self.grid_tokens(image_size)
        if self.visible_only:
            tokens -= masked
        return tokens + self.student.num_prefix_tokens

    def student_cost_forward(self, images: torch.Tensor, masked: int) -> torch.Tensor:
        """The student's training forward with ``masked`` tokens masked per image, runnable on the meta device."""
        if self.visible_only:
            keep = self.student_tokens(images.shape[-1], masked) - self.student.num_prefix_tokens
            return self.student.forward_kept_count(images, keep).tokens
        height, width = self.student.arch.grid(images.shape[-1])
        mask = torch.zeros(images.shape[0], height, width, dtype=torch.bool, device=images.device)
        return self.student(images, mask).tokens

    def counted_forwards(self, masked: int) -> list[CountedForward]:
        """The forwards one training image (``masked`` tokens masked) costs: the student (trained), then every
        frozen teacher."""
        student = CountedForward(
            "student", self.student, lambda images: self.student_cost_forward(images, masked), trained=True
        )
        return [student, *(CountedForward("teacher", t, t, trained=False) for t in self.frozen_modules())]

    def head_activation_elements(self, image_size: int, masked: int) -> int:
        """Elements per image the head keeps for backward: its input tokens and its predictions (for the loss)."""
        width = self.student.num_features
        if self.visible_only:
            tokens = self.student_tokens(image_size, masked)
        else:
            tokens = (image_size // self.student.out_stride) ** 2
        out_per_token = count_params(self.head) // max(width + 1, 1)
        return tokens * (width + out_per_token)

    def compile_for_training(self, *, zero_stage: int = 0, backend: str = "inductor") -> int:
        """torch.compile what compiles cleanly, in place; returns how many modules were compiled.

        Student: each block's attention and MLP (``attn``/``mlp``), not the whole block. The blocks differ in
        constants dynamo specialises on (each block's drop-path probability, Swin's shift mask), so whole blocks
        need one graph each and ViT-B/Swin-B hit dynamo's recompile limit (8), after which the rest runs eagerly;
        the attention and MLP code is the same in every block of a stage (ViT: 2 graphs in all, Swin-B: about
        11). The limit is raised to the number of compiled modules so no block ever falls back silently. Under
        ZeRO-3 the student is left eager (see COMPILE_ZERO3_NOTE). Teachers (frozen, never partitioned): their
        whole forward. Compiling ``forward`` (not the module) keeps parameter names, so checkpoints and export
        are unchanged, and leaves module hooks (ZeRO gathering, level capture) outside the compiled graphs.
        """
        modules = [] if zero_stage == 3 else compiled_parts(self.trained_blocks())
        modules += self.frozen_modules()
        for module in modules:
            module.forward = torch.compile(module.forward, backend=backend)
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, len(modules) + 8)
        return len(modules)


COMPILE_ZERO3_NOTE = (
    " (teachers only: under ZeRO-3 DeepSpeed's parameter hooks, which torch.compile cannot trace, break every "
    "student graph, so the student runs eagerly)"
)


def compiled_parts(blocks: list[nn.Module]) -> list[nn.Module]:
    """The attention and MLP of every block (timm ViT, Swin, SwinV2 and BEiT blocks all name them so)."""
    parts = [getattr(block, name, None) for block in blocks for name in ("attn", "mlp")]
    return [part for part in parts if isinstance(part, nn.Module)]
