"""KubeRay backend: render a RayJob (ray.io/v1) for a job spec and apply it with kubectl.

The rendered documents are
  1. a ConfigMap holding the resolved job spec (no credentials are ever in a spec), and
  2. a RayJob whose RayCluster has a head group (runs the Ray Train driver, no training
     workers) and one worker group: one pod per node, `nvidia.com/gpu` limits of
     `launcher.gpus_per_node`, replicas from `launcher.nodes` or, for an elastic range
     `launcher.workers {min, max}`, min/max pods = ceil(workers / GPUs per pod) with the
     KubeRay autoscaler on, so Ray Train's elastic worker range can grow and shrink.

Image and Ray version. The pods run `python -m dino_cluster.launch.ray.driver`, so the image
must contain dino-cluster as well as Ray: `launcher.kuberay.image` is required and the stock
rayproject/ray images are refused (they have no dino-cluster; a RayJob with one would only
fail in the cluster, minutes later). `rayVersion` is the Ray inside that image:
`launcher.kuberay.ray_version`, else the Ray installed here (read from its package metadata,
without importing Ray), which the image is expected to match. It is never guessed from the
image tag: tags carry whatever the builder chose (our own version, dates, ...).

Object-store credentials appear only as a reference to an existing Secret
(`kuberay.s3_secret_name`, via envFrom) or through workload identity (the pods' service
account); never as values. Every pod carries the labels a PodMonitor selects on
(infra/k8s/podmonitor-ray.yaml): `app.kubernetes.io/part-of: dino-cluster` and
`dino-cluster/run: <run name>`.

Metrics ports. With `metrics.prometheus`, every rank serves its own /metrics on
`metrics.port + local rank` (dino_cluster.train.assemble.build_exporters). The worker
container declares one port per local rank, `dino-metrics-<r>` = `metrics.port + r` for
r in 0 .. ranks per pod - 1, and the PodMonitor has one endpoint per such name, so every rank
is its own scrape target. Chosen over one exporter per pod that serves all ranks: the ranks
are Ray Train workers, separate processes that Ray starts, restarts and resizes, with no
process of ours on the pod that outlives them to own a pod-wide server (and a shared
multiprocess registry would need cleaning after every restart); per-rank ports need nothing
new in the ranks and keep `up` per rank, so a dead rank is its own down target. Kubernetes
port names are at most 15 characters (`dino-metrics-99`), hence at most 100 ranks per pod.
In the pods a spec's `metrics.port: 0` (a free port per rank) becomes the default port, so
the ranks bind the declared ports; a loopback `metrics.host` is refused, since nothing
outside the pod could scrape it (binding all interfaces is the operator's choice to make).
Ray's own metrics port (`metrics`, 8080) is declared on every pod.
"""

from __future__ import annotations

import importlib.metadata
import ipaddress
import math
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from dino_cluster.launch.base import LaunchError, SubmitResult
from dino_cluster.launch.run_record import KubeRayRecord, read_record, write_record
from dino_cluster.spec import JobSpec, spec_from_dict

if TYPE_CHECKING:
    from dino_cluster.evaluate.submit import EvalHandle, EvalJob

PART_OF = "dino-cluster"
RUN_LABEL = "dino-cluster/run"
SPEC_DIR = "/etc/dino-cluster"
POD_RUN_DIR = "/tmp/dino-cluster/runs"
DEFAULT_METRICS_PORT = 9464
RAY_METRICS_PORT = 8080
METRICS_PORT_PREFIX = "dino-metrics-"  # + local rank
MAX_RANKS_PER_POD = 100  # port names are <= 15 characters: dino-metrics-99
RAY_METRICS_PORT_NAME = "metrics"  # the name KubeRay itself gives this port
# Ray's default worker port range (ray start --min-worker-port/--max-worker-port): a rank's
# metrics port in it could be taken by a Ray worker first.
RAY_WORKER_PORTS = range(10002, 20000)
# Images that carry Ray but not dino-cluster (docker.io/rayproject/...).
STOCK_RAY_IMAGES = frozenset({"rayproject/ray", "rayproject/ray-ml", "rayproject/ray-llm"})


def k8s_name(run_name: str, prefix: str = "dino-", max_len: int = 40) -> str:
    """A DNS-1123 name from a run name (KubeRay derives longer names from a RayJob's, so
    it is kept short)."""
    base = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-") or "run"
    return (prefix + base)[:max_len].rstrip("-")


