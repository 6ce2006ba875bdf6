"""Location: a shard-set root on local disk or in an object store (the S3 one is moto's server on loopback)."""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing
import pickle
import sys
from pathlib import Path

import pytest

from regionspot.errors import RegionSpotError
from regionspot.shards.location import Location, mask_options

DATA = bytes(range(256)) * 40  # 10240 bytes, every offset distinguishable


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Location:
    """An empty shard-set root, on disk or in a fresh bucket (fast retries)."""
    if request.param == "local":
        return Location.parse(tmp_path / "set")
    return Location.parse(f"{request.getfixturevalue('s3').url}/sets/set", tries=3, backoff_s=0.01)


def test_round_trip_of_every_method(where, tmp_path):
    assert where.list() == [] and not where.exists("shard-000000.tar")
    where.write_bytes_atomic("shard-000000.json", b'{"samples": 3}')
    scratch = where.scratch_path("shard-000000.tar")
    assert not scratch.exists() and scratch.name.endswith("shard-000000.tar")
    scratch.write_bytes(DATA)
    where.upload(scratch, "shard-000000.tar")
    assert not scratch.exists()  # moved, not copied
    zarr_like = where.scratch_path("shard-000001.zarr")
    (zarr_like / "c").mkdir(parents=True)
    (zarr_like / "zarr.json").write_text("{}")
    (zarr_like / "c" / "0").write_bytes(b"chunk")
    where.upload(zarr_like, "shard-000001.zarr")
    where.write_bytes_atomic("o365/manifest.json", b"{}")

    assert where.list() == [
        "o365",
        "shard-000000.json",
        "shard-000000.tar",
        "shard-000001.zarr",
    ]  # no temporaries
    assert where.list("shard-*.json") == ["shard-000000.json"]
    assert where.exists("shard-000000.tar") and where.exists("shard-000001.zarr/c/0")
    assert where.read_bytes("shard-000000.json") == b'{"samples": 3}'
    assert where.size("shard-000000.tar") == len(DATA)
    assert where.read_bytes("shard-000001.zarr/c/0") == b"chunk"
    for offset, length in [(0, 1), (1000, 777), (len(DATA) - 5, 5), (7, 0)]:
        assert bytes(where.read_range("shard-000000.tar", offset, length)) == DATA[offset : offset + length]
    with pytest.raises(EOFError, match="shard-000000.tar: 5 of 10 bytes"):
        where.read_range("shard-000000.tar", len(DATA) - 5, 10)
    with where.open_read("shard-000000.tar", block_size=1000) as f:
        assert f.read(10) == DATA[:10] and f.read(3000) == DATA[10:3010]
        f.seek(9000)
        assert f.read() == DATA[9000:] and f.read(1) == b""
    with pytest.raises(FileNotFoundError, match="shard-000009.json"):
        where.read_bytes("shard-000009.json")

    sets = where.child("o365")
    assert (
        sets.name == "o365" and sets.read_bytes("manifest.json") == b"{}" and str(sets).endswith("set/o365")
    )

    replacement = where.scratch_path("shard-000001.zarr")
    replacement.mkdir()
    (replacement / "zarr.json").write_text('{"new": 1}')
    where.upload(replacement, "shard-000001.zarr")  # replaces the whole directory
    assert (
        not where.exists("shard-000001.zarr/c/0")
        and where.read_bytes("shard-000001.zarr/zarr.json") == b'{"new": 1}'
    )

    where.delete("shard-000000.tar")
    where.delete("shard-000001.zarr")
    where.delete("shard-000000.tar")  # nothing left to delete is fine
    assert where.list() == ["o365", "shard-000000.json"]


def test_local_paths_stay_plain_files(tmp_path):
    loc = Location.parse(str(tmp_path / "set"))
    assert (
        loc.is_local
        and not loc.read_only
        and loc.local_path == tmp_path / "set"
        and str(loc) == str(tmp_path / "set")
    )
    loc.write_bytes_atomic("manifest.json", b"{}")
    assert (tmp_path / "set" / "manifest.json").read_bytes() == b"{}"
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["manifest.json"]  # no temporary left
    (tmp_path / "set" / "a.bin").write_bytes(DATA)
    buf = loc.read_range("a.bin", 10, 20)
    assert isinstance(buf, bytearray) and buf == DATA[10:30]  # writable: arrays on it need no copy
    assert loc._fs is None  # no fsspec client for local files
    assert loc.url("a.bin") == str(tmp_path / "set" / "a.bin")
    same = Location.parse(f"file://{tmp_path}/set")
    assert same.is_local and same.local_path == tmp_path / "set" and same == loc
    assert Location.parse(loc) is loc and Location.parse(Path("rel/dir")).local_path == Path("rel/dir")


def test_url_locations_show_no_secret():
    loc = Location.parse(
        "s3://bucket/sets/o365",
        {
            "key": "AKIAXXX",
            "secret": "hunter2",
            "client_kwargs": {"region_name": "eu-west-1", "aws_session_token": "t0k3n-value"},
        },
    )
    assert not loc.is_local and loc.name == "o365" and str(loc) == "s3://bucket/sets/o365"
    assert loc.url("shard-000000.zarr") == "s3://bucket/sets/o365/shard-000000.zarr"
    assert "hunter2" not in repr(loc) and "AKIAXXX" not in repr(loc) and "t0k3n-value" not in repr(loc)
    assert "eu-west-1" in repr(loc)
    assert mask_options({"password": "p", "anon": False, "nested": {"api_token": "t"}}) == {
        "password": "***",
        "anon": False,
        "nested": {"api_token": "***"},
    }
    assert str(Location.parse("https://user:pw@host/sets/x?sig=abc")) == "https://***@host/sets/x?..."
    with pytest.raises(RegionSpotError, match="needs a local directory"):
        _ = loc.local_path


