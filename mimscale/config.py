"""Typed configuration: one keyword-only dataclass per section, YAML on disk, dotted overrides.

A config file is YAML with one mapping per section (``run``, ``train``, ``data``, ...). Missing keys take
the defaults below; an unknown or mistyped key is an error naming the key and the valid ones. A file may
start from another with ``base: other.yaml`` (path relative to the file). ``--set section.key=value``
overrides are parsed as YAML scalars/lists and type-checked like the file. The resolved config is what a
run writes into its output folder and stores in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mimscale.engine.precision import PRECISIONS
from mimscale.eval.evaluators import MONITORS
from mimscale.models.teacher_kinds import TEACHER_KINDS
from mimscale.pipeline.decode_modes import DECODE_MODES
from mimscale.presets import PRESETS
from mimscale.storage.atomic import atomic_write


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and what to do."""


def _doc(default: Any, doc: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass(kw_only=True)
class RunConfig:
    output_dir: str = _doc("runs/demo", "Run folder: resolved config, TensorBoard logs, checkpoints.")
    seed: int = _doc(0, "Seed for model init, data order, augmentation and masks.")
    device: str = _doc("auto", "auto (CUDA when available, else CPU), cpu or cuda.")
    collective_timeout_s: float = _doc(
        1800.0, "Once training runs, a collective waiting longer than this fails, naming the stalled peer."
    )
    startup_timeout_s: float = _doc(
        900.0,
        "Joining the rendezvous and start-up (engine build, checkpoint load, first step) may take this long: ranks "
        "start unevenly on a loaded node, so this is separate from, and usually larger than, collective_timeout_s.",
    )
    stop_timeout_s: float = _doc(
        300.0,
        "After SIGTERM/SIGUSR1/Ctrl-C a rank must finish its current step (then the ranks agree to checkpoint) within "
        "this many seconds; a rank wedged past it prints its Python stacks and exits 124 (README: Signals).",
    )


@dataclass(kw_only=True)
class TrainConfig:
    max_steps: int = _doc(100, "Optimizer steps to train for (the run ends at this step).")
    log_every: int = _doc(10, "Print a step line and write TensorBoard scalars every N steps.")
    grad_accum_steps: int = _doc(1, "Micro-batches accumulated per optimizer step.")
    progress_bar: bool = _doc(True, "Show a progress bar on rank 0 (disabled automatically when not a TTY).")
    stop_at_step: int = _doc(0, "Checkpoint and stop at this step without changing the schedule (0 = run to the end).")
    nan_guard: bool = _doc(True, "Skip micro-batches whose loss is NaN/Inf on any rank (agreed across ranks).")
    max_bad_steps: int = _doc(20, "Stop with an error after this many consecutive non-finite losses.")
    peak_tflops: float = _doc(0.0, "Peak dense TFLOP/s per device for MFU; 0 = look up known GPUs (none on CPU).")
    loggers: list[str] = _doc(
        ["tensorboard"],
        "Where rank 0 writes the scalars: tensorboard (<output_dir>/tensorboard) and/or wandb (Weights & Biases, "
        "the [wandb] extra; the resolved config is the W&B run's config and a resume continues the same run).",
    )


@dataclass(kw_only=True)
class DataConfig:
    shards: str = _doc(
        "shards/sample/*.tar", "Training shards: a path, folder, glob or brace pattern ({000..009}); join sets with ::."
    )
    batch_size: int = _doc(16, "Micro-batch size per rank.")
    image_size: int = _doc(64, "Side of the square training crop, in pixels.")
    num_workers: int = _doc(2, "DataLoader worker processes per rank (0 = load in the main process).")
    crop_scale: list[float] = _doc([0.67, 1.0], "RandomResizedCrop area range (SimMIM uses 0.67-1).")
    crop_ratio: list[float] = _doc([0.75, 1.3333], "RandomResizedCrop aspect ratio range.")
    hflip: float = _doc(0.5, "Probability of a horizontal flip.")
    mean: list[float] = _doc([0.485, 0.456, 0.406], "Per-channel normalisation mean.")
    std: list[float] = _doc([0.229, 0.224, 0.225], "Per-channel normalisation std.")
    pin_memory: bool = _doc(True, "Pin host memory for faster host-to-GPU copies (ignored on CPU).")
    decode: str = _doc(
        "worker",
        "Where training JPEGs are decoded: worker (DataLoader workers, CPU) or device (workers read the bytes and "
        "draw crop/flip/mask; the main process decodes in batches with nvJPEG, crops and resizes on the GPU; "
        "same samples, randomness and resume; on a CPU-only machine it runs on the CPU).",
    )
    cache_dir: str = _doc(
        "",
        "Node-local folder where remote shards (http(s)://, s3://, gs://, hf://, pipe:) are downloaded, shared by "
        "every rank and worker of the node; empty = <tmp>/mimscale-shards-<uid>. Never a shared filesystem (flock).",
    )
    cache_limit_gb: float = _doc(
        20.0, "Size limit of data.cache_dir in GB (1e9 bytes); least recently used shards nobody reads are evicted."
    )
    download_retries: int = _doc(5, "Retries of a failed shard download (exponential backoff) before the run stops.")
    download_timeout_s: float = _doc(60.0, "Network timeout of one shard request (connect and each read), seconds.")
    download_min_rate: float = _doc(
        100e3,
        "Slowest acceptable download, bytes/s: a download must end within its size / this rate plus "
        "download_timeout_s, else it is cut off and retried (a server trickling bytes cannot stall a run for ever).",
    )
    index: str = _doc(
        "",
        "Location (path or URL) of the samples.idx of remote data.shards, used instead of one beside them: the way "
        "to give the index of a pipe: set (its commands are never edited into other commands) or of pre-signed URLs "
        "(never edited); empty = beside the shards, or, for those two, built from the shards (downloaded once).",
    )
    counts: str = _doc(
        "",
        "Location (path or URL) of per-shard sample counts for data.shards without a samples.idx: JSON "
        "{shard file name: count} or a WebDataset widsindex file; used after manifest.json, shardindex.json and "
        "img2dataset's *_stats.json beside the shards. With counts a run starts without scanning the set.",
    )
    count_mismatch: str = _doc(
        "error",
        "A counted shard (see data.counts) whose tar holds another number of samples: error (names the shard and "
        "both numbers) or skip (its samples are served as corrupt: replaced and counted, the order unchanged).",
    )
    streams: int = _doc(
        0,
        "Canonical data streams C: the order interleaves C streams of shards, and rank r of W reads only C/W of "
        "them. Fixed when a run starts (0 = the world size then) and kept on resume; must divide the global batch.",
    )
    shuffle_window: int = _doc(
        8, "Shards per shuffle window: samples are shuffled within windows of this many shards of a stream."
    )


@dataclass(kw_only=True)
class ModelConfig:
    student: str = _doc("vit_tiny_patch16_224", "timm model name of the student backbone.")
    student_args: dict = _doc({}, "Keyword arguments for timm.create_model (e.g. img_size, patch_size, depth).")
    drop_path_rate: float = _doc(0.0, "Stochastic depth rate of the student.")
    pos_embed_init: str = _doc(
        "timm",
        "ViT position embedding init: timm (its learned, trunc-normal init) or sincos (2-D sin-cos as in MAE, still "
        "learned): gives attention a spatial prior from step 0, which short runs need to become local; "
        "sincos_frozen keeps that table fixed (MAE, MaskAlign).",
    )
    compile: bool = _doc(
        False,
        "torch.compile each student block's attention and MLP and the teachers' forward (GPU runs; slow to start; "
        "under ZeRO-3 only the teachers, as DeepSpeed's parameter hooks break the student's graphs).",
    )


@dataclass(kw_only=True)
class MethodConfig:
    name: str = _doc("simmim", "Preset: a key of mimscale.methods.PRESETS (README: Methods).")
    loss: str = _doc("auto", "Loss override: auto (the preset's) or a key of methods.components.LOSSES.")
    loss_args: dict = _doc({}, "Loss keyword arguments (e.g. beta for smooth_l1, temperature for infonce).")
    target_norm: str = _doc("auto", "Target norm override: auto or a key of methods.components.TARGET_NORMS.")
    decoder_args: dict = _doc(
        {}, "MAE decoder size: width, depth, heads, mlp_ratio (empty = MAE's 512 wide, 8 blocks, 16 heads, 4)."
    )


# Keys that no longer do anything: accepted (and dropped) at their old default so that the configs stored in older
# checkpoints still load; any other value is an error saying why the key went.
RETIRED_KEYS = {
    "method.head": ("auto", "each method's head is fixed by its target (pixels, teacher width, projection)"),
}


@dataclass(kw_only=True)
class TeacherConfig:
    kind: str = _doc("none", "none (pixels), open_clip or timm.")
    name: str = _doc("", "open_clip model name (ViT-B-16) or timm model name.")
    pretrained: str = _doc("", "open_clip pretrained tag or a local weights file; empty with random_init for tests.")
    random_init: bool = _doc(False, "Use random teacher weights (tests only; never silently).")
    layers: list[int] = _doc([-1], "Teacher blocks whose patch tokens are targets (negative counts from the end).")
    image_size: int = _doc(0, "Teacher input size; 0 = the teacher's native size (inputs are resized to it).")
    output: str = _doc(
        "auto",
        "Teacher tokens used as targets: auto (the preset's), block (raw block output), norm (after the final "
        "norm) or projected (final norm + CLIP projection, open_clip only).",
    )
    model_args: dict = _doc(
        {}, "Keyword arguments for open_clip.create_model / timm.create_model (tiny random teachers in demos)."
    )
    quick_gelu: bool | None = _doc(
        None,
        "open_clip teachers: QuickGELU (OpenAI CLIP weights) or GELU. null = follow the weights: a pretrained tag's "
        "metadata or the model name (ViT-B-16-quickgelu); a local file says nothing, so it needs true or false. "
        "A value that contradicts the tag is an error.",
    )


@dataclass(kw_only=True)
class MaskConfig:
    kind: str = _doc("auto", "auto (the preset's), random_cells, blockwise, random_tokens, attention_guided.")
    ratio: float = _doc(0.6, "Fraction of the image masked.")
    patch_size: int = _doc(32, "Mask cell size in pixels (SimMIM masks 32-px cells, upsampled to the patch grid).")
    count: int = _doc(
        0, "Exact number of masked tokens for blockwise / random_tokens masks (BEiT v2: 75 of 196); 0 = from ratio."
    )


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = _doc(1e-3, "Peak learning rate after warmup.")
    min_lr: float = _doc(1e-5, "Learning rate at the end of the cosine decay.")
    weight_decay: float = _doc(0.05, "AdamW weight decay (not applied to norms, biases and tokens).")
    betas: list[float] = _doc([0.9, 0.999], "AdamW betas.")
    eps: float = _doc(1e-8, "AdamW epsilon.")
    warmup_steps: int = _doc(10, "Linear warmup steps from 0 to lr.")
    grad_clip: float = _doc(5.0, "Gradient norm clipping (0 = off).")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = _doc(0, "ZeRO stage 0-3.")
    precision: str = _doc("fp32", "fp32, bf16 or fp16.")
    activation_checkpointing: bool = _doc(False, "Recompute student blocks in backward to save memory.")
    offload_optimizer: bool = _doc(False, "ZeRO-Offload: keep optimizer state on the CPU (stages 1-3).")
    extra: dict = _doc({}, "Raw keys merged last into the generated DeepSpeed JSON (expert escape hatch).")


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = _doc(50, "Save a sharded checkpoint every N steps (and at the end).")
    keep_last: int = _doc(3, "Keep the newest K checkpoints (older ones are pruned).")
    keep_every: int = _doc(0, "Also keep every checkpoint whose step is a multiple of M (0 = none).")


@dataclass(kw_only=True)
class EvalConfig:
    knn_every: int = _doc(0, "Run the in-run evaluation (eval.monitor) every N steps (0 = off).")
    monitor: str = _doc("knn", "In-run evaluator, by name from mimscale/eval/evaluators.py: knn or linear.")
    train_shards: str = _doc("", "Labelled shards for the kNN memory bank.")
    val_shards: str = _doc("", "Labelled shards the kNN classifier is scored on.")
    k: int = _doc(20, "Neighbours for kNN (DINO uses 20).")
    temperature: float = _doc(0.07, "kNN vote temperature (DINO uses 0.07).")
    pool: str = _doc("cls", "Feature pooling: cls or mean.")


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


# ----------------------------------------------------------------------------- per-key value ranges
# Every key is range-checked: numbers must be finite and, unless a rule below says otherwise, >= 0; lists have
# their length and item ranges here. tests/test_config.py feeds every key out-of-range, wrong-length and
# wrong-type values and expects a ConfigError naming the key, so a new key needs a rule only if >= 0 is wrong.
Rule = typing.Callable[[Any], "str | None"]


def _number(low: float = 0.0, high: float = math.inf, *, low_open: bool = False, high_open: bool = False) -> Rule:
    def check(value):
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if value < low or (low_open and value == low) or value > high or (high_open and value == high):
            if high == math.inf:
                return f"must be {'>' if low_open else '>='} {low:g}, got {value}"
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            return f"must be in {left}{low:g}, {high:g}{right}, got {value}"
        return None

    return check


def _items(length: int | None, item: Rule, *, ordered: bool = False) -> Rule:
    def check(values):
        if (length is not None and len(values) != length) or not values:
            return f"must be a list of {length or 'at least 1'} values, got {values}"
        for value in values:
            if (problem := item(value)) is not None:
                return f"item {value!r} {problem}"
        if ordered and values != sorted(values):
            return f"must be in increasing order (min, max), got {values}"
        return None

    return check


def _one_of(choices) -> Rule:
    """A choice list; ``choices`` is the owner's own list (its registry or table), never a copy."""

    def check(value):
        return None if value in choices else f"={value!r} is not valid; choose one of {', '.join(map(str, choices))}"

    return check


def _folder_or_absent(value: str) -> str | None:
    if value and os.path.exists(value) and not os.path.isdir(value):
        return f"={value} exists and is not a folder; point it at a folder"
    return None


def _non_empty(value: str) -> str | None:
    return "must not be empty" if not value.strip() else None


def _any_int(_value) -> None:
    return None


def _logger_name(value: str) -> str | None:
    from mimscale.engine.metrics import LOGGERS  # the metrics module owns the choices

    return None if value in LOGGERS else f"is not a logger; choose from {', '.join(LOGGERS)}"


POSITIVE = _number(low_open=True)
AT_LEAST_ONE = _number(1)
RULES: dict[str, Rule] = {
    "run.output_dir": _non_empty,
    "run.seed": _number(0, 2**32 - 1),
    "run.collective_timeout_s": POSITIVE,
    "run.startup_timeout_s": POSITIVE,
    "run.stop_timeout_s": POSITIVE,
    "train.max_steps": AT_LEAST_ONE,
    "train.log_every": AT_LEAST_ONE,
    "train.grad_accum_steps": AT_LEAST_ONE,
    "train.max_bad_steps": AT_LEAST_ONE,
    "train.loggers": _items(None, _logger_name),
    "data.shards": _non_empty,
    "data.batch_size": AT_LEAST_ONE,
    "data.image_size": AT_LEAST_ONE,
    "data.crop_scale": _items(2, _number(0, 1, low_open=True), ordered=True),
    "data.crop_ratio": _items(2, POSITIVE, ordered=True),
    "data.hflip": _number(0, 1),
    "data.mean": _items(3, _number(0, 1)),  # of images scaled to [0, 1]
    "data.std": _items(3, POSITIVE),
    "data.cache_limit_gb": POSITIVE,
    "data.download_timeout_s": POSITIVE,
    "data.download_min_rate": POSITIVE,
    "data.shuffle_window": AT_LEAST_ONE,
    "model.student": _non_empty,
    "model.drop_path_rate": _number(0, 1, high_open=True),
    "teacher.layers": _items(None, _any_int),
    "mask.ratio": _number(0, 1, low_open=True, high_open=True),
    "mask.patch_size": AT_LEAST_ONE,
    "optim.lr": POSITIVE,
    "optim.betas": _items(2, _number(0, 1, high_open=True)),
    "optim.eps": POSITIVE,
    "checkpoint.every_steps": AT_LEAST_ONE,
    "checkpoint.keep_last": AT_LEAST_ONE,
    "eval.k": AT_LEAST_ONE,
    "eval.temperature": POSITIVE,
    # choice lists, each imported from the code that implements the choices
    "method.name": _one_of(PRESETS),
    "deepspeed.precision": _one_of(tuple(PRECISIONS)),
    "data.decode": _one_of(DECODE_MODES),
    "teacher.kind": _one_of(TEACHER_KINDS),
    "eval.monitor": _one_of(MONITORS),
    # choice lists config.py owns (read by comparisons where they are used)
    "deepspeed.zero_stage": _one_of((0, 1, 2, 3)),
    "run.device": _one_of(("auto", "cpu", "cuda")),
    "model.pos_embed_init": _one_of(("timm", "sincos", "sincos_frozen")),
    "eval.pool": _one_of(("cls", "mean")),
    "data.count_mismatch": _one_of(("error", "skip")),
    "data.cache_dir": _folder_or_absent,
}


def check_ranges(cfg: Config) -> None:
    """Apply RULES (and the finite, >= 0 default for numbers) to every key; ConfigError names the first bad one."""
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        for key in dataclasses.fields(values):
            check_key(f"{section.name}.{key.name}", getattr(values, key.name))


def check_key(name: str, value: Any) -> None:
    """One key's RULES entry (or the finite, >= 0 default for numbers); ConfigError naming the key."""
    rule = RULES.get(name)
    if rule is None and isinstance(value, (int, float)) and not isinstance(value, bool):
        rule = _number()
    if rule is not None and (problem := rule(value)) is not None:
        raise ConfigError(f"{name}{problem}" if problem.startswith("=") else f"{name} {problem}")


def validate(cfg: Config) -> Config:
    """Every key's rule (check_ranges), then the rules that tie several keys together, which RULES cannot express."""
    check_ranges(cfg)
    if cfg.data.image_size % cfg.mask.patch_size:
        raise ConfigError(
            f"data.image_size={cfg.data.image_size} is not a multiple of mask.patch_size={cfg.mask.patch_size}; "
            "change one of them so the mask cells tile the image"
        )
    if cfg.eval.knn_every > 0 and not (cfg.eval.train_shards and cfg.eval.val_shards):
        raise ConfigError(
            "eval.knn_every > 0 needs eval.train_shards and eval.val_shards (labelled shards); set them or set "
            "eval.knn_every=0"
        )
    check_method_choice(cfg)
    return cfg


def check_method_choice(cfg: Config) -> None:
    """A known preset (mimscale/presets.py), and a teacher where the preset needs one."""
    check_key("method.name", cfg.method.name)
    if PRESETS[cfg.method.name].needs_teacher and cfg.teacher.kind == "none":
        raise ConfigError(f"method.name={cfg.method.name} needs a teacher: set teacher.kind to open_clip or timm")


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item_tp) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typing.get_origin(tp) is list and isinstance(value, list) and typing.get_args(tp) == (float,):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def _unknown(kind: str, key: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown {kind} '{key}'{where}.{hint} Valid: {', '.join(valid)}")


def _build_section(name: str, values: dict, where: str) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    if not isinstance(values, dict):
        raise ConfigError(f"section '{name}'{where} must be a mapping of keys, got {type(values).__name__}")
    values = _drop_retired(name, values, where)
    for key, value in values.items():
        if key not in hints:
            raise _unknown("key", f"{name}.{key}", sorted(hints), where)
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"{name}.{key}{where} must be of type {getattr(hints[key], '__name__', hints[key])}, "
                f"got {value!r} ({type(value).__name__})"
            )
    return cls(**{key: _coerce(value, hints[key]) for key, value in values.items()})


