"""S3 backend of dino_cluster.storage: the only module that imports boto3 (lazily).

What botocore does and does not do for us (see DESIGN.md, "Object stores fail in quiet ways"):
- single requests (HEAD, PUT, LIST pages, UploadPart, ...) are retried by botocore's
  "standard"/"adaptive" retry mode on 5xx, throttling and connection errors;
- a GET body that breaks while being read is NOT retried: `S3Reader` (s3_reader.py)
  re-requests with a Range header from the byte offset reached;
- a listing page whose body was lost parses as an empty page with no error: every page must
  carry `KeyCount`/`Name`, and an empty listing is listed a second time before it is believed;
- a whole transfer (multipart upload) that fails is retried by us as a whole, which is safe
  because uploading the same bytes to the same key again is harmless.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from dino_cluster.storage.base import (
    TEMP_PREFIX,
    ObjectInfo,
    ObjectStore,
    StorageError,
    StorageOptions,
    check_key,
    retry_call,
)
from dino_cluster.storage.s3_client import (
    NOT_FOUND_CODES,
    Transient,
    describe,
    error_code,
    get_client,
    is_transient,
)
from dino_cluster.storage.s3_reader import S3Reader

log = logging.getLogger(__name__)

# Single-request operations: botocore already retried max_attempts times; one more round
# from us covers botocore's retry quota running dry during a long 503 storm.
_OUTER_ROUNDS = 2
_UPLOAD_ROUNDS = 3


def _upload_transient(exc: BaseException) -> bool:
    # boto3 turns a ClientError inside a transfer into S3UploadFailedError (implicitly
    # chained); judge it by the error underneath.
    inner = exc
    if type(exc).__name__ == "S3UploadFailedError":
        inner = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        if inner is None:
            return True
    # A CompleteMultipartUpload whose answer was lost and that botocore re-sent finds its
    # upload gone (NoSuchUpload): the whole file is simply uploaded again.
    if error_code(inner)[0] == "NoSuchUpload":
        return True
    return is_transient(inner)


class S3Store(ObjectStore):
    def __init__(
        self, bucket: str, prefix: str, options: StorageOptions, client: Any = None
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.options = options
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._root = f"{self.prefix}/" if self.prefix else ""
        self._fixed_client = client  # injected by tests; otherwise shared per process
        self._client: Any = None
        self._pid = -1

    @property
    def client(self) -> Any:
        """The boto3 client, made again after a fork (sockets must not be shared)."""
        if self._fixed_client is not None:
            return self._fixed_client
        if self._client is None or self._pid != os.getpid():
            self._client = get_client(self.options)
            self._pid = os.getpid()
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        # Ray and multiprocessing pickle stores; a boto3 client cannot travel.
        state = dict(self.__dict__)
        state["_client"] = None
        state["_pid"] = -1
        if state["_fixed_client"] is not None:
            raise TypeError("an S3Store built with an injected client cannot be pickled")
        return state

    # ------------------------------------------------------------------ helpers

    def _full(self, key: str) -> str:
        return self._root + check_key(key)

    def _call(self, op: str, url: str, fn: Any, rounds: int = _OUTER_ROUNDS) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return retry_call(
                fn,
                op=op,
                url=url,
                attempts=rounds,
                retryable=is_transient,
                base_s=self.options.backoff_base_s,
                max_s=self.options.backoff_max_s,
            )
        except ClientError as exc:
            code, status = error_code(exc)
            if code in NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(f"no object {url}") from exc
            raise StorageError(op, url, describe(exc)) from exc
        except BotoCoreError as exc:
            raise StorageError(op, url, describe(exc)) from exc
        except StorageError as exc:  # retries exhausted: say what the last failure was
            cause = exc.__cause__
            if cause is None or not exc.reason.startswith("gave up after"):
                raise
            raise StorageError(op, url, f"{describe(cause)} (after {rounds} tries)") from cause

    def _head(self, key: str) -> dict[str, Any]:
        full = self._full(key)
        return self._call(
            "head", self.url_for(key), lambda: self.client.head_object(Bucket=self.bucket, Key=full)
        )

    # ------------------------------------------------------------------ API

    def child(self, subpath: str) -> S3Store:
        sub = check_key(subpath.strip("/"))
        return S3Store(self.bucket, self._root + sub, self.options, client=self._fixed_client)

    def open_read(self, key: str, start: int = 0) -> BinaryIO:
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")

        raw = S3Reader(self, self._full(key), self.url_for(key), start)
        return io.BufferedReader(raw, buffer_size=256 * 1024)  # type: ignore[return-value]

    def write_bytes(self, key: str, data: bytes) -> None:
        full = self._full(key)
        # One PUT: S3 makes it visible whole or not at all; retrying it is harmless.
        self._call(
            "write",
            self.url_for(key),
            lambda: self.client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data)),
        )

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.options.multipart_threshold,
            multipart_chunksize=self.options.multipart_chunksize,
            max_concurrency=self.options.max_concurrency,
            num_download_attempts=self.options.max_attempts,
        )

    def upload_file(self, key: str, path: str | os.PathLike) -> None:
        full, url = self._full(key), self.url_for(key)
        size = os.path.getsize(path)
        config = self._transfer_config()

        def attempt() -> None:
            # s3transfer aborts its own multipart upload when a part or the completion fails.
            self.client.upload_file(os.fspath(path), self.bucket, full, Config=config)
            got = self.client.head_object(Bucket=self.bucket, Key=full)["ContentLength"]
            if got != size:
                raise Transient(f"stored {got} bytes, expected {size}")

        try:
            retry_call(
                attempt,
                op="upload",
                url=url,
                attempts=_UPLOAD_ROUNDS,
                retryable=_upload_transient,
                base_s=self.options.backoff_base_s,
                max_s=self.options.backoff_max_s,
            )
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure leaves as StorageError
            raise StorageError("upload", url, describe(exc)) from exc
        finally:
            if size >= self.options.multipart_threshold:
                self._abort_orphans(full)

    def _abort_orphans(self, full: str) -> None:
        # A CreateMultipartUpload whose response was lost (and retried) leaves an upload
        # nobody will complete or abort; it costs storage until a lifecycle rule reaps it.
        # One writer per key is the rule here (checkpoints: rank 0), so any in-progress
        # upload for this exact key once we are done is ours and safe to abort.
        try:
            resp = self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=full)
            for upload in resp.get("Uploads", []):
                if upload.get("Key") == full:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload["UploadId"]
                    )
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort
            log.warning("could not abort leftover multipart uploads for %s: %r", full, exc)

    def download_file(self, key: str, path: str | os.PathLike) -> None:
        full, url = self._full(key), self.url_for(key)
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=dest.parent)
        os.close(fd)
        config = self._transfer_config()
        try:
            # s3transfer re-requests ranges whose body broke (num_download_attempts).
            self._call(
                "download",
                url,
                lambda: self.client.download_file(self.bucket, full, tmp, Config=config),
            )
            os.replace(tmp, dest)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise

    def _list_once(self, full_prefix: str) -> list[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        pages = paginator.paginate(
            Bucket=self.bucket,
            Prefix=full_prefix,
            PaginationConfig={"PageSize": self.options.list_page_size},
        )
        out: list[ObjectInfo] = []
        for page in pages:
            # A page whose body was lost after a 200 header parses as {} with no error, and
            # it also ends the paginator early: insist on the fields every real page has.
            if "KeyCount" not in page and "Name" not in page:
                raise Transient("listing page came back without a body")
            for obj in page.get("Contents", []):
                key = obj["Key"][len(self._root) :]
                if not key or key.endswith("/"):
                    continue  # folder markers made by consoles are not objects
                out.append(ObjectInfo(key, int(obj["Size"]), obj["LastModified"].timestamp()))
        return out

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self._root + check_key(prefix, prefix=True)
        url = f"{self.url}/{prefix}" if prefix else self.url
        infos = self._call("list", url, lambda: self._list_once(full_prefix), rounds=3)
        if not infos:
            # An empty answer is the dangerous one ("no checkpoints" -> start from scratch):
            # believe it only if a second listing agrees.
            infos = self._call("list", url, lambda: self._list_once(full_prefix), rounds=3)
        return infos

    def exists(self, key: str) -> bool:
        try:
            self._head(key)
        except FileNotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key)["ContentLength"])

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call(
            "delete",
            self.url_for(key),
            lambda: self.client.delete_object(Bucket=self.bucket, Key=full),
        )

    def delete_prefix(self, prefix: str) -> int:
        infos = self.list(prefix)
        url = f"{self.url}/{prefix}" if prefix else self.url
        for i in range(0, len(infos), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._root + info.key} for info in infos[i : i + 1000]]
            resp = self._call(
                "delete_prefix",
                url,
                lambda batch=batch: self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                ),
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    "delete_prefix",
                    url,
                    f"{len(errors)} keys not deleted, e.g. {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}",
                )
        return len(infos)
