"""The local backend's supervisor: `python -m dino_cluster.launch.local_agent --spec SPEC`.

One process per local run. It runs torch's elastic agent (torch.distributed.launcher.api,
the engine behind torchrun) on this machine: one node, `launcher.world_size` ranks, a c10d
rendezvous on 127.0.0.1, no restarts. The agent starts every rank as
`python -m dino_cluster.train --spec SPEC --log-dir RUN/logs` with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR / MASTER_PORT set, watches them, and stops them all when one ends
badly. How the run ended goes to RUN/exit/launcher.json (`read_outcome`); the process exits
0 (completed), 3 (stopped after a checkpoint) or 1 (failed).

What this module adds to the agent, and why:

- A rank that dies makes the agent SIGTERM the others and SIGKILL them only 30 s later (a
  fixed grace in torch's process context). Our ranks take SIGTERM as "checkpoint after this
  step", which a rank whose peer is gone cannot do, and a collective with a dead peer may
  block. `_RankWatch` SIGKILLs the survivors' process groups FAILURE_GRACE_S after a rank
  failed, and records which rank failed first (torch orders failures by whole seconds).
- SIGTERM to this process (`dino-cluster cancel`) is forwarded by the agent to the ranks,
  which checkpoint and exit 3; the agent SIGKILLs what is left after STOP_GRACE_S. SIGINT
  and SIGHUP are forwarded as SIGTERM too (a rank takes SIGINT as a crash).
- Each rank carries SUPERVISOR_ENV=<this pid>: the rank asks the kernel for a SIGTERM when
  this process dies, even by SIGKILL (dino_cluster/train/__main__.py), and `run_processes`
  finds every process of the run (ranks and their data workers) by it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dino_cluster.launch.procs import free_port
from dino_cluster.spec import JobSpec, SpecError, load_spec

MODULE = "dino_cluster.launch.local_agent"  # what the supervisor runs as (python -m)
SUPERVISOR_ENV = "DINO_CLUSTER_SUPERVISOR_PID"
log = logging.getLogger(MODULE)
OUTCOME_FILE = "exit/launcher.json"
LAUNCHER_LOG = "logs/launcher.log"
EXIT_COMPLETED, EXIT_FAILED, EXIT_STOPPED = 0, 1, 3  # as dino_cluster.train's ranks
# Time the ranks get to checkpoint and exit after a stop request before they are killed.
STOP_GRACE_S = 120
# Time the other ranks get to exit after one failed (they cannot checkpoint without it).
FAILURE_GRACE_S = 10
MONITOR_INTERVAL_S = 0.5  # how often the agent polls its ranks
_TAIL_LINES = 30
_TAIL_CHARS = 4000


# -- commands and environment (also what `render` prints) ---------------------------------


def supervisor_command(spec: JobSpec) -> list[str]:
    resolved = spec.run_dir / "spec.resolved.yaml"
    return [spec.launcher.interpreter, "-m", MODULE, "--spec", str(resolved)]


def rank_command(spec: JobSpec) -> list[str]:
    resolved = spec.run_dir / "spec.resolved.yaml"
    logs = spec.run_dir / "logs"
    return [
        spec.launcher.interpreter,
        "-m",
        "dino_cluster.train",
        "--spec",
        str(resolved),
        "--log-dir",
        str(logs),
    ]


def rank_environment(world: int, environ: Mapping[str, str]) -> dict[str, str]:
    """What this module adds to every rank's environment (the agent adds RANK and the rest)."""
    env = {"PYTHONUNBUFFERED": "1"}
    if world > 1 and "OMP_NUM_THREADS" not in environ:
        # Keep CPU ranks from fighting over cores. World size 1 keeps torch's default.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    return env


# -- the run's processes, from /proc ----------------------------------------------------------