def label_value(text: str) -> str:
    """A valid label value: <= 63 characters, alphanumeric at both ends."""
    value = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)[:63]
    return re.sub(r"^[^A-Za-z0-9]+|[^A-Za-z0-9]+$", "", value) or "run"


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def pod_spec(spec: JobSpec) -> JobSpec:
    """The spec as the pods see it: local run folder inside the pod, no Ray address (the
    driver joins the RayCluster it runs in)."""
    doc: dict[str, Any] = spec.model_dump(mode="json")
    doc["run"]["dir"] = POD_RUN_DIR
    doc["launcher"]["backend"] = "kuberay"
    doc["launcher"]["ray"]["address"] = None
    if not doc["metrics"]["port"]:
        # The containers declare fixed ports: the ranks must bind exactly those.
        doc["metrics"]["port"] = DEFAULT_METRICS_PORT
    return spec_from_dict(doc, "<kuberay spec>")


def _is_stock_ray_image(image: str) -> bool:
    name = image.split("@", 1)[0]  # no digest
    head, _, last = name.rpartition("/")
    name = f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]  # no tag
    for registry in ("docker.io/", "index.docker.io/", "registry-1.docker.io/"):
        name = name.removeprefix(registry)
    return name in STOCK_RAY_IMAGES


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_image(spec: JobSpec) -> str:
    """The worker and head image; one that cannot hold dino-cluster is refused."""
    image = spec.launcher.kuberay.image
    if not image:
        raise LaunchError(
            "kuberay: launcher.kuberay.image is not set: name your image, which must contain "
            "dino-cluster and Ray (the stock rayproject/ray images have no dino-cluster; see "
            "infra/k8s/README.md)"
        )
    if _is_stock_ray_image(image):
        raise LaunchError(
            f"kuberay: launcher.kuberay.image {image!r} is a stock Ray image without "
            "dino-cluster: the image must contain dino-cluster and Ray (build one FROM it, "
            "see infra/k8s/README.md)"
        )
    return image


def ray_version(spec: JobSpec) -> str:
    """The RayCluster's rayVersion: the spec's, else the Ray installed here."""
    version = spec.launcher.kuberay.ray_version
    if version:
        return version
    try:
        # Package metadata only: importing Ray takes seconds and changes process state.
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:
        raise LaunchError(
            "kuberay: launcher.kuberay.ray_version is not set and Ray is not installed here: "
            "set it to the Ray version inside launcher.kuberay.image (e.g. 2.60.0)"
        ) from None


def ranks_per_pod(spec: JobSpec) -> int:
    lc = spec.launcher
    return lc.gpus_per_node if lc.gpus_per_node else lc.procs_per_node


def metrics_ports(spec: JobSpec) -> list[tuple[str, int]]:
    """(name, port) of every local rank's exporter on a worker pod; none without
    `metrics.prometheus`. Local rank r binds metrics.port + r (build_exporters)."""
    if not spec.metrics.prometheus:
        return []
    base = spec.metrics.port or DEFAULT_METRICS_PORT  # what pod_spec gives the ranks
    n = ranks_per_pod(spec)
    return [(f"{METRICS_PORT_PREFIX}{r}", base + r) for r in range(n)]


def _check_metrics(spec: JobSpec) -> None:
    if not spec.metrics.prometheus:
        return
    if _is_loopback(spec.metrics.host):
        raise LaunchError(
            f"kuberay: metrics.host {spec.metrics.host!r} is loopback inside the pod, so "
            "Prometheus cannot scrape the ranks: set metrics.host: 0.0.0.0 (or "
            "metrics.prometheus: false)"
        )
    n = ranks_per_pod(spec)
    if n > MAX_RANKS_PER_POD:
        raise LaunchError(
            f"kuberay: {n} ranks per pod need {n} metrics ports, more than the "
            f"{MAX_RANKS_PER_POD} that fit in Kubernetes port names; set "
            "metrics.prometheus: false or use fewer ranks per node"
        )
    ports = [p for _, p in metrics_ports(spec)]
    lo, hi = ports[0], ports[-1]
    clash = hi > 65535 or lo <= RAY_METRICS_PORT <= hi
    clash = clash or not (hi < RAY_WORKER_PORTS.start or lo >= RAY_WORKER_PORTS.stop)
    if clash:
        raise LaunchError(
            f"kuberay: metrics ports {lo}-{hi} (metrics.port + local rank) must stay below "
            f"65536 and clear of Ray's metrics port {RAY_METRICS_PORT} and worker ports "
            f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}: choose another metrics.port"
        )


