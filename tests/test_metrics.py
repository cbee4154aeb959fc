"""Metrics sinks and exporters: the JSONL/console lines, the Prometheus exporter (served on
loopback and scraped over HTTP), file-SD targets, evaluation results read from a real
checkpoint store, `status` summaries, and the Grafana dashboard's metric names."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from dino_cluster.checkpointing import CheckpointManager
from dino_cluster.evaluate.knn import KnnResult
from dino_cluster.evaluate.queue import STATUS, queue_key
from dino_cluster.evaluate.results import EvalResult
from dino_cluster.metrics.catalogue import (
    CounterTracker,
    RunLabels,
    exported_names,
    exported_updates,
)
from dino_cluster.metrics.prometheus import PrometheusSink
from dino_cluster.metrics.sinks import ConsoleSink, JsonlSink
from dino_cluster.metrics.store import StoreState, StoreWatcher, read_store_state
from dino_cluster.metrics.summary import read_last_metrics, render_summary, summarize_run
from dino_cluster.spec import load_spec
from dino_cluster.train.assemble import LaunchHooks, build_exporters
from dino_cluster.train.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
LABELS = RunLabels("r1", 0, "node-a", "local")


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(samples: dict, name: str, **labels: str) -> float:
    found = [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


def _state(step: int) -> dict:
    return {"student": {"w": torch.full((2, 2), float(step))}, "meta": {"step": step}}


# -- the logging interface ----------------------------------------------------------------------


def test_jsonl_and_console_lines_keep_their_format(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "m" / "metrics.jsonl")
    sink.log(3, {"loss": float("nan"), "lr": 1e-3, "center_norm": 0.5})
    sink.close()
    row = json.loads((tmp_path / "m" / "metrics.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == "nan" and row["center_norm"] == 0.5
    console = Console(record=True, width=200)
    ConsoleSink(10, console).log(5, {"epoch": 1, "loss": 2.5, "images_per_s": 12.0})
    line = console.export_text()
    assert line.startswith("step 5/10 (50.0%) epoch 1 loss 2.5000") and "12.0 img/s" in line


def test_counters_turn_running_totals_into_increments() -> None:
    tracker = CounterTracker()
    seen = []
    for total in (2.0, 5.0, 5.0, 1.0):  # 1.0: a smaller total is not a negative increment
        seen += [v for m, v in exported_updates({"skipped_steps": total}, tracker)]
    assert seen == [2.0, 3.0, 0.0, 0.0]
    updates = dict(
        (m.name, v)
        for m, v in exported_updates({"step_time_s": float("nan"), "loss": 1.0}, tracker)
    )
    assert updates == {"dino_loss": 1.0}  # a NaN step time is no histogram observation


# -- the Prometheus exporter --------------------------------------------------------------------


def test_prometheus_sink_serves_labelled_metrics_and_targets(tmp_path: Path) -> None:
    targets = [tmp_path / "run" / "prometheus" / "targets-rank-0.json", tmp_path / "sd" / "r1.json"]
    sink = PrometheusSink(LABELS, out_dim=1024, targets_files=targets)
    try:
        group = json.loads(targets[0].read_text())
        assert group == [{"targets": [f"127.0.0.1:{sink.port}"], "labels": LABELS.as_dict()}]
        assert json.loads(targets[1].read_text()) == group
        assert not list(targets[0].parent.glob(".*tmp"))  # written via a temp file + rename
        sink.log(
            4,
            {
                "loss": float("nan"),
                "skipped_steps": 1.0,
                "step_time_s": 0.3,
                "checkpoint_last_step": 4.0,
                "images_per_s": 120.0,
            },
        )
        sink.log(8, {"loss": 6.5, "skipped_steps": 3.0, "step_time_s": 0.2, "bad_samples": 2.0})
        m = _scrape(sink.url)
        lab = LABELS.as_dict()
        assert _one(m, "dino_loss", **lab) == 6.5
        assert _one(m, "dino_step", **lab) == 8
        assert _one(m, "dino_nonfinite_steps_skipped_total", **lab) == 3.0
        assert _one(m, "dino_bad_samples_total", **lab) == 2.0
        assert _one(m, "dino_step_seconds_count", **lab) == 2
        assert _one(m, "dino_step_seconds_sum", **lab) == pytest.approx(0.5)
        assert _one(m, "dino_step_seconds_bucket", le="0.25", **lab) == 1
        assert _one(m, "dino_log_out_dim", **lab) == pytest.approx(math.log(1024))
        assert _one(m, "dino_checkpoint_last_committed_step", **lab) == 4
        assert _one(m, "dino_checkpoint_last_commit_timestamp_seconds", **lab) > 1e9
        assert _one(m, "dino_images_per_second", **lab) == 120.0
        assert "process_start_time_seconds" in m  # restarts show as a new start time
    finally:
        sink.close()
    assert not targets[0].exists() and not targets[1].exists()


def test_prometheus_sink_exports_a_nan_loss_as_nan() -> None:
    sink = PrometheusSink(LABELS)
    try:
        sink.log(1, {"loss": float("nan")})
        assert math.isnan(_one(_scrape(sink.url), "dino_loss", run="r1"))
    finally:
        sink.close()


def test_taken_port_falls_back_to_a_free_one(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with caplog.at_level(logging.WARNING):
            sink = PrometheusSink(LABELS, port=taken)
        try:
            assert sink.port != taken
            assert _one(_scrape(sink.url), "dino_start_timestamp_seconds", run="r1") > 0
            assert "using a free port" in caplog.text
        finally:
            sink.close()


def test_wildcard_bind_is_announced_and_advertises_a_real_address(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bound = {}

    class FakeServer:
        server_address = ("0.0.0.0", 9123)

        def shutdown(self) -> None: ...

        def server_close(self) -> None: ...

    def fake_start(port: int, addr: str, registry: object) -> tuple[FakeServer, None]:
        bound["addr"] = addr
        return FakeServer(), None

    monkeypatch.setattr("dino_cluster.metrics.prometheus.start_http_server", fake_start)
    with caplog.at_level(logging.WARNING):
        sink = PrometheusSink(LABELS, host="0.0.0.0", port=9123)
    assert bound["addr"] == "0.0.0.0"
    assert "ALL interfaces" in caplog.text
    assert not sink.address.startswith("0.0.0.0") and sink.address.endswith(":9123")
    sink.close()


def _free_pair() -> int:
    """A port p with p and p+1 free on loopback."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", p + 1))
                except OSError:
                    continue
                return p
    pytest.fail("no free port pair")


