"""CheckpointManager: save in the background, commit atomically, list, load verified, retain.

The training loop calls ``save(step, state)`` and pays only for copying tensors to host memory;
one background thread per checkpoint (one checkpoint in flight at a time) serialises each
top-level key with torch.save (hashing as it writes) and uploads it, checking its size, then
writes the manifest, then the ``latest`` hint, then applies retention. With ``pipeline=True``
the upload of one object runs in a helper thread while the next is serialised. Nothing from
those threads ever raises into the loop: a commit that fails after its retries is logged,
counted in ``failed_uploads`` and kept in ``last_error``.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

from dino_cluster.checkpointing.layout import (
    EVALS_DIR,
    LATEST,
    MANIFEST,
    OBJECT_SUFFIX,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointInfo,
    CheckpointNotFoundError,
    Manifest,
    ManifestError,
    ManifestObject,
    check_name,
    eval_key,
    file_sha256,
    json_scalar,
    manifest_key,
    manifest_meta,
    object_key,
    parse_step_dir,
    step_dir,
)
from dino_cluster.checkpointing.objects import refuse_non_finite, serialise, torch_load
from dino_cluster.checkpointing.retention import plan_retention
from dino_cluster.storage import ObjectStore, StorageOptions, backoff_delay, open_store

if TYPE_CHECKING:
    from dino_cluster.spec import CheckpointSpec

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_EVAL_BYTES = 1 << 20
# A temporary untouched this long belongs to a dead writer (a live upload writes continuously).
STALE_TEMP_S = 3600

# Managers with an upload in flight when the interpreter exits get a bounded wait.
_LIVE: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


@atexit.register
def _drain_at_exit() -> None:
    for manager in list(_LIVE):
        if not manager.wait(manager.exit_timeout_s):
            log.error("checkpoint upload still running at exit; it will not be committed")


class CheckpointManager:
    """Checkpoints of one run under ``url`` (a local folder or s3://bucket/prefix).

    ``url`` may also be an already opened ObjectStore (tests, custom stores).
    """

    def __init__(
        self,
        url: str | ObjectStore,
        *,
        storage_options: StorageOptions | None = None,
        keep_last: int = 3,
        keep_every: int = 0,
        upload_retries: int = 3,
        is_writer: bool = True,
        retry_backoff_s: float = 1.0,
        wait_timeout_s: float | None = 3600.0,
        exit_timeout_s: float | None = 600.0,
        spool_dir: str | None = None,
        reuse_buffers: bool = True,
        pipeline: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest is always kept), got {keep_last}")
        if keep_every < 0:
            raise ValueError(f"keep_every must be >= 0 (0 = off), got {keep_every}")
        if upload_retries < 0:
            raise ValueError(f"upload_retries must be >= 0, got {upload_retries}")
        self.store = url if isinstance(url, ObjectStore) else open_store(url, storage_options)
        self.url = self.store.url
        self.storage_options = storage_options
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.upload_retries = upload_retries
        self.is_writer = is_writer
        self.retry_backoff_s = retry_backoff_s
        self.wait_timeout_s = wait_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.spool_dir = spool_dir
        self.pipeline = pipeline
        # Observable outcome of the background work (read by the loop for logs and metrics).
        self.failed_uploads = 0
        self.commits = 0
        self.last_error: BaseException | None = None
        self.last_committed_step: int | None = None
        self.last_stall_s = 0.0  # time the caller spent inside save()
        self.last_upload_s = 0.0  # serialise + upload + commit, in the background
        # torch is imported on the first save or load, not to list checkpoints.
        self._snapshot: Any = None
        self._reuse_buffers = reuse_buffers
        self._thread: threading.Thread | None = None
        self._closed = False
        _LIVE.add(self)

    # ------------------------------------------------------------------ writing

    @classmethod
    def from_spec(
        cls,
        section: CheckpointSpec,
        url: str,
        *,
        storage_options: StorageOptions | None = None,
        is_writer: bool = True,
    ) -> CheckpointManager:
        """The manager a run's `checkpoint` section describes, for the store at `url`
        (JobSpec.checkpoint_url) and this rank (`is_writer`: rank 0)."""
        return cls(
            url,
            storage_options=storage_options,
            keep_last=section.keep_last,
            keep_every=section.keep_every_steps,
            upload_retries=section.upload_retries,
            is_writer=is_writer,
        )

    def save(self, step: int, state: dict[str, Any], *, blocking: bool = False) -> None:
        """Snapshot ``state`` to host memory and commit it as ``step`` in the background."""
        if not self.is_writer:
            return
        if self._closed:
            raise CheckpointError("save() on a closed CheckpointManager")
        step_dir(step)
        if not isinstance(state, dict) or not state:
            raise ValueError("checkpoint state must be a non-empty dict of top-level keys")
        for key in state:
            check_name(key, "checkpoint state key")
        started = time.perf_counter()
        if not self.wait(self.wait_timeout_s):
            # The previous upload is stuck: skipping this checkpoint keeps training going
            # (its host buffers are still being read, so they cannot be refilled).
            self._fail(
                step,
                TimeoutError(
                    f"previous upload still running after "
                    f"{self.wait_timeout_s} s; checkpoint skipped"
                ),
            )
            return
        if step == self.last_committed_step:
            log.info("checkpoint step %d is already committed; not saving it again", step)
            return
        if self._snapshot is None:
            from dino_cluster.checkpointing.snapshot import HostSnapshot

            self._snapshot = HostSnapshot(reuse_buffers=self._reuse_buffers)
        host_state = self._snapshot.copy(state)
        meta = manifest_meta(state.get("meta"))
        committed = threading.Event()
        self._thread = threading.Thread(
            target=self._background,
            args=(step, host_state, meta, committed),
            name=f"checkpoint-{step}",
            daemon=True,
        )
        self._thread.start()
        self.last_stall_s = time.perf_counter() - started
        if blocking:
            # Until the commit is decided, not until retention's deletions are done: at a
            # preemption the grace period is better spent elsewhere.
            committed.wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the upload in flight; True when none is running any more."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def close(self) -> None:
        """Finish the upload in flight (bounded by ``exit_timeout_s``) and free host buffers."""
        if not self.wait(self.exit_timeout_s):
            log.error("checkpoint upload still running after %s s at close", self.exit_timeout_s)
        self._closed = True
        if self._snapshot is not None:
            self._snapshot.release()
        _LIVE.discard(self)

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _fail(self, step: int, exc: BaseException) -> None:
        self.failed_uploads += 1
        self.last_error = exc
        log.error("checkpoint step %d was NOT committed (%s: %s)", step, type(exc).__name__, exc)

    def _background(
        self, step: int, state: dict[str, Any], meta: dict[str, Any], committed: threading.Event
    ) -> None:
        started = time.perf_counter()
        ok = False
        try:
            self._commit(step, state, meta)
            ok = True
            self.last_upload_s = time.perf_counter() - started
            self.last_committed_step = step
            self.commits += 1
        except Exception as exc:  # noqa: BLE001 - reported, never raised into the loop
            self._fail(step, exc)
        finally:
            committed.set()  # whatever happened, a blocking save() returns now
        if not ok:
            return
        try:
            self._retain(step)
        except Exception as exc:  # noqa: BLE001 - retention is best effort, retried next time
            log.warning("checkpoint retention after step %d failed: %s", step, exc)

    def _commit(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write the objects, then the manifest, which makes the checkpoint exist.

        A step that is already committed (a resumed run saving it again, a re-submitted
        run) is never hidden or deleted first: identical content is kept as it is, other
        content is written beside it under new object names and the manifest is replaced in
        one put (the switch); only then are the old objects deleted. A kill at any moment
        leaves either the old checkpoint or the new one, whole.
        """
        refuse_non_finite(step, state)
        existing = self._existing_manifest(step)
        with tempfile.TemporaryDirectory(prefix="dino-ckpt-", dir=self.spool_dir) as spool:
            if existing is None:
                objects = self._write_objects(step, state, spool)
            else:
                objects = self._write_beside(step, state, spool, existing)
                if objects is None:
                    log.info("checkpoint step %d: identical to the committed one, kept", step)
                    return
        world = meta.get("world_size")
        manifest = Manifest(
            step=step,
            time=time.time(),
            objects=objects,
            world_size=world if isinstance(world, int) and world > 0 else None,
            meta=meta,
        )
        data = manifest.to_json()
        self._retry("write manifest", lambda: self.store.write_bytes(manifest_key(step), data))
        if existing is not None:
            kept = {o.name for o in objects}
            for old in existing.objects:
                if old.name not in kept:
                    self._retry(
                        f"delete replaced {old.name}",
                        lambda o=old: self.store.delete(object_key(step, o.name)),
                    )
        try:  # a hint only: readers derive `latest` from manifests
            self.store.write_bytes(LATEST, str(step).encode())
        except Exception as exc:  # noqa: BLE001
            log.warning("could not update %s (the manifest is committed): %s", LATEST, exc)
        log.info("checkpoint step %d committed (%d bytes)", step, manifest.size)

    def _existing_manifest(self, step: int) -> Manifest | None:
        """The committed manifest of `step`, or None (none, or not a valid manifest)."""
        try:
            return self._read_manifest(step)
        except (FileNotFoundError, ManifestError):
            return None

    def _write_objects(
        self, step: int, state: dict[str, Any], spool: str, tag: str = ""
    ) -> list[ManifestObject]:
        """Serialise and upload every state key as `<key>[.<tag>].pt`: object i uploads while
        object i+1 is serialised, so a commit costs about the upload time alone (at most one
        upload runs and two objects sit in the spool)."""
        objects: list[ManifestObject] = []
        with ThreadPoolExecutor(1, thread_name_prefix="checkpoint-upload") as uploader:
            pending: Future[None] | None = None
            for key, value in state.items():
                obj, path = serialise(key, value, spool, tag)
                if pending is not None:
                    pending.result()  # a failed upload aborts the commit here
                if self.pipeline:
                    pending = uploader.submit(self._upload_object, step, obj, path)
                else:
                    self._upload_object(step, obj, path)
                objects.append(obj)
            if pending is not None:
                pending.result()
        return objects

    def _write_beside(
        self, step: int, state: dict[str, Any], spool: str, existing: Manifest
    ) -> list[ManifestObject] | None:
        """Re-commit of a committed step: None when the content is identical; otherwise the
        new objects, uploaded under fresh names next to the committed ones."""
        serialised = [serialise(key, value, spool, "") for key, value in state.items()]
        same = {o.state_key: o.sha256 for o in existing.objects} == {
            obj.state_key: obj.sha256 for obj, _ in serialised
        }
        if same:
            return None
        # The evaluations beside the step describe the checkpoint being replaced; dropped
        # before the switch (a kill in between loses a result record, never weights; the
        # eval queue keys its records by manifest time, so the new one is evaluated afresh).
        evals = f"{step_dir(step)}/{EVALS_DIR}/"
        self._retry(f"drop {evals}", lambda: self.store.delete_prefix(evals))
        tag = f"r{time.time_ns():x}"
        taken = {o.name for o in existing.objects}
        objects = []
        for obj, path in serialised:
            name = f"{obj.state_key}.{tag}{OBJECT_SUFFIX}"
            if name in taken:  # pragma: no cover - a nanosecond tag seen twice
                raise CheckpointError(f"object name {name} of step {step} already in use")
            new = ManifestObject(name=name, size=obj.size, sha256=obj.sha256, key=obj.state_key)
            self._upload_object(step, new, path)
            objects.append(new)
        return objects

    def _upload_object(self, step: int, obj: ManifestObject, path: str) -> None:
        key = object_key(step, obj.name)
        self._retry(f"upload {obj.name}", partial(self._put, key, path, obj))
        os.unlink(path)  # free spool space before the next (possibly large) object

    def _put(self, key: str, path: str, obj: ManifestObject) -> None:
        self.store.upload_file(key, path)
        stored = self.store.size(key)
        if stored != obj.size:
            raise CheckpointError(
                f"{self.store.url_for(key)} is {stored} bytes after upload, expected {obj.size}"
            )

    def _retry(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.upload_retries + 1):
            try:
                return fn()
            except (ValueError, TypeError):
                raise  # our bug or bad input: retrying cannot help
            except Exception as exc:  # noqa: BLE001
                if attempt == self.upload_retries:
                    raise
                delay = backoff_delay(attempt, self.retry_backoff_s, 30.0)
                log.warning(
                    "checkpoint %s failed (attempt %d of %d): %s; retrying in %.1f s",
                    what,
                    attempt + 1,
                    self.upload_retries + 1,
                    exc,
                    delay,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _retain(self, step: int) -> None:
        committed, partial_steps = self._scan()
        plan = plan_retention(committed, partial_steps, step, self.keep_last, self.keep_every)
        for old in plan.abandoned:
            log.warning(
                "deleting checkpoint step %d: newer than the just-committed step %d, "
                "so it belongs to an abandoned (resumed-over) timeline",
                old,
                step,
            )
        for old in plan.delete_committed:
            # Manifest first: a checkpoint deleted halfway is invisible, never half-visible.
            self.store.delete(manifest_key(old))
            self.store.delete_prefix(step_dir(old) + "/")
        for old in plan.delete_partial:
            self.store.delete_prefix(step_dir(old) + "/")
        swept = self.store.sweep_temporaries(STALE_TEMP_S)
        if swept:
            log.warning(
                "removed %d half-written temporary file(s) under %s, untouched for over %d min "
                "(left by a writer that was killed mid-write)",
                swept,
                self.url,
                STALE_TEMP_S // 60,
            )

    # ------------------------------------------------------------------ reading

    def _scan(self) -> tuple[dict[int, Manifest], set[int]]:
        """Committed checkpoints (manifest valid, objects present with their sizes) and the
        step folders that are not (partial uploads, damaged manifests, leftover evals)."""
        committed, partial_steps, _ = self._scan_all()
        return committed, partial_steps

    def _scan_all(self) -> tuple[dict[int, Manifest], set[int], dict[int, dict[str, int]]]:
        by_step: dict[int, dict[str, int]] = {}
        for info in self.store.list(""):
            head, sep, rest = info.key.partition("/")
            step = parse_step_dir(head) if sep else None
            if step is not None:
                by_step.setdefault(step, {})[rest] = info.size
        committed: dict[int, Manifest] = {}
        partial_steps: set[int] = set()
        for step, sizes in by_step.items():
            if MANIFEST not in sizes:
                partial_steps.add(step)
                continue
            try:
                manifest = self._read_manifest(step)
            except FileNotFoundError:  # deleted between listing and reading
                partial_steps.add(step)
                continue
            except ManifestError as exc:
                log.warning("ignoring checkpoint step %d: %s", step, exc)
                partial_steps.add(step)
                continue
            bad = [o.name for o in manifest.objects if sizes.get(o.name) != o.size]
            if bad:
                log.warning(
                    "ignoring checkpoint step %d: objects missing or of the wrong size: %s",
                    step,
                    ", ".join(bad),
                )
                partial_steps.add(step)
                continue
            committed[step] = manifest
        return committed, partial_steps, by_step

    def _read_manifest(self, step: int) -> Manifest:
        return Manifest.from_json(self.store.read_bytes(manifest_key(step)), expect_step=step)

    def read_manifest(self, step: int) -> Manifest:
        """The parsed manifest of ``step`` (FileNotFoundError / ManifestError if none)."""
        return self._read_manifest(step)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first, with any recorded evaluation results."""
        committed, _, by_step = self._scan_all()
        evals = self._read_evals(committed, by_step)
        return [
            CheckpointInfo(
                step=step,
                time=m.time,
                size=m.size,
                objects=[o.name for o in m.objects],
                world_size=m.world_size,
                evals=evals.get(step, {}),
            )
            for step, m in sorted(committed.items())
        ]

    def _read_evals(
        self, committed: dict[int, Manifest], by_step: dict[int, dict[str, int]]
    ) -> dict[int, dict[str, dict]]:
        out: dict[int, dict[str, dict]] = {}
        for step in committed:
            for rest, size in sorted(by_step.get(step, {}).items()):
                folder, _, file = rest.partition("/")
                if folder != EVALS_DIR or "/" in file or not file.endswith(".json"):
                    continue
                key = f"{step_dir(step)}/{rest}"
                if size > MAX_EVAL_BYTES:
                    log.warning("ignoring eval record %s: %d bytes", key, size)
                    continue
                try:
                    doc = json.loads(self.store.read_bytes(key))
                except (FileNotFoundError, ValueError) as exc:
                    log.warning("ignoring eval record %s: %s", key, exc)
                    continue
                if isinstance(doc, dict) and isinstance(doc.get("results"), dict):
                    out.setdefault(step, {})[file[: -len(".json")]] = doc["results"]
        return out

    def uncommitted_steps(self) -> list[int]:
        """Step folders holding objects but no valid manifest (writes a kill interrupted)."""
        return sorted(self._scan()[1])

    def latest_step(self) -> int | None:
        """Newest committed step, derived from manifests (never from the `latest` hint)."""
        committed, _ = self._scan()
        return max(committed) if committed else None

    def verify(self, step: int) -> list[str]:
        """Download and check every object of ``step``; the list of problems (empty = good)."""
        manifest = self._read_manifest(step)
        with tempfile.TemporaryDirectory(prefix="dino-ckpt-", dir=self.spool_dir) as tmp:
            try:
                self._fetch_verified(step, manifest, [o.name for o in manifest.objects], tmp)
            except CheckpointCorruptError as exc:
                return [str(exc)]
        return []

    def load(
        self,
        step: int | None = None,
        map_location: Any = "cpu",
        *,
        keys: Iterable[str] | None = None,
        fallback: bool = True,
    ) -> tuple[int, dict[str, Any]] | None:
        """Load the newest committed checkpoint (or ``step``), verified, as (step, state).

        A damaged checkpoint (missing object, wrong size or sha256, unreadable) is skipped with
        a warning and the previous committed one is tried (unless ``fallback=False``, then it
        raises CheckpointCorruptError). None when there is no committed checkpoint at all.
        ``keys`` limits which top-level state keys are downloaded and loaded.
        """
        committed, _ = self._scan()
        candidates = sorted(committed, reverse=True)
        if step is not None:
            if step not in committed:
                raise CheckpointNotFoundError(
                    f"no committed checkpoint at step {step} in {self.url} "
                    f"(committed: {sorted(committed) or 'none'})"
                )
            candidates = [s for s in candidates if s <= step]
        for candidate in candidates:
            try:
                return candidate, self._load_one(
                    candidate, committed[candidate], keys, map_location
                )
            except CheckpointCorruptError as exc:
                if not fallback:
                    raise
                log.warning(
                    "checkpoint step %d is damaged, falling back to the previous committed one: %s",
                    candidate,
                    exc,
                )
        return None

    def _load_one(
        self, step: int, manifest: Manifest, keys: Iterable[str] | None, map_location: Any
    ) -> dict[str, Any]:
        by_key = {o.state_key: o.name for o in manifest.objects}
        names = list(by_key.values())
        if keys is not None:
            missing = [k for k in keys if k not in by_key]
            if missing:
                raise CheckpointNotFoundError(
                    f"checkpoint step {step} has no {', '.join(missing)} (has {', '.join(by_key)})"
                )
            names = [by_key[k] for k in keys]
        key_of = {name: key for key, name in by_key.items()}
        with tempfile.TemporaryDirectory(prefix="dino-ckpt-", dir=self.spool_dir) as tmp:
            paths = self._fetch_verified(step, manifest, names, tmp)
            state: dict[str, Any] = {}
            for name, path in paths.items():
                try:
                    value = torch_load(path, map_location=map_location, weights_only=True)
                except Exception as exc:  # noqa: BLE001 - checksum matched, content did not load
                    raise CheckpointCorruptError(
                        f"{name} of step {step} does not load with weights_only=True: {exc}"
                    ) from exc
                state[key_of[name]] = value
        refuse_non_finite(step, state, error=CheckpointCorruptError)
        return state

    def _fetch_verified(
        self, step: int, manifest: Manifest, names: list[str], tmp: str
    ) -> dict[str, str]:
        """Download ``names`` into ``tmp`` and check size + sha256 of every one before any is
        loaded (a flipped byte would otherwise load silently)."""
        by_name = {o.name: o for o in manifest.objects}
        paths: dict[str, str] = {}
        for name in names:
            expected = by_name[name]
            path = os.path.join(tmp, name)
            try:
                self.store.download_file(object_key(step, name), path)
            except FileNotFoundError as exc:
                raise CheckpointCorruptError(f"{name} of step {step} is missing") from exc
            size, sha = file_sha256(path)
            if size != expected.size:
                raise CheckpointCorruptError(
                    f"{name} of step {step} is {size} bytes, manifest says {expected.size}"
                )
            if sha != expected.sha256:
                raise CheckpointCorruptError(f"{name} of step {step} fails its sha256 check")
            paths[name] = path
        return paths

    # ------------------------------------------------------------------ evaluation

    def record_eval(self, step: int, kind: str, results: dict[str, Any]) -> None:
        """Store evaluation ``results`` (JSON-able) of checkpoint ``step`` beside it."""
        if not isinstance(results, dict):
            raise ValueError("eval results must be a dict")
        doc = {"step": step, "kind": kind, "time": time.time(), "results": results}
        data = json.dumps(doc, default=json_scalar, sort_keys=True).encode()
        if len(data) > MAX_EVAL_BYTES:
            raise ValueError(f"eval results are {len(data)} bytes (limit {MAX_EVAL_BYTES})")
        self._retry(
            f"record eval {kind}", lambda: self.store.write_bytes(eval_key(step, kind), data)
        )

    def export_teacher(self, step: int, dest_url: str | None = None) -> str:
        """Write a small evaluation export of ``step`` in the public DINO key layout."""
        from dino_cluster.checkpointing.export import export_teacher

        return export_teacher(self, step, dest_url)
