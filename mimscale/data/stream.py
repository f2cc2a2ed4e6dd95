"""The resumable training stream: exact data position, independent of world size and worker count.

Every shard is indexed once (tar member offsets, cached in the manifest), so any sample can be read by
seeking. The sample order of an epoch is a permutation of the global sample list derived only from
(seed, epoch). Global micro-batch m of an epoch covers order positions [start + m*B*W, start + (m+1)*B*W), and
rank r takes its r-th slice of B. Each DataLoader worker builds whole micro-batches (batch t goes to worker
t % num_workers), so the DataLoader's round-robin hands them out in order. Crop, flip and mask randomness come
from (seed, epoch, sample id). The state is therefore just {epoch, samples consumed in the epoch}: resuming
with another world size but the same global batch continues the very same global order.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mimscale.config import Config
from mimscale.data.device_decode import DeferredCrop, DeferredRows
from mimscale.data.images import BadImage
from mimscale.data.shards import ShardError, ShardIndex, dataset_fingerprint, expand_shards, index_shards
from mimscale.data.transforms import eval_transform, normalise_batch, train_crop, train_crop_or_defer, write_chw

MAX_CONSECUTIVE_CORRUPT = 64
STATE_VERSION = 1


class SampleTable:
    """Flat arrays over all samples of a shard set: which shard, where in it, and the label."""

    def __init__(self, paths: list[Path], indexes: list[ShardIndex]):
        self.paths = [str(path) for path in paths]
        self.fingerprint = dataset_fingerprint(indexes)
        self.shard = np.concatenate([np.full(len(ix), n, dtype=np.int32) for n, ix in enumerate(indexes)])
        self.offset = np.concatenate([np.asarray(ix.offsets, dtype=np.int64) for ix in indexes])
        self.size = np.concatenate([np.asarray(ix.sizes, dtype=np.int64) for ix in indexes])
        self.label = np.concatenate([np.asarray(ix.labels, dtype=np.int64) for ix in indexes])
        self.shard_keys = [ix.keys for ix in indexes]  # for error messages
        self.shard_start = np.cumsum([0] + [len(ix) for ix in indexes])
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.offset)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not travel to workers
        return state

    def describe(self, sample_id: int) -> str:
        shard = int(self.shard[sample_id])
        key = self.shard_keys[shard][sample_id - int(self.shard_start[shard])]
        return f"shard {self.paths[shard]} sample {key!r}"

    def read(self, sample_id: int) -> bytes:
        """The encoded image bytes of one sample (BadImage if the shard is shorter than its index says)."""
        shard = int(self.shard[sample_id])
        handle = self._handles.get(shard)
        if handle is None:
            if len(self._handles) >= 64:
                self._handles.pop(next(iter(self._handles))).close()
            try:
                handle = self._handles[shard] = open(self.paths[shard], "rb")
            except OSError as err:
                raise BadImage("unreadable_shard", str(err)) from err
        handle.seek(int(self.offset[sample_id]))
        payload = handle.read(int(self.size[sample_id]))
        if len(payload) != self.size[sample_id]:
            raise BadImage("truncated", f"{len(payload)} of {self.size[sample_id]} bytes")
        return payload


def load_table(pattern: str, key: str) -> SampleTable:
    paths = expand_shards(pattern, key=key)
    table = SampleTable(paths, index_shards(paths))
    if len(table) == 0:
        raise ShardError(f"{key}={pattern!r}: the {len(paths)} shard(s) hold no image samples (.jpg/.png/.webp)")
    return table


_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixing hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class EpochOrder:
    """The sample order of one epoch, a pseudo-random permutation of [0, N) keyed by (seed, epoch) only.

    A 4-round Feistel network over the next even power of two with cycle-walking maps any position to its
    sample in O(1) time and memory, so a 400M-sample epoch needs no 3 GB permutation array in every worker.
    """

    ROUNDS = 4

    def __init__(self, seed: int, epoch: int, num_samples: int):
        self.num_samples = num_samples
        self.half_bits = max(1, (max(1, num_samples - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        keys = np.random.default_rng([seed, epoch, 0x5EED]).integers(0, 1 << 62, self.ROUNDS)
        self.keys = [int(key) for key in keys]

    def _feistel(self, value: int) -> int:
        left, right = value >> self.half_bits, value & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(key ^ right) & self.half_mask)
        return (left << self.half_bits) | right

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.num_samples:
            raise IndexError(f"position {position} outside an epoch of {self.num_samples} samples")
        value = self._feistel(position)
        while value >= self.num_samples:  # cycle-walk back into [0, N); at most a few steps on average
            value = self._feistel(value)
        return value

    def __len__(self) -> int:
        return self.num_samples


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The whole order of one epoch as an array (for tests and tools; the stream looks positions up lazily)."""
    order = EpochOrder(seed, epoch, num_samples)
    return np.fromiter((order[p] for p in range(num_samples)), dtype=np.int64, count=num_samples)


