"""Sharded checkpoints that resume exactly, and survive a crash at any moment.

Layout (DeepSpeed writes the shards; we add the rest):

    <output_dir>/checkpoints/latest                     tag of the newest complete checkpoint (written last)
    <output_dir>/checkpoints/step_00000100/             DeepSpeed shards (model, optimizer, scheduler states)
    <output_dir>/checkpoints/step_00000100/rng_rank0.pt RNG states of rank 0 (one file per rank)
    <output_dir>/checkpoints/step_00000100/mimscale.json  step, data position, resolved config, world size, stage

A checkpoint is complete only once every rank has finished writing and rank 0 has written ``mimscale.json``
(atomically, after a barrier); ``latest`` is updated after that. A kill at any moment therefore leaves either a
complete new checkpoint or an incomplete folder that resume reports and skips, never a damaged previous one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from mimscale.engine import distributed, faults

MARKER = "mimscale.json"
UNIVERSAL_DIR = "universal"  # DeepSpeed universal checkpoint of a tag, made when the world size changes
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int:
    match = TAG_PATTERN.match(tag)
    if not match:
        raise ValueError(f"'{tag}' is not a checkpoint tag (expected step_NNNNNNNN)")
    return int(match.group(1))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, fsync, rename: readers see the old or the new file, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root`` (complete or not), oldest first."""
    if not root.is_dir():
        return []
    tags = [path for path in root.iterdir() if path.is_dir() and TAG_PATTERN.match(path.name)]
    return sorted(tags, key=lambda path: step_of(path.name))


def find_resume_checkpoint(root: Path, log=print) -> Path | None:
    """The newest complete checkpoint; newer incomplete ones are reported by name and skipped."""
    for tag_dir in reversed(list_checkpoints(root)):
        if is_complete(tag_dir):
            return tag_dir
        log(f"checkpoint {tag_dir} is incomplete (no {MARKER}: the run died while writing it); skipping it")
    return None


def resolve_checkpoint(path: Path, log=print) -> Path:
    """A tag folder, a checkpoints/ folder or a run folder -> the newest complete tag folder in it."""
    if is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        found = find_resume_checkpoint(root, log=log) if root.is_dir() else None
        if found is not None:
            return found
    if path.is_dir() and TAG_PATTERN.match(path.name):
        raise FileNotFoundError(f"{path} is incomplete ({MARKER} is missing): the run died while writing it")
    raise FileNotFoundError(f"no complete mimscale checkpoint at {path} (give a run folder or a step_* folder)")


def read_meta(tag_dir: Path) -> dict:
    marker = tag_dir / MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{tag_dir} is not a complete mimscale checkpoint ({MARKER} is missing)")
    return json.loads(marker.read_text())


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank (disk full, unwritable folder); the previous one is intact."""


def save_checkpoint(engine, root: Path, step: int, meta: dict, rank: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder.

    If any rank fails to write (disk full, permissions), every rank raises CheckpointWriteError, the partial
    folder is removed and ``latest`` still names the previous complete checkpoint.
    """
    tag = tag_for_step(step)
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():  # a leftover from a run that died while writing this very step
        shutil.rmtree(tag_dir)
    distributed.barrier()
    error = _write_shards(engine, root, tag, meta, rank)
    faults.maybe_kill_in_save(rank, step)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:  # every shard of every rank is on disk, or none
        if rank == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        previous = (root / "latest").read_text().strip() if (root / "latest").is_file() else "none"
        raise CheckpointWriteError(
            f"could not write checkpoint {tag_dir}: {error or 'failed on another rank (see its log)'}. "
            f"The previous complete checkpoint ({previous}) is intact; free disk space or point run.output_dir "
            "at a writable folder with room, then resume (--resume auto)"
        )
    if rank == 0:
        try:
            write_atomic(tag_dir / MARKER, json.dumps(meta, indent=2, default=str))
            write_atomic(root / "latest", tag)
        except OSError as err:
            error = str(err)
    if distributed.all_reduce_max(1.0 if error else 0.0)[0] > 0:
        raise CheckpointWriteError(f"could not finalise checkpoint {tag_dir}: {error}; the previous one is intact")
    return tag_dir


