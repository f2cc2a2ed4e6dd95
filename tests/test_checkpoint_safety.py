"""Checkpoint files are hostile until checked: planted pickles are refused by name and never run, damaged files
are found by size and sha256 and skipped for the newest checkpoint that verifies, unreadable records are named."""

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from mimscale.cli import main as cli_main
from mimscale.engine import checkpoint as ckpt
from mimscale.engine import safe_load


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path, marker) -> None:
    """What an attacker writes: a pickle that runs a shell command when loaded without weights_only."""
    path.write_bytes(pickle.dumps({"state": _RunsCode(marker)}))


def make_checkpoint(root, step: int):
    """A real checkpoint folder in the shape DeepSpeed + mimscale write it, with its file record."""
    tag_dir = root / ckpt.tag_for_step(step)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.randn(64, 64)}, "ds_version": "0.19.8"}, tag_dir / "mp_rank_00_model_states.pt")
    torch.save(ckpt.rng_state(), tag_dir / "rng_rank0.pt")
    meta = {"step": step, "samples_seen": 8 * step, "world_size": 1, "zero_stage": 0, "data_state": {}, "config": {}}
    meta["files"] = ckpt._record_files(tag_dir, rank=0, world_size=1)
    (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    return tag_dir


def test_planted_pickles_are_refused_by_name_and_never_run(tmp_path, monkeypatch):
    monkeypatch.delenv(safe_load.TRUST_ENV, raising=False)
    marker = tmp_path / "code-ran"
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 2)
    plant(tag_dir / "rng_rank0.pt", marker)
    with pytest.raises(safe_load.UnsafeCheckpointError, match="rng_rank0.pt.*--trust-checkpoint"):
        ckpt.find_resume_checkpoint(tmp_path / "checkpoints", log=lambda *_: None)
    plant(tag_dir / "mp_rank_00_model_states.pt", marker)
    problems = ckpt.verify_checkpoint(tag_dir)
    assert sorted(kind for kind, _ in problems) == ["unsafe", "unsafe"]  # refused, never merely "damaged"
    with pytest.raises(safe_load.UnsafeCheckpointError, match="mp_rank_00_model_states.pt"):
        safe_load.load_file(tag_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(safe_load.UnsafeCheckpointError), safe_load.deepspeed_loads_weights_only():
        torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)  # as DeepSpeed calls it
    assert cli_main(["ckpt", "info", str(tmp_path)]) == 1
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="magic number"):  # the explicit trust flag is the only way through
        safe_load.load_file(tag_dir / "rng_rank0.pt", trusted=True)
    assert marker.exists()  # ... and then the planted code runs: what the check prevents


def test_damaged_newest_checkpoint_falls_back_to_the_newest_that_verifies(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        make_checkpoint(root, step)
    rng = root / "step_00000006" / "rng_rank0.pt"
    rng.write_bytes(rng.read_bytes()[:-100])  # truncated
    model = root / "step_00000004" / "mp_rank_00_model_states.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped bit pattern inside the weights
    model.write_bytes(bytes(data))
    messages = []
    assert ckpt.find_resume_checkpoint(root, log=messages.append).name == "step_00000002"
    assert "step_00000006 is damaged" in messages[0] and "rng_rank0.pt cannot be read" in messages[0]
    assert "step_00000004 is damaged" in messages[1] and "model_states.pt does not match the sha256" in messages[1]
    (root / "step_00000002" / "rng_rank0.pt").unlink()  # costs exactness only: a warning when it is loaded
    assert ckpt.find_resume_checkpoint(root, log=messages.append).name == "step_00000002"
    (root / "step_00000002" / "mp_rank_00_model_states.pt").unlink()
    with pytest.raises(ckpt.CheckpointDamagedError, match="no checkpoint in .* verifies.*model_states.pt is missing"):
        ckpt.find_resume_checkpoint(root, log=messages.append)


def test_a_file_record_pointing_outside_the_checkpoint_is_damage(tmp_path):
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 2)
    meta = json.loads((tag_dir / ckpt.MARKER).read_text())
    for files in ({"../../etc/passwd": {"size": 1, "sha256": "0" * 64}}, {"rng_rank0.pt": {"size": "1"}}, ["x"]):
        (tag_dir / ckpt.MARKER).write_text(json.dumps({**meta, "files": files}))
        assert [kind for kind, _ in ckpt.verify_checkpoint(tag_dir)] == ["damaged"]


