"""`mimscale shards create|index|verify|inspect`: build, index, check and look at WebDataset shard sets."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mimscale.config import DataConfig
from mimscale.shards.format import (
    IMAGE_EXTS,
    LABEL_EXTS,
    MANIFEST_NAME,
    ShardError,
    TarWalk,
    file_sha256,
    load_manifest,
    load_remote_manifest,
    parse_label,
    split_key,
)
from mimscale.shards.images import BadImage, decode_rgb
from mimscale.shards.index import INDEX_NAME, SetIndex, published_index, scan_tar
from mimscale.shards.sets import expand_locations, index_split, open_shard_set, shard_folders
from mimscale.storage import remote
from mimscale.storage.shard_cache import ShardCache

MAX_LISTED_PROBLEMS = 50


# ----------------------------------------------------------------------------------------------- verify


def _read_members(path: Path, problems: list[str], name: str) -> int:
    """Read and decode every member; returns the number of samples with an image. Problems are appended."""
    keys: set[str] = set()
    try:
        with remote.open_regular(path) as handle:
            walk = TarWalk(handle, os.fstat(handle.fileno()).st_size)
            for member in walk:
                key, ext = split_key(member.name)
                if not member.is_regular or (ext not in IMAGE_EXTS and ext not in LABEL_EXTS):
                    continue
                handle.seek(member.data)
                data = handle.read(member.size)
                if ext in LABEL_EXTS:
                    if parse_label(data) == -1 and data.strip() != b"-1":
                        problems.append(f"{name}: member {member.name}: label is not an integer: {data[:20]!r}")
                    continue
                try:
                    decode_rgb(data, exif=False)
                    keys.add(key)
                except BadImage as err:
                    problems.append(f"{name}: member {member.name}: corrupt image ({err})")
            if walk.damage:
                problems.append(f"{name}: truncated or corrupt tar ({walk.damage})")
            else:
                handle.seek(walk.end)
                if handle.read().strip(b"\0"):
                    problems.append(f"{name}: unreadable data after byte {walk.end} (corrupt member header?)")
    except (OSError, remote.RemoteError) as err:
        problems.append(f"{name}: unreadable ({type(err).__name__}: {err})")
    return len(keys)


def verify_shard(path: Path, entry: dict | None, index=None, name: str = "") -> tuple[int, list[str], list[str]]:
    """Check one shard against its manifest entry (size, sha256, sample count) and its samples.idx rows, and
    decode every image. Returns (samples, problems, notes); a shard without a usable sample is a problem.
    ``name`` is the shard's name in the set when the file is a cached copy under another name."""
    name = name or path.name
    problems: list[str] = []
    if entry is not None:
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{name}: size {size} bytes, manifest says {entry.get('bytes')} (truncated?)")
        digest = file_sha256(path)
        if digest != entry.get("sha256"):
            problems.append(f"{name}: sha256 {digest[:12]}... differs from manifest {entry.get('sha256', '')[:12]}...")
    samples = _read_members(path, problems, name)
    if entry is not None and samples != entry.get("samples"):
        problems.append(f"{name}: {samples} readable samples, manifest says {entry.get('samples')}")
    try:
        scan = scan_tar(path)
    except ShardError as err:
        return samples, problems + [str(err)], []
    scan.name = name
    notes = []
    if scan.unusable:
        notes.append(
            f"{name}: {scan.unusable} sample(s) without an image member, skipped: "
            f"{', '.join(scan.unusable_examples)} (a WebDataset key ends at the first dot of the file "
            "name: rename img.0001.jpg to img_0001.jpg)"
        )
    if len(scan.rows) == 0:
        problems.append(f"{name}: no usable sample (an image member per key: <key>.jpg|png|webp)")
    if index is not None:
        problems += _index_problems(index, scan)
    return samples, problems, notes


def _index_problems(index, scan) -> list[str]:
    """Differences between samples.idx and a fresh scan of the tar."""
    number = index.position.get(scan.name)
    if number is None:
        return [f"{scan.name}: missing from {index.path.name}; rebuild it with `mimscale shards index`"]
    try:
        rows = index.shard_rows(number)
    except ShardError as err:
        return [str(err)]
    if int(index.shard_bytes[number]) != scan.bytes or not np.array_equal(rows, scan.rows):
        return [
            f"{scan.name}: its rows in {index.path.name} differ from the tar (stale index); rebuild it with "
            "`mimscale shards index`"
        ]
    return []


