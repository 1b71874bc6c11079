"""Harness for the end-to-end tests: real training runs in a subprocess, on CPU (erc_verl.seams.cpu).

Each run is the user's command (``python -m erc_verl.main_ppo ...``, ``bash recipe/cpu_tiny.sh ...`` or a job
submitted with ``scripts/ray_cluster.sh submit``) with ``VERL_PLATFORM=cpu``: Ray, FSDP2 engine workers, vLLM's
CPU build, TransferQueue, verl's file logger for the metrics. Nothing is mocked. The runs go through the library's
launcher (erc_verl.demo.recipe_run.launch, as the demo's do); this harness adds what only tests need: a time
limit, peak system memory, and ``$ERC_E2E_REPORT`` (each run's wall time and peak memory, when set). Runs are
module-scoped fixtures, one at a time (each takes a few GB). Below the harness: the command lines and the checks the
e2e tests share.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from erc_verl.algorithm.gate import ERC_EXTREME_METRICS, ERC_TOKEN_MEAN_METRICS
from erc_verl.demo.recipe_run import launch

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 540


@dataclass
class Run:
    name: str
    returncode: int
    output: str                                      # the run's console log, with the launcher's kill note if any
    steps: list[dict] = field(default_factory=list)  # verl's file logger: one metrics dict per step
    wall_s: float = 0.0
    peak_memory_gib: float = 0.0
    run_identity: dict | None = None                 # erc_verl.main_ppo's identity file (erc_verl.seams.run_identity)

    def check_ok(self, returncode: int = 0) -> None:
        assert self.returncode == returncode, f"{self.name} exited {self.returncode}:\n{self.output[-6000:]}"
        assert self.steps, f"{self.name} logged no training step:\n{self.output[-3000:]}"

    def identity(self) -> dict:
        """What erc_verl.main_ppo built (trainer, use_v1, mode, replay buffer, ERC, loss mode), from its JSON file."""
        assert self.run_identity is not None, f"{self.name} wrote no run identity:\n{self.output[-3000:]}"
        return self.run_identity


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


def run_training(name: str, argv: list[str], workdir: Path, env: dict | None = None,
                 kill_when: Callable[[], bool] | None = None) -> Run:
    """Run ``argv`` in ``workdir`` to its end (or ``RUN_TIMEOUT_S``); with ``kill_when``, SIGKILL its process group
    and every process under it (driver, Ray, workers, vLLM: a preempted job) as soon as ``kill_when()`` is true,
    checked every 0.2 s. Log: ``<name>.log``; metrics: ``<name>.metrics.jsonl``."""
    with _PeakMemory() as memory:
        finished = launch(argv, log_path=str(workdir / f"{name}.log"),
                          metrics_path=str(workdir / f"{name}.metrics.jsonl"), cwd=str(workdir),
                          env={"VERL_PLATFORM": "cpu", **(env or {})}, kill_when=kill_when, timeout_s=RUN_TIMEOUT_S,
                          poll_s=0.2)
    run = Run(name=name, returncode=finished.returncode, output=Path(finished.log_path).read_text(errors="replace"),
              steps=finished.rows, wall_s=finished.wall_s, peak_memory_gib=memory.gib, run_identity=finished.identity)
    report = os.environ.get("ERC_E2E_REPORT")
    if report:
        with open(report, "a") as fp:
            fp.write(json.dumps({"run": name, "rc": run.returncode, "steps": len(run.steps),
                                 "wall_s": round(run.wall_s, 1), "peak_memory_gib": round(run.peak_memory_gib, 2)})
                     + "\n")
    return run


# --------------------------------------------------------------------------- runs and checks shared by the e2e tests

TIGHT_BAND = ["actor_rollout_ref.actor.entropy_mask_low=0.995", "actor_rollout_ref.actor.entropy_mask_high=1.002"]
ERC_KEYS = ERC_TOKEN_MEAN_METRICS + ERC_EXTREME_METRICS
POSITIVE_NLL = ["actor_rollout_ref.actor.positive_nll_coeff=0.1"]


def main_ppo(world, *overrides: str, ranks: int = 1) -> list[str]:
    """``python -m erc_verl.main_ppo`` on the tiny world: 8 prompts x 4 samples per step, two mini-batches
    (the second one off-policy), 2 steps; ``ranks`` FSDP ranks (and vLLM replicas) on one node, each with its
    share of a mini-batch as one micro-batch."""
    micro = 16 // ranks
    return [
        sys.executable, "-m", "erc_verl.main_ppo",
        f"data.train_files={world.train_file}", f"data.val_files={world.val_file}",
        "data.train_batch_size=8", "data.max_prompt_length=8", "data.max_response_length=8",
        "data.dataloader_num_workers=0",
        f"actor_rollout_ref.model.path={world.model_path}",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={micro}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={micro}",  # packed as the update packs them
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.08",  # as recipe/cpu_tiny.sh: room for the KV cache
        "actor_rollout_ref.rollout.agent.num_workers=1",
        "reward.num_workers=1",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
        "algorithm.adv_estimator=grpo", "algorithm.use_kl_in_reward=False",
        "reward.custom_reward_function.path=pkg://erc_verl.paper.reward",
        "reward.custom_reward_function.name=compute_score",
        "trainer.logger=['console','file']",
        "trainer.val_before_train=False", "trainer.test_freq=-1", "trainer.save_freq=-1",
        "trainer.nnodes=1", f"trainer.n_gpus_per_node={ranks}", "trainer.total_training_steps=2",
        *overrides,
    ]


def recipe(name: str, *overrides: str) -> list[str]:
    return ["bash", str(REPO / "recipe" / "cpu_tiny.sh"), name, *overrides]


def check_learning_signal(run, returncode: int = 0) -> None:
    run.check_ok(returncode)
    grad_norms = [step["actor/grad_norm"] for step in run.steps]
    assert any(g > 0 for g in grad_norms), f"{run.name}: every grad_norm is 0 ({grad_norms}): no reward signal"
    assert all(math.isfinite(g) for g in grad_norms)
    # vLLM samples with the weights the actor trained: after step 1's update and weight sync, its token
    # probabilities match the actor's (0.005-0.006 measured; a skipped sync or a wrong layout is far off).
    # Async trainers may roll out with the previous weights on purpose (staleness 1: 0.23 measured).
    last = run.steps[-1]
    if last.get("training/off_policy/trajectory_staleness/max", 0) == 0:
        assert last["training/rollout_probs_diff_max"] < 0.05


def check_positive_nll(run) -> None:
    values = [step["actor/positive_nll_loss"] for step in run.steps]
    assert all(math.isfinite(v) and v >= 0 for v in values) and any(v > 0 for v in values), values


def check_erc_acted(run) -> None:
    """ERC metrics in every step, in range, and the gate dropped some tokens."""
    for step in run.steps:
        missing = [k for k in ERC_KEYS if k not in step]
        assert not missing, f"{run.name}: ERC metrics missing: {missing}"
        clip, upper, lower = step["actor/erc_clipfrac"], step["actor/erc_clipfrac_upper"], step["actor/erc_clipfrac_lower"]
        assert 0.0 <= clip <= 1.0 and math.isclose(clip, upper + lower, abs_tol=1e-6)
        assert 0.0 < step["actor/entropy_ratio_min"] <= step["actor/entropy_ratio_mean"] <= step["actor/entropy_ratio_max"]
    assert max(step["actor/erc_clipfrac"] for step in run.steps) > 0, f"{run.name}: the tight band clipped nothing"


def check_no_erc(run) -> None:
    leaked = sorted({k for step in run.steps for k in step if "erc_" in k or "entropy_ratio" in k})
    assert not leaked, f"{run.name} is not an ERC run but logged {leaked}"
