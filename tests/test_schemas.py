import json

import numpy as np
import pytest
from PIL import Image
import io

from schemas import (
    FAILURE_SCHEMA,
    FailureRecord,
    condition_member,
    content_key,
    is_valid_key,
    member_condition,
    records_table,
)
from schemas.codec import decode_member, encode_json, encode_member


def test_content_key_is_stable_hex_without_dots():
    a = content_key(b"some image bytes")
    assert a == content_key(b"some image bytes")
    assert a != content_key(b"some image bytez")
    assert len(a) == 24 and is_valid_key(a) and "." not in a and "/" not in a


@pytest.mark.parametrize("bad", ["a.b", "a/b", "", "A B", "x\n"])
def test_invalid_keys_rejected(bad):
    assert not is_valid_key(bad)


def test_condition_member_round_trip():
    assert condition_member("canny") == "canny.png"
    assert member_condition("canny.png") == "canny"
    assert member_condition("openpose.json") is None
    with pytest.raises(ValueError):
        condition_member("a.b")


@pytest.mark.parametrize(
    "array",
    [
        np.arange(64 * 48, dtype=np.uint32).reshape(48, 64).astype(np.uint8),
        np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8),
        (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 60).astype(np.uint16),
    ],
)
def test_png_members_round_trip_exactly(array):
    data = encode_member("x.png", array)
    assert data == encode_member("x.png", array)  # deterministic bytes
    back = decode_member("x.png", data)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == array.dtype


def test_json_members_are_canonical():
    a = encode_json({"b": 1, "a": [1, 2], "c": "é"})
    b = encode_json({"c": "é", "a": [1, 2], "b": 1})
    assert a == b
    assert json.loads(a) == {"a": [1, 2], "b": 1, "c": "é"}


def test_jpeg_member_is_rgb():
    arr = np.random.default_rng(1).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    data = encode_member("jpg", arr)
    with Image.open(io.BytesIO(data)) as im:
        assert im.mode == "RGB" and im.size == (24, 16)


def test_failure_records_table_and_kind_check():
    r = FailureRecord.from_exception("a.jpg", "read", "read_error", OSError("gone"))
    table = records_table([r])
    assert table.schema == FAILURE_SCHEMA
    row = table.to_pylist()[0]
    assert row["kind"] == "failed" and row["error_type"] == "OSError" and row["message"] == "gone"
    with pytest.raises(ValueError):
        FailureRecord("a", "broken", "read", "x", "y")


def test_local_commits_reach_the_disk_before_the_name(tmp_path, monkeypatch):
    import os

    import fsspec

    from schemas.files import atomic_write_bytes

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "stats.json"
    atomic_write_bytes(fsspec.filesystem("file"), str(target), b"{}")
    assert target.read_bytes() == b"{}"
    assert len(synced) == 2  # the file under its temporary name, then the folder
    if isinstance(synced[0], str):
        assert ".stats.json.tmp-" in synced[0] and synced[1] == str(tmp_path)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_failure_records_have_a_total_order():
    from schemas import FAILED, FailureRecord

    a = FailureRecord("same.tar", FAILED, "read", "bad_tar_sample", "same message", key="k2")
    b = FailureRecord("same.tar", FAILED, "read", "bad_tar_sample", "same message", key="k1")
    assert sorted([a, b], key=FailureRecord.sort_key) == sorted([b, a], key=FailureRecord.sort_key) == [b, a]
