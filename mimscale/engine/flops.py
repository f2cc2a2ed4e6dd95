"""FLOPs per training image, for the MFU the step line reports and for `mimscale plan`.

The method is built exactly as training builds it, on the meta device (no memory, no weights; teachers at random
init), and says itself which forwards an image costs (``MIMMethod.counted_forwards``): the trained student
(visible-only students on the tokens they keep), frozen teachers, stop-grad target views. torch's
FlopCounterMode counts each one op by op. Trained forwards count 3x (forward + backward), +1x when blocks are
recomputed under activation checkpointing; no-grad forwards count once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mimscale.config import Config
from mimscale.methods import MIMMethod, build_method
from mimscale.pipeline.masking import mask_generator_for


class _DropRandomInitNotice(logging.Filter):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" for the shape-only teacher."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def build_on_meta(cfg: Config) -> MIMMethod:
    """The method the config trains, on the meta device; teachers at random init (only their shapes matter).

    The random-init notice open_clip logs for such a teacher is dropped: during a real run with real teacher
    weights it would tell the reader the opposite of what is happening.
    """
    if cfg.teacher.kind != "none":
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, random_init=True, pretrained=""))
    notice_filter = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice_filter)  # open_clip logs through the root logger
    try:
        with torch.device("meta"):
            return build_method(cfg)
    finally:
        logging.getLogger().removeFilter(notice_filter)


def count_forward_flops(forward: Callable[[torch.Tensor], object], images: torch.Tensor) -> float:
    """FLOPs of one forward, counted op by op by torch's FlopCounterMode (works on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        forward(images)
    return float(counter.get_total_flops())


@dataclass
class FlopsPerImage:
    """Matmul/conv FLOPs per training image (2 per multiply-add), split by where they are spent."""

    trained_forward: float  # forwards with gradient (the student)
    no_grad_forward: float  # frozen teachers, stop-grad target views
    checkpointing: bool
    by_forward: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        """Trained fwd+bwd (3x fwd) + recompute (1x fwd with checkpointing) + no-grad forwards."""
        recompute = self.trained_forward if self.checkpointing else 0.0
        return 3 * self.trained_forward + recompute + self.no_grad_forward


def masked_tokens(cfg: Config, method: MIMMethod) -> int:
    """Tokens the data's mask generator masks per image (exact for every generator)."""
    return mask_generator_for(cfg, method).num_masked


def image_flops(method: MIMMethod, cfg: Config) -> FlopsPerImage:
    """FLOPs per image of every forward the method declares, at the config's image size and mask."""
    size = cfg.data.image_size
    flops = FlopsPerImage(0.0, 0.0, cfg.deepspeed.activation_checkpointing)
    for forward in method.counted_forwards(masked_tokens(cfg, method)):
        count = count_forward_flops(forward.run, torch.empty(1, 3, size, size, device="meta"))
        flops.by_forward[forward.name] = flops.by_forward.get(forward.name, 0.0) + count
        if forward.trained:
            flops.trained_forward += count
        else:
            flops.no_grad_forward += count
    return flops


def flops_per_image(cfg: Config) -> float:
    """FLOPs one training image costs (2 per multiply-add); divide achieved FLOP/s by peak for MFU."""
    return image_flops(build_on_meta(cfg), cfg).total
