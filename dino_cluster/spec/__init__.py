"""The job spec: one typed, strict section per component (sections.py), values bounded where
they become memory or time (bounds.py), URLs without credentials (urls.py), read from bounded,
safe YAML (strict_yaml.py) with `--set` overrides and field-naming errors (load.py).

    job = load_spec("jobs/quickstart.yaml", ["optim.epochs=2"])   # SpecError if wrong
    write_resolved(job, job.run_dir)                              # RUN/spec.resolved.yaml
"""

from dino_cluster.spec.load import (
    SpecError,
    apply_overrides,
    load_spec,
    spec_from_dict,
    write_resolved,
)
from dino_cluster.spec.sections import (
    CheckpointSpec,
    CropsSpec,
    DataSpec,
    EvaluationSpec,
    JobSpec,
    KubeRaySpec,
    LauncherSpec,
    MethodSpec,
    MetricsSpec,
    ModelSpec,
    OptimSpec,
    PerformanceSpec,
    RayLauncherSpec,
    RunSpec,
    SlurmLauncherSpec,
    StorageSpec,
    WorkersSpec,
)

__all__ = [
    "CheckpointSpec",
    "CropsSpec",
    "DataSpec",
    "EvaluationSpec",
    "JobSpec",
    "KubeRaySpec",
    "LauncherSpec",
    "MethodSpec",
    "MetricsSpec",
    "ModelSpec",
    "OptimSpec",
    "PerformanceSpec",
    "RayLauncherSpec",
    "RunSpec",
    "SlurmLauncherSpec",
    "SpecError",
    "StorageSpec",
    "WorkersSpec",
    "apply_overrides",
    "load_spec",
    "spec_from_dict",
    "write_resolved",
]
