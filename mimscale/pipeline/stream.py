"""The resumable training stream: exact data position, independent of world size and worker count, read locally.

Shards are opened and indexed once (shards/sets.py, shards/index.py: samples.idx, memory-mapped, O(shards) at
start-up; a set without one that publishes per-shard counts is counted instead, shards/counts.py, and each shard is
indexed when first read). The order of an epoch comes from pipeline/order.py: a keyed shard permutation cut into C
canonical streams (``data.streams``, fixed when the run starts), samples shuffled within windows of ``data.shuffle_window`` shards; it depends only on
(seed, epoch, C, window, the shard set). Global micro-batch m takes g = G/C samples from each stream and rank r
takes the r-th slice of B, so with W dividing C a rank reads only its own streams' shards, a window at a time.
Each DataLoader worker builds whole micro-batches (batch t goes to worker t % num_workers), so the DataLoader's
round-robin hands them out in order. Crop, flip and mask randomness come from (seed, epoch, sample id). The
state is {epoch, samples consumed in the epoch, C, window}: a resume with another world size but the same
global batch continues the very same order.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.config import Config
from mimscale.pipeline.device_decode import DeferredCrop, DeferredRows
from mimscale.pipeline.order import EpochPlan, arrangement
from mimscale.pipeline.transforms import eval_transform, normalise_batch, train_crop, write_chw
from mimscale.shards.format import ShardError
from mimscale.shards.images import BadImage
from mimscale.shards.sets import ShardTable, open_shard_set
from mimscale.storage.shard_cache import ranks_on_this_node

MAX_CONSECUTIVE_CORRUPT = 64
STATE_VERSION = 2


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
    decode: str = "worker"  # "device": JPEGs travel encoded, the main process decodes them (pipeline/device_decode.py)


class _TrainBatches(IterableDataset):
    """Runs in each DataLoader worker: builds this rank's slice of every num_workers-th global micro-batch."""

    def __init__(
        self,
        table: ShardTable,
        schedule: Schedule,
        spec: AugmentSpec,
        *,
        rank: int,
        batch_size: int,
        seed: int,
        streams: int,
        window: int,
        mask_generator,
    ):
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
                image, flip = train_crop(
                    payload,
                    size=spec.size,
                    scale=spec.scale,
                    ratio=spec.ratio,
                    hflip=spec.hflip,
                    rng=rng,
                    defer=spec.decode == "device",
                )
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

    def __init__(
        self,
        cfg: Config,
        table: ShardTable,
        *,
        rank: int,
        world_size: int,
        mask_generator,
        streams: int,
        normalise_on_device: bool = False,
    ):
        self.table, self.rank, self.world_size = table, rank, world_size
        self.batch_size, self.seed = cfg.data.batch_size, cfg.run.seed
        self.global_batch = self.batch_size * world_size
        self.streams, self.window = streams, cfg.data.shuffle_window
        self.num_workers, self.pin_memory = cfg.data.num_workers, cfg.data.pin_memory and torch.cuda.is_available()
        self.mask_generator = mask_generator
        self.spec = AugmentSpec(
            cfg.data.image_size,
            tuple(cfg.data.crop_scale),
            tuple(cfg.data.crop_ratio),
            cfg.data.hflip,
            tuple(cfg.data.mean),
            tuple(cfg.data.std),
            uint8=normalise_on_device or cfg.data.decode == "device",
            decode=cfg.data.decode,
        )
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
        check_resumable(
            state,
            fingerprint=self.table.fingerprint,
            num_samples=self.num_samples,
            seed=self.seed,
            streams=self.streams,
            window=self.window,
        )
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
        dataset = _TrainBatches(
            self.table,
            self._schedule(),
            self.spec,
            rank=self.rank,
            batch_size=self.batch_size,
            seed=self.seed,
            streams=self.streams,
            window=self.window,
            mask_generator=self.mask_generator,
        )
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=2 if workers else None,
            persistent_workers=False,
        )

    def _fetch_first_windows(self) -> None:
        """Remote shards: fetch this rank's current and next windows from the main process while workers start (after
        they forked: a fork while a download thread runs could copy a held lock into the worker)."""
        plan = EpochPlan(self.table.counts, seed=self.seed, epoch=self.epoch, streams=self.streams, window=self.window)
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
    table = open_shard_set(cfg.data.shards, "data.shards", data_cfg=cfg.data, counts=True)
    if table.cache is not None:
        _check_cache_room(table, cfg, streams, world_size)
    stream = TrainStream(
        cfg,
        table,
        rank=rank,
        world_size=world_size,
        mask_generator=mask_generator,
        streams=streams,
        normalise_on_device=normalise_on_device,
    )
    if state:
        stream.load_state_dict(state)
    return stream


def _check_cache_room(table: ShardTable, cfg: Config, streams: int, world_size: int) -> None:
    """The node cache must hold, for every rank on the node, two windows (read + fetched ahead) of its streams."""
    per_rank = -(-streams // world_size) if world_size <= streams else 2  # W not dividing C: parts of two streams
    local_ranks = ranks_on_this_node()
    largest = max(table.shard_bytes(shard) for shard in range(len(table.locations)))  # -1: not known (counted set)
    need = local_ranks * per_rank * 2 * min(cfg.data.shuffle_window, len(table.locations)) * largest
    table.cache.check_window(
        need,
        f"2 windows of data.shuffle_window={cfg.data.shuffle_window} shards x {per_rank} "
        f"stream(s) x {local_ranks} rank(s) on this node",
    )


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
    table = open_shard_set(pattern, key, data_cfg=data_cfg, counts=True)
    dataset = _EvalBatches(table, image_size=image_size, batch_size=batch_size, mean=list(mean), std=list(std))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for images, labels in loader:
        if len(labels):
            yield images, labels
