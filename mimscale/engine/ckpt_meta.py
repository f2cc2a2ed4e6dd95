"""One schema for ``mimscale.json``: every key's type and range checked when the record is read.

The record is hostile like every file we read: a wrong type (``step: "x"``, ``samples_seen: [1]``, ``files: 5``,
``config: []``), a NaN or a negative step would otherwise crash deep inside resume, ``ckpt info`` or ``export``,
or be used silently. ``check_meta`` names the file and the key and says what was expected. The stored config
is checked where a model is built from it (export, evaluation): keys that make timm or open_clip read files or
fetch weights are refused (the trained weights come from the checkpoint; a stored ``checkpoint_path: /etc/passwd``
must never be opened). Resume builds the model from the user's config, never from the stored one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from mimscale.presets import FORMER_OBJECTIVES, PRESETS

# Check: the value -> what is wrong with it ("must be ..."), or None when it is fine.
Check = Callable[[Any], str | None]


class MetaError(ValueError):
    """A key of mimscale.json has the wrong type or range; the message names the key."""


def _integer(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
            upper = f" and at most {high}" if high is not None else ""
            return f"must be an integer of at least {low}{upper}"
        return None

    return check


def _one_of(*choices: str) -> Check:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else "must be a string"


def _finite(value: Any) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return None if ok else "must be a finite number"


def _names(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(item, str) for item in value)
    return None if ok else "must be a list of parameter names"


def _mapping_of_sections(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(isinstance(v, dict) or v is None for v in value.values()):
        return "must be a mapping of config sections (each a mapping of keys)"
    return None


def _method_record(value: Any) -> str | None:
    ok = isinstance(value, dict) and set(value) == {"name", "objective_version"} and isinstance(value["name"], str)
    if not ok or _integer(1)(value["objective_version"]) is not None:
        return "must be exactly {name: a string, objective_version: an integer of at least 1}"
    return None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _file_record(value: Any) -> str | None:
    """{name: {size: int >= 0, sha256: 64 hex digits}}, every name relative and inside the checkpoint."""
    if not isinstance(value, dict):
        return "must be a mapping {file name: {size, sha256}}"
    for name, record in value.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            return f"names {name!r}, which is not a file inside the checkpoint"
        if not isinstance(record, dict) or set(record) != {"size", "sha256"}:
            return f"entry {name!r} must be exactly {{size, sha256}}"
        if _integer(0)(record["size"]) or not (
            isinstance(record["sha256"], str) and _SHA256.fullmatch(record["sha256"])
        ):
            return f"entry {name!r} must have an integer size >= 0 and a sha256 of 64 hex digits"
    return None


DATA_STATE_KEYS: dict[str, Check] = {  # the shape of TrainStream.state_dict()
    "version": _integer(1),
    "epoch": _integer(0),
    "consumed": _integer(0),
    "seed": _integer(0),
    "streams": _integer(1),
    "shuffle_window": _integer(1),
    "fingerprint": _text,
    "num_samples": _integer(0),
    "global_batch": _integer(1),
    "corrupt_count": _integer(0),
}


def _data_state(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be a mapping (the data position TrainStream saved)"
    for key, check in DATA_STATE_KEYS.items():
        if key in value and (problem := check(value[key])) is not None:
            return f"key {key!r} {problem}, got {value[key]!r:.80}"
    return None


REQUIRED: dict[str, Check] = {
    "step": _integer(0),
    "samples_seen": _integer(0),
    "world_size": _integer(1),
    "zero_stage": _integer(0, 3),
    "data_state": _data_state,
    "config": _mapping_of_sections,
}
OPTIONAL: dict[str, Check] = {
    "skipped_micro_batches": _integer(0),
    "precision": _one_of("fp32", "bf16", "fp16"),
    "time": _finite,
    "frozen_params": _names,
    "files": _file_record,
    "method": _method_record,  # the objective trained (absent before objective versions: version 1 of the config's)
    "wandb_run_id": _text,  # its format is checked where it is used (engine/metrics.py): a bad one starts a new run
}

# Keyword arguments of timm.create_model / open_clip.create_model that read files, fetch weights or unpickle.
WEIGHT_LOADING_ARGS = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "pretrained_filter_fn",
        "checkpoint_path",
        "cache_dir",
        "load_weights",
        "pretrained_image",
        "pretrained_text",
        "pretrained_image_path",
        "pretrained_text_path",
        "pretrained_hf",
        "require_pretrained",
        "weights_only",
        "jit",
    }
)
MODEL_ARGS = (("model", "student_args"), ("teacher", "model_args"))


def check_meta(meta: Any, source: str) -> dict:
    """``meta`` if it fits the schema; else MetaError naming ``source`` (the file) and the key."""
    if not isinstance(meta, dict):
        raise MetaError(f"{source} must hold a JSON object, not {type(meta).__name__}")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise MetaError(f"{source} lacks {', '.join(missing)}")
    unknown = sorted(set(meta) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise MetaError(f"{source} has unknown keys {', '.join(unknown)} (written by another mimscale version?)")
    for key, check in {**REQUIRED, **OPTIONAL}.items():
        if key in meta and (problem := check(meta[key])) is not None:
            raise MetaError(f"{source}: {key} {problem}, got {meta[key]!r:.120}")
    return meta


def refuse_weight_loading_args(config: dict, source: str) -> None:
    """A stored config must not make timm/open_clip read a file or fetch weights when the model is rebuilt."""
    for section, key in MODEL_ARGS:
        args = (config.get(section) or {}).get(key) or {}
        if not isinstance(args, dict):
            continue  # the config's own validation names a mistyped section key
        bad = sorted(WEIGHT_LOADING_ARGS & set(args))
        if bad:
            raise MetaError(
                f"{source}: the stored config sets {section}.{key}.{bad[0]}={args[bad[0]]!r:.80}, which makes the "
                "model library read a file or fetch weights when the model is rebuilt; mimscale never does that "
                "from a stored config (the trained weights come from the checkpoint). Remove the key from the "
                "stored config if you wrote it, otherwise do not use this folder"
            )


def method_record(name: str) -> dict:
    """What a checkpoint records of the objective it was trained with (the ``method`` key)."""
    return {"name": name, "objective_version": PRESETS[name].objective_version}


def saved_objective(meta: dict) -> tuple[str, int] | None:
    """(method name, objective version) a checkpoint was trained with; a record without ``method`` (written before
    objective versions existed) trained version 1 of its config's method. None when neither says."""
    if "method" in meta:
        return meta["method"]["name"], meta["method"]["objective_version"]
    name = ((meta.get("config") or {}).get("method") or {}).get("name")
    return (name, 1) if isinstance(name, str) else None


