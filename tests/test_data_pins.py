"""Behaviour pinned across refactors of the data layer (issue 21): an epoch's sample order, a resumed data state
and the exact bytes of the samples.idx built for the committed sample set, by every path that builds one.

The expected values were computed on the code before storage/, shards/ and pipeline/ were reshaped; a change
to any of them changes sample order, checkpoints' data state or the index file format, which must not happen
silently (old checkpoints must resume in the same order, published indexes must stay readable and identical).
"""

from __future__ import annotations

import hashlib
import itertools
import shutil
from pathlib import Path

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.order import epoch_sequence
from mimscale.pipeline.stream import build_train_loader
from mimscale.shards.writer import shard_entry, write_manifest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
SAMPLE_SHARDS = [120, 104, 88, 72]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)

# seed 3, 4 canonical streams, windows of 2 shards, global batch 16 (one rank)
FIRST_IDS = [374, 347, 368, 0, 109, 47, 113, 65, 245, 123, 266, 242, 206, 129, 154, 135]
EPOCH0_IDS_SHA256 = "1f0ea3a39b9a7592e53f5b1b95a293d77086bf14a39b1d5b704828420d6ba870"
EPOCH1_IDS_SHA256 = "94e734d9bb1f9f12ac0ea0e82306e4a4e9e90bb9fc9626237bcfc3ff4201f6c9"
STATE_AFTER_5 = {
    "version": 2,
    "epoch": 0,
    "consumed": 80,
    "seed": 3,
    "streams": 4,
    "shuffle_window": 2,
    "fingerprint": "1a67e6adb776b683",
    "num_samples": 384,
    "global_batch": 16,
    "corrupt_count": 0,
}
SAMPLE_IDX_SHA256 = "1557969619d265260504a0704c4c43d1bee3b6747979e9ed775af716483753d9"


def ids_digest(ids) -> str:
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()


def pinned_cfg():
    return load_config(
        None,
        [
            f"data.shards={SAMPLE}/*.tar",
            "data.batch_size=16",
            "data.image_size=32",
            "data.num_workers=0",
            "data.streams=4",
            "data.shuffle_window=2",
            "run.seed=3",
        ],
    )


def test_an_epochs_sample_order_and_the_data_state_are_pinned():
    """The ids the training stream hands out, and the state a checkpoint saves, for a fixed seed/C/window."""
    stream = build_train_loader(pinned_cfg(), rank=0, world_size=1, mask_generator=MASK)
    batches = list(itertools.islice(iter(stream), 24 + 24))
    ids = [int(i) for batch in batches for i in batch["sample_id"]]
    assert ids[:16] == FIRST_IDS
    assert ids_digest(ids[:384]) == EPOCH0_IDS_SHA256
    assert ids_digest(ids[384:]) == EPOCH1_IDS_SHA256
    plan = epoch_sequence(SAMPLE_SHARDS, seed=3, epoch=0, streams=4, window=2, global_batch=16)
    assert ids_digest(plan) == EPOCH0_IDS_SHA256  # the stream reads exactly the plan's order
    resumed = build_train_loader(pinned_cfg(), rank=0, world_size=1, mask_generator=MASK)
    first = list(itertools.islice(iter(resumed), 5))
    assert resumed.state_dict() == STATE_AFTER_5
    again = build_train_loader(pinned_cfg(), rank=0, world_size=1, mask_generator=MASK, state=resumed.state_dict())
    assert [int(i) for i in next(iter(again))["sample_id"]] == ids[80:96]
    assert [int(i) for batch in first for i in batch["sample_id"]] == ids[:80]


def bare_copy(tmp_path: Path, name: str) -> Path:
    """The sample tars without their manifest and samples.idx (a foreign set, as img2dataset writes one)."""
    folder = tmp_path / name
    folder.mkdir()
    for tar in sorted(SAMPLE.glob("*.tar")):
        shutil.copy(tar, folder / tar.name)
    return folder


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_index_files_bytes_are_pinned_by_every_path_that_builds_one(tmp_path):
    """`shards index`, create's write_manifest and the committed file: one format, byte for byte."""
    assert file_digest(SAMPLE / "samples.idx") == SAMPLE_IDX_SHA256
    indexed = bare_copy(tmp_path, "indexed")
    assert cli_main(["shards", "index", str(indexed)]) == 0
    assert file_digest(indexed / "samples.idx") == SAMPLE_IDX_SHA256
    written = bare_copy(tmp_path, "written")
    write_manifest(written, [shard_entry(path) for path in sorted(written.glob("*.tar"))])
    assert file_digest(written / "samples.idx") == SAMPLE_IDX_SHA256


def test_an_index_built_from_urls_has_the_same_bytes(tmp_path):
    """A URL set without a published index: each shard downloaded once, the index built in the cache folder."""
    from http_serve import ShardServer

    served = bare_copy(tmp_path, "served")
    with ShardServer(served) as server:
        pattern = server.url("sample-{000..003}.tar")
        assert cli_main(["shards", "index", pattern, "--cache", str(tmp_path / "cache")]) == 0
    built = list((tmp_path / "cache/index").glob("*.idx"))
    assert len(built) == 1 and file_digest(built[0]) == SAMPLE_IDX_SHA256
