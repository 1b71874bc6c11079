"""Harness for the end-to-end tests: real training runs in a subprocess, on CPU (erc_verl.seams.cpu).

Each run is the user's command (``python -m erc_verl.main_ppo ...`` or ``bash recipe/cpu_tiny.sh ...``)
with ``VERL_PLATFORM=cpu``: local Ray, FSDP2 engine workers, vLLM's CPU build, TransferQueue, verl's
file logger for the metrics. Nothing is mocked. Runs are module-scoped fixtures, one at a time (each
takes a few GB), and their wall time and peak system memory go to ``$ERC_E2E_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 540


@dataclass
class Run:
    name: str
    returncode: int
    output: str
    steps: list[dict] = field(default_factory=list)  # verl's file logger: one metrics dict per step
    wall_s: float = 0.0
    peak_memory_gib: float = 0.0

    def check_ok(self) -> None:
        assert self.returncode == 0, f"{self.name} exited {self.returncode}:\n{self.output[-6000:]}"
        assert self.steps, f"{self.name} logged no training step:\n{self.output[-3000:]}"

    def identity(self) -> str:
        """The line erc_verl.main_ppo prints once the trainer is built (trainer, mode, replay buffer)."""
        lines = [line.split("erc-verl: ", 1)[1] for line in self.output.splitlines() if "erc-verl: trainer=" in line]
        assert len(lines) == 1, f"{self.name}: expected one 'erc-verl: trainer=...' line, got {lines}"
        return lines[0].strip()


class _PeakMemory:
    """Peak of the machine's used memory above its level at start (Ray, workers and vLLM all count)."""

    def __init__(self, interval_s: float = 0.5):
        self.baseline = psutil.virtual_memory().used
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval_s,), daemon=True)

    def _sample(self, interval_s):
        while not self._stop.wait(interval_s):
            self.peak = max(self.peak, psutil.virtual_memory().used)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def gib(self) -> float:
        return (self.peak - self.baseline) / 2**30


def run_training(name: str, argv: list[str], workdir: Path, env: dict | None = None) -> Run:
    metrics_file = workdir / f"{name}.metrics.jsonl"
    full_env = {**os.environ, "VERL_PLATFORM": "cpu", "VERL_FILE_LOGGER_PATH": str(metrics_file),
                "PYTHON": sys.executable, **(env or {})}
    start = time.monotonic()
    with _PeakMemory() as memory:
        # own process group: on a timeout Ray, its workers and vLLM go down with the driver
        proc = subprocess.Popen(argv, cwd=workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            output += f"\n[e2e harness: killed after {RUN_TIMEOUT_S} s]"
    run = Run(name=name, returncode=proc.returncode, output=output, wall_s=time.monotonic() - start,
              peak_memory_gib=memory.gib)
    if metrics_file.exists():
        run.steps = [json.loads(line)["data"] for line in metrics_file.read_text().splitlines() if line.strip()]
    report = os.environ.get("ERC_E2E_REPORT")
    if report:
        with open(report, "a") as fp:
            fp.write(json.dumps({"run": name, "rc": run.returncode, "steps": len(run.steps),
                                 "wall_s": round(run.wall_s, 1), "peak_memory_gib": round(run.peak_memory_gib, 2)})
                     + "\n")
    return run
