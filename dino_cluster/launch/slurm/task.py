"""The callable submitit runs in every task (one per GPU or CPU worker) of a SLURM job.

submitit pickles an instance on the login node and calls it inside `srun` on the compute
nodes. It sets the torch.distributed variables from SLURM's, records the (re)start, trains,
and, when the loop stopped on a signal after writing its checkpoint, requeues the job (rank 0
only) and exits with 3. The requeued job runs this again and the loop resumes by itself.

submitit's own USR2 handler would checkpoint inside the signal handler and counts restarts
by elapsed time; ours only sets the flag the loop polls (checkpoint after the current step),
and counts restarts with SLURM_RESTART_COUNT.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from dino_cluster.launch.slurm import env as slurm_env
from dino_cluster.launch.slurm import job as slurm_job
from dino_cluster.train.signals import StopRequest

log = logging.getLogger("dino_cluster.slurm")


class SlurmTrainTask:
    def __init__(self, spec_path: str | Path, run_dir: str | Path, max_requeues: int) -> None:
        self.spec_path = str(spec_path)
        self.run_dir = str(run_dir)
        self.max_requeues = int(max_requeues)

    def __call__(self) -> dict:
        # First thing: from here on a signal means "checkpoint after this step, then stop",
        # replacing submitit's handlers (USR2: requeue at once without a checkpoint).
        from dino_cluster.spec import load_spec

        spec = load_spec(self.spec_path)
        stop = StopRequest()
        stop.install(spec.checkpoint.on_signals)
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            force=True,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        os.environ.update(slurm_env.torch_env(os.environ))
        rank = int(os.environ["RANK"])
        job_id = os.environ["SLURM_JOB_ID"]
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        if rank == 0:
            ok = slurm_job.record_start(
                self.run_dir, job_id=job_id, restarts=restarts, max_requeues=self.max_requeues
            )
        else:
            ok = restarts <= self.max_requeues
        if not ok:
            raise SystemExit(slurm_job.EXIT_CAPPED)
        log.info(
            "rank %d of %s (job %s, restart %d), master %s:%s",
            rank,
            os.environ["WORLD_SIZE"],
            job_id,
            restarts,
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
        )

        from dino_cluster.train.loop import train

        result = train(spec, stop=stop, install_signal_handlers=False)
        log.info("training %s at step %d", result.status, result.step)
        if result.status != "stopped":
            return {"status": result.status, "step": result.step}
        if rank == 0:
            decision = slurm_job.decide(
                self.run_dir,
                code=slurm_env.EXIT_STOPPED,
                job_id=job_id,
                restarts=restarts,
                max_requeues=self.max_requeues,
            )
            command = {
                "requeue": ["scontrol", "requeue", job_id],
                "cancel": ["scancel", job_id],
            }.get(decision)
            if command:
                done = subprocess.run(command, capture_output=True, text=True, check=False)
                if done.returncode:
                    log.error("%s failed: %s", " ".join(command), done.stderr.strip())
        # SystemExit, not a return: submitit then writes no "success" result for this instance.
        raise SystemExit(slurm_env.EXIT_STOPPED)
