"""Two Ray nodes on this machine, started the way a user starts a cluster (``scripts/ray_cluster.sh head`` and
``worker``): two raylets with one logical GPU each, on loopback, in a private Ray temp dir with private ports and
a token of their own (Ray's token authentication, which every client here sends), so no other Ray on the machine
joins them or is joined. Nothing is set on the nodes by hand (no ``VERL_PLATFORM``):
whatever CPU mode needs must reach their workers through the job. Stopping kills only the processes they
started (never ``ray stop``, which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from e2e_harness import REPO

SCRIPT = REPO / "scripts" / "ray_cluster.sh"
RAY_BIN = str(Path(sys.executable).parent / "ray")  # this interpreter's Ray CLI
START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports each raylet would otherwise take at their fixed defaults (two on one host would collide)."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


@dataclass
class RayNodes:
    port: int
    dashboard_port: int
    temp_dir: str
    token: str = field(default_factory=lambda: secrets.token_hex(32))
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def client_env(self) -> dict:
        """What ``scripts/ray_cluster.sh submit`` and ``ray list`` need to reach this cluster."""
        return {"RAY_BIN": RAY_BIN, "RAY_TMPDIR": self.temp_dir, "RAY_DASHBOARD_PORT": str(self.dashboard_port),
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def ray(self, *args: str) -> list[dict]:
        """``ray list <args> --format json`` against this cluster (Ray's state API, through its dashboard)."""
        out = subprocess.run([RAY_BIN, "list", *args, f"--address=http://127.0.0.1:{self.dashboard_port}",
                              "--format", "json", "--limit", "10000"], capture_output=True, text=True, timeout=60,
                             env={**os.environ, **self.client_env}, check=True)
        return json.loads(out.stdout)

    def logs(self) -> str:
        return "\n".join(Path(self.temp_dir, f"{name}.log").read_text(errors="replace")[-3000:]
                         for name in ("head", "worker") if Path(self.temp_dir, f"{name}.log").exists())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, to each ``ray start --block`` process group and every process under it."""
        family = []
        for proc in self.procs:
            try:
                family += [proc.pid, *(child.pid for child in psutil.Process(proc.pid).children(recursive=True))]
            except psutil.NoSuchProcess:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for proc in self.procs:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    pass
            for pid in family:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            _, alive = psutil.wait_procs([p for p in map(_process, family) if p is not None], timeout=10)
            if not alive:
                break
        for proc in self.procs:
            proc.wait(timeout=10)


def _process(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@contextmanager
def two_ray_nodes(cpus_per_node: int = 8):
    """A head and a worker node (one logical GPU each), up until the block ends."""
    temp_dir = tempfile.mkdtemp(prefix="ercnodes", dir="/tmp")  # short: Ray puts unix sockets under it
    nodes = RayNodes(port=free_port(), dashboard_port=free_port(), temp_dir=temp_dir)
    env = {key: value for key, value in os.environ.items() if not key.startswith("VERL_")}
    env.update(nodes.client_env, RAY_HEAD_IP="127.0.0.1", RAY_PORT=str(nodes.port), RAY_NUM_GPUS="1",
               RAY_NUM_CPUS=str(cpus_per_node))
    common = ["--block", "--disable-usage-stats"]
    try:
        with open(Path(temp_dir, "head.log"), "w") as log:
            nodes.procs.append(subprocess.Popen(
                ["bash", str(SCRIPT), "head", f"--ray-client-server-port={free_port()}", *common, *_node_ports()],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for_nodes(nodes, 1)
        with open(Path(temp_dir, "worker.log"), "w") as log:
            nodes.procs.append(subprocess.Popen(
                ["bash", str(SCRIPT), "worker", f"127.0.0.1:{nodes.port}", "--node-ip-address=127.0.0.1",
                 *common, *_node_ports()],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_for_nodes(nodes, 2)
        yield nodes
    finally:
        nodes.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(nodes: RayNodes, count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = ""
    while time.monotonic() < deadline:
        for proc in nodes.procs:
            assert proc.poll() is None, f"a Ray node exited ({proc.returncode}):\n{nodes.logs()}"
        try:
            if len([n for n in nodes.ray("nodes") if n["state"] == "ALIVE"]) >= count:
                return
        except subprocess.CalledProcessError as err:  # the dashboard may still be starting
            last_error = err.stderr[-2000:]
        except json.JSONDecodeError as err:
            last_error = f"not JSON: {err.doc[:2000]!r}"
        time.sleep(3)
    raise AssertionError(f"{count} Ray node(s) not up after {START_TIMEOUT_S} s; `ray list nodes`: {last_error}\n"
                         f"{nodes.logs()}")
