"""The same metrics through Ray's metrics system, when a rank runs inside a Ray worker.

Ray's metrics agent on every node exports what `ray.util.metrics` records on its metrics
port (with a `ray_` prefix: `dino_loss` becomes `ray_dino_loss`), beside Ray's own metrics,
so they show up in the Prometheus / Grafana the Ray dashboard is set up with. The Ray
worker that runs a rank creates this sink (launch/ray/worker.py); Ray is imported only then.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from dino_cluster.metrics.catalogue import (
    EVAL_FAILED,
    EVAL_STEP,
    EVAL_TOP1,
    EXPORTED,
    LABELS,
    STEP_SECONDS_BUCKETS,
    CounterTracker,
    RunLabels,
    exported_updates,
)
from dino_cluster.metrics.store import StoreState

log = logging.getLogger(__name__)


class RaySink:
    def __init__(self, labels: RunLabels, *, out_dim: int | None = None) -> None:
        from ray.util import metrics as rm

        self._tags = labels.as_dict()
        self._metrics: dict[str, Any] = {}
        for m in EXPORTED:
            if m.kind == "gauge":
                metric = rm.Gauge(m.name, description=m.help, tag_keys=LABELS)
            elif m.kind == "counter":
                metric = rm.Counter(m.name, description=m.help, tag_keys=LABELS)
            else:
                metric = rm.Histogram(
                    m.name,
                    description=m.help,
                    boundaries=list(STEP_SECONDS_BUCKETS),
                    tag_keys=LABELS,
                )
            metric.set_default_tags(self._tags)
            self._metrics[m.name] = metric
        self._eval_top1 = rm.Gauge(EVAL_TOP1.name, EVAL_TOP1.help, tag_keys=(*LABELS, "kind", "k"))
        self._eval_step = rm.Gauge(EVAL_STEP.name, EVAL_STEP.help, tag_keys=(*LABELS, "kind"))
        self._eval_failed = rm.Gauge(EVAL_FAILED.name, EVAL_FAILED.help, tag_keys=(*LABELS, "kind"))
        self._counters = CounterTracker()
        self._warned = False
        if out_dim:
            self._metrics["dino_log_out_dim"].set(math.log(out_dim))

    def _guard(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("metrics: Ray metrics update failed (further failures not logged): %s", exc)

    def log(self, step: int, values: dict[str, float]) -> None:
        try:
            self._metrics["dino_step"].set(float(step))
            self._metrics["dino_last_log_timestamp_seconds"].set(time.time())
            for m, v in exported_updates(values, self._counters):
                metric = self._metrics[m.name]
                if m.kind == "gauge":
                    metric.set(v)
                elif m.kind == "counter":
                    if v > 0:  # Ray refuses non-positive increments
                        metric.inc(v)
                else:
                    metric.observe(v)
        except Exception as exc:  # noqa: BLE001 - never stop training for a metric
            self._guard(exc)

    def publish_store(self, state: StoreState) -> None:
        try:
            if state.last_step is not None:
                self._metrics["dino_checkpoint_last_committed_step"].set(float(state.last_step))
            if state.last_time is not None:
                self._metrics["dino_checkpoint_last_commit_timestamp_seconds"].set(state.last_time)
            if state.restarts is not None:
                self._metrics["dino_restarts"].set(float(state.restarts))
            for kind, ev in state.evals.items():
                tags = {**self._tags, "kind": kind}
                self._eval_step.set(float(ev.step), tags=tags)
                self._eval_failed.set(1.0 if ev.failed else 0.0, tags=tags)
                for k, top1 in ev.top1_by_k().items():
                    self._eval_top1.set(top1 / 100.0, tags={**tags, "k": k})
        except Exception as exc:  # noqa: BLE001
            self._guard(exc)

    def close(self) -> None:
        pass
