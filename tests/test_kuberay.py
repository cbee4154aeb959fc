"""KubeRay rendering, validated offline: the RayJob against KubeRay's own CRD schema (after
API-server style defaulting), core kinds with kubernetes-validate --strict, no credential
values anywhere, and the infra/k8s example kept up to date."""

from __future__ import annotations

import copy
import functools
import os
import stat
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from dino_cluster.launch.base import LaunchError
from dino_cluster.launch.kuberay import (
    KubeRayBackend,
    k8s_name,
    label_value,
    manifests,
    render_yaml,
)
from dino_cluster.spec import load_spec

REPO = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).parent / "data" / "kuberay"
EXAMPLE = REPO / "infra" / "k8s" / "vitb8-rayjob.yaml"


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


def _spec(*extra: str):
    return load_spec(REPO / "jobs" / "vitb8.yaml", list(extra))


SPECS = {
    "vitb8-elastic": [],
    "vitb8-fixed-secret": [
        "launcher.workers=null",
        "launcher.kuberay.s3_secret_name=dino-s3",
        "launcher.kuberay.worker_memory_gb=480",
    ],
    "cpu-workers": [
        "launcher.gpus_per_node=0",
        "launcher.procs_per_node=4",
        "launcher.nodes=2",
        "launcher.workers=null",
        "launcher.kuberay.node_selector={}",
        "launcher.kuberay.tolerations=[]",
        "launcher.kuberay.service_account=null",
        "launcher.kuberay.image=registry.example.com/dino:latest",
    ],
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_rendered_rayjob_validates_against_the_kuberay_crd(name: str) -> None:
    docs = manifests(_spec(*SPECS[name]))
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

    for extra in SPECS.values():
        configmap, rayjob = manifests(_spec(*extra))
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
    # Metrics: the training exporter's port is named, pods carry the PodMonitor labels.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dino-metrics"] == 9464 and ports["metrics"] == 8080
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
