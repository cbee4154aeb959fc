"""The Ray Train driver: one TorchTrainer around the per-rank training entry.

    python -m dino_cluster.launch.ray.driver --spec RUN/spec.resolved.yaml [--address A]

With no address (and not inside a Ray job) it starts a private local Ray head (own temp
dir, own ports, dashboard on 127.0.0.1) and stops it at the end; with an address ("auto",
host:port) it joins that cluster. The Jobs API path runs this same module on the cluster.

Failure handling: Ray Train restarts the worker group after a worker or node failure, up to
`launcher.ray.max_failures` times; every restart resumes from our latest committed
checkpoint (the loop does that). When no worker shows a sign of life for
`launcher.ray.startup_timeout_s` (the cluster cannot supply the workers asked for), the
driver gives up with a message that says what was asked and what the cluster has; ending
the driver ends the Ray Train controller and workers it owns.

Exit status: 0 completed (or reached optim.max_steps), 3 stopped on request after a
checkpoint, 1 failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.ray.cluster import (
    LocalRayCluster,
    auth_token,
    check_reachable,
    enable_token_auth,
    loopback_env,
)
from dino_cluster.launch.ray.jobs import STOP_GRACE_S
from dino_cluster.spec import JobSpec, SpecError, load_spec

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class StartupDeadlineError(LaunchError):
    """The cluster could not start the training workers within the startup deadline."""


@dataclass
class DriverResult:
    status: str  # completed | max_steps | stopped | failed
    step: int | None = None
    world_size: int | None = None
    message: str = ""
    attempts: list[int] | None = None  # worker group size of every (re)start

    @property
    def exit_code(self) -> int:
        if self.status in ("completed", "max_steps"):
            return EXIT_OK
        return EXIT_STOPPED if self.status == "stopped" else EXIT_FAILED


def result_path(spec: JobSpec) -> Path:
    return spec.run_dir / "ray" / "driver-result.json"


def scaling_kwargs(spec: JobSpec) -> dict[str, Any]:
    """ScalingConfig arguments: one worker per GPU, or CPU workers (gloo)."""
    lc = spec.launcher
    use_gpu = lc.gpus_per_node > 0
    resources: dict[str, float] = {"CPU": float(lc.cpus_per_worker)}
    if use_gpu:
        resources["GPU"] = 1.0
    num_workers: int | tuple[int, int] = lc.world_size
    if lc.workers is not None:
        w = lc.workers
        num_workers = w.min if w.min == w.max else (w.min, w.max)
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "use_gpu": use_gpu,
        "resources_per_worker": resources,
    }
    if isinstance(num_workers, tuple):
        kwargs["elastic_resize_monitor_interval_s"] = lc.ray.resize_interval_s
    return kwargs


def min_workers(spec: JobSpec) -> int:
    lc = spec.launcher
    return lc.workers.min if lc.workers is not None else lc.world_size


def _storage_path(spec: JobSpec) -> str:
    # Ray's own run bookkeeping (no checkpoints of ours go there).
    if spec.launcher.ray.storage_path:
        return spec.launcher.ray.storage_path
    return str((spec.run_dir / "ray").resolve())


def build_trainer(spec: JobSpec, link: Any) -> Any:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from dino_cluster.launch.ray.worker import train_worker

    lc = spec.launcher
    return TorchTrainer(
        train_worker,
        train_loop_config={"spec": spec.model_dump(mode="json"), "link": link},
        torch_config=TorchConfig(backend="nccl" if lc.gpus_per_node > 0 else "gloo"),
        scaling_config=ScalingConfig(**scaling_kwargs(spec)),
        run_config=RunConfig(
            name=spec.run.name,
            storage_path=_storage_path(spec),
            failure_config=FailureConfig(max_failures=lc.ray.max_failures),
        ),
    )


def _deadline_message(spec: JobSpec, waited: float, started: bool) -> str:
    import ray

    kw = scaling_kwargs(spec)
    try:
        have = {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")}
        total = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    except Exception:  # the cluster itself may be the problem
        have, total = {}, {}
    what = (
        "no training worker has been alive for" if started else "no training worker started within"
    )
    outcome = (
        "Training stopped; submitting again resumes from the latest committed checkpoint."
        if started
        else "Nothing was trained."
    )
    return (
        f"{what} launcher.ray.startup_timeout_s={spec.launcher.ray.startup_timeout_s:g} s "
        f"(waited {waited:.0f} s): the run needs at least {min_workers(spec)} worker(s) with "
        f"{kw['resources_per_worker']} each; the Ray cluster has {total or 'unknown'} in "
        f"total, {have or 'unknown'} free. Ask for fewer workers (launcher.workers.min / "
        "launcher.nodes), add nodes, or raise launcher.ray.startup_timeout_s. "
        f"{outcome} The driver's Ray workers end with it."
    )


def _run_on_ray(spec: JobSpec, stop_event: threading.Event) -> DriverResult:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Pinned to the driver's node: a lost worker node must not take the link with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    link = ray.remote(num_cpus=0, scheduling_strategy=here)(_link_class()).remote()
    trainer = build_trainer(spec, link)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    t0 = time.monotonic()
    thread.start()
    deadline_s = spec.launcher.ray.startup_timeout_s
    stop_sent_at: float | None = None
    while thread.is_alive():
        thread.join(1.0)
        if not thread.is_alive():
            break
        now = time.monotonic()
        if stop_event.is_set() and stop_sent_at is None:
            log.warning("stop requested: the workers checkpoint after the current step")
            link.request_stop.remote("cancel")
            stop_sent_at = now
        if stop_sent_at is not None and now - stop_sent_at > STOP_GRACE_S:
            return DriverResult(
                "stopped",
                message=f"the workers did not stop within {STOP_GRACE_S:.0f} s; ended them",
            )
        try:
            last = ray.get(link.last_seen.remote(), timeout=30)
        except Exception:
            last = None
        idle_for = (time.time() - last) if last is not None else (now - t0)
        if idle_for > deadline_s:
            started = bool(_safe_get(link.attempts.remote()))
            raise StartupDeadlineError(_deadline_message(spec, idle_for, started))
    sizes = _safe_get(link.attempts.remote()) or []
    if "error" in outcome:
        exc = outcome["error"]
        return DriverResult("failed", message=f"{type(exc).__name__}: {exc}", attempts=sizes)
    value = outcome["result"].return_value if hasattr(outcome["result"], "return_value") else None
    value = value or {}
    return DriverResult(
        status=value.get("status", "completed"),
        step=value.get("step"),
        world_size=value.get("world_size"),
        attempts=sizes,
    )


def _safe_get(ref: Any) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=10)
    except Exception:
        return None


def _link_class() -> type:
    from dino_cluster.launch.ray.worker import RunLink

    return RunLink


def run_driver(
    spec: JobSpec,
    address: str | None = None,
    stop_event: threading.Event | None = None,
    spec_path: str | Path | None = None,
) -> DriverResult:
    """Connect to (or start) Ray, train, and return how it ended. Raises LaunchError on a
    startup deadline or when Ray cannot be reached. With `evaluation.enabled` the
    evaluation watcher runs beside training in this process (ray/evaluations.py)."""
    stop_event = stop_event or threading.Event()
    if address is None or address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Must be set before Ray is imported: it reads it once, at import.
        os.environ.update(loopback_env())
    private = address is None and not os.environ.get("RAY_ADDRESS")
    token_dir = None
    if private:
        # Before Ray is imported: it reads the auth mode and token location once.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        if os.environ["RAY_AUTH_MODE"].lower() == "token" and auth_token() is None:
            # A fresh machine has no ~/.ray/auth_token: give this private Ray its own token,
            # readable only by us, removed with the cluster (~/.ray is left alone).
            token_dir = Path(tempfile.mkdtemp(prefix="dino-ray-token-"))
            token_file = token_dir / "auth_token"
            token_file.write_text(secrets.token_hex(32))
            token_file.chmod(0o600)
            os.environ["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    enable_token_auth()
    import ray

    cluster: LocalRayCluster | None = None
    if private:
        lc, ev = spec.launcher, spec.evaluation
        # Room for one evaluation task beside the training workers.
        eval_cpus = ev.cpus if ev.enabled else 0
        try:
            cluster = LocalRayCluster.start(
                num_cpus=max(os.cpu_count() or 1, lc.world_size * lc.cpus_per_worker) + eval_cpus,
                num_gpus=None if lc.gpus_per_node or (ev.enabled and ev.gpus) else 0,
                temp_dir=None,
            )
        except BaseException:
            if token_dir is not None:
                shutil.rmtree(token_dir, ignore_errors=True)
            raise
        if token_dir is not None:
            cluster.cleanup_dirs.append(token_dir)
        address = cluster.address
        # Our Jobs/dashboard clients must talk to this Ray, not another one on the machine.
        os.environ["RAY_API_SERVER_ADDRESS"] = cluster.dashboard_url
        print(
            f"local Ray started: dashboard {cluster.dashboard_url} "
            f"(token auth; token: {_token_hint()})",
            flush=True,
        )
    try:
        _connect(ray, address, spec.launcher.ray.connect_timeout_s)
        CONNECTED.set()
        evals = None
        result: DriverResult | None = None
        try:
            if spec.evaluation.enabled:
                from dino_cluster.launch.ray.evaluations import DriverEvaluations

                path = Path(spec_path or spec.run_dir / "spec.resolved.yaml").resolve()
                try:
                    evals = DriverEvaluations(spec, path, stop_event).start()
                except Exception:  # evaluation trouble never stops training
                    log.exception("no evaluations beside this run (`dino-cluster eval watch`)")
            result = _run_on_ray(spec, stop_event)
            return result
        finally:
            if evals is not None:
                # The last checkpoints are evaluated before Ray goes; a failed or cancelled
                # run leaves them to `dino-cluster eval watch RUN`.
                ok = result is not None and result.status in ("completed", "max_steps")
                evals.finish(wait=ok and not stop_event.is_set())
            ray.shutdown()
    finally:
        if cluster is not None:
            cluster.stop()


# Set once this driver is connected to Ray: a stop before that leaves at once (there is
# nothing to checkpoint yet, and Ray's connect loop would not look at the stop request).
CONNECTED = threading.Event()


def _connect(ray: Any, address: str | None, timeout_s: float) -> None:
    """ray.init with a deadline: Ray itself retries an unreachable GCS forever."""
    if address not in (None, "auto"):
        check_reachable(address, timeout_s)

    def give_up() -> None:
        print(
            f"error: the run failed: Ray did not connect to {address or 'the local cluster'} "
            f"within {timeout_s:g} s (launcher.ray.connect_timeout_s); check "
            "--address / launcher.ray.address",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_FAILED)  # the connect loop cannot be interrupted from another thread

    watchdog = threading.Timer(timeout_s + 30, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=address or "auto", log_to_driver=True, logging_level=logging.WARNING)
    finally:
        watchdog.cancel()


def _token_hint() -> str:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")


def write_result(spec: JobSpec, result: DriverResult) -> None:
    path = result_path(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(result)))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dino_cluster.launch.ray.driver")
    parser.add_argument("--spec", required=True, help="resolved job spec (YAML)")
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (host:port or auto); default: "
        "launcher.ray.address, else a private local Ray",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = load_spec(args.spec)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    address = args.address
    if address is None:
        configured = spec.launcher.ray.address
        if configured and not configured.startswith(("http://", "https://")):
            address = configured

    stop_event = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        # First signal: checkpoint and stop. A second one, or one before Ray is connected:
        # leave now (finally blocks stop a private cluster; Ray cleans up the controller and
        # workers this driver owns when it exits).
        if stop_event.is_set() or not CONNECTED.is_set():
            raise SystemExit(EXIT_STOPPED)
        stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        result = run_driver(spec, address, stop_event, spec_path=args.spec)
    except LaunchError as exc:
        result = DriverResult("failed", message=str(exc))
    except SystemExit:  # a stop before Ray was connected, or a second stop
        result = DriverResult("stopped", message="stopped on request before training ended")
    write_result(spec, result)
    if result.status == "failed":
        print(f"error: the run failed: {result.message}", file=sys.stderr, flush=True)
    else:
        print(
            f"run {result.status} at step {result.step} (world size {result.world_size}; "
            f"worker groups started: {result.attempts})",
            flush=True,
        )
    return result.exit_code


if __name__ == "__main__":
    code = main()
    # Ray and the private cluster are shut down explicitly by now, and the result file and
    # messages are written. Skip interpreter teardown: Ray's core worker crashed in it once
    # after a failed start (SIGSEGV, so the exit status said -11 instead of 1).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
