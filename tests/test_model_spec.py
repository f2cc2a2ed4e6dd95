"""One reading of ``--model`` (eval/export.resolve_model_spec) serves probe, analyze, export's loader and finetune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimscale.eval.export import input_settings, load_backbone, resolve_model_spec, write_export
from mimscale.eval.finetune import build_classifier

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo_cpu.yaml"


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    config = tmp_path / "tiny.yaml"
    config.write_text(f"base: {DEMO}\ndata:\n  image_size: 32\nmodel:\n  student_args: {{patch_size: 8, depth: 1}}\n")
    return config


def test_each_spec_is_read_once_the_same_way(tmp_path: Path, tiny_config: Path) -> None:
    random = resolve_model_spec(f"random:{tiny_config}", ["data.image_size=48"])
    assert (random.kind, random.path, random.overrides) == ("random", tiny_config, ("data.image_size=48",))
    assert input_settings(random)["image_size"] == 48  # --set reaches the twin's config
    assert resolve_model_spec(str(tmp_path / "run")).kind == "checkpoint"
    with pytest.raises(ValueError, match=r"--set only applies to random:<config> models; .*\(drop --set a=1 b=2\)"):
        resolve_model_spec(str(tmp_path / "run"), ["a=1", "b=2"])

    backbone = load_backbone(f"random:{tiny_config}").model
    export = tmp_path / "export"
    cfg = resolve_model_spec(f"random:{tiny_config}").config()
    write_export(backbone, cfg, export, {"test": "model_spec"})
    spec = resolve_model_spec(str(export))
    assert spec.kind == "export"
    assert input_settings(spec) == {"image_size": 32, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    with pytest.raises(ValueError, match="is a timm export: it has no mimscale config"):
        spec.config()


def test_finetune_starts_from_the_twin_probe_loads_and_keeps_the_callers_rng(tiny_config: Path) -> None:
    import timm

    twin = load_backbone(f"random:{tiny_config}").model.state_dict()
    cfg = resolve_model_spec(f"random:{tiny_config}").config()
    torch.manual_seed(123)
    plain = timm.create_model(cfg.model.student, img_size=32, **cfg.model.student_args, num_classes=5)
    torch.manual_seed(123)
    classifier = build_classifier(f"random:{tiny_config}", 5, drop_path=0.0)
    weights = classifier.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in twin.items())
    # the twin's seeding does not leak into the new head: it is drawn from the caller's seed
    assert torch.equal(weights["head.weight"], plain.state_dict()["head.weight"])
