"""The object-store interface every backend implements, and what they share: options,
errors, key and URL validation, retries with jittered backoff.

Keys are '/'-separated paths relative to the store root; a key can never name something outside
the root. Credentials are never part of a URL or of StorageOptions: boto3 finds them in the
standard AWS environment (env vars, profile files, instance roles).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar
from urllib.parse import urlsplit

# Local temp files carry this prefix so listings can skip half-written objects.
TEMP_PREFIX = ".~tmp-"

T = TypeVar("T")


class StorageError(RuntimeError):
    """An object-store operation failed after its retries; the message names URL and operation."""

    def __init__(self, op: str, url: str, reason: str) -> None:
        super().__init__(f"{op} {url} failed: {reason}")
        self.op = op
        self.url = url
        self.reason = reason

    def __reduce__(self) -> tuple:
        # Ray and multiprocessing pickle exceptions; rebuild from our three fields.
        return (type(self), (self.op, self.url, self.reason))


@dataclass(frozen=True)
class StorageOptions:
    """How to reach the store. Never holds credentials (boto3 finds those itself)."""

    endpoint_url: str | None = None  # else AWS_ENDPOINT_URL / normal boto3 resolution
    region: str | None = None
    profile: str | None = None
    max_attempts: int = 8  # retries with exponential backoff + jitter
    # The fields below have defaults suited to real S3; tests shrink them.
    retry_mode: str = "standard"  # botocore retry mode: "standard" or "adaptive"
    backoff_base_s: float = 0.2  # our own retry loop (body reads, whole uploads)
    backoff_max_s: float = 10.0
    # None: botocore's own per-request backoff (~1 s base, cap 20 s). A number replaces it by
    # full-jitter backoff with that base (tests inject faults on purpose and use ~0.01).
    request_backoff_s: float | None = None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    multipart_threshold: int = 64 * 1024 * 1024
    multipart_chunksize: int = 16 * 1024 * 1024
    max_concurrency: int = 8
    list_page_size: int = 1000

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"StorageOptions.max_attempts must be >= 1, got {self.max_attempts}")
        if self.retry_mode not in ("standard", "adaptive"):
            raise ValueError(
                f"StorageOptions.retry_mode must be 'standard' or 'adaptive', "
                f"got {self.retry_mode!r}"
            )
        if not 1 <= self.list_page_size <= 1000:
            raise ValueError("StorageOptions.list_page_size must be in 1..1000")
        if self.multipart_chunksize < 5 * 1024 * 1024:
            # S3 rejects non-final parts below 5 MiB.
            raise ValueError("StorageOptions.multipart_chunksize must be >= 5 MiB")
        if self.endpoint_url is not None:
            refuse_credentials(self.endpoint_url, what="endpoint_url")

    def interactive(self) -> StorageOptions:
        """The same store with deadlines for a person waiting at a prompt (pre-flight checks,
        `checkpoints`, `status`): two tries and short timeouts, so a wrong endpoint is a
        message within seconds instead of minutes of retries."""
        return dataclasses.replace(
            self, max_attempts=2, connect_timeout_s=5.0, read_timeout_s=20.0, request_backoff_s=0.2
        )

    @classmethod
    def from_spec(cls, section: object | None) -> StorageOptions:
        """The options a spec's storage section (endpoint_url, region, profile) asks for: the
        one translation from job spec to store, used by every component that opens one."""
        if section is None:
            return cls()
        return cls(
            endpoint_url=getattr(section, "endpoint_url", None),
            region=getattr(section, "region", None),
            profile=getattr(section, "profile", None),
        )


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the store root
    size: int
    mtime: float


class ObjectStore(ABC):
    """A tree of objects rooted at ``url``; keys are '/'-separated relative paths."""

    url: str

    def url_for(self, key: str) -> str:
        return f"{self.url.rstrip('/')}/{check_key(key)}"

    @abstractmethod
    def child(self, subpath: str) -> ObjectStore: ...

    @abstractmethod
    def open_read(self, key: str, start: int = 0) -> BinaryIO: ...

    def read_bytes(self, key: str) -> bytes:
        with self.open_read(key) as f:
            return f.read()

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def upload_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def download_file(self, key: str, path: str | os.PathLike) -> None: ...

    @abstractmethod
    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int: ...

    def sweep_temporaries(self, older_than_s: float) -> int:
        """Remove half-written temporaries a killed writer left behind, older than
        `older_than_s`; returns how many. Only local stores write through temporaries (S3
        writes are atomic; its abandoned multipart uploads are the bucket lifecycle's job)."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


# --------------------------------------------------------------------------- validation


def refuse_credentials(url: str, what: str = "URL") -> None:
    """Refuse user:pass@ in a URL. The message never repeats the URL (it holds the secret)."""
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(
            f"credentials in a storage {what} are refused (the value is not shown); "
            "use the standard AWS environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, instance roles)"
        )


def check_key(key: str, *, prefix: bool = False) -> str:
    """Return ``key`` if it is a safe relative key; ValueError otherwise.

    With ``prefix=True`` the empty string and a trailing '/' are allowed (listing prefixes).
    """
    if not isinstance(key, str):
        raise ValueError(f"storage key must be a str, got {type(key).__name__}")
    if key == "":
        if prefix:
            return key
        raise ValueError("storage key must not be empty")
    if "\x00" in key or "\\" in key:
        raise ValueError(f"storage key {key!r} contains a NUL byte or a backslash")
    if key.startswith("/"):
        raise ValueError(f"storage key {key!r} must be relative (no leading '/')")
    parts = key.split("/")
    if prefix and parts[-1] == "":
        parts = parts[:-1]
    for part in parts:
        if part in ("", ".", ".."):
            raise ValueError(
                f"storage key {key!r} has an empty, '.' or '..' component; "
                "keys cannot escape the store root"
            )
        if part.startswith(TEMP_PREFIX):
            raise ValueError(f"storage key {key!r}: names starting {TEMP_PREFIX!r} are reserved")
    return key


def split_url(url: str) -> tuple[str, str]:
    """Split an object URL into (parent store URL, object name)."""
    if not isinstance(url, str) or not url:
        raise ValueError("storage URL must be a non-empty string")
    refuse_credentials(url)
    if url.endswith("/"):
        raise ValueError(f"{url!r} names a folder, not an object")
    head, sep, name = url.rpartition("/")
    if not sep:
        return ".", name
    if head == "":
        return "/", name
    if head.endswith("://"):  # file:///name
        return head + "/", name
    if head.endswith(":/"):  # s3://bucket with no key
        raise ValueError(f"{url!r} does not name an object (expected .../name)")
    return head, name


# --------------------------------------------------------------------------- retries


def backoff_delay(attempt: int, base_s: float, max_s: float) -> float:
    """Full-jitter exponential backoff: uniform in [0, min(max, base * 2**attempt)]."""
    return random.uniform(0.0, min(max_s, base_s * (2**attempt)))


def retry_call(
    fn: Callable[[], T],
    *,
    op: str,
    url: str,
    attempts: int,
    retryable: Callable[[BaseException], bool],
    base_s: float,
    max_s: float,
) -> T:
    """Call ``fn`` until it succeeds, sleeping with jitter between retryable failures."""
    last: BaseException | None = None
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - filtered by `retryable`
            if not retryable(exc):
                raise
            last = exc
            if attempt + 1 < attempts:
                time.sleep(backoff_delay(attempt, base_s, max_s))
    raise StorageError(op, url, f"gave up after {attempts} attempts: {last!r}") from last
