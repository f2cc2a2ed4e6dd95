"""s3:// shards through s3fs, against moto's S3 server: a real S3 HTTP endpoint on 127.0.0.1, started here, reached
the way users reach MinIO or Ceph (AWS_ENDPOINT_URL_S3 and the usual credential variables)."""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from mimscale.cli import main as cli_main  # noqa: E402 - after the skips
from mimscale.config import load_config  # noqa: E402
from mimscale.pipeline.masking import build_mask_generator  # noqa: E402
from mimscale.pipeline.stream import build_train_loader, iter_eval_batches  # noqa: E402
from mimscale.shards.format import load_remote_manifest, manifest_checksums  # noqa: E402
from mimscale.shards.index import SetIndex  # noqa: E402
from mimscale.storage import remote, shard_cache  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
NAMES = [f"sample-00{n}.tar" for n in range(4)]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)


@pytest.fixture
def bucket(monkeypatch):
    """Bucket `shards`: `sample/` holds the sample set as published (manifest.json, samples.idx), `bare/` only
    its tars (a foreign set)."""
    import boto3
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://{}:{}".format(*server.get_host_and_port())
    for name, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket="shards")
    for path in sorted(SAMPLE.iterdir()):
        client.upload_file(str(path), "shards", f"sample/{path.name}")
        if path.suffix == ".tar":
            client.upload_file(str(path), "shards", f"bare/{path.name}")
    try:
        yield client
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def test_s3_patterns_list_prefixes_and_globs_and_name_what_is_missing(bucket, tmp_path):
    expected = [f"s3://shards/sample/{name}" for name in NAMES]
    assert remote.expand("s3://shards/sample/") == expected  # every .tar under the prefix
    assert remote.expand("s3://shards/sample/*.tar") == expected
    assert remote.expand("s3://shards/sample/sample-{000..001}.tar::s3://shards/bare/sample-003.tar") == [
        *expected[:2],
        "s3://shards/bare/sample-003.tar",
    ]
    with pytest.raises(remote.RemoteError, match=r"s3://nobucket/x/' matches no .tar shards; check the bucket"):
        remote.expand("s3://nobucket/x/")
    cache = shard_cache.ShardCache(tmp_path / "cache", 10**9, backoff_s=0.01)
    with pytest.raises(remote.RemoteNotFound, match=r"s3://shards/sample/nope.tar does not exist"):
        cache.local_path("s3://shards/sample/nope.tar")
    checksums = manifest_checksums(load_remote_manifest("s3://shards/sample"))
    assert checksums["sample-002.tar"] == hashlib.sha256((SAMPLE / "sample-002.tar").read_bytes()).hexdigest()
    assert manifest_checksums(load_remote_manifest("s3://shards/bare")) == {}  # a foreign set has none


def test_training_and_eval_streams_from_s3_are_the_local_streams(bucket, tmp_path):
    """Rank 1 of 2 with 2 DataLoader workers (forked after s3fs started its event loop): the same images, masks,
    labels and sample ids as from the local files, with the published index, and with none (built once)."""

    def cfg(shards: str, cache: str):
        return load_config(
            None,
            [
                f"data.shards={shards}",
                "data.batch_size=8",
                "data.image_size=32",
                "data.num_workers=2",
                f"data.cache_dir={tmp_path / cache}",
                "data.shuffle_window=2",
            ],
        )

    local = build_train_loader(cfg(str(SAMPLE), "unused"), rank=1, world_size=2, mask_generator=MASK)
    expected = list(itertools.islice(iter(local), 10))
    for prefix in ("sample", "bare"):
        stream = build_train_loader(cfg(f"s3://shards/{prefix}/", prefix), rank=1, world_size=2, mask_generator=MASK)
        assert stream.table.fingerprint == local.table.fingerprint
        got = list(itertools.islice(iter(stream), 10))
        for a, b in zip(expected, got, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in ("image", "mask", "label", "sample_id"))
        cached = sorted(path.name.split("-", 1)[1] for path in (tmp_path / prefix / "shards").glob("*.tar"))
        assert set(cached) <= set(NAMES) and cached
    kwargs = {"image_size": 32, "batch_size": 50, "mean": [0.5] * 3, "std": [0.25] * 3, "num_workers": 2}
    here = list(iter_eval_batches(str(SAMPLE), **kwargs))
    there = list(iter_eval_batches("s3://shards/sample/", data_cfg=cfg("x", "eval").data, **kwargs))
    assert len(here) == len(there)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(here, there, strict=True))


def test_shards_index_and_verify_cli_on_an_s3_prefix(bucket, tmp_path, capsys):
    assert cli_main(["shards", "index", "s3://shards/bare/", "--cache", str(tmp_path / "cache")]) == 0
    assert "4 shards, 384 samples" in capsys.readouterr().out
    assert cli_main(["shards", "verify", "s3://shards/sample/", "--cache", str(tmp_path / "cache")]) == 0
    assert "OK: s3://shards/sample/: 4 shards, 384 samples; checked size, sha256" in capsys.readouterr().out
    built = SetIndex(next((tmp_path / "cache" / "index").glob("*.idx")))
    local = SetIndex(SAMPLE / "samples.idx")
    assert built.names == local.names
    assert all(np.array_equal(built.shard_rows(n), local.shard_rows(n)) for n in range(len(NAMES)))