def check_spec(spec: JobSpec) -> None:
    """Refuse specs that cannot work on Kubernetes (say why, submit nothing)."""
    check_image(spec)
    durable = spec.checkpoint.url or spec.run.storage
    if not durable or _is_local(durable):
        raise LaunchError(
            "kuberay: checkpoints must go to an object store that outlives the pods: set "
            "run.storage (e.g. s3://bucket/dino-runs) or checkpoint.url to an s3:// URL"
        )
    if _is_local(spec.data.url):
        raise LaunchError(
            f"kuberay: data.url {spec.data.url!r} is a local path; the pods need shards in an "
            "object store (s3://...)"
        )
    _check_metrics(spec)


def _labels(spec: JobSpec, component: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": "dino-cluster",
        "app.kubernetes.io/part-of": PART_OF,
        "app.kubernetes.io/instance": label_value(spec.run.name),
        RUN_LABEL: label_value(spec.run.name),
    }
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def worker_replicas(spec: JobSpec) -> tuple[int, int, int]:
    """(replicas, minReplicas, maxReplicas) in pods: one pod per node."""
    lc = spec.launcher
    per_pod = ranks_per_pod(spec)
    if lc.workers is None:
        return lc.nodes, lc.nodes, lc.nodes
    lo = math.ceil(lc.workers.min / per_pod)
    hi = math.ceil(lc.workers.max / per_pod)
    return lo, lo, hi


def _credentials_env(spec: JobSpec) -> dict[str, Any]:
    kr = spec.launcher.kuberay
    out: dict[str, Any] = {}
    if kr.s3_secret_name:
        # A reference: the values stay in the cluster's Secret.
        out["envFrom"] = [{"secretRef": {"name": kr.s3_secret_name}}]
    return out


def _shm_volume() -> tuple[dict[str, Any], dict[str, Any]]:
    # NCCL and data-loader workers use shared memory; a container's default /dev/shm is 64 MB.
    return (
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "dshm", "mountPath": "/dev/shm"},
    )


def _head_group(spec: JobSpec, configmap: str) -> dict[str, Any]:
    kr = spec.launcher.kuberay
    shm_vol, shm_mount = _shm_volume()
    resources = {"cpu": str(kr.head_cpus), "memory": f"{kr.head_memory_gb}Gi"}
    container: dict[str, Any] = {
        "name": "ray-head",
        "image": check_image(spec),
        "ports": [
            {"containerPort": 6379, "name": "gcs-server"},
            {"containerPort": 8265, "name": "dashboard"},
            {"containerPort": 10001, "name": "client"},
            {"containerPort": RAY_METRICS_PORT, "name": RAY_METRICS_PORT_NAME},
        ],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        **_credentials_env(spec),
        "volumeMounts": [{"name": "dino-spec", "mountPath": SPEC_DIR, "readOnly": True}, shm_mount],
    }
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "dino-spec", "configMap": {"name": configmap}}, shm_vol],
    }
    if kr.service_account:
        pod["serviceAccountName"] = kr.service_account
    return {
        # The head runs the driver only: no CPUs for training workers there.
        "rayStartParams": {
            "num-cpus": "0",
            "dashboard-host": "0.0.0.0",
            "metrics-export-port": str(RAY_METRICS_PORT),
        },
        "template": {"metadata": {"labels": _labels(spec, "head")}, "spec": pod},
    }


