"""RaySubmitter: every evaluation is one Ray task on the run's Ray cluster.

The task runs the runner (`dino_cluster.evaluate.runner.main`) in its own worker process
with `num_cpus` / `num_gpus` (and `memory`) from the spec's evaluation section, so Ray
schedules it beside training and it waits for resources rather than oversubscribing them.

- `max_calls=1`: a fresh worker process per evaluation, ended afterwards, so the model,
  the feature bank and a CUDA context never outlive it;
- `max_retries=0`: the watcher counts attempts and retries, Ray must not retry behind it;
- the resolved spec travels as text in the task's arguments: a node only needs to reach the
  checkpoint store and the shards, not the run folder;
- the exit code comes back as the task's return value; a task whose worker died (killed
  for memory, node lost) ends with EXIT_FAILED;
- cancel is `ray.cancel(force=True)`: the worker process is killed, whatever it was doing.

Connecting: inside the Ray driver (launch/ray_driver.py) Ray is already initialised and
is reused. A standalone `dino-cluster eval watch RUN --backend ray` joins the cluster the
run used (`--address`, the run's driver address in RUN/launch.json, `launcher.ray.address`
when it is host:port, else RAY_ADDRESS), with token auth as the launcher does it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from dino_cluster.evaluate.submit import (
    EXIT_FAILED,
    EvalHandle,
    EvalJob,
    eval_env,
    runner_args,
)

log = logging.getLogger(__name__)

POLL_EVERY_S = 0.5  # the watcher polls handles often; asking Ray twice a second is plenty


def run_address(run_dir: str | Path | None, spec_address: str | None) -> str | None:
    """The Ray cluster (GCS host:port) a run's evaluations go to, or None (RAY_ADDRESS /
    an already initialised Ray decide). A Jobs API URL is no GCS address: such runs
    evaluate from their driver, on the cluster."""
    if run_dir is not None:
        launch = Path(run_dir) / "launch.json"
        if launch.exists():
            import json

            info = json.loads(launch.read_text())
            if info.get("backend") == "ray" and info.get("mode") == "driver":
                if info.get("address"):
                    return str(info["address"])
    if spec_address and not spec_address.startswith(("http://", "https://")):
        return spec_address
    return None


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` unless this process already did (the driver)."""
    from dino_cluster.launch.ray_local import enable_token_auth, loopback_env

    if address is not None and address.split(":")[0] in ("127.0.0.1", "localhost"):
        # Read once, when Ray is imported: a one-machine cluster stays on loopback.
        for key, value in loopback_env().items():
            os.environ.setdefault(key, value)
    enable_token_auth()
    import ray

    if ray.is_initialized():
        return
    if address is None and not os.environ.get("RAY_ADDRESS"):
        raise ValueError(
            "no Ray cluster to submit evaluations to: pass --address HOST:PORT, set "
            "RAY_ADDRESS, or set launcher.ray.address (a Jobs API URL runs the watcher in "
            "the run's driver instead)"
        )
    ray.init(address=address or "auto", log_to_driver=True, logging_level=logging.WARNING)


def _evaluate_task(
    job: EvalJob, spec_text: str | None, cpus: int, gpus: int, target: Any = None
) -> int:
    """Body of the Ray task: one evaluation in this (fresh) worker process."""
    env = eval_env(os.environ, cpus)  # not a rank of any process group; its CPU threads
    for key in set(os.environ) - set(env):
        del os.environ[key]
    os.environ.update(env)
    if gpus == 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    import torch

    torch.set_num_threads(cpus)
    if target is not None:
        return int(target(job))
    from dino_cluster.evaluate import runner

    with tempfile.TemporaryDirectory(prefix="dino-eval-") as tmp:
        if spec_text is not None:
            spec_file = Path(tmp) / "spec.yaml"
            spec_file.write_text(spec_text)
            job = replace(job, spec_path=str(spec_file))
        return int(runner.main(runner_args(job)))


_REMOTE: Any = None


def _remote_fn() -> Any:
    global _REMOTE
    if _REMOTE is None:
        import ray

        _REMOTE = ray.remote(max_calls=1)(_evaluate_task)  # not settable in .options()
    return _REMOTE


class _RayHandle:
    def __init__(self, ref: Any, name: str) -> None:
        self.ref, self.name = ref, name
        self.code: int | None = None
        self._next = 0.0

    def poll(self) -> int | None:
        if self.code is not None or time.monotonic() < self._next:
            return self.code
        self._next = time.monotonic() + POLL_EVERY_S
        import ray

        ready, _ = ray.wait([self.ref], timeout=0)
        if not ready:
            return None
        try:
            self.code = int(ray.get(self.ref))
        except Exception as exc:  # noqa: BLE001 - a dead worker or a cancel is a failed run
            log.error("Ray evaluation %s ended without an exit code: %s", self.name, exc)
            self.code = EXIT_FAILED
        return self.code

    def cancel(self) -> None:
        import ray

        if self.code is None:
            # force: the worker process is killed, not interrupted (a KeyboardInterrupt can
            # be swallowed by the code it lands in).
            ray.cancel(self.ref, force=True)


class RaySubmitter:
    """Starts each evaluation as a Ray task (see the module docstring).

    `target`: a picklable `callable(job) -> exit code` run in the task instead of the
    runner (custom evaluators, tests).
    """

    def __init__(
        self,
        *,
        address: str | None = None,
        cpus: int = 2,
        gpus: int = 0,
        mem_gb: int | None = None,
        target: Callable[[EvalJob], int] | None = None,
    ) -> None:
        self.address, self.cpus, self.gpus, self.mem_gb = address, cpus, gpus, mem_gb
        self.target = target
        self._connected = False

    def submit(self, job: EvalJob) -> EvalHandle:
        if not self._connected:
            connect(self.address)
            self._connected = True
        spec_text = None
        if self.target is None:
            if job.spec_path is None:
                raise ValueError("a runner job needs the run's spec file (spec_path)")
            spec_text = Path(job.spec_path).read_text()
        options: dict[str, Any] = {
            "num_cpus": self.cpus,
            "num_gpus": self.gpus,
            "max_retries": 0,
            "retry_exceptions": False,
            "name": f"dino-eval-{job.name}",
        }
        if self.mem_gb:
            options["memory"] = self.mem_gb * 1024**3
        ref = (
            _remote_fn()
            .options(**options)
            .remote(job, spec_text, self.cpus, self.gpus, self.target)
        )
        log.info("started %s as a Ray task (%d CPU, %d GPU)", job.name, self.cpus, self.gpus)
        return _RayHandle(ref, job.name)
