"""dino_cluster.storage: the same behaviour from file:// and s3:// (a real moto server)."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from dino_cluster.storage import (
    ObjectStore,
    StorageError,
    StorageOptions,
    open_store,
    open_url,
    split_url,
)
from dino_cluster.storage.local import LocalStore
from dino_cluster.storage.s3 import S3Store

MiB = 1024 * 1024


@pytest.fixture(params=["file", "s3"])
def store(request: pytest.FixtureRequest, tmp_path) -> ObjectStore:
    if request.param == "file":
        return open_store(str(tmp_path / "root"))
    s3 = request.getfixturevalue("s3_server")
    return open_store(f"s3://{s3.new_bucket()}/runs/x", s3.options)


def read_in_chunks(f: Any, n: int) -> bytes:
    return b"".join(iter(lambda: f.read(n), b""))


# ----------------------------------------------------------------------------- both backends


def test_round_trip_write_read_exists_size_delete(store: ObjectStore) -> None:
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"hello")
    assert store.read_bytes("a/b.bin") == b"hello"
    assert store.exists("a/b.bin")
    assert store.size("a/b.bin") == 5
    store.write_bytes("a/b.bin", b"second version")  # overwrite replaces whole
    assert store.read_bytes("a/b.bin") == b"second version"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    assert store.size("empty") == 0
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin")
    store.delete("a/b.bin")  # missing key is not an error


def test_missing_key_raises_file_not_found(store: ObjectStore) -> None:
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope")
    with pytest.raises(FileNotFoundError):
        store.open_read("nope")
    with pytest.raises(FileNotFoundError):
        store.size("nope")
    with pytest.raises(FileNotFoundError):
        store.download_file("nope", "/tmp/never-written")
    assert not os.path.exists("/tmp/never-written")


def test_list_is_recursive_sorted_and_prefix_is_a_string_prefix(store: ObjectStore) -> None:
    before = time.time()
    keys = {"a/1": b"1", "a/2": b"22", "a/b/3": b"333", "ab": b"4444", "c": b""}
    for key, data in keys.items():
        store.write_bytes(key, data)
    infos = store.list()
    assert [i.key for i in infos] == sorted(keys)
    assert {i.key: i.size for i in infos} == {k: len(v) for k, v in keys.items()}
    assert all(abs(i.mtime - before) < 3600 for i in infos)
    assert [i.key for i in store.list("a/")] == ["a/1", "a/2", "a/b/3"]
    assert [i.key for i in store.list("a")] == ["a/1", "a/2", "a/b/3", "ab"]
    assert [i.key for i in store.list("a/b")] == ["a/b/3"]
    assert store.list("zz") == []
    assert store.list("a/b/3/") == []


def test_store_root_is_a_folder_not_a_string_prefix(store: ObjectStore) -> None:
    # runs/x must not see runs/xy (S3 prefixes are strings; our roots are folders).
    sibling_url = store.url + "y"
    sibling = open_store(sibling_url, getattr(store, "options", None))
    sibling.write_bytes("k", b"other run")
    store.write_bytes("k", b"this run")
    assert [i.key for i in store.list()] == ["k"]
    assert store.read_bytes("k") == b"this run"
    assert store.delete_prefix("") == 1
    assert sibling.read_bytes("k") == b"other run"


def test_streaming_read_in_small_chunks_and_from_offset(store: ObjectStore) -> None:
    data = os.urandom(3 * MiB + 123)
    store.write_bytes("big.bin", data)
    with store.open_read("big.bin") as f:
        assert read_in_chunks(f, 7919) == data
    with store.open_read("big.bin", start=MiB + 5) as f:
        assert f.read(10) == data[MiB + 5 : MiB + 15]
        assert f.read() == data[MiB + 15 :]
    with store.open_read("big.bin", start=len(data)) as f:
        assert f.read() == b""
    with store.open_read("big.bin", start=len(data) + 10) as f:
        assert f.read(5) == b""
    with store.open_read("big.bin") as f:  # seek/tell, as tarfile and torch.load use them
        f.seek(-100, os.SEEK_END)
        assert f.tell() == len(data) - 100
        assert f.read() == data[-100:]
        f.seek(10)
        buf = bytearray(20)
        assert f.readinto(buf) == 20
        assert bytes(buf) == data[10:30]


def test_upload_and_download_file(store: ObjectStore, tmp_path) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(MiB + 7)
    src.write_bytes(data)
    store.upload_file("ckpt/model.pt", src)
    store.upload_file("ckpt/model.pt", src)  # idempotent
    assert store.size("ckpt/model.pt") == len(data)
    dest = tmp_path / "new" / "dir" / "copy.bin"
    store.download_file("ckpt/model.pt", dest)
    assert dest.read_bytes() == data
    assert os.listdir(dest.parent) == ["copy.bin"]  # no temp files left behind


def test_child_and_url_for_and_open_url(store: ObjectStore) -> None:
    child = store.child("step_000100")
    assert child.url == store.url + "/step_000100"
    child.write_bytes("manifest.json", b"{}")
    assert [i.key for i in store.list()] == ["step_000100/manifest.json"]
    url = store.url_for("step_000100/manifest.json")
    assert url == child.url_for("manifest.json")
    with open_url(url, getattr(store, "options", None)) as f:
        assert f.read() == b"{}"
    assert type(child) is type(store)


def test_delete_prefix_counts_and_spares_the_rest(store: ObjectStore) -> None:
    for i in range(5):
        store.write_bytes(f"p/{i}/x", b"x")
    store.write_bytes("q", b"q")
    assert store.delete_prefix("p/") == 5
    assert [i.key for i in store.list()] == ["q"]
    assert store.delete_prefix("p/") == 0


@pytest.mark.parametrize("bad", ["../x", "/abs", "a/../../b", "a//b", "", "a\\b", "./a", "a/."])
def test_keys_cannot_escape_the_root(store: ObjectStore, bad: str) -> None:
    with pytest.raises(ValueError):
        store.write_bytes(bad, b"x")
    with pytest.raises(ValueError):
        store.read_bytes(bad)
    with pytest.raises(ValueError):
        store.exists(bad)


# ----------------------------------------------------------------------------- URLs


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIAEXAMPLE:sEcReTvAlUe@bucket/x",
        "s3://sEcReTvAlUe@bucket/x",
        "file://user:sEcReTvAlUe@localhost/tmp/x",
        "http://user:sEcReTvAlUe@example.com/x",
    ],
)
def test_credentials_in_urls_are_refused_and_not_echoed(url: str) -> None:
    with pytest.raises(ValueError) as err:
        open_store(url)
    assert "sEcReTvAlUe" not in str(err.value)
    assert "credentials" in str(err.value)
    with pytest.raises(ValueError) as err:
        open_url(url + "/obj")
    assert "sEcReTvAlUe" not in str(err.value)


def test_secrets_in_endpoint_or_query_are_not_echoed() -> None:
    with pytest.raises(ValueError) as err:
        StorageOptions(endpoint_url="http://key:sEcReTvAlUe@127.0.0.1:9000")
    assert "sEcReTvAlUe" not in str(err.value)
    with pytest.raises(ValueError) as err:
        open_store("s3://bucket/x?X-Amz-Signature=sEcReTvAlUe")
    assert "sEcReTvAlUe" not in str(err.value)


@pytest.mark.parametrize("url", ["gs://b/x", "http://host/x", "pipe:cat shard.tar", "s3a://b/x"])
def test_unknown_schemes_list_the_valid_ones(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported storage URL scheme") as err:
        open_store(url)
    assert "s3://" in str(err.value) and "file://" in str(err.value)


@pytest.mark.parametrize(
    "url", ["s3://", "s3:///x", "s3://-bad-/x", "s3://b/../x", "file://otherhost/tmp/x"]
)
def test_malformed_urls_are_value_errors(url: str) -> None:
    with pytest.raises(ValueError):
        open_store(url)


def test_local_paths_and_file_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = open_store("rel/dir")
    assert isinstance(rel, LocalStore)
    assert rel.url == "file://" + str(tmp_path / "rel" / "dir")
    same = open_store(rel.url)
    rel.write_bytes("k", b"v")
    assert same.read_bytes("k") == b"v"
    assert open_store(str(tmp_path / "rel/dir")).read_bytes("k") == b"v"
    assert isinstance(
        open_store("s3://bucket/pre/fix", StorageOptions(region="us-east-1")), S3Store
    )


def test_split_url() -> None:
    assert split_url("s3://b/a/c.tar") == ("s3://b/a", "c.tar")
    assert split_url("s3://b/c.tar") == ("s3://b", "c.tar")
    assert split_url("file:///c.tar") == ("file:///", "c.tar")
    assert split_url("/abs/c.tar") == ("/abs", "c.tar")
    assert split_url("c.tar") == (".", "c.tar")
    for bad in ("s3://b", "s3://b/dir/"):
        with pytest.raises(ValueError):
            split_url(bad)


def test_storage_error_pickles() -> None:
    err = StorageError("upload", "s3://b/k", "gave up")
    back = pickle.loads(pickle.dumps(err))
    assert (back.op, back.url, str(back)) == ("upload", "s3://b/k", str(err))


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        StorageOptions(max_attempts=0)
    with pytest.raises(ValueError, match="retry_mode"):
        StorageOptions(retry_mode="legacy")
    with pytest.raises(ValueError, match="5 MiB"):
        StorageOptions(multipart_chunksize=MiB)


# ----------------------------------------------------------------------------- local only


def test_local_writes_are_atomic_and_temp_files_are_invisible(tmp_path) -> None:
    store = open_store(str(tmp_path))
    store.write_bytes("k", b"old")
    (tmp_path / ".~tmp-half-written").write_bytes(b"partial")

    class Boom(Exception):
        pass

    def failing_fill(f: Any) -> None:
        f.write(b"new but incomplete")
        raise Boom

    with pytest.raises(Boom):
        store._atomic_write("k", failing_fill)  # type: ignore[attr-defined]
    assert store.read_bytes("k") == b"old"
    assert [i.key for i in store.list()] == ["k"]
    assert sorted(os.listdir(tmp_path)) == [".~tmp-half-written", "k"]


def test_local_symlink_cannot_lead_outside_the_root(tmp_path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    store = open_store(str(root))
    with pytest.raises(ValueError, match="outside"):
        store.write_bytes("link/x", b"x")
    assert list(outside.iterdir()) == []


def test_local_delete_prunes_empty_folders_but_not_root(tmp_path) -> None:
    store = open_store(str(tmp_path / "root"))
    store.write_bytes("a/b/c", b"x")
    store.delete("a/b/c")
    assert os.listdir(tmp_path / "root") == []


def test_local_write_survives_a_concurrent_prune_of_its_folder(tmp_path, monkeypatch) -> None:
    """Another process's delete prunes the folder it empties; when that lands between the
    writer's mkdir and its mkstemp, the write makes the folder again instead of failing."""
    from dino_cluster.storage import local as storage_local

    store = LocalStore(str(tmp_path / "root"))
    real_mkstemp = storage_local.tempfile.mkstemp
    pruned: list[str] = []

    def mkstemp_after_a_prune(*args, **kwargs):
        if not pruned:  # the concurrent delete wins the race once
            os.rmdir(kwargs["dir"])
            pruned.append(str(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(storage_local.tempfile, "mkstemp", mkstemp_after_a_prune)
    store.write_bytes("queue/step-1/claim", b"mine")
    assert pruned and store.read_bytes("queue/step-1/claim") == b"mine"


# ----------------------------------------------------------------------------- s3 only


def test_s3_listing_paginates(s3_server) -> None:
    bucket = s3_server.new_bucket()
    store = open_store(f"s3://{bucket}/r", replace(s3_server.options, list_page_size=2))
    for i in range(7):
        store.write_bytes(f"k{i}", b"x" * i)
    pages: list[int] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        "after-call.s3.ListObjectsV2", lambda parsed, **_: pages.append(parsed["KeyCount"])
    )
    assert [i.key for i in store.list()] == [f"k{i}" for i in range(7)]
    assert pages == [2, 2, 2, 1]


def test_s3_store_pickles_and_works_after_fork(s3_server) -> None:
    bucket = s3_server.new_bucket()
    store = open_store(f"s3://{bucket}/r", s3_server.options)
    store.write_bytes("k", b"parent")  # the parent's client now has pooled connections
    back = pickle.loads(pickle.dumps(store))
    assert back.read_bytes("k") == b"parent"
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:  # data-loader workers fork with the store inside
        assert pool.map(store.read_bytes, ["k", "k"]) == [b"parent", b"parent"]
        pool.starmap(store.write_bytes, [("c0", b"0"), ("c1", b"1")])
    assert [store.read_bytes(k) for k in ("c0", "c1")] == [b"0", b"1"]


def test_s3_multipart_upload(s3_server, tmp_path) -> None:
    bucket = s3_server.new_bucket()
    opts = replace(s3_server.options, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = open_store(f"s3://{bucket}/r", opts)
    src = tmp_path / "big"
    data = os.urandom(11 * MiB)
    src.write_bytes(data)
    store.upload_file("big", src)
    head = s3_server.client().head_object(Bucket=bucket, Key="r/big")
    assert head["ETag"].strip('"').endswith("-3")  # really went multipart, 3 parts
    assert store.read_bytes("big") == data


# ----------------------------------------------------------------------------- listing logic


class _FakePaginator:
    def __init__(self, listings: list[list[dict]]) -> None:
        self.listings = listings
        self.calls = 0

    def paginate(self, **_: Any) -> list[dict]:
        pages = self.listings[min(self.calls, len(self.listings) - 1)]
        self.calls += 1
        return pages


class _FakeClient:
    def __init__(self, listings: list[list[dict]]) -> None:
        self.paginator = _FakePaginator(listings)

    def get_paginator(self, name: str) -> _FakePaginator:
        assert name == "list_objects_v2"
        return self.paginator


def _page(*keys: str) -> dict:
    now = datetime.now(UTC)
    return {
        "Name": "b",
        "KeyCount": len(keys),
        "Contents": [{"Key": f"r/{k}", "Size": 1, "LastModified": now} for k in keys],
    }


def _fake_store(listings: list[list[dict]]) -> tuple[S3Store, _FakePaginator]:
    client = _FakeClient(listings)
    opts = StorageOptions(backoff_base_s=0.0, backoff_max_s=0.0)
    return S3Store("b", "r", opts, client=client), client.paginator


def test_empty_listing_is_confirmed_by_a_second_listing() -> None:
    store, paginator = _fake_store([[_page()], [_page("step_1/manifest.json")]])
    assert [i.key for i in store.list()] == ["step_1/manifest.json"]
    assert paginator.calls == 2


def test_truly_empty_listing_costs_two_listings() -> None:
    store, paginator = _fake_store([[_page()]])
    assert store.list() == []
    assert paginator.calls == 2


def test_nonempty_listing_is_listed_once() -> None:
    store, paginator = _fake_store([[_page("a", "b")]])
    assert [i.key for i in store.list()] == ["a", "b"]
    assert paginator.calls == 1


def test_page_without_body_is_retried_not_believed() -> None:
    # A 200 whose body was lost parses as {}: it must not end the listing early.
    lost = {"ResponseMetadata": {"HTTPStatusCode": 200}}
    store, paginator = _fake_store([[_page("a"), lost], [_page("a"), _page("b")]])
    assert [i.key for i in store.list()] == ["a", "b"]
    assert paginator.calls == 2


def test_listing_that_never_gets_a_body_raises() -> None:
    store, _ = _fake_store([[{"ResponseMetadata": {}}]])
    with pytest.raises(StorageError, match="list"):
        store.list()