def _worker_group(spec: JobSpec) -> dict[str, Any]:
    lc, kr = spec.launcher, spec.launcher.kuberay
    replicas, lo, hi = worker_replicas(spec)
    cpus = ranks_per_pod(spec) * lc.cpus_per_worker
    limits: dict[str, Any] = {"cpu": str(cpus)}
    requests: dict[str, Any] = {"cpu": str(cpus)}
    if kr.worker_memory_gb:
        limits["memory"] = requests["memory"] = f"{kr.worker_memory_gb}Gi"
    if lc.gpus_per_node:
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = lc.gpus_per_node
    shm_vol, shm_mount = _shm_volume()
    # One port per local rank: each rank's exporter is its own PodMonitor target.
    ports = [{"containerPort": port, "name": name} for name, port in metrics_ports(spec)]
    ports.append({"containerPort": RAY_METRICS_PORT, "name": RAY_METRICS_PORT_NAME})
    container: dict[str, Any] = {
        "name": "ray-worker",
        "image": check_image(spec),
        "ports": ports,
        "resources": {"requests": requests, "limits": limits},
        **_credentials_env(spec),
        "volumeMounts": [shm_mount],
    }
    pod: dict[str, Any] = {"containers": [container], "volumes": [shm_vol]}
    if kr.service_account:
        pod["serviceAccountName"] = kr.service_account
    if kr.node_selector:
        pod["nodeSelector"] = dict(kr.node_selector)
    if kr.tolerations:
        pod["tolerations"] = [dict(t) for t in kr.tolerations]
    return {
        "groupName": "gpu-workers" if lc.gpus_per_node else "cpu-workers",
        "replicas": replicas,
        "minReplicas": lo,
        "maxReplicas": hi,
        "rayStartParams": {"metrics-export-port": str(RAY_METRICS_PORT)},
        "template": {"metadata": {"labels": _labels(spec, "worker")}, "spec": pod},
    }


def manifests(spec: JobSpec) -> list[dict[str, Any]]:
    """The ConfigMap and RayJob documents for a spec."""
    check_spec(spec)
    kr = spec.launcher.kuberay
    pspec = pod_spec(spec)
    name = k8s_name(spec.run.name)
    configmap_name = f"{name}-spec"
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": configmap_name,
            "namespace": kr.namespace,
            "labels": _labels(spec, "spec"),
        },
        "data": {"spec.resolved.yaml": pspec.to_yaml()},
    }
    # The Ray inside the image; KubeRay picks version-dependent behaviour from it.
    cluster: dict[str, Any] = {"rayVersion": ray_version(spec)}
    if spec.launcher.workers is not None:
        # Pods come and go between min and max as Ray Train's elastic range asks for them.
        cluster["enableInTreeAutoscaling"] = True
    cluster["headGroupSpec"] = _head_group(spec, configmap_name)
    cluster["workerGroupSpecs"] = [_worker_group(spec)]
    python = shlex.quote(spec.launcher.python or "python")  # the image's, unless named
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": kr.namespace, "labels": _labels(spec, "job")},
        "spec": {
            "entrypoint": (
                f"{python} -m dino_cluster.launch.ray.driver "
                f"--spec {SPEC_DIR}/spec.resolved.yaml --address auto"
            ),
            # The driver restarts failed worker groups itself (launcher.ray.max_failures)
            # and resumes from the object store; a new RayJob attempt would do the same.
            "backoffLimit": 0,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": kr.ttl_seconds_after_finished,
            "rayClusterSpec": cluster,
        },
    }
    return [configmap, rayjob]


HEADER = """\
# dino-cluster: KubeRay RayJob for run {run!r}
# Rendered by `dino-cluster render SPEC --backend kuberay`; do not edit by hand.
# Apply: kubectl apply -f FILE (needs the KubeRay operator >= 1.1 and an image with
# dino-cluster installed). Object-store credentials: Secret {secret} by reference, or
# the service account's workload identity; no credential values are in this file.
"""


