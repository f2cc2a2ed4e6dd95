"""The sample order of an epoch: a function of (seed, epoch, streams, window, shard sizes) only, read locally.

    shards --(keyed by seed: fixed for the run)--> permuted and cut into C equal canonical streams
    stream s --(keyed by seed, epoch, s)--> its shard spans in a new order each epoch
    windows of ``window`` consecutive spans --(keyed by seed, epoch, s, window)--> samples permuted inside

Global micro-batch m takes the next g = G/C samples of every stream, stream after stream (G = global batch),
and rank r takes the r-th slice of B = G/W of that arrangement. When W divides C, rank r reads only streams
[r*C/W, (r+1)*C/W): a few shards at a time, near sequentially. The order never depends on W or on the number
of DataLoader workers, so a run resumes on another number of ranks or nodes in the same order as long as C
and G stay fixed (C must divide G; when W does not divide C ranks read parts of two streams, still correctly).

Memory is O(shards + C): each stream keeps its spans and window boundaries, and a window's permutation is a
keyed Feistel bijection computed per position, never an array over N samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mimscale.shards.format import ShardError

_MASK64 = (1 << 64) - 1
SHARD_KEY, SPAN_KEY, WINDOW_KEY = 0x5EA1D, 0x5EA1E, 0x5EED


def _mix64(value: int) -> int:
    """splitmix64 finaliser: a cheap, well-mixing hash of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class KeyedPermutation:
    """A pseudo-random permutation of [0, n) keyed by a tuple of ints, evaluated per position in O(1) memory.

    A 4-round Feistel network over the next even power of two, with cycle-walking back into [0, n).
    """

    ROUNDS = 4

    def __init__(self, size: int, key: tuple[int, ...]):
        self.size = size
        self.half_bits = max(1, (max(1, size - 1).bit_length() + 1) // 2)
        self.half_mask = (1 << self.half_bits) - 1
        self.keys = [int(k) for k in np.random.default_rng(list(key)).integers(0, 1 << 62, self.ROUNDS)]

    def _feistel(self, value: int) -> int:
        left, right = value >> self.half_bits, value & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(key ^ right) & self.half_mask)
        return (left << self.half_bits) | right

    def __getitem__(self, position: int) -> int:
        if not 0 <= position < self.size:
            raise IndexError(f"position {position} outside a permutation of {self.size}")
        value = self._feistel(position)
        while value >= self.size:  # at most a few steps on average: the domain is < 4x the size
            value = self._feistel(value)
        return value

    def __len__(self) -> int:
        return self.size


@dataclass
class _Stream:
    shard: np.ndarray  # shard number of each span, in this epoch's order
    first: np.ndarray  # first sample of the span within its shard
    span_start: np.ndarray  # position of each span in the stream (len spans + 1)
    window_start: np.ndarray  # position of each window in the stream (len windows + 1)


class EpochPlan:
    """Where the k-th sample of canonical stream s lies in one epoch; the same in every rank and worker."""

    def __init__(self, counts: np.ndarray, *, seed: int, epoch: int, streams: int, window: int):
        counts = np.asarray(counts, dtype=np.int64)
        self.seed, self.epoch, self.num_streams, self.window = seed, epoch, streams, window
        self.shard_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        total = int(self.shard_starts[-1])
        self.stream_length = total // streams
        if self.stream_length == 0:
            raise ShardError(f"{total} samples cannot fill data.streams={streams} streams; lower data.streams")
        order = np.random.default_rng([seed, SHARD_KEY]).permutation(len(counts))  # fixed for the whole run
        sizes = counts[order]
        ends = np.cumsum(sizes)
        self.streams = [self._stream(s, order, sizes, ends) for s in range(streams)]
        self._windows: dict[tuple[int, int], KeyedPermutation] = {}

    def _stream(self, s: int, order: np.ndarray, sizes: np.ndarray, ends: np.ndarray) -> _Stream:
        low, high = s * self.stream_length, (s + 1) * self.stream_length
        i0, i1 = int(np.searchsorted(ends, low, "right")), int(np.searchsorted(ends, high - 1, "right"))
        begins = ends[i0 : i1 + 1] - sizes[i0 : i1 + 1]
        first = np.maximum(begins, low) - begins
        lengths = np.minimum(ends[i0 : i1 + 1], high) - begins - first
        keep = lengths > 0
        shard, first, lengths = order[i0 : i1 + 1][keep], first[keep], lengths[keep]
        spans = np.random.default_rng([self.seed, self.epoch, s, SPAN_KEY]).permutation(len(shard))
        shard, first, lengths = shard[spans], first[spans], lengths[spans]
        span_start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return _Stream(shard, first, span_start, np.append(span_start[:-1][:: self.window], span_start[-1]))

    def window_of(self, s: int, k: int) -> int:
        return int(np.searchsorted(self.streams[s].window_start, k, "right")) - 1

    def window_shards(self, s: int, window: int) -> np.ndarray:
        """Shard numbers stream s reads in one of its windows (empty past the end)."""
        return self.streams[s].shard[window * self.window : (window + 1) * self.window]

    def _permutation(self, s: int, window: int, size: int) -> KeyedPermutation:
        perm = self._windows.get((s, window))
        if perm is None:
            if len(self._windows) > 4 * self.num_streams + 16:
                self._windows.clear()
            key = (self.seed, self.epoch, s, window, WINDOW_KEY)
            perm = self._windows[(s, window)] = KeyedPermutation(size, key)
        return perm

    def sample(self, s: int, k: int) -> int:
        """The global sample id at position k of stream s (0 <= k < stream_length)."""
        if not 0 <= k < self.stream_length:
            raise IndexError(f"position {k} outside a stream of {self.stream_length} samples")
        stream = self.streams[s]
        window = self.window_of(s, k)
        base = int(stream.window_start[window])
        size = int(stream.window_start[window + 1]) - base
        position = base + self._permutation(s, window, size)[k - base]
        span = int(np.searchsorted(stream.span_start, position, "right")) - 1
        within = int(stream.first[span]) + position - int(stream.span_start[span])
        return int(self.shard_starts[stream.shard[span]]) + within


def arrangement(j: int, global_batch: int, streams: int) -> tuple[int, int]:
    """(stream, offset within the stream's g = G/C samples) of position j of a global micro-batch."""
    return divmod(j, global_batch // streams)


def epoch_sequence(counts, *, seed: int, epoch: int, streams: int, window: int, global_batch: int) -> np.ndarray:
    """Every sample id of one epoch in global-batch order (tests and benches; the stream looks ids up lazily)."""
    plan = EpochPlan(counts, seed=seed, epoch=epoch, streams=streams, window=window)
    per_stream = global_batch // streams
    steps = plan.stream_length // per_stream
    out = np.empty(steps * global_batch, dtype=np.int64)
    for m in range(steps):
        for j in range(global_batch):
            s, i = arrangement(j, global_batch, streams)
            out[m * global_batch + j] = plan.sample(s, m * per_stream + i)
    return out
