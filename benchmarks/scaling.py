"""Scaling: measured throughput at 1 and 2 Ray workers, and a model of 64+ nodes. Not a test.

    python benchmarks/scaling.py                  # 1 vs 2 CPU workers on a local Ray (~2-3 min)
    python benchmarks/scaling.py --tiny           # smallest run (strong scaling only, for CI)
    python benchmarks/scaling.py --address 127.0.0.1:PORT   # join an existing Ray instead
    python benchmarks/scaling.py --model          # the scaling model only: tables, no training

Throughput: the real trainer, launched through the Ray backend (`dino-cluster submit --backend
ray`, Ray Train TorchTrainer, DDP over gloo, one CPU per worker) on Fashion-MNIST shards (or
synthetic ones) packed into a temp dir, with a tiny ViT. Figures are read from the run's own
`metrics.jsonl` (`images_per_s`, `step_time_s`, `data_wait_frac`), windows that start before
`--warmup` steps excluded. Strong scaling keeps the global batch fixed (per-worker batch
halves at 2 workers); weak scaling keeps the per-worker batch fixed (global batch doubles).

Model: per-GPU data bandwidth from S3, all-reduce volume and time per step, checkpoint size and
write time for ViT-S/16, ViT-B/16 and ViT-B/8 with the DINO recipe (2x224 + 10x96 crops).
Parameter counts and FLOPs come from building the models with our own builders on the meta
device (no memory, no weights) and counting with torch's FlopCounterMode; the other inputs are
the named constants below, each one a command-line option.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")

# -- model inputs (each is an option; the README table uses these defaults) -------------------
H100_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H100 SXM bf16 dense peak
MFU_LEVELS = (0.25, 0.5)  # sustained model FLOPs utilisation: a typical and a good step
JPEG_KB = 110.0  # average ImageNet-1k train JPEG
SHARD_MB = 64.0  # MiB per WebDataset shard (`data pack --shard-size 64MiB`)
S3_CONN_MBPS = 85.0  # AWS guidance: one concurrent request per 85-90 MB/s
S3_UPLOAD_PARTS = 10  # parallel multipart parts of one checkpoint object upload
D2H_GBPS = 25.0  # pinned device-to-host copy (PCIe Gen4/5 x16, achieved)
GPUS_PER_NODE = 8
NODES = 64
IB_GBITPS = 400.0  # InfiniBand per node
ETH_GBITPS = 100.0  # Ethernet per node
CKPT_EVERY_STEPS = 1250  # jobs/vits16.yaml, jobs/vitb8.yaml
# Multi-crop samples per second per CPU core, measured by benchmarks/data_pipeline.py on the
# 2-core dev machine (benchmarks/README.md): everything on the CPU, and the CPU stage only
# (photometric ops on the accelerator).
AUG_PER_CORE_CPU = 96.9
AUG_PER_CORE_GPU_PHOTOMETRIC = 256.4


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    patch: int
    batch_per_gpu: int  # DINO-RECIPE.md (S/16: 64, B/16: 32) and jobs/vitb8.yaml (B/8: 32)
    norm_last_layer: bool  # jobs/vits16.yaml: False for ViT-S; True for ViT-B


CASES = (
    Case("ViT-S/16", "vit_small_patch16_224", 16, 64, False),
    Case("ViT-B/16", "vit_base_patch16_224", 16, 32, True),
    Case("ViT-B/8", "vit_base_patch8_224", 8, 32, True),
)


def count_model(case: Case, n_local: int = 10, out_dim: int = 65536) -> dict[str, float]:
    """Parameters (all, trainable) and training FLOPs per multi-crop image of one case.

    FLOPs: student forward + backward on 2 global (224) + n_local local (96) crops, plus the
    teacher's forward on the 2 global crops, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from dino_cluster.dino.model import DINOHead, MultiCropWrapper, build_backbone

    with torch.device("meta"):
        backbone = build_backbone(case.arch, patch_size=case.patch, drop_path_rate=0.0)
        head = DINOHead(
            int(backbone.num_features), out_dim=out_dim, norm_last_layer=case.norm_last_layer
        )
        student = MultiCropWrapper(backbone, head)
        crops = [torch.empty(1, 3, 224, 224)] * 2 + [torch.empty(1, 3, 96, 96)] * n_local
    params = sum(p.numel() for p in student.parameters())
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    with FlopCounterMode(display=False) as counter:
        student(crops).float().sum().backward()
        with torch.no_grad():
            student(crops[:2])  # the teacher: same architecture, global crops only
    return {
        "params": params,
        "trainable": trainable,
        "head_params": sum(p.numel() for p in head.parameters()),
        "gflop_per_image": counter.get_total_flops() / 1e9,
    }


