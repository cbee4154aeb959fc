"""A private Ray head node on this machine, and Ray token authentication helpers.

Used for the quickstart's embedded Ray (no `launcher.ray.address`) and by the test suite.
Other Ray clusters may share the machine, so this one never uses Ray's default ports
(6379, 8265, 52365), keeps its own temp dir, binds the dashboard to loopback, and is stopped
through the process id of its `ray start --block` supervisor (SIGTERM makes it stop the
raylet, GCS, dashboard and workers it started). `ray stop` is never used: it stops every
Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dino_cluster.launch.errors import LaunchError
from dino_cluster.launch.procs import free_port
from dino_cluster.metrics.catalogue import SD_DIR_ENV

# -- token authentication -------------------------------------------------------------------


def auth_token() -> str | None:
    """The Ray auth token the way Ray finds it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then
    ~/.ray/auth_token. Never logged or written anywhere by us."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return token or None


def enable_token_auth() -> bool:
    """Turn on RAY_AUTH_MODE=token for this process (and children) when a token exists and
    the user did not choose a mode. Ray's clients read the mode from the environment."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode is not None:
        return mode.lower() == "token"
    if auth_token() is None:
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


def auth_headers() -> dict[str, str]:
    """HTTP headers for the dashboard / Jobs API (empty when auth is disabled)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def loopback_env() -> dict[str, str]:
    """Environment that keeps a one-machine Ray on 127.0.0.1 (Ray otherwise rewrites the
    node address to the machine's external one)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


# -- reaching a cluster --------------------------------------------------------------------


def check_reachable(address: str, timeout_s: float) -> None:
    """LaunchError (one line) unless something answers at the Ray `address` within
    `timeout_s`: a TCP connection to a GCS host:port, or the Jobs API's version endpoint.
    Ray's own client would retry a wrong address forever."""
    import socket
    import urllib.error
    import urllib.request

    setting = "--address / launcher.ray.address"
    if address.startswith(("http://", "https://")):
        url = f"{address.rstrip('/')}/api/version"
        try:
            req = urllib.request.Request(url, headers=auth_headers())
            with urllib.request.urlopen(req, timeout=timeout_s):
                return
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise LaunchError(
                    f"the Ray Jobs API at {address} refused our token (HTTP {exc.code}): set "
                    "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, or put it in ~/.ray/auth_token"
                ) from None
            return  # it answers: an older Ray without /api/version is still a Ray
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LaunchError(
                f"no Ray Jobs API answers at {address} within {timeout_s:g} s ({reason}): "
                f"check {setting} (the dashboard URL, usually http://HEAD:8265)"
            ) from None
    if address == "auto":
        return  # Ray finds the cluster of this machine itself, and says so when there is none
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise LaunchError(
            f"{setting} {address!r} is not HOST:PORT, auto or an http(s):// Jobs API URL"
        )
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            return
    except OSError as exc:
        raise LaunchError(
            f"no Ray cluster answers at {address} within {timeout_s:g} s ({exc.strerror or exc}):"
            f" check {setting} (the head's GCS address, HOST:6379 by default) and that the "
            "cluster runs"
        ) from None


# -- the head node --------------------------------------------------------------------------


_PORT_NAMES = (
    "gcs",
    "dashboard",
    "client",
    "agent_listen",
    "agent_grpc",
    "metrics",
    "runtime_env",
    "node_manager",
    "object_manager",
)


