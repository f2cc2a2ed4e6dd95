"""Our config -> DeepSpeed JSON, and the DeepSpeed engine around the trainable part of a method.

The JSON is always derived from mimscale's config (never kept by hand beside it) and written into the run folder for
reference. Only trainable modules enter the engine: the method's frozen teachers are not registered submodules, so
ZeRO never partitions them, the optimizer never sees them and checkpoints never store them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import torch
from torch import nn

from mimscale.config import Config
from mimscale.engine.optim import build_optimizer, build_scheduler
from mimscale.engine.precision import PRECISIONS
from mimscale.storage.atomic import atomic_write

DTYPES = {name: getattr(torch, dtype) for name, dtype in PRECISIONS.items()}


EXTENSIONS_ENV = "TORCH_EXTENSIONS_DIR"


def pin_torch_extensions_dir(environ: MutableMapping[str, str] = os.environ) -> str:
    """Give this Python environment its own torch extensions folder (unless the user chose one); returns it.

    DeepSpeed builds its CPU communication op (``deepspeed_shm_comm``) with torch's cpp_extension into
    ``~/.cache/torch_extensions/py<ver>_<cuda>/``, a folder every environment with the same Python shares: two
    environments on one machine then invalidate each other's build, and every start rebuilds it (a test suite
    took 58 min instead of ~11 so). The folder is named after a hash of ``sys.prefix``; the ranks inherit it.
    """
    if environ.get(EXTENSIONS_ENV):
        return environ[EXTENSIONS_ENV]
    cache = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    digest = hashlib.sha256(os.path.realpath(sys.prefix).encode()).hexdigest()[:12]
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    environ[EXTENSIONS_ENV] = os.path.join(cache, "torch_extensions", f"{version}-env-{digest}")
    return environ[EXTENSIONS_ENV]


def build_deepspeed_config(cfg: Config, world_size: int) -> dict:
    """The DeepSpeed JSON for this run (batch sizes, ZeRO, precision, clipping)."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage >= 1:
        zero.update({"contiguous_gradients": True, "overlap_comm": True, "reduce_bucket_size": 5e7})
    if ds.zero_stage == 3:
        # Never gather a full 16-bit copy on save: sharded checkpoints are the format; export consolidates offline.
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_prefetch_bucket_size": 5e7})
    if ds.offload_optimizer and ds.zero_stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * cfg.train.grad_accum_steps * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {
            "enabled": ds.precision == "fp16",
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        # Our AdamW is torch's (fused on GPU); DeepSpeed calls any torch optimizer "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we print our own step line
        "wall_clock_breakdown": False,
    }
    return _merge(config, ds.extra)


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_deepspeed_config(config: dict, output_dir: str | Path) -> Path:
    """The JSON for reference, replaced atomically (a link planted at its name is replaced, never written through)."""
    path = Path(output_dir) / "deepspeed_config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(config, indent=2))
    return path


def initialize_engine(
    method: nn.Module, cfg: Config, world_size: int, device: torch.device, load_universal: bool = False
):
    """Wrap the method in a DeepSpeed engine with our AdamW and schedule; returns (engine, scheduler, ds_config)."""
    import deepspeed

    ds_config = build_deepspeed_config(cfg, world_size)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    optimizer = build_optimizer(method, cfg.optim, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
    if cfg.deepspeed.zero_stage == 3:
        register_container_parameters(method)
    declare_universal_checkpoint_info(method)
    engine, _, _, scheduler = deepspeed.initialize(
        model=method, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, scheduler, ds_config


def declare_universal_checkpoint_info(model: nn.Module) -> None:
    """Let DeepSpeed store ``universal_checkpoint_info`` in every checkpoint, as Megatron-DeepSpeed clients do.

    DeepSpeed saves the module's UNIVERSAL_CHECKPOINT_INFO attribute with the model states; its plain converter
    (``python -m deepspeed.checkpoint.ds_to_universal``) refuses ZeRO-1/2 checkpoints without it unless given
    --inject_missing_state. We have no tensor or pipeline parallelism, so the info is just the format version.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    if getattr(model, UNIVERSAL_CHECKPOINT_INFO, None) is None:
        setattr(
            model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        )


def register_container_parameters(model: nn.Module) -> list[str]:
    """ZeRO-3: keep the direct parameters of container modules gathered for the whole forward and backward.

    ZeRO-3 gathers a module's parameters around that module's own forward/backward. A container's direct
    parameters can be used inside a child's forward (the student's mask_token is applied in a forward hook on
    the backbone's patch_embed), outside the region ZeRO-3 keeps them gathered; after release, autograd's shape
    check fails in backward ("size of tensor a (0)"). Removing this registration reproduces that failure in the
    2-rank ZeRO-3 tests. These tensors are small, so we register them as external parameters of the top
    module, which ZeRO-3 gathers around the method's whole step.
    """
    import deepspeed

    registered = []
    for module_name, module in model.named_modules():
        if not any(True for _ in module.children()):
            continue  # leaf modules (Linear, LayerNorm, Conv) always run through their own forward
        for param_name, param in module.named_parameters(recurse=False):
            deepspeed.zero.register_external_parameter(model, param)
            registered.append(f"{module_name}.{param_name}".lstrip("."))
    return registered


@contextlib.contextmanager
def gathered_own_parameters(module: nn.Module) -> Iterator[nn.Module]:
    """ZeRO-3: keep ``module``'s own parameters (not its children's) gathered while code calls its methods directly.

    ZeRO-3 gathers parameters in hooks around a module's ``__call__``. Code that calls a method such as
    ``backbone.forward_features(x)`` skips the backbone's hooks, so parameters it owns directly (a ViT's
    ``pos_embed``, ``cls_token``, ``reg_token``) stay partitioned (numel 0) once they exceed DeepSpeed's
    persistence threshold; children are still ``__call__``-ed and gather themselves. Read-only (no modifier
    rank); a no-op without ZeRO-3. Every rank must enter it (the gather is a collective).
    """
    own = [param for param in module.parameters(recurse=False) if hasattr(param, "ds_id")]
    if not own:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
        yield module