@pytest.mark.parametrize("record", ["{not json", "{}", "[1, 2]", "\udcff"])
def test_unreadable_mimscale_json_is_named_in_train_and_ckpt_info(tmp_path, capsys, record):
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 2)
    (tag_dir / ckpt.MARKER).write_bytes(record.encode("utf-8", "surrogateescape"))
    with pytest.raises(ckpt.CheckpointDamagedError, match=f"{ckpt.MARKER}"):
        ckpt.read_meta(tag_dir)
    with pytest.raises(ckpt.CheckpointDamagedError, match="no checkpoint in .* verifies"):
        ckpt.find_resume_checkpoint(tmp_path / "checkpoints", log=lambda *_: None)
    assert cli_main(["ckpt", "info", str(tmp_path)]) == 1
    assert f"DAMAGED      {tag_dir / ckpt.MARKER}" in capsys.readouterr().out


def test_rng_files_hold_only_tensors_and_old_numpy_ones_still_load(tmp_path):
    random.seed(3), np.random.seed(4), torch.manual_seed(5)
    torch.save(ckpt.rng_state(), tmp_path / "rng_rank0.pt")
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        tmp_path / "rng_rank1.pt",
    )
    expected = (random.random(), np.random.rand(), torch.rand(1))
    for name in ("rng_rank0.pt", "rng_rank1.pt"):
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
        ckpt.set_rng_state(safe_load.load_file(tmp_path / name))
        assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_model_mismatch_names_the_differing_keys():
    saved = {"model": {"student": "vit_tiny_patch16_224", "student_args": {"depth": 2}}, "optim": {"lr": 1.0}}
    now = {"model": {"student": "vit_tiny_patch16_224", "student_args": {"depth": 4}}, "optim": {"lr": 2.0}}
    assert ckpt.model_config_diff(saved, now) == ["  model.student_args: {'depth': 2} -> {'depth': 4}"]


def test_torch_force_no_weights_only_load_is_named_with_what_to_do(tmp_path, monkeypatch):
    """torch refuses its own two FORCE variables together: without this check every resume (and every conversion)
    failed with torch's "Only one of ..." and no word of which variable or what to do."""
    monkeypatch.delenv(safe_load.TRUST_ENV, raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 2)
    expected = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 is set in the environment.*unset.*--trust-checkpoint"
    with pytest.raises(ValueError, match=expected), safe_load.deepspeed_loads_weights_only():
        torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)  # as DeepSpeed calls it
    with pytest.raises(ValueError, match=expected):
        ckpt.convert_to_universal(tag_dir)
    assert not ckpt.universal_dir(tag_dir).exists()
    with safe_load.deepspeed_loads_weights_only(trusted=True):  # the user's own checkpoints: their choice
        torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)


def test_each_caller_gets_its_own_trust_decision(tmp_path, monkeypatch, capsys):
    """Trust is a value passed down, not process state: a trusted command leaves later untrusted callers in the same
    process refusing planted pickles (module state set by the first command used to trust them too)."""
    monkeypatch.delenv(safe_load.TRUST_ENV, raising=False)
    marker = tmp_path / "code-ran"
    tag_dir = make_checkpoint(tmp_path / "checkpoints", 2)
    plant(tag_dir / "rng_rank0.pt", marker)
    meta = json.loads((tag_dir / ckpt.MARKER).read_text())
    meta["files"] = ckpt._record_files(tag_dir, rank=0, world_size=1)  # the planted file's hash is the recorded one
    (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    assert cli_main(["ckpt", "info", str(tmp_path), "--trust-checkpoint"]) == 0
    assert "pickles not checked (--trust-checkpoint)" in capsys.readouterr().out
    with pytest.raises(safe_load.UnsafeCheckpointError, match="rng_rank0.pt"):
        ckpt.find_resume_checkpoint(tmp_path / "checkpoints", log=lambda *_: None)
    assert ckpt.find_resume_checkpoint(tmp_path / "checkpoints", log=lambda *_: None, trusted=True) == tag_dir
    assert cli_main(["ckpt", "info", str(tmp_path)]) == 1
    monkeypatch.setenv(safe_load.TRUST_ENV, "1")  # the user's environment counts where a command reads its args
    assert cli_main(["ckpt", "info", str(tmp_path)]) == 0
    with pytest.raises(safe_load.UnsafeCheckpointError):  # ... and nowhere else: a library call decides for itself
        ckpt.resolve_checkpoint(tag_dir)
    assert not marker.exists()
