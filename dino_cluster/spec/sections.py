"""JobSpec and its sections: the typed, strict description of one DINO pretraining run.

One config object per component (model, method, optim, data, checkpoint, launcher,
evaluation, metrics, performance), each validated where it is declared; the component is
built from its own section. Defaults are the reference DINO recipe; every deviation is a
named option. Upper bounds on what becomes memory or time live in bounds.py, URL rules
(no credentials, storage schemes) in urls.py; every float must be finite.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from dino_cluster.spec import bounds as B
from dino_cluster.spec.urls import (
    CREDENTIALS_MESSAGE,
    check_endpoint_url,
    check_no_credentials,
    check_storage_url,
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

Fraction = Annotated[float, Field(ge=0, le=1)]
# Where data, checkpoints or run state live: s3://, file:/// or a path, never credentials.
StorageUrl = Annotated[str, AfterValidator(check_storage_url)]


class _Section(BaseModel):
    # allow_inf_nan=False: `base_lr: .inf` passed as a positive float and was NaN at step 1.
    # It applies to every float of every section, lists included (strict mode keeps it).
    model_config = ConfigDict(
        strict=True, extra="forbid", validate_default=True, frozen=False, allow_inf_nan=False
    )

    @field_validator("*")
    @classmethod
    def _no_credentials(cls, v: Any) -> Any:
        # Any string anywhere (runtime_env pip URLs, setup lines, addresses) ends up printed in
        # `validate --show`, rendered scripts and spec.resolved.yaml: a URL with user:password@
        # is refused wherever it is, and the message does not repeat it. Sections check their
        # own fields, so a nested section is not walked twice.
        if isinstance(v, BaseModel):
            return v
        return check_no_credentials(v)


def _check_scale(v: list[float], name: str) -> list[float]:
    if len(v) != 2:
        raise ValueError(f"{name} must be two numbers [min, max]")
    lo, hi = v
    if not (0 < lo <= hi <= 1):
        raise ValueError(f"{name} must satisfy 0 < min <= max <= 1, got {v}")
    return v


class RunSpec(_Section):
    name: str = "dino"
    # Local folder that holds every run's folder (resolved spec, metrics log, logs).
    dir: str = "runs"
    # Optional object-store URL for the run's durable state (checkpoints). Default: the run folder.
    storage: StorageUrl | None = None
    seed: Annotated[int, Field(ge=0, le=B.MAX_SEED)] = 0

    @field_validator("name")
    @classmethod
    def _name_is_a_name(cls, v: str) -> str:
        # A run name is a name, not a path: it must not escape the run folder or bucket prefix.
        if not _NAME_RE.match(v) or v in {".", ".."}:
            raise ValueError(
                "must be 1-63 characters of letters, digits, '_', '-', '.', starting with a "
                f"letter or digit (got {v!r})"
            )
        return v


# timm's ViT families that take patch_size, depth, embed_dim and num_heads
VIT_ARCH_PREFIXES = ("vit_", "deit", "eva", "beit", "flexivit", "samvit")


class ModelSpec(_Section):
    arch: str = "vit_small_patch16_224"  # any timm model name
    # Bounds: dino_cluster/spec/bounds.py (each sizes weights or activations).
    patch_size: Annotated[int, Field(gt=0, le=B.MAX_PATCH)] | None = 16  # None for CNNs
    img_size: B.Side = 224  # the backbone's nominal size (= the global crop size)
    drop_path_rate: Annotated[float, Field(ge=0, lt=1)] = 0.1
    # Optional ViT shape overrides passed to timm (tiny models for smoke runs and tests).
    depth: Annotated[int, Field(gt=0, le=B.MAX_DEPTH)] | None = None
    embed_dim: Annotated[int, Field(gt=0, le=B.MAX_WIDTH)] | None = None
    num_heads: Annotated[int, Field(gt=0, le=B.MAX_HEADS)] | None = None
    out_dim: Annotated[int, Field(gt=0, le=B.MAX_OUT_DIM)] = 65536
    hidden_dim: Annotated[int, Field(gt=0, le=B.MAX_HIDDEN_DIM)] = 2048
    bottleneck_dim: Annotated[int, Field(gt=0, le=B.MAX_BOTTLENECK_DIM)] = 256
    head_layers: Annotated[int, Field(ge=1, le=8)] = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    # ViTs: the reference DINO position-embedding resize for other crop sizes (plain bicubic,
    # +0.1 offset) and cls/pos init (truncated normal 0.02), or timm's own ("timm").
    pos_embed_interpolation: Literal["reference", "timm"] = "reference"

    @model_validator(mode="after")
    def _vit_fields(self) -> ModelSpec:
        # Checked here, without timm: otherwise a CNN given a ViT field fails only in the
        # ranks, after submit, with timm's TypeError.
        if self.arch.startswith(VIT_ARCH_PREFIXES):
            return self
        given = [f for f in ("patch_size", "depth", "embed_dim", "num_heads")
                 if f in self.model_fields_set and getattr(self, f) is not None]  # fmt: skip
        if given:
            it = "it" if len(given) == 1 else "them"
            raise ValueError(
                f"{', '.join(given)}: only ViT archs ({', '.join(VIT_ARCH_PREFIXES)}...) take "
                f"{it}; arch {self.arch!r} is not one: leave {it} out"
            )
        if "patch_size" not in self.model_fields_set:
            self.patch_size = None  # the default 16 is a ViT's
        return self


class CropsSpec(_Section):
    global_size: B.Side = 224
    local_size: B.Side = 96
    n_local: Annotated[int, Field(ge=0, le=B.MAX_LOCAL_CROPS)] = 8
    global_scale: list[float] = [0.4, 1.0]
    local_scale: list[float] = [0.05, 0.4]

    @field_validator("global_scale")
    @classmethod
    def _g(cls, v: list[float]) -> list[float]:
        return _check_scale(v, "global_scale")

    @field_validator("local_scale")
    @classmethod
    def _l(cls, v: list[float]) -> list[float]:
        return _check_scale(v, "local_scale")

    @model_validator(mode="after")
    def _sizes(self) -> CropsSpec:
        if self.n_local and self.local_size > self.global_size:
            raise ValueError(
                f"local_size ({self.local_size}) must not exceed global_size ({self.global_size})"
            )
        return self

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local


class MethodSpec(_Section):
    student_temp: B.Temperature = 0.1
    teacher_temp: B.Temperature = 0.04  # final teacher temperature
    warmup_teacher_temp: B.Temperature = 0.04
    warmup_teacher_temp_epochs: B.Epochs = 0  # <= optim.epochs (checked in JobSpec)
    center_momentum: Fraction = 0.9
    teacher_momentum: Fraction = 0.996  # start of the cosine schedule
    teacher_momentum_final: Fraction = 1.0
    crops: CropsSpec = CropsSpec()
    # Stop after this many consecutive non-finite losses (each is skipped and counted).
    max_nonfinite_steps: B.PositiveSteps = 10

    @model_validator(mode="after")
    def _momentum(self) -> MethodSpec:
        if self.teacher_momentum > self.teacher_momentum_final:
            raise ValueError("teacher_momentum must not exceed teacher_momentum_final")
        return self


class OptimSpec(_Section):
    # Bounds: dino_cluster/spec/bounds.py. epochs x iters_per_epoch (the schedules' length)
    # needs the dataset size and is checked when training starts.
    epochs: B.PositiveEpochs = 100
    # When set, training stops after this many optimizer steps; the schedules still span
    # `epochs` (so a short smoke run follows the real recipe's first steps).
    max_steps: B.PositiveSteps | None = None
    global_batch: Annotated[int, Field(gt=0, le=B.MAX_GLOBAL_BATCH)] = 1024
    base_lr: B.LearningRate = 5e-4
    lr_scaling: Literal["linear", "none"] = "linear"  # lr = base_lr * global_batch / 256
    warmup_epochs: B.Epochs = 10
    min_lr: Annotated[float, Field(ge=0, le=B.MAX_LR)] = 1e-6
    weight_decay: Annotated[float, Field(ge=0, le=B.MAX_WEIGHT_DECAY)] = 0.04
    weight_decay_end: Annotated[float, Field(ge=0, le=B.MAX_WEIGHT_DECAY)] = 0.4
    clip_grad: Annotated[float, Field(ge=0, le=B.MAX_CLIP)] = 3.0  # 0 disables clipping
    clip_mode: Literal["per_param", "global"] = "per_param"
    freeze_last_layer: B.Epochs = 1  # epochs
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"

    @model_validator(mode="after")
    def _consistent(self) -> OptimSpec:
        if self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) exceeds epochs ({self.epochs})")
        if self.lr_scaling == "none" and self.min_lr > self.base_lr:
            raise ValueError("min_lr exceeds base_lr")
        return self

    @property
    def peak_lr(self) -> float:
        scale = self.global_batch / 256 if self.lr_scaling == "linear" else 1.0
        return self.base_lr * scale


class StorageSpec(_Section):
    """Where and how to reach an object store. Never credentials: those come from the
    environment (AWS_* variables, profiles, workload identity)."""

    # http(s)://host[:port]; user:password@ is refused without repeating it.
    endpoint_url: Annotated[str, AfterValidator(check_endpoint_url)] | None = None
    region: str | None = None
    profile: str | None = None


class DataSpec(_Section):
    # Shards: an index.json, a brace pattern or a folder/prefix, on s3:// or file://.
    url: StorageUrl
    # Bounds: dino_cluster/spec/bounds.py (processes, and samples held, per rank).
    num_workers: Annotated[int, Field(ge=0, le=B.MAX_DATA_WORKERS)] = 10
    shuffle_buffer: Annotated[int, Field(ge=0, le=B.MAX_SHUFFLE_BUFFER)] = 1000
    max_image_pixels: Annotated[int, Field(gt=0, le=B.MAX_IMAGE_PIXELS)] = 64_000_000
    # Multi-crop implementation. reference: PIL + torchvision as the paper (default);
    # batched: same distributions, photometric ops batched per chunk in the data workers
    # (~2x the reference per CPU core); fast: the reference's ops as compiled kernels, all
    # bit-exact but hue (dino/augment/fast.py), all on the CPU (~3.3-4x); gpu: the CPU only
    # decodes and crops (uint8), colour jitter, grayscale, blur, solarize and normalisation
    # run batched on the training device.
    augment: Literal["reference", "batched", "fast", "gpu"] = "reference"
    storage: StorageSpec = StorageSpec()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        if v.startswith("pipe:"):
            raise ValueError("pipe: URLs are not accepted from job specs")
        return v


class CheckpointSpec(_Section):
    # Default: <run.storage or run.dir>/<run.name>/checkpoints
    url: StorageUrl | None = None
    every_steps: B.Steps = 0  # 0 = once per epoch
    keep_last: Annotated[int, Field(gt=0, le=B.MAX_KEEP_LAST)] = 3
    keep_every_steps: B.Steps = 0  # also keep every M-th step forever (0 = none)
    resume: bool = True
    # Signals on which rank 0 writes a checkpoint before the process goes away.
    on_signals: list[Literal["SIGTERM", "SIGUSR1", "SIGUSR2"]] = ["SIGTERM", "SIGUSR2"]
    upload_retries: Annotated[int, Field(ge=0, le=100)] = 3  # each backs off: 100 is hours


class WorkersSpec(_Section):
    min: Annotated[int, Field(gt=0, le=B.MAX_WORKERS)] = 1
    max: Annotated[int, Field(gt=0, le=B.MAX_WORKERS)] = 1

    @model_validator(mode="after")
    def _range(self) -> WorkersSpec:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) exceeds max ({self.max})")
        return self


class RayLauncherSpec(_Section):
    # None = start a private local Ray; "http(s)://head:8265" = submit through the Ray Jobs
    # API; "host:port" or "auto" = run the driver here, joined to that cluster.
    address: str | None = None
    dashboard_host: str = "127.0.0.1"
    # Worker-group restarts (worker or node failures) before the run fails.
    max_failures: B.Retries = 3
    # Timeouts: finite and at most a week (bounds.MAX_WAIT_S).
    # Give up when no training worker is alive for this long (cluster cannot supply `min`).
    startup_timeout_s: B.WaitSeconds = 600.0
    # Give up when the cluster at `address` (its GCS, or the Jobs API) does not answer.
    connect_timeout_s: B.WaitSeconds = 30.0
    # How often an elastic run checks whether more workers fit (grows by a restart).
    resize_interval_s: B.WaitSeconds = 60.0
    # Ray's own run bookkeeping (not our checkpoints). Default: RUN/ray.
    storage_path: StorageUrl | None = None
    # Extra Ray runtime env for Jobs API submissions (pip, env_vars, ...). No secrets:
    # credential-looking env_vars are refused.
    runtime_env: dict[str, Any] = {}

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        # No Ray address has an '@'; "user:token@head:6379" is a credential (not repeated).
        if v is not None and "@" in v:
            raise ValueError(CREDENTIALS_MESSAGE)
        return v

    @field_validator("runtime_env")
    @classmethod
    def _no_secrets(cls, v: dict[str, Any]) -> dict[str, Any]:
        env = v.get("env_vars") or {}
        if not isinstance(env, dict):
            raise ValueError("runtime_env.env_vars must be a mapping")
        secret = re.compile(r"SECRET|PASSWORD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY", re.I)
        bad = sorted(k for k in env if secret.search(str(k)))
        if bad:
            raise ValueError(
                f"runtime_env.env_vars must not carry credentials ({', '.join(bad)}): give "
                "the cluster its credentials through its own environment or workload identity"
            )
        return v


class SlurmLauncherSpec(_Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: B.Minutes = 60 * 24
    mem_gb: B.MemGB | None = None
    cpus_per_task: B.Cpus = 10
    folder: str = "runs/slurm"  # shared path for submitit logs and pickles
    max_requeues: B.Retries = 20
    # Seconds before the time limit at which SLURM sends USR2 (checkpoint, then requeue).
    signal_grace_s: Annotated[int, Field(ge=10, le=3600)] = 120
    job_name: str | None = None  # default: dino-<run.name>
    # Extra sbatch options, e.g. {exclude: node7, exclusive: true} (true = a bare flag).
    additional_parameters: dict[str, str | bool | int] = {}
    setup: list[str] = []  # shell lines run in the batch script before srun

    @field_validator("partition", "account", "qos", "constraint", "job_name")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        # These become `#SBATCH --key=value` lines: whitespace would split or inject lines.
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError(f"must be a non-empty value without spaces or newlines (got {v!r})")
        return v

    @field_validator("additional_parameters")
    @classmethod
    def _sbatch_options(cls, v: dict[str, str | bool | int]) -> dict[str, str | bool | int]:
        for key, value in v.items():
            if not re.fullmatch(r"[a-z][a-z0-9_-]*", key):
                raise ValueError(f"{key!r} is not an sbatch option name (e.g. 'exclude')")
            if isinstance(value, str) and any(c in value for c in "\r\n\0"):
                raise ValueError(f"{key}: value must be a single line")
        return v

    @field_validator("setup")
    @classmethod
    def _setup_lines(cls, v: list[str]) -> list[str]:
        for line in v:
            if "\n" in line or "\r" in line:
                raise ValueError("each setup entry must be one line (use several entries)")
        return v


class KubeRaySpec(_Section):
    namespace: str = "default"
    # A Ray image with dino-cluster installed (see infra/k8s/README.md). Required to render or
    # submit a RayJob: the stock rayproject/ray images do not contain dino-cluster.
    image: str | None = None
    # The Ray version inside `image` (the RayCluster's rayVersion). None: the Ray installed
    # here, which the image should match.
    ray_version: str | None = None
    # For workload identity (IRSA / GKE WI): the service account carries the cloud role.
    service_account: str | None = None
    node_selector: dict[str, str] = {}  # worker pods (the GPU nodes)
    tolerations: list[dict[str, str | int]] = []  # worker pods
    # An existing Secret with AWS_* keys, referenced by name (envFrom); never its values.
    s3_secret_name: str | None = None
    head_cpus: B.Cpus = 4
    head_memory_gb: B.MemGB = 16
    worker_memory_gb: B.MemGB | None = None  # per worker pod; None = no memory limit
    # Keep the finished cluster for logs. Kubernetes' field is int32.
    ttl_seconds_after_finished: Annotated[int, Field(ge=0, le=B.MAX_INT32)] = 3600

    @field_validator("namespace", "s3_secret_name", "service_account")
    @classmethod
    def _dns_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$", v):
            raise ValueError(f"must be a Kubernetes name (lower-case DNS-1123), got {v!r}")
        return v


class LauncherSpec(_Section):
    backend: Literal["local", "ray", "kuberay", "slurm"] = "local"
    # The Python interpreter every process of the run starts with (ranks, SLURM jobs, the Ray
    # driver, evaluations). None: the one running dino-cluster (its virtual environment), on a
    # cluster that shares it; for the Ray Jobs API and KubeRay, the cluster's own `python`.
    python: str | None = None
    nodes: B.Nodes = 1
    gpus_per_node: Annotated[int, Field(ge=0, le=B.MAX_GPUS_PER_NODE)] = 0  # 0 = CPU (gloo)
    cpus_per_worker: B.Cpus = 1
    # Local/CPU world size when no GPUs: number of worker processes per node.
    procs_per_node: Annotated[int, Field(gt=0, le=B.MAX_PROCS_PER_NODE)] = 1
    workers: WorkersSpec | None = None  # elastic range (Ray); None = fixed world size
    ray: RayLauncherSpec = RayLauncherSpec()
    slurm: SlurmLauncherSpec = SlurmLauncherSpec()
    kuberay: KubeRaySpec = KubeRaySpec()

    @field_validator("python")
    @classmethod
    def _one_path(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c in v for c in "\r\n\0")):
            raise ValueError(f"must be an interpreter path or name on one line (got {v!r})")
        return v

    @property
    def world_size(self) -> int:
        per_node = self.gpus_per_node if self.gpus_per_node else self.procs_per_node
        return self.nodes * per_node

    @property
    def interpreter(self) -> str:
        """`python`, else the interpreter running dino-cluster now."""
        return self.python or sys.executable


class EvaluationSpec(_Section):
    enabled: bool = False
    kinds: list[Literal["knn", "linear"]] = ["knn"]
    train_url: StorageUrl | None = None
    val_url: StorageUrl | None = None
    knn_k: B.KnnKs = [10, 20, 100, 200]
    knn_temperature: B.Temperature = 0.07
    linear_epochs: Annotated[int, Field(gt=0, le=B.MAX_LINEAR_EPOCHS)] = 100
    gpus: Annotated[int, Field(ge=0, le=B.MAX_EVAL_GPUS)] = 0
    cpus: B.Cpus = 2
    # Where each evaluation runs: auto = the run's backend (local process, Ray task, SLURM
    # job; kuberay runs them as Ray tasks on the run's cluster).
    backend: Literal["auto", "local", "ray", "slurm"] = "auto"
    mem_gb: B.MemGB | None = None  # SLURM --mem / Ray memory; None: the default
    # SLURM evaluation jobs: None = the run's launcher.slurm value.
    slurm_partition: str | None = None
    slurm_account: str | None = None
    slurm_qos: str | None = None
    slurm_time_min: B.Minutes = 120

    @field_validator("slurm_partition", "slurm_account", "slurm_qos")
    @classmethod
    def _one_word(cls, v: str | None) -> str | None:
        # These become `#SBATCH --key=value` lines: whitespace would split or inject lines.
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError(f"must be a non-empty value without spaces or newlines (got {v!r})")
        return v

    @model_validator(mode="after")
    def _urls(self) -> EvaluationSpec:
        if self.enabled and not (self.train_url and self.val_url):
            raise ValueError("train_url and val_url are required when evaluation is enabled")
        return self


class MetricsSpec(_Section):
    log_every_steps: Annotated[int, Field(gt=0, le=B.MAX_LOG_EVERY)] = 10
    prometheus: bool = False
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 0  # 0 = pick a free port


class PerformanceSpec(_Section):
    """How the training step runs; none of it changes the method (tests/test_train_step.py).

    Defaults: what is measured or known safe without a GPU measurement (README "Performance").
    """

    # torch.compile of the student and teacher backbones (one graph per crop resolution).
    # Off: compiling costs minutes per process start, and the speed-up is unmeasured here.
    compile: bool = False
    # sdpa: timm's fused attention (F.scaled_dot_product_attention: flash / memory-efficient
    # kernels on GPUs); eager: the explicit softmax(q k^T) v of the paper's code.
    attention: Literal["sdpa", "eager"] = "sdpa"
    # Crops and the patch-embedding convolution in NHWC layout.
    channels_last: bool = False
    ddp_static_graph: bool = False
    ddp_bucket_mb: Annotated[int, Field(ge=1, le=4096)] = 25  # DDP's own default
    # Pinned host memory for batches (only when training on CUDA; copies are non_blocking).
    pin_memory: bool = True
    # AdamW implementation. auto: fused on CUDA, foreach elsewhere. Only the fused kernel can
    # skip a non-finite step on the device (found_inf), so only it makes the step free of
    # host syncs; foreach/single check the loss on the host every step.
    fused_optimizer: Literal["auto", "fused", "foreach", "single"] = "auto"


class JobSpec(_Section):
    run: RunSpec = RunSpec()
    model: ModelSpec = ModelSpec()
    method: MethodSpec = MethodSpec()
    optim: OptimSpec = OptimSpec()
    data: DataSpec
    checkpoint: CheckpointSpec = CheckpointSpec()
    launcher: LauncherSpec = LauncherSpec()
    evaluation: EvaluationSpec = EvaluationSpec()
    metrics: MetricsSpec = MetricsSpec()
    performance: PerformanceSpec = PerformanceSpec()

    @model_validator(mode="after")
    def _cross_section(self) -> JobSpec:
        world = self.launcher.world_size
        if self.launcher.workers is None and self.optim.global_batch % world:
            raise ValueError(
                f"optim.global_batch ({self.optim.global_batch}) is not divisible by the world "
                f"size ({world} = launcher.nodes x per-node workers)"
            )
        if self.model.patch_size and self.method.crops.local_size % self.model.patch_size:
            raise ValueError(
                f"method.crops.local_size ({self.method.crops.local_size}) is not a multiple of "
                f"model.patch_size ({self.model.patch_size})"
            )
        if self.method.warmup_teacher_temp_epochs > self.optim.epochs:
            # The schedule would be longer than the run: numpy refuses it at the first step.
            raise ValueError(
                f"method.warmup_teacher_temp_epochs ({self.method.warmup_teacher_temp_epochs}) "
                f"exceeds optim.epochs ({self.optim.epochs})"
            )
        self._check_crop_memory()
        return self

    def _check_crop_memory(self) -> None:
        # Crops and batch are bounded one by one; their product is what one rank holds each
        # step (uint8 RGB, before the float copy on the device). The smallest world the run
        # may have is the one that holds most.
        lc, c = self.launcher, self.method.crops
        world = lc.workers.min if lc.workers is not None else lc.world_size
        per_rank = -(-self.optim.global_batch // world)
        pixels = 2 * c.global_size**2 + c.n_local * c.local_size**2
        need = per_rank * pixels * 3
        if need > B.MAX_RANK_CROP_BYTES:
            raise ValueError(
                f"each rank would hold {need / 2**30:.0f} GiB of crops per step "
                f"({per_rank} images x {c.n_crops} crops, optim.global_batch / world size): "
                f"the limit is {B.MAX_RANK_CROP_BYTES >> 30} GiB; lower optim.global_batch, "
                "the crop sizes or method.crops.n_local, or use more workers"
            )

    # -- derived locations -------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        return Path(self.run.dir) / self.run.name

    @property
    def checkpoint_url(self) -> str:
        if self.checkpoint.url:
            return self.checkpoint.url
        if self.run.storage:
            return f"{self.run.storage.rstrip('/')}/{self.run.name}/checkpoints"
        return str((self.run_dir / "checkpoints").resolve())

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
