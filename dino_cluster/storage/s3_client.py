"""The boto3 side of the S3 store: shared clients and how their errors are classified.

The only place boto3/botocore are imported (lazily, inside functions), so importing the
storage package costs nothing until an s3:// URL is opened.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
from typing import Any
from urllib.parse import urlsplit

from dino_cluster.storage.base import StorageError, StorageOptions, backoff_delay

_THROTTLE_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
    "TooManyRequests",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
}
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
# boto3 Session construction is not thread-safe; clients made from it are.
_SESSION_LOCK = threading.Lock()
_LOADER: Any = None
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
_ENV_KEYS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_CA_BUNDLE",
)


class Transient(Exception):
    """A failure we detected ourselves (lost listing body, short upload) and may retry."""


def get_client(options: StorageOptions) -> Any:
    """A shared client for these options in this process (clients are thread-safe).

    Keyed by process id (a client must not cross a fork: data-loader workers build their
    own), the options, and the AWS environment (a changed profile or key gets a new client).
    """
    fingerprint = hashlib.sha256(
        "\0".join(f"{k}={os.environ.get(k, '')}" for k in _ENV_KEYS).encode()
    ).hexdigest()
    key = (os.getpid(), options, fingerprint)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
    if client is None:
        client = make_client(options)
        with _CLIENTS_LOCK:
            if len(_CLIENTS) >= 32:
                _CLIENTS.clear()
            client = _CLIENTS.setdefault(key, client)
    return client


def make_client(options: StorageOptions) -> Any:
    """A new boto3 S3 client (prefer get_client, which shares them)."""
    import boto3
    import botocore.loaders
    import botocore.session
    from botocore.config import Config

    endpoint = (
        options.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        retries={"mode": options.retry_mode, "total_max_attempts": options.max_attempts},
        connect_timeout=options.connect_timeout_s,
        read_timeout=options.read_timeout_s,
        max_pool_connections=max(10, 2 * options.max_concurrency),
        # S3-compatible servers (MinIO, Ceph, moto, R2 behind a custom endpoint) want
        # path-style addressing; AWS accepts it too.
        s3={"addressing_style": "path"} if endpoint else None,
    )
    global _LOADER
    with _SESSION_LOCK:
        # A fresh session per store (credentials are resolved per session, so a changed
        # environment is seen), but one shared model loader: parsing the S3 service JSON
        # costs ~0.2 s per client otherwise.
        if _LOADER is None:
            _LOADER = botocore.loaders.create_loader()
        core = botocore.session.Session()
        core.register_component("data_loader", _LOADER)
        session = boto3.session.Session(
            botocore_session=core, profile_name=options.profile, region_name=options.region
        )
        client = session.client("s3", endpoint_url=endpoint, config=config)
    if options.request_backoff_s is not None:
        _install_request_backoff(client, options)
    return client


def _install_request_backoff(client: Any, options: StorageOptions) -> None:
    """Replace botocore's per-request retry handler by one with our backoff scale.

    botocore's own backoff starts near 1 s and is not configurable; tests that inject many
    faults on purpose would spend minutes sleeping. Same decisions as botocore's standard
    mode (5xx, 429, throttling codes, connection errors), same attempt limit, no quota.
    """
    event = "needs-retry.s3"
    client.meta.events.unregister(event, unique_id="retry-config-s3")
    base = float(options.request_backoff_s or 0.0)

    def needs_retry(
        response: Any = None, attempts: int = 1, caught_exception: Any = None, **_: Any
    ) -> float | None:
        if attempts >= options.max_attempts:
            return None
        if caught_exception is not None:
            retry = is_transient(caught_exception)
        elif response is not None:
            http_response, parsed = response
            status = int(getattr(http_response, "status_code", 0) or 0)
            code = str((parsed or {}).get("Error", {}).get("Code", ""))
            retry = status >= 500 or status == 429 or code in _THROTTLE_CODES
        else:
            retry = False
        return backoff_delay(attempts - 1, base, options.backoff_max_s) if retry else None

    client.meta.events.register(event, needs_retry, unique_id="dino-cluster-retry-s3")


def error_code(exc: BaseException) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def is_boto_error(exc: BaseException) -> bool:
    """A botocore ClientError or BotoCoreError (to be reported as StorageError)."""
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(exc, ClientError | BotoCoreError)


def is_transient(exc: BaseException | None) -> bool:
    """True for failures worth retrying: 5xx, throttling, resets, timeouts, short bodies."""
    if exc is None:
        return False
    from botocore import exceptions as bce
    from urllib3.exceptions import HTTPError as URLLib3HTTPError

    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc)
        return status >= 500 or status == 429 or code in _THROTTLE_CODES
    if isinstance(exc, FileNotFoundError | PermissionError | StorageError):
        return False
    return isinstance(
        exc,
        bce.ConnectionError
        | bce.HTTPClientError
        | bce.ReadTimeoutError
        | bce.ConnectTimeoutError
        | bce.IncompleteReadError
        | bce.ResponseStreamingError
        | URLLib3HTTPError
        | http.client.HTTPException
        | ConnectionError
        | TimeoutError
        | Transient,
    )


CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE (a profile in "
    "~/.aws/credentials), or give the machine an instance role / workload identity"
)


def credentials_present(options: StorageOptions) -> bool:
    """Whether boto3 finds credentials for these options (environment, profile, role)."""
    import boto3

    session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
    return session.get_credentials() is not None


def describe(exc: BaseException) -> str:
    """One plain sentence for what went wrong talking to S3 (the message users read)."""
    from botocore import exceptions as bce

    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError):
        return f"no AWS credentials found: {CREDENTIALS_HINT}"
    if isinstance(exc, bce.ProfileNotFound):
        return f"{exc} (AWS_PROFILE / data.storage.profile)"
    if isinstance(exc, bce.EndpointConnectionError | bce.ConnectTimeoutError):
        where = getattr(exc, "kwargs", {}).get("endpoint_url", "")
        parts = urlsplit(where)
        where = f"{parts.scheme}://{parts.netloc}" if parts.netloc else "the S3 endpoint"
        return (
            f"cannot connect to {where} (check data.storage.endpoint_url or "
            "AWS_ENDPOINT_URL, and that the endpoint is up)"
        )
    if isinstance(exc, bce.ClientError):
        code, status = error_code(exc)
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            return f"the AWS credentials were refused ({code}): {CREDENTIALS_HINT}"
        if code == "NoSuchBucket":
            return "the bucket does not exist"
        if code == "AccessDenied" or status == 403:
            return "access denied (the credentials lack permission for this bucket/prefix)"
        return f"{code or status}: {exc}"
    return f"{type(exc).__name__}: {exc}"
