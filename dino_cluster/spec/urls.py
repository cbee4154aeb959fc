"""URL rules for job specs: no credentials anywhere, and storage fields only on schemes the
storage layer can open.

A spec is printed (`validate --show`), rendered into sbatch scripts and KubeRay ConfigMaps and
copied into every run folder (spec.resolved.yaml), so a secret that gets past validation is
published. Every message here names the rule and never repeats the value: the value *is* the
secret. `redact` is the last line of defence for messages built elsewhere (pydantic echoes
inputs in type errors).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterator
from typing import Any

from dino_cluster.storage import VALID_SCHEMES

# URLs are found by scanning, not by one regular expression: a pattern like
# `[^ ]*scheme://...@[^ ]*` backtracks for minutes on a long value with no URL in it, and
# these functions see every string of a spec (up to 1 MB) and every error message.
_SCHEME_CHARS = frozenset(string.ascii_letters + string.digits + "+.-")
# The authority (user:password@host:port) ends at the path, query or fragment, or a blank.
_AUTHORITY_END = frozenset("/?#" + string.whitespace)
# Where a URL ends inside a message: a blank, a quote, a bracket or a comma, so the rest of
# the message ("(got ['...'])") keeps its shape when the URL is replaced.
_URL_END = frozenset("'\"()[]{}," + string.whitespace)
# Query parameters that carry a secret (presigned S3 URLs, ?token=, ?sig=). Bounded name
# length: the pattern cannot backtrack.
_QUERY_PARAM_RE = re.compile(r"[?&;]([A-Za-z0-9_.-]{1,40})=")
_SECRET_PARAMS = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "signature",
        "sig",
        "token",
        "access_token",
        "auth",
        "password",
        "passwd",
        "secret",
    }
)
# Same rule as dino_cluster.storage.open_store: a scheme is 2+ letters then ':' with no '/'
# before it (one letter would be a Windows drive, "runs/a:b" is a path).
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):")
# Lenient like the storage layer: S3-compatible stores accept more than AWS's DNS rules.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{1,254}$")

CREDENTIALS_MESSAGE = (
    "credentials in a URL (user:password@, user@ or a signed query string) are refused and the "
    "value is not shown; "
    "give object-store access through the environment (AWS_PROFILE, AWS_ACCESS_KEY_ID, "
    "instance roles, workload identity)"
)
REDACTED = "<a URL with credentials or a query, not shown>"

# Nesting walked when looking for credentials in free-form values (runtime_env, setup lines):
# the YAML reader already bounds depth; this keeps a dict built in code from recursing forever.
_MAX_WALK_DEPTH = 64


def _authorities(text: str) -> Iterator[tuple[int, int, int]]:
    """(start, authority start, authority end) of each scheme://authority in `text`, URLs
    nested in a path or query included. One pass: the scheme scan stops at the previous
    authority and an authority stops at the next '/', so no character is looked at twice."""
    pos, n = 0, len(text)
    while (i := text.find("://", pos)) >= 0:
        start = i
        while start > pos and text[start - 1] in _SCHEME_CHARS:
            start -= 1
        while start < i and text[start] not in string.ascii_letters:
            start += 1  # a scheme starts with a letter
        auth_end = i + 3
        if start < i:
            while auth_end < n and text[auth_end] not in _AUTHORITY_END:
                auth_end += 1
            yield start, i + 3, auth_end
        pos = auth_end


def has_credentials(text: str) -> bool:
    """True when `text` holds a scheme://user[:password]@host URL, or a URL whose query
    carries a signature or token, anywhere."""
    first = text.find("://")
    if first < 0:
        return False
    if any(text.find("@", a, e) >= 0 for _, a, e in _authorities(text)):
        return True
    # A secret-named parameter anywhere after the first URL.
    return any(m.group(1).lower() in _SECRET_PARAMS for m in _QUERY_PARAM_RE.finditer(text, first))


def redact(text: str) -> str:
    """`text` with every URL that carries credentials or any query string replaced whole,
    host included: nothing of it is repeated (a query is where signatures go)."""
    if "://" not in text:
        return text
    out: list[str] = []
    done = 0  # text[:done] is in `out`
    # The end of the token scanned last and its next '?' (token_end if none): shared by the
    # URLs nested in one token, so neither is searched for again.
    token_end = query = -1
    for start, auth, auth_end in _authorities(text):
        if start < done:
            continue  # inside a URL already replaced
        if auth_end > token_end:
            token_end = auth_end
            while token_end < len(text) and text[token_end] not in _URL_END:
                token_end += 1
        if query < auth_end:
            query = text.find("?", auth_end, token_end)
            query = token_end if query < 0 else query
        if text.find("@", auth, auth_end) >= 0 or query < token_end:
            # From the start of the token: "got 'user:pw@h'" may have text before the scheme.
            left = start
            while left > done and text[left - 1] not in _URL_END:
                left -= 1
            out += [text[done:left], REDACTED]
            done = token_end
    out.append(text[done:])
    return "".join(out)


def find_credentials(value: Any, where: str = "", depth: int = 0) -> str | None:
    """Where in a str/list/dict value a URL with credentials is (a key path, "" for the value
    itself), or None. Keys are searched too."""
    if depth > _MAX_WALK_DEPTH:
        raise ValueError(f"nested deeper than {_MAX_WALK_DEPTH} levels")
    if isinstance(value, str):
        return where if has_credentials(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            sub = f"{where}.{key}" if where else str(key)
            if isinstance(key, str) and has_credentials(key):
                return where or "(a key)"
            found = find_credentials(item, sub, depth + 1)
            if found is not None:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = find_credentials(item, f"{where}[{i}]", depth + 1)
            if found is not None:
                return found
    return None


def check_no_credentials(value: Any) -> Any:
    """Pydantic validator body: refuse a value holding a URL with credentials."""
    where = find_credentials(value)
    if where is not None:
        at = f" (at {where})" if where else ""
        raise ValueError(f"{CREDENTIALS_MESSAGE}{at}")
    return value


_FORMS = {"s3": "s3://bucket/prefix", "file": "file:///absolute/path"}


def check_storage_url(url: str) -> str:
    """A data, checkpoint or storage location: s3://bucket/prefix, file:///abs (host empty or
    localhost), or a plain local path. Messages name the rule, never the URL."""
    if has_credentials(url):
        raise ValueError(CREDENTIALS_MESSAGE)
    match = _SCHEME_RE.match(url)
    if match is None:
        return url  # a plain local path
    scheme = match.group(1).lower()
    valid = ", ".join(VALID_SCHEMES)
    if scheme == "pipe":
        raise ValueError(f"pipe: URLs are not accepted from job specs; valid: {valid}")
    if scheme not in _FORMS:
        raise ValueError(f"unsupported URL scheme {scheme + ':'!r}; valid: {valid}")
    form = _FORMS[scheme]
    rest = url[match.end() :]
    if not rest.startswith("//"):
        raise ValueError(f"{scheme}: URLs must be {form}")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        raise ValueError(CREDENTIALS_MESSAGE)
    if "?" in url or "#" in url:
        # A presigned query string (X-Amz-Signature=...) is a credential: not shown either.
        raise ValueError(
            f"{scheme}:// URLs must not have a query string or fragment (the value is not shown)"
        )
    if scheme == "s3" and not _BUCKET_RE.match(authority):
        raise ValueError(f"s3:// URLs must be {form} (no valid bucket name)")
    if scheme == "file" and authority not in ("", "localhost"):
        raise ValueError(
            f"file:// URLs must be {form}: a host is not allowed "
            "(file://host/path is not a network share here)"
        )
    return url


def check_endpoint_url(url: str) -> str:
    """An S3-compatible endpoint: http(s)://host[:port][/path], no credentials, no query."""
    scheme, sep, rest = url.partition("://")
    host = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if has_credentials(url) or "@" in host:
        raise ValueError(CREDENTIALS_MESSAGE)
    if not sep or scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL (e.g. http://127.0.0.1:9000)")
    if "?" in url or "#" in url:
        raise ValueError("must not have a query string or fragment (the value is not shown)")
    if not host:
        raise ValueError("has no host (e.g. http://127.0.0.1:9000)")
    return url