def _proc_fields(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and ")"
        return fields[0], int(fields[1])
    except (OSError, ValueError, IndexError):  # gone, or gone while being read
        return None


def process_running(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended). Never reaps: the agent owns its children."""
    fields = _proc_fields(pid)
    if fields is None:
        if Path("/proc/self/stat").exists():
            return False
        try:  # no /proc (not Linux): the signal-0 probe
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return fields[0] not in ("Z", "X")


def supervisor_running(pid: int) -> bool:
    """Whether `pid` is a live supervisor (not a process that reused a dead one's pid)."""
    if not process_running(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc: trust the pid
    return MODULE.encode() in cmdline


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def run_processes(supervisor_pid: int) -> dict[int, dict[str, str]]:
    """Every live process started under the supervisor `supervisor_pid` (its ranks and their
    children), pid -> environment; empty without /proc."""
    out = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return out
    for name in entries:
        if not name.isdigit() or int(name) in (supervisor_pid, os.getpid()):
            continue
        env = _environ(int(name))
        if env.get(SUPERVISOR_ENV) == str(supervisor_pid) and process_running(int(name)):
            out[int(name)] = env
    return out


def rank_processes(supervisor_pid: int) -> dict[int, int]:
    """Rank -> pid of the supervisor's live ranks (its children with RANK set)."""
    out = {}
    for pid, env in run_processes(supervisor_pid).items():
        fields = _proc_fields(pid)
        if fields is not None and fields[1] == supervisor_pid and env.get("RANK", "").isdigit():
            out[int(env["RANK"])] = pid
    return out


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)  # a rank leads its own group (torch starts it so)
    except (ProcessLookupError, PermissionError):
        pass


# -- exit files --------------------------------------------------------------------------------


def rank_exit_code(run_dir: Path, rank: int) -> int | None:
    """The code rank `rank` wrote to RUN/exit/rank-N.json on its way out; None: none."""
    try:
        return int(json.loads((Path(run_dir) / "exit" / f"rank-{rank}.json").read_text())["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def clear_exit_files(run_dir: Path) -> None:
    """Forget how an earlier attempt in this run folder ended."""
    exit_dir = Path(run_dir) / "exit"
    exit_dir.mkdir(parents=True, exist_ok=True)
    for f in [*exit_dir.glob("rank-*.json"), exit_dir / "launcher.json"]:
        f.unlink(missing_ok=True)


def read_outcome(run_dir: Path) -> dict[str, Any] | None:
    """RUN/exit/launcher.json: code (0 completed, 3 stopped, 1 failed), ranks (exit code per
    rank, None unknown), failed_rank, rank_exitcode, signal (what killed that rank), log and
    log_tail (the file that says why and its last lines), stopped_by (the signal that
    stopped the run), error (the launcher's own)."""
    try:
        doc = json.loads((Path(run_dir) / OUTCOME_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def log_tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])[-_TAIL_CHARS:]


# -- supervision ---------------------------------------------------------------------------


class _RankWatch(threading.Thread):
    """Finds the ranks, notes which one failed first, and kills the rest when the agent's
    own SIGTERM does not end them within `grace_s`."""

    def __init__(self, run_dir: Path, world: int, grace_s: float, poll_s: float = 0.1) -> None:
        super().__init__(name="rank-watch", daemon=True)
        self.run_dir, self.world, self.grace_s, self.poll_s = run_dir, world, grace_s, poll_s
        self.pids: dict[int, int] = {}
        self.first_failed: int | None = None
        self.failed_at: float | None = None  # monotonic
        self._gone: set[int] = set()
        self._done = threading.Event()

    def run(self) -> None:
        # Looks at the known ranks more often than the agent does (to see who went first),
        # and scans /proc for ranks not found yet less often (it reads every environment).
        for tick in itertools.count():
            if self._done.wait(self.poll_s):
                return
            if len(self.pids) < self.world and tick % 5 == 0:
                for rank, pid in rank_processes(os.getpid()).items():
                    self.pids.setdefault(rank, pid)
            self._check()

    def _check(self) -> None:
        newly = [
            r for r, pid in self.pids.items() if r not in self._gone and not process_running(pid)
        ]
        self._gone.update(newly)
        codes = {r: rank_exit_code(self.run_dir, r) for r in newly}
        bad = [r for r in newly if codes[r] not in (EXIT_COMPLETED, EXIT_STOPPED)]
        if bad and self.first_failed is None:
            # Of the ranks gone since the last look, one that wrote no exit file was killed
            # or crashed outright; one that wrote 1 most likely failed on the dead peer.
            self.first_failed = min(bad, key=lambda r: (codes[r] is not None, r))
            self.failed_at = time.monotonic()
            log.warning("rank %d ended badly; stopping the others", self.first_failed)
        if self.failed_at is not None and time.monotonic() - self.failed_at > self.grace_s:
            for rank, pid in self.pids.items():
                if rank not in self._gone:
                    log.warning(
                        "rank %d still runs %.0f s after a rank failed: SIGKILL", rank, self.grace_s
                    )
                    _kill_group(pid)

    def stop(self) -> None:
        self._done.set()
        self.join()


_received: list[str] = []  # the stop signals this process got, first first


def _stop_handler(signum: int, frame: object) -> None:
    from torch.distributed.elastic.multiprocessing import SignalException

    _received.append(signal.Signals(signum).name)
    # The agent forwards the exception's signal to the ranks: the one they checkpoint on.
    raise SignalException(f"got {signal.Signals(signum).name}", sigval=signal.SIGTERM)


def _logs_specs() -> Any:
    from torch.distributed.elastic.multiprocessing import LogsDest, LogsSpecs

    class InheritedLogs(LogsSpecs):
        """Ranks inherit the supervisor's stdout and stderr and redirect themselves into
        RUN/logs/rank-N.log: torch's own per-rank files are truncated on every start, and
        a resumed run appends to its log. No error files: the rank's log says why."""

        def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
            ranks = range(len(envs))
            for env in envs.values():
                env["TORCHELASTIC_ERROR_FILE"] = ""
            return LogsDest(
                stdouts=dict.fromkeys(ranks, ""),
                stderrs=dict.fromkeys(ranks, ""),
                error_files=dict.fromkeys(ranks, os.devnull),
            )

        @property
        def root_log_dir(self) -> str:
            return os.devnull

    return InheritedLogs()


def _launch(spec: JobSpec) -> tuple[dict[int, int], int | None]:
    """Run the ranks under torch's agent until they end: (exit code of every rank that did
    not exit 0, the rank torch saw fail first). SignalException when stopped."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=spec.launcher.world_size,
        run_id=f"{spec.run.name}-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"is_host": True},
        local_addr="127.0.0.1",  # the ranks' MASTER_ADDR, whatever this host is called
        max_restarts=0,  # a restart is a new `submit`: it resumes from the last checkpoint
        monitor_interval=MONITOR_INTERVAL_S,
        logs_specs=_logs_specs(),
        # The agent's handler for SIGTERM only; _stop_handler turns SIGINT / SIGHUP into it.
        signals_to_handle="SIGTERM",
        shutdown_timeout=STOP_GRACE_S,
    )
    command = rank_command(spec)
    log.info("starting %d rank(s) under torch's elastic agent: %s", config.nproc_per_node, command)
    try:
        elastic_launch(config, command[0])(*command[1:])
    except ChildFailedError as exc:
        return {r: f.exitcode for r, f in exc.failures.items()}, exc.get_first_failure()[0]
    return {}, None


def _sweep(timeout_s: float = 5.0) -> None:
    """Leave no process of the run behind: the ranks' own children (data workers) notice
    their parent is gone and exit on their own; SIGKILL what is left after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while run_processes(os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in run_processes(os.getpid()):
        log.warning("process %d of the run outlived its rank: SIGKILL", pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def supervise(spec: JobSpec) -> int:
    """Run the ranks of `spec` to the end and write RUN/exit/launcher.json; the run's code."""
    from torch.distributed.elastic.multiprocessing import SignalException

    run_dir, world = spec.run_dir, spec.launcher.world_size
    clear_exit_files(run_dir)
    os.environ.update(rank_environment(world, os.environ))
    os.environ[SUPERVISOR_ENV] = str(os.getpid())
    watch = _RankWatch(run_dir, world, FAILURE_GRACE_S)
    codes: dict[int, int] | None = {}
    torch_first, stopped_by, error = None, None, None
    try:
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):
            signal.signal(getattr(signal, name), _stop_handler)
        watch.start()
        codes, torch_first = _launch(spec)
    except SignalException as exc:
        codes, stopped_by = None, _received[0] if _received else exc.sigval.name
        log.warning("%s: the ranks were asked to checkpoint and stop", stopped_by)
    except Exception as exc:  # noqa: BLE001 - the agent failed: say so in the outcome
        log.exception("the elastic agent failed")
        codes, error = None, f"{type(exc).__name__}: {exc}"
    finally:
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # nothing is left to stop
            signal.signal(getattr(signal, name), signal.SIG_IGN)
        if watch.is_alive():
            watch.stop()
        _sweep()
    if codes is None:  # the agent did not see every exit: the ranks' own files say
        ranks = [rank_exit_code(run_dir, r) for r in range(world)]
    else:
        ranks = [codes.get(r, EXIT_COMPLETED) for r in range(world)]
        # The agent SIGTERMs the ranks still running once one exits non-zero, 3 included
        # (a stop not sent through us, e.g. SIGUSR2): a rank caught in its last moments,
        # its exit code already written, ended as it says.
        for r, c in enumerate(ranks):
            if c == -signal.SIGTERM and (said := rank_exit_code(run_dir, r)) is not None:
                ranks[r] = said
    outcome = _outcome(run_dir, ranks, [watch.first_failed, torch_first], stopped_by, error)
    if stopped_by and not watch.pids and all(c is None for c in ranks):
        outcome["code"] = EXIT_STOPPED  # stopped before any rank started: nothing lost
    _write_outcome(run_dir, outcome)
    log.info("run ended: %s", json.dumps({k: v for k, v in outcome.items() if k != "log_tail"}))
    return int(outcome["code"])


def _outcome(
    run_dir: Path,
    ranks: list[int | None],
    first: list[int | None],
    stopped_by: str | None,
    error: str | None,
) -> dict[str, Any]:
    """launcher.json's content (read_outcome). `first`: who saw which rank fail first, in
    order of trust (our watch polls finer than torch's whole-second timestamps)."""
    if error is None and all(c == EXIT_COMPLETED for c in ranks):
        code = EXIT_COMPLETED
    elif error is None and all(c in (EXIT_COMPLETED, EXIT_STOPPED) for c in ranks):
        code = EXIT_STOPPED
    else:
        code = EXIT_FAILED
    bad = [r for r, c in enumerate(ranks) if c not in (EXIT_COMPLETED, EXIT_STOPPED)]
    failed = next((r for r in first if r in bad), bad[0] if bad else None)
    exitcode = ranks[failed] if failed is not None else None
    name = None
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
    tail, tailed = "", None
    if code == EXIT_FAILED:
        # The failed rank's log; the launcher's when it says nothing (no rank failed, or
        # it died before writing a line: a broken interpreter, a bad import, a quiet rank).
        candidates = [Path(run_dir) / "logs" / f"rank-{failed}.log"] if failed is not None else []
        for tailed in [*candidates, Path(run_dir) / LAUNCHER_LOG]:
            if tail := log_tail(tailed):
                break
    return {
        "code": code,
        "ranks": ranks,
        "failed_rank": failed,
        "rank_exitcode": exitcode,
        "signal": name,
        "log": str(tailed) if tailed else None,
        "log_tail": tail,
        "stopped_by": stopped_by,
        "error": error,
    }


def _write_outcome(run_dir: Path, outcome: dict[str, Any]) -> None:
    path = Path(run_dir) / OUTCOME_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(outcome, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)  # a reader sees the whole file or none


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.launch.local_agent")
    parser.add_argument("--spec", required=True, help="the run's resolved job spec (YAML)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return supervise(spec)


if __name__ == "__main__":
    sys.exit(main())
