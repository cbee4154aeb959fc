"""How fast `dino-cluster` answers: wall time and peak memory of each command, against a bare
`python -c pass` and `ray --help` measured in the same run.

Every command that only reads a spec or a run folder should answer at once: none of them
may import torch, Ray or boto3 (tests/test_architecture.py checks the imports; this
measures what a user waits for). Target (issue: first contact): <= 0.5 s and <= 120 MB for
--help, validate, render and status on the 2-core development machine.

    python benchmarks/cli_startup.py [--repeat 5] [--run RUN_FOLDER]

Without --run, a finished run folder is made up in a temporary folder (its record, resolved
spec, a log line, an empty checkpoint folder), which is all status/logs/cancel/checkpoints
read. Times are the median of --repeat runs; memory is the child's peak RSS (wait4).
Not a test.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def measure(cmd: list[str], repeat: int, cwd: Path) -> tuple[float, float, int]:
    """(median wall seconds, peak RSS MiB, last exit code) of `cmd`."""
    walls, peaks, code = [], [], 0
    for _ in range(repeat):
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        walls.append(time.perf_counter() - t0)
        peaks.append(usage.ru_maxrss / 1024)  # KiB on Linux
        code = os.waitstatus_to_exitcode(status)
    return statistics.median(walls), max(peaks), code


def fake_run(root: Path) -> Path:
    """A finished local run folder with what the read-only commands look at."""
    sys.path.insert(0, str(REPO))
    from dino_cluster.launch.run_record import LocalRecord, write_record
    from dino_cluster.spec import load_spec, write_resolved

    spec = load_spec(REPO / "jobs" / "quickstart.yaml", [f"run.dir={root}", "run.name=bench"])
    run_dir = spec.run_dir
    write_resolved(spec, run_dir)
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "rank-0.log").write_text("step 10/930 loss 7.0\n")
    (run_dir / "checkpoints").mkdir()
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    write_record(run_dir, LocalRecord(pid=int(ended.stdout), world_size=1))
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--run", type=Path, default=None, help="an existing run folder")
    args = parser.parse_args()
    dino = str(BIN / "dino-cluster")
    ray = shutil.which("ray", path=str(BIN)) or shutil.which("ray")
    with tempfile.TemporaryDirectory(prefix="dino-cli-bench-") as tmp:
        run = str(args.run or fake_run(Path(tmp)))
        rows: list[tuple[str, list[str]]] = [
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("ray --help", [ray, "--help"] if ray else []),
            ("dino-cluster --help", [dino, "--help"]),
            ("dino-cluster --version", [dino, "--version"]),
            ("validate jobs/vitb8.yaml", [dino, "validate", "jobs/vitb8.yaml"]),
            ("render vitb8 --backend slurm", [dino, "render", "jobs/vitb8.yaml", "-b", "slurm"]),
            (
                "render vitb8 --backend kuberay",
                [dino, "render", "jobs/vitb8.yaml", "-b", "kuberay"],
            ),
            ("render vitb8 --backend ray", [dino, "render", "jobs/vitb8.yaml", "-b", "ray"]),
            ("submit quickstart --dry-run", [dino, "submit", "jobs/quickstart.yaml", "--dry-run"]),
            ("status RUN", [dino, "status", run]),
            ("logs RUN", [dino, "logs", run]),
            ("cancel RUN", [dino, "cancel", run]),
            ("checkpoints RUN", [dino, "checkpoints", run]),
        ]
        results = {}
        for name, cmd in rows:
            if cmd:
                results[name] = measure(cmd, args.repeat, REPO)
    base_s, base_mb, _ = results["python -c pass"]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}, median of {args.repeat} runs")  # fmt: skip
    print(f"{'command':<32} {'wall s':>7} {'x python':>9} {'peak MiB':>9} {'exit':>5}")
    for name, (wall, peak, code) in results.items():
        print(f"{name:<32} {wall:7.3f} {wall / base_s:9.1f} {peak:9.1f} {code:5d}")
    print(f"(bare python: {base_s:.3f} s, {base_mb:.0f} MiB; target <= 0.5 s and <= 120 MiB)")


if __name__ == "__main__":
    main()
