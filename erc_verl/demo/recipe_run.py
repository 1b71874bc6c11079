"""One training run of a paper recipe on CPU: ``bash recipe/cpu_tiny.sh <recipe> <overrides>``, followed live.

This is the user's own command (recipe -> ``erc_verl.main_ppo`` -> Ray -> FSDP engine workers -> vLLM-CPU
rollout -> the registered loss), run as a subprocess in its own process group. verl's file logger writes one
metrics row per step; this module tails that file for a progress callback and returns the rows. verl's console
output goes to ``<workdir>/train.log``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import erc_verl

RECIPE_DIR = Path(erc_verl.__file__).resolve().parents[1] / "recipe"
CPU_RECIPES = ("dapo", "dapo_erc", "gppo", "gppo_erc", "grpo")

_live: set[subprocess.Popen] = set()  # runs in flight, from any thread
_live_lock = threading.Lock()
_stopping = False  # set by stop_all_runs: a run starting after it is killed at once


class RecipeRunError(RuntimeError):
    """A run that exited non-zero or logged no step; the message ends with the tail of its log."""


@dataclass(frozen=True)
class RecipeRun:
    recipe: str                      # one of CPU_RECIPES
    workdir: str                     # train.log and metrics.jsonl go here
    tiny_dir: str                    # the tiny world (erc_verl.demo.tiny_world): model/, train/val parquet
    steps: int
    overrides: Sequence[str] = ()    # Hydra overrides appended to the recipe's
    env: Mapping[str, str] = field(default_factory=dict)  # recipe variables, e.g. ENTROPY_MASK_LOW

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "train.log")

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, "metrics.jsonl")

    def command(self) -> list[str]:
        return ["bash", str(RECIPE_DIR / "cpu_tiny.sh"), self.recipe, *self.overrides]


def training_overrides(*, prompts: int, n: int, updates: int, lr: float, seed: int, val_n: int, test_freq: int,
                       val_before_train: bool) -> list[str]:
    """The Hydra keys the demo and the sweep vary on top of recipe/cpu_tiny.sh: batch, off-policy updates per rollout
    batch (``prompts / ppo_mini_batch_size``), learning rate, every seed verl takes, and validation."""
    return [
        f"data.train_batch_size={prompts}",
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={prompts // updates}",
        f"actor_rollout_ref.actor.optim.lr={lr}",
        f"data.seed={seed}",
        f"actor_rollout_ref.actor.data_loader_seed={seed}",
        f"actor_rollout_ref.rollout.seed={seed}",
        f"actor_rollout_ref.rollout.val_kwargs.n={val_n}",
        f"trainer.test_freq={test_freq}",
        f"trainer.val_before_train={val_before_train}",
    ]


def check_recipes_present() -> None:
    """The recipes live in the source tree (recipe/), not in the installed package."""
    if not (RECIPE_DIR / "cpu_tiny.sh").is_file():
        raise SystemExit(
            f"erc-verl: {RECIPE_DIR / 'cpu_tiny.sh'} not found; the demo runs the repository's recipes, so install "
            "erc-verl from a source checkout (`pip install -e .` in the repository)."
        )


def _read_new_rows(path: str, offset: int) -> tuple[list[dict], int]:
    """Complete lines appended since ``offset`` (a line still being written waits for the next call)."""
    if not os.path.exists(path):
        return [], offset
    with open(path, encoding="utf-8") as f:
        f.seek(offset)
        chunk = f.read()
    complete = chunk[: chunk.rfind("\n") + 1]
    records = [json.loads(line) for line in complete.splitlines() if line.strip()]
    rows = [{**record["data"], "step": record["step"]} for record in records]
    return rows, offset + len(complete.encode("utf-8"))


def run_recipe(run: RecipeRun, on_step: Optional[Callable[[dict], None]] = None, poll_s: float = 0.5) -> list[dict]:
    """Run to completion; returns verl's metrics, one dict per training step (``step`` included)."""
    check_recipes_present()
    os.makedirs(run.workdir, exist_ok=True)
    if os.path.exists(run.metrics_path):
        os.remove(run.metrics_path)  # else a run that fails before verl opens (and truncates) it shows old rows
    env = {
        **os.environ,
        "TINY_DIR": run.tiny_dir,
        "STEPS": str(run.steps),
        "LOGGER": "['console','file']",
        "VERL_FILE_LOGGER_PATH": os.path.abspath(run.metrics_path),
        "PYTHON": sys.executable,
        "EXPERIMENT_NAME": os.path.basename(os.path.normpath(run.workdir)),
        **run.env,
    }
    rows, offset = [], 0
    with open(run.log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(run.command()) + "\n")
        log.flush()
        # own process group: Ray, its workers and vLLM go down with the run on Ctrl-C or an error here
        proc = subprocess.Popen(run.command(), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with _live_lock:
            _live.add(proc)
            stopping = _stopping
        try:
            if stopping:
                raise RecipeRunError(f"{run.recipe} in {run.workdir}: stopped, the command is shutting down")
            while True:
                done = proc.poll() is not None
                new, offset = _read_new_rows(run.metrics_path, offset)
                for row in new:
                    rows.append(row)
                    if on_step is not None:
                        on_step(row)
                if done:
                    break
                time.sleep(poll_s)
        finally:
            _kill(proc)  # also what a finished run left behind in its group
            with _live_lock:
                _live.discard(proc)
    if proc.returncode != 0 or not rows:
        with open(run.log_path, encoding="utf-8", errors="replace") as f:
            tail = "".join(f.readlines()[-40:])
        what = f"exited with code {proc.returncode}" if proc.returncode else "logged no metrics"
        raise RecipeRunError(f"{run.recipe} in {run.workdir} {what}; last lines of {run.log_path}:\n{tail}")
    return rows


def trainer_identity(log_path: str) -> str:
    """The line ``erc_verl.main_ppo`` prints once verl's trainer is built: which trainer class and mode ran."""
    with open(log_path, encoding="utf-8", errors="replace") as f:
        lines = [line.split("erc-verl: ", 1)[1].strip() for line in f if "erc-verl: trainer=" in line]
    if len(lines) != 1:
        raise RecipeRunError(f"expected one 'erc-verl: trainer=...' line in {log_path}, found {len(lines)}.")
    return lines[0]


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (bash, main_ppo, Ray, vLLM), alive or finished."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone already
    proc.wait()


def stop_all_runs() -> None:
    """Kill every run in flight and any that starts from now on (Ctrl-C, a signal, or another run failed): their
    process groups run detached from the terminal's, so they would otherwise go on training."""
    global _stopping
    with _live_lock:
        _stopping = True
        procs = list(_live)
    for proc in procs:
        _kill(proc)


@contextmanager
def runs_stopped_on_exit():
    """Within it, SIGTERM and SIGHUP (a job's timeout, a closed terminal) end the command as Ctrl-C does, and
    leaving it on any exception kills every run; without this the detached runs would outlive the command."""
    global _stopping

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    _stopping = False
    try:
        yield
    except BaseException:
        stop_all_runs()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
