"""Object storage: one interface, backends chosen by URL scheme.

``file:///abs``, ``/abs/path`` and ``relative/path`` are local folders (local.py);
``s3://bucket/prefix`` goes through boto3 (s3.py, s3_client.py, s3_reader.py: the only
modules that import it, lazily). Everything else in dino_cluster passes URLs and calls
`open_store` / `open_url`; base.py holds the interface and what the backends share.
"""

from __future__ import annotations

import os
import re
from typing import BinaryIO
from urllib.parse import urlsplit

from dino_cluster.storage.base import (
    TEMP_PREFIX,
    ObjectInfo,
    ObjectStore,
    StorageError,
    StorageOptions,
    backoff_delay,
    check_key,
    refuse_credentials,
    retry_call,
    split_url,
)

__all__ = [
    "TEMP_PREFIX",
    "ObjectInfo",
    "ObjectStore",
    "StorageError",
    "StorageOptions",
    "backoff_delay",
    "check_credentials",
    "check_key",
    "check_writable",
    "open_store",
    "open_url",
    "retry_call",
    "split_url",
]

VALID_SCHEMES = ("file://", "s3://", "a plain local path")

# A scheme is letters then ':'; one letter is left alone (it would be a drive letter), and a
# '/' before the ':' makes it a path ("runs/a:b").
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
# Lenient on purpose: S3-compatible stores accept more than AWS's DNS rules.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,254}$")


def open_store(url: str, options: StorageOptions | None = None) -> ObjectStore:
    """Open the store rooted at ``url``: file:///abs, /abs, relative/path or s3://bucket/prefix."""
    if not isinstance(url, str) or not url:
        raise ValueError("storage URL must be a non-empty string")
    options = options or StorageOptions()
    refuse_credentials(url)
    match = _SCHEME_RE.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme == "s3":
        bucket, prefix = _parse_s3(url)
        from dino_cluster.storage.s3 import S3Store

        return S3Store(bucket, prefix, options)
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"file URL {url!r} must be file:///absolute/path (host {parts.netloc!r} given)"
            )
        if parts.query or parts.fragment:
            raise ValueError(f"file URL {url!r} must not have a query or fragment")
        path = parts.path
    elif scheme:
        raise ValueError(
            f"unsupported storage URL scheme {scheme + ':'!r}; valid: {', '.join(VALID_SCHEMES)}"
        )
    else:
        path = url
    from dino_cluster.storage.local import LocalStore

    return LocalStore(os.path.abspath(os.path.expanduser(path)))


def _parse_s3(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        # Never echo: a presigned query string is a credential.
        raise ValueError("s3 URLs must not have a query string or fragment (value not shown)")
    bucket = parts.netloc
    if not _BUCKET_RE.match(bucket):
        raise ValueError(f"s3 URL {url!r} has no valid bucket name (expected s3://bucket/prefix)")
    prefix = parts.path.strip("/")
    if prefix:
        check_key(prefix)
    return bucket, prefix


def open_url(url: str, options: StorageOptions | None = None) -> BinaryIO:
    """Open one object for streaming reads (s3 reads resume with Range after a dropped body)."""
    parent, name = split_url(url)
    return open_store(parent, options).open_read(name)


def check_writable(url: str, options: StorageOptions | None = None) -> None:
    """Raise StorageError unless objects can be written under `url`, leaving nothing behind:
    a local folder (or its nearest existing parent) must be writable; on S3 the credentials
    must exist and a probe object is written and deleted at once."""
    store = open_store(url, options)
    if store.url.startswith("file://"):
        path = store.url.removeprefix("file://")
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe) or "/"
        if not os.path.isdir(probe):
            raise StorageError("write", store.url, f"{probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError("write", store.url, f"no permission to write in {probe}")
        return
    from dino_cluster.storage.s3_client import CREDENTIALS_HINT, credentials_present

    if not credentials_present(options or StorageOptions()):
        raise StorageError("write", store.url, f"no AWS credentials found: {CREDENTIALS_HINT}")
    key = f".dino-write-probe-{os.getpid()}-{os.urandom(4).hex()}"
    store.write_bytes(key, b"")
    store.delete(key)


def check_credentials(url: str, options: StorageOptions | None = None) -> None:
    """For an s3:// URL: raise StorageError when boto3 finds no credentials (local: nothing)."""
    if not url.startswith("s3://"):
        return
    from dino_cluster.storage.s3_client import CREDENTIALS_HINT, credentials_present

    if not credentials_present(options or StorageOptions()):
        raise StorageError("read", url, f"no AWS credentials found: {CREDENTIALS_HINT}")
