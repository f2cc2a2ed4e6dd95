"""Weights & Biases beside TensorBoard: a real single-process run in W&B's offline mode, its transaction log read
back record by record, a resume that continues the same W&B run, and the error when the package is missing."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_train_e2e import DEMO, REPO, env_with, ok, overrides, scalars, train_single

from mimscale.config import ConfigError, load_config

LOGGERS = "train.loggers=[tensorboard, wandb]"
BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of checksummed chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(path: Path):
    """Every protobuf Record of a run's .wandb transaction log, each chunk's CRC checked as W&B writes it."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<HB", data[4:7]) == (0xBEE1, 0), data[:7]
    position, pending = 7, b""
    while position + 7 <= len(data):
        if BLOCK - position % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            position += BLOCK - position % BLOCK
            continue
        checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0 and length == 0:  # zero fill at the end of the last block
            break
        chunk = data[position + 7 : position + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, f"{path}: bad chunk at {position}"
        assert kind in (FULL, FIRST, MIDDLE, LAST)
        position += 7 + length
        pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


@dataclass
class OfflineRun:
    run_id: str = ""
    config: dict = field(default_factory=dict)
    history: dict[int, dict[str, float]] = field(default_factory=dict)


def read_offline_run(folder: Path) -> OfflineRun:
    """The run id, config and per-step history an offline run folder (offline-run-<time>-<id>) holds."""
    (log,) = folder.glob("run-*.wandb")
    run = OfflineRun()

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            run.config.update({key(item): json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run.config.update({key(item): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {key(item): json.loads(item.value_json) for item in record.history.item}
            run.history.setdefault(int(row["_step"]), {}).update(row)
    return run


@pytest.mark.slow
def test_wandb_gets_the_tensorboard_scalars_and_config_and_a_resume_continues_the_run(tmp_path: Path) -> None:
    run_dir, wandb_dir = tmp_path / "run", tmp_path / "wandb_dir"
    env = env_with(WANDB_MODE="offline", WANDB_DIR=str(wandb_dir), WANDB_PROJECT="mimscale-test")
    ok(train_single(*overrides(run_dir, "train.max_steps=4", "checkpoint.keep_last=1", LOGGERS), env=env))
    (first_folder,) = (wandb_dir / "wandb").glob("offline-run-*")
    first = read_offline_run(first_folder)
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "mimscale.json").read_text())
    assert first.run_id and meta["wandb_run_id"] == first.run_id and first_folder.name.endswith(first.run_id)

    assert sorted(first.history) == [1, 2, 3, 4]
    for name in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec", "data/sample_id_sum"):
        logged = {step: row[name] for step, row in first.history.items()}
        assert logged == pytest.approx(scalars(run_dir, name), rel=1e-6), name  # TensorBoard stores float32
    assert first.config["train"]["max_steps"] == 4 and first.config["train"]["loggers"] == ["tensorboard", "wandb"]
    assert first.config["model"]["student_args"] == {"patch_size": 8, "depth": 2}
    assert first.config["run"]["output_dir"] == str(run_dir)  # the resolved config, not the YAML file

    ok(train_single(*overrides(run_dir, "train.max_steps=6", "checkpoint.keep_last=1", LOGGERS), env=env))
    (second_folder,) = set((wandb_dir / "wandb").glob("offline-run-*")) - {first_folder}
    second = read_offline_run(second_folder)
    assert second.run_id == first.run_id  # the same W&B run continues
    assert sorted(second.history) == [5, 6] and second.config["train"]["max_steps"] == 6
    resumed_meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "mimscale.json").read_text())
    assert resumed_meta["wandb_run_id"] == first.run_id
    assert sorted(scalars(run_dir, "train/loss")) == [1, 2, 3, 4, 5, 6]  # TensorBoard unchanged beside it


def test_wandb_without_the_package_is_a_clear_error_before_training(tmp_path: Path) -> None:
    hide_wandb = "import sys; sys.modules['wandb'] = None; from mimscale.cli import main; sys.exit(main(sys.argv[1:]))"
    args = ["train", "--config", str(DEMO), *overrides(tmp_path / "run", "train.loggers=[wandb]")]
    done = subprocess.run(
        [sys.executable, "-c", hide_wandb, *args], cwd=REPO, env=env_with(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "train.loggers includes wandb but the wandb package is not installed" in done.stderr
    assert "pip install 'mimscale[wandb]'" in done.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_loggers_key_names_the_choices() -> None:
    assert load_config(None, []).train.loggers == ["tensorboard"]
    with pytest.raises(
        ConfigError, match=r"train\.loggers item 'neptune' is not a logger; choose from tensorboard, wan"
    ):
        load_config(None, ["train.loggers=[tensorboard, neptune]"])
    with pytest.raises(ConfigError, match=r"train\.loggers must be a list"):
        load_config(None, ["train.loggers=[]"])
