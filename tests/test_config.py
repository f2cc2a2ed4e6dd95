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


def _every_key():
    import dataclasses
    import typing

    from mimscale.config import SECTIONS

    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for field in dataclasses.fields(cls):
            yield section, field.name, hints[field.name]


def _bad_values(tp) -> list:
    """Wrong-type, out-of-range and wrong-length values for a key of type ``tp``."""
    import typing

    wrong_type = {str: [5, ["a"]], bool: ["maybe", 2], dict: [[1], "x"], int: ["7", 2.5, True], float: ["x", [1.0]]}
    if typing.get_origin(tp) is list:
        return (
            [{"a": 1}, [], ["text"], [float("nan")] * 3, [-1e9] * 3]
            if typing.get_args(tp) == (float,)
            else [{"a": 1}, [], ["text"], [1.5]]
        )
    if tp in (int, float):
        return [*wrong_type[tp], -(10**9), *([float("nan"), float("inf"), -float("inf")] if tp is float else [])]
    return wrong_type.get(tp, ["x"])


@pytest.mark.parametrize("section,key,tp", list(_every_key()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_every_key_refuses_wrong_type_out_of_range_and_wrong_length_by_name(section, key, tp):
    from mimscale.config import from_dict

    for value in _bad_values(tp):
        with pytest.raises(ConfigError, match=rf"{section}\.{key}\b"):
            from_dict({section: {key: value}})


@pytest.mark.parametrize(
    "override",
    [
        "data.crop_scale=[0.5]",
        "data.std=[0,0,0]",
        "optim.lr=.nan",
        "optim.lr=.inf",
        "optim.lr=nan",
        "optim.lr=inf",
        "optim.grad_clip=-1",
        "data.hflip=7",
        "optim.betas=[0.9]",
        "train.max_bad_steps=-1",
        "run.collective_timeout_s=0",
        "checkpoint.keep_every=-3",
        "train.stop_at_step=-1",
        "eval.k=0",
        "run.output_dir=",
        "data.mean=[1]",
        "data.crop_scale=[1.0, 0.5]",
        "model.drop_path_rate=1.0",
        "run.seed=-1",
    ],
)
def test_reported_bad_values_are_config_errors_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


def test_flow_mapping_without_a_space_after_the_colon_is_refused(tmp_path):
    """`{patch_size:8,depth:2}` is YAML for two keys with null values; timm would drop them without a word."""
    with pytest.raises(ConfigError, match=r"'depth:2' reads as a key with no value.*depth: 2"):
        load_config(None, ["model.student_args={patch_size: 8, depth:2}"])
    config = tmp_path / "glued.yaml"
    config.write_text("model:\n  student_args: {depth:2}\n")
    with pytest.raises(ConfigError, match=r"glued.yaml.*'depth:2'"):
        load_config(config)
    assert load_config(None, ["model.student_args={patch_size: 8, depth: 2}"]).model.student_args["depth"] == 2
