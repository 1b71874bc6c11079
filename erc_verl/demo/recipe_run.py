"""Training runs as subprocesses, followed live: the one launcher of ``erc-verl demo``, ``erc-verl sweep`` and the
end-to-end tests (tests/e2e/e2e_harness.py).

``launch`` runs a command line (``bash recipe/cpu_tiny.sh <recipe>``, ``python -m erc_verl.main_ppo ...``) in its own
process group with verl's file logger pointed at a metrics file, writes its console output to a log, tails the metrics
(one row per step, for a progress callback), and on the way out kills what the run left: its process group and every
process under it. It returns the rows, the return code, the wall time and the run identity ``erc_verl.main_ppo``
wrote next to the metrics (erc_verl.seams.run_identity). ``run_recipe`` is the demo's and the sweep's use of it: one
paper recipe scaled down to the tiny world (recipe/cpu_tiny.sh), a failure raised with the tail of its log.
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
from importlib.resources import files
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import psutil

from erc_verl.seams.run_identity import identity_path, read_run_identity

RECIPE_DIR = Path(str(files("erc_verl.recipe")))  # the top-level recipe/, installed as erc_verl.recipe (pyproject.toml)
CPU_RECIPES = ("dapo", "dapo_erc", "gppo", "gppo_erc", "grpo")

_live: set[subprocess.Popen] = set()  # runs in flight, from any thread
_seen: dict[int, dict[int, psutil.Process]] = {}  # run pid -> every process seen under it while it ran
_live_lock = threading.Lock()
_stopping = False  # set by stop_all_runs: a run starting after it is killed at once


@dataclass(frozen=True)
class Finished:
    """A run that ended, by itself or killed by ``launch``."""

    returncode: int
    rows: list[dict]            # verl's metrics, one dict per logged step (``step`` included)
    wall_s: float
    identity: Optional[dict]    # what erc_verl.main_ppo built (erc_verl.seams.run_identity); None: it wrote none
    log_path: str
    killed: str = ""            # why launch killed it (timeout, kill_when, stopped); "" when it ended by itself

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-lines:])


def launch(argv: Sequence[str], *, log_path: str, metrics_path: str, env: Optional[Mapping[str, str]] = None,
           cwd: Optional[str] = None, on_step: Optional[Callable[[dict], None]] = None,
           kill_when: Optional[Callable[[], bool]] = None, timeout_s: Optional[float] = None,
           poll_s: float = 0.5) -> Finished:
    """Run ``argv`` to its end in a process group of its own, verl's file logger writing to ``metrics_path``.

    ``env`` goes on top of this process's environment (with ``PYTHON``, the interpreter the recipes start, set to
    this one). Every ``poll_s``: new metric rows go to ``on_step``; the run is killed (SIGKILL, its group and every
    process under it) once ``timeout_s`` has passed, once ``kill_when()`` is true (a preempted job) or when
    ``stop_all_runs`` is called. The kill, if any, is noted at the end of the log and in ``Finished.killed``.
    """
    metrics_path = os.path.abspath(metrics_path)
    for stale in (metrics_path, identity_path(metrics_path)):  # else a run that fails early shows an older run's
        if os.path.exists(stale):
            os.remove(stale)
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {}), "VERL_FILE_LOGGER_PATH": metrics_path}
    rows: list[dict] = []
    offset, killed = 0, ""
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(argv) + "\n")
        log.flush()
        start = time.monotonic()
        # own process group: Ray, its workers and vLLM go down with the run on Ctrl-C or an error here
        proc = subprocess.Popen(list(argv), cwd=cwd, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        with _live_lock:
            _live.add(proc)
            if _stopping:
                killed = "stopped: the command is shutting down"

        def follow():
            nonlocal offset
            new, offset = _read_new_rows(metrics_path, offset)
            for row in new:
                rows.append(row)
                if on_step is not None:
                    on_step(row)

        try:
            while not killed and proc.poll() is None:
                _note_descendants(proc)
                follow()
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    killed = f"timeout, {timeout_s:.0f} s"
                elif kill_when is not None and kill_when():
                    killed = "kill_when"
                else:
                    time.sleep(poll_s)
        finally:
            _kill_everything_under(proc)  # also what a finished run left behind in its group
            with _live_lock:
                _live.discard(proc)
        wall_s = time.monotonic() - start
        follow()  # the rows written last, up to the run's end or its kill
    if killed:
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n[erc-verl launcher: killed (SIGKILL, process group) after {wall_s:.0f} s: {killed}]\n")
    return Finished(returncode=proc.returncode, rows=rows, wall_s=wall_s, identity=read_run_identity(metrics_path),
                    log_path=log_path, killed=killed)


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


def _note_descendants(proc: subprocess.Popen) -> None:
    """Remember every process under the running run: once it exits, its orphans are no longer its children."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return
    with _live_lock:
        _seen.setdefault(proc.pid, {}).update((child.pid, child) for child in children)


def _kill_everything_under(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group and every process seen under it: Ray puts its workers (FSDP ranks, vLLM) in
    process groups of their own, so the group alone would leave them to die later, still holding memory."""
    if proc.poll() is None:  # a finished run's pid may already belong to another process
        _note_descendants(proc)
    with _live_lock:
        family = list(_seen.pop(proc.pid, {}).values())
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is gone already
    for child in family:
        try:
            child.kill()  # psutil checks the pid still names the process it saw (no reused pid is killed)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def stop_all_runs() -> None:
    """Kill every run in flight and any that starts from now on (Ctrl-C, a signal, or another run failed): their
    process groups run detached from the terminal's, so they would otherwise go on training."""
    global _stopping
    with _live_lock:
        _stopping = True
        procs = list(_live)
    for proc in procs:
        _kill_everything_under(proc)


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


# --------------------------------------------------------------------------- the demo's and the sweep's runs


class RecipeRunError(RuntimeError):
    """A run that exited non-zero or logged no step; the message ends with the tail of its log."""


@dataclass(frozen=True)
class RecipeRun:
    recipe: str                      # one of CPU_RECIPES
    workdir: str                     # train.log, metrics.jsonl and metrics.identity.json go here
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


def run_recipe(run: RecipeRun, on_step: Optional[Callable[[dict], None]] = None) -> Finished:
    """Run to completion through ``launch``; a run that failed, was stopped, logged no step or wrote no run identity
    raises."""
    os.makedirs(run.workdir, exist_ok=True)
    env = {"TINY_DIR": run.tiny_dir, "STEPS": str(run.steps), "LOGGER": "['console','file']",
           "EXPERIMENT_NAME": os.path.basename(os.path.normpath(run.workdir)), **run.env}
    finished = launch(run.command(), log_path=run.log_path, metrics_path=run.metrics_path, env=env, on_step=on_step)
    what = (f"was killed ({finished.killed})" if finished.killed else
            f"exited with code {finished.returncode}" if finished.returncode else
            "logged no metrics" if not finished.rows else
            f"wrote no {identity_path(run.metrics_path)}" if finished.identity is None else "")
    if what:
        raise RecipeRunError(f"{run.recipe} in {run.workdir} {what}; last lines of {run.log_path}:\n"
                             f"{finished.log_tail()}")
    return finished
