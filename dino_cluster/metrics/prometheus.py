"""Prometheus exporter behind the MetricsSink interface: every rank serves `/metrics`.

Each rank binds `spec.metrics.host:port` (port 0 = any free port; a fixed port P gives local
rank r the port P + r, so every node uses the same small range). The address actually bound
goes into a Prometheus file-SD targets file, RUN/prometheus/targets-rank-N.json (and, when
the operator sets DINO_PROMETHEUS_SD_DIR, a copy named <run>-rank-N.json there, so one
Prometheus glob covers every run). A cleanly finished rank removes its targets file; a
crashed one leaves it behind and its target shows `up == 0`.

Metrics never stop training: a port that cannot be bound falls back to a free port, and a
store that cannot be read is logged and retried.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from dino_cluster.metrics.catalogue import (
    EVAL_FAILED,
    EVAL_STEP,
    EVAL_TOP1,
    EXPORTED,
    LABELS,
    SD_DIR_ENV,
    STEP_SECONDS_BUCKETS,
    CounterTracker,
    RunLabels,
    exported_updates,
)
from dino_cluster.metrics.store import StoreState

log = logging.getLogger(__name__)

_WILDCARD = {"", "0.0.0.0", "::", "[::]"}


def advertised_host(bind_host: str) -> str:
    """The address others should scrape: the bound one, or this node's for a wildcard."""
    if bind_host not in _WILDCARD:
        return bind_host
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def _hostport(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def _write_atomic(path: Path, payload: Any) -> None:
    # Prometheus watches these files: it must never read a half-written one.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


class PrometheusSink:
    """Serves this rank's metrics on host:port from its own registry (never the global one,
    so several sinks can live in one process)."""

    def __init__(
        self,
        labels: RunLabels,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        out_dim: int | None = None,
        targets_files: list[Path] | None = None,
        registry: CollectorRegistry | None = None,
        serve: bool = True,
    ) -> None:
        self.labels = labels
        self._lv = labels.as_dict()
        self.registry = registry or CollectorRegistry()
        # process_start_time_seconds etc.: a change marks a restart of this rank.
        ProcessCollector(registry=self.registry)
        self._metrics: dict[str, Any] = {}
        for m in EXPORTED:
            if m.kind == "gauge":
                metric = Gauge(m.name, m.help, LABELS, registry=self.registry)
            elif m.kind == "counter":
                metric = Counter(m.name, m.help, LABELS, registry=self.registry)
            else:
                metric = Histogram(
                    m.name, m.help, LABELS, buckets=STEP_SECONDS_BUCKETS, registry=self.registry
                )
            self._metrics[m.name] = metric
        self._eval_top1 = Gauge(
            EVAL_TOP1.name, EVAL_TOP1.help, (*LABELS, "kind", "k"), registry=self.registry
        )
        self._eval_step = Gauge(
            EVAL_STEP.name, EVAL_STEP.help, (*LABELS, "kind"), registry=self.registry
        )
        self._eval_failed = Gauge(
            EVAL_FAILED.name, EVAL_FAILED.help, (*LABELS, "kind"), registry=self.registry
        )
        self._lock = threading.Lock()
        self._counters = CounterTracker()
        self._last_ckpt_step: float | None = None
        self._gauge("dino_start_timestamp_seconds").set(time.time())
        if out_dim:
            self._gauge("dino_log_out_dim").set(math.log(out_dim))
        self._server = None
        self.host, self.port = host, port
        self._targets: list[Path] = []
        if serve:
            self._serve(host, port)
            self.write_targets(targets_files or [])

    # ------------------------------------------------------------------ serving
    def _serve(self, host: str, port: int) -> None:
        if host in _WILDCARD:
            log.warning(
                "metrics: serving /metrics on ALL interfaces (%s:%d) because metrics.host is "
                "%r; anyone who can reach this machine can read them",
                host or "0.0.0.0",
                port,
                host,
            )
        try:
            server, _ = start_http_server(port, addr=host or "0.0.0.0", registry=self.registry)
        except OSError as exc:
            if port == 0:
                raise
            log.warning(
                "metrics: cannot bind %s (%s); using a free port instead",
                _hostport(host, port),
                exc,
            )
            server, _ = start_http_server(0, addr=host or "0.0.0.0", registry=self.registry)
        self._server = server
        self.port = int(server.server_address[1])
        log.info("metrics: serving http://%s/metrics", _hostport(advertised_host(host), self.port))

    @property
    def address(self) -> str:
        """host:port that Prometheus should scrape."""
        return _hostport(advertised_host(self.host), self.port)

    @property
    def url(self) -> str:
        return f"http://{self.address}/metrics"

    def write_targets(self, paths: list[Path]) -> None:
        group = [{"targets": [self.address], "labels": self._lv}]
        for path in paths:
            try:
                _write_atomic(path, group)
                self._targets.append(path)
            except OSError as exc:
                log.warning("metrics: could not write the targets file %s: %s", path, exc)

    # ------------------------------------------------------------------ updating
    def _gauge(self, name: str) -> Any:
        return self._metrics[name].labels(**self._lv)

    def log(self, step: int, values: dict[str, float]) -> None:
        with self._lock:
            self._gauge("dino_step").set(step)
            self._gauge("dino_last_log_timestamp_seconds").set(time.time())
            for m, v in exported_updates(values, self._counters):
                child = self._metrics[m.name].labels(**self._lv)
                if m.kind == "gauge":
                    child.set(v)
                elif m.kind == "counter":
                    child.inc(v)
                else:
                    child.observe(v)
            ck = values.get("checkpoint_last_step")
            if ck is not None and ck != self._last_ckpt_step:
                self._last_ckpt_step = ck
                self._gauge("dino_checkpoint_last_commit_timestamp_seconds").set(time.time())

    def publish_store(self, state: StoreState) -> None:
        """Evaluation results, newest committed checkpoint and restarts from the store."""
        with self._lock:
            if state.last_step is not None and (
                self._last_ckpt_step is None or state.last_step >= self._last_ckpt_step
            ):
                self._last_ckpt_step = float(state.last_step)
                self._gauge("dino_checkpoint_last_committed_step").set(state.last_step)
                if state.last_time is not None:
                    self._gauge("dino_checkpoint_last_commit_timestamp_seconds").set(
                        state.last_time
                    )
            if state.restarts is not None:
                self._gauge("dino_restarts").set(state.restarts)
            for kind, ev in state.evals.items():
                self._eval_step.labels(**self._lv, kind=kind).set(ev.step)
                self._eval_failed.labels(**self._lv, kind=kind).set(1.0 if ev.failed else 0.0)
                for k, top1 in ev.top1_by_k().items():
                    self._eval_top1.labels(**self._lv, kind=kind, k=k).set(top1 / 100.0)

    def close(self) -> None:
        for path in self._targets:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass
        self._targets.clear()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def targets_files(run_dir: Path, run_name: str, rank: int) -> list[Path]:
    """Where a rank announces its endpoint: RUN/prometheus/targets-rank-N.json, plus
    $DINO_PROMETHEUS_SD_DIR/<run>-rank-N.json when the operator sets that folder."""
    files = [run_dir / "prometheus" / f"targets-rank-{rank}.json"]
    shared = os.environ.get(SD_DIR_ENV)
    if shared:
        files.append(Path(shared) / f"{run_name}-rank-{rank}.json")
    return files
