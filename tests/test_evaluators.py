"""Evaluators register in one table: `mimscale eval <name>` runs any of them, and the in-run monitor is picked by
name from the config (eval.monitor), with eval.knn_every as its cadence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm

from mimscale.cli import main as cli_main
from mimscale.config import ConfigError, load_config
from mimscale.eval.evaluators import EVALUATORS, MONITORS, in_run_monitors, resolve

REPO = Path(__file__).resolve().parents[1]
VAL = str(REPO / "shards/sample-val/*.tar")


def monitor_cfg(*overrides: str):
    return load_config(
        None,
        ["data.image_size=32", "data.batch_size=16", f"eval.train_shards={VAL}", f"eval.val_shards={VAL}", *overrides],
    )


def test_every_entry_resolves_and_the_cli_offers_each_one():
    for name, evaluator in EVALUATORS.items():
        assert callable(resolve(evaluator.run)), name
        assert not evaluator.monitor or callable(resolve(evaluator.monitor)), name
    assert set(MONITORS) == {"knn", "linear"}  # finetune is too costly to run inside training


def test_the_in_run_monitor_is_chosen_by_name_and_off_without_a_cadence():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1)
    assert in_run_monitors(monitor_cfg("eval.knn_every=0")) == []
    (knn,) = in_run_monitors(monitor_cfg("eval.knn_every=5"))  # the default monitor stays kNN
    assert set(knn(model)) == {"eval/knn_top1"}
    (linear,) = in_run_monitors(monitor_cfg("eval.knn_every=5", "eval.monitor=linear"))
    result = linear(model)
    assert set(result) == {"eval/linear_top1"} and 0.0 <= result["eval/linear_top1"] <= 1.0
    with pytest.raises(ConfigError, match="eval.monitor='finetune' is not valid; choose one of knn, linear"):
        monitor_cfg("eval.knn_every=5", "eval.monitor=finetune")


def test_eval_linear_runs_through_the_registry(tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text("model:\n  student_args: {depth: 1}\ndata:\n  image_size: 32\n")
    data = ["--train", VAL, "--val", VAL, "--batch-size", "32", "--epochs", "2"]
    assert cli_main(["eval", "linear", "--model", f"random:{config}", "--json", *data]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["protocol"] == "linear" and 0.0 <= result["top1"] <= 1.0 and "weight_decay" in result
