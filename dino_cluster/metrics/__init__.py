"""Metrics: the logging interface and where the numbers go.

sinks.py       MetricsSink (`log(step, values)`, `close()`): metrics.jsonl, console, fan-out
catalogue.py   what is exported, under which name, kind and labels
prometheus.py  a per-rank `/metrics` endpoint (+ Prometheus file-SD targets)
ray_sink.py    the same metrics through Ray's metrics agent (`ray_dino_*`)
store.py       what exporters learn outside the loop: evaluations, commits, restarts
summary.py     what `dino-cluster status RUN` prints beyond the run state

Which sinks a rank runs is decided where the run is assembled (train/assemble.py), from the
spec and what the launcher passes in; nothing here looks at which modules are imported.
"""

from dino_cluster.metrics.sinks import ConsoleSink, JsonlSink, MetricsSink, MultiSink, NullSink

__all__ = ["ConsoleSink", "JsonlSink", "MetricsSink", "MultiSink", "NullSink"]
