"""Links planted in the run folder are never written, read or deleted through (issue 20, section 1).

Every path mimscale creates, replaces or deletes under the run folder and the checkpoint folder is opened without
following links; anything a file we read names must resolve inside the checkpoint. Each test plants what an
attacker (or an accident) would, and checks that the file the link points to is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mimscale.config import load_config, save_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine.deepspeed import write_deepspeed_config
from mimscale.engine.runlock import LOCK_NAME, RunLock, UnsafeLockFileError
from mimscale.engine.slurm import write_requeue_marker

REPO = Path(__file__).resolve().parents[1]
PRECIOUS = "the user's own file: must survive\n"


def precious(folder: Path, name: str = "precious.txt") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(PRECIOUS)
    return path


def test_a_lock_file_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    target = precious(tmp_path / "outside")
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK_NAME).symlink_to(target)
    with pytest.raises(UnsafeLockFileError, match=f"{LOCK_NAME} is a symbolic link.*Remove it"):
        RunLock(run).acquire()
    assert target.read_text() == PRECIOUS


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_lock_file_that_is_a_fifo_or_folder_is_a_clear_error(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / LOCK_NAME) if kind == "fifo" else (run / LOCK_NAME).mkdir()
    expected = r"a FIFO \(named pipe\)" if kind == "fifo" else "a folder"
    with pytest.raises(UnsafeLockFileError, match=f"is {expected}, not the regular lock file"):
        RunLock(run).acquire()


@pytest.mark.slow
def test_train_with_a_fifo_lock_exits_2_naming_it_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / LOCK_NAME)
    command = [
        sys.executable,
        "-m",
        "mimscale.cli",
        "train",
        "--config",
        str(REPO / "configs" / "demo_cpu.yaml"),
        "--set",
        f"run.output_dir={run}",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"{LOCK_NAME} is a FIFO (named pipe)" in result.stderr and "Traceback" not in result.stderr


def test_config_and_deepspeed_json_replace_planted_links_instead_of_writing_through(tmp_path):
    outside = tmp_path / "outside"
    run = tmp_path / "run"
    run.mkdir()
    names = ["config.yaml", "config.yaml.tmp", "deepspeed_config.json", "deepspeed_config.json.tmp"]
    targets = {name: precious(outside, name) for name in names}
    for name, target in targets.items():
        (run / name).symlink_to(target)
    cfg = load_config(None, [f"run.output_dir={run}"])
    save_config(cfg, run / "config.yaml")
    write_deepspeed_config({"train_batch_size": 4}, run)
    assert all(target.read_text() == PRECIOUS for target in targets.values())
    for name in ("config.yaml", "deepspeed_config.json"):
        assert not (run / name).is_symlink() and (run / name).is_file()
    assert load_config(run / "config.yaml").run.output_dir == str(run)


def test_the_requeue_marker_is_never_written_through_a_link(tmp_path, monkeypatch):
    marker = tmp_path / "logs" / "requeue-7"
    marker.parent.mkdir()
    targets = [precious(tmp_path / "outside", "a"), precious(tmp_path / "outside", "b")]
    marker.symlink_to(targets[0])
    marker.with_name(marker.name + ".tmp").symlink_to(targets[1])
    monkeypatch.setenv("MIMSCALE_REQUEUE_MARKER", str(marker))
    write_requeue_marker(tmp_path / "step_00000003")
    assert [target.read_text() for target in targets] == [PRECIOUS, PRECIOUS]
    assert not marker.is_symlink() and marker.read_text().strip() == str(tmp_path / "step_00000003")


def _checkpoint(root: Path, step: int) -> Path:
    tag_dir = root / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, tag_dir / "mp_rank_00_model_states.pt")
    meta = {"step": step, "samples_seen": 8 * step, "world_size": 1, "zero_stage": 0, "data_state": {}, "config": {}}
    meta["files"] = ckpt._record_files(tag_dir, rank=0, world_size=1)
    (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    return tag_dir


def test_pruning_never_deletes_through_a_linked_step_folder(tmp_path):
    root = tmp_path / "checkpoints"
    outside = tmp_path / "elsewhere"
    record = precious(outside, ckpt.MARKER)
    data = precious(outside, "data.bin")
    for step in (2, 3, 4):
        _checkpoint(root, step)
    (root / ckpt.tag_for_step(1)).symlink_to(outside, target_is_directory=True)
    removed = ckpt.prune_checkpoints(root, keep_last=1, keep_every=0)
    assert sorted(path.name for path in removed) == ["step_00000002", "step_00000003"]
    assert record.read_text() == PRECIOUS and data.read_text() == PRECIOUS
    messages = []
    assert ckpt.find_resume_checkpoint(root, log=messages.append).name == "step_00000004"
    assert any("step_00000001 is a symbolic link" in message for message in messages)


def test_verification_never_reads_a_recorded_file_through_a_linked_folder(tmp_path):
    tag_dir = _checkpoint(tmp_path / "checkpoints", 2)
    outside = precious(tmp_path / "outside", "secret.txt")
    (tag_dir / "sub").symlink_to(outside.parent, target_is_directory=True)
    meta = json.loads((tag_dir / ckpt.MARKER).read_text())
    meta["files"]["sub/secret.txt"] = {"size": outside.stat().st_size, "sha256": ckpt._sha256(outside)}
    (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    problems = ckpt.verify_checkpoint(tag_dir)
    assert problems == [
        ("damaged", "sub/secret.txt lies outside the checkpoint folder (reached through a symbolic link)")
    ]
    (tag_dir / "sub").unlink()
    (tmp_path / "elsewhere.json").write_text(json.dumps(meta))
    (tag_dir / ckpt.MARKER).unlink()
    (tag_dir / ckpt.MARKER).symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(ckpt.CheckpointDamagedError, match="is a symbolic link"):
        ckpt.read_meta(tag_dir)


@pytest.mark.slow
@pytest.mark.usefixtures("one_rank", "one_torch_thread")
def test_a_real_checkpoint_save_and_convert_replace_planted_links(tmp_path):
    """A real ZeRO-1 engine saves with links planted at latest, latest.tmp and the step folder, then converts to a
    universal checkpoint with a link planted at universal.tmp: every link's target is untouched."""
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import Trainer

    run = tmp_path / "run"
    overrides = ["model.student_args.depth=1", "data.batch_size=2", "run.device=cpu", "deepspeed.zero_stage=1"]
    cfg = load_config(None, [*overrides, f"run.output_dir={run}"])
    trainer = Trainer(cfg, init_distributed("cpu"))
    root = run / "checkpoints"
    root.mkdir(parents=True)
    outside = tmp_path / "outside"
    latest, latest_tmp = precious(outside, "latest"), precious(outside, "latest.tmp")
    step_target = outside / "step_folder"
    inside_step = precious(step_target, ckpt.MARKER)
    (root / "latest").symlink_to(latest)
    (root / "latest.tmp").symlink_to(latest_tmp)
    (root / ckpt.tag_for_step(1)).symlink_to(step_target, target_is_directory=True)
    meta = {"step": 1, "samples_seen": 2, "world_size": 1, "zero_stage": 1, "data_state": {}, "config": {}}
    tag_dir = ckpt.save_checkpoint(trainer.engine, root, 1, meta, rank=0)
    assert [path.read_text() for path in (latest, latest_tmp, inside_step)] == [PRECIOUS] * 3
    assert sorted(os.listdir(step_target)) == [ckpt.MARKER]
    assert not tag_dir.is_symlink() and (root / "latest").read_text() == tag_dir.name
    assert ckpt.verify_checkpoint(tag_dir) == []
    converted_into = outside / "converted"
    converted_into.mkdir()
    (tag_dir / "universal.tmp").symlink_to(converted_into, target_is_directory=True)
    universal = ckpt.convert_to_universal(tag_dir, workers=1)
    assert os.listdir(converted_into) == [] and universal.is_dir() and not universal.is_symlink()
    assert (universal / "zero").is_dir()