def _head_command(
    ports: dict[str, int], temp_dir: Path, num_cpus: int | None, num_gpus: int | None
) -> list[str]:
    """`ray start --head --block` on loopback with every port chosen (none of Ray's
    defaults, which another Ray on the machine may hold)."""
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={ports['gcs']}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={ports['dashboard']}",
        "--include-dashboard=true",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--runtime-env-agent-port={ports['runtime_env']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        cmd.append(f"--num-gpus={num_gpus}")
    return cmd


@dataclass
class LocalRayCluster:
    """A running `ray start --head --block` on loopback; `stop()` ends it by process id."""

    temp_dir: Path
    gcs_port: int
    dashboard_port: int
    process: subprocess.Popen
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    owns_temp_dir: bool = False  # created by start(): removed by stop()
    cleanup_dirs: list[Path] = field(default_factory=list)  # also removed by stop()
    cleanup_files: list[Path] = field(default_factory=list)  # also removed by stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    @classmethod
    def start(
        cls,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        temp_dir: str | Path | None = None,
        timeout_s: float = 120.0,
        env: dict[str, str] | None = None,
    ) -> LocalRayCluster:
        """Start a head node and wait until its GCS and Jobs API answer."""
        owns_temp_dir = temp_dir is None
        if temp_dir is None:
            # Short path: Ray's unix socket paths must stay under ~100 characters.
            temp_dir = tempfile.mkdtemp(prefix="dino-ray-", dir="/tmp")
        temp_dir = Path(temp_dir)
        temp_dir.mkdir(parents=True, exist_ok=True)
        ports: dict[str, int] = {}
        while len(ports) < len(_PORT_NAMES):
            p = free_port()
            if p not in ports.values():
                ports[_PORT_NAMES[len(ports)]] = p
        full_env = dict(os.environ, **loopback_env(), **(env or {}))
        # Jobs submitted to this cluster run `python ...` from PATH: make that ours (the
        # environment that started the cluster, as an activated environment would).
        bin_dir = os.path.dirname(sys.executable)
        full_env["PATH"] = os.pathsep.join([bin_dir, full_env.get("PATH", "")])
        log_path = temp_dir / "ray-start.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                _head_command(ports, temp_dir, num_cpus, num_gpus),
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        cluster = cls(
            temp_dir=temp_dir,
            gcs_port=ports["gcs"],
            dashboard_port=ports["dashboard"],
            process=proc,
            log_path=log_path,
            ports=ports,
            owns_temp_dir=owns_temp_dir,
        )
        try:
            cluster._wait_ready(timeout_s)
            cluster._announce_metrics()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _announce_metrics(self) -> None:
        """Let the operator's Prometheus find this Ray's metrics: Ray writes its file-SD
        targets into its own temp dir, which no config can glob (Prometheus globs file
        names only), so with DINO_PROMETHEUS_SD_DIR set a link to it goes into
        $DINO_PROMETHEUS_SD_DIR/ray/ (infra/prometheus/prometheus.yml reads ray/*.json)."""
        shared = os.environ.get(SD_DIR_ENV)
        if not shared:
            return
        link = Path(shared) / "ray" / f"{self.temp_dir.name}.json"
        try:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(self.temp_dir / "prom_metrics_service_discovery.json")
            self.cleanup_files.append(link)
        except OSError as exc:  # metrics discovery never stops a run
            print(f"warning: could not link Ray's metrics targets into {link}: {exc}")

    def _wait_ready(self, timeout_s: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        url = f"{self.dashboard_url}/api/jobs/"
        while True:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise LaunchError(
                    f"the local Ray head exited (code {self.process.returncode}):\n{tail}"
                )
            try:
                req = urllib.request.Request(url, headers=auth_headers())
                with urllib.request.urlopen(req, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise LaunchError(
                    f"the local Ray head did not answer within {timeout_s:.0f} s "
                    f"(log: {self.log_path})"
                )
            time.sleep(0.5)

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM the supervisor (it stops what it started); SIGKILL its group if stuck."""
        try:
            self._stop(timeout_s)
        finally:
            if self.owns_temp_dir:
                shutil.rmtree(self.temp_dir, ignore_errors=True)
            for path in self.cleanup_dirs:
                shutil.rmtree(path, ignore_errors=True)
            for path in self.cleanup_files:
                path.unlink(missing_ok=True)

    def _stop(self, timeout_s: float) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(10)
