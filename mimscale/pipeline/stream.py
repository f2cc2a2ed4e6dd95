"""The resumable training stream: exact data position, independent of world size and worker count, read locally.

Shards are indexed once (data/index.py: samples.idx, memory-mapped, O(shards) at start-up). The order of an
epoch comes from data/order.py: a keyed shard permutation cut into C canonical streams (``data.streams``, fixed
when the run starts), samples shuffled within windows of ``data.shuffle_window`` shards; it depends only on
(seed, epoch, C, window, the shard set). Global micro-batch m takes g = G/C samples from each stream and rank r
takes the r-th slice of B, so with W dividing C a rank reads only its own streams' shards, a window at a time.
Each DataLoader worker builds whole micro-batches (batch t goes to worker t % num_workers), so the DataLoader's
round-robin hands them out in order. Crop, flip and mask randomness come from (seed, epoch, sample id). The
state is {epoch, samples consumed in the epoch, C, window}: a resume with another world size but the same
global batch continues the very same order.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.config import Config
from mimscale.pipeline.device_decode import DeferredCrop, DeferredRows
from mimscale.pipeline.order import EpochPlan, arrangement
from mimscale.pipeline.transforms import eval_transform, normalise_batch, train_crop, train_crop_or_defer, write_chw
from mimscale.shards.format import ShardError, dataset_fingerprint, expand_shards
from mimscale.shards.images import BadImage
from mimscale.shards.index import BLOCK, SetIndex, folder_index, remote_folder_index
from mimscale.storage import remote, shard_cache

MAX_CONSECUTIVE_CORRUPT = 64
MAX_OPEN_SHARDS = 64
STATE_VERSION = 2


class ShardTable:
    """A shard set as per-shard arrays (O(shards) memory); each shard's sample rows come from its index file.

    Remote shards are read through the node's ShardCache (data/shard_cache.py): a shard is pinned while this process
    reads it, ``prefetch`` fetches the next window's shards ahead, and ``release`` unpins the ones left behind.
    """

    def __init__(self, locations: list[str], indexes: list[SetIndex], numbers: list[tuple[int, int]], cache=None):
        self.locations = locations
        self.indexes = indexes
        self.set_of = np.asarray([id_ for id_, _ in numbers], dtype=np.int32)
        self.number_in_set = np.asarray([n for _, n in numbers], dtype=np.int64)
        self.counts = np.asarray([indexes[i].counts[n] for i, n in numbers], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.fingerprint = dataset_fingerprint([_shard_name(loc) for loc in locations], self.counts)
        self.cache = cache
        self._handles: dict[int, object] = {}
        self._pinned: dict[int, str] = {}
        if cache is not None:  # downloads are checked against the indexed size
            for shard, location in enumerate(locations):
                if not remote.is_local(location):
                    cache.expect(location, int(self.shard_bytes(shard)))

    def shard_bytes(self, shard: int) -> int:
        return int(self.indexes[self.set_of[shard]].shard_bytes[self.number_in_set[shard]])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"], state["_pinned"] = {}, {}  # open files and pins do not travel to workers
        return state

    def _local_path(self, shard: int) -> str:
        """The one place shard access goes through: local paths as they are, remote ones via the node cache."""
        location = self.locations[shard]
        if self.cache is None or remote.is_local(location):
            return location
        if shard not in self._pinned:
            self._pinned[shard] = str(self.cache.local_path(location))
        return self._pinned[shard]

    def prefetch(self, shards) -> None:
        if self.cache is not None:
            self.cache.prefetch(self.locations[int(shard)] for shard in shards)

    def release_except(self, keep: set[int]) -> None:
        """Close and unpin every shard this process holds except ``keep`` (the windows being read and the next)."""
        for shard in [shard for shard in self._handles if shard not in keep]:
            self._handles.pop(shard).close()
        for shard in [shard for shard in self._pinned if shard not in keep]:
            del self._pinned[shard]
            self.cache.release(self.locations[shard])

    def locate(self, sample_id: int) -> tuple[int, np.void]:
        """(shard number, the sample's index row: block, size, label)."""
        shard = int(np.searchsorted(self.starts, sample_id, "right")) - 1
        rows = self.indexes[self.set_of[shard]].shard_rows(int(self.number_in_set[shard]))
        return shard, rows[sample_id - int(self.starts[shard])]

    def label(self, sample_id: int) -> int:
        return int(self.locate(sample_id)[1]["label"])

    def describe(self, sample_id: int) -> str:
        shard, row = self.locate(sample_id)
        where = f"shard {self.locations[shard]} sample #{sample_id - int(self.starts[shard])}"
        try:  # the member's own tar header sits right before its data
            handle = self._handle(shard)
            handle.seek((int(row["block"]) - 1) * BLOCK)
            name = handle.read(100).split(b"\0", 1)[0].decode("utf-8", "replace")
            return f"{where} ({name})" if name else where
        except (BadImage, OSError):
            return where

    def _handle(self, shard: int):
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= MAX_OPEN_SHARDS:
                self._handles.pop(next(iter(self._handles))).close()
            path = self._local_path(shard)  # a remote shard that cannot be fetched stops the run, named: not "corrupt"
            try:
                handle = open(path, "rb")
            except OSError as err:
                raise BadImage("unreadable_shard", str(err)) from err
            size = os.fstat(handle.fileno()).st_size
            if size != self.shard_bytes(shard):
                handle.close()
                raise ShardError(
                    f"shard {self.locations[shard]} is {size} bytes but its index says {self.shard_bytes(shard)}: it "
                    "changed after it was indexed; run `mimscale shards index` on its folder (or restore the shard)"
                )
            self._handles[shard] = handle
        return handle

    def read(self, sample_id: int) -> bytes:
        """The encoded image bytes of one sample (BadImage if the shard is shorter than its index says)."""
        return self.read_labelled(sample_id)[0]

    def read_labelled(self, sample_id: int) -> tuple[bytes, int]:
        """(encoded image bytes, label) of one sample, with one index lookup."""
        shard, row = self.locate(sample_id)
        block, size, label = row.item()
        handle = self._handle(shard)
        handle.seek(block * BLOCK)
        payload = handle.read(size)
        if len(payload) != size:
            raise BadImage("truncated", f"{len(payload)} of {size} bytes")
        return payload, label


def _expand(pattern: str, key: str) -> list[str]:
    """Shard locations: local paths (expand_shards), or URLs and file:// through data/remote.py."""
    if not any(remote.is_url(part.strip()) for part in pattern.split("::")):
        return [str(path) for path in expand_shards(pattern, key=key)]
    try:
        return remote.expand(pattern, key)
    except remote.RemoteError as err:
        raise ShardError(str(err)) from err


def _folder(location: str) -> str:
    """The folder (or URL prefix) whose samples.idx indexes a shard; '.' for a bare file name."""
    return (os.path.dirname(location) or ".") if remote.is_local(location) else remote.folder_of(location)[0]


def _shard_name(location: str) -> str:
    """A shard's name in its set's index (a URL's without its query string: see remote.shard_name)."""
    return os.path.basename(location) if remote.is_local(location) else remote.shard_name(location)


def load_table(pattern: str, key: str, *, cache_dir: str | None = None, data_cfg=None) -> ShardTable:
    """The shard set of a pattern with its index: samples.idx beside the shards or cached, else built once.

    Remote sets get a node-local ShardCache (from ``data_cfg``'s data.cache_* keys, or the defaults).
    """
    locations = _expand(pattern, key)
    cache_dir = cache_dir or (data_cfg.cache_dir if data_cfg is not None else None)
    folders: dict[str, dict[str, str]] = {}  # folder -> {shard name: location}
    for location in locations:
        members = folders.setdefault(_folder(location), {})
        if members.setdefault(_shard_name(location), location) != location:
            raise ShardError(f"{key}={pattern!r}: {members[_shard_name(location)]} and {location} are both shard "
                             f"{_shard_name(location)!r} of one folder; name each shard once")  # fmt: skip
    cache, named_index = None, (data_cfg.index if data_cfg is not None and key == "data.shards" else "")
    if not all(remote.is_local(location) for location in locations):
        cache = shard_cache.ShardCache.from_config(data_cfg) if data_cfg is not None else shard_cache.ShardCache(
            os.path.join(shard_cache.cache_dir_for(cache_dir or ""), "shards"), 20 * 10**9)  # fmt: skip
        cache_dir = shard_cache.cache_dir_for(cache_dir or "")  # indexes of remote sets: <cache_dir>/index
        shard_cache.expect_checksums(cache, locations)  # before any download, index builds' included
        remote_folders = [folder for folder in folders if not remote.is_local(folder)]
        if named_index and len(remote_folders) > 1:
            raise ShardError(f"data.index={named_index!r} names one index but data.shards spans "
                             f"{len(remote_folders)} remote folders; index them as one set or unset it")  # fmt: skip
    sets = [
        folder_index(folder, list(members), cache_dir=cache_dir)
        if remote.is_local(folder)
        else remote_folder_index(
            folder, list(members), cache, cache_dir=cache_dir, locations=members, named_index=named_index
        )
        for folder, members in folders.items()
    ]
    set_number = {folder: number for number, folder in enumerate(folders)}
    numbers = [(set_number[_folder(loc)], sets[set_number[_folder(loc)]].position[_shard_name(loc)])
               for loc in locations]  # fmt: skip
    table = ShardTable(locations, sets, numbers, cache=cache)
    if len(table) == 0:
        raise ShardError(f"{key}={pattern!r}: the {len(locations)} shard(s) hold no image samples (.jpg/.png/.webp)")
    return table


@dataclass(frozen=True)
class Schedule:
    """Where global micro-batch t (counted from the resume point) lies: (epoch, first position in each stream)."""

    stream_length: int
    per_stream: int  # g = global batch / streams
    start_epoch: int
    start_position: int

    def positions(self) -> Iterator[tuple[int, int]]:
        epoch, position = self.start_epoch, self.start_position
        while True:
            while position + self.per_stream <= self.stream_length:
                yield epoch, position
                position += self.per_stream
            epoch, position = epoch + 1, 0


@dataclass(frozen=True)
class AugmentSpec:
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    uint8: bool = False  # hand uint8 pixels to the main process; the engine normalises on the device
    decode: str = "worker"  # "device": JPEGs travel encoded, the main process decodes them (data/device_decode.py)


class _TrainBatches(IterableDataset):
    """Runs in each DataLoader worker: builds this rank's slice of every num_workers-th global micro-batch."""

    def __init__(self, table: ShardTable, schedule: Schedule, spec: AugmentSpec, *, rank: int, batch_size: int,
                 seed: int, streams: int, window: int, mask_generator):  # fmt: skip
        self.table, self.schedule, self.spec = table, schedule, spec
        self.rank, self.batch_size, self.seed, self.mask_generator = rank, batch_size, seed, mask_generator
        self.streams, self.window = streams, window
        self._plan: EpochPlan | None = None
        self._upcoming: EpochPlan | None = None  # the next epoch's, once its first window is fetched ahead
        self._reported = 0

    def _new_plan(self, epoch: int) -> EpochPlan:
        return EpochPlan(self.table.counts, seed=self.seed, epoch=epoch, streams=self.streams, window=self.window)

    def _plan_for(self, epoch: int) -> EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            if self._upcoming is not None and self._upcoming.epoch == epoch:
                self._plan, self._upcoming = self._upcoming, None
            else:
                self._plan = self._new_plan(epoch)
        return self._plan

    def _first_window_of_next_epoch(self, epoch: int, stream: int) -> np.ndarray:
        """The shards a stream reads first in the next epoch (fetched ahead while this epoch's last window runs)."""
        if self._upcoming is None or self._upcoming.epoch != epoch + 1:
            self._upcoming = self._new_plan(epoch + 1)
        return self._upcoming.window_shards(stream, 0)

    def _load(self, plan: EpochPlan, stream: int, position: int) -> tuple:
        """(pixels, flip?, mask, sample id, label, replaced) at a stream position; a corrupt sample gives way to the
        next one of the same stream."""
        planned = plan.sample(stream, position)
        rng = np.random.default_rng([self.seed, plan.epoch, planned])
        spec = self.spec
        for step in range(MAX_CONSECUTIVE_CORRUPT):
            sample_id = plan.sample(stream, (position + step) % plan.stream_length) if step else planned
            try:
                payload, label = self.table.read_labelled(sample_id)
                crop = train_crop_or_defer if spec.decode == "device" else train_crop
                image, flip = crop(payload, size=spec.size, scale=spec.scale, ratio=spec.ratio,
                                   hflip=spec.hflip, rng=rng)  # fmt: skip
            except BadImage as err:
                self._report(sample_id, err)
                continue
            return image, flip, np.asarray(self.mask_generator(rng), dtype=bool), sample_id, label, step
        raise ShardError(
            f"{MAX_CONSECUTIVE_CORRUPT} consecutive corrupt samples from {self.table.describe(planned)} on; "
            "run `mimscale shards verify` on the shard folder and re-create the broken shards"
        )

    def _report(self, sample_id: int, err: BadImage) -> None:
        if self._reported < 5:
            print(f"mimscale data: replacing corrupt {self.table.describe(sample_id)} ({err})", file=sys.stderr)
        self._reported += 1

    def _follow_windows(self, plan: EpochPlan, position: int, global_batch: int) -> None:
        """Remote shards: keep the windows this batch reads pinned, fetch the next ones, release the rest."""
        first = arrangement(self.rank * self.batch_size, global_batch, self.streams)
        last = arrangement((self.rank + 1) * self.batch_size - 1, global_batch, self.streams)
        keep: set[int] = set()
        for stream in range(first[0], last[0] + 1):
            low = position + (first[1] if stream == first[0] else 0)
            high = position + (last[1] if stream == last[0] else self.schedule.per_stream - 1)
            windows = range(plan.window_of(stream, low), plan.window_of(stream, high) + 2)  # + the next window
            for window in windows:
                keep.update(int(shard) for shard in plan.window_shards(stream, window))
            ahead = plan.window_shards(stream, windows[-1])
            self.table.prefetch(ahead if len(ahead) else self._first_window_of_next_epoch(plan.epoch, stream))
        self.table.release_except(keep)

    def batch(self, epoch: int, position: int) -> dict:
        """This rank's slice of the global micro-batch whose streams start at ``position``."""
        plan = self._plan_for(epoch)
        global_batch = self.schedule.per_stream * self.streams
        if self.table.cache is not None:
            self._follow_windows(plan, position, global_batch)
        size = self.spec.size
        images = torch.empty((self.batch_size, 3, size, size), dtype=torch.uint8)  # torch-owned: shares/pins as usual
        pixels = images.numpy()
        masks, ids, labels, corrupt, deferred = [], [], [], 0, DeferredRows()
        for row in range(self.batch_size):
            stream, offset = arrangement(self.rank * self.batch_size + row, global_batch, self.streams)
            image, flip, mask, sample_id, label, replaced = self._load(plan, stream, position + offset)
            if isinstance(image, DeferredCrop):
                deferred.add(row, image, flip)  # decoded, cropped and flipped in the main process
            else:
                write_chw(pixels[row], image, flip)  # now, while the image is in cache; the flip rides on the copy
            masks.append(mask)
            ids.append(sample_id)
            labels.append(label)
            corrupt += replaced
        return {
            "image": images if self.spec.uint8 else normalise_batch(images, list(self.spec.mean), list(self.spec.std)),
            "mask": torch.from_numpy(np.stack(masks)),
            "label": torch.tensor(labels, dtype=torch.int64),
            "sample_id": torch.tensor(ids, dtype=torch.int64),
            "_corrupt": corrupt,
            **(deferred.fields() if self.spec.decode == "device" else {}),
        }

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for t, (epoch, position) in enumerate(self.schedule.positions()):
            if t % workers == worker:
                yield self.batch(epoch, position)


class TrainStream:
    """Infinite iterable of this rank's micro-batches, with an exact, world-size-independent position.

    ``state_dict()`` is the position after the last batch handed to the caller (not what workers prefetched).
    ``streams`` is C, fixed when the run starts (``data.streams``, or the world size then) and kept by resumes.
    """

    def __init__(self, cfg: Config, table: ShardTable, *, rank: int, world_size: int, mask_generator,
                 streams: int, normalise_on_device: bool = False):  # fmt: skip
        self.table, self.rank, self.world_size = table, rank, world_size
        self.batch_size, self.seed = cfg.data.batch_size, cfg.run.seed
        self.global_batch = self.batch_size * world_size
        self.streams, self.window = streams, cfg.data.shuffle_window
        self.num_workers, self.pin_memory = cfg.data.num_workers, cfg.data.pin_memory and torch.cuda.is_available()
        self.mask_generator = mask_generator
        self.spec = AugmentSpec(cfg.data.image_size, tuple(cfg.data.crop_scale), tuple(cfg.data.crop_ratio),
                                cfg.data.hflip, tuple(cfg.data.mean), tuple(cfg.data.std),
                                uint8=normalise_on_device or cfg.data.decode == "device",
                                decode=cfg.data.decode)  # fmt: skip
        self.num_samples = len(table)
        if self.global_batch % streams:
            raise ShardError(
                f"the global batch (data.batch_size={self.batch_size} x world size {world_size} = "
                f"{self.global_batch}) is not a multiple of data.streams={streams}; every global batch takes the "
                "same number of samples from each stream: choose data.streams dividing the global batch"
            )
        self.stream_length = self.num_samples // streams
        self.per_stream = self.global_batch // streams
        if self.stream_length < self.per_stream:
            raise ShardError(
                f"data.shards holds {self.num_samples} samples, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x world size {world_size}); lower data.batch_size or add data"
            )
        self.steps_per_epoch = self.stream_length // self.per_stream
        self.epoch, self.position, self.corrupt_count = 0, 0, 0

    @property
    def consumed(self) -> int:
        """Samples of the current epoch consumed so far (over all ranks)."""
        return self.position * self.streams

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "streams": self.streams,
            "shuffle_window": self.window,
            "fingerprint": self.table.fingerprint,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "corrupt_count": self.corrupt_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; a state from other data, seed, streams or window is a clear error."""
        check_resumable(state, fingerprint=self.table.fingerprint, num_samples=self.num_samples, seed=self.seed,
                        streams=self.streams, window=self.window)  # fmt: skip
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if not 0 <= consumed <= self.num_samples or consumed % self.streams:
            raise ShardError(f"data state consumed={consumed} does not fit {self.streams} streams of this data set")
        position = consumed // self.streams
        if position + self.per_stream > self.stream_length:
            epoch, position = epoch + 1, 0  # the epoch's remaining samples do not fill a global batch
        self.epoch, self.position = epoch, position
        self.corrupt_count = int(state.get("corrupt_count", 0))

    def _schedule(self) -> Schedule:
        return Schedule(self.stream_length, self.per_stream, self.epoch, self.position)

    def _loader(self) -> DataLoader:
        dataset = _TrainBatches(self.table, self._schedule(), self.spec, rank=self.rank, batch_size=self.batch_size,
                                seed=self.seed, streams=self.streams, window=self.window,
                                mask_generator=self.mask_generator)  # fmt: skip
        workers = self.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          prefetch_factor=2 if workers else None, persistent_workers=False)  # fmt: skip

    def _fetch_first_windows(self) -> None:
        """Remote shards: fetch this rank's current and next windows from the main process while workers start (after
        they forked: a fork while a download thread runs could copy a held lock into the worker)."""
        plan = EpochPlan(self.table.counts, seed=self.seed, epoch=self.epoch, streams=self.streams,
                         window=self.window)  # fmt: skip
        rows = (self.rank * self.batch_size, (self.rank + 1) * self.batch_size - 1)
        first, last = (arrangement(row, self.global_batch, self.streams)[0] for row in rows)
        for stream in range(first, last + 1):
            window = plan.window_of(stream, min(self.position, self.stream_length - 1))
            self.table.prefetch([*plan.window_shards(stream, window), *plan.window_shards(stream, window + 1)])

    def __iter__(self) -> Iterator[dict]:
        batches = iter(self._loader())  # forks the workers before this process starts any download thread
        if self.table.cache is not None:
            self._fetch_first_windows()
        try:
            for (epoch, position), batch in zip(self._schedule().positions(), batches, strict=False):
                self.corrupt_count += int(batch.pop("_corrupt"))
                self.epoch, self.position = epoch, position + self.per_stream  # the position after this batch
                yield batch
        finally:  # an error or close(): the workers block SIGTERM (engine/preempt.py), so end them here and now;
            stop = getattr(batches, "_shutdown_workers", None)  # left to exit, multiprocessing's terminate() + join()
            if stop is not None:  # would wait on them forever
                stop()


def check_resumable(state: dict, *, fingerprint: str, num_samples: int, seed: int, streams: int, window: int) -> None:
    """A saved data state must come from the same shards and the same order settings; else say which key differs."""
    if int(state.get("version", 1)) < 2:
        raise ShardError(
            "the checkpoint's data state was written by an older mimscale whose data order (a global shuffle) this "
            "version no longer produces; the exact data position cannot be continued: start a new run (or resume "
            "with the mimscale version that wrote it)"
        )
    missing = [key for key in ("epoch", "consumed", "seed", "fingerprint", "streams") if key not in state]
    if missing:
        raise ShardError(f"data state is missing {', '.join(missing)}; it was not written by TrainStream")
    if state["fingerprint"] != fingerprint:
        raise ShardError(
            f"the checkpoint's data state belongs to another shard set (fingerprint {state['fingerprint']}, "
            f"{state.get('num_samples', '?')} samples) than data.shards ({fingerprint}, "
            f"{num_samples} samples); point data.shards at the original shards or start a new run"
        )
    if state["seed"] != seed:
        raise ShardError(
            f"the checkpoint's data order was drawn with run.seed={state['seed']} but run.seed={seed}; "
            "resume with the original seed"
        )
    if int(state["streams"]) != streams:
        raise ShardError(
            f"the checkpoint's data order uses data.streams={state['streams']} but this run asks for "
            f"data.streams={streams}; the canonical streams are fixed when a run starts: set data.streams="
            f"{state['streams']} (or 0, which takes the checkpoint's value)"
        )
    if int(state.get("shuffle_window", window)) != window:
        raise ShardError(
            f"the checkpoint's data order uses data.shuffle_window={state['shuffle_window']} but this run asks "
            f"for {window}; resume with data.shuffle_window={state['shuffle_window']}"
        )


def build_train_loader(
    cfg: Config,
    *,
    rank: int,
    world_size: int,
    mask_generator,
    state: dict | None = None,
    normalise_on_device: bool = False,
) -> TrainStream:
    """This rank's resumable training stream over cfg.data.shards (state: a previous ``state_dict()``).

    ``normalise_on_device=True`` makes ``image`` uint8 [B,3,S,S] (same pixels, not normalised): the worker skips
    the float conversion and host-to-device copies shrink 4x; the engine must then call
    ``mimscale.pipeline.transforms.normalise_on_device(image, cfg.data.mean, cfg.data.std, dtype)`` on the device.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    streams = cfg.data.streams or world_size  # a fresh run with data.streams=0: one stream per rank
    if state and cfg.data.streams == 0 and "streams" in state:
        streams = int(state["streams"])  # fixed at the run's start
    table = load_table(cfg.data.shards, "data.shards", cache_dir=cfg.data.cache_dir or None, data_cfg=cfg.data)
    if table.cache is not None:
        _check_cache_room(table, cfg, streams, world_size)
    stream = TrainStream(cfg, table, rank=rank, world_size=world_size, mask_generator=mask_generator,
                         streams=streams, normalise_on_device=normalise_on_device)  # fmt: skip
    if state:
        stream.load_state_dict(state)
    return stream


