"""Logs a person reads later: the batch-log step line, no misleading teacher notice, ranks > 0 off rank 0's bar."""

from __future__ import annotations

import logging
import re
import sys
import time
import warnings
from pathlib import Path

import pytest

from mimscale.config import load_config
from mimscale.engine.metrics import StepLogger, format_duration

REPO = Path(__file__).resolve().parents[1]
SCALARS = {"train/loss": 0.5, "train/lr": 1e-3, "train/grad_norm": 0.1, "perf/images_per_sec": 10.0}


def test_batch_log_step_line_has_wall_clock_elapsed_and_eta(tmp_path: Path, capsys) -> None:
    logger = StepLogger(tmp_path, enabled=True, max_steps=20, start_step=10, progress=False)
    for _ in range(3):  # steps 11-13 after a resume at step 10: the rate comes from steps 12-13
        time.sleep(0.05)
        logger.advance()
    logger.log(13, 20, SCALARS)
    logger.close()
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("step 13/20 | loss 0.5000")  # the fields scripts parse stay first
    match = re.search(
        r"\| (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| elapsed (\d+):(\d\d):(\d\d) \| eta (\d+):(\d\d):(\d\d)$", line
    )
    assert match, line
    eta = int(match.group(5)) * 3600 + int(match.group(6)) * 60 + int(match.group(7))
    assert eta <= 3  # 7 steps left at ~0.05-0.4 s each (generous for a loaded machine)
    assert format_duration(3725.4) == "1:02:05" and format_duration(float("nan")) == "?"


def test_other_ranks_warnings_go_to_their_log_file_while_rank0_shows_a_bar(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "1")
    deepspeed_like = logging.getLogger("mimscale_test_rank_logger")  # a library logger with its own stdout handler
    handler = logging.StreamHandler(sys.stdout)
    deepspeed_like.addHandler(handler)
    deepspeed_like.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            logger = StepLogger(tmp_path, enabled=False, max_steps=5, start_step=0, progress=True)
            warnings.warn("rank one is unhappy", UserWarning, stacklevel=1)
            deepspeed_like.warning("library says hello from rank one")
            logger.close()
            assert warnings.showwarning is not logger.redirect._show  # restored
        deepspeed_like.warning("after close")
    finally:
        deepspeed_like.removeHandler(handler)
    captured = capsys.readouterr()
    assert "rank one is unhappy" not in captured.err + captured.out
    assert "library says hello" not in captured.err + captured.out and "after close" in captured.out
    text = (tmp_path / "logs" / "rank1.log").read_text()
    assert "UserWarning: rank one is unhappy" in text and "library says hello from rank one" in text


def test_meta_teacher_build_does_not_claim_random_weights(caplog) -> None:
    from mimscale.engine.flops import build_on_meta

    cfg = load_config(REPO / "configs" / "demo_maskdistill.yaml", [])
    import open_clip

    with caplog.at_level(logging.WARNING):
        open_clip.create_model(cfg.teacher.name, pretrained=None, device="meta", **cfg.teacher.model_args)
    assert "initialized randomly" in caplog.text  # what open_clip says on its own
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        method = build_on_meta(cfg)
    assert method.frozen_modules() and "initialized randomly" not in caplog.text


def test_wandb_only_logger_gets_step_and_eval_scalars_and_hands_its_run_id_to_checkpoints(tmp_path: Path, monkeypatch):
    from test_wandb import read_offline_run

    from mimscale.engine.metrics import WANDB_RUN_ID_KEY, saved_wandb_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)  # then the files go into the run folder
    logger = StepLogger(
        tmp_path,
        enabled=True,
        max_steps=20,
        start_step=0,
        progress=False,
        loggers=["wandb"],
        run_config={"train": {"max_steps": 20}},
    )
    logger.log(10, 20, SCALARS)
    logger.log_scalars(10, {"eval/knn_top1": 0.25})  # the in-run evaluation lands on the same step
    logger.log(20, 20, {**SCALARS, "train/loss": 0.25})
    meta = logger.checkpoint_meta()
    logger.close()
    import wandb

    wandb.teardown()  # finish() can return before W&B's service has flushed the log; a process exit waits for it
    assert not (tmp_path / "tensorboard").exists()  # tensorboard was not chosen
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    run = read_offline_run(folder)
    assert meta == {WANDB_RUN_ID_KEY: run.run_id} and run.config["train"] == {"max_steps": 20}
    assert run.history[10]["eval/knn_top1"] == 0.25 and run.history[10]["train/loss"] == 0.5
    assert run.history[20]["train/loss"] == 0.25 and run.history[20]["perf/images_per_sec"] == 10.0
    assert saved_wandb_run_id(meta) == run.run_id and saved_wandb_run_id({}) is None
    assert saved_wandb_run_id({WANDB_RUN_ID_KEY: "../../etc"}) is None  # hostile mimscale.json: a new run instead
    assert saved_wandb_run_id({WANDB_RUN_ID_KEY: ["x"]}) is None
    disabled = StepLogger(
        tmp_path / "rank1", enabled=False, max_steps=20, start_step=0, progress=False, loggers=["wandb"]
    )
    assert disabled.checkpoint_meta() == {} and not (tmp_path / "rank1").exists()  # ranks > 0 start no W&B run
    disabled.close()


def test_wandb_that_cannot_start_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "online")  # and no key anywhere: W&B refuses before any network call
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    with pytest.raises(ValueError, match=r"could not start the W&B run .*WANDB_MODE=offline"):
        StepLogger(tmp_path, enabled=True, max_steps=5, start_step=0, progress=False, loggers=["wandb"])
