"""hf:// shards, read through the storage layer from a stand-in Hub on 127.0.0.1 (tests/hub_serve.py: the Hub's
resolve and tree routes, large files redirected to a second server as the Hub redirects to its CDN), reached the way
users reach a mirror or a private Hub: HF_ENDPOINT. HF_HUB_OFFLINE is unset inside these tests only."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hub_serve import HubServer
from PIL import Image

from mimscale.cli import main as cli_main
from mimscale.config import load_config
from mimscale.pipeline.masking import build_mask_generator
from mimscale.pipeline.stream import build_train_loader, iter_eval_batches
from mimscale.shards.index import SetIndex
from mimscale.shards.sets import open_shard_set
from mimscale.storage import hub, remote, shard_cache

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "shards/sample"
NAMES = [f"sample-00{n}.tar" for n in range(4)]
MASK = build_mask_generator("random_tokens", image_size=32, token_stride=8, ratio=0.5, cell_size=32)
TOKEN = "hf_test_0123456789abcdef"


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """Datasets: test/sample (the sample set as published, with manifest.json and samples.idx, at revision main, and
    only its first two tars under data/ at revision v1), test/bare (only the tars), test/gated (the tars, gated:
    HF_TOKEN needed). Pages of 3 entries, so every listing here spans several pages."""
    repos = tmp_path / "hub"
    shutil.copytree(SAMPLE, repos / "test/sample/main")
    (repos / "test/sample/v1/data").mkdir(parents=True)
    for name in NAMES:
        for target in (repos / "test/bare/main", repos / "test/gated/main"):
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(SAMPLE / name, target / name)
    for name in NAMES[:2]:
        shutil.copy(SAMPLE / name, repos / "test/sample/v1/data" / name)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with HubServer(repos, page_size=3) as server:
        server.gated["test/gated"] = TOKEN
        monkeypatch.setenv("HF_ENDPOINT", server.url() + "/")  # a trailing '/' is dropped, as huggingface_hub does
        yield server


def test_hf_listing_follows_pages_and_takes_braces_globs_and_revisions(hub_server):
    expected = [f"hf://datasets/test/sample/{name}" for name in NAMES]
    assert remote.expand("hf://datasets/test/sample/") == expected  # 7 entries: 3 pages
    assert remote.expand("hf://datasets/test/sample") == expected
    assert remote.expand("hf://datasets/test/sample/sample-00[13].tar") == [expected[1], expected[3]]
    assert remote.expand("hf://datasets/test/sample/sample-{000..001}.tar::hf://datasets/test/bare/*3.tar") == [
        *expected[:2],
        "hf://datasets/test/bare/sample-003.tar",
    ]
    assert remote.expand("hf://datasets/test/sample@v1/data/") == [
        f"hf://datasets/test/sample@v1/data/{name}" for name in NAMES[:2]
    ]
    assert remote.expand("hf://datasets/test/sample@v1/*/sample-001.tar") == [
        "hf://datasets/test/sample@v1/data/sample-001.tar"
    ]
    trees = [path for path, _ in hub_server.requests if "/tree/" in path]
    assert "/api/datasets/test/sample/tree/v1/" in trees  # recursive listing from the fixed part of the pattern
    with pytest.raises(remote.RemoteError, match=r"matches no .tar shards on the Hub"):
        remote.expand("hf://datasets/test/sample/*.zip")
    with pytest.raises(remote.RemoteError, match=r"names a dataset repo: hf://datasets/ORG/NAME"):
        remote.expand("hf://timm/vit_base/x.tar")
    with pytest.raises(remote.RemoteError, match=r"may not start with '/' or hold '.' or '..'"):
        remote.expand("hf://datasets/test/sample/../bare/x.tar")
    with pytest.raises(remote.RemoteNotFound, match=r"RevisionNotFound.*dataset test/sample, revision v9"):
        remote.expand("hf://datasets/test/sample@v9/")


def test_a_missing_file_is_a_404_naming_repo_revision_and_path_and_cdn_faults_are_retried(hub_server, tmp_path):
    cache = shard_cache.ShardCache(tmp_path / "cache", 10**9, backoff_s=0.01)
    with pytest.raises(
        remote.RemoteNotFound, match=r"EntryNotFound.*dataset test/sample, revision main, path 'no.tar'"
    ):
        cache.local_path("hf://datasets/test/sample/no.tar")
    with pytest.raises(remote.RemoteNotFound, match=r"RepoNotFound.*dataset test/nothere, revision main, path 'train'"):
        remote.expand("hf://datasets/test/nothere/train/")
    path = cache.local_path("hf://datasets/test/sample@v1/data/sample-001.tar")  # through the CDN redirect
    assert path.read_bytes() == (SAMPLE / "sample-001.tar").read_bytes()
    hub_server.cdn.faults["test/bare/main/sample-000.tar"] = ["500", "close"]  # retried like any https read
    path = cache.local_path("hf://datasets/test/bare/sample-000.tar")
    assert path.read_bytes() == (SAMPLE / "sample-000.tar").read_bytes()
    assert hub_server.cdn.requests["test/bare/main/sample-000.tar"] == 3


def test_a_gated_set_needs_hf_token_which_never_leaves_the_hub(hub_server, tmp_path, monkeypatch):
    cache = shard_cache.ShardCache(tmp_path / "cache", 10**9, backoff_s=0.01)
    location = "hf://datasets/test/gated/sample-002.tar"
    for attempt in (lambda: remote.expand("hf://datasets/test/gated/"), lambda: cache.local_path(location)):
        with pytest.raises(remote.RemoteError, match=r"401 \(GatedRepo.*no token was sent; set HF_TOKEN"):
            attempt()
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(remote.RemoteError, match=r"refuses HF_TOKEN with 403") as refused:
        cache.local_path(location)
    assert "hf_wrong" not in str(refused.value)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert remote.expand("hf://datasets/test/gated/") == [f"hf://datasets/test/gated/{name}" for name in NAMES]
    assert cache.local_path(location).read_bytes() == (SAMPLE / "sample-002.tar").read_bytes()
    assert ("/datasets/test/gated/resolve/main/sample-002.tar", f"Bearer {TOKEN}") in hub_server.requests
    assert hub_server.cdn.requests["test/gated/main/sample-002.tar"] == 1
    assert hub_server.cdn.authorizations and not any(hub_server.cdn.authorizations)  # never sent to the CDN's host
    hub_server.renamed["test/old-gated"] = "test/gated"  # a redirect on the Hub's own host keeps the token
    assert (
        cache.local_path("hf://datasets/test/old-gated/sample-003.tar").read_bytes()
        == (SAMPLE / "sample-003.tar").read_bytes()
    )
    assert ("/datasets/test/gated/resolve/main/sample-003.tar", f"Bearer {TOKEN}") in hub_server.requests
    assert not any(hub_server.cdn.authorizations)


def test_hf_hub_offline_is_honoured_and_a_cached_set_opens_without_the_hub(hub_server, tmp_path, monkeypatch):
    data_cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}"]).data
    pattern = "hf://datasets/test/sample/sample-{000..003}.tar"  # braces: no listing needed
    online = open_shard_set(pattern, data_cfg=data_cfg)
    images = [online.read(n) for n in range(len(online))]  # every shard now in the node cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = len(hub_server.requests)
    with pytest.raises(remote.RemoteError, match=r"HF_HUB_OFFLINE=1 forbids reaching the Hub; unset it"):
        remote.expand("hf://datasets/test/sample/")
    offline = open_shard_set(pattern, data_cfg=data_cfg)  # the saved manifest, the cached index and shards
    assert [offline.read(n) for n in range(len(offline))] == images
    assert len(hub_server.requests) == asked


def test_shards_index_cli_on_an_hf_dataset(hub_server, tmp_path, capsys):
    assert cli_main(["shards", "index", "hf://datasets/test/bare/", "--cache", str(tmp_path / "cache")]) == 0
    assert "4 shards, 384 samples" in capsys.readouterr().out
    built = SetIndex(next((tmp_path / "cache" / "index").glob("*.idx")))
    local = SetIndex(SAMPLE / "samples.idx")
    assert built.names == local.names
    assert all(np.array_equal(built.shard_rows(n), local.shard_rows(n)) for n in range(len(NAMES)))


def test_training_and_eval_streams_from_hf_are_the_local_streams(hub_server, tmp_path):
    """Rank 1 of 2, 2 DataLoader workers: the same images, masks, labels and sample ids as from the local files, from
    the set as published (its samples.idx read from the Hub) and from bare tars (the index built from them)."""

    def cfg(shards: str, cache: str):
        overrides = ["data.batch_size=8", "data.image_size=32", "data.num_workers=2", "data.shuffle_window=2"]
        return load_config(None, [f"data.shards={shards}", f"data.cache_dir={tmp_path / cache}", *overrides])

    local = build_train_loader(cfg(str(SAMPLE), "unused"), rank=1, world_size=2, mask_generator=MASK)
    expected = list(itertools.islice(iter(local), 10))
    for repo in ("sample", "bare"):
        stream = build_train_loader(cfg(f"hf://datasets/test/{repo}/", repo), rank=1, world_size=2, mask_generator=MASK)
        assert stream.table.fingerprint == local.table.fingerprint
        got = list(itertools.islice(iter(stream), 10))
        for a, b in zip(expected, got, strict=True):
            assert all(torch.equal(a[key], b[key]) for key in ("image", "mask", "label", "sample_id"))
    assert hub_server.cdn.requests["test/sample/main/samples.idx"] == 0  # small files come from the Hub itself
    assert any(path == "/datasets/test/sample/resolve/main/samples.idx" for path, _ in hub_server.requests)
    kwargs = {"image_size": 32, "batch_size": 50, "mean": [0.5] * 3, "std": [0.25] * 3, "num_workers": 2}
    here = list(iter_eval_batches(str(SAMPLE), **kwargs))
    there = list(iter_eval_batches("hf://datasets/test/sample/", data_cfg=cfg("x", "eval").data, **kwargs))
    assert len(here) == len(there)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(here, there, strict=True))


def _timm_wds_repo(folder: Path) -> dict:
    """A tiny set in timm's published wds layout (timm/imagenet-1k-wds): ``<split>-{0000..N}.tar`` whose samples are
    ``<key>.jpg`` + ``<key>.cls`` + ``<key>.json``, and ``_info.json`` with the split sizes. Returns the labels."""
    rng, labels = np.random.default_rng(0), {}
    shards = {"tiny-train-0000.tar": 5, "tiny-train-0001.tar": 4, "tiny-validation-0000.tar": 3}
    for shard, count in shards.items():
        with tarfile.open(folder / shard, "w", format=tarfile.USTAR_FORMAT) as tar:
            for n in range(count):
                key, label = f"n{shard[5:10]}_{n:05d}", int(rng.integers(0, 1000))
                labels[(shard, n)] = label
                image = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image, "JPEG")
                meta = json.dumps({"filename": f"{key}.JPEG", "label": label, "width": 48, "height": 40}).encode()
                for ext, payload in (("jpg", image.getvalue()), ("cls", str(label).encode()), ("json", meta)):
                    member = tarfile.TarInfo(f"{key}.{ext}")
                    member.size = len(payload)
                    tar.addfile(member, io.BytesIO(payload))
    splits = [
        {"name": "train", "num_samples": 9, "filenames": ["tiny-train-{0000..0001}.tar"]},
        {"name": "validation", "num_samples": 3, "filenames": ["tiny-validation-0000.tar"]},
    ]
    (folder / "_info.json").write_text(json.dumps({"name": "tiny", "splits": splits}))
    return labels


def test_timm_wds_layout_trains_as_published(hub_server, tmp_path, capfd):
    """.cls is the label, .json members are skipped without a word, and the sample counts agree with _info.json."""
    repo = hub_server.root / "timm/tiny-wds/main"
    repo.mkdir(parents=True)
    labels = _timm_wds_repo(repo)
    info = json.loads((repo / "_info.json").read_text())
    data_cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}"]).data
    capfd.readouterr()
    for split in info["splits"]:
        pattern = "::".join(f"hf://datasets/timm/tiny-wds/{name}" for name in split["filenames"])
        table = open_shard_set(pattern, data_cfg=data_cfg)
        assert len(table) == split["num_samples"]
        shards = [remote.shard_name(location) for location in table.locations]
        got = [table.label(int(table.starts[n]) + k) for n, name in enumerate(shards) for k in range(table.counts[n])]
        assert got == [labels[(name, k)] for n, name in enumerate(shards) for k in range(table.counts[n])]
    assert ".json" not in "".join(capfd.readouterr())
    shards = "hf://datasets/timm/tiny-wds/tiny-train-{0000..0001}.tar"
    overrides = ["data.batch_size=4", "data.image_size=32", "data.num_workers=0"]
    train = load_config(None, [f"data.shards={shards}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    batch = next(iter(build_train_loader(train, rank=0, world_size=1, mask_generator=MASK)))
    train_labels = {label for (shard, _), label in labels.items() if "train" in shard}
    assert set(batch["label"].tolist()) <= train_labels and batch["image"].shape == (4, 3, 32, 32)


def test_hub_endpoint_and_revision_quoting(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example/")
    where = hub.parse("hf://datasets/org/set@refs%2Fconvert%2Fwds/train/a b.tar")
    assert where.revision == "refs/convert/wds"
    assert hub.parse("hf://datasets/org/set@refs/convert/wds/train/a b.tar") == hub.HubPath(
        "org/set", "refs/convert/wds", "train/a b.tar"
    )
    assert hub.parse("hf://datasets/org/set@refs/pr/12/x.tar").file_url("https://h") == (
        "https://h/datasets/org/set/resolve/refs%2Fpr%2F12/x.tar"
    )
    assert where.file_url(hub.endpoint()) == (
        "https://mirror.example/datasets/org/set/resolve/refs%2Fconvert%2Fwds/train/a%20b.tar"
    )
    assert (
        remote.sibling("hf://datasets/org/set@v1/train/x.tar", "samples.idx")
        == "hf://datasets/org/set@v1/train/samples.idx"
    )
    monkeypatch.setenv("HF_ENDPOINT", "ftp://mirror")
    with pytest.raises(remote.RemoteError, match=r"HF_ENDPOINT='ftp://mirror' is not an http\(s\) URL"):
        hub.endpoint()
