"""The shard format's one label rule: index building (training), create's re-sharding and verify agree on it."""

from __future__ import annotations

import io
import tarfile

from PIL import Image

from mimscale.cli import main as cli_main
from mimscale.shards.create import tar_inputs
from mimscale.shards.format import MAX_LABEL_BYTES, parse_label
from mimscale.shards.index import scan_tar

# label member bytes -> the label every reader sees (-1: none)
LABELS = {
    b"3": 3,
    b" 4\n": 4,
    b"-1": -1,
    b"-7": -1,  # below -1: none, not a negative class
    b"abc": -1,
    b"--5": -1,  # create used to crash on this one
    b"2147483648": -1,  # does not fit the index's int32
    b"8" + b" " * MAX_LABEL_BYTES: -1,  # over the size bound: none, whatever it starts with
}


def test_parse_label_is_the_documented_rule():
    for raw, expected in LABELS.items():
        assert parse_label(raw) == expected, raw


def test_index_create_and_verify_read_labels_alike(tmp_path, capsys):
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpeg, format="JPEG")
    path = tmp_path / "set" / "labels.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for number, raw in enumerate(LABELS):
            for ext, payload in (("jpg", jpeg.getvalue()), ("cls", raw)):
                info = tarfile.TarInfo(f"k{number}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    expected = list(LABELS.values())
    assert scan_tar(path).rows["label"].tolist() == expected
    assert [item.label for item in tar_inputs(str(path))[0]] == expected
    assert cli_main(["shards", "verify", str(path.parent)]) == 1
    flagged = [line for line in capsys.readouterr().out.splitlines() if "label is not an integer" in line]
    assert len(flagged) == sum(value == -1 for raw, value in LABELS.items() if raw.strip() != b"-1")