def test_fixed_port_is_offset_by_local_rank_and_targets_name_the_rank(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = _free_pair()
    monkeypatch.setenv("DINO_PROMETHEUS_SD_DIR", str(tmp_path / "sd"))
    spec = load_spec(
        REPO / "jobs" / "quickstart.yaml",
        [
            f"run.dir={tmp_path}",
            "run.name=fixed",
            "metrics.prometheus=true",
            f"metrics.port={base}",
            "model.out_dim=256",
        ],
    )
    info = DistInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    sinks = build_exporters(spec, info, LaunchHooks())
    try:
        assert [type(s).__name__ for s in sinks] == ["PrometheusSink"]
        assert sinks[0].port == base + 1
        group = json.loads((tmp_path / "fixed" / "prometheus" / "targets-rank-1.json").read_text())
        assert group[0]["targets"] == [f"127.0.0.1:{base + 1}"]
        assert group[0]["labels"]["rank"] == "1" and group[0]["labels"]["run"] == "fixed"
        assert (tmp_path / "sd" / "fixed-rank-1.json").exists()
    finally:
        for s in sinks:
            s.close()


def test_exporters_are_what_the_spec_and_the_launcher_ask_for(tmp_path: Path) -> None:
    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"run.dir={tmp_path}"])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert build_exporters(spec, info, LaunchHooks()) == []
    launcher_sink = SimpleNamespace(name="from the launcher")
    assert build_exporters(spec, info, LaunchHooks(exporters=[launcher_sink])) == [launcher_sink]


# -- evaluation results, checkpoints and restarts from the store --------------------------------


# What dino_cluster.evaluate.knn records next to a checkpoint: percentages, a headline k.
KNN_RESULT = KnnResult(
    by_k={10: (70.0, 96.5), 20: (71.25, 97.0), 200: (65.5, 95.0)},
    n_train=1000,
    n_val=200,
    num_classes=10,
    temperature=0.07,
).as_results()


