"""AdamW parameter groups and the warmup + cosine schedule (SimMIM / EVA recipe)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

# Parameters that are embeddings, learned tokens or mixing coefficients rather than weights: decaying them hurts
# (SimMIM, BEiT, timm). "head.mixing" is MaskAlign's Dynamic Alignment level mixing (models/heads.py), which the
# reference keeps out of weight decay as ``distill_weights``. The rule depends on names and shapes only, so export
# can rebuild the optimizer groups from a checkpoint's state dict.
NO_DECAY_KEYWORDS = (
    "mask_token",
    "cls_token",
    "reg_token",
    "dist_token",
    "pos_embed",
    "absolute_pos_embed",
    "relative_position_bias_table",
    "logit_scale",
    "cpb_mlp",
    "head.mixing",
)


def wants_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Weight decay for matrices and convolutions only: not norms, biases, tokens or position tables."""
    if param.ndim <= 1 or name.endswith(".bias"):
        return False
    return not any(keyword in name for keyword in NO_DECAY_KEYWORDS)


def decay_split(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[list[str], list[str]]:
    """Parameter names in the optimizer's group order: (weight-decayed, not decayed), each in the given order.

    The one definition of the group order: training builds its groups from it, and reading a ZeRO-0
    checkpoint's fp32 masters (engine/checkpoint.py) maps the saved groups back to names with it.
    """
    decay, no_decay = [], []
    for name, param in named:
        (decay if wants_weight_decay(name, param) else no_decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    params = {name: param for name, param in model.named_parameters() if param.requires_grad}
    decay, no_decay = decay_split(params.items())
    groups = [
        {"params": [params[n] for n in decay], "weight_decay": weight_decay},
        {"params": [params[n] for n in no_decay], "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def warmup_cosine(step: int, *, base_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for the optimizer step about to be taken (``step`` steps already done)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, optim_cfg, *, fused: bool) -> torch.optim.Optimizer:
    """torch AdamW over the trainable parameters; ``fused`` uses the single-kernel CUDA implementation."""
    kwargs = {"fused": True} if fused else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, optim_cfg.weight_decay),
        lr=optim_cfg.lr,
        betas=tuple(optim_cfg.betas),
        eps=optim_cfg.eps,
        **kwargs,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg, max_steps: int):
    def multiplier(step: int) -> float:
        lr = warmup_cosine(
            step,
            base_lr=optim_cfg.lr,
            min_lr=optim_cfg.min_lr,
            warmup_steps=optim_cfg.warmup_steps,
            max_steps=max_steps,
        )
        return lr / optim_cfg.lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def torch_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's wrappers (ZeRO, BF16_Optimizer keep it as ``.optimizer``)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"no torch optimizer inside {type(optimizer).__name__}")
    return optimizer


def restore_adamw_implementation(optimizer, *, fused: bool) -> int:
    """After loading optimizer state: put back our fused/foreach choice and the step tensors fused AdamW needs.

    Loading a state dict copies the saved param groups' ``fused``/``foreach`` flags (torch's load_state_dict and
    DeepSpeed's universal load alike), so a checkpoint written on CPU (foreach) would turn a GPU run to foreach
    silently, and one written on GPU would ask a CPU run for fused. DeepSpeed's universal load also leaves each
    ``state['step']`` a CPU tensor, while the fused kernel reads it on the parameter's device. Returns how many
    step tensors were moved.
    """
    inner = torch_optimizer(optimizer)
    moved = 0
    for group in inner.param_groups:
        group["fused"], group["foreach"] = (True, None) if fused else (None, True)
        for param in group["params"]:
            state = inner.state.get(param, {})
            step = state.get("step")
            if step is None:
                continue
            device = param.device if fused or group.get("capturable") else torch.device("cpu")
            step = torch.as_tensor(step, dtype=torch.float32)
            if step.device != device:
                moved += 1
            state["step"] = step.to(device)
    return moved
