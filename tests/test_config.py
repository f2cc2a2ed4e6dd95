"""Config loading: defaults, overrides, validation errors that name the key, base chains, the resolved dump."""

import pytest
import yaml

from mimscale.config import Config, ConfigError, load_config, parse_override, save_config


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_typed_overrides():
    cfg = load_config(None, ["optim.lr=1e-4", "data.batch_size=8", "deepspeed.zero_stage=3", "data.crop_scale=[0.5,1]"])
    assert cfg.optim.lr == pytest.approx(1e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.data.batch_size == 8 and cfg.deepspeed.zero_stage == 3
    assert cfg.data.crop_scale == [0.5, 1.0]


def test_unknown_key_names_it_and_lists_valid_ones(tmp_path):
    path = write(tmp_path, "bad.yaml", {"optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "optim.lrr" in message and "Did you mean 'lr'" in message and "weight_decay" in message
    assert str(path) in message


def test_unknown_section_and_bad_type(tmp_path):
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(write(tmp_path, "a.yaml", {"optimizer": {"lr": 1}}))
    with pytest.raises(ConfigError, match="data.batch_size.*must be of type int.*'big'"):
        load_config(write(tmp_path, "b.yaml", {"data": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match="deepspeed.zero_stage=4"):
        load_config(None, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["lr=1"])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="not a multiple of mask.patch_size"):
        load_config(None, ["data.image_size=100", "mask.patch_size=32"])
    with pytest.raises(ConfigError, match="mask.ratio"):
        load_config(None, ["mask.ratio=1.5"])
    with pytest.raises(ConfigError, match="needs a teacher"):
        load_config(None, ["method.name=maskdistill"])


def test_nested_override_updates_dict_field(tmp_path):
    path = write(tmp_path, "m.yaml", {"model": {"student_args": {"depth": 12, "patch_size": 8}}})
    cfg = load_config(path, ["model.student_args.depth=2"])
    assert cfg.model.student_args == {"depth": 2, "patch_size": 8}


def test_base_chain_merges_sections(tmp_path):
    write(tmp_path, "base.yaml", {"optim": {"lr": 0.5, "warmup_steps": 3}, "data": {"batch_size": 4}})
    child = write(tmp_path, "child.yaml", {"base": "base.yaml", "optim": {"lr": 0.25}})
    cfg = load_config(child)
    assert cfg.optim.lr == 0.25 and cfg.optim.warmup_steps == 3 and cfg.data.batch_size == 4


def test_base_loop_and_missing_file_are_clear(tmp_path):
    write(tmp_path, "x.yaml", {"base": "y.yaml"})
    write(tmp_path, "y.yaml", {"base": "x.yaml"})
    with pytest.raises(ConfigError, match="loops"):
        load_config(tmp_path / "x.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["optim.lr=3e-4", "model.student_args.depth=2", "run.seed=7"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and isinstance(again, Config)


def test_parse_override_values():
    assert parse_override("optim.betas=[0.9, 0.95]") == ("optim", "betas", [0.9, 0.95])
    assert parse_override("train.progress_bar=false") == ("train", "progress_bar", False)
    assert parse_override("optim.lr=1e-4")[2] == pytest.approx(1e-4)
