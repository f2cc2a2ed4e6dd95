"""Training-stream throughput from a real HTTP server (cold node cache) against the same shards as local files.

    python bench/bench_remote.py [--shards 32] [--samples 40] [--latency-ms 50] [--workers 2] [--size 224]
                                 [--epochs 2] [--window 4] [--cache-mb 40]

Builds ImageNet-like JPEG shards (about 500x375, quality 90, from scikit-image's photos) in a temporary folder,
serves them with tests/http_serve.py (a threaded server on 127.0.0.1 that sleeps --latency-ms before
answering each request), then runs the same training stream (build_train_loader, one rank, --workers DataLoader
workers, --epochs epochs) twice per repeat: over the local files, and over http:// URLs with data.cache_dir a
fresh, empty folder (cold cache) limited to --cache-mb, less than the shard set, so shards are evicted and
fetched again every epoch as they would be at scale. Timing starts before the loader is built (index download,
first window, worker start-up all count). Prints img/s for both, the ratio remote/local (target >= 0.9), and the
most requests the server saw for one shard (= --epochs when each epoch fetches each shard once per node, shared
by the workers). Best of --repeats, alternating local and remote.

With ``--index 1 8`` it instead times the one-time index of the same set served without samples.idx (every shard
downloaded and scanned, as the first start or ``mimscale shards index URL`` does), with 1 and 8 downloads at once.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # the fault-injecting test server

from bench_data import make_jpeg_folder  # noqa: E402
from http_serve import ShardServer  # noqa: E402

from mimscale.config import load_config  # noqa: E402
from mimscale.pipeline.masking import build_mask_generator  # noqa: E402
from mimscale.pipeline.stream import build_train_loader  # noqa: E402
from mimscale.shards.create import CreateOptions, create_shards  # noqa: E402


def run_stream(shards: str, args, cache_dir: str) -> tuple[float, int]:
    """(seconds, images) for --epochs epochs of the training stream, from building the loader to the last batch."""
    cfg = load_config(
        None,
        [
            f"data.shards={shards}",
            f"data.batch_size={args.batch}",
            f"data.image_size={args.size}",
            f"data.num_workers={args.workers}",
            f"data.cache_dir={cache_dir}",
            f"data.shuffle_window={args.window}",
            f"data.cache_limit_gb={args.cache_mb / 1000}",
        ],
    )
    mask = build_mask_generator("random_tokens", image_size=args.size, token_stride=16, ratio=0.6, cell_size=32)
    start = time.perf_counter()
    stream = build_train_loader(cfg, rank=0, world_size=1, mask_generator=mask)
    images = 0
    for step, batch in enumerate(stream):
        images += len(batch["sample_id"])
        if step + 1 >= stream.steps_per_epoch * args.epochs:
            break
    return time.perf_counter() - start, images


def time_index(server: ShardServer, names: list[str], cache_dir: Path, workers: int) -> float:
    """Seconds to index the served set from a cold cache with ``workers`` downloads at once."""
    from mimscale.shards.index import remote_folder_index
    from mimscale.storage import shard_cache

    cache = shard_cache.ShardCache(cache_dir / "shards", 10**11)
    start = time.perf_counter()
    index = remote_folder_index(server.url().rstrip("/"), names, cache, cache_dir=cache_dir, workers=workers)
    seconds = time.perf_counter() - start
    assert index.num_samples > 0 and all(server.requests[name] == 1 for name in names)
    return seconds


def compare_index(root: Path, names: list[str], args) -> None:
    bare = root / "bare"
    bare.mkdir()
    for name in names:
        (bare / name).hardlink_to(root / "shards" / name)
    with ShardServer(bare, latency_s=args.latency_ms / 1000) as server:
        times = {}
        for workers in args.index:
            server.requests.clear()
            times[workers] = time_index(server, names, root / f"index-cache-{workers}", workers)
            print(f"  index with {workers} download(s) at once: {times[workers]:6.2f} s")
    base = times[args.index[0]]
    for workers, seconds in times.items():
        print(f"index {workers:>2} at once: {seconds:6.2f} s, {base / seconds:.2f}x of {args.index[0]} at once")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--samples", type=int, default=40, help="samples per shard")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--window", type=int, default=4, help="data.shuffle_window")
    parser.add_argument("--cache-mb", type=float, default=40.0, help="data.cache_limit_gb in MB (below the set's size)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--index", type=int, nargs="+", help="time the one-time index with these downloads at once")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_jpeg_folder(root / "jpegs", args.shards * args.samples)
        manifest = create_shards(str(root / "jpegs"), root / "shards", CreateOptions(samples_per_shard=args.samples))
        names = [entry["name"] for entry in manifest["shards"]]
        size_mb = manifest["totals"]["bytes"] / 1e6
        print(
            f"{len(names)} shards x {args.samples} samples ({size_mb:.1f} MB), latency {args.latency_ms:g} ms, "
            f"{args.workers} workers, batch {args.batch}, crop {args.size}, {args.epochs} epochs, window "
            f"{args.window}, cache {args.cache_mb:g} MB"
        )
        if args.index:
            compare_index(root, names, args)
            return
        pattern = f"shard-{{00000..{len(names) - 1:05d}}}.tar"
        local, remote, requests = [], [], []
        with ShardServer(root / "shards", latency_s=args.latency_ms / 1000) as server:
            for repeat in range(args.repeats):
                local.append(run_stream(str(root / "shards" / pattern), args, str(root / f"unused{repeat}")))
                server.requests.clear()
                remote.append(run_stream(server.url(pattern), args, str(root / f"cache{repeat}")))
                requests.append(max(server.requests[name] for name in names))
                print(
                    f"  repeat {repeat}: local {local[-1][1] / local[-1][0]:7.1f} img/s   remote "
                    f"{remote[-1][1] / remote[-1][0]:7.1f} img/s   max GETs per shard {requests[-1]}"
                )
        best_local = max(images / seconds for seconds, images in local)
        best_remote = max(images / seconds for seconds, images in remote)
        print(f"local  {best_local:8.1f} img/s (best of {args.repeats})")
        print(f"remote {best_remote:8.1f} img/s (cold cache, http://127.0.0.1 + {args.latency_ms:g} ms per request)")
        print(f"ratio remote/local {best_remote / best_local:.3f} (target >= 0.9); max GETs per shard {max(requests)}")


if __name__ == "__main__":
    main()
