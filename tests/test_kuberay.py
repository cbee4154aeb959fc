"""KubeRay rendering, validated offline: the RayJob against KubeRay's own CRD schema (after
API-server style defaulting), core kinds with kubernetes-validate --strict, rayVersion, the
image requirement, a metrics port per local rank that the shipped PodMonitor scrapes, no
credential values anywhere, and the infra/k8s example kept up to date."""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import os
import re
import stat
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dino_cluster.launch import kuberay
from dino_cluster.launch.base import LaunchError
from dino_cluster.launch.kuberay import (
    KubeRayBackend,
    k8s_name,
    label_value,
    main,
    manifests,
    render_yaml,
)
from dino_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).parent / "data" / "kuberay"
EXAMPLE = REPO / "infra" / "k8s" / "vitb8-rayjob.yaml"
PODMONITOR = REPO / "infra" / "k8s" / "podmonitor-ray.yaml"
IMAGE = "registry.example.com/ml/dino-cluster:0.1.0-ray2.60-gpu"


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 2 MB of YAML
    out = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=loader):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                out[(f"{group}/{version['name']}", kind)] = version["schema"]["openAPIV3Schema"]
    return out


def fill_defaults(obj: Any, schema: dict) -> None:
    """What the API server does before validating: fill fields that have a `default:`."""
    if isinstance(obj, dict):
        for key, sub in schema.get("properties", {}).items():
            if key not in obj and "default" in sub:
                obj[key] = copy.deepcopy(sub["default"])
            if key in obj:
                fill_defaults(obj[key], sub)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            fill_defaults(item, schema["items"])


