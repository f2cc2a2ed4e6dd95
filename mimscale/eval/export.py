"""`mimscale export`: a training checkpoint -> a timm model folder anyone can load without mimscale.

    OUT/model.safetensors   the student backbone (plain timm keys; mask token and MIM head stripped)
    OUT/config.json         architecture, num_classes=0, model_args (img_size, patch_size, ...), pretrained_cfg

so that ``timm.create_model("local-dir:OUT", pretrained=True)`` rebuilds the pretrained backbone. The weights are
the fp32 master weights (ZeRO 1-3 shards merged by DeepSpeed's zero_to_fp32; ZeRO-0 bf16 runs keep them in the
optimizer's fp32 groups), never the bf16 copy the forward pass used.

The same loaders serve the evaluation commands: ``load_backbone(spec)`` accepts an exported folder, a run or
checkpoint folder, or ``random:<config.yaml | run folder>`` (the same architecture at random init, the baseline).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimscale.config import Config, from_dict, load_config
from mimscale.engine import checkpoint as ckpt
from mimscale.models.students import Student, build_student

STUDENT_PREFIX = "student."
BACKBONE_PREFIX = "student.backbone."
ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"


@dataclass
class LoadedBackbone:
    """A timm backbone plus what evaluation needs to feed it: input size and normalisation."""

    model: nn.Module
    image_size: int
    mean: list[float]
    std: list[float]
    source: str


def find_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The checkpoint folder to read: ``tag`` inside a run/checkpoints folder, or the newest complete one."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist; give a run folder or a step_* folder")
    if tag is None:
        return ckpt.resolve_checkpoint(path)
    for root in (path, path / "checkpoints"):
        if (root / tag).is_dir():
            tag_dir = root / tag
            if not ckpt.is_complete(tag_dir):
                raise FileNotFoundError(
                    f"{tag_dir} is incomplete ({ckpt.MARKER} is missing): the run died while writing it; "
                    "pick another --tag or leave it out for the newest complete checkpoint"
                )
            return tag_dir
    tags = [p.name for p in ckpt.list_checkpoints(path / "checkpoints") or ckpt.list_checkpoints(path)]
    raise FileNotFoundError(f"no checkpoint {tag} under {path}; available: {', '.join(tags) or 'none'}")


def _zero0_fp32_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module weights, replaced by the optimizer's fp32 masters when training ran in bf16/fp16."""
    from mimscale.engine.optim import wants_weight_decay

    saved = torch.load(tag_dir / ZERO0_MODEL_FILE, map_location="cpu", weights_only=False)
    module: dict[str, torch.Tensor] = dict(saved["module"])
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if all(t.dtype == torch.float32 for t in module.values()):
        return dict(module)
    if not fp32_groups:
        print(
            f"note: {tag_dir} holds no fp32 master weights; exporting its low-precision weights as fp32",
            file=sys.stderr,
        )
        return {name: tensor.float() for name, tensor in module.items()}
    buffers = set(saved.get("buffer_names") or [])
    params = [name for name in module if name not in buffers]
    # The engine's optimizer groups are (decay, no-decay) in named_parameters order; empty groups are dropped.
    groups = [
        [n for n in params if wants_weight_decay(n, module[n])],
        [n for n in params if not wants_weight_decay(n, module[n])],
    ]
    groups = [group for group in groups if group]
    if [len(g) for g in groups] != [len(g) for g in fp32_groups]:
        raise ValueError(f"{tag_dir}: the fp32 optimizer groups do not match the module's parameters")
    state = {name: tensor.float() for name, tensor in module.items()}
    for names, masters in zip(groups, fp32_groups, strict=True):
        for name, master in zip(names, masters, strict=True):
            if tuple(master.shape) != tuple(module[name].shape):
                raise ValueError(f"{tag_dir}: fp32 master of {name} has shape {tuple(master.shape)}")
            state[name] = master.detach().float().clone()
    return state


