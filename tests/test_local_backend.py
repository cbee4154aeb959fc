"""The local backend's rank supervision with real processes: two gloo ranks of the tiny
quickstart on real Fashion-MNIST under torch's elastic agent. A run that completes, a rank
SIGKILLed mid-run (the others are gone within 30 s, the run is failed and says which rank
and how), a cancel and a killed supervisor (the ranks checkpoint and stop), Ctrl-C in the
foreground; never a process of the run left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_train import REPO, TINY, tiny_spec

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.launch.local import LocalBackend, failure, run_status
from dino_cluster.launch.local_agent import (
    process_running,
    rank_processes,
    read_outcome,
    run_processes,
)
from dino_cluster.launch.run_record import read_record
from dino_cluster.spec import JobSpec

TWO_RANKS = ["launcher.procs_per_node=2", "optim.global_batch=16", "checkpoint.every_steps=2"]
# Far more than a test waits for (it is stopped or killed): 2,000 steps, and epochs enough
# that the epoch count does not end the run first.
LONG = ["optim.epochs=100", "optim.max_steps=2000"]


def _wait(cond: Callable[[], object], timeout_s: float, what: str, alive=None):  # noqa: ANN001, ANN202
    """Poll `cond` until it is true; fail after `timeout_s`, or at once when `alive()` says
    the run is over and `cond` still is not true."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := cond():
            return value
        if alive is not None and not alive():
            if value := cond():
                return value
            break
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def _gone(pid: int) -> bool:
    """The supervisor `pid` and every process it started have ended."""
    return not process_running(pid) and not run_processes(pid)


def _logs(run_dir: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
        for p in sorted((run_dir / "logs").glob("*.log"))
    )


def _committed(spec: JobSpec) -> list[int]:
    return [i.step for i in CheckpointManager(spec.checkpoint_url, is_writer=False).list()]


def _kill_all(pid: int) -> None:
    """Teardown: nothing of the run may outlive the test, whatever failed."""
    for p in [*run_processes(pid), pid]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _started(spec: JobSpec) -> int:
    """Submit detached; the supervisor's pid once a checkpoint is committed and both ranks
    are found."""
    run_dir = spec.run_dir
    LocalBackend().submit(spec, detach=True)
    pid = read_record(run_dir, "local").pid
    alive = lambda: process_running(pid)  # noqa: E731
    try:
        _wait(lambda: _committed(spec), 300, "a committed checkpoint", alive)
        _wait(lambda: len(rank_processes(pid)) == 2, 60, "both ranks", alive)
    except BaseException:
        _kill_all(pid)
        print(_logs(run_dir))
        raise
    return pid


def test_two_ranks_complete_and_leave_nothing(tmp_path: Path, fmnist_shards: Path) -> None:
    spec = tiny_spec(tmp_path, fmnist_shards, *TWO_RANKS, "optim.max_steps=4")
    run_dir = spec.run_dir
    LocalBackend().submit(spec, detach=True)
    pid = read_record(run_dir, "local").pid
    try:
        _wait(lambda: run_status(run_dir) != "running", 300, "the run to end")
        assert run_status(run_dir) == "completed", _logs(run_dir)
        assert failure(run_dir) is None
        assert read_outcome(run_dir)["ranks"] == [0, 0]
        assert _committed(spec)[-1] == 4
        for rank in (0, 1):
            text = (run_dir / "logs" / f"rank-{rank}.log").read_text()
            assert f"rank {rank} finished at step 4" in text  # each rank writes its own log
            assert json.loads((run_dir / "exit" / f"rank-{rank}.json").read_text()) == {"code": 0}
        _wait(lambda: _gone(pid), 30, "every process of the run to end")
    finally:
        _kill_all(pid)


