"""mimscale.json is parsed with one schema (issue 20, section 5): a wrong type or range is named with the file and
the key by every reader (resume, `ckpt info`, `export`), and a stored config never makes timm open a file."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
import yaml

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine.ckpt_meta import DATA_STATE_KEYS, WEIGHT_LOADING_ARGS, method_record
from mimscale.train import add_train_arguments

TINY = ["model.student_args.depth=1", "data.image_size=32", "model.student_args.patch_size=16"]


def write_checkpoint(root, **changes):
    """A real ZeRO-0 checkpoint folder at step 2 (model file, rng file, record); its mimscale.json carries
    ``changes`` over what the trainer writes."""
    tag_dir = root / "checkpoints" / ckpt.tag_for_step(2)
    tag_dir.mkdir(parents=True)
    torch.save({"module": {"w": torch.randn(4, 4)}, "ds_version": "0.19.8"}, tag_dir / ckpt.ZERO0_MODEL_FILE)
    torch.save(ckpt.rng_state(), tag_dir / "rng_rank0.pt")
    state = {
        "version": 2,
        "epoch": 0,
        "consumed": 8,
        "seed": 0,
        "streams": 1,
        "shuffle_window": 8,
        "fingerprint": "abc",
        "num_samples": 64,
        "global_batch": 4,
        "corrupt_count": 0,
    }
    meta = {
        "step": 2,
        "samples_seen": 8,
        "world_size": 1,
        "zero_stage": 0,
        "precision": "fp32",
        "data_state": state,
        "config": {},
        "time": 1.5,
        "frozen_params": [],
    }
    meta["files"] = ckpt._record_files(tag_dir, rank=0, world_size=1)
    meta.update(changes)
    (tag_dir / ckpt.MARKER).write_text(json.dumps(meta))
    return tag_dir


BAD = [
    ("step", "x", "step must be an integer of at least 0"),
    ("step", math.nan, "step must be an integer"),
    ("step", -5, "step must be an integer of at least 0"),
    ("step", True, "step must be an integer"),
    ("samples_seen", [1], "samples_seen must be an integer"),
    ("world_size", 0, "world_size must be an integer of at least 1"),
    ("zero_stage", 7, "zero_stage must be an integer of at least 0 and at most 3"),
    ("data_state", "garbage", "data_state must be a mapping"),
    ("data_state", {"streams": 0}, "data_state key 'streams' must be an integer of at least 1"),
    ("data_state", {"consumed": "8"}, "data_state key 'consumed' must be an integer"),
    ("config", [], "config must be a mapping of config sections"),
    ("files", 5, "files must be a mapping"),
    ("files", {"a.pt": {"size": 1, "sha256": "0" * 64, "path": "/etc"}}, "entry 'a.pt' must be exactly"),
    ("precision", "fp8", "precision must be one of fp32, bf16, fp16"),
    ("time", math.inf, "time must be a finite number"),
    ("frozen_params", "pos_embed", "frozen_params must be a list"),
    ("wandb_run_id", 5, "wandb_run_id must be a string"),
    ("method", "relaxmim", "method must be exactly {name"),
    ("method", {"name": "relaxmim", "objective_version": 0}, "method must be exactly {name"),
    ("surprise", 1, "unknown keys surprise"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{key}={value!r}" for key, value, _ in BAD])
def test_a_wrong_type_or_range_is_named_with_the_file_and_key(tmp_path, key, value, message):
    tag_dir = write_checkpoint(tmp_path, **{key: value})
    with pytest.raises(ckpt.CheckpointDamagedError) as caught:
        ckpt.read_meta(tag_dir)
    assert str(tag_dir / ckpt.MARKER) in str(caught.value) and message in str(caught.value)
    messages = []
    with pytest.raises(ckpt.CheckpointDamagedError, match="no checkpoint in .* verifies"):
        ckpt.find_resume_checkpoint(tmp_path / "checkpoints", log=messages.append)  # resume: skipped, then refused
    assert message in messages[0]


def test_the_schema_accepts_what_the_trainer_writes(tmp_path):
    import inspect
    import re

    from mimscale.pipeline.stream import TrainStream

    written = set(re.findall(r'"(\w+)":', inspect.getsource(TrainStream.state_dict)))
    assert written == set(DATA_STATE_KEYS)  # the schema types exactly the keys the stream saves
    config = load_config(None, TINY).to_dict()
    tag_dir = write_checkpoint(tmp_path, config=config, wandb_run_id="r1x2y3", method=method_record("simmim"))
    assert ckpt.read_meta(tag_dir)["step"] == 2 and ckpt.verify_checkpoint(tag_dir) == []


@pytest.mark.parametrize("key,value", [("config", []), ("files", 5), ("step", "x")])
def test_ckpt_info_and_export_report_a_bad_record_without_a_traceback(tmp_path, capsys, key, value):
    tag_dir = write_checkpoint(tmp_path, **{key: value})
    assert cli_main(["ckpt", "info", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED      {tag_dir / ckpt.MARKER}: {key} must be" in out
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tag_dir / ckpt.MARKER}: {key} must be" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("section,key", [("model", "student_args"), ("teacher", "model_args")])
@pytest.mark.parametrize("argument", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_export_refuses_a_stored_config_that_makes_timm_open_a_file(tmp_path, capsys, section, key, argument):
    config = load_config(None, TINY).to_dict()
    value = "/etc/passwd" if argument == "checkpoint_path" else {"file": "/etc/passwd"}
    config[section][key] = {**config[section][key], argument: value}
    tag_dir = write_checkpoint(tmp_path, config=config)
    assert cli_main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{tag_dir / ckpt.MARKER}: the stored config sets {section}.{key}.{argument}=" in err
    assert "never does that from a stored config" in err and not (tmp_path / "out").exists()


def test_evaluating_random_init_of_a_run_folder_refuses_its_stored_file_loading_args(tmp_path):
    from mimscale.eval.export import load_backbone

    config = load_config(None, TINY).to_dict()
    config["model"]["student_args"]["checkpoint_path"] = "/etc/passwd"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="model.student_args.checkpoint_path='/etc/passwd'"):
        load_backbone(f"random:{tmp_path}")


def test_every_file_loading_argument_of_timm_and_open_clip_is_refused():
    import inspect

    import open_clip
    import timm

    timm_args = set(inspect.signature(timm.create_model).parameters) - {"model_name", "kwargs"}
    clip_args = set(inspect.signature(open_clip.create_model).parameters)
    loading = {name for name in timm_args | clip_args if any(w in name for w in ("pretrained", "path", "cache"))}
    assert loading <= WEIGHT_LOADING_ARGS, loading - WEIGHT_LOADING_ARGS


# ----------------------------------------------------------------------------------------------- what was trained


def plan(tmp_path, *overrides, allow: bool = False):
    """Resume planning (loop.plan_resume) of this run folder's newest checkpoint under a config with ``overrides``."""
    from mimscale.engine.distributed import DistInfo
    from mimscale.engine.loop import plan_resume

    cfg = load_config(None, [*TINY, f"run.output_dir={tmp_path}", *overrides])
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    return plan_resume(cfg, tmp_path / "checkpoints", "auto", info, allow_objective_change=allow)


