"""Streaming reads of one S3 object that survive broken connections (see S3Reader).

botocore never retries a GET body that breaks while it is being read; this module re-requests
the rest with a Range header. It uses the client of an S3Store and imports no boto3 itself.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

from dino_cluster.storage.base import StorageError, backoff_delay, retry_call
from dino_cluster.storage.s3_client import (
    NOT_FOUND_CODES,
    Transient,
    describe,
    error_code,
    is_boto_error,
    is_transient,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 1024 * 1024
# A re-request that got at least this far before breaking again counts as progress.
_PROGRESS_RESET = 256 * 1024


class S3Reader(io.RawIOBase):
    """A GET body as a seekable stream that survives broken connections.

    When reading the body raises (reset, timeout, IncompleteRead) or ends before the bytes
    the response promised, the object is requested again with ``Range: bytes=<offset>-`` and
    ``If-Match: <etag>`` (so a concurrently replaced object is an error, not a splice).
    Consecutive failures without progress are bounded by ``max_attempts``.
    """

    def __init__(self, store: Any, full_key: str, url: str, start: int) -> None:
        super().__init__()
        self._store = store
        self._key = full_key
        self._url = url
        self._pos = start
        self._size: int | None = None
        self._etag: str | None = None
        self._body: Any = None
        self._eof = False
        self._failures = 0  # consecutive failures without real progress
        self._progress = 0  # bytes read since the last failure
        # Open eagerly so a missing key raises FileNotFoundError at open time.
        self._reopen_with_retries()

    # -- requests

    def _request(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self._store.bucket, "Key": self._key}
        if self._pos > 0:
            kwargs["Range"] = f"bytes={self._pos}-"
        if self._etag:
            kwargs["IfMatch"] = self._etag
        try:
            resp = self._store.client.get_object(**kwargs)
        except Exception as exc:
            if not hasattr(exc, "response"):  # only ClientErrors carry a parsed answer
                raise
            code, status = error_code(exc)
            if code in NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket"):
                raise FileNotFoundError(f"no object {self._url}") from exc
            if code == "InvalidRange" or status == 416:
                self._eof = True  # offset at or past the end: like a local file, reads b""
                return
            if code == "PreconditionFailed" or status == 412:
                raise StorageError("read", self._url, "object changed while reading") from exc
            raise
        if self._pos > 0 and not resp.get("ContentRange"):
            resp["Body"].close()
            raise StorageError("read", self._url, "the server ignored the Range header")
        self._etag = self._etag or resp.get("ETag")
        length = int(resp["ContentLength"])
        content_range = resp.get("ContentRange") or ""
        if "/" in content_range and not content_range.endswith("/*"):
            self._size = int(content_range.rsplit("/", 1)[1])
        else:
            self._size = self._pos + length
        self._body = resp["Body"]

    def _reopen_with_retries(self) -> None:
        self._drop_body()
        try:
            retry_call(
                self._request,
                op="read",
                url=self._url,
                attempts=self._store.options.max_attempts,
                retryable=is_transient,
                base_s=self._store.options.backoff_base_s,
                max_s=self._store.options.backoff_max_s,
            )
        except Exception as exc:
            if is_boto_error(exc):
                raise StorageError("read", self._url, describe(exc)) from exc
            raise

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # noqa: BLE001 - the connection is being thrown away anyway
                pass
            self._body = None

    # -- RawIOBase

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_SET:
            new = offset
        elif whence == io.SEEK_CUR:
            new = self._pos + offset
        elif whence == io.SEEK_END:
            if self._size is None:
                self._size = self._store.size(self._key[len(self._store._root) :])
            new = self._size + offset
        else:
            raise ValueError(f"invalid whence {whence}")
        if new < 0:
            raise ValueError(f"negative seek position {new}")
        if new != self._pos:
            self._drop_body()  # reopened lazily at the new offset
            self._pos = new
            self._eof = False
        return self._pos

    def readinto(self, buffer: Any) -> int:
        if self.closed:
            raise ValueError("read from a closed object stream")
        view = memoryview(buffer).cast("B")
        if len(view) == 0:
            return 0
        options = self._store.options
        while True:
            try:
                if self._body is None and not self._eof:
                    self._request()
                if self._eof:
                    return 0
                n = self._body.readinto(view)
                if n == 0 and self._size is not None and self._pos < self._size:
                    raise Transient(f"body ended at byte {self._pos} of {self._size}")
                self._pos += n
                self._progress += n
                if n == 0:
                    self._eof = True
                return n
            except Exception as exc:  # noqa: BLE001 - filtered below
                if not is_transient(exc):
                    if is_boto_error(exc):
                        raise StorageError("read", self._url, describe(exc)) from exc
                    raise
                last = exc
            self._drop_body()
            # Count failures that made no real progress: a flaky link that still moves the
            # stream forward is retried, one that keeps breaking at the same place is not.
            if self._progress >= _PROGRESS_RESET:
                self._failures = 0
            self._failures += 1
            self._progress = 0
            if self._failures >= options.max_attempts:
                raise StorageError(
                    "read",
                    self._url,
                    f"gave up at byte {self._pos} after {self._failures} attempts: {last!r}",
                ) from last
            log.debug("re-requesting %s from byte %d after %r", self._url, self._pos, last)
            delay = backoff_delay(self._failures - 1, options.backoff_base_s, options.backoff_max_s)
            time.sleep(delay)

    def readall(self) -> bytes:
        chunks = []
        while True:
            chunk = self.read(_READ_CHUNK)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def close(self) -> None:
        self._drop_body()
        super().close()
