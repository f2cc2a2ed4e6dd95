"""Sharded checkpoints that resume exactly, and survive a crash at any moment.

Layout (DeepSpeed writes the shards; we add the rest):

    <output_dir>/checkpoints/latest                     tag of the newest complete checkpoint (written last)
    <output_dir>/checkpoints/step_00000100/             DeepSpeed shards (model, optimizer, scheduler states)
    <output_dir>/checkpoints/step_00000100/rng_rank0.pt RNG states of rank 0 (one file per rank)
    <output_dir>/checkpoints/step_00000100/mimscale.json  step, data position, resolved config, world size, stage

A checkpoint is complete only once every rank has finished writing and rank 0 has written ``mimscale.json``
(atomically, after a barrier); ``latest`` is updated after that. A kill at any moment therefore leaves either a
complete new checkpoint or an incomplete folder that resume reports and skips, never a damaged previous one.

Every file we (or DeepSpeed) load from a checkpoint is hostile until checked: ``mimscale.json`` records each
file's size and sha256, resume verifies them (the ranks share the work and agree) and falls back to the newest
checkpoint that verifies, and every ``.pt`` file is unpickled only with ``weights_only=True`` and the exact
allowlist of classes DeepSpeed's states hold, before DeepSpeed touches it and while DeepSpeed loads it. A file
that needs anything else is refused by name unless the user trusts the folder (``--trust-checkpoint`` or
MIMSCALE_TRUST_CHECKPOINTS=1).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

from mimscale.engine import distributed, faults
from mimscale.engine.ckpt_meta import MetaError, check_meta
from mimscale.engine.safe_load import (
    UnsafeCheckpointError,
    deepspeed_loads_weights_only,
    load_file,
    refuse_forced_unsafe_loading,
)
from mimscale.storage.atomic import atomic_write, is_inside

MARKER = "mimscale.json"
UNIVERSAL_DIR = "universal"  # DeepSpeed universal checkpoint of a tag, made when the world size changes
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
RNG_FILE = re.compile(r"^rng_rank\d+\.pt$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"'{tag}' is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(match.group(1))


def remove_entry(path: Path) -> None:
    """Delete what is at ``path`` without following a link: a link (or a file) is unlinked, only a real folder is
    removed with its contents, so a link planted in the run folder never makes us delete what it points to."""
    try:
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass


def rng_state() -> dict:
    """This process's RNG states as tensors and ints only, so the file loads with ``weights_only=True``."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    saved = state["numpy"]
    if isinstance(saved, dict):
        keys = saved["keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, saved["pos"], saved["has_gauss"], saved["cached_gaussian"]))
    else:  # written before rng files held only tensors: numpy's own tuple
        np.random.set_state(saved)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CheckpointDamagedError(ValueError):
    """No usable checkpoint: files are missing, truncated, altered, or mimscale.json is unreadable."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _data_files(tag_dir: Path) -> list[str]:
    """Relative names of the files a checkpoint consists of (the marker and temporaries excluded)."""
    names = []
    for path in sorted(tag_dir.rglob("*")):
        relative = path.relative_to(tag_dir).as_posix()
        if path.is_dir() or path.name == MARKER or path.name.endswith(".tmp"):
            continue
        if relative.split("/")[0] in (UNIVERSAL_DIR, UNIVERSAL_DIR + ".tmp"):
            continue
        names.append(relative)
    return names


def _record_files(tag_dir: Path, rank: int, world_size: int) -> dict:
    """{name: {size, sha256}} of every checkpoint file; the ranks hash disjoint shares (collective).

    A file that cannot be read is recorded as {error} (every rank then sees it), never raised on one rank alone.
    """
    names = distributed.broadcast_object(_data_files(tag_dir) if rank == 0 else None)
    mine = {}
    for name in names[rank::world_size]:
        try:
            mine[name] = {"size": (tag_dir / name).stat().st_size, "sha256": _sha256(tag_dir / name)}
        except OSError as err:
            mine[name] = {"error": f"{type(err).__name__}: {err}"}
    records = {}
    for share in distributed.all_gather_object(mine):
        records.update(share)
    return dict(sorted(records.items()))


def _check_file(tag_dir: Path, name: str, expected: dict | None, trusted: bool) -> tuple[str, str] | None:
    """('unsafe' | 'damaged', why) for one file, or None when it is fine."""
    path = tag_dir / name
    if not path.exists():  # a missing RNG file costs exactness only: load_checkpoint warns about it
        return None if RNG_FILE.match(name) else ("damaged", f"{name} is missing")
    if not is_inside(path, tag_dir):  # a folder on the way is a link: never read (or hash) what it points to
        return "damaged", f"{name} lies outside the checkpoint folder (reached through a symbolic link)"
    if path.is_symlink() or not path.is_file():
        return "damaged", f"{name} is not a regular file"
    if name.endswith(".pt") and not trusted:
        try:
            load_file(path, trusted=False, mmap=True)
        except UnsafeCheckpointError as err:
            return "unsafe", str(err)
        except Exception as err:  # noqa: BLE001 - any reader error means the file is damaged
            return "damaged", f"{name} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if expected is None:
        return None
    size = path.stat().st_size
    if size != expected["size"]:
        return "damaged", f"{name} is {size} bytes, {expected['size']} were written (truncated or replaced)"
    if _sha256(path) != expected["sha256"]:
        return "damaged", f"{name} does not match the sha256 recorded when it was written (altered or corrupt)"
    return None


def verify_checkpoint(tag_dir: Path, rank: int = 0, world_size: int = 1, trusted: bool = False) -> list:
    """Problems of a complete checkpoint as [(kind, message)], the same list on every rank (collective).

    Every file recorded in mimscale.json is checked for size and sha256, and every ``.pt`` file (universal copies
    included) must load with weights_only unless ``trusted``; the ranks split the files between them.
    """
    try:
        meta = read_meta(tag_dir)
    except CheckpointDamagedError as err:
        return [("damaged", str(err))]
    expected = meta.get("files") or {}  # its names, sizes and sha256s were checked by read_meta's schema
    names = None
    if rank == 0:
        present = [p.relative_to(tag_dir).as_posix() for p in sorted(tag_dir.rglob("*.pt")) if ".tmp" not in p.name]
        names = sorted(set(expected) | set(present))
    names = distributed.broadcast_object(names)
    mine = [
        problem
        for name in names[rank::world_size]
        if (problem := _check_file(tag_dir, name, expected.get(name), trusted))
    ]
    return [problem for share in distributed.all_gather_object(mine) for problem in share]


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (complete or not), oldest first. A ``step_*`` link is never one: we would
    resume from, or prune, whatever it points to."""
    if not root.is_dir():
        return []
    tags = [p for p in root.iterdir() if TAG_PATTERN.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(tags, key=lambda path: step_of(path.name))


def linked_tags(root: Path) -> list[Path]:
    """``step_*`` entries of ``root`` that are symbolic links (reported, never resumed from or deleted through)."""
    return sorted(p for p in root.iterdir() if TAG_PATTERN.match(p.name) and p.is_symlink()) if root.is_dir() else []


def find_resume_checkpoint(
    root: Path, log=print, rank: int = 0, world_size: int = 1, *, trusted: bool = False
) -> Path | None:
    """The newest complete checkpoint whose files verify (collective); others are reported by name and skipped.

    A file that would need arbitrary code to load stops everything (UnsafeCheckpointError): falling back past it
    would hide an attack. No verifiable checkpoint among existing ones is an error, never a silent fresh start.
    """
    skipped = []
    for link in linked_tags(root):
        log(f"{link} is a symbolic link, not a checkpoint this run wrote; ignoring it (remove it)")
    for tag_dir in reversed(list_checkpoints(root)):
        if not is_complete(tag_dir):
            log(f"checkpoint {tag_dir} is incomplete (no {MARKER}: the run died while writing it); skipping it")
            continue
        problems = verify_checkpoint(tag_dir, rank, world_size, trusted)
        unsafe = [message for kind, message in problems if kind == "unsafe"]
        if unsafe:
            raise UnsafeCheckpointError(unsafe[0])
        if not problems:
            return tag_dir
        reasons = "; ".join(message for _, message in problems[:4])
        log(f"checkpoint {tag_dir} is damaged ({reasons}); skipping it")
        skipped.append(f"{tag_dir.name}: {reasons}")
    if skipped:
        raise CheckpointDamagedError(
            f"no checkpoint in {root} verifies ({' | '.join(skipped)}); restore the files, or move the damaged "
            "step_* folders away to start over, or set run.output_dir to a new folder"
        )
    return None


def resolve_checkpoint(path: Path, log=print, rank: int = 0, world_size: int = 1, *, trusted: bool = False) -> Path:
    """A tag folder, a checkpoints/ folder or a run folder -> the newest complete tag folder in it that verifies."""
    if is_complete(path) or (path.is_dir() and TAG_PATTERN.match(path.name)):
        if not is_complete(path):
            raise FileNotFoundError(f"{path} is incomplete ({MARKER} is missing): the run died while writing it")
        problems = verify_checkpoint(path, rank, world_size, trusted)
        for kind, message in problems:
            if kind == "unsafe":
                raise UnsafeCheckpointError(message)
        if problems:
            reasons = "; ".join(message for _, message in problems[:4])
            raise CheckpointDamagedError(f"checkpoint {path} is damaged: {reasons}; pick another checkpoint")
        return path
    for root in (path, path / "checkpoints"):
        found = find_resume_checkpoint(root, log, rank, world_size, trusted=trusted) if root.is_dir() else None
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete mimscale checkpoint at {path} (give a run folder or a step_* folder)")


def read_meta(tag_dir: Path) -> dict:
    """mimscale.json of a checkpoint; CheckpointDamagedError naming the file if it is unreadable or incomplete."""
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete mimscale checkpoint ({MARKER} is missing)")
    if marker.is_symlink():
        raise CheckpointDamagedError(f"{marker} is a symbolic link, not the record mimscale wrote: damaged")
    if marker.stat().st_size > 64 << 20:
        raise CheckpointDamagedError(f"{marker} is {marker.stat().st_size} bytes, far too big for a checkpoint record")
    try:
        meta = json.loads(marker.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointDamagedError(f"{marker} is not valid JSON ({err}); the checkpoint record is damaged") from err
    try:
        return check_meta(meta, str(marker))
    except MetaError as err:
        raise CheckpointDamagedError(f"{err}; the checkpoint record is damaged") from err


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank (disk full, unwritable folder); the previous one is intact."""


def save_checkpoint(engine, root: Path, step: int, meta: dict, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    If any rank fails to write (disk full, permissions), every rank raises CheckpointWriteError, the partial
    folder is removed and ``latest`` still names the previous complete checkpoint.
    """
    tag = tag_for_step(step)
    tag_dir = root / tag
    if rank == 0 and (tag_dir.exists() or tag_dir.is_symlink()):  # a leftover of a run that died writing this step
        remove_entry(tag_dir)  # (a link planted there is removed, never written or deleted through)
    distributed.barrier()
    error = _write_shards(engine, root, tag, meta, rank)
    faults.maybe_kill_in_save(rank, step)
    faults.maybe_stall_in_save(rank, step)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:  # every shard of every rank is on disk, or none
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
        raise CheckpointWriteError(
            f"could not write checkpoint {tag_dir}: {error or 'failed on another rank (see its log)'}. "
            f"The previous complete checkpoint ({previous}) is intact; free disk space or point run.output_dir "
            "at a writable folder with room, then resume (--resume auto)"
        )
    meta = {**meta, "frozen_params": frozen_param_names(engine.module)}
    meta = {**meta, "files": _record_files(tag_dir, rank, distributed.world_size())}
    unreadable = [f"{name} ({record['error']})" for name, record in meta["files"].items() if "error" in record]
    if unreadable:
        error = f"could not read back {unreadable[0]}"
    if rank == 0 and not error:
        try:
            atomic_write(tag_dir / MARKER, json.dumps(meta, indent=2, default=str))
            atomic_write(root / "latest", tag)
        except OSError as err:
            error = str(err)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:
        raise CheckpointWriteError(f"could not finalise checkpoint {tag_dir}: {error}; the previous one is intact")
    return tag_dir


def _write_shards(engine, root: Path, tag: str, meta: dict, rank: int) -> str:
    """This rank's part of a checkpoint; returns an error message instead of raising, so ranks can agree."""
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"mimscale": meta}, save_latest=False)
        buffer = io.BytesIO()
        torch.save(rng_state(), buffer)  # a few KB; written by the one no-follow atomic writer
        atomic_write(root / tag / f"rng_rank{rank}.pt", buffer.getvalue())
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        return f"{type(err).__name__}: {err}"
    return ""


def load_checkpoint(
    engine, tag_dir: Path, rank: int, universal: bool = False, config: dict | None = None, *, trusted: bool = False
) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the checkpoint's meta.

    ``universal`` loads the converted copy (the engine must have been built with checkpoint.load_universal).
    The files must have been verified (verify_checkpoint); DeepSpeed's own loads run with weights_only forced
    unless ``trusted``.
    ``config`` (this run's, as a dict) turns a model mismatch into an error naming the differing keys.
    """
    meta = read_meta(tag_dir)
    rng_path = tag_dir / f"rng_rank{rank}.pt"
    if not rng_path.is_file() and rank < meta["world_size"]:  # absent is normal only on more ranks than saved
        warnings.warn(
            f"{rng_path} is missing: rank {rank} continues with fresh random states (dropout/drop-path), so the "
            "run will not repeat an uninterrupted one exactly",
            stacklevel=2,
        )
    load_dir, tag = (tag_dir, UNIVERSAL_DIR) if universal else (tag_dir.parent, tag_dir.name)
    try:
        with deepspeed_loads_weights_only(trusted):
            load_path, _ = engine.load_checkpoint(
                str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
    except (RuntimeError, ValueError, KeyError, AssertionError, IndexError) as err:
        if isinstance(err, UnsafeCheckpointError):
            raise
        diff = model_config_diff(meta.get("config", {}), config) if config is not None else []
        if not diff:
            raise
        raise CheckpointMismatchError(
            f"checkpoint {tag_dir} was trained with a different model; these config keys differ (saved -> now):\n"
            + "\n".join(diff)
            + "\nresume with the saved values, or set run.output_dir to a new folder for a new model"
        ) from err
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}; check that its shards are all present")
    if rng_path.is_file():
        set_rng_state(load_file(rng_path, trusted))
    return meta


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another model than this config builds; the message lists the differing keys."""


MODEL_SECTIONS = ("model", "method", "teacher", "data.image_size")  # what shapes the trained parameters


def config_diff(saved: dict, current: dict, only: tuple[str, ...] = ()) -> list[str]:
    """Lines '  section.key: saved -> current' for every key that differs (restricted to ``only`` if given)."""
    lines = []
    for section, values in current.items():
        for key, value in values.items():
            if only and section not in only and f"{section}.{key}" not in only:
                continue
            before = (saved.get(section) or {}).get(key, "<absent>") if isinstance(saved, dict) else "<absent>"
            if before != value:
                lines.append(f"  {section}.{key}: {before!r} -> {value!r}")
    return lines


def model_config_diff(saved: dict, current: dict) -> list[str]:
    return config_diff(saved, current, only=MODEL_SECTIONS)


def prune_checkpoints(root: Path, *, keep_last: int, keep_every: int, protect=()) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, keeping multiples of ``keep_every`` and the
    ``protect``-ed folders (the one just written, the one this run resumed from)."""
    complete = [path for path in list_checkpoints(root) if is_complete(path)]
    keep = set(complete[-keep_last:])
    if keep_every > 0:
        keep |= {path for path in complete if step_of(path.name) % keep_every == 0}
    keep |= {Path(path) for path in protect if path is not None}
    removed = []
    for path in complete:
        if path not in keep and not path.is_symlink():  # list_checkpoints skips links; checked again before deleting
            (path / MARKER).unlink()  # first make it incomplete, so a kill mid-delete never looks complete
            shutil.rmtree(path)
            removed.append(path)
    return removed


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir / UNIVERSAL_DIR


# DeepSpeed's converter, with our allowlist registered: TORCH_FORCE_WEIGHTS_ONLY_LOAD makes its loads weights_only.
_SAFE_CONVERTER = (
    "import torch; from mimscale.engine.safe_load import deepspeed_safe_globals; "
    "torch.serialization.add_safe_globals(deepspeed_safe_globals()); "
    "from deepspeed.checkpoint import ds_to_universal as c; c.main(c.parse_arguments())"
)


def convert_to_universal(tag_dir: Path, workers: int = 2, *, trusted: bool = False) -> Path:
    """Turn a sharded ZeRO checkpoint into a DeepSpeed universal checkpoint (loadable on any number of ranks).

    Runs DeepSpeed's own converter (with --inject_missing_state, which ZeRO-1/2 checkpoints need) into a
    temporary folder that is renamed when complete, so a killed conversion is simply redone.
    """
    if not trusted:
        refuse_forced_unsafe_loading()  # the converter's loads are forced weights-only; torch refuses both
    target = universal_dir(tag_dir)
    if target.is_symlink():
        raise CheckpointDamagedError(
            f"{target} is a symbolic link, not a universal checkpoint mimscale made; remove it and convert again"
        )
    if target.is_dir():
        return target
    tmp = tag_dir / (UNIVERSAL_DIR + ".tmp")
    remove_entry(tmp)  # a leftover of a killed conversion, or a planted link: removed, never written through
    tmp.mkdir()
    command = [
        sys.executable,
        "-c",
        _SAFE_CONVERTER,
        "--input_folder",
        str(tag_dir),
        "--output_folder",
        str(tmp),
        "--inject_missing_state",
        "--num_extract_workers",
        str(workers),
        "--num_merge_workers",
        str(max(1, workers // 2)),
    ]
    env = os.environ if trusted else {**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        remove_entry(tmp)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{tail}")
    tmp.replace(target)
    return target


# ------------------------------------------------------------------ reading a checkpoint's weights (export, eval)

ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's ZeRO-0 model (+ optimizer) file of rank 0


def checkpoint_dir(path: Path, tag: str | None = None, *, trusted: bool = False) -> Path:
    """The complete checkpoint folder to read: ``tag`` inside a run/checkpoints folder, or the newest one."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist; give a run folder or a step_* folder")
    if tag is None:
        return resolve_checkpoint(path, trusted=trusted)
    for root in (path, path / "checkpoints"):
        if (root / tag).is_dir():
            if not is_complete(root / tag):
                raise FileNotFoundError(
                    f"{root / tag} is incomplete ({MARKER} is missing): the run died while writing it; "
                    "pick another --tag or leave it out for the newest complete checkpoint"
                )
            return resolve_checkpoint(
                root / tag, trusted=trusted
            )  # sizes, sha256s and weights-only loadability verified
    tags = [p.name for p in list_checkpoints(path / "checkpoints") or list_checkpoints(path)]
    raise FileNotFoundError(f"no checkpoint {tag} under {path}; available: {', '.join(tags) or 'none'}")


def load_fp32_state(tag_dir: Path, *, trusted: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:
    """(mimscale.json metadata, fp32 state dict of the whole trained method) from a checkpoint of any ZeRO stage.

    The weights are the fp32 master weights: ZeRO 1-3 shards merged by DeepSpeed's zero_to_fp32, or at ZeRO-0
    the optimizer's fp32 groups of a bf16/fp16 run; never the low-precision copy the forward pass used.
    """
    meta = read_meta(tag_dir)
    if meta.get("zero_stage", 0) == 0:
        return meta, _zero0_fp32_state(tag_dir, meta, trusted)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO())  # chatty
    with quiet[0], quiet[1], deepspeed_loads_weights_only(trusted):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return meta, {name: tensor.float() for name, tensor in state.items()}


def frozen_param_names(module: torch.nn.Module) -> list[str]:
    """Parameters the optimizer never saw (requires_grad=False, e.g. a sincos_frozen position table)."""
    return [name for name, param in module.named_parameters() if not param.requires_grad]


FROZEN_TABLE = "student.backbone.pos_embed"  # model.pos_embed_init=sincos_frozen's table in the method's state


def _frozen_in_checkpoint(meta: dict) -> set[str]:
    """Frozen parameter names of a checkpoint: recorded at save, or (older checkpoints) implied by the config."""
    recorded = meta.get("frozen_params")
    if recorded is not None:
        if not isinstance(recorded, list) or not all(isinstance(name, str) for name in recorded):
            raise ValueError(f"{MARKER}: frozen_params must be a list of parameter names, got {recorded!r:.200}")
        return set(recorded)
    model_cfg = (meta.get("config") or {}).get("model") or {}
    return {FROZEN_TABLE} if model_cfg.get("pos_embed_init") == "sincos_frozen" else set()


def _zero0_fp32_state(tag_dir: Path, meta: dict, trusted: bool) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module weights, replaced by the optimizer's fp32 masters when training ran in bf16/fp16.

    The optimizer groups hold the trainable parameters only; frozen ones keep their module value."""
    from mimscale.engine.optim import decay_split

    saved = load_file(tag_dir / ZERO0_MODEL_FILE, trusted)
    module: dict[str, torch.Tensor] = dict(saved["module"])
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if all(t.dtype == torch.float32 for t in module.values()):
        return dict(module)
    if not fp32_groups:
        print(
            f"note: {tag_dir} holds no fp32 master weights; reading its low-precision weights as fp32", file=sys.stderr
        )
        return {name: tensor.float() for name, tensor in module.items()}
    untrained = set(saved.get("buffer_names") or []) | _frozen_in_checkpoint(meta)
    groups = [g for g in decay_split((n, t) for n, t in module.items() if n not in untrained) if g]
    if [len(g) for g in groups] != [len(g) for g in fp32_groups]:
        raise ValueError(
            f"{tag_dir}: the fp32 optimizer groups ({[len(g) for g in fp32_groups]} tensors) do not match the "
            f"module's trainable parameters ({[len(g) for g in groups]}); was it written by another mimscale version?"
        )
    state = {name: tensor.float() for name, tensor in module.items()}
    for names, masters in zip(groups, fp32_groups, strict=True):
        for name, master in zip(names, masters, strict=True):
            if tuple(master.shape) != tuple(module[name].shape):
                raise ValueError(f"{tag_dir}: fp32 master of {name} has shape {tuple(master.shape)}")
            state[name] = master.detach().float().clone()
    return state
