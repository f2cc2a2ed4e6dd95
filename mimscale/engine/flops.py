"""FLOPs per training image, for the MFU the step line reports.

Counted by torch's FlopCounterMode on the real modules built on the meta device (no memory, no weights):
student forward x3 (forward + backward), +1 forward when blocks are recomputed under activation checkpointing,
plus the frozen teacher's forward (or RelaxMIM's no-grad target forward). Visible-only students (MaskAlign on a
ViT) are counted on the tokens they actually process.
"""

from __future__ import annotations

from mimscale.config import Config


def flops_per_image(cfg: Config) -> float:
    """FLOPs one training image costs (2 per multiply-add); divide achieved FLOP/s by peak for MFU."""
    from mimscale.plan import build_meta_models, image_flops

    return image_flops(build_meta_models(cfg), cfg).total