def test_the_newest_result_of_each_kind_wins_and_failures_count() -> None:
    from dino_cluster.evaluate.results import newest_by_kind
    from dino_cluster.metrics.store import checkpoint_results

    infos = [
        SimpleNamespace(step=10, evals={"knn": KNN_RESULT}),
        SimpleNamespace(step=5, evals={"knn": KNN_RESULT, "linear": {"top1": 70.0}}),
        SimpleNamespace(step=12, evals={"linear": {"top1": {"20": 0.5}}}),  # not our layout
    ]
    latest = newest_by_kind(checkpoint_results(infos))
    assert latest["knn"].step == 10 and latest["knn"].top1_by_k()["20"] == 71.25
    assert latest["linear"].step == 12 and latest["linear"].failed
    assert "unreadable result" in latest["linear"].error


def test_store_state_from_a_real_checkpoint_store_feeds_the_exporter(tmp_path: Path) -> None:
    store = tmp_path / "ckpt"
    with CheckpointManager(str(store)) as mgr:
        mgr.save(2, _state(2), blocking=True)
        mgr.save(4, _state(4), blocking=True)
    mgr = CheckpointManager(str(store), is_writer=False)
    mgr.record_eval(2, "knn", {"k": 20, "top1": 62.5, "info": {}})
    (tmp_path / "run" / "slurm").mkdir(parents=True)
    (tmp_path / "run" / "slurm" / "requeues.json").write_text(json.dumps({"requeues": 3}))
    state = read_store_state(mgr, tmp_path / "run")
    assert (state.last_step, state.restarts) == (4, 3)
    assert state.last_time and state.evals["knn"].top1_by_k() == {"20": 62.5}

    sink = PrometheusSink(LABELS)
    try:
        watcher = StoreWatcher(lambda: read_store_state(mgr, tmp_path / "run"), sink.publish_store)
        watcher.poll_once()
        m = _scrape(sink.url)
        assert _one(m, "dino_eval_top1", kind="knn", k="20") == 0.625
        assert _one(m, "dino_eval_checkpoint_step", kind="knn") == 2
        assert _one(m, "dino_eval_failed", kind="knn") == 0
        assert _one(m, "dino_checkpoint_last_committed_step", run="r1") == 4
        assert _one(m, "dino_restarts", run="r1") == 3
        # The evaluation queue gives up on a later checkpoint: the failure gauge goes up.
        key = queue_key("knn", 4, STATUS)
        doc = {"state": "failed", "attempts": 3, "errors": ["boom", "val shards unreadable"]}
        mgr.store.write_bytes(key, json.dumps(doc).encode())
        mgr.store.write_bytes(queue_key("knn", 2, STATUS), b'{"state": "done"}')
        watcher.poll_once()
        m = _scrape(sink.url)
        assert _one(m, "dino_eval_failed", kind="knn") == 1
        assert _one(m, "dino_eval_checkpoint_step", kind="knn") == 4
        assert read_store_state(mgr).evals["knn"].error == "val shards unreadable"
        # ... and a result recorded for a still later checkpoint clears it.
        with CheckpointManager(str(store)) as writer:
            writer.save(6, _state(6), blocking=True)
        mgr.record_eval(6, "knn", KNN_RESULT)
        watcher.poll_once()
        m = _scrape(sink.url)
        assert _one(m, "dino_eval_failed", kind="knn") == 0
        assert _one(m, "dino_eval_top1", kind="knn", k="200") == pytest.approx(0.655)
    finally:
        sink.close()