def objective_change(meta: dict, name: str, source: str) -> str | None:
    """Why a checkpoint must not resume under method.name=``name``, or None when it trained that very objective.
    Resuming another objective would go on from weights, optimizer moments and schedule made for another loss."""
    saved = saved_objective(meta)
    if saved is None:
        return None
    current = (name, PRESETS[name].objective_version)
    successor = FORMER_OBJECTIVES.get(saved, saved if saved[0] in PRESETS else None)
    if successor == current:
        return None
    was, now = f"method.name={saved[0]} (objective version {saved[1]})", f"{name} (objective version {current[1]})"
    if successor is not None and successor[0] in PRESETS and PRESETS[successor[0]].objective_version == successor[1]:
        if successor[0] == saved[0]:
            keep = f"to continue it, resume with method.name={saved[0]} (--set method.name={saved[0]})"
        else:
            keep = (
                f"that objective is now method.name={successor[0]}: to continue it, resume with "
                f"--set method.name={successor[0]}"
            )
    else:
        keep = "this mimscale version does not train that objective: finish that run with the version that wrote it"
    return (
        f"checkpoint {source} was trained with {was}; this config trains method.name={now}. Resuming would go on "
        f"from weights, optimizer state and schedule made for another loss, so it is refused: {keep}; to train "
        f"{name} instead, start a new run (set run.output_dir to a new folder), or pass --allow-objective-change to "
        "go on from this checkpoint under the new objective (its later checkpoints record the new one)"
    )
