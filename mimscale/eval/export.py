"""`mimscale export`: a training checkpoint -> a timm model folder anyone can load without mimscale.

    OUT/model.safetensors   the student backbone (plain timm keys; mask token and MIM head stripped)
    OUT/config.json         architecture, num_classes=0, model_args (img_size, patch_size, ...), pretrained_cfg

so that ``timm.create_model("local-dir:OUT", pretrained=True)`` rebuilds the pretrained backbone. The weights are
the fp32 master weights (engine.checkpoint.load_fp32_state: ZeRO 1-3 shards merged, ZeRO-0 bf16 runs keep them in the
optimizer's fp32 groups), never the bf16 copy the forward pass used.

The same loaders serve the evaluation commands: ``resolve_model_spec(spec)`` is the one reading of ``--model`` (an
exported folder, a run or checkpoint folder, or ``random:<config.yaml | run folder>``: the same architecture at
random init, the baseline) for probe, finetune and analyze; ``load_backbone(spec)`` loads what it names.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimscale.config import Config, from_dict, load_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine.ckpt_meta import refuse_weight_loading_args
from mimscale.engine.safe_load import add_trust_argument, trust_decision
from mimscale.models.students import Student, build_student

STUDENT_PREFIX = "student."
BACKBONE_PREFIX = "student.backbone."


@dataclass
class LoadedBackbone:
    """A timm backbone plus what evaluation needs to feed it: input size and normalisation."""

    model: nn.Module
    image_size: int
    mean: list[float]
    std: list[float]
    source: str


def _exact_frozen_pos_embed(student: Student, student_state: dict, cfg: Config, tag_dir: Path) -> dict:
    """A sincos_frozen table in exact fp32: the checkpoint holds it in the training precision (bf16 rounds it
    by up to ~4e-3) since no optimizer keeps a master of a frozen parameter. Checked against the saved copy."""
    name = "backbone.pos_embed"
    if cfg.model.pos_embed_init != "sincos_frozen" or name not in student_state:
        return {}
    exact = student.backbone.pos_embed.detach().float()
    saved = student_state[name]
    if tuple(saved.shape) != tuple(exact.shape) or not torch.allclose(saved.float(), exact, atol=1e-2):
        raise ValueError(
            f"{tag_dir}: the saved position table is not the fixed sin-cos table model.pos_embed_init "
            "=sincos_frozen promises; was it written by another mimscale version?"
        )
    return {name: exact.clone()}


def load_student(
    path: str | Path, tag: str | None = None, *, trusted: bool = False
) -> tuple[Student, Config, dict, dict]:
    """Rebuild the trained student from a checkpoint: (student, config, metadata, full fp32 method state).

    ``trusted`` (the command's safe_load.trust_decision) loads its pickles without the weights-only allowlist."""
    tag_dir = ckpt.checkpoint_dir(Path(path), tag, trusted=trusted)
    meta, state = ckpt.load_fp32_state(tag_dir, trusted=trusted)
    refuse_weight_loading_args(meta["config"], str(tag_dir / ckpt.MARKER))  # the model is built from it below
    cfg = from_dict(meta["config"])
    torch.manual_seed(cfg.run.seed)
    student = build_student(cfg)
    student_state = {k[len(STUDENT_PREFIX) :]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
    fixed_table = _exact_frozen_pos_embed(student, student_state, cfg, tag_dir)
    missing, unexpected = student.load_state_dict({**student_state, **fixed_table}, strict=False)
    persistent = set(student.state_dict())
    missing = [k for k in missing if k in persistent]
    if missing or unexpected:
        raise ValueError(
            f"{tag_dir} does not fit model.student={cfg.model.student}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; was the checkpoint written by another mimscale version?"
        )
    meta["tag_dir"] = str(tag_dir)
    return student.eval(), cfg, meta, state


# Fields of timm's default pretrained_cfg that describe where the original weights came from or the resolution they
# were evaluated at; an export is neither, so they are left out.
PROVENANCE_FIELDS = (
    "url",
    "file",
    "state_dict",
    "hf_hub_id",
    "hf_hub_filename",
    "source",
    "tag",
    "custom_load",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
    "label_offset",
    "label_names",
    "label_descriptions",
    "test_input_size",
    "test_crop_pct",
    "test_pool_size",
    "min_input_size",
)


def default_pretrained_cfg(architecture: str) -> dict:
    """timm's own default pretrained_cfg for the architecture (its default tag), provenance fields removed."""
    from timm.models import get_pretrained_cfg

    found = get_pretrained_cfg(architecture)
    if found is None:
        raise ValueError(
            f"timm has no default config for {architecture!r}, so the export cannot say which module is its "
            "classifier; use an architecture name from timm.list_models()"
        )
    return {key: value for key, value in found.to_dict().items() if key not in PROVENANCE_FIELDS}


def timm_config(cfg: Config) -> dict:
    """config.json for timm's local-dir loader: enough to rebuild the backbone exactly as training built it.

    pretrained_cfg is timm's default for the architecture (``classifier``, ``first_conv``, crop and interpolation,
    so that ``timm.create_model('local-dir:OUT', pretrained=True, num_classes=N)`` drops the absent head and
    fine-tunes), with what training decided written over it: input size, normalisation, num_classes=0.
    """
    model_args = {"img_size": cfg.data.image_size, **cfg.model.student_args}
    size = cfg.data.image_size
    pretrained_cfg = default_pretrained_cfg(cfg.model.student)
    default_size = pretrained_cfg.get("input_size", (3, size, size))[-1]
    if pretrained_cfg.get("pool_size"):  # the final feature map scales with the input (Swin: size / 32)
        pretrained_cfg["pool_size"] = [max(1, p * size // default_size) for p in pretrained_cfg["pool_size"]]
    pretrained_cfg.update(
        {"input_size": [3, size, size], "mean": list(cfg.data.mean), "std": list(cfg.data.std), "num_classes": 0}
    )
    return {
        "architecture": cfg.model.student,
        "num_classes": 0,
        "num_features": None,
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def export_checkpoint(
    path: str | Path, out_dir: str | Path, *, tag: str | None = None, with_head: bool = False, trusted: bool = False
) -> Path:
    """Write OUT/model.safetensors + OUT/config.json (and OUT/mim_model.safetensors with ``with_head``)."""
    from safetensors.torch import save_file

    student, cfg, meta, state = load_student(path, tag, trusted=trusted)
    source = {"checkpoint": meta["tag_dir"], "step": meta["step"], "method": cfg.method.name}
    out_dir = write_export(student.backbone, cfg, out_dir, source)
    if with_head:
        save_file(_contiguous(state), str(out_dir / "mim_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def write_export(backbone: nn.Module, cfg: Config, out_dir: str | Path, source: dict) -> Path:
    """OUT/model.safetensors (the backbone's state) + OUT/config.json (timm_config plus ``mimscale`` provenance)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = timm_config(cfg)
    config["num_features"] = int(backbone.num_features)
    save_file(_contiguous(backbone.state_dict()), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
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
        cfg = load_config(path, list(overrides))
        refuse_weight_loading_args(cfg.to_dict(), str(path))  # a run folder's stored config, not the user's own
        return cfg
    return load_config(path, list(overrides))


@dataclass(frozen=True)
class ModelSpec:
    """What a ``--model`` argument names, resolved once for probe, finetune, analyze and the benches alike.

    ``kind``: ``export`` (a folder with config.json + model.safetensors, loaded through timm), ``checkpoint`` (a run,
    its checkpoints/ folder or a step_* folder) or ``random`` (``random:<config.yaml | run folder>``, the same
    architecture at random init). ``overrides`` (``--set``) are kept for ``random`` only.
    """

    text: str
    kind: str
    path: Path
    overrides: tuple[str, ...] = ()
    trusted: bool = False  # the command's safe_load.trust_decision, for a checkpoint's pickles

    def config(self) -> Config:
        """The mimscale config of a checkpoint or a random twin (an export has none: its config.json is timm's)."""
        if self.kind == "random":
            return random_init_config(str(self.path), self.overrides)
        if self.kind == "checkpoint":
            return from_dict(ckpt.read_meta(ckpt.checkpoint_dir(self.path, trusted=self.trusted))["config"])
        raise ValueError(f"{self.text} is a timm export: it has no mimscale config")


def resolve_model_spec(spec: str, overrides: Sequence[str] = (), *, trusted: bool = False) -> ModelSpec:
    """The one reading of ``--model``; ``--set`` overrides on anything but ``random:`` are refused here. ``trusted``
    travels with the spec to whatever loads a checkpoint it names."""
    if spec.startswith("random:"):
        return ModelSpec(spec, "random", Path(spec[len("random:") :]), tuple(overrides))
    if overrides:
        raise ValueError(
            f"--set only applies to random:<config> models; {spec} keeps its trained architecture "
            f"(drop --set {' '.join(overrides)})"
        )
    path = Path(spec)
    is_export = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return ModelSpec(spec, "export" if is_export else "checkpoint", path, trusted=trusted)


def input_settings(spec: ModelSpec) -> dict:
    """Input size and normalisation the backbone was trained with, read from its config (no weights loaded)."""
    if spec.kind != "export":
        data = spec.config().data
        return {"image_size": data.image_size, "mean": list(data.mean), "std": list(data.std)}
    path = spec.path / "config.json"
    if path.stat().st_size > 1 << 20:
        raise ValueError(f"{path} is over 1 MiB: not a timm config.json (re-export with `mimscale export`)")
    try:
        pcfg = json.loads(path.read_text())["pretrained_cfg"]
        return {"image_size": int(pcfg["input_size"][-1]), "mean": list(pcfg["mean"]), "std": list(pcfg["std"])}
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{path} has no usable pretrained_cfg ({err!r}); re-export with `mimscale export`") from err


def student_backbone(spec: ModelSpec) -> tuple[nn.Module, Config]:
    """The trained backbone of a checkpoint, or the random twin `mimscale train` would start from (seeded with
    run.seed), with its config; an export is loaded through timm instead (``load_backbone``)."""
    if spec.kind == "random":
        cfg = spec.config()
        torch.manual_seed(cfg.run.seed)
        return build_student(cfg).backbone, cfg
    if spec.kind == "checkpoint":
        student, cfg, _, _ = load_student(spec.path, trusted=spec.trusted)
        return student.backbone, cfg
    raise ValueError(f"{spec.text} is a timm export, not a mimscale checkpoint")


def load_backbone(spec: str, overrides: Sequence[str] = (), *, trusted: bool = False) -> LoadedBackbone:
    """An exported folder, a run/checkpoint folder, or ``random:<config.yaml | run folder>`` -> backbone in eval mode.

    ``overrides`` (``section.key=value``, as ``--set``) apply to ``random:`` specs only: trained models keep the
    architecture they were trained with.
    """
    resolved = resolve_model_spec(spec, overrides, trusted=trusted)
    if resolved.kind == "export":
        import timm

        model = timm.create_model(f"local-dir:{resolved.path}", pretrained=True).eval()
        data_cfg = model.pretrained_cfg
        return LoadedBackbone(
            model, int(data_cfg["input_size"][-1]), list(data_cfg["mean"]), list(data_cfg["std"]), spec
        )
    backbone, cfg = student_backbone(resolved)
    return LoadedBackbone(backbone.eval(), cfg.data.image_size, list(cfg.data.mean), list(cfg.data.std), spec)


def run_export(args: argparse.Namespace) -> int:
    out_dir = export_checkpoint(
        args.checkpoint, args.out_dir, tag=args.tag, with_head=args.with_head, trusted=trust_decision(args)
    )
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
    add_trust_argument(parser)
    parser.set_defaults(func=run_export)
