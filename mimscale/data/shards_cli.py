"""`mimscale shards create|verify|inspect`: build, check and look at WebDataset shard sets."""

from __future__ import annotations

import json
import math
import shlex
import sys
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from mimscale.data.images import BadImage, decode_rgb
from mimscale.data.shards import (
    IMAGE_EXTS,
    LABEL_EXTS,
    MANIFEST_NAME,
    ShardError,
    expand_shards,
    file_sha256,
    index_shards,
    load_manifest,
    split_key,
)

MAX_LISTED_PROBLEMS = 50


# ----------------------------------------------------------------------------------------------- verify


def _read_members(path: Path, problems: list[str]) -> int:
    """Read and decode every member; returns the number of samples with an image. Problems are appended."""
    keys: set[str] = set()
    try:
        with open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                data = tar.extractfile(member).read()
                if ext in IMAGE_EXTS:
                    try:
                        decode_rgb(data, exif=False)
                        keys.add(key)
                    except BadImage as err:
                        problems.append(f"{path.name}: member {member.name}: corrupt image ({err})")
                elif ext in LABEL_EXTS and not data.decode("utf-8", "replace").strip().lstrip("-").isdigit():
                    problems.append(f"{path.name}: member {member.name}: label is not an integer: {data[:20]!r}")
            end = tar.offset
            raw.seek(end)
            if raw.read().strip(b"\0"):
                problems.append(f"{path.name}: unreadable data after byte {end} (corrupt member header?)")
    except (tarfile.TarError, OSError, EOFError) as err:
        problems.append(f"{path.name}: truncated or corrupt tar ({type(err).__name__}: {err})")
    return len(keys)


def verify_shard(path: Path, entry: dict | None) -> tuple[int, list[str]]:
    """Check one shard against its manifest entry (size, sha256, sample count) and decode every image."""
    problems: list[str] = []
    if entry is not None:
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{path.name}: size {size} bytes, manifest says {entry.get('bytes')} (truncated?)")
        digest = file_sha256(path)
        if digest != entry.get("sha256"):
            problems.append(
                f"{path.name}: sha256 {digest[:12]}... differs from manifest {entry.get('sha256', '')[:12]}..."
            )
    samples = _read_members(path, problems)
    if entry is not None and samples != entry.get("samples"):
        problems.append(f"{path.name}: {samples} readable samples, manifest says {entry.get('samples')}")
    return samples, problems


def verify_folder(folder: Path) -> tuple[int, int, list[str]]:
    """(shards, samples, problems) for a shard folder, with or without a manifest."""
    from tqdm import tqdm

    manifest = load_manifest(folder)
    on_disk = {path.name: path for path in sorted(folder.glob("*.tar"))}
    entries = {entry["name"]: entry for entry in manifest["shards"]} if manifest else {}
    problems = [f"{name}: listed in {MANIFEST_NAME} but missing" for name in entries if name not in on_disk]
    if manifest:
        problems += [f"{name}: not listed in {MANIFEST_NAME}" for name in on_disk if name not in entries]
    if not on_disk:
        problems.append(f"{folder}: no .tar shards found")
    samples = 0
    for name, path in tqdm(on_disk.items(), desc="verify", unit="shard", disable=None, file=sys.stderr):
        count, found = verify_shard(path, entries.get(name) if manifest else None)
        samples += count
        problems += found
    if manifest and not problems and samples != manifest.get("totals", {}).get("samples"):
        problems.append(f"total {samples} samples, manifest totals say {manifest['totals'].get('samples')}")
    leftovers = sorted(path.name for path in folder.glob("*.tar.tmp"))
    if leftovers:
        print(f"note: unfinished shards from a killed job: {', '.join(leftovers)}", file=sys.stderr)
    return len(on_disk), samples, problems


