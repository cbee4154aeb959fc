"""Training-step throughput: our DINO step vs a reference-style step, same process and device.

    python benchmarks/train_step.py --model s16 [--model b16 --model b8] [--batch N]
        [--steps 10] [--rounds 3] [--compile] [--out FILE.json]
    python benchmarks/train_step.py --tiny                # tiny ViT, runs on CPU in seconds

Both steps train the same architecture (timm ViT + DINO head, 65,536 prototypes) on the same
random multi-crop batch (2 global 224 + 10 local 96 crops), from the same weights:

  reference : written to the paper's description and code (2021): fp16 autocast + GradScaler,
              eager attention (softmax(q k^T) v), one backbone forward per resolution, the
              loss as a Python loop over (teacher view, student view) pairs, single-tensor
              AdamW, per-parameter clipping and EMA by Python loops, `loss.item()` every step.
  ours      : dino_cluster.train.step.TrainStep with the trainer's defaults: bf16 autocast
              where supported (else fp16 + scaler), fused attention (sdpa), loss without a
              pair loop, fused AdamW on CUDA (foreach elsewhere), foreach clipping and EMA, no
              host sync in the step on the fused path.
  ours+compile (--compile): the same with torch.compile of both backbones.

Variants alternate round by round (the order flips every round); the step time is the median
of the rounds (each round: --steps steps between two device synchronisations). Peak memory
(CUDA only) is each variant's own footprint: its weights, gradients and optimizer state plus
its peak transient memory during its steps (the shared input batch is not counted). MFU:
model FLOPs per step (counted once with torch.utils.flop_counter on the meta device: student
forward + backward on all crops, teacher forward on the global crops) / step time / the
device's dense bf16/fp16 peak from PEAK_TFLOPS; n/a where the device is not in the table.

On CPU the full-size models are replaced by the tiny one (depth 2, dim 64, 32/16-pixel crops)
unless --no-auto-tiny; one torch thread, timed in process CPU time. Prints a table and ratios;
--out also writes them as JSON. Not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dino_cluster.dino.loss import DINOLoss
from dino_cluster.dino.model import build_student_teacher, set_attention
from dino_cluster.dino.optim import build_optimizer, param_groups
from dino_cluster.train.step import TrainStep, prepare_models

# Dense (no sparsity) bf16 = fp16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
# Longest match first: "H100 PCIe" before "H100".
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "H200": 989.0,
    "A100": 312.0,
}

CONFIGS: dict[str, dict[str, Any]] = {
    "s16": dict(arch="vit_small_patch16_224", patch_size=16, batch=64),
    "b16": dict(arch="vit_base_patch16_224", patch_size=16, batch=64),
    # ViT-B/8 at half the recipe's per-GPU batch (32), so that the eager reference fits.
    "b8": dict(arch="vit_base_patch8_224", patch_size=8, batch=16),
}
TINY: dict[str, Any] = dict(
    arch="vit_small_patch16_224",
    patch_size=8,
    batch=8,
    depth=2,
    embed_dim=64,
    num_heads=2,
    global_size=32,
    local_size=16,
    out_dim=4096,
    hidden_dim=256,
    bottleneck_dim=64,
)


# ----------------------------------------------------------------------------------------------
# The reference-style step (the paper's code, reduced to one process's step)


class RefMultiCropWrapper(nn.Module):
    """The paper's wrapper: group consecutive crops by resolution on the host, one backbone
    forward per group, concatenated, then the head once."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: Sequence[Tensor]) -> Tensor:
        sizes = torch.tensor([inp.shape[-1] for inp in x])
        idx_crops = torch.cumsum(torch.unique_consecutive(sizes, return_counts=True)[1], 0)
        start_idx, output = 0, torch.empty(0).to(x[0].device)
        for end_idx in idx_crops.tolist():
            out = self.backbone(torch.cat(list(x[start_idx:end_idx])))
            output = torch.cat((output, out))
            start_idx = end_idx
        return self.head(output)


