"""Exclusive claims on checkpoints to evaluate, with leases, attempts and a status record.

Everything lives in the checkpoint store, beside the checkpoints, under one prefix:

    eval-queue/<kind>/step-000000150/claim-<token>          a watcher's claim (empty body)
    eval-queue/<kind>/step-000000150/hb-<token>-<counter>   the claim holder's heartbeat
    eval-queue/<kind>/step-000000150/status.json            attempts, state, error, results

Claiming needs only operations every store we support has (whole-object put, delete, and a
strongly consistent listing: S3 since 2020, a local folder, moto): no conditional put.

The claim protocol ("write, then look"):
  1. write your own uniquely named claim object;
  2. list the step's folder;
  3. if any other live claim is listed, delete yours and back off (try again later);
     otherwise you hold the step.
Why two watchers A and B can never both hold a step: say both do. A's listing (2) did not show
B's claim, so it ran before B's write (1) completed: list_A < write_B. Likewise list_B <
write_A. Each watcher writes before it lists: write_A < list_A and write_B < list_B. Chaining,
write_A < list_A < write_B < list_B < write_A, a contradiction. (Deleting a claim in step 3
happens after that watcher's own listing, so it cannot hide anything from the argument.)
Two watchers that collide both back off; random back-off and a random visiting order make
that rare and short, never unsafe.

Leases: the holder rewrites its heartbeat (a new `hb-<token>-<n+1>` object, then the old one
deleted) every `lease_s / 4`. An observer calls a claim stale only after it has seen the same
heartbeat (or none) for `lease_s` on its *own* monotonic clock: no clock is compared across
machines. A stale claim is treated as absent and deleted, so a killed watcher's steps are
taken over. A holder that cannot heartbeat for `0.6 * lease_s`, or finds its claim deleted,
stops its evaluation and gives the step up. The timing assumption (a live holder completes a
heartbeat within `lease_s`; a claimant's write-list-heartbeat takes less than `lease_s`) is
what every lease needs; if it is violated the worst case is one evaluation run twice. Results
are idempotent (the same record key overwritten), never lost or mixed between checkpoints.

Only the holder writes `status.json`; attempts are counted when an attempt starts, so an
evaluation that kills its watcher still uses up its attempts.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dino_cluster.checkpointing.layout import check_name, parse_step_dir, step_dir
from dino_cluster.storage import ObjectInfo, ObjectStore

log = logging.getLogger(__name__)
T = TypeVar("T")

QUEUE_PREFIX = "eval-queue"
STATUS = "status.json"
TERMINAL = frozenset({"done", "failed", "skipped"})
MAX_STATUS_BYTES = 1 << 20
_CLAIM_RE = re.compile(r"^claim-([0-9a-f]{32})$")
_HB_RE = re.compile(r"^hb-([0-9a-f]{32})-(\d{9})$")


def queue_key(kind: str, step: int, name: str = "") -> str:
    return f"{QUEUE_PREFIX}/{check_name(kind, 'eval kind')}/{step_dir(step)}/{name}"


@dataclass
class StepEntry:
    """What one listing says about one (kind, step) in the queue."""

    claims: dict[str, int] = field(default_factory=dict)  # token -> newest heartbeat (-1: none)
    has_status: bool = False


def parse_queue(infos: list[ObjectInfo], kind: str) -> dict[int, StepEntry]:
    """Queue entries of `kind` from a listing of the checkpoint store (keys from its root)."""
    head = f"{QUEUE_PREFIX}/{kind}/"
    status: set[int] = set()
    claims: dict[int, set[str]] = {}
    beats: dict[tuple[int, str], int] = {}
    for info in infos:
        if not info.key.startswith(head):
            continue
        folder, _, name = info.key[len(head) :].partition("/")
        step = parse_step_dir(folder)
        if step is None or "/" in name:
            continue
        claims.setdefault(step, set())
        if name == STATUS:
            status.add(step)
        elif m := _CLAIM_RE.match(name):
            claims[step].add(m.group(1))
        elif m := _HB_RE.match(name):
            key = (step, m.group(1))
            beats[key] = max(beats.get(key, -1), int(m.group(2)))
    # Heartbeats without a claim are leftovers of a holder that lost its claim: not claims.
    return {
        step: StepEntry({t: beats.get((step, t), -1) for t in tokens}, step in status)
        for step, tokens in claims.items()
    }


def newest_statuses(store: ObjectStore) -> dict[str, tuple[int, dict[str, Any]]]:
    """Per evaluation kind, the newest step that has a status record, and that record (one
    listing of the queue; a record rewritten or deleted since the listing is skipped)."""
    infos = store.list(f"{QUEUE_PREFIX}/")
    kinds = {i.key.split("/", 2)[1] for i in infos if i.key.count("/") >= 2}
    out: dict[str, tuple[int, dict[str, Any]]] = {}
    for kind in sorted(kinds):
        steps = [step for step, e in parse_queue(infos, kind).items() if e.has_status]
        for step in sorted(steps, reverse=True):
            try:
                doc = json.loads(store.read_bytes(queue_key(kind, step, STATUS)))
            except (FileNotFoundError, ValueError):
                continue
            if isinstance(doc, dict):
                out[kind] = (step, doc)
                break
    return out


def retry_store(fn: Callable[[], T], what: str, attempts: int = 4) -> T:
    """Retry a store call a few times: a local folder can be pruned by another process's
    delete between our mkdir and our write (FileNotFoundError); S3 errors are already retried
    inside storage, so this only adds a short second chance."""
    for i in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, OSError) as exc:
            if i == attempts - 1:
                raise
            log.debug("%s failed (%s); retrying", what, exc)
            time.sleep(0.05 * (i + 1))
    raise AssertionError("unreachable")


class Liveness:
    """An observer's view of claims: stale = same heartbeat seen for `lease_s` (own clock)."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.lease_s, self.clock = lease_s, clock
        self._seen: dict[tuple[str, int, str], tuple[int, float]] = {}

    def stale(self, kind: str, step: int, token: str, heartbeat: int) -> bool:
        key = (kind, step, token)
        now = self.clock()
        last = self._seen.get(key)
        if last is None or last[0] != heartbeat:
            self._seen[key] = (heartbeat, now)
            return False
        return now - last[1] >= self.lease_s

    def forget(self, kind: str, step: int, token: str) -> None:
        self._seen.pop((kind, step, token), None)