def _folder_set_index(folder: Path, problems: list[str]):
    if not (folder / INDEX_NAME).is_file():
        return None
    try:
        return SetIndex(folder / INDEX_NAME)
    except ShardError as err:
        problems.append(str(err))
        return None


def verify_folder(folder: Path) -> tuple[int, int, list[str]]:
    """(shards, samples, problems) for a shard folder, with or without a manifest and samples.idx."""
    from tqdm import tqdm

    manifest = load_manifest(folder)
    on_disk = {path.name: path for path in sorted(folder.glob("*.tar"))}
    entries = {entry["name"]: entry for entry in manifest["shards"]} if manifest else {}
    problems = [f"{name}: listed in {MANIFEST_NAME} but missing" for name in entries if name not in on_disk]
    if manifest:
        problems += [f"{name}: not listed in {MANIFEST_NAME}" for name in on_disk if name not in entries]
    if not on_disk:
        problems.append(f"{folder}: no .tar shards found")
    index = _folder_set_index(folder, problems)
    samples, notes = 0, []
    for name, path in tqdm(on_disk.items(), desc="verify", unit="shard", disable=None, file=sys.stderr):
        count, found, noted = verify_shard(path, entries.get(name) if manifest else None, index)
        samples += count
        problems += found
        notes += noted
    if manifest and not problems and samples != manifest.get("totals", {}).get("samples"):
        problems.append(f"total {samples} samples, manifest totals say {manifest['totals'].get('samples')}")
    for note in notes[:MAX_LISTED_PROBLEMS]:
        print(f"note: {note}", file=sys.stderr)
    leftovers = sorted(path.name for path in folder.glob("*.tar.tmp"))
    if leftovers:
        print(f"note: unfinished shards from a killed job: {', '.join(leftovers)}", file=sys.stderr)
    return len(on_disk), samples, problems


def _remote_spec(spec: str) -> bool:
    """A shard spec read through the node cache (URLs other than file://)."""
    return remote.is_url(spec) and remote.scheme_of(spec.split("::")[0].strip()) != "file"


def _remote_set_index(location: str, cache, problems: list[str]):
    """The samples.idx published beside a remote shard, or None when there is none (or none may be looked up:
    pipe: commands and signed URLs, see index.published_index)."""
    published = published_index(location)
    if published is None:
        return None
    try:
        return SetIndex(cache.local_path(published))
    except remote.RemoteNotFound:
        return None
    except ShardError as err:
        problems.append(str(err))
        return None


def verify_remote(spec: str, cache) -> tuple[int, int, list[str], bool]:
    """(shards, samples, problems, manifest found) for shards behind URLs: each one downloaded into ``cache`` as it
    is (not checked on the way, so that a damaged copy is reported rather than refused), verified, then dropped."""
    from tqdm import tqdm

    folders = shard_folders(expand_locations(spec, "OUT"), f"OUT={spec!r}")
    shards, samples, problems, notes, manifests = 0, 0, [], [], 0
    for folder, members in folders.items():
        names = list(members)
        siblings = remote.sibling_folder(members[names[0]])  # None: pipe: or signed URLs, nothing to look up
        manifest = load_remote_manifest(siblings) if siblings is not None else None
        manifests += manifest is not None
        entries = {entry["name"]: entry for entry in manifest["shards"]} if manifest else {}
        problems += [
            f"{name}: not listed in {folder}/{MANIFEST_NAME}" for name in names if manifest and name not in entries
        ]
        index = _remote_set_index(members[names[0]], cache, problems)
        for name in tqdm(names, desc="verify", unit="shard", disable=None, file=sys.stderr):
            location = members[name]
            try:
                path = cache.local_path(location)
            except remote.RemoteError as err:
                problems.append(f"{name}: {err}")
                continue
            try:
                count, found, noted = verify_shard(path, entries.get(name), index, name=name)
            finally:
                cache.release(location, drop=True)  # read once: leave the space to the next shard
            shards, samples, problems, notes = shards + 1, samples + count, problems + found, notes + noted
    for note in notes[:MAX_LISTED_PROBLEMS]:
        print(f"note: {note}", file=sys.stderr)
    return shards, samples, problems, manifests == len(folders)