def scaling_model(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (case, MFU level); every figure derived from the counted model and the
    inputs in `args`, so the README's numbers are reproducible."""
    ranks = args.nodes * args.gpus_per_node
    ring = 2 * (ranks - 1) / ranks  # bytes each rank sends (and receives) per byte reduced
    rows = []
    for case in CASES:
        m = count_model(case)
        grad_bytes = 4 * m["trainable"]  # fp32 gradients (autocast keeps parameters fp32)
        # student + teacher weights, AdamW exp_avg + exp_avg_sq of the trainable ones, center
        ckpt_bytes = 4 * (2 * m["params"] + 2 * m["trainable"] + 65536)
        ckpt_write_s = ckpt_bytes / (args.s3_upload_parts * args.s3_conn_mbps * 1e6)
        for mfu in args.mfu:
            img_s = mfu * args.peak_tflops * 1e12 / (m["gflop_per_image"] * 1e9)
            step_s = case.batch_per_gpu / img_s
            data_mbps = img_s * args.jpeg_kb / 1000  # MB/s per GPU
            allreduce_bytes = ring * grad_bytes
            interval_s = args.ckpt_every_steps * step_s
            rows.append(
                {
                    "model": case.name,
                    "batch_per_gpu": case.batch_per_gpu,
                    "params": m["params"],
                    "trainable": m["trainable"],
                    "head_params": m["head_params"],
                    "gflop_per_image": m["gflop_per_image"],
                    "mfu": mfu,
                    "images_per_s_per_gpu": img_s,
                    "step_ms": 1000 * step_s,
                    "s3_mb_s_per_gpu": data_mbps,
                    "s3_gbit_s_per_node": data_mbps * args.gpus_per_node * 8 / 1000,
                    "s3_connections_per_node": data_mbps * args.gpus_per_node / args.s3_conn_mbps,
                    "s3_aggregate_gb_s": data_mbps * ranks / 1000,
                    # one GET per shard (plus a Range GET after a dropped connection)
                    "s3_gets_per_s": data_mbps * 1e6 * ranks / (args.shard_mb * 2**20),
                    "cpu_cores_per_gpu_cpu_aug": img_s / AUG_PER_CORE_CPU,
                    "cpu_cores_per_gpu_gpu_aug": img_s / AUG_PER_CORE_GPU_PHOTOMETRIC,
                    "grad_bytes": grad_bytes,
                    "ranks": ranks,
                    "allreduce_bytes_per_rank": allreduce_bytes,
                    # The ring's inter-node hop carries the same bytes as every hop, on the
                    # node's network link: time = bytes sent per rank / node bandwidth.
                    "allreduce_ms_ib": 1000 * allreduce_bytes * 8 / (args.ib_gbit * 1e9),
                    "allreduce_ms_eth": 1000 * allreduce_bytes * 8 / (args.eth_gbit * 1e9),
                    "ckpt_bytes": ckpt_bytes,
                    "ckpt_write_s": ckpt_write_s,
                    "ckpt_d2h_stall_s": ckpt_bytes / (args.d2h_gbps * 1e9),
                    "ckpt_interval_s": interval_s,
                    "ckpt_write_frac_of_interval": ckpt_write_s / interval_s,
                }
            )
    return rows


def print_model(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    ranks = rows[0]["ranks"]
    print(
        f"\nScaling model: {args.nodes} nodes x {args.gpus_per_node} GPUs = {ranks} ranks, "
        f"2x224 + 10x96 crops, out_dim 65536; peak {args.peak_tflops:.0f} TFLOP/s bf16; "
        f"JPEG {args.jpeg_kb:.0f} KB; S3 {args.s3_conn_mbps:.0f} MB/s per connection; "
        f"checkpoint every {args.ckpt_every_steps} steps, {args.s3_upload_parts} upload parts\n"
    )
    print(
        "| model | batch/GPU | student params (trainable) | GFLOP/img | MFU | img/s/GPU | step ms "
        "| S3 MB/s/GPU | S3 Gb/s/node (conns) | CPU cores/GPU (CPU aug, GPU aug) | grads MB "
        f"| all-reduce ms (% of step): IB {args.ib_gbit:.0f} / Eth {args.eth_gbit:.0f} Gb/s "
        "| ckpt GB | ckpt write s (% of interval) |"
    )
    print("|---|" + "---:|" * 12)
    for r in rows:
        step = r["step_ms"]
        print(
            f"| {r['model']} | {r['batch_per_gpu']} | {r['params'] / 1e6:.1f} M "
            f"({r['trainable'] / 1e6:.1f} M) | {r['gflop_per_image']:.0f} | {r['mfu']:.2f} "
            f"| {r['images_per_s_per_gpu']:,.0f} | {step:.0f} "
            f"| {r['s3_mb_s_per_gpu']:.0f} | {r['s3_gbit_s_per_node']:.1f} "
            f"({r['s3_connections_per_node']:.0f}) "
            f"| {r['cpu_cores_per_gpu_cpu_aug']:.0f}, {r['cpu_cores_per_gpu_gpu_aug']:.0f} "
            f"| {r['grad_bytes'] / 1e6:.0f} "
            f"| {r['allreduce_ms_ib']:.1f} ({100 * r['allreduce_ms_ib'] / step:.0f} %) / "
            f"{r['allreduce_ms_eth']:.1f} ({100 * r['allreduce_ms_eth'] / step:.0f} %) "
            f"| {r['ckpt_bytes'] / 1e9:.2f} "
            f"| {r['ckpt_write_s']:.1f} ({100 * r['ckpt_write_frac_of_interval']:.1f} %) |"
        )
    per_case = rows[:: len(args.mfu)]
    print(
        f"\nall-reduce: ring over {ranks} ranks, each rank sends 2(n-1)/n = "
        f"{2 * (ranks - 1) / ranks:.3f} x grads per step; DINO head (out_dim 65536) params: "
        + ", ".join(f"{r['model']} {r['head_params'] / 1e6:.1f} M" for r in per_case)
    )
    print(
        f"S3 for all {ranks} ranks at MFU {args.mfu[-1]:.2f} ({args.shard_mb:.0f} MiB shards): "
        + ", ".join(
            f"{r['model']} {r['s3_aggregate_gb_s']:.0f} GB/s in {r['s3_gets_per_s']:,.0f} GET/s"
            for r in rows[len(args.mfu) - 1 :: len(args.mfu)]
        )
    )
    print(
        "checkpoint: student + teacher + AdamW moments + center, fp32; loop stall (device->"
        f"host copy at {args.d2h_gbps:.0f} GB/s): "
        + ", ".join(f"{r['model']} {1000 * r['ckpt_d2h_stall_s']:.0f} ms" for r in per_case)
    )


# -- measured throughput on a local Ray -------------------------------------------------------

TINY_MODEL = [
    "model.depth=2",
    "model.embed_dim=64",
    "model.num_heads=2",
    "model.out_dim=256",
    "model.hidden_dim=64",
    "model.bottleneck_dim=32",
    "method.crops.n_local=2",
]


def pack_shards(dest: Path, images: int) -> Path:
    """Fashion-MNIST (real images) when installed, else synthetic PNGs; returns index.json."""
    from dino_cluster.data.pack import pack

    src = FMNIST
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        import numpy as np
        from PIL import Image

        src = dest / "synthetic"
        rng = np.random.default_rng(0)
        for i in range(images):
            folder = src / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        src = src.resolve()
    shards = dest / "shards"
    pack(str(src), str(shards), limit=images, max_samples_per_shard=images // 8, progress=False)
    return shards / "index.json"


def start_ray(tmp: Path) -> Any:
    """A private Ray head on loopback with its own token (never ~/.ray); stopped by pid."""
    from dino_cluster.launch.ray.cluster import LocalRayCluster, auth_token, loopback_env

    os.environ.update(loopback_env())
    # Ray Train's controller takes a worker's report every health-check interval (default
    # 2 s) and the worker's report queue holds one: a report at log cadence blocks the next
    # steps until the previous one is taken, which lands in the step-time window. Poll often.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    if os.environ["RAY_AUTH_MODE"].lower() == "token" and auth_token() is None:
        token = tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    # 4 logical CPUs: two 1-CPU workers plus the Train controller fit beside each other.
    cluster = LocalRayCluster.start(num_cpus=4, num_gpus=0, timeout_s=180)
    os.environ["RAY_API_SERVER_ADDRESS"] = cluster.dashboard_url
    return cluster


def run_one(
    args: argparse.Namespace, address: str, shards: Path, run_dir: Path, workers: int, batch: int
) -> dict[str, Any]:
    """Train through `dino-cluster submit --backend ray`; summarise its metrics.jsonl."""
    name = f"scale-w{workers}-b{batch}"
    sets = [
        f"run.name={name}",
        f"run.dir={run_dir}",
        f"data.url={shards}",
        f"data.num_workers={args.data_workers}",
        "data.shuffle_buffer=64",
        "launcher.backend=ray",
        f"launcher.ray.address={address}",
        f"launcher.procs_per_node={workers}",
        "launcher.cpus_per_worker=1",
        f"optim.global_batch={batch}",
        f"optim.max_steps={args.steps}",
        f"checkpoint.every_steps={10 * args.steps}",  # only the final one, after the windows
        f"metrics.log_every_steps={args.log_every}",
        "evaluation.enabled=false",
        *(TINY_MODEL if args.tiny_model else []),
    ]
    job = REPO / "jobs" / "quickstart-vit.yaml"  # a ViT: the model the scaling figures are for
    cmd = [sys.executable, "-m", "dino_cluster.cli", "submit", str(job)]
    cmd += [a for s in sets for a in ("--set", s)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(
            f"{name} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
        )
    rows = [
        json.loads(line) for line in (run_dir / name / "metrics.jsonl").read_text().splitlines()
    ]
    # A row covers the steps since the previous row; keep windows that start after warm-up.
    kept, prev = [], 0
    for row in rows:
        if prev >= args.warmup and "step_time_s" in row:
            kept.append((row["step"] - prev, row))
        prev = row["step"]
    if not kept:
        raise SystemExit(f"{name}: no logged window after {args.warmup} warm-up steps")
    steps = sum(n for n, _ in kept)
    seconds = sum(n * r["step_time_s"] for n, r in kept)
    wait = sum(n * r["step_time_s"] * r["data_wait_frac"] for n, r in kept)
    return {
        "workers": workers,
        "global_batch": batch,
        "per_worker_batch": batch // workers,
        "steps_measured": steps,
        "step_time_s": seconds / steps,
        "images_per_s": batch * steps / seconds,
        "data_wait_frac": wait / seconds,
        "world_size": int(kept[-1][1].get("world_size", workers)),
        "wall_s": wall,
    }


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="dino-scale-", dir="/tmp"))
    cluster = None
    try:
        print(f"work dir {tmp} (removed at the end)", flush=True)
        shards = pack_shards(tmp, args.images)
        address = args.address
        if address is None:
            cluster = start_ray(tmp)
            address = cluster.address
            print(f"local Ray on {address} (pid {cluster.pid}), 4 logical CPUs", flush=True)
        b = args.batch
        runs = {"1w": run_one(args, address, shards, tmp / "runs", 1, b)}
        runs["2w"] = run_one(args, address, shards, tmp / "runs", 2, b)
        if args.mode == "both":
            runs["2w_weak"] = run_one(args, address, shards, tmp / "runs", 2, 2 * b)
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    result: dict[str, Any] = {"cpu_count": os.cpu_count(), "runs": runs}
    one, two = runs["1w"], runs["2w"]
    # Strong: same global batch; ideal is 2x images/s. Efficiency = speed-up / workers.
    result["strong_speedup"] = two["images_per_s"] / one["images_per_s"]
    result["strong_efficiency"] = result["strong_speedup"] / 2
    if "2w_weak" in runs:
        # Weak: same per-worker batch; ideal is 2x images/s at the same step time.
        result["weak_speedup"] = runs["2w_weak"]["images_per_s"] / one["images_per_s"]
        result["weak_efficiency"] = result["weak_speedup"] / 2
    return result


def print_throughput(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"\nThroughput on a local Ray (CPU workers, gloo DDP), {args.steps} steps, warm-up "
        f"{args.warmup} excluded, {result['cpu_count']} CPU cores on this machine"
    )
    print("| run | workers | global batch | per-worker batch | images/s | step ms | data wait |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for key, r in result["runs"].items():
        print(
            f"| {key} | {r['workers']} | {r['global_batch']} | {r['per_worker_batch']} "
            f"| {r['images_per_s']:.1f} | {1000 * r['step_time_s']:.0f} "
            f"| {100 * r['data_wait_frac']:.0f} % |"
        )
    print(
        f"\nstrong scaling (global batch {args.batch}): 2 workers / 1 worker = "
        f"{result['strong_speedup']:.2f}x images/s, parallel efficiency "
        f"{100 * result['strong_efficiency']:.0f} %"
    )
    if "weak_speedup" in result:
        print(
            f"weak scaling (per-worker batch {args.batch}): 2 workers / 1 worker = "
            f"{result['weak_speedup']:.2f}x images/s, parallel efficiency "
            f"{100 * result['weak_efficiency']:.0f} %"
        )
    if (result["cpu_count"] or 1) <= 2:
        print(
            "note: this machine has <= 2 cores shared by the Ray head, the driver and both "
            "workers, so 2 workers cannot be expected to scale here: the figures show the "
            "path works, not cluster efficiency"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", action="store_true", help="print the scaling model only")
    p.add_argument("--no-model", action="store_true", help="measure only, no model table")
    p.add_argument("--tiny", action="store_true", help="smallest run: 6 steps, strong only")
    p.add_argument("--address", help="an existing Ray (host:port); default: start one")
    p.add_argument(
        "--mode",
        choices=("strong", "both"),
        default="strong",
        help="both: also weak scaling (a third run)",
    )
    p.add_argument("--batch", type=int, default=32, help="global batch (strong) / per worker")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=4, help="steps excluded from the figures")
    p.add_argument("--log-every", type=int, default=2)
    p.add_argument("--images", type=int, default=1024, help="images packed into 8 shards")
    p.add_argument("--data-workers", type=int, default=0, help="data.num_workers per rank")
    p.add_argument(
        "--no-tiny-model",
        dest="tiny_model",
        action="store_false",
        help="the quickstart ViT instead of the 2-block one",
    )
    p.add_argument("--run-timeout", type=float, default=600.0)
    p.add_argument("--out", type=Path, help="write the figures as JSON")
    g = p.add_argument_group("scaling model inputs")
    g.add_argument("--nodes", type=int, default=NODES)
    g.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    g.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS)
    g.add_argument("--mfu", type=float, nargs="+", default=list(MFU_LEVELS))
    g.add_argument("--jpeg-kb", type=float, default=JPEG_KB)
    g.add_argument("--shard-mb", type=float, default=SHARD_MB)
    g.add_argument("--s3-conn-mbps", type=float, default=S3_CONN_MBPS)
    g.add_argument("--s3-upload-parts", type=int, default=S3_UPLOAD_PARTS)
    g.add_argument("--d2h-gbps", type=float, default=D2H_GBPS)
    g.add_argument("--ib-gbit", type=float, default=IB_GBITPS)
    g.add_argument("--eth-gbit", type=float, default=ETH_GBITPS)
    g.add_argument("--ckpt-every-steps", type=int, default=CKPT_EVERY_STEPS)
    args = p.parse_args(argv)
    if args.tiny:
        args.mode, args.batch, args.steps, args.warmup, args.images = "strong", 16, 6, 2, 256
    if args.model and args.no_model:
        p.error("--model and --no-model exclude each other")
    if args.batch % 2:
        p.error("--batch must be even (it is split over 2 workers)")
    if args.steps <= args.warmup + args.log_every - 1:
        p.error("--steps must leave at least one logged window after --warmup")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: dict[str, Any] = {"inputs": {k: v for k, v in vars(args).items() if k != "out"}}
    out["inputs"]["cases"] = [asdict(c) for c in CASES]
    if not args.model:
        out["throughput"] = throughput(args)
        print_throughput(out["throughput"], args)
    if not args.no_model:
        out["model"] = scaling_model(args)
        print_model(out["model"], args)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