@dataclass
class Claim:
    """A held (kind, step). Heartbeat it at least every lease_s / 4; release when done."""

    store: ObjectStore
    kind: str
    step: int
    token: str
    lease_s: float
    counter: int = 0
    last_ok: float = field(default_factory=time.monotonic)
    lost: bool = False

    @property
    def claim_key(self) -> str:
        return queue_key(self.kind, self.step, f"claim-{self.token}")

    def hb_key(self, n: int) -> str:
        return queue_key(self.kind, self.step, f"hb-{self.token}-{n:09d}")

    def heartbeat(self) -> bool:
        """Renew the lease. False once the claim is lost (deleted as stale, or renewals
        failed for 0.6 * lease_s): the holder must stop and not write results."""
        if self.lost:
            return False
        try:
            nxt = self.counter + 1
            retry_store(lambda: self.store.write_bytes(self.hb_key(nxt), b""), "heartbeat")
            if self.counter >= 0:
                self.store.delete(self.hb_key(self.counter))
            self.counter = nxt
            if not self.store.exists(self.claim_key):
                log.warning("lost the claim on %s step %d (taken as stale)", self.kind, self.step)
                self.lost = True
                return False
            self.last_ok = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - the store is flaky: the lease decides
            log.warning("heartbeat for %s step %d failed: %s", self.kind, self.step, exc)
        if time.monotonic() - self.last_ok > 0.6 * self.lease_s:
            log.warning("could not renew the lease on %s step %d: giving up", self.kind, self.step)
            self.lost = True
        return not self.lost

    def release(self) -> None:
        """Give the step up (after writing its status). Heartbeat first, claim last."""
        keys = [self.hb_key(self.counter)] if self.counter >= 0 else []
        for key in [*keys, self.claim_key]:
            try:
                retry_store(lambda k=key: self.store.delete(k), "release")
            except Exception as exc:  # noqa: BLE001 - a leftover claim goes stale and is reaped
                log.warning("could not delete %s: %s", key, exc)