def load_fp32_state(tag_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(mimscale.json metadata, fp32 state dict of the whole method: ``student.*`` and ``head.*``)."""
    meta = ckpt.read_meta(tag_dir)
    if meta.get("zero_stage", 0) == 0:
        return meta, _zero0_fp32_state(tag_dir)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatty
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return meta, {name: tensor.float() for name, tensor in state.items()}


def load_student(path: str | Path, tag: str | None = None) -> tuple[Student, Config, dict, dict]:
    """Rebuild the trained student from a checkpoint: (student, config, metadata, full fp32 method state)."""
    tag_dir = find_tag_dir(path, tag)
    meta, state = load_fp32_state(tag_dir)
    cfg = from_dict(meta["config"])
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg)
    student_state = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    missing, unexpected = student.load_state_dict(student_state, strict=False)
    persistent = set(student.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise ValueError(
            f"{tag_dir} does not fit model.student={cfg.model.student}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was the checkpoint written by another mimscale version?"
        )
    meta["tag_dir"] = str(tag_dir)
    return student.eval(), cfg, meta, state


def timm_config(cfg: Config) -> dict:
    """config.json for timm's local-dir loader: enough to rebuild the backbone exactly as training built it."""
    model_args = {"img_size": cfg.data.image_size, **cfg.model.student_args}
    size = cfg.data.image_size
    return {
        "architecture": cfg.model.student,
        "num_classes": 0,
        "num_features": None,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 0.875,
            "crop_mode": "center",
            "mean": list(cfg.data.mean),
            "std": list(cfg.data.std),
            "num_classes": 0,
            "first_conv": "patch_embed.proj",
        },
    }


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def export_checkpoint(
    path: str | Path, out_dir: str | Path, *, tag: str | None = None, with_head: bool = False
) -> Path:
    """Write OUT/model.safetensors + OUT/config.json (and OUT/mim_model.safetensors with ``with_head``)."""
    from safetensors.torch import save_file

    student, cfg, meta, state = load_student(path, tag)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = timm_config(cfg)
    config["num_features"] = int(student.num_features)
    source = {"checkpoint": meta["tag_dir"], "step": meta["step"], "method": cfg.method.name}
    save_file(_contiguous(student.backbone.state_dict()), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    if with_head:
        save_file(_contiguous(state), str(out_dir / "mim_model.safetensors"), metadata={"format": "pt"})
    config["mimscale"] = source
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def random_init_config(target: str, overrides: Sequence[str] = ()) -> Config:
    """The config of ``random:<target>``: a config YAML, or a run folder (its resolved ``config.yaml``)."""
    path = Path(target)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise FileNotFoundError(
                f"random:{target}: the folder has no config.yaml; give a config file or a run folder "
                "(`mimscale train` writes the resolved config.yaml into its run.output_dir)"
            )
        path = path / "config.yaml"
    return load_config(path, list(overrides))


def load_backbone(spec: str, overrides: Sequence[str] = ()) -> LoadedBackbone:
    """An exported folder, a run/checkpoint folder, or ``random:<config.yaml | run folder>`` -> backbone in eval mode.

    ``overrides`` (``section.key=value``, as ``--set``) apply to ``random:`` specs only: trained models keep the
    architecture they were trained with.
    """
    if spec.startswith("random:"):
        cfg = random_init_config(spec[len("random:") :], overrides)
        torch.manual_seed(cfg.run.seed)
        backbone = build_student(cfg).backbone.eval()
        return LoadedBackbone(backbone, cfg.data.image_size, list(cfg.data.mean), list(cfg.data.std), spec)
    if overrides:
        raise ValueError(
            f"--set {' '.join(overrides)} only applies to random:<config> models; {spec} keeps its trained architecture"
        )
    path = Path(spec)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        import timm

        model = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
        data_cfg = model.pretrained_cfg
        return LoadedBackbone(
            model, int(data_cfg["input_size"][-1]), list(data_cfg["mean"]), list(data_cfg["std"]), spec
        )
    student, cfg, _, _ = load_student(path)
    return LoadedBackbone(student.backbone, cfg.data.image_size, list(cfg.data.mean), list(cfg.data.std), spec)


def run_export(args: argparse.Namespace) -> int:
    out_dir = export_checkpoint(args.checkpoint, args.out_dir, tag=args.tag, with_head=args.with_head)
    print(f"exported {out_dir}: load it with timm.create_model('local-dir:{out_dir}', pretrained=True)")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="checkpoint -> timm model folder (model.safetensors + config.json)")
    parser.add_argument("checkpoint", help="run folder, its checkpoints/ folder or a step_* folder")
    parser.add_argument("out_dir", help="folder to write model.safetensors and config.json into")
    parser.add_argument("--tag", help="checkpoint tag (step_00000100); default: the newest complete one")
    parser.add_argument(
        "--with-head", action="store_true", help="also write the whole MIM model (mim_model.safetensors)"
    )
    parser.set_defaults(func=run_export)