def test_resume_refuses_a_checkpoint_trained_for_another_objective(tmp_path, capsys):
    """relaxmim's objective changed (version 2: two-view InfoNCE); a checkpoint of its former objective, written
    before checkpoints recorded one (so version 1 of its config's method), resumes only as patch_content_nce."""
    old = load_config(None, [*TINY, "method.name=relaxmim"]).to_dict()
    tag_dir = write_checkpoint(tmp_path, config=old)
    with pytest.raises(ckpt.CheckpointMismatchError) as caught:
        plan(tmp_path, "method.name=relaxmim")
    message = str(caught.value)
    assert str(tag_dir) in message and "method.name=relaxmim (objective version 1)" in message
    assert "this config trains method.name=relaxmim (objective version 2)" in message
    assert "--set method.name=patch_content_nce" in message and "run.output_dir" in message
    assert "--allow-objective-change" in message
    assert plan(tmp_path, "method.name=patch_content_nce").tag_dir == tag_dir
    assert plan(tmp_path, "method.name=relaxmim", allow=True).tag_dir == tag_dir  # the user says so: warned
    assert "warning: --allow-objective-change" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    assert parser.parse_args(["--config", "x.yaml", "--allow-objective-change"]).allow_objective_change
    assert not parser.parse_args(["--config", "x.yaml"]).allow_objective_change
    (tag_dir / ckpt.MARKER).write_text(json.dumps({**ckpt.read_meta(tag_dir), "method": method_record("relaxmim")}))
    assert plan(tmp_path, "method.name=relaxmim").tag_dir == tag_dir  # recorded: the current relaxmim
    with pytest.raises(ckpt.CheckpointMismatchError, match=r"simmim .*: to continue it, resume with method.name=relax"):
        plan(tmp_path, "method.name=simmim")
    future = {**ckpt.read_meta(tag_dir), "method": {"name": "relaxmim", "objective_version": 7}}
    (tag_dir / ckpt.MARKER).write_text(json.dumps(future))
    with pytest.raises(ckpt.CheckpointMismatchError, match="does not train that objective"):
        plan(tmp_path, "method.name=relaxmim")


