"""`mimscale ckpt info|convert`: look inside a checkpoint, or make it loadable on any number of ranks."""

from __future__ import annotations

import argparse
from pathlib import Path

from mimscale.config import Config, from_dict, load_config
from mimscale.engine import checkpoint as ckpt
from mimscale.engine.safe_load import add_trust_argument, trust_decision


def config_diff(saved: dict, current: Config) -> list[str]:
    """Lines 'section.key: saved -> current' for every key that differs."""
    return ckpt.config_diff(saved, current.to_dict())


def _newest(path: Path) -> Path:
    """The tag folder ``path`` names, or the newest one with a mimscale.json (verified or not: info reports it)."""
    if ckpt.is_complete(path):
        return path
    for root in (path, path / "checkpoints"):
        complete = [tag for tag in ckpt.list_checkpoints(root) if ckpt.is_complete(tag)]
        if complete:
            return complete[-1]
    raise FileNotFoundError(f"no complete mimscale checkpoint at {path} (give a run folder or a step_* folder)")


def info(args: argparse.Namespace) -> int:
    """Show a checkpoint and verify it; exit 1 (after saying what is wrong) if it is damaged or unsafe."""
    trusted = trust_decision(args)
    tag_dir = _newest(Path(args.path))
    print(f"checkpoint   {tag_dir}")
    problems = ckpt.verify_checkpoint(tag_dir, trusted=trusted)
    try:
        meta = ckpt.read_meta(tag_dir)
    except ckpt.CheckpointDamagedError as err:
        print(f"DAMAGED      {err}")
        return 1
    files = meta.get("files")
    size = sum(p.stat().st_size for p in tag_dir.rglob("*") if p.is_file() and not p.is_symlink())
    print(f"step         {meta['step']}")
    print(f"samples seen {meta['samples_seen']}")
    print(f"world size   {meta['world_size']}")
    print(f"ZeRO stage   {meta['zero_stage']}  precision {meta.get('precision', '?')}")
    print(f"data state   {meta.get('data_state')}")
    print(f"files        {len(files) if files else '?'} recorded, {size / 2**20:.1f} MiB on disk")
    print(f"universal    {'yes' if ckpt.universal_dir(tag_dir).is_dir() else 'no'}")
    for kind, message in problems:
        print(f"{kind.upper():<12} {message}")
    if not problems:
        hashes = "sizes and sha256 match" if files else "no hashes recorded (older checkpoint)"
        safety = "pickles not checked (--trust-checkpoint)" if trusted else "every .pt file loads weights-only"
        print(f"integrity    ok: {hashes}; {safety}")
    saved_cfg = meta["config"]
    from_dict(saved_cfg)  # the stored config must still be a valid config for this version
    if args.config:
        diff = config_diff(saved_cfg, load_config(args.config, args.overrides))
        print(f"config diff against {args.config}:" if diff else f"config identical to {args.config}")
        if diff:
            print("\n".join(diff))
    return 1 if problems else 0


def convert(args: argparse.Namespace) -> int:
    trusted = trust_decision(args)
    tag_dir = ckpt.resolve_checkpoint(Path(args.path), trusted=trusted)
    meta = ckpt.read_meta(tag_dir)
    if meta["zero_stage"] == 0:
        print(f"{tag_dir} is a ZeRO-0 checkpoint: it already loads on any number of ranks")
        return 0
    out = ckpt.convert_to_universal(tag_dir, workers=args.workers, trusted=trusted)
    print(f"wrote universal checkpoint {out}; `mimscale train --resume {tag_dir}` loads it on any number of ranks")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("ckpt", help="inspect or convert checkpoints")
    commands = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    show = commands.add_parser("info", help="step, samples seen, world size, ZeRO stage, config diff")
    show.add_argument("path", help="run folder, its checkpoints/ folder or a step_* folder")
    show.add_argument("--config", help="compare the stored config with this YAML config")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    add_trust_argument(show)
    show.set_defaults(func=info)
    conv = commands.add_parser("convert", help="DeepSpeed universal checkpoint (resume on another world size)")
    conv.add_argument("path", help="run folder, its checkpoints/ folder or a step_* folder")
    conv.add_argument("--workers", type=int, default=2, help="parallel extraction workers")
    add_trust_argument(conv)
    conv.set_defaults(func=convert)
