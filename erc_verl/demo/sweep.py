"""``erc-verl sweep``: where does ERC matter? DAPO vs DAPO+ERC under growing off-policy drift, several seeds.

The paper's claim is about off-policy updates: the more optimizer steps a rollout batch feeds (mini-batches per
rollout batch) and the larger each step (learning rate), the further the policy drifts from the one that
sampled, and the more ERC's entropy-ratio band should matter. This sweep varies both on the demo's tiny world and
runs every (updates, lr) cell for every seed and arm through the real pipeline (``recipe/cpu_tiny.sh``, as
``erc-verl demo`` does). Per run it keeps verl's metrics; per cell it reports, over seeds, the fluctuation of
entropy and gradient norm (std of step-to-step changes), the final validation accuracy, and how many tokens ERC
cut, each as a mean with a 95% t-interval, plus the paired ERC - DAPO difference (same seed, same warm-up).

Each seed gets its own warm-up (model init and data differ), shared by both arms. Finished runs are recorded in
``<out>/runs.jsonl`` and skipped when the command is run again, so an interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from erc_verl.demo.commands import (check_arm, check_arms, check_erc_band, check_group_size, check_out_dir,
                                    check_positive, check_same_trainer, erc_bound, erc_env)
from erc_verl.flags import comma_list, option

REPORTED = (  # run_summary key, label
    ("entropy_fluct", "entropy fluctuation"),
    ("grad_norm_fluct", "grad-norm fluctuation"),
    ("val_acc_end", "final validation accuracy"),
    ("erc_clipfrac", "ERC clip fraction"),
    ("ppo_kl", "PPO KL (old -> current)"),
)


def parse_cells(text: str) -> tuple[tuple[int, float], ...]:
    """``2@1e-4,8@1e-4`` -> ((2, 1e-4), (8, 1e-4)); what the cells must be is SweepConfig's check."""
    cells = []
    for item in comma_list(text):
        try:
            updates, lr = item.split("@")
            cells.append((int(updates), float(lr)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected UPDATES@LR items like 8@1e-4, got {item!r}") from None
    return tuple(cells)


def _show_cells(cells: tuple[tuple[int, float], ...]) -> str:
    return ",".join(f"{updates}@{lr:g}" for updates, lr in cells)


@dataclass(frozen=True)
class SweepConfig:
    """``erc-verl sweep``'s options, one field per flag (``val_prompts`` is ``--val-prompts``)."""

    out: str = option("./erc_sweep", "output directory; finished runs there are kept and skipped")
    seeds: int = option(5, "seeds per cell (0..N-1)")
    cells: tuple[tuple[int, float], ...] = option(
        ((2, 1e-4), (8, 1e-4), (8, 4e-4)), "UPDATES@LR per cell: optimizer steps per rollout batch and actor "
        "learning rate (the default is a ladder of growing drift)", parse=parse_cells, show=_show_cells,
        metavar="UPDATES@LR,...")
    arms: tuple[str, ...] = option(("dapo", "dapo_erc"), "comma-separated recipes to compare; the paired difference "
                                   "is the last minus the first", parse=comma_list, metavar="RECIPES")
    erc_low: float = erc_bound("low")
    erc_high: float = erc_bound("high")
    jobs: int = option(2, "runs at once (each ~6 GB of memory)")
    steps: int = option(10, "RL steps per run", group="each run")
    prompts: int = option(8, "prompts per rollout batch; a multiple of every cell's UPDATES", group="each run")
    n: int = option(8, "samples per prompt", group="each run")
    warmup_steps: int = option(150, "supervised warm-up steps of the seed's model", group="each seed's tiny world")
    val_prompts: int = option(128, "validation problems", group="each seed's tiny world")
    val_n: int = option(8, "validation samples per problem (accuracy is their mean)", group="each seed's tiny world")

    def __post_init__(self):
        """The one check of the options, before anything starts: a refusal names the flag and the fix."""
        if not self.cells or len(set(self.cells)) != len(self.cells):
            raise ValueError(f"--cells needs one or more distinct UPDATES@LR items, got {_show_cells(self.cells)!r}.")
        if any(updates <= 0 or lr <= 0 for updates, lr in self.cells):
            raise ValueError(f"--cells needs positive updates and learning rates, got {_show_cells(self.cells)!r}.")
        check_arms(self.arms, minimum=2)
        if self.seeds < 2:
            raise ValueError(f"--seeds must be >= 2, got {self.seeds}: an interval needs a spread "
                             "(docs/demo.md's sweep uses 5).")
        check_positive(self, "prompts", "val_prompts", "val_n", "jobs")
        if self.steps < 3:
            raise ValueError(f"--steps must be >= 3, got {self.steps}: fluctuation is the std of step-to-step changes.")
        check_group_size(self.n)
        bad = [updates for updates, _ in self.cells if self.prompts % updates]
        if bad:
            raise ValueError(f"--prompts ({self.prompts}) must be a multiple of every cell's updates; not of {bad}.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        check_erc_band(self.erc_low, self.erc_high)
        check_out_dir(self.out)


def run_key(updates: int, lr: float, seed: int, arm: str) -> str:
    return f"updates{updates}_lr{lr:g}/seed{seed}/{arm}"


def load_runs(path: str) -> dict[str, dict]:
    runs = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    runs[record["key"]] = record
    return runs


def run_sweep(s: SweepConfig) -> dict[str, dict]:
    """Train every missing (cell, seed, arm), ``s.jobs`` at a time; returns the records of the whole plan."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from erc_verl.demo.recipe_run import runs_stopped_on_exit
    from erc_verl.demo.tiny_world import write_tiny_world

    os.makedirs(s.out, exist_ok=True)
    runs_path = os.path.join(s.out, "runs.jsonl")
    done = load_runs(runs_path)
    check_same_run_settings(done, s, runs_path)
    plan = [(u, lr, seed, arm) for seed in range(s.seeds) for (u, lr) in s.cells for arm in s.arms]
    todo = [p for p in plan if run_key(*p) not in done]
    print(f"erc-verl sweep: {len(plan)} runs ({len(s.cells)} cells x {s.seeds} seeds x {len(s.arms)} arms), "
          f"{len(plan) - len(todo)} already in {runs_path}; {s.jobs} at a time", flush=True)
    for seed in sorted({seed for _, _, seed, _ in todo}):  # each seed's warm-up, before any run starts
        world_dir = world_path(s, seed)
        if not os.path.exists(os.path.join(world_dir, "val.parquet")):  # written last: the world is complete
            write_tiny_world(world_dir, seed=seed, warmup_steps=s.warmup_steps, val_prompts=s.val_prompts)

    # exits in reverse: a failure or signal kills every run before the pool waits for its threads
    with ThreadPoolExecutor(max_workers=s.jobs) as pool, runs_stopped_on_exit(), \
            open(runs_path, "a", encoding="utf-8") as log:
        futures = [pool.submit(_train_one, s, *item) for item in todo]
        for index, future in enumerate(as_completed(futures), 1):
            record = future.result()  # a failed run stops the sweep; finished runs stay in runs.jsonl
            log.write(json.dumps(record) + "\n")
            log.flush()
            done[record["key"]] = record
            print(f"[{index}/{len(todo)}] {record['key']}: {record['wall_s']:.0f} s, final acc "
                  f"{record['val_acc_end']:.3f}, entropy fluct {record['entropy_fluct']:.4f}, grad-norm fluct "
                  f"{record['grad_norm_fluct']:.4f}, ERC clip {record['erc_clipfrac']:.4f}", flush=True)
    return {run_key(*p): done[run_key(*p)] for p in plan}


def run_settings(s: SweepConfig) -> dict:
    """What every run of one sweep must share (cells, seeds, arms and jobs only choose which runs there are)."""
    return {k: getattr(s, k) for k in ("steps", "prompts", "n", "erc_low", "erc_high", "warmup_steps", "val_prompts",
                                       "val_n")}


def check_same_run_settings(done: dict[str, dict], s: SweepConfig, runs_path: str) -> None:
    """Resuming with other per-run settings would average unlike runs: refused, naming what differs."""
    wanted = run_settings(s)
    for record in done.values():
        if "identity" not in record:
            raise SystemExit(f"erc-verl sweep: {runs_path} was written by an older erc-verl (no run identity); "
                             "use another --out.")
        differ = {k: (record["settings"].get(k), v) for k, v in wanted.items() if record["settings"].get(k) != v}
        if differ:
            raise SystemExit(f"erc-verl sweep: {runs_path} holds runs made with other settings "
                             f"({', '.join(f'{k}: {a} there, {b} now' for k, (a, b) in differ.items())}); "
                             "use another --out or the same flags.")


def world_path(s: SweepConfig, seed: int) -> str:
    return os.path.join(s.out, "worlds", f"seed{seed}")


def _train_one(s: SweepConfig, updates: int, lr: float, seed: int, arm: str) -> dict:
    """One run through recipe/cpu_tiny.sh; its summary as a runs.jsonl record."""
    from erc_verl.demo.metrics import run_summary
    from erc_verl.demo.recipe_run import RecipeRun, run_recipe, training_overrides

    key = run_key(updates, lr, seed, arm)
    # validated once, after the last step; the start is each seed's warm-up, the same for every arm
    overrides = training_overrides(prompts=s.prompts, n=s.n, updates=updates, lr=lr, seed=seed, val_n=s.val_n,
                                   test_freq=s.steps, val_before_train=False)
    run_dir = os.path.join(s.out, "runs", key)
    finished = run_recipe(RecipeRun(recipe=arm, workdir=run_dir, tiny_dir=world_path(s, seed), steps=s.steps,
                                    overrides=overrides, env=erc_env(s.erc_low, s.erc_high)))
    check_arm(arm, finished.rows, s.steps, run_dir)
    return {"key": key, "updates": updates, "lr": lr, "seed": seed, "arm": arm, "settings": run_settings(s),
            "identity": finished.identity, "wall_s": round(finished.wall_s, 1), **run_summary(finished.rows)}


# 97.5% quantiles of Student's t by degrees of freedom (two-sided 95% interval)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_975(df: int) -> float:
    """The tabled quantile at the nearest tabled df at or below ``df`` (slightly wide, never narrow)."""
    return T_975[max(k for k in T_975 if k <= df)]


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half-width of its 95% t-interval (NaN values dropped; NaN when fewer than two remain)."""
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if len(x) < 2:
        return (float(x[0]) if len(x) else math.nan), math.nan
    t = t_975(len(x) - 1)
    return float(x.mean()), float(t * x.std(ddof=1) / math.sqrt(len(x)))


def summarize(records: dict[str, dict], s: SweepConfig):
    """One row per cell, metric and arm (and the paired difference of the last arm minus the first)."""
    import pandas as pd

    base, other = s.arms[0], s.arms[-1]
    rows = []
    for updates, lr in s.cells:
        for metric, label in REPORTED:
            by_arm = {arm: [records[run_key(updates, lr, seed, arm)][metric] for seed in range(s.seeds)]
                      for arm in s.arms}
            row = {"updates": updates, "lr": lr, "metric": metric}
            for arm, values in by_arm.items():
                row[arm], row[f"{arm}_ci"] = mean_ci(values)
            diffs = [b - a for a, b in zip(by_arm[base], by_arm[other])]
            row["diff"], row["diff_ci"] = mean_ci(diffs)
            paired = [d for d in diffs if not math.isnan(d)]  # seeds where both arms logged the metric
            row[f"{other}_lower"], row["pairs"] = sum(d < 0 for d in paired), len(paired)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.3g} ± {ci:.2g}" if not math.isnan(ci) else f"{mean:.3g}"


def markdown_table(summary, s: SweepConfig) -> str:
    base, other = s.arms[0], s.arms[-1]
    head = (f"| updates/rollout | lr | metric | {base} | {other} | {other} - {base} (paired) | seeds {other} lower |\n"
            "|---|---|---|---|---|---|---|")
    lines = [head]
    for _, r in summary.iterrows():
        lower = f"{r[other + '_lower']}/{r['pairs']}" if r["pairs"] else "-"
        lines.append(f"| {r['updates']} | {r['lr']:g} | {dict(REPORTED)[r['metric']]} | {_fmt(r[base], r[base + '_ci'])} "
                     f"| {_fmt(r[other], r[other + '_ci'])} | {_fmt(r['diff'], r['diff_ci'])} | {lower} |")
    return "\n".join(lines)


def plot_sweep(records: dict[str, dict], s: SweepConfig, path: str) -> str:
    """One panel per reported metric (the first three): each arm's seeds as dots, mean and 95% CI as a bar."""
    from erc_verl.demo.plots import panels, save

    metrics = REPORTED[:3]
    cells = s.cells
    fig, axes = panels(len(metrics), width=5.2)
    width = 0.8 / len(s.arms)
    for ax, (metric, label) in zip(axes, metrics):
        for j, arm in enumerate(s.arms):
            xs = np.arange(len(cells)) + (j - (len(s.arms) - 1) / 2) * width
            for x, (updates, lr) in zip(xs, cells):
                values = [records[run_key(updates, lr, seed, arm)][metric] for seed in range(s.seeds)]
                mean, ci = mean_ci(values)
                color = f"C{j}"
                ax.scatter([x] * len(values), values, s=10, alpha=0.45, color=color)
                ax.errorbar([x], [mean], yerr=[ci if not math.isnan(ci) else 0], fmt="o", color=color, capsize=4,
                            label=arm if (updates, lr) == cells[0] else None)
        ax.set_xticks(range(len(cells)), [f"{u} upd\nlr {lr:g}" for u, lr in cells])
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"off-policy stress on the tiny world: {s.seeds} seeds per cell, mean and 95% CI "
                 f"(ERC band {s.erc_low}-{s.erc_high})", fontsize=10)
    return save(fig, path)


def run(s: SweepConfig) -> dict:
    t0 = time.perf_counter()
    records = run_sweep(s)
    check_same_trainer({key: record["identity"] for key, record in records.items()}, "sweep")
    summary = summarize(records, s)
    summary.to_csv(os.path.join(s.out, "summary.csv"), index=False)
    table = markdown_table(summary, s)
    with open(os.path.join(s.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    figure = plot_sweep(records, s, os.path.join(s.out, "sweep.png"))
    with open(os.path.join(s.out, "sweep.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": asdict(s), "seconds_this_invocation": time.perf_counter() - t0,
                   "run_seconds_sum": sum(r["wall_s"] for r in records.values())}, f, indent=2)
    print("\n" + table)
    print(f"\nwrote {s.out}/summary.md, summary.csv, sweep.png ({time.perf_counter() - t0:.0f} s)")
    return {"summary": summary, "figure": figure}