def test_store_watcher_survives_read_errors(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[StoreState] = []

    def failing() -> StoreState:
        raise ConnectionError("endpoint down")

    watcher = StoreWatcher(failing, calls.append, interval_s=0.01)
    with caplog.at_level(logging.WARNING):
        watcher.poll_once()
        watcher.poll_once()
    assert watcher.polls == 2 and calls == []
    assert caplog.text.count("endpoint down") == 1  # logged once, not every poll


# -- `dino-cluster status` ----------------------------------------------------------------------


def test_run_summary_reads_metrics_log_and_store(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = [
        {
            "step": s,
            "time": 1000.0 + s,
            "epoch": 0,
            "loss": 9.0 - s,
            "images_per_s": 50.0,
            "data_wait_frac": 0.25,
        }
        for s in (10, 20)
    ]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 30, "lo'  # being written
    (run_dir / "metrics.jsonl").write_text(text)
    with CheckpointManager(str(tmp_path / "ckpt")) as mgr:
        mgr.save(20, _state(20), blocking=True)
        mgr.record_eval(20, "knn", KNN_RESULT)
    (run_dir / "prometheus").mkdir()
    (run_dir / "prometheus" / "targets-rank-0.json").write_text(
        json.dumps([{"targets": ["127.0.0.1:9000"], "labels": {"rank": "0"}}])
    )
    summary = summarize_run(run_dir, checkpoints=CheckpointManager(str(tmp_path / "ckpt")))
    assert summary.step == 20 and summary.checkpoint_step == 20
    out = render_summary(summary, now=1030.0)
    assert "progress: step 20  epoch 0  loss -11.0000  50.0 img/s  data wait 25%" in out
    assert "(logged 10 s ago)" in out
    assert "last checkpoint: step 20" in out
    assert "last eval: step 20 knn top1 71.25 top5 97.00 (k=20)" in out
    assert "metrics: http://127.0.0.1:9000/metrics (rank 0)" in out


def test_run_summary_without_store_or_metrics_still_renders(tmp_path: Path) -> None:
    summary = summarize_run(tmp_path)
    assert summary.metrics is None and summary.problems
    out = render_summary(summary)
    assert "progress: no step logged yet" in out and "note: checkpoints not readable" in out
    (tmp_path / "metrics.jsonl").write_text('{"step": 5, "loss": "nan"}\n')
    assert read_last_metrics(tmp_path / "metrics.jsonl") == {"step": 5, "loss": "nan"}
    assert "loss nan" in render_summary(summarize_run(tmp_path))


# -- Grafana ------------------------------------------------------------------------------------


def _registry_names() -> set[str]:
    """Series names the exporter really emits once every metric has a value."""
    from dino_cluster.metrics.catalogue import EXPORTED

    sink = PrometheusSink(LABELS, out_dim=16, serve=False)
    sink.log(1, {m.key: 1.0 for m in EXPORTED if m.key})
    sink.publish_store(StoreState(1, 1.0, {"knn": EvalResult("knn", 1, 50.0, k=20)}, restarts=1))
    return {s.name for fam in sink.registry.collect() for s in fam.samples}


def test_catalogue_matches_the_registry() -> None:
    sink = PrometheusSink(LABELS, serve=False)
    families = {f.name for f in sink.registry.collect() if f.name.startswith("dino_")}
    assert families == exported_names(with_suffixes=False)
    emitted = {n for n in _registry_names() if n.startswith("dino_")}
    assert emitted == exported_names()  # every catalogued series is emitted, nothing else
    assert {"dino_loss", "dino_step_seconds_bucket", "dino_bad_samples_total"} <= emitted


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    dash = json.loads((REPO / "infra" / "grafana" / "dino-cluster.json").read_text())
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
    used = {n for e in exprs for n in re.findall(r"\b(dino_[a-z0-9_]+)", e)}
    known = _registry_names()
    assert used and used <= known, sorted(used - known)
    others = {n for e in exprs for n in re.findall(r"\b([a-z_]+)\{", e)} - used
    assert others <= {"up"}, others
    # The panels the issue asks for are all there.
    for name in (
        "dino_loss",
        "dino_images_per_second",
        "dino_data_wait_ratio",
        "dino_teacher_entropy",
        "dino_checkpoint_last_committed_step",
        "dino_eval_top1",
        "dino_step_seconds_bucket",
    ):
        assert name in used, name


def test_podmonitors_select_kuberay_head_and_worker_pods() -> None:
    docs = list(yaml.safe_load_all((REPO / "infra" / "k8s" / "podmonitor-ray.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"PodMonitor"}
    roles = {d["spec"]["selector"]["matchLabels"]["ray.io/node-type"] for d in docs}
    assert roles == {"head", "worker"}
    for d in docs:
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        ports = [e["port"] for e in d["spec"]["podMetricsEndpoints"]]
        assert "metrics" in ports  # KubeRay's name for Ray's metrics-export port


def test_submit_hint_says_where_metrics_are_served(tmp_path: Path) -> None:
    from dino_cluster.metrics.summary import metrics_hint

    quick = REPO / "jobs" / "quickstart.yaml"
    assert metrics_hint(load_spec(quick, [f"run.dir={tmp_path}"])) is None
    on = load_spec(quick, [f"run.dir={tmp_path}", "metrics.prometheus=true", "metrics.port=9400"])
    hint = metrics_hint(on)
    assert "127.0.0.1:9400+local rank" in hint
    assert str(tmp_path / "quickstart" / "prometheus" / "targets-rank-N.json") in hint