class RefDINOLoss(nn.Module):
    """The paper's loss: a Python loop over (teacher view, student view) pairs."""

    center: Tensor

    def __init__(self, out_dim: int, ncrops: int, student_temp: float = 0.1) -> None:
        super().__init__()
        self.ncrops, self.student_temp, self.center_momentum = ncrops, student_temp, 0.9
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: Tensor, teacher_output: Tensor, temp: float) -> Tensor:
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss: Tensor | float = 0.0
        n_loss_terms = 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue  # the same view seen by both networks
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss = total_loss + loss.mean()
                n_loss_terms += 1
        self.update_center(teacher_output)
        return total_loss / n_loss_terms  # type: ignore[return-value]

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        world = 1
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_center)
            world = dist.get_world_size()
        batch_center = batch_center / (len(teacher_output) * world)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class ReferenceStep:
    """One step of the paper's `train_one_epoch`, same call signature as TrainStep."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        dino_loss: RefDINOLoss,
        optimizer: torch.optim.Optimizer,
        *,
        fp16: bool,
        clip_grad: float = 3.0,
        freeze_last_layer: int = 1,
    ) -> None:
        self.student, self.teacher, self.dino_loss = student, teacher, dino_loss
        self.optimizer = optimizer
        self.device = dino_loss.center.device
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.clip_grad, self.freeze_last_layer = clip_grad, freeze_last_layer

    def __call__(
        self, crops: Sequence[Tensor], *, epoch: float, teacher_temp: float, momentum: float
    ) -> Tensor:
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler is not None):
            teacher_output = self.teacher(crops[:2])
            student_output = self.student(crops)
            loss = self.dino_loss(student_output, teacher_output, teacher_temp)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss is {loss.item()}, stopping training")
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            if self.clip_grad:
                self._clip_gradients()
            self._cancel_last_layer(epoch)
            self.optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            if self.clip_grad:
                self.scaler.unscale_(self.optimizer)
                self._clip_gradients()
            self._cancel_last_layer(epoch)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            for param_q, param_k in zip(
                self.student.parameters(), self.teacher.parameters(), strict=True
            ):
                param_k.data.mul_(momentum).add_((1 - momentum) * param_q.detach().data)
        loss.item()  # the metric logger's per-step read-back
        return loss.detach()

    def _clip_gradients(self) -> None:
        for p in self.student.parameters():
            if p.grad is not None:
                param_norm = p.grad.data.norm(2)
                clip_coef = self.clip_grad / (param_norm + 1e-6)
                if clip_coef < 1:  # a host sync per parameter, as in the paper's code
                    p.grad.data.mul_(clip_coef)

    def _cancel_last_layer(self, epoch: float) -> None:
        if epoch >= self.freeze_last_layer:
            return
        for n, p in self.student.named_parameters():
            if "last_layer" in n:
                p.grad = None


# ----------------------------------------------------------------------------------------------
# Building both steps


@dataclass
class Variant:
    name: str
    step: Callable[..., Tensor]
    tensors: Callable[[], list[Tensor]]  # everything the variant owns (for its memory)
    set_lr: Callable[[float, float], None]


def _set_lr(optimizer: torch.optim.Optimizer) -> Callable[[float, float], None]:
    def set_lr(lr: float, wd: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr
            if group.get("name") == "regularized":
                group["weight_decay"] = wd

    return set_lr


def build_networks(cfg: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    shape = {k: cfg[k] for k in ("depth", "embed_dim", "num_heads") if k in cfg}
    return build_student_teacher(
        cfg["arch"],
        patch_size=cfg["patch_size"],
        img_size=cfg.get("global_size", 224),
        drop_path_rate=0.1,
        out_dim=cfg.get("out_dim", 65536),
        hidden_dim=cfg.get("hidden_dim", 2048),
        bottleneck_dim=cfg.get("bottleneck_dim", 256),
        **shape,
    )


def _owned(*objs: Any) -> Callable[[], list[Tensor]]:
    def tensors() -> list[Tensor]:
        out: list[Tensor] = []
        for obj in objs:
            if isinstance(obj, nn.Module):
                for t in [*obj.parameters(), *obj.buffers()]:
                    out.append(t)
                    if t.grad is not None:
                        out.append(t.grad)
            elif isinstance(obj, torch.optim.Optimizer):
                for state in obj.state.values():
                    out += [v for v in state.values() if isinstance(v, Tensor)]
        return out

    return tensors


def make_reference(
    student: nn.Module, teacher: nn.Module, n_crops: int, out_dim: int, device: torch.device
) -> Variant:
    s, t = copy.deepcopy(student), copy.deepcopy(teacher)
    for net in (s, t):
        set_attention(net, "eager")
    ref_s = RefMultiCropWrapper(s.backbone, s.head).to(device)
    ref_t = RefMultiCropWrapper(t.backbone, t.head).to(device)
    loss = RefDINOLoss(out_dim, n_crops).to(device)
    opt = build_optimizer(param_groups(ref_s), lr=0.0, impl="single")
    step = ReferenceStep(ref_s, ref_t, loss, opt, fp16=device.type == "cuda")
    return Variant("reference", step, _owned(ref_s, ref_t, loss, opt), _set_lr(opt))


def make_ours(
    student: nn.Module,
    teacher: nn.Module,
    n_crops: int,
    out_dim: int,
    device: torch.device,
    *,
    compile: bool = False,
    optimizer: str = "auto",
) -> Variant:
    s, t = copy.deepcopy(student).to(device), copy.deepcopy(teacher).to(device)
    prepare_models(s, t, attention="sdpa", compile=compile)
    loss = DINOLoss(out_dim, n_crops).to(device)
    opt = build_optimizer(param_groups(s), lr=0.0, impl=optimizer)  # type: ignore[arg-type]
    amp: torch.dtype | None = None
    scaler = None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            amp = torch.bfloat16
        else:
            amp, scaler = torch.float16, torch.amp.GradScaler("cuda")
    step = TrainStep(s, t, loss, opt, scaler, amp_dtype=amp, clip_grad=3.0, freeze_last_layer=1)
    name = "ours+compile" if compile else "ours"
    return Variant(name, step, _owned(s, t, loss, opt), _set_lr(opt))


# ----------------------------------------------------------------------------------------------
# Measuring


def count_step_flops(cfg: dict[str, Any], n_local: int) -> float:
    """Model FLOPs of one step for one image (all crops), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    g, loc = cfg.get("global_size", 224), cfg.get("local_size", 96)
    with torch.device("meta"):
        student, _ = build_networks(cfg)
        set_attention(student, "eager")  # every matmul visible to the counter
        crops = [torch.randn(1, 3, g, g) for _ in range(2)]
        crops += [torch.randn(1, 3, loc, loc) for _ in range(n_local)]
        counter = FlopCounterMode(display=False)
        with counter:
            student(crops).sum().backward()  # student forward + backward, all crops
            with torch.no_grad():
                student(crops[:2])  # the teacher's forward (same network) on the global crops
    return float(counter.get_total_flops())


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return name, value
    return name, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _nbytes(tensors: list[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def bench_model(
    key: str, cfg: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    n_local, batch = args.n_local, args.batch or cfg["batch"]
    g, loc = cfg.get("global_size", 224), cfg.get("local_size", 96)
    out_dim = cfg.get("out_dim", 65536)
    torch.manual_seed(0)
    student, teacher = build_networks(cfg)
    variants = [make_reference(student, teacher, 2 + n_local, out_dim, device)]
    variants.append(make_ours(student, teacher, 2 + n_local, out_dim, device))
    if args.compile:
        variants.append(make_ours(student, teacher, 2 + n_local, out_dim, device, compile=True))
    del student, teacher
    crops = [torch.randn(batch, 3, g, g, device=device) for _ in range(2)]
    crops += [torch.randn(batch, 3, loc, loc, device=device) for _ in range(n_local)]
    # epoch >= freeze_last_layer: the whole head trains, as in most of a run.
    kw = dict(epoch=1.0, teacher_temp=0.04, momentum=0.996)

    # CPU: seconds of this process's CPU time (one thread), so other load on the machine does
    # not count against either variant; CUDA: wall time between two synchronisations.
    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def run(v: Variant, n: int) -> float:
        v.set_lr(1e-4, 0.04)
        _sync(device)
        t0 = clock()
        for _ in range(n):
            v.step(crops, **kw)
        _sync(device)
        return (clock() - t0) / n

    times: dict[str, list[float]] = {v.name: [] for v in variants}
    peak: dict[str, int | None] = {v.name: None for v in variants}
    for v in variants:
        run(v, args.warmup)  # allocator, cuDNN/cuBLAS heuristics, compilation
    for r in range(args.rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            if device.type == "cuda":
                gc.collect()
                own_before = _nbytes(v.tensors())
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            times[v.name].append(run(v, args.steps))
            if device.type == "cuda":
                footprint = torch.cuda.max_memory_allocated(device) - base + own_before
                peak[v.name] = max(peak[v.name] or 0, footprint)
    flops_img = count_step_flops(cfg, n_local)
    _, peak_tf = peak_tflops(device)
    rows: dict[str, dict[str, Any]] = {}
    for v in variants:
        step_s = statistics.median(times[v.name])
        achieved = flops_img * batch / step_s
        rows[v.name] = {
            "step_time_s": step_s,
            "step_time_min_s": min(times[v.name]),
            "images_per_s": batch / step_s,
            "peak_memory_mib": None if peak[v.name] is None else peak[v.name] / 2**20,
            "achieved_tflops": achieved / 1e12,
            "mfu": None if peak_tf is None else achieved / (peak_tf * 1e12),
        }
    ref = rows["reference"]
    ratios: dict[str, dict[str, float | None]] = {}
    for name, row in rows.items():
        if name == "reference":
            continue
        mem = row["peak_memory_mib"]
        ratios[name] = {
            "images_per_s": row["images_per_s"] / ref["images_per_s"],
            "peak_memory": None if mem is None else mem / ref["peak_memory_mib"],
        }
    return {
        "model": key,
        "arch": cfg["arch"],
        "patch_size": cfg["patch_size"],
        "batch": batch,
        "crops": f"2x{g} + {n_local}x{loc}",
        "model_tflop_per_step": flops_img * batch / 1e12,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "variants": rows,
        "ratios_vs_reference": ratios,
    }


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_result(res: dict[str, Any]) -> None:
    print(
        f"\n{res['model']}: {res['arch']} patch {res['patch_size']}, batch {res['batch']}, "
        f"crops {res['crops']}, model FLOPs {1e3 * res['model_tflop_per_step']:.4g} GFLOP/step, "
        f"median of {res['rounds']} rounds x {res['steps_per_round']} steps"
    )
    print(f"  {'variant':<13} {'step ms':>9} {'images/s':>10} {'peak MiB':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6}")  # fmt: skip
    for name, row in res["variants"].items():
        mfu = None if row["mfu"] is None else 100 * row["mfu"]
        print(
            f"  {name:<13} {1e3 * row['step_time_s']:9.2f} {row['images_per_s']:10.1f} "
            f"{_fmt(row['peak_memory_mib'], '9.0f'):>9} {row['achieved_tflops']:8.2f} "
            f"{_fmt(mfu, '5.1f') + ('%' if mfu is not None else ''):>6}"
        )
    for name, r in res["ratios_vs_reference"].items():
        mem = _fmt(r["peak_memory"], ".2f") + ("x" if r["peak_memory"] is not None else "")
        print(f"  ratio {name} / reference: images/s {r['images_per_s']:.2f}x, peak memory {mem}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=[*CONFIGS, "tiny"])
    parser.add_argument("--tiny", action="store_true", help="the tiny ViT only (CPU-sized)")
    parser.add_argument("--no-auto-tiny", action="store_true", help="full models on CPU too")
    parser.add_argument(
        "--batch", type=int, default=0, help="per-device batch (default: per model)"
    )
    parser.add_argument("--n-local", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time ours + torch.compile")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    for name in ("batch", "steps", "warmup", "rounds", "n_local"):
        if getattr(args, name) < (0 if name in ("batch", "warmup", "n_local") else 1):
            parser.error(f"--{name.replace('_', '-')} is out of range")
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    models = ["tiny"] if args.tiny else (args.model or ["s16", "b16", "b8"])
    if device.type == "cpu" and not args.no_auto_tiny and models != ["tiny"]:
        print(f"CPU: running the tiny model instead of {', '.join(models)} (--no-auto-tiny)")
        models = ["tiny"]
    if device.type == "cpu":
        torch.set_num_threads(1)  # per-core figures; shared cores make threads spin-wait
    name, peak_tf = peak_tflops(device)
    print(
        f"device {name}, dense bf16/fp16 peak {_fmt(peak_tf, '.0f')} TFLOP/s, torch "
        f"{torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    results = []
    for key in dict.fromkeys(models):
        cfg = TINY if key == "tiny" else CONFIGS[key]
        res = bench_model(key, cfg, args, device)
        print_result(res)
        results.append(res)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": name,
            "peak_tflops": peak_tf,
            "torch": torch.__version__,
            "results": results,
        }
        args.out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