def cmd_verify(args) -> int:
    if _remote_spec(args.out):
        cache = ShardCache.from_config(DataConfig(cache_dir=args.cache, cache_limit_gb=args.cache_limit_gb))
        try:
            shards, samples, problems, has_manifest = verify_remote(args.out, cache)
        finally:
            cache.close()
        where = args.out
    else:
        folder = Path(args.out)
        if not folder.is_dir():
            raise ShardError(
                f"{folder} is not a folder; pass the shard folder (the OUT of `mimscale shards create`) "
                "or a URL pattern"
            )
        shards, samples, problems = verify_folder(folder)
        has_manifest, where = (folder / MANIFEST_NAME).is_file(), str(folder)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {where} ({shards} shards, {samples} readable samples):")
        for line in problems[:MAX_LISTED_PROBLEMS]:
            print(f"  {line}")
        if len(problems) > MAX_LISTED_PROBLEMS:
            print(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        print("fix: re-create the listed shards (mimscale shards create) or restore them from a copy")
        return 1
    checked = "size, sha256, counts and every image" if has_manifest else "every image (no manifest: counts discovered)"
    if not _remote_spec(args.out) and (Path(args.out) / "samples.idx").is_file():
        checked += ", samples.idx against the tars"
    print(f"OK: {where}: {shards} shards, {samples} samples; checked {checked}")
    return 0


# ----------------------------------------------------------------------------------------------- inspect


def contact_sheet(table, count: int, labels: list[str], thumb: int = 96) -> Image.Image:
    """A grid of ``count`` samples spread evenly over the set, each captioned with its label."""
    total = len(table)
    picks = [round(i * (total - 1) / max(1, count - 1)) for i in range(min(count, total))]
    columns = math.ceil(math.sqrt(len(picks))) or 1
    rows = math.ceil(len(picks) / columns)
    sheet = Image.new("RGB", (columns * (thumb + 4), rows * (thumb + 18)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for number, sample_id in enumerate(picks):
        try:
            image = decode_rgb(table.read(sample_id))
            image.thumbnail((thumb, thumb))
        except BadImage:
            image = Image.new("RGB", (thumb, thumb), (160, 0, 0))
        x, y = (number % columns) * (thumb + 4) + 2, (number // columns) * (thumb + 18) + 2
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        label = table.label(sample_id)
        caption = labels[label] if 0 <= label < len(labels) else ("-" if label < 0 else str(label))
        draw.text((x, y + thumb + 2), f"{label}:{caption}"[:16], fill=(230, 230, 230))
    return sheet


def _class_names(folder: str | None, manifest: dict | None) -> list[str]:
    """Class names from the manifest, else from a classes.json beside the shards (local or remote; none where no
    sibling may be looked up: ``folder`` None)."""
    classes = manifest.get("classes") if manifest else None
    if classes:
        if not isinstance(classes, list):
            raise ShardError(
                f'{folder}/{MANIFEST_NAME}: "classes" must be a list of class names, got '
                f"{type(classes).__name__} {str(classes)[:40]}; fix it or remove the key"
            )
        return [str(name) for name in classes]
    if folder is None:
        return []
    location = f"{folder}/classes.json"
    if remote.is_local(folder) and not Path(location).is_file():
        return []
    try:
        names = json.loads(remote.read_small(location, 16 << 20, retries=1))
    except (remote.RemoteError, UnicodeDecodeError, json.JSONDecodeError):  # none, or not a list of names
        return []
    return [str(name) for name in names] if isinstance(names, list) else []


def _label_histogram(table) -> dict[int, int]:
    histogram: dict[int, int] = {}
    for shard in range(len(table.locations)):
        rows = table.indexes[table.set_of[shard]].shard_rows(int(table.number_in_set[shard]))
        values, counts = np.unique(rows["label"], return_counts=True)
        for label, n in zip(values.tolist(), counts.tolist(), strict=True):
            histogram[label] = histogram.get(label, 0) + n
    return histogram


def cmd_inspect(args) -> int:
    folder = args.out
    table = open_shard_set(folder, "OUT", data_cfg=DataConfig(cache_dir=args.cache))
    if _remote_spec(folder):
        first = remote.sibling_folder(table.locations[0])  # None for pipe: commands and signed URLs
        manifest = load_remote_manifest(first) if first is not None else None
    else:
        first = table.folders[0]
        manifest = load_manifest(first)
    names = _class_names(first, manifest)
    sizes = [
        index.shard_bytes[n]
        for index, n in zip((table.indexes[i] for i in table.set_of), table.number_in_set, strict=True)
    ]
    unusable = [int(table.indexes[i].unusable[n]) for i, n in zip(table.set_of, table.number_in_set, strict=True)]
    print(
        f"{folder}: {len(table.locations)} shards, {len(table)} samples, {sum(sizes) / 1e6:.1f} MB"
        f"{'' if manifest else ' (no manifest: counts discovered from the tars)'}"
    )
    for location, count, nbytes, bad in zip(table.locations, table.counts, sizes, unusable, strict=True):
        extra = f"  {bad} unusable (no image member)" if bad else ""
        print(f"  {Path(location).name:<28} {count:>8} samples {nbytes / 1e6:>9.2f} MB{extra}")
    histogram = _label_histogram(table)
    shown = ", ".join(
        f"{label}{'=' + names[label] if 0 <= label < len(names) else ''}: {n}" for label, n in sorted(histogram.items())
    )
    print(f"labels ({len(histogram)} distinct; -1 = none): {shown[:600]}")
    if manifest:
        stats, rejects = manifest.get("image_stats", {}), manifest.get("rejects", {})
        for axis, values in stats.items():
            print(f"image {axis}: min {values['min']}, mean {values['mean']}, max {values['max']}")
        print(f"rejects: {rejects.get('count', 0)} {rejects.get('by_reason', {})}")
        if manifest.get("command"):
            print(f"created by: {manifest['command']}")
    if args.sheet:
        contact_sheet(table, args.count, names).save(args.sheet)
        print(f"contact sheet of {min(args.count, len(table))} samples: {args.sheet}")
    empty = [Path(loc).name for loc, count in zip(table.locations, table.counts, strict=True) if count == 0]
    if empty:
        print(
            f"FAILED: {len(empty)} shard(s) hold no usable sample: {', '.join(empty[:10])} (an image member per "
            "key is needed; a WebDataset key ends at the first dot of the file name)"
        )
        return 1
    return 0


# ----------------------------------------------------------------------------------------------- index


def cmd_index(args) -> int:
    """Build (or bring up to date) the samples.idx of shard folders once, in parallel, before training.

    The set is opened as training opens it (shards/sets.py), so the index lands where training looks: beside the
    shards, or with --cache in DIR/index (data.cache_dir=DIR); URL sets always index into the cache."""
    start = time.perf_counter()
    data_cfg = DataConfig(cache_dir=args.cache, cache_limit_gb=args.cache_limit_gb)
    if args.part or args.join:  # split across nodes: shards/sets.py index_split
        written = index_split(args.src, data_cfg, part=args.part, out=args.out, join=args.join, workers=args.workers)
        print(f"{'piece' if args.part else 'joined index'} -> {written} in {time.perf_counter() - start:.1f} s")
        return 0
    table = open_shard_set(
        args.src,
        "SRC",
        data_cfg=data_cfg,
        index_workers=args.workers,
        prefer_cache=bool(args.cache),
        require_samples=False,
    )
    elapsed = time.perf_counter() - start
    for number, (folder, index) in enumerate(zip(table.folders, table.indexes, strict=True)):
        size, shards = index.path.stat().st_size, int((table.set_of == number).sum())
        per_sample = size / max(1, index.num_samples)
        print(
            f"{folder}: {shards} shards, {index.num_samples} samples indexed -> {index.path} "
            f"({size / 1e6:.1f} MB, {per_sample:.1f} B/sample)"
        )
        skipped = int(index.unusable.sum())
        if skipped:
            print(f"  {skipped} sample(s) without an image member skipped (see the messages above)")
    print(f"indexed in {elapsed:.1f} s")
    if table.cache is not None:
        table.cache.close()
    return 0


# ----------------------------------------------------------------------------------------------- create


def cmd_create(args) -> int:
    from mimscale.shards.create import CreateOptions, create_shards

    opts = CreateOptions(**{option.name: getattr(args, option.name) for option in dataclasses.fields(CreateOptions)})
    command = "mimscale " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if args.record_argv else ""
    manifest = create_shards(args.src, args.out, opts, workers=args.workers, command=command)
    totals, rejects = manifest["totals"], manifest["rejects"]
    print(f"wrote {totals['shards']} shards, {totals['samples']} samples, {totals['bytes'] / 1e6:.1f} MB to {args.out}")
    if rejects["count"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(rejects["by_reason"].items()))
        print(f"rejected {rejects['count']} inputs ({reasons}); listed in {Path(args.out) / MANIFEST_NAME}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="create, index, verify or inspect WebDataset shard sets")
    commands = parser.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    create = commands.add_parser("create", help="image folder, CSV/TSV list or tar shards -> validated shards")
    create.add_argument("src", help="image folder (class sub-folders), .csv/.tsv of path[,label], or tar shards")
    create.add_argument("out", help="output folder (a killed run re-run with the same arguments finishes it)")
    create.add_argument("--samples-per-shard", type=int, default=1000)
    create.add_argument("--max-bytes-per-shard", type=int, default=0, help="also split shards above this size")
    create.add_argument("--max-side", type=int, default=0, help="resize so the shorter side is at most N px")
    create.add_argument("--format", choices=("jpg", "webp", "png"), default="jpg")
    create.add_argument("--quality", type=int, default=90, help="jpg/webp quality")
    create.add_argument("--workers", type=int, default=1, help="parallel processes (one shard at a time each)")
    create.add_argument("--shuffle-seed", type=int, default=-1, help="shuffle inputs with this seed (-1: keep order)")
    create.add_argument("--min-side", type=int, default=8, help="reject images with a shorter side below N px")
    create.add_argument("--max-pixels", type=int, default=100_000_000, help="reject images above N pixels")
    create.add_argument("--max-bytes", type=int, default=256 << 20, help="reject inputs above B bytes (never read)")
    create.add_argument("--prefix", default="shard-", help="shard file name prefix")
    create.set_defaults(func=cmd_create, record_argv=True)
    verify = commands.add_parser("verify", help="re-read everything against manifest.json; exit 1 on problems")
    verify.add_argument("out", help="shard folder, or a URL pattern (each shard is downloaded once, then dropped)")
    verify.add_argument("--cache", default="", help="node cache folder for URL sets (as data.cache_dir)")
    verify.add_argument(
        "--cache-limit-gb",
        type=float,
        default=DataConfig().cache_limit_gb,
        help="shard cache size while verifying URLs",
    )
    verify.set_defaults(func=cmd_verify)
    inspect = commands.add_parser("inspect", help="counts, labels, sizes and a PNG contact sheet")
    inspect.add_argument("out", help="shard folder, pattern or URL pattern")
    inspect.add_argument("--sheet", default="contact_sheet.png", help="PNG path for the contact sheet ('' = none)")
    inspect.add_argument("--count", type=int, default=16, help="samples on the contact sheet")
    inspect.add_argument("--cache", default="", help="folder for the index of a read-only or remote shard set")
    inspect.set_defaults(func=cmd_inspect)
    index = commands.add_parser("index", help="build samples.idx for a shard set (e.g. img2dataset output) once")
    index.add_argument("src", help="shard folder, glob, brace pattern or URL pattern (https://host/x-{000..009}.tar)")
    index.add_argument(
        "--cache",
        default="",
        help="write the index into DIR/index (use data.cache_dir=DIR in training) "
        "instead of beside the shards; URL sets always index into the cache",
    )
    index.add_argument(
        "--workers",
        type=int,
        default=0,
        help="parallel processes scanning local tars (default 1), or downloads at once for URL sets (default 8)",
    )
    index.add_argument("--part", default="", help="K/N: index only this node's share of the shards, into --out DIR")
    index.add_argument("--out", default="", help="folder for the --part piece (reachable by the joining node)")
    index.add_argument("--join", default="", help="DIR: join the N pieces written there into one samples.idx")
    index.add_argument(
        "--cache-limit-gb", type=float, default=DataConfig().cache_limit_gb, help="shard cache size while indexing URLs"
    )
    index.set_defaults(func=cmd_index)
