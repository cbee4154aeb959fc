"""Small process and file helpers the backends share: is a pid alive, a free port, follow
a log file while something runs."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dino_cluster.launch.errors import LaunchError

# Ray's own worker port range; ports we pick must stay out of it (Ray may share the machine).
_RAY_WORKER_PORTS = range(10002, 20000)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now, outside Ray's worker port range."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _RAY_WORKER_PORTS:
            return port
    raise LaunchError("could not find a free port outside 10002-19999")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs; a zombie child of ours is reaped and counts as ended."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def follow(path: Path, running: Callable[[], bool], offset: int = 0, poll_s: float = 0.2) -> int:
    """Print `path` from `offset`; keep printing new bytes while `running()` is true, then
    the rest. Returns the offset reached."""
    if not path.exists():
        raise LaunchError(f"{path}: no log yet")
    with open(path, "rb") as fh:
        fh.seek(offset)
        while True:
            chunk = fh.read(65536)
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                continue
            if not running():
                rest = fh.read()
                if rest:
                    sys.stdout.write(rest.decode("utf-8", "replace"))
                    sys.stdout.flush()
                return fh.tell()
            time.sleep(poll_s)