def cmd_verify(args) -> int:
    folder = Path(args.out)
    if not folder.is_dir():
        raise ShardError(f"{folder} is not a folder; pass the shard folder (the OUT of `mimscale shards create`)")
    shards, samples, problems = verify_folder(folder)
    has_manifest = (folder / MANIFEST_NAME).is_file()
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {folder} ({shards} shards, {samples} readable samples):")
        for line in problems[:MAX_LISTED_PROBLEMS]:
            print(f"  {line}")
        if len(problems) > MAX_LISTED_PROBLEMS:
            print(f"  ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
        print("fix: re-create the listed shards (mimscale shards create) or restore them from a copy")
        return 1
    checked = "size, sha256, counts and every image" if has_manifest else "every image (no manifest: counts discovered)"
    print(f"OK: {folder}: {shards} shards, {samples} samples; checked {checked}")
    return 0


# ----------------------------------------------------------------------------------------------- inspect


def contact_sheet(paths: list[Path], indexes, count: int, labels: list[str], thumb: int = 96) -> Image.Image:
    """A grid of ``count`` samples spread evenly over the set, each captioned with its label."""
    flat = [(path, index, n) for path, index in zip(paths, indexes, strict=True) for n in range(len(index))]
    picks = [flat[round(i * (len(flat) - 1) / max(1, count - 1))] for i in range(min(count, len(flat)))]
    columns = math.ceil(math.sqrt(len(picks))) or 1
    rows = math.ceil(len(picks) / columns)
    sheet = Image.new("RGB", (columns * (thumb + 4), rows * (thumb + 18)), (32, 32, 32))
    draw = ImageDraw.Draw(sheet)
    for number, (path, index, n) in enumerate(picks):
        with open(path, "rb") as handle:
            handle.seek(index.offsets[n])
            payload = handle.read(index.sizes[n])
        try:
            image = decode_rgb(payload)
            image.thumbnail((thumb, thumb))
        except BadImage:
            image = Image.new("RGB", (thumb, thumb), (160, 0, 0))
        x, y = (number % columns) * (thumb + 4) + 2, (number // columns) * (thumb + 18) + 2
        sheet.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
        label = index.labels[n]
        caption = labels[label] if 0 <= label < len(labels) else ("-" if label < 0 else str(label))
        draw.text((x, y + thumb + 2), f"{label}:{caption}"[:16], fill=(230, 230, 230))
    return sheet


def _class_names(folder: Path, manifest: dict | None) -> list[str]:
    if manifest and manifest.get("classes"):
        return [str(name) for name in manifest["classes"]]
    path = folder / "classes.json"
    return [str(name) for name in json.loads(path.read_text())] if path.is_file() else []


def cmd_inspect(args) -> int:
    folder = Path(args.out)
    paths = expand_shards(str(folder), key="OUT")
    manifest = load_manifest(folder)
    indexes = index_shards(paths)
    names = _class_names(folder, manifest)
    total = sum(len(index) for index in indexes)
    print(f"{folder}: {len(paths)} shards, {total} samples, {sum(i.bytes for i in indexes) / 1e6:.1f} MB"
          f"{'' if manifest else ' (no manifest: counts discovered from the tars)'}")  # fmt: skip
    for index in indexes:
        print(f"  {index.name:<28} {len(index):>8} samples {index.bytes / 1e6:>9.2f} MB")
    histogram: dict[int, int] = {}
    for index in indexes:
        for label in index.labels:
            histogram[label] = histogram.get(label, 0) + 1
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
        contact_sheet(paths, indexes, args.count, names).save(args.sheet)
        print(f"contact sheet of {min(args.count, total)} samples: {args.sheet}")
    return 0


# ----------------------------------------------------------------------------------------------- create


def cmd_create(args) -> int:
    from mimscale.data.create import CreateOptions, create_shards

    opts = CreateOptions(
        samples_per_shard=args.samples_per_shard,
        max_bytes_per_shard=args.max_bytes_per_shard,
        max_side=args.max_side,
        format=args.format,
        quality=args.quality,
        shuffle_seed=args.shuffle_seed,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        prefix=args.prefix,
    )
    command = "mimscale " + " ".join(shlex.quote(arg) for arg in sys.argv[1:]) if args.record_argv else ""
    manifest = create_shards(args.src, args.out, opts, workers=args.workers, command=command)
    totals, rejects = manifest["totals"], manifest["rejects"]
    print(f"wrote {totals['shards']} shards, {totals['samples']} samples, {totals['bytes'] / 1e6:.1f} MB to {args.out}")
    if rejects["count"]:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(rejects["by_reason"].items()))
        print(f"rejected {rejects['count']} inputs ({reasons}); listed in {Path(args.out) / MANIFEST_NAME}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("shards", help="create, verify or inspect WebDataset shard sets")
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
    verify.add_argument("out", help="shard folder")
    verify.set_defaults(func=cmd_verify)
    inspect = commands.add_parser("inspect", help="counts, labels, sizes and a PNG contact sheet")
    inspect.add_argument("out", help="shard folder")
    inspect.add_argument("--sheet", default="contact_sheet.png", help="PNG path for the contact sheet ('' = none)")
    inspect.add_argument("--count", type=int, default=16, help="samples on the contact sheet")
    inspect.set_defaults(func=cmd_inspect)
