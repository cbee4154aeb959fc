"""dino_cluster.storage against an S3 endpoint that fails: the fault-injecting proxy in front
of a real moto server (tests/fixtures/faults.py)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fixtures.faults import FaultyProxy

from dino_cluster.storage import StorageError, open_store, open_url

MiB = 1024 * 1024
ALL_KINDS = ("503", "500", "drop_before", "drop_mid_body")


def read_in_chunks(f: Any, n: int) -> bytes:
    return b"".join(iter(lambda: f.read(n), b""))


def test_streaming_read_resumes_with_range_after_mid_body_drops(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    data = os.urandom(4 * MiB)
    faulty_s3.client().put_object(Bucket=bucket, Key="shard-000.tar", Body=data)
    faulty_s3.set_faults(rate=0.6, kinds=("drop_mid_body",), methods=("GET",))
    store = open_store(f"s3://{bucket}", faulty_s3.options)
    ranges: list[str] = []
    store.client.meta.events.register(  # type: ignore[attr-defined]
        "before-parameter-build.s3.GetObject",
        lambda params, **_: ranges.append(params.get("Range", "")),
    )
    resumed_reads = 0
    for _ in range(10):  # a few reads: each one may see several drops
        ranges.clear()
        with store.open_read("shard-000.tar") as f:
            assert read_in_chunks(f, 64 * 1024) == data
        # the first request has no Range; each re-request starts where the last one broke
        assert ranges[0] == ""
        offsets = [int(r.removeprefix("bytes=").rstrip("-")) for r in ranges[1:]]
        assert offsets == sorted(offsets) and all(0 < o < len(data) for o in offsets)
        resumed_reads += bool(offsets)
        if faulty_s3.counts["drop_mid_body"] >= 3:
            break
    assert faulty_s3.counts["drop_mid_body"] >= 3
    assert resumed_reads >= 1
    # open_url and read_bytes go through the same resuming reader
    with open_url(f"s3://{bucket}/shard-000.tar", faulty_s3.options) as f:
        assert f.read() == data


def test_stalled_body_hits_the_read_timeout_and_resumes(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    data = os.urandom(2 * MiB)
    faulty_s3.client().put_object(Bucket=bucket, Key="shard.tar", Body=data)
    faulty_s3.proxy.stall_s = 5.0
    faulty_s3.set_faults(rate=0.5, kinds=("stall_mid_body",), methods=("GET",))
    store = open_store(f"s3://{bucket}", replace(faulty_s3.options, read_timeout_s=0.3))
    for _ in range(4):
        with store.open_read("shard.tar") as f:
            assert read_in_chunks(f, 256 * 1024) == data
        if faulty_s3.counts["stall_mid_body"]:
            break
    assert faulty_s3.counts["stall_mid_body"] >= 1


def test_download_file_survives_mid_body_drops(faulty_s3, tmp_path) -> None:
    bucket = faulty_s3.new_bucket()
    data = os.urandom(2 * MiB)
    faulty_s3.client().put_object(Bucket=bucket, Key="ckpt.pt", Body=data)
    faulty_s3.set_faults(rate=0.4, kinds=("drop_mid_body", "500"), methods=("GET", "HEAD"))
    store = open_store(f"s3://{bucket}", faulty_s3.options)
    for i in range(3):
        store.download_file("ckpt.pt", tmp_path / f"c{i}.pt")
        assert (tmp_path / f"c{i}.pt").read_bytes() == data
    assert faulty_s3.counts["drop_mid_body"] + faulty_s3.counts["500"] >= 1


def test_reads_give_up_with_storage_error_naming_url_and_op(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    faulty_s3.client().put_object(Bucket=bucket, Key="x", Body=os.urandom(MiB))
    faulty_s3.set_faults(rate=1.0, kinds=("drop_mid_body",), methods=("GET",))
    store = open_store(f"s3://{bucket}", replace(faulty_s3.options, max_attempts=3))
    with pytest.raises(StorageError) as err:
        store.read_bytes("x")
    assert f"s3://{bucket}/x" in str(err.value) and err.value.op == "read"
    # drops that keep cutting the body short of real progress are bounded by max_attempts
    assert 3 <= faulty_s3.counts["drop_mid_body"] <= 30


def test_503_500_and_dropped_connections_are_retried(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    store = open_store(f"s3://{bucket}/run", faulty_s3.options)
    faulty_s3.set_faults(rate=0.15, kinds=ALL_KINDS)
    expected = {f"k/{i:02d}": os.urandom(1000 + i) for i in range(12)}
    for key, data in expected.items():
        store.write_bytes(key, data)
    for key, data in expected.items():
        assert store.exists(key)
        assert store.size(key) == len(data)
        assert store.read_bytes(key) == data
    assert [i.key for i in store.list("k/")] == sorted(expected)
    assert store.delete_prefix("k/0") == 10
    assert [i.key for i in store.list()] == ["k/10", "k/11"]
    injected = {k: v for k, v in faulty_s3.counts.items() if k in ALL_KINDS and v}
    assert len(injected) >= 3, faulty_s3.counts


def test_request_retries_are_bounded_by_max_attempts(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    store = open_store(f"s3://{bucket}", replace(faulty_s3.options, max_attempts=3))
    faulty_s3.set_faults(rate=1.0, kinds=("503",), methods=("PUT",))
    with pytest.raises(StorageError, match="SlowDown") as err:
        store.write_bytes("k", b"v")
    assert err.value.op == "write" and f"s3://{bucket}/k" in str(err.value)
    # 3 attempts per request, times 2 rounds of our own around botocore's
    assert faulty_s3.counts["503"] == 6


def test_botocore_standard_retry_mode_without_our_request_backoff(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    opts = replace(faulty_s3.options, request_backoff_s=None)  # botocore's own handler
    store = open_store(f"s3://{bucket}", opts)
    faulty_s3.set_faults(rate=0.3, kinds=("503", "drop_before"), methods=("PUT",))
    for i in range(5):
        store.write_bytes(f"k{i}", b"v" * i)
    assert faulty_s3.counts["503"] + faulty_s3.counts["drop_before"] >= 1
    faulty_s3.set_faults(rate=0.0, kinds=())
    assert [store.read_bytes(f"k{i}") for i in range(5)] == [b"v" * i for i in range(5)]


def test_quiet_empty_listing_is_not_believed(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    client = faulty_s3.client()
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"ckpt/step_{i}/manifest.json", Body=b"{}")
    store = open_store(f"s3://{bucket}/ckpt", faulty_s3.options)
    faulty_s3.set_faults(rate=0.5, kinds=("empty_200",), methods=("GET",))
    for _ in range(6):
        assert len(store.list()) == 3
    assert faulty_s3.counts["empty_200"] >= 2


def _uploads_in_progress(client: Any, bucket: str) -> list[dict]:
    return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])


@pytest.mark.parametrize("seed", [1, 2])
def test_multipart_upload_under_faults_commits_right_bytes_or_raises(
    faulty_s3, tmp_path, seed: int
) -> None:
    faulty_s3.proxy._rng.seed(seed)
    bucket = faulty_s3.new_bucket()
    opts = replace(faulty_s3.options, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = open_store(f"s3://{bucket}", opts)
    src = tmp_path / "state.pt"
    data = os.urandom(11 * MiB)
    src.write_bytes(data)
    faulty_s3.set_faults(rate=0.2, kinds=ALL_KINDS, methods=("PUT", "POST"))
    committed = 0
    for i in range(3):
        try:
            store.upload_file(f"ckpt/{i}.pt", src)
            committed += 1
        except StorageError:
            pass
        head = faulty_s3.client().list_objects_v2(Bucket=bucket, Prefix=f"ckpt/{i}.pt")
        if head.get("KeyCount"):  # whatever is visible must be the whole, right object
            body = faulty_s3.client().get_object(Bucket=bucket, Key=f"ckpt/{i}.pt")["Body"]
            assert body.read() == data
    assert committed >= 2  # 8 attempts per request and 3 rounds: failure should be rare
    assert sum(faulty_s3.counts[k] for k in ALL_KINDS) >= 1
    assert _uploads_in_progress(faulty_s3.client(), bucket) == []


def test_failed_upload_raises_and_leaves_no_object_or_orphan(faulty_s3, tmp_path) -> None:
    bucket = faulty_s3.new_bucket()
    opts = replace(
        faulty_s3.options, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_attempts=2
    )
    store = open_store(f"s3://{bucket}", opts)
    src = tmp_path / "state.pt"
    src.write_bytes(os.urandom(11 * MiB))
    # Part uploads always fail; creating and aborting uploads (POST/DELETE) still works.
    faulty_s3.set_faults(rate=1.0, kinds=("500",), methods=("PUT",))
    with pytest.raises(StorageError, match="upload"):
        store.upload_file("ckpt/x.pt", src)
    faulty_s3.set_faults(rate=0.0, kinds=())
    assert not store.exists("ckpt/x.pt")
    assert _uploads_in_progress(faulty_s3.client(), bucket) == []


def test_lost_create_response_leaves_no_orphaned_upload(faulty_s3, tmp_path) -> None:
    bucket = faulty_s3.new_bucket()
    opts = replace(faulty_s3.options, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = open_store(f"s3://{bucket}", opts)
    src = tmp_path / "state.pt"
    data = os.urandom(6 * MiB)
    src.write_bytes(data)
    # CreateMultipartUpload (POST ?uploads) is applied by the server, its answer lost:
    # botocore asks again and the first upload id is left behind.
    faulty_s3.set_faults(rate=0.5, kinds=("drop_before",), methods=("POST",), match="?uploads")
    for i in range(3):
        store.upload_file(f"ckpt/{i}.pt", src)
    assert faulty_s3.counts["drop_before"] >= 1
    faulty_s3.set_faults(rate=0.0, kinds=())
    assert _uploads_in_progress(faulty_s3.client(), bucket) == []
    assert all(store.read_bytes(f"ckpt/{i}.pt") == data for i in range(3))


def test_lost_complete_response_is_uploaded_again(faulty_s3, tmp_path) -> None:
    bucket = faulty_s3.new_bucket()
    opts = replace(faulty_s3.options, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)
    store = open_store(f"s3://{bucket}", opts)
    src = tmp_path / "state.pt"
    data = os.urandom(6 * MiB)
    src.write_bytes(data)
    # CompleteMultipartUpload (POST ?uploadId=) lands, its answer is lost and botocore sends
    # it again: moto (like AWS) answers 200; servers that answer NoSuchUpload get the whole
    # file uploaded again (see test_no_such_upload_means_upload_again).
    faulty_s3.set_faults(rate=0.5, kinds=("drop_before",), methods=("POST",), match="uploadId=")
    for i in range(3):
        store.upload_file(f"ckpt/{i}.pt", src)
    assert faulty_s3.counts["drop_before"] >= 1
    faulty_s3.set_faults(rate=0.0, kinds=())
    assert all(store.read_bytes(f"ckpt/{i}.pt") == data for i in range(3))
    assert _uploads_in_progress(faulty_s3.client(), bucket) == []


def test_object_replaced_while_reading_is_an_error_not_a_splice(s3_server) -> None:
    bucket = s3_server.new_bucket()
    store = open_store(f"s3://{bucket}", s3_server.options)
    old, new = os.urandom(MiB), os.urandom(MiB)
    store.write_bytes("shard.tar", old)
    with store.open_read("shard.tar") as f:
        assert f.read(1000) == old[:1000]
        store.write_bytes("shard.tar", new)
        f.seek(500_000)  # forces a new ranged request, pinned to the first ETag
        with pytest.raises(StorageError, match="changed while reading"):
            f.read(1000)


def test_overwrite_under_faults_is_never_torn(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    store = open_store(f"s3://{bucket}", faulty_s3.options)
    v1, v2 = os.urandom(300_000), os.urandom(300_000)
    store.write_bytes("latest", v1)
    faulty_s3.set_faults(rate=0.3, kinds=("drop_before", "drop_mid_body", "503"))
    for _ in range(5):
        store.write_bytes("latest", v2)
        assert store.read_bytes("latest") == v2
        store.write_bytes("latest", v1)
        assert store.read_bytes("latest") == v1


def test_one_store_is_safe_to_share_between_threads(faulty_s3) -> None:
    bucket = faulty_s3.new_bucket()
    store = open_store(f"s3://{bucket}", faulty_s3.options)
    faulty_s3.set_faults(rate=0.1, kinds=("500", "drop_before", "drop_mid_body"))
    blobs = {f"t/{i}": os.urandom(50_000 + i) for i in range(24)}

    def work(key: str) -> bool:
        store.write_bytes(key, blobs[key])
        return store.read_bytes(key) == blobs[key]

    with ThreadPoolExecutor(max_workers=6) as pool:
        assert all(pool.map(work, blobs))
    assert len(store.list("t/")) == len(blobs)


def test_proxy_forwards_host_path_query_and_body_unchanged() -> None:
    # SigV4 signs Host, path, query and payload: the proxy must pass them through as sent.
    seen: dict[str, Any] = {}

    class Echo(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_PUT(self) -> None:
            length = int(self.headers["Content-Length"])
            seen.update(host=self.headers["Host"], path=self.path, body=self.rfile.read(length))
            seen["auth"] = self.headers["Authorization"]
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=upstream.serve_forever, daemon=True)
    thread.start()
    proxy = FaultyProxy(f"http://127.0.0.1:{upstream.server_address[1]}")
    try:
        import http.client

        host = proxy.endpoint_url.removeprefix("http://")
        conn = http.client.HTTPConnection(host, timeout=10)
        conn.request(
            "PUT",
            "/b/k%2Fx?partNumber=1&uploadId=u",
            body=b"payload",
            headers={"Authorization": "sig"},
        )
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (200, b"ok")
        conn.close()
        assert seen == {
            "host": host,
            "path": "/b/k%2Fx?partNumber=1&uploadId=u",
            "body": b"payload",
            "auth": "sig",
        }
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()


def test_no_such_upload_means_upload_again() -> None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError

    from dino_cluster.storage.s3 import _upload_transient

    def wrapped(code: str, status: int) -> BaseException:
        inner = ClientError(
            {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op"
        )
        try:
            try:
                raise inner
            except ClientError as exc:
                raise S3UploadFailedError(f"Failed: {exc}")  # noqa: B904 - as boto3 does
        except S3UploadFailedError as outer:
            return outer

    assert _upload_transient(wrapped("NoSuchUpload", 404))
    assert _upload_transient(wrapped("SlowDown", 503))
    assert not _upload_transient(wrapped("AccessDenied", 403))
    assert not _upload_transient(wrapped("NoSuchBucket", 404))