def test_https_is_read_only(tmp_path):
    loc = Location.parse("https://example.invalid/sets/o365")  # nothing below reaches the network
    assert loc.read_only
    f = tmp_path / "x"
    f.write_bytes(b"x")
    for write in (
        lambda: loc.write_bytes_atomic("a.json", b"{}"),
        lambda: loc.upload(f, "a"),
        lambda: loc.delete("a"),
    ):
        with pytest.raises(
            RegionSpotError,
            match=r"^https://example.invalid/sets/o365/a\S*: https:// locations are read-only",
        ) as e:
            write()
        assert "\n" not in str(e.value)
    assert f.exists()


def test_a_missing_protocol_package_names_the_extra(monkeypatch):
    if importlib.util.find_spec("gcsfs") is not None:
        monkeypatch.setitem(sys.modules, "gcsfs", None)  # an import of it raises ImportError
    with pytest.raises(
        RegionSpotError,
        match=r'gs://bucket/x: gs:// needs gcsfs, which is not installed; pip install "regionspot\[gcs\]"',
    ):
        Location.parse("gs://bucket/x")
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(RegionSpotError, match=r'pip install "regionspot\[s3\]"') as e:
        Location.parse("s3://bucket/x")
    assert "\n" not in str(e.value)
    with pytest.raises(RegionSpotError, match="unknown protocol 'nope'"):
        Location.parse("nope://bucket/x")


def test_a_dropped_connection_is_retried(s3, caplog):
    loc = Location.parse(f"{s3.url}/set", tries=3, backoff_s=0.01)
    loc.write_bytes_atomic("shard-000000.tar", DATA)
    s3.fail("shard-000000.tar", "drop", method="GET")  # closed before any answer
    assert loc.read_range("shard-000000.tar", 100, 50) == DATA[100:150]
    with caplog.at_level(logging.WARNING, logger="regionspot.shards.location"):
        s3.fail("shard-000000.tar", "truncate", method="GET")  # closed half-way through the body
        assert loc.read_bytes("shard-000000.tar") == DATA
    assert (
        "set/shard-000000.tar: read failed (ClientPayloadError" in caplog.text and "try 2 of 3" in caplog.text
    )
    s3.fail("shard-000001.json", "503", method="PUT")
    loc.write_bytes_atomic("shard-000001.json", b"{}")  # writes are retried too
    assert loc.read_bytes("shard-000001.json") == b"{}"


def test_a_lasting_failure_stops_after_the_tries_naming_the_object(s3):
    loc = Location.parse(f"{s3.url}/set", tries=3, backoff_s=0.01)
    loc.write_bytes_atomic("shard-000000.tar", DATA)
    before = s3.requests("shard-000000.tar", "GET")
    s3.fail("shard-000000.tar", "503", times=None, method="GET")
    with pytest.raises(
        RegionSpotError, match=rf"^{s3.url}/set/shard-000000.tar: read failed after 3 tries \("
    ) as e:
        loc.read_range("shard-000000.tar", 0, 10)
    assert "\n" not in str(e.value)
    assert s3.requests("shard-000000.tar", "GET") - before == 3  # no hidden retries below ours
    missing = Location.parse(f"{s3.url}-absent/set", tries=3, backoff_s=0.01)
    with pytest.raises(RegionSpotError, match=rf"^{s3.url}-absent/set/a.json: write failed: ") as e:
        missing.write_bytes_atomic("a.json", b"{}")  # a missing bucket is not retried
    assert "tries" not in str(e.value)


def test_listing_sees_other_writers_at_once(s3):
    mine, theirs = Location.parse(f"{s3.url}/set"), Location.parse(f"{s3.url}/set")
    mine.write_bytes_atomic("shard-000000.json", b"{}")
    assert mine.list("shard-*.json") == ["shard-000000.json"]
    theirs.write_bytes_atomic("shard-000001.json", b"{}")
    assert mine.list("shard-*.json") == ["shard-000000.json", "shard-000001.json"]
    assert mine.exists("shard-000001.json")


def _read_in_child(loc: Location, queue) -> None:
    queue.put(bytes(loc.read_range("a.bin", 5, 10)))


def test_a_location_works_in_a_forked_worker_and_after_pickling(s3):
    loc = Location.parse(f"{s3.url}/set")
    loc.write_bytes_atomic("a.bin", DATA)  # the parent's client exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(loc, queue))
    child.start()
    got = queue.get(timeout=60)
    child.join(timeout=60)
    assert got == DATA[5:15] and child.exitcode == 0
    again = pickle.loads(pickle.dumps(loc))
    assert again == loc and again.read_bytes("a.bin") == DATA


def test_http_urls_read_a_set_served_over_http(s3):
    import boto3

    endpoint = s3.server.endpoint  # moto serves public objects to plain GETs: a web server for the test
    boto3.client("s3", endpoint_url=endpoint).put_object(
        Bucket=s3.name, Key="set/shard-000000.tar", Body=DATA, ACL="public-read"
    )
    loc = Location.parse(f"{endpoint}/{s3.name}/set", tries=2, backoff_s=0.01)
    assert loc.read_only and loc.exists("shard-000000.tar") and not loc.exists("shard-000009.tar")
    assert loc.read_bytes("shard-000000.tar") == DATA
    assert loc.read_range("shard-000000.tar", 4000, 1000) == DATA[4000:5000]
    with loc.open_read("shard-000000.tar") as f:
        assert f.read() == DATA
    s3.fail("shard-000000.tar", "503", times=None)
    with pytest.raises(RegionSpotError, match="shard-000000.tar: exists failed after 2 tries"):
        loc.exists("shard-000000.tar")  # a failing server is not a missing object