class EvalQueue:
    """Claims and status records of one evaluation kind in a checkpoint store."""

    def __init__(
        self,
        store: ObjectStore,
        kind: str,
        *,
        lease_s: float = 60.0,
        liveness: Liveness | None = None,
        owner: str | None = None,
    ) -> None:
        if lease_s <= 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s}")
        self.store, self.kind, self.lease_s = store, check_name(kind, "eval kind"), lease_s
        self.liveness = liveness or Liveness(lease_s)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.mine: set[str] = set()

    # -- claims ----------------------------------------------------------------------------
    def live_claims(self, step: int, entry: StepEntry) -> list[str]:
        """Tokens of other watchers' live claims; stale ones are reaped on the way."""
        live = []
        for token, hb in entry.claims.items():
            if token in self.mine:
                live.append(token)
            elif self.liveness.stale(self.kind, step, token, hb):
                log.warning("%s step %d: claim %s is stale; taking over", self.kind, step, token)
                self._reap(step, token, hb)
            else:
                live.append(token)
        return live

    def _reap(self, step: int, token: str, hb: int) -> None:
        # Claim first: from then on its holder (if alive after all) sees it lost.
        keys = [queue_key(self.kind, step, f"claim-{token}")]
        if hb >= 0:
            keys.append(queue_key(self.kind, step, f"hb-{token}-{hb:09d}"))
        for key in keys:
            try:
                self.store.delete(key)
            except Exception as exc:  # noqa: BLE001 - someone else may be reaping too
                log.debug("reaping %s: %s", key, exc)
        self.liveness.forget(self.kind, step, token)

    def try_claim(self, step: int, entry: StepEntry | None = None) -> Claim | None:
        """Hold `step` exclusively, or None if another watcher does (or contends)."""
        if entry is not None and self.live_claims(step, entry):
            return None  # cheap pre-check from the last listing
        token = uuid.uuid4().hex
        claim = Claim(self.store, self.kind, step, token, self.lease_s, counter=-1)
        retry_store(lambda: self.store.write_bytes(claim.claim_key, b""), "write claim")
        try:
            listed = self.store.list(queue_key(self.kind, step))
            now = parse_queue(listed, self.kind).get(step, StepEntry())
            others = [t for t in self.live_claims(step, now) if t != token]
        except Exception:
            claim.release()
            raise
        if others:
            claim.release()
            return None
        self.mine.add(token)
        claim.last_ok = time.monotonic()
        claim.heartbeat()  # first heartbeat: hb-<token>-000000000
        return claim

    def release(self, claim: Claim) -> None:
        claim.release()
        self.mine.discard(claim.token)

    # -- status ------------------------------------------------------------------------------
    def read_status(self, step: int) -> dict[str, Any] | None:
        key = queue_key(self.kind, step, STATUS)
        try:
            data = self.store.read_bytes(key)
        except FileNotFoundError:
            return None
        if len(data) > MAX_STATUS_BYTES:
            log.warning("ignoring %s: %d bytes", key, len(data))
            return None
        try:
            doc = json.loads(data)
        except ValueError:
            log.warning("ignoring %s: not JSON", key)
            return None
        return doc if isinstance(doc, dict) else None

    def write_status(self, claim: Claim, doc: dict[str, Any]) -> None:
        if claim.lost:
            raise RuntimeError(f"{self.kind} step {claim.step}: claim lost; status not written")
        doc = dict(doc, kind=self.kind, step=claim.step, owner=self.owner, updated=time.time())
        data = json.dumps(doc, sort_keys=True, default=str).encode()
        key = queue_key(self.kind, claim.step, STATUS)
        retry_store(lambda: self.store.write_bytes(key, data), "write status")