def unknown_fields(obj: Any, schema: dict, path: str = "") -> list[str]:
    """Strict field validation (kubectl --validate=strict): keys the schema does not know."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, value in obj.items():
            found += unknown_fields(value, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def crd_errors(doc: dict) -> list[str]:
    schema = crd_schemas().get((doc["apiVersion"], doc["kind"]))
    assert schema is not None, f"no CRD schema for {doc['apiVersion']} {doc['kind']}"
    doc = copy.deepcopy(doc)
    fill_defaults(doc, schema)
    validator = jsonschema.Draft202012Validator(schema)  # x-kubernetes-* keywords ignored
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]
    return errors + [f"{p}: unknown field" for p in unknown_fields(doc, schema)]


def _spec(*extra: str, job: str = "vitb8"):
    return load_spec(REPO / "jobs" / f"{job}.yaml", list(extra))


# name -> (job file, --set items)
SPECS: dict[str, tuple[str, list[str]]] = {
    "vitb8-elastic": ("vitb8", []),
    "vitb8-fixed-secret": (
        "vitb8",
        [
            "launcher.workers=null",
            "launcher.kuberay.s3_secret_name=dino-s3",
            "launcher.kuberay.worker_memory_gb=480",
        ],
    ),
    "cpu-workers": (
        "vitb8",
        [
            "launcher.gpus_per_node=0",
            "launcher.procs_per_node=4",
            "launcher.nodes=2",
            "launcher.workers=null",
            "launcher.kuberay.node_selector={}",
            "launcher.kuberay.tolerations=[]",
            "launcher.kuberay.service_account=null",
            "launcher.kuberay.image=registry.example.com/dino:latest",
        ],
    ),
    # jobs/vits16.yaml names no image: with one given on the command line it renders.
    "vits16-image-set": (
        "vits16",
        [
            "launcher.kuberay.image=registry.example.com/ml/dino-cluster:0.1.0",
            "launcher.kuberay.ray_version=2.60.0",
        ],
    ),
}


def _named(name: str):
    job, extra = SPECS[name]
    return _spec(*extra, job=job)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_rayjob_validates_against_the_kuberay_crd(name: str) -> None:
    docs = manifests(_named(name))
    kinds = [(d["apiVersion"], d["kind"]) for d in docs]
    assert kinds == [("v1", "ConfigMap"), ("ray.io/v1", "RayJob")]
    rayjob = docs[1]
    assert crd_errors(rayjob) == []
    # The embedded RayCluster spec is also a valid RayCluster on its own.
    cluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": rayjob["metadata"]["name"]},
        "spec": rayjob["spec"]["rayClusterSpec"],
    }
    assert crd_errors(cluster) == []


def test_core_kinds_and_pod_templates_pass_kubernetes_validate_strict() -> None:
    import kubernetes_validate

    for name in SPECS:
        configmap, rayjob = manifests(_named(name))
        kubernetes_validate.validate(configmap, "1.30.0", strict=True)
        cluster = rayjob["spec"]["rayClusterSpec"]
        templates = [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]
        for i, template in enumerate(templates):
            doc = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"t{i}", "namespace": "ml"},
                "template": template,
            }
            kubernetes_validate.validate(doc, "1.30.0", strict=True)


def test_a_broken_manifest_is_caught_by_the_validators() -> None:
    """The checks above can fail: a wrong type and an unknown field are both reported."""
    rayjob = copy.deepcopy(manifests(_spec())[1])
    group = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["maxReplicas"] = "four"
    group["template"]["spec"]["containers"][0]["gpuCount"] = 8
    errors = crd_errors(rayjob)
    assert any("maxReplicas" in e for e in errors)
    assert any("gpuCount: unknown field" in e for e in errors)


def test_head_and_gpu_worker_groups_follow_the_spec() -> None:
    spec = _spec()
    configmap, rayjob = manifests(spec)
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head runs the driver only
    (group,) = cluster["workerGroupSpecs"]
    # workers {min: 16, max: 32} at 8 GPUs per pod -> 2..4 pods, autoscaler on.
    assert (group["minReplicas"], group["replicas"], group["maxReplicas"]) == (2, 2, 4)
    assert cluster["enableInTreeAutoscaling"] is True
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["limits"]["cpu"] == "80"  # 8 workers x 10 CPUs
    assert container["image"] == spec.launcher.kuberay.image
    assert pod["serviceAccountName"] == "dino-trainer"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # Metrics: a port per local rank (9464 + r) and Ray's; pods carry the PodMonitor labels.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {**{f"dino-metrics-{r}": 9464 + r for r in range(8)}, "metrics": 8080}
    for template in (head["template"], group["template"]):
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "dino-cluster"
        assert labels["dino-cluster/run"] == "vitb8"
    # The driver reads the resolved spec from the ConfigMap mounted on the head.
    assert "/etc/dino-cluster/spec.resolved.yaml" in rayjob["spec"]["entrypoint"]
    embedded = yaml.safe_load(configmap["data"]["spec.resolved.yaml"])
    assert embedded["launcher"]["ray"]["address"] is None
    assert embedded["run"]["storage"] == "s3://my-bucket/dino-runs"
    fixed = manifests(_spec("launcher.workers=null"))[1]["spec"]["rayClusterSpec"]
    assert "enableInTreeAutoscaling" not in fixed
    g = fixed["workerGroupSpecs"][0]
    assert (g["minReplicas"], g["replicas"], g["maxReplicas"]) == (4, 4, 4)


def test_credentials_are_references_never_values(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEXAMPLETOKEN")
    text = render_yaml(_spec("launcher.kuberay.s3_secret_name=dino-s3"))
    for value in ("AKIAIOSFODNN7EXAMPLE", secret, "FwoGZXIvYXdzEXAMPLETOKEN"):
        assert value not in text
    for doc in yaml.safe_load_all(text):
        assert doc["kind"] != "Secret"
    rayjob = list(yaml.safe_load_all(text))[1]
    cluster = rayjob["spec"]["rayClusterSpec"]
    for template in [
        cluster["headGroupSpec"]["template"],
        cluster["workerGroupSpecs"][0]["template"],
    ]:
        (container,) = template["spec"]["containers"]
        assert container["envFrom"] == [{"secretRef": {"name": "dino-s3"}}]
        assert "env" not in container  # nothing inlined
    # A spec cannot smuggle credentials into the Ray runtime env either.
    with pytest.raises(ValueError, match="must not carry credentials"):
        _spec("launcher.ray.runtime_env={env_vars: {AWS_SECRET_ACCESS_KEY: x}}")


def test_specs_that_cannot_work_on_kubernetes_are_refused() -> None:
    with pytest.raises(LaunchError, match="object store that outlives the pods"):
        manifests(_spec("run.storage=null"))
    with pytest.raises(LaunchError, match="local path"):
        manifests(_spec("data.url=data/fmnist/index.json"))


def _worker_container(rayjob: dict) -> dict:
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    return container


def test_ray_version_is_the_specs_or_the_installed_ray_never_the_image_tag(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed = importlib.metadata.version("ray")
    unpinned = _spec("launcher.kuberay.ray_version=null")
    # The image tag carries the project version (0.1.0): it is not Ray's.
    cluster = manifests(unpinned)[1]["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == installed
    assert EXAMPLE.read_text().count("rayVersion: 2.60.0\n") == 1  # jobs/vitb8.yaml pins it
    tagged = _spec(
        "launcher.kuberay.ray_version=null",
        "launcher.kuberay.image=registry.example.com/dino:0.1.0",
    )
    assert manifests(tagged)[1]["spec"]["rayClusterSpec"]["rayVersion"] == installed
    pinned = _spec("launcher.kuberay.ray_version=2.61.1")
    assert manifests(pinned)[1]["spec"]["rayClusterSpec"]["rayVersion"] == "2.61.1"

    def no_ray(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(kuberay.importlib.metadata, "version", no_ray)
    with pytest.raises(LaunchError, match=r"launcher\.kuberay\.ray_version"):
        manifests(unpinned)
    assert manifests(pinned)[1]["spec"]["rayClusterSpec"]["rayVersion"] == "2.61.1"


@pytest.mark.parametrize(
    "image",
    [
        None,
        "rayproject/ray:2.60.0-py311-gpu",
        "docker.io/rayproject/ray:2.60.0",
        "rayproject/ray-ml@sha256:" + "0" * 64,
    ],
)
def test_kuberay_refuses_a_missing_or_stock_ray_image(image: str | None) -> None:
    spec = _spec(f"launcher.kuberay.image={image}" if image else "launcher.kuberay.image=null")
    with pytest.raises(LaunchError) as err:
        manifests(spec)
    message = str(err.value)
    assert "\n" not in message  # one line, as the CLI prints it
    assert "launcher.kuberay.image" in message
    assert "must contain dino-cluster and Ray" in message
    assert "infra/k8s/README.md" in message
    # A mirror or an image of one's own is fine, even if its name mentions ray.
    manifests(_spec("launcher.kuberay.image=registry.example.com/rayproject/ray:2.60.0"))


def test_a_spec_without_an_image_is_refused_by_render_submit_and_the_module(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """jobs/vits16.yaml sets no image: nothing is rendered or applied, with one clear line."""
    spec = load_spec(REPO / "jobs" / "vits16.yaml", [f"run.dir={tmp_path}"])
    assert spec.launcher.kuberay.image is None
    backend = KubeRayBackend()
    for call in (lambda: backend.render(spec), lambda: backend.submit(spec, dry_run=True)):
        with pytest.raises(LaunchError, match=r"launcher\.kuberay\.image is not set"):
            call()
    out = tmp_path / "out.yaml"
    assert main([str(REPO / "jobs" / "vits16.yaml"), str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: kuberay: launcher.kuberay.image is not set")
    assert len(err.splitlines()) == 1 and "must contain dino-cluster and Ray" in err
    assert not out.exists()


def _podmonitor_ports() -> dict[str, list[dict]]:
    """PodMonitor name -> its endpoints, from the shipped infra/k8s file."""
    docs = yaml.safe_load_all(PODMONITOR.read_text())
    return {d["metadata"]["name"]: d["spec"]["podMetricsEndpoints"] for d in docs}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_local_rank_has_a_declared_port_that_the_podmonitor_scrapes(name: str) -> None:
    spec = _named(name)
    rayjob = manifests(spec)[1]
    ports = [p for p in _worker_container(rayjob)["ports"] if p["name"] != "metrics"]
    per_pod = spec.launcher.gpus_per_node or spec.launcher.procs_per_node
    base = spec.metrics.port
    # Local rank r binds metrics.port + r (train/assemble.build_exporters): all declared.
    assert [p["containerPort"] for p in ports] == [base + r for r in range(per_pod)]
    names = [p["name"] for p in ports]
    assert len(set(names)) == len(names)
    for port_name in names:  # IANA_SVC_NAME, as Kubernetes requires of port names
        assert len(port_name) <= 15 and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", port_name)
    # The worker PodMonitor has an endpoint for each, with the exporters' labels kept.
    endpoints = {e["port"]: e for e in _podmonitor_ports()["dino-cluster-ray-workers"]}
    for port_name in names:
        assert port_name in endpoints, f"{port_name} is not scraped by {PODMONITOR.name}"
        ep = endpoints[port_name]
        assert ep["honorLabels"] is True
        relabel = {r["targetLabel"]: r for r in ep["relabelings"]}
        assert relabel["job"]["replacement"] == "dino-cluster"  # the dashboard's up{job=...}
        assert relabel["run"]["sourceLabels"] == ["__meta_kubernetes_pod_label_dino_cluster_run"]
    # The head runs no ranks: only Ray's port.
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert not [p for p in head["containers"][0]["ports"] if p["name"].startswith("dino-")]


def test_the_shipped_example_declares_all_eight_ranks_of_a_pod() -> None:
    rayjob = list(yaml.safe_load_all(EXAMPLE.read_text()))[1]
    ports = {p["name"]: p["containerPort"] for p in _worker_container(rayjob)["ports"]}
    assert [ports[f"dino-metrics-{r}"] for r in range(8)] == list(range(9464, 9472))
    scraped = {e["port"] for e in _podmonitor_ports()["dino-cluster-ray-workers"]}
    assert set(ports) <= scraped


def test_metrics_ports_follow_the_metrics_section() -> None:
    # Port 0 (a free port per rank) cannot be declared: the pods get the default instead.
    configmap, rayjob = manifests(_spec("metrics.port=0"))
    ports = [p["containerPort"] for p in _worker_container(rayjob)["ports"]]
    assert ports == [*range(9464, 9472), 8080]
    assert yaml.safe_load(configmap["data"]["spec.resolved.yaml"])["metrics"]["port"] == 9464
    moved = manifests(_spec("metrics.port=9100"))[1]
    assert [p["containerPort"] for p in _worker_container(moved)["ports"]][:8] == list(
        range(9100, 9108)
    )
    # No exporters, no ports to scrape (they would only be down targets).
    off = manifests(_spec("metrics.prometheus=false"))[1]
    assert [p["name"] for p in _worker_container(off)["ports"]] == ["metrics"]
    with pytest.raises(LaunchError, match="loopback inside the pod"):
        manifests(_spec("metrics.host=127.0.0.1"))
    for port in (8075, 10000, 65530):  # over Ray's metrics port, its worker range, 65535
        with pytest.raises(LaunchError, match="choose another metrics.port"):
            manifests(_spec(f"metrics.port={port}"))


def test_names_and_labels_are_valid_kubernetes_names() -> None:
    assert k8s_name("ViT_B.8-run") == "dino-vit-b-8-run"
    assert len(k8s_name("a" * 63)) <= 40 and not k8s_name("a" * 63).endswith("-")
    assert label_value("run-") == "run"
    assert label_value("x" * 70) == "x" * 63


def test_the_rayjob_driver_carries_the_evaluation_watcher() -> None:
    """No API server here: what can be checked is that the RayJob's driver is ours, that the
    spec it reads has evaluation on, and that such a driver evaluates on its own cluster."""
    from dino_cluster.launch.ray.evaluations import driver_eval_backend
    from dino_cluster.spec import spec_from_dict

    configmap, rayjob = manifests(load_spec(REPO / "jobs" / "vitb8.yaml"))
    assert rayjob["spec"]["entrypoint"].startswith("python -m dino_cluster.launch.ray.driver ")
    pod = spec_from_dict(yaml.safe_load(configmap["data"]["spec.resolved.yaml"]))
    assert pod.launcher.backend == "kuberay" and pod.evaluation.enabled
    assert pod.evaluation.train_url and pod.evaluation.val_url
    assert driver_eval_backend(pod) == "ray"
    named = manifests(
        load_spec(REPO / "jobs" / "vitb8.yaml", ["launcher.python=/opt/py/bin/python"])
    )
    assert named[1]["spec"]["entrypoint"].startswith("/opt/py/bin/python -m ")


def test_infra_example_is_up_to_date() -> None:
    expected = render_yaml(load_spec(REPO / "jobs" / "vitb8.yaml"))
    assert EXAMPLE.read_text() == expected, (
        "infra/k8s/vitb8-rayjob.yaml is out of date; regenerate it with: python -m "
        "dino_cluster.launch.kuberay jobs/vitb8.yaml infra/k8s/vitb8-rayjob.yaml"
    )


def _fake_kubectl(tmp_path: Path) -> Path:
    """A stand-in kubectl that records its arguments and stdin (unit test of our logic)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "kubectl"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {tmp_path}/kubectl.args\n'
        f'if [ "$1" = apply ]; then cat > {tmp_path}/applied.yaml; fi\n'
        'if [ "$1" = get ]; then printf RUNNING; fi\n'
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_submit_needs_a_kubeconfig_and_applies_with_kubectl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    backend = KubeRayBackend()
    spec = _spec(f"run.dir={tmp_path / 'runs'}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(LaunchError, match="no kubeconfig"):
        backend.submit(spec, detach=True)
    assert not (spec.run_dir / "launch.json").exists()

    dry = backend.submit(spec, dry_run=True)
    assert dry.status == "dry-run" and dry.message == render_yaml(spec)

    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.setenv("PATH", f"{_fake_kubectl(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    result = backend.submit(spec, detach=True)
    assert result.job_id == "ml/dino-vitb8"
    assert (tmp_path / "applied.yaml").read_text() == render_yaml(spec)
    assert backend.status(str(spec.run_dir)) == "running"
    backend.cancel(str(spec.run_dir))
    calls = (tmp_path / "kubectl.args").read_text().splitlines()
    assert calls[0] == "apply -f -"
    assert calls[-1] == "delete rayjob dino-vitb8 -n ml"