def _check_cache_room(table: ShardTable, cfg: Config, streams: int, world_size: int) -> None:
    """The node cache must hold, for every rank on the node, two windows (read + fetched ahead) of its streams."""
    per_rank = -(-streams // world_size) if world_size <= streams else 2  # W not dividing C: parts of two streams
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    largest = max(table.shard_bytes(shard) for shard in range(len(table.locations)))
    need = local_ranks * per_rank * 2 * min(cfg.data.shuffle_window, len(table.locations)) * largest
    table.cache.check_window(need, f"2 windows of data.shuffle_window={cfg.data.shuffle_window} shards x {per_rank} "
                                   f"stream(s) x {local_ranks} rank(s) on this node")  # fmt: skip


class _EvalBatches(IterableDataset):
    def __init__(self, table: ShardTable, *, image_size: int, batch_size: int, mean, std):
        self.table, self.image_size, self.batch_size, self.mean, self.std = table, image_size, batch_size, mean, std

    def batch(self, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        ids = range(number * self.batch_size, min(len(self.table), (number + 1) * self.batch_size))
        if self.table.cache is not None:  # remote: keep this batch's shards, fetch the next two, release the rest
            first, last = (int(np.searchsorted(self.table.starts, i, "right")) - 1 for i in (ids[0], ids[-1]))
            self.table.release_except(set(range(first, last + 1)))
            self.table.prefetch(range(first, min(last + 3, len(self.table.locations))))
        for sample_id in ids:
            try:
                payload, label = self.table.read_labelled(sample_id)
                images.append(eval_transform(payload, size=self.image_size))
            except BadImage as err:
                print(f"mimscale data: skipping corrupt {self.table.describe(sample_id)} ({err})", file=sys.stderr)
                continue
            labels.append(label)
        if not images:
            return torch.empty(0, 3, self.image_size, self.image_size), torch.empty(0, dtype=torch.int64)
        return normalise_batch(images, self.mean, self.std), torch.tensor(labels, dtype=torch.int64)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        batches = -(-len(self.table) // self.batch_size)
        for number in itertools.islice(range(batches), worker, None, workers):
            yield self.batch(number)


def iter_eval_batches(
    pattern: str,
    *,
    image_size: int,
    batch_size: int,
    mean: list[float],
    std: list[float],
    num_workers: int = 0,
    key: str = "eval shards",
    data_cfg=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [B,3,S,S], labels int64 [B]) over every sample once, in a fixed, rank-agnostic order.

    Images are resized (shorter side S/0.875) and centre-cropped; the last batch may be short; corrupt
    samples are skipped with a message. ``key`` names the config key in errors (e.g. eval.val_shards).
    Remote shards go through the node cache of ``data_cfg`` (a DataConfig; the defaults when None).
    """
    table = load_table(pattern, key, cache_dir=(data_cfg.cache_dir or None) if data_cfg else None, data_cfg=data_cfg)
    dataset = _EvalBatches(table, image_size=image_size, batch_size=batch_size, mean=list(mean), std=list(std))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for images, labels in loader:
        if len(labels):
            yield images, labels