def _drop_retired(section: str, values: dict, where: str) -> dict:
    kept = {}
    for key, value in values.items():
        retired = RETIRED_KEYS.get(f"{section}.{key}")
        if retired is None:
            kept[key] = value
        elif value != retired[0]:
            raise ConfigError(f"{section}.{key}{where} was removed: {retired[1]}; delete the key")
    return kept


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config, following ``base:`` chains (later files override earlier ones)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file (see configs/)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of sections, got {type(raw).__name__}")
    _refuse_glued_colons(raw, f"config file {path}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"config 'base' chain loops through {base_path}")
    merged = _read_yaml(base_path, seen + (base_path,))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def parse_override(text: str) -> tuple[str, str, Any]:
    """Split ``section.key=value`` into its parts; the value is parsed as YAML (numbers, lists, bools)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. optim.lr=1e-4)")
    dotted, raw_value = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML: {err}") from err
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-4" as a string
    _refuse_glued_colons(value, f"override '{text}'")
    return section, key, value


def _refuse_glued_colons(value: Any, where: str) -> None:
    """YAML reads ``{depth:2}`` as the key 'depth:2' with no value, which timm then drops without a word."""
    if isinstance(value, dict):
        for key, inner in value.items():
            if isinstance(key, str) and ":" in key and inner is None:
                name, _, rest = key.partition(":")
                raise ConfigError(
                    f"{where}: '{key}' reads as a key with no value; put a space after the colon ({name}: {rest})"
                )
            _refuse_glued_colons(inner, where)
    elif isinstance(value, list):
        for inner in value:
            _refuse_glued_colons(inner, where)


def _set_dotted(section: dict, key: str, value: Any) -> dict:
    """Set ``key`` (``name`` or ``dict_field.sub.key``) in a section mapping; nested keys update dict fields."""
    head, _, rest = key.partition(".")
    if rest:
        inner = section.get(head)
        section[head] = _set_dotted(dict(inner) if isinstance(inner, dict) else {}, rest, value)
    else:
        section[head] = value
    return section


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity")


def from_dict(raw: dict, where: str = "") -> Config:
    sections = {}
    for name, values in raw.items():
        if name not in SECTIONS:
            raise _unknown("section", name, sorted(SECTIONS), where)
        sections[name] = _build_section(name, values or {}, where)
    return validate(Config(**sections))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults), apply ``section.key=value`` overrides, validate."""
    raw = _read_yaml(Path(path)) if path else {}
    for name, values in raw.items():
        if isinstance(values, str) or values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"section '{name}' in {path} must be a mapping of keys")
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise _unknown("section", section, sorted(SECTIONS), f" in --set {text}")
        valid = sorted(typing.get_type_hints(SECTIONS[section]))
        if key.split(".")[0] not in valid:
            raise _unknown("key", f"{section}.{key.split('.')[0]}", valid, f" in --set {text}")
        raw[section] = _set_dotted(dict(raw.get(section) or {}), key, value)
    where = f" in {path}" if path else ""
    if overrides:
        where += " (with --set overrides)" if path else " in --set overrides"
    return from_dict(raw, where=where)


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file), never through a planted link."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, config_to_yaml(cfg))