def test_every_preset_records_an_objective_version_and_renamed_objectives_exist():
    from mimscale.presets import FORMER_OBJECTIVES, PRESETS

    assert all(isinstance(p.objective_version, int) and p.objective_version >= 1 for p in PRESETS.values())
    for (name, version), (now, now_version) in FORMER_OBJECTIVES.items():
        assert version < PRESETS[name].objective_version and PRESETS[now].objective_version == now_version


def timm_order_table(backbone) -> torch.Tensor:
    """What model.pos_embed_init=sincos_frozen built before the MAE preset: timm's build_sincos2d_pos_embed."""
    from timm.layers import build_sincos2d_pos_embed

    grid = list(backbone.patch_embed.grid_size)
    return build_sincos2d_pos_embed(grid, dim=backbone.pos_embed.shape[-1]).reshape(-1, backbone.pos_embed.shape[-1])


@pytest.mark.usefixtures("one_rank", "one_torch_thread")
def test_a_frozen_position_table_of_another_channel_order_is_refused_on_resume(tmp_path):
    """A real one-process checkpoint of a sincos_frozen run resumes; the same checkpoint holding the table an older
    mimscale built (timm's channel order) is refused by name when loaded, not carried on silently."""
    from mimscale.engine.distributed import init_distributed
    from mimscale.engine.loop import Trainer, frozen_table_in_checkpoint
    from mimscale.models.students import frozen_table_difference
    from mimscale.pipeline.masking import mask_generator_for
    from mimscale.pipeline.stream import build_train_loader

    settings = [f"run.output_dir={tmp_path}", "model.pos_embed_init=sincos_frozen", "run.device=cpu"]
    settings += ["data.num_workers=0", f"data.cache_dir={tmp_path / 'cache'}"]
    cfg = load_config(None, [*TINY, *settings])
    info = init_distributed("cpu")
    trainer = Trainer(cfg, info)
    backbone = trainer.engine.module.student.backbone
    grid = tuple(backbone.patch_embed.grid_size)
    assert frozen_table_difference(backbone.pos_embed, grid) is None
    assert frozen_table_difference(backbone.pos_embed.to(torch.bfloat16), grid) is None  # a bf16 copy of it
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask_generator_for(cfg, trainer.method))
    state = trainer.checkpoint_meta(stream)  # what the trainer records
    assert state["method"] == {"name": "simmim", "objective_version": 1} == method_record("simmim")
    ckpt.save_checkpoint(trainer.engine, tmp_path / "checkpoints", 2, state, 0)
    assert trainer.resume(plan(tmp_path, *settings)) == state["data_state"]  # the table this version builds
    with torch.no_grad():
        backbone.pos_embed[0, 1:] = timm_order_table(backbone)
    assert "timm's channel order" in frozen_table_difference(backbone.pos_embed, grid)
    ckpt.save_checkpoint(trainer.engine, tmp_path / "checkpoints", 3, state, 0)
    checkpoints = tmp_path / "checkpoints"  # a universal resume reads the table from the files (rank 0)
    assert frozen_table_in_checkpoint(checkpoints / ckpt.tag_for_step(2), grid, trusted=False) is None
    assert "timm's channel order" in frozen_table_in_checkpoint(checkpoints / ckpt.tag_for_step(3), grid, False)
    with pytest.raises(ckpt.CheckpointMismatchError) as caught:
        Trainer(cfg, info).resume(plan(tmp_path, *settings))
    message = str(caught.value)
    assert ckpt.tag_for_step(3) in message and "timm's channel order" in message and "sincos_frozen" in message
    with torch.no_grad():
        backbone.pos_embed.normal_()
    assert frozen_table_difference(backbone.pos_embed, grid) == "another table than the 2-D sin-cos one"