@pytest.mark.parametrize("survivor", ["responsive", "frozen"])
def test_a_killed_rank_stops_the_others(tmp_path: Path, fmnist_shards: Path, survivor: str) -> None:
    """SIGKILL rank 1 mid-run: rank 0 and the supervisor are gone within 30 s and the run
    is failed, naming rank 1 and its signal. `frozen`: rank 0 is SIGSTOPped first, so it
    cannot act on the agent's SIGTERM (as a rank blocked in a collective with a dead peer);
    the supervisor still gets rid of it in time."""
    spec = tiny_spec(tmp_path, fmnist_shards, *TWO_RANKS, *LONG)
    run_dir = spec.run_dir
    pid = _started(spec)
    try:
        ranks = rank_processes(pid)
        if survivor == "frozen":
            os.kill(ranks[0], signal.SIGSTOP)
        t0 = time.monotonic()
        os.kill(ranks[1], signal.SIGKILL)
        _wait(lambda: _gone(pid), 30, "rank 0 and the supervisor to end")
        took = time.monotonic() - t0
        print(
            f"{survivor} survivor: the last process of the run was gone {took:.1f} s after the kill"
        )
        assert run_status(run_dir) == "failed"
        outcome = read_outcome(run_dir)
        assert (outcome["failed_rank"], outcome["rank_exitcode"], outcome["signal"]) == (
            1,
            -9,
            "SIGKILL",
        ), outcome
        why = failure(run_dir)
        assert why is not None and why.startswith("rank 1 was killed by SIGKILL (exit -9)"), why
        assert "last lines of" in why
    finally:
        _kill_all(pid)


@pytest.mark.parametrize("how", ["cancel", "supervisor_killed"])
def test_stopping_a_run_checkpoints_and_leaves_nothing(
    tmp_path: Path, fmnist_shards: Path, how: str
) -> None:
    """`cancel` (SIGTERM to the supervisor, forwarded by torch's agent) and a supervisor
    killed outright (the kernel sends each rank SIGTERM): the ranks write a checkpoint at
    the step they stop at, exit 3, and nothing is left running."""
    spec = tiny_spec(tmp_path, fmnist_shards, *TWO_RANKS, *LONG)
    run_dir = spec.run_dir
    pid = _started(spec)
    try:
        if how == "cancel":
            LocalBackend().cancel(run_dir)
        else:
            os.kill(pid, signal.SIGKILL)
        _wait(lambda: _gone(pid), 150, "the run to stop")
        codes = [json.loads((run_dir / "exit" / f"rank-{r}.json").read_text()) for r in (0, 1)]
        assert codes == [{"code": 3}, {"code": 3}], _logs(run_dir)
        last = _committed(spec)[-1]
        log = (run_dir / "logs" / "rank-0.log").read_text()
        assert f"rank 0 finished at step {last} (stopped)" in log  # checkpointed at the stop
        if how == "cancel":
            assert run_status(run_dir) == "stopped"
            assert read_outcome(run_dir)["stopped_by"] == "SIGTERM"
        else:
            assert run_status(run_dir) == "failed"  # nobody saw the run to its end
            why = failure(run_dir)
            assert why is not None and "ended without writing" in why, why
            assert "rank 0: 3, rank 1: 3" in why
    finally:
        _kill_all(pid)


def test_ctrl_c_in_the_foreground_cancels(tmp_path: Path, fmnist_shards: Path) -> None:
    """`dino-cluster submit` in the foreground follows rank 0's log; Ctrl-C asks the ranks
    to checkpoint and stop, and submit keeps following until the run has stopped."""
    spec = tiny_spec(tmp_path, fmnist_shards, *TWO_RANKS, *LONG)
    run_dir = spec.run_dir
    cmd = [
        sys.executable,
        "-m",
        "dino_cluster.cli",
        "submit",
        str(REPO / "jobs/quickstart-vit.yaml"),
    ]
    for item in [f"run.dir={tmp_path / 'runs'}", f"data.url={fmnist_shards}", *TINY, *TWO_RANKS]:
        cmd += ["--set", item]
    for item in LONG:
        cmd += ["--set", item]
    out = tmp_path / "submit.out"
    with open(out, "wb") as fh:
        # Its own group, so the SIGINT below reaches the CLI only, as a terminal's would.
        cli = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, process_group=0)
    pid = None
    try:
        running = lambda: cli.poll() is None  # noqa: E731
        _wait(lambda: (run_dir / "launch.json").exists(), 120, "the run record", running)
        pid = read_record(run_dir, "local").pid
        _wait(lambda: _committed(spec), 300, "a committed checkpoint", running)
        _wait(lambda: "step " in out.read_text(), 60, "rank 0's progress in the output")
        cli.send_signal(signal.SIGINT)
        assert cli.wait(timeout=150) == 0, out.read_text()[-3000:]
        text = out.read_text()
        assert "cancelling" in text and "status: stopped" in text, text[-3000:]
        assert "(stopped)" in text  # rank 0's last log line, followed to the end
        _wait(lambda: _gone(pid), 30, "every process of the run to end")
    finally:
        cli.kill()
        cli.wait()
        if pid is not None:
            _kill_all(pid)