def _write_shards(engine, root: Path, tag: str, meta: dict, rank: int) -> str:
    """This rank's part of a checkpoint; returns an error message instead of raising, so ranks can agree."""
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state={"mimscale": meta}, save_latest=False)
        rng_path = root / tag / f"rng_rank{rank}.pt"
        torch.save(rng_state(), rng_path.with_name(rng_path.name + ".tmp"))
        os.replace(rng_path.with_name(rng_path.name + ".tmp"), rng_path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
        return f"{type(err).__name__}: {err}"
    return ""


def load_checkpoint(engine, tag_dir: Path, rank: int, universal: bool = False) -> dict:
    """Restore engine (weights, optimizer, scheduler) and this rank's RNG; returns the checkpoint's meta.

    ``universal`` loads the converted copy (the engine must have been built with checkpoint.load_universal).
    """
    meta = read_meta(tag_dir)
    load_dir, tag = (tag_dir, UNIVERSAL_DIR) if universal else (tag_dir.parent, tag_dir.name)
    load_path, _ = engine.load_checkpoint(
        str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}; check that its shards are all present")
    rng_path = tag_dir / f"rng_rank{rank}.pt"
    if rng_path.is_file():  # absent when resuming on more ranks than were saved
        set_rng_state(torch.load(rng_path, weights_only=False))
    return meta


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
        if path not in keep:
            (path / MARKER).unlink()  # first make it incomplete, so a kill mid-delete never looks complete
            shutil.rmtree(path)
            removed.append(path)
    return removed


def universal_dir(tag_dir: Path) -> Path:
    return tag_dir / UNIVERSAL_DIR


def convert_to_universal(tag_dir: Path, workers: int = 2) -> Path:
    """Turn a sharded ZeRO checkpoint into a DeepSpeed universal checkpoint (loadable on any number of ranks).

    Runs DeepSpeed's own converter (with --inject_missing_state, which ZeRO-1/2 checkpoints need) into a
    temporary folder that is renamed when complete, so a killed conversion is simply redone.
    """
    target = universal_dir(tag_dir)
    if target.is_dir():
        return target
    tmp = tag_dir / (UNIVERSAL_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    command = [
        sys.executable,
        "-m",
        "deepspeed.checkpoint.ds_to_universal",
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
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"converting {tag_dir} to a universal checkpoint failed:\n{tail}")
    tmp.replace(target)
    return target


# ------------------------------------------------------------------ reading a checkpoint's weights (export, eval)

ZERO0_MODEL_FILE = "mp_rank_00_model_states.pt"  # DeepSpeed's ZeRO-0 model (+ optimizer) file of rank 0


def checkpoint_dir(path: Path, tag: str | None = None) -> Path:
    """The complete checkpoint folder to read: ``tag`` inside a run/checkpoints folder, or the newest one."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint path {path} does not exist; give a run folder or a step_* folder")
    if tag is None:
        return resolve_checkpoint(path)
    for root in (path, path / "checkpoints"):
        if (root / tag).is_dir():
            if not is_complete(root / tag):
                raise FileNotFoundError(
                    f"{root / tag} is incomplete ({MARKER} is missing): the run died while writing it; "
                    "pick another --tag or leave it out for the newest complete checkpoint"
                )
            return root / tag
    tags = [p.name for p in list_checkpoints(path / "checkpoints") or list_checkpoints(path)]
    raise FileNotFoundError(f"no checkpoint {tag} under {path}; available: {', '.join(tags) or 'none'}")


def load_fp32_state(tag_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(mimscale.json metadata, fp32 state dict of the whole trained method) from a checkpoint of any ZeRO stage.

    The weights are the fp32 master weights: ZeRO 1-3 shards merged by DeepSpeed's zero_to_fp32, or at ZeRO-0
    the optimizer's fp32 groups of a bf16/fp16 run; never the low-precision copy the forward pass used.
    """
    meta = read_meta(tag_dir)
    if meta.get("zero_stage", 0) == 0:
        return meta, _zero0_fp32_state(tag_dir)
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # chatty
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    return meta, {name: tensor.float() for name, tensor in state.items()}


def _zero0_fp32_state(tag_dir: Path) -> dict[str, torch.Tensor]:
    """ZeRO-0: the module weights, replaced by the optimizer's fp32 masters when training ran in bf16/fp16."""
    from mimscale.engine.optim import decay_split

    saved = torch.load(tag_dir / ZERO0_MODEL_FILE, map_location="cpu", weights_only=False)
    module: dict[str, torch.Tensor] = dict(saved["module"])
    fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups")
    if all(t.dtype == torch.float32 for t in module.values()):
        return dict(module)
    if not fp32_groups:
        print(
            f"note: {tag_dir} holds no fp32 master weights; reading its low-precision weights as fp32", file=sys.stderr
        )
        return {name: tensor.float() for name, tensor in module.items()}
    buffers = set(saved.get("buffer_names") or [])
    groups = [g for g in decay_split((n, t) for n, t in module.items() if n not in buffers) if g]
    if [len(g) for g in groups] != [len(g) for g in fp32_groups]:
        raise ValueError(f"{tag_dir}: the fp32 optimizer groups do not match the module's parameters")
    state = {name: tensor.float() for name, tensor in module.items()}
    for names, masters in zip(groups, fp32_groups, strict=True):
        for name, master in zip(names, masters, strict=True):
            if tuple(master.shape) != tuple(module[name].shape):
                raise ValueError(f"{tag_dir}: fp32 master of {name} has shape {tuple(master.shape)}")
            state[name] = master.detach().float().clone()
    return state