@dataclass(frozen=True)
class Schedule:
    """Where global micro-batch t (counted from the resume point) lies: (epoch, first order position)."""

    num_samples: int
    global_batch: int
    start_epoch: int
    start_consumed: int

    def positions(self) -> Iterator[tuple[int, int]]:
        epoch, position = self.start_epoch, self.start_consumed
        while True:
            while position + self.global_batch <= self.num_samples:
                yield epoch, position
                position += self.global_batch
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

    def __init__(self, table: SampleTable, schedule: Schedule, spec: AugmentSpec, *, rank: int, batch_size: int,
                 seed: int, mask_generator):  # fmt: skip
        self.table, self.schedule, self.spec = table, schedule, spec
        self.rank, self.batch_size, self.seed, self.mask_generator = rank, batch_size, seed, mask_generator
        self._order_epoch, self._order = -1, None
        self._reported = 0

    def _order_for(self, epoch: int) -> EpochOrder:
        if epoch != self._order_epoch:
            self._order_epoch, self._order = epoch, EpochOrder(self.seed, epoch, len(self.table))
        return self._order

    def _load(self, epoch: int, position: int) -> tuple[torch.Tensor, bool, np.ndarray, int, int]:
        """(pixels, flip?, mask, sample id, replaced) at an order position; a corrupt sample gives way to the next."""
        order = self._order_for(epoch)
        planned = order[position]
        rng = np.random.default_rng([self.seed, epoch, planned])
        spec = self.spec
        for step in range(MAX_CONSECUTIVE_CORRUPT):
            sample_id = order[(position + step) % len(order)]
            try:
                payload = self.table.read(sample_id)
                crop = train_crop_or_defer if spec.decode == "device" else train_crop
                image, flip = crop(payload, size=spec.size, scale=spec.scale, ratio=spec.ratio,
                                   hflip=spec.hflip, rng=rng)  # fmt: skip
            except BadImage as err:
                self._report(sample_id, err)
                continue
            return image, flip, np.asarray(self.mask_generator(rng), dtype=bool), sample_id, step
        raise ShardError(
            f"{MAX_CONSECUTIVE_CORRUPT} consecutive corrupt samples from {self.table.describe(planned)} on; "
            "run `mimscale shards verify` on the shard folder and re-create the broken shards"
        )

    def _report(self, sample_id: int, err: BadImage) -> None:
        if self._reported < 5:
            print(f"mimscale data: replacing corrupt {self.table.describe(sample_id)} ({err})", file=sys.stderr)
        self._reported += 1

    def batch(self, epoch: int, position: int) -> dict:
        first = position + self.rank * self.batch_size
        size = self.spec.size
        images = torch.empty((self.batch_size, 3, size, size), dtype=torch.uint8)  # torch-owned: shares/pins as usual
        pixels = images.numpy()
        masks, ids, labels, corrupt, deferred = [], [], [], 0, DeferredRows()
        for row, pos in enumerate(range(first, first + self.batch_size)):
            image, flip, mask, sample_id, replaced = self._load(epoch, pos)
            if isinstance(image, DeferredCrop):
                deferred.add(row, image, flip)  # decoded, cropped and flipped in the main process
            else:
                write_chw(pixels[row], image, flip)  # now, while the image is in cache; the flip rides on the copy
            masks.append(mask)
            ids.append(sample_id)
            labels.append(int(self.table.label[sample_id]))
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
    """

    def __init__(self, cfg: Config, table: SampleTable, *, rank: int, world_size: int, mask_generator,
                 normalise_on_device: bool = False):  # fmt: skip
        self.table, self.rank, self.world_size = table, rank, world_size
        self.batch_size, self.seed = cfg.data.batch_size, cfg.run.seed
        self.global_batch = self.batch_size * world_size
        self.num_workers, self.pin_memory = cfg.data.num_workers, cfg.data.pin_memory and torch.cuda.is_available()
        self.mask_generator = mask_generator
        self.spec = AugmentSpec(cfg.data.image_size, tuple(cfg.data.crop_scale), tuple(cfg.data.crop_ratio),
                                cfg.data.hflip, tuple(cfg.data.mean), tuple(cfg.data.std),
                                uint8=normalise_on_device or cfg.data.decode == "device",
                                decode=cfg.data.decode)  # fmt: skip
        self.num_samples = len(table)
        if self.num_samples < self.global_batch:
            raise ShardError(
                f"data.shards holds {self.num_samples} samples, fewer than one global batch "
                f"(data.batch_size={self.batch_size} x world size {world_size}); lower data.batch_size or add data"
            )
        self.steps_per_epoch = self.num_samples // self.global_batch
        self.epoch, self.consumed, self.corrupt_count = 0, 0, 0

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "fingerprint": self.table.fingerprint,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "corrupt_count": self.corrupt_count,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; a state from other data or another seed is a clear error."""
        missing = [key for key in ("epoch", "consumed", "seed", "fingerprint") if key not in state]
        if missing:
            raise ShardError(f"data state is missing {', '.join(missing)}; it was not written by TrainStream")
        if state["fingerprint"] != self.table.fingerprint:
            raise ShardError(
                f"the checkpoint's data state belongs to another shard set (fingerprint {state['fingerprint']}, "
                f"{state.get('num_samples', '?')} samples) than data.shards ({self.table.fingerprint}, "
                f"{self.num_samples} samples); point data.shards at the original shards or start a new run"
            )
        if state["seed"] != self.seed:
            raise ShardError(
                f"the checkpoint's data order was drawn with run.seed={state['seed']} but run.seed={self.seed}; "
                "resume with the original seed"
            )
        epoch, consumed = int(state["epoch"]), int(state["consumed"])
        if not 0 <= consumed <= self.num_samples:
            raise ShardError(f"data state consumed={consumed} is outside the dataset's {self.num_samples} samples")
        if consumed + self.global_batch > self.num_samples:
            epoch, consumed = epoch + 1, 0  # the epoch's remaining samples do not fill a global batch
        self.epoch, self.consumed = epoch, consumed
        self.corrupt_count = int(state.get("corrupt_count", 0))

    def _loader(self) -> DataLoader:
        schedule = Schedule(self.num_samples, self.global_batch, self.epoch, self.consumed)
        dataset = _TrainBatches(self.table, schedule, self.spec, rank=self.rank, batch_size=self.batch_size,
                                seed=self.seed, mask_generator=self.mask_generator)  # fmt: skip
        workers = self.num_workers
        return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                          prefetch_factor=2 if workers else None, persistent_workers=False)  # fmt: skip

    def __iter__(self) -> Iterator[dict]:
        positions = Schedule(self.num_samples, self.global_batch, self.epoch, self.consumed).positions()
        for (epoch, position), batch in zip(positions, self._loader(), strict=False):
            self.corrupt_count += int(batch.pop("_corrupt"))
            self.epoch, self.consumed = epoch, position + self.global_batch  # the position after this batch
            yield batch


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
    ``mimscale.data.transforms.normalise_on_device(image, cfg.data.mean, cfg.data.std, dtype)`` on the device.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    stream = TrainStream(cfg, load_table(cfg.data.shards, "data.shards"), rank=rank, world_size=world_size,
                         mask_generator=mask_generator, normalise_on_device=normalise_on_device)  # fmt: skip
    if state:
        stream.load_state_dict(state)
    return stream


class _EvalBatches(IterableDataset):
    def __init__(self, table: SampleTable, *, image_size: int, batch_size: int, mean, std):
        self.table, self.image_size, self.batch_size, self.mean, self.std = table, image_size, batch_size, mean, std

    def batch(self, number: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for sample_id in range(number * self.batch_size, min(len(self.table), (number + 1) * self.batch_size)):
            try:
                images.append(eval_transform(self.table.read(sample_id), size=self.image_size))
            except BadImage as err:
                print(f"mimscale data: skipping corrupt {self.table.describe(sample_id)} ({err})", file=sys.stderr)
                continue
            labels.append(int(self.table.label[sample_id]))
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
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images float32 [B,3,S,S], labels int64 [B]) over every sample once, in a fixed, rank-agnostic order.

    Images are resized (shorter side S/0.875) and centre-cropped; the last batch may be short; corrupt
    samples are skipped with a message. ``key`` names the config key in errors (e.g. eval.val_shards).
    """
    table = load_table(pattern, key)
    dataset = _EvalBatches(table, image_size=image_size, batch_size=batch_size, mean=list(mean), std=list(std))
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers)
    for images, labels in loader:
        if len(labels):
            yield images, labels