class _Dumper(yaml.SafeDumper):
    """Safe YAML, with multi-line strings (the embedded spec) as readable literal blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def render_yaml(spec: JobSpec) -> str:
    docs = manifests(spec)
    secret = (
        repr(spec.launcher.kuberay.s3_secret_name)
        if spec.launcher.kuberay.s3_secret_name
        else "(none)"
    )
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100) for d in docs)
    return HEADER.format(run=spec.run.name, secret=secret) + "---\n" + body


def _kubeconfig() -> str | None:
    paths = os.environ.get("KUBECONFIG")
    candidates = paths.split(os.pathsep) if paths else [str(Path.home() / ".kube" / "config")]
    for p in candidates:
        if p and Path(p).is_file():
            return p
    return None


def _kubectl(
    args: list[str], *, stdin: str | None = None, check: bool = True, capture: bool = True
) -> subprocess.CompletedProcess:
    exe = shutil.which("kubectl")
    if exe is None:
        raise LaunchError(
            "kuberay: kubectl is not on PATH (install it, or render the manifest "
            "with `dino-cluster render --backend kuberay` and apply it yourself)"
        )
    proc = subprocess.run(
        [exe, *args], input=stdin, text=True, capture_output=capture, timeout=300, check=False
    )
    if check and proc.returncode != 0:
        raise LaunchError(
            f"kubectl {' '.join(args[:2])} failed: "
            f"{(proc.stderr or proc.stdout or '').strip()[-2000:]}"
        )
    return proc


# RayJob .status.jobStatus -> the words `dino-cluster status` uses for every backend.
STATUS_WORDS = {
    "": "pending",
    "PENDING": "pending",
    "RUNNING": "running",
    "SUCCEEDED": "completed",
    "FAILED": "failed",
    "STOPPED": "stopped",
}


class KubeRayBackend:
    name = "kuberay"

    def render(self, spec: JobSpec) -> str:
        return render_yaml(spec)

    def submit(self, spec: JobSpec, *, detach: bool = False, dry_run: bool = False) -> SubmitResult:
        text = render_yaml(spec)
        run_dir = spec.run_dir
        if dry_run:
            return SubmitResult(str(run_dir), status="dry-run", message=text)
        if _kubeconfig() is None:
            raise LaunchError(
                "kuberay: no kubeconfig found (KUBECONFIG or ~/.kube/config): nothing was "
                "submitted. Point KUBECONFIG at your cluster, or use --dry-run / `dino-cluster "
                "render --backend kuberay` and apply the manifest yourself"
            )
        _kubectl(["apply", "-f", "-"], stdin=text)
        name, ns = k8s_name(spec.run.name), spec.launcher.kuberay.namespace
        write_record(run_dir, KubeRayRecord(name=name, namespace=ns))
        result = SubmitResult(str(run_dir), job_id=f"{ns}/{name}", status="submitted")
        if not detach:
            self.logs(run_dir, follow=True)
            result.status = self.status(run_dir)
        return result

    def status(self, run_dir: Path) -> str:
        rec = read_record(run_dir, "kuberay")
        proc = _kubectl(
            [
                "get",
                "rayjob",
                rec.name,
                "-n",
                rec.namespace,
                "-o",
                "jsonpath={.status.jobStatus}",
            ]
        )
        raw = proc.stdout.strip()
        return STATUS_WORDS.get(raw, raw.lower())

    def logs(self, run_dir: Path, *, follow: bool = False, rank: int | None = None) -> None:
        rec = read_record(run_dir, "kuberay")
        # The RayJob's submitter Job (same name) streams the driver's output.
        args = ["logs", f"job/{rec.name}", "-n", rec.namespace]
        if follow:
            args.append("--follow")
        _kubectl(args, capture=False)

    def failure(self, run_dir: Path) -> str | None:
        """The RayJob's logs say why (`dino-cluster logs RUN`); kubectl has no one-liner."""
        return None

    def cancel(self, run_dir: Path) -> None:
        rec = read_record(run_dir, "kuberay")
        # Deleting the RayJob stops the driver and tears the RayCluster down; the run resumes
        # from its last committed checkpoint when submitted again.
        _kubectl(["delete", "rayjob", rec.name, "-n", rec.namespace])

    def submit_eval(
        self, job: EvalJob, spec: JobSpec, run_dir: Path, *, address: str | None = None
    ) -> EvalHandle:
        """A Ray task on the RayCluster (the driver in the cluster does this itself; from
        outside, `address` must reach the cluster's GCS)."""
        from dino_cluster.launch.ray.evaluations import submit_task

        if address is None:
            raise LaunchError(
                "evaluations of a KubeRay run are started by its driver on the cluster; to "
                "start them from here pass --address HOST:PORT (the RayCluster's GCS) or use "
                "--backend local|slurm"
            )
        return submit_task(job, spec, address=address)


def main(argv: list[str] | None = None) -> int:
    """`python -m dino_cluster.launch.kuberay SPEC [OUT]`: write the rendered manifest
    (used to regenerate infra/k8s/vitb8-rayjob.yaml)."""
    import sys

    from dino_cluster.spec import SpecError, load_spec

    args = sys.argv[1:] if argv is None else argv
    if not args or len(args) > 2:
        print("usage: python -m dino_cluster.launch.kuberay SPEC [OUT]", file=sys.stderr)
        return 2
    try:
        text = render_yaml(load_spec(args[0]))
    except (LaunchError, SpecError) as exc:
        print(f"error: {exc}", file=sys.stderr)  # one line, as `dino-cluster render` says it
        return 1
    if len(args) == 2:
        Path(args[1]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
