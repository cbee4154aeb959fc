"""The evaluation queue: exactly one evaluation per committed checkpoint, with watchers that
run concurrently, die and restart, and evaluations that crash.

The watcher processes run this file as a script (see `__main__` below) with a trivial
evaluator, so these tests are about the queue, not about k-NN.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.evaluate.queue import EvalQueue, Liveness, parse_queue, queue_key
from dino_cluster.evaluate.results import EvalResult
from dino_cluster.evaluate.submit import EvalJob, InlineSubmitter
from dino_cluster.evaluate.watcher import Watcher
from dino_cluster.storage import StorageOptions, open_store

LEASE_S = 2.0


def fake_result(step: int) -> dict:
    """A result in the one layout every evaluation records (evaluate/results.py)."""
    return {"top1": 50.0, "info": {"value": step}}


def wait_for(pred, deadline_s: float, what: str, procs=()) -> None:  # noqa: ANN001
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pred():
            return
        for p in procs:
            if p.poll() not in (None, 0):
                raise AssertionError(f"a watcher exited with {p.returncode} while waiting: {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out after {deadline_s} s waiting for {what}")


def commit_burst(url: str, options: StorageOptions | None, steps: list[int]) -> None:
    with CheckpointManager(url, storage_options=options, keep_last=1000, pipeline=False) as m:
        for step in steps:
            m.save(step, {"teacher": {"w": torch.full((2,), float(step))}, "meta": {"step": step}})
        m.wait()
        assert m.failed_uploads == 0, m.last_error


def statuses(store, kind: str, steps: list[int]) -> dict[int, dict | None]:  # noqa: ANN001
    q = EvalQueue(store, kind)
    return {s: q.read_status(s) for s in steps}


def start_watcher(url: str, endpoint: str | None, log: Path, marker: Path, out: Path):  # noqa: ANN201
    return subprocess.Popen(
        [sys.executable, __file__, url, endpoint or "-", str(log), str(marker)],
        stdout=open(out, "ab"),  # noqa: SIM115 - the child holds it
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def invocations(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line.split()[0]) for line in log.read_text().splitlines() if line.strip()]


@pytest.fixture(params=["local", "s3"])
def ckpt_root(request, tmp_path):  # noqa: ANN001, ANN201
    """(checkpoint URL, S3 endpoint, options, number of checkpoints). On moto every listing
    of the bucket costs ~0.5 s on this machine, and each commit's retention pass reads every
    manifest, so the S3 variant commits 12 checkpoints; the local one the full 50."""
    if request.param == "local":
        return str(tmp_path / "checkpoints"), None, None, 50
    s3 = request.getfixturevalue("s3_server")
    bucket = s3.new_bucket("evalq")
    return f"s3://{bucket}/run/checkpoints", s3.endpoint_url, s3.options, 12


def test_burst_two_watchers_one_killed_and_restarted(ckpt_root, tmp_path) -> None:  # noqa: ANN001
    url, endpoint, options, count = ckpt_root
    steps = list(range(10, 10 * count + 10, 10))
    log, marker = tmp_path / "evals.log", tmp_path / "burst-done"
    outs = [tmp_path / f"watcher-{i}.out" for i in range(3)]
    a = start_watcher(url, endpoint, log, marker, outs[0])
    b = start_watcher(url, endpoint, log, marker, outs[1])
    procs = [a, b]
    burst = threading.Thread(target=commit_burst, args=(url, options, steps))
    try:
        burst.start()
        # Kill one watcher while the queue is being worked on, then start a new one.
        wait_for(lambda: len(invocations(log)) >= count // 4, 120, "first evaluations", procs)
        kill(a)
        assert len(set(invocations(log))) < len(steps), "the kill came too late to matter"
        c = start_watcher(url, endpoint, log, marker, outs[2])
        procs = [b, c]
        burst.join(timeout=300)
        marker.write_text("done")
        for p, out in zip(procs, outs[1:], strict=True):  # both exit once all is final
            p.wait(timeout=180)
            assert p.returncode == 0, out.read_text()[-3000:]
    finally:
        for p in (a, b, *procs):
            kill(p)
        burst.join(timeout=300)
    store = open_store(url, options)
    final = statuses(store, "fake", steps)
    assert all(s is not None and s["state"] == "done" for s in final.values()), final
    infos = CheckpointManager(url, storage_options=options, is_writer=False).list()
    assert [i.step for i in infos] == steps
    assert all(i.evals["fake"]["info"]["value"] == i.step for i in infos)  # its own, once
    calls = invocations(log)
    print(f"{len(calls)} evaluator calls for {len(steps)} checkpoints")
    assert set(calls) == set(steps)  # none lost
    # No duplicates, except the one evaluation the killed watcher had in flight (redone).
    assert len(calls) - len(steps) <= 1
    # Nothing left claimed.
    assert not any(parse_queue(store.list(""), "fake").get(s, None).claims for s in steps)


def test_crashing_evaluation_is_retried_then_failed_and_others_continue(tmp_path) -> None:
    url = str(tmp_path / "ckpt")
    commit_burst(url, None, [1, 2, 3])
    calls: list[int] = []

    def evaluate(job: EvalJob) -> dict:
        calls.append(job.step)
        if job.step == 2:
            raise RuntimeError("boom")
        return fake_result(job.step)

    store = open_store(url)
    w = Watcher(
        store, InlineSubmitter(evaluate), kinds=["fake"], max_attempts=3, lease_s=5, poll_s=0.05
    )
    stats = w.run(finished=lambda: True, deadline_s=60)
    assert sorted(calls) == [1, 2, 2, 2, 3]
    assert (stats.done, stats.failed, stats.failed_attempts) == (2, 1, 3)
    final = statuses(store, "fake", [1, 2, 3])
    assert final[2]["state"] == "failed" and final[2]["attempts"] == 3
    assert len(final[2]["errors"]) == 3 and "exit code 1" in final[2]["errors"][-1]
    assert final[1]["state"] == final[3]["state"] == "done"
    assert final[3]["results"] == EvalResult.from_json("fake", 3, fake_result(3)).to_json()
    assert final[3]["results"]["info"] == {"value": 3}
    # A later watcher does not retry a failed evaluation: it is final.
    again = Watcher(store, InlineSubmitter(evaluate), kinds=["fake"], lease_s=5, poll_s=0.05)
    again.run(once=True, deadline_s=30)
    assert sorted(calls) == [1, 2, 2, 2, 3]


def test_claim_left_on_a_final_step_is_reaped_before_the_watcher_exits(tmp_path) -> None:
    """A watcher killed between writing `done` and releasing leaves its claim behind: the
    surviving watcher reaps it once stale instead of calling the queue drained."""
    url = str(tmp_path / "ckpt")
    commit_burst(url, None, [1, 2])
    store = open_store(url)
    evaluate = lambda job: fake_result(job.step)  # noqa: E731
    Watcher(store, InlineSubmitter(evaluate), kinds=["fake"], lease_s=5, poll_s=0.05).run(
        finished=lambda: True, deadline_s=60
    )
    assert statuses(store, "fake", [1, 2])[2]["state"] == "done"
    orphan = queue_key("fake", 2, f"claim-{'ab' * 16}")
    store.write_bytes(orphan, b"")
    w = Watcher(store, InlineSubmitter(evaluate), kinds=["fake"], lease_s=0.5, poll_s=0.05)
    t0 = time.monotonic()
    stats = w.run(finished=lambda: True, deadline_s=60)
    assert not store.exists(orphan)
    assert time.monotonic() - t0 >= 0.5  # it waited for the lease, not reaped a live claim
    assert stats.started == 0  # nothing re-evaluated
    assert not parse_queue(store.list(""), "fake")[2].claims


def test_claims_are_exclusive_under_contention(tmp_path) -> None:
    """Many threads race for one step, over and over: never two holders at once."""
    store = open_store(str(tmp_path / "q"))
    holders: list[int] = []
    overlap: list[int] = []
    wins = [0] * 6
    lock = threading.Lock()

    def racer(i: int) -> None:
        q = EvalQueue(store, "knn", lease_s=30)
        for _ in range(15):
            claim = q.try_claim(7)
            if claim is None:
                time.sleep(0.001 * i)
                continue
            with lock:
                holders.append(i)
                if len(holders) > 1:
                    overlap.append(len(holders))
            wins[i] += 1
            time.sleep(0.002)
            with lock:
                holders.remove(i)
            q.release(claim)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == []
    assert sum(wins) > 0


def test_stale_claim_is_taken_over_and_its_holder_sees_it_lost(tmp_path) -> None:
    store = open_store(str(tmp_path / "q"))
    now = [0.0]
    first = EvalQueue(store, "knn", lease_s=10)
    held = first.try_claim(5)
    assert held is not None and held.heartbeat()
    other = EvalQueue(store, "knn", lease_s=10, liveness=Liveness(10, clock=lambda: now[0]))

    def entry():  # noqa: ANN202
        return parse_queue(store.list(""), "knn")[5]

    assert other.try_claim(5, entry()) is None  # live: first seen now
    now[0] = 9.0
    assert other.try_claim(5, entry()) is None  # same heartbeat, but not for 10 s yet
    held.heartbeat()
    now[0] = 15.0
    assert other.try_claim(5, entry()) is None  # a new heartbeat restarts the clock
    now[0] = 25.5
    taken = other.try_claim(5, entry())  # unchanged for 10.5 s: stale, taken over
    assert taken is not None
    assert not held.heartbeat() and held.lost  # the old holder finds out at its next beat
    assert list(entry().claims) == [taken.token]
    with pytest.raises(RuntimeError, match="claim lost"):
        first.write_status(held, {"state": "done"})
    assert store.exists(queue_key("knn", 5, f"claim-{taken.token}"))


# --------------------------------------------------------------------------- watcher process


def _watch_main(url: str, endpoint: str, log_path: str, marker: str) -> None:
    options = None
    if endpoint != "-":
        options = StorageOptions(endpoint_url=endpoint, backoff_base_s=0.01, request_backoff_s=0.01)

    def evaluate(job: EvalJob) -> dict:
        time.sleep(0.05)  # long enough that a kill lands mid-evaluation now and then
        with open(log_path, "a") as f:
            f.write(f"{job.step} {os.getpid()}\n")
        return fake_result(job.step)

    w = Watcher(
        open_store(url, options),
        InlineSubmitter(evaluate),
        kinds=["fake"],
        storage_options=options,
        lease_s=LEASE_S,
        poll_s=0.2,
    )
    stats = w.run(finished=lambda: os.path.exists(marker), deadline_s=300)
    print(json.dumps({"done": stats.done, "polls": stats.polls, "lost": stats.lost}))


if __name__ == "__main__":
    _watch_main(*sys.argv[1:5])
