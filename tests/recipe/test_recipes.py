"""Every recipe in ERC_DRY_RUN mode: the composed config carries the paper's settings and passes
verl's own validation (no Ray, no GPU: nothing is launched)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from erc_verl.algorithm.config import validate_erc_config

RECIPES = Path(__file__).resolve().parents[2] / "recipe"

# method -> (loss_mode, clip low, clip high, dynamic sampling, ERC bounds)
EXPECTED = {
    "dapo": ("vanilla", 0.2, 0.28, True, None),
    "dapo_erc": ("grpo_erc", 0.2, 0.28, True, (0.95, 1.05)),
    "gppo": ("gppo", 0.2, 0.2, True, None),
    "gppo_erc": ("gppo_erc", 0.2, 0.2, True, (0.95, 1.05)),
    "grpo": ("vanilla", 0.2, 0.2, False, None),
}


def dry_run(recipe, *overrides, **env):
    run_env = {**os.environ, "ERC_DRY_RUN": "1", **env}
    out = subprocess.run(["bash", str(RECIPES / f"{recipe}.sh"), *overrides], capture_output=True, text=True,
                         env=run_env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return OmegaConf.create(yaml.safe_load(out.stdout))


@pytest.mark.integration
@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_dry_run_has_paper_settings_and_passes_validation(recipe, data_dir):
    cfg = dry_run(recipe, DATA_DIR=data_dir)
    loss_mode, low, high, dynamic_sampling, bounds = EXPECTED[recipe]
    actor = cfg.actor_rollout_ref.actor
    assert actor.policy_loss.loss_mode == loss_mode
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (low, high, 10.0)
    if bounds:
        assert (actor.entropy_mask_low, actor.entropy_mask_high) == bounds
    assert cfg.algorithm.filter_groups.enable is dynamic_sampling
    assert actor.optim.lr == 1e-6 and actor.ppo_mini_batch_size == 16 and cfg.data.train_batch_size == 128
    assert cfg.actor_rollout_ref.rollout.n == 8 and cfg.data.max_response_length == 16384
    assert actor.loss_agg_mode == "token-mean" and actor.use_kl_loss is False and actor.entropy_coeff == 0
    assert cfg.algorithm.use_kl_in_reward is False and cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.rollout.name == "vllm" and actor.strategy.startswith("fsdp")
    val = cfg.actor_rollout_ref.rollout.val_kwargs
    assert (val.n, val.temperature, val.top_p, val.do_sample) == (32, 0.6, 0.95, True)
    assert cfg.reward.custom_reward_function.path == "pkg://erc_verl.paper.reward"
    assert cfg.actor_rollout_ref.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert "postive_loss_coeff" not in OmegaConf.to_yaml(cfg)

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    validate_erc_config(cfg)


@pytest.mark.integration
@pytest.mark.parametrize("model_size", ["7b", "7B"])
def test_site_settings_come_from_env_and_overrides_append(data_dir, model_size):
    cfg = dry_run("gppo_erc", "actor_rollout_ref.actor.entropy_mask_high=1.1", "trainer.total_epochs=1",
                  MODEL_SIZE=model_size, NNODES="4", GPUS_PER_NODE="8", DATA_DIR=data_dir, CKPT_DIR="/ckpt",
                  LOGGER="['console','wandb']")
    assert cfg.actor_rollout_ref.model.path == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert cfg.actor_rollout_ref.rollout.tensor_model_parallel_size == 2
    assert (cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node, cfg.trainer.total_epochs) == (4, 8, 1)
    assert cfg.data.train_files == f"{data_dir}/train.parquet"
    assert cfg.trainer.default_local_dir.startswith("/ckpt/") and list(cfg.trainer.logger) == ["console", "wandb"]
    assert cfg.actor_rollout_ref.actor.entropy_mask_high == 1.1


@pytest.mark.integration
def test_bad_model_size_is_refused():
    out = subprocess.run(["bash", str(RECIPES / "dapo_erc.sh")], capture_output=True, text=True,
                         env={**os.environ, "ERC_DRY_RUN": "1", "MODEL_SIZE": "3b"})
    assert out.returncode == 2 and "MODEL_SIZE must be 1.5b or 7b" in out.stderr


# --- recipe/fidelity.yaml (docs/fidelity.md's table): every entry against the dry-run config ---

FIDELITY = RECIPES / "fidelity.yaml"
RENDERER = RECIPES.parent / "scripts" / "render_fidelity.py"
_ITEM = re.compile(r"(?:(1\.5B|7B|DAPO\+ERC|GPPO\+ERC)\s+)?`([^`]*)`")
_LABELS = {"1.5b": "1.5B", "7b": "7B", "dapo_erc": "DAPO+ERC", "gppo_erc": "GPPO+ERC"}


def fidelity_rows():
    """(reference key or None, reference cell, ours cell, why cell) for each entry of recipe/fidelity.yaml."""
    entries = yaml.safe_load(FIDELITY.read_text())["settings"]
    return [(e["key"], e["reference"], e["ours"], e["why"]) for e in entries]


def literal(text):
    """A table value as YAML reads it; '1e-6' too (YAML 1.1 wants a dot)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def cell_items(cell, size, recipe):
    """[(key or None, value)] of a cell, keeping the items labelled for this size / recipe (or unlabelled)."""
    items = []
    for label, body in _ITEM.findall(cell):
        if label and label not in (_LABELS[size], _LABELS[recipe]):
            continue
        key, sep, value = body.partition("=")
        items.append((key, literal(value)) if sep and "." in key and " " not in key else (None, literal(body)))
    return items


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """DATA_DIR with the files the recipes name (the entry point may check that they exist)."""
    path = tmp_path_factory.mktemp("data")
    for name in ("train", "aime2024", "aime2025"):
        (path / f"{name}.parquet").touch()
    return str(path)


def test_fidelity_table_has_every_reference_setting():
    keys = {row[0] for row in fidelity_rows()}
    # every key the four reference scripts pass (recipe/dapo/*_erc_1_05.sh in Kwai-Klear/ERC, commit b19f800)
    reference = {
        "data.train_files", "data.val_files", "data.prompt_key", "data.truncation", "data.max_prompt_length",
        "data.max_response_length", "data.gen_batch_size", "data.train_batch_size", "actor_rollout_ref.rollout.n",
        "algorithm.adv_estimator", "algorithm.use_kl_in_reward", "algorithm.kl_ctrl.kl_coef",
        "actor_rollout_ref.actor.use_kl_loss", "actor_rollout_ref.actor.kl_loss_coef",
        "actor_rollout_ref.actor.clip_ratio_low", "actor_rollout_ref.actor.clip_ratio_high",
        "actor_rollout_ref.actor.clip_ratio_c", "actor_rollout_ref.actor.postive_loss_coeff",
        "actor_rollout_ref.actor.policy_loss.loss_mode", "actor_rollout_ref.actor.entropy_mask_high",
        "actor_rollout_ref.actor.entropy_mask_low", "algorithm.filter_groups.enable",
        "algorithm.filter_groups.max_num_gen_batches", "algorithm.filter_groups.metric",
        "actor_rollout_ref.model.use_remove_padding", "actor_rollout_ref.actor.use_dynamic_bsz",
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz", "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu",
        "actor_rollout_ref.rollout.log_prob_max_token_len_per_gpu", "actor_rollout_ref.rollout.name",
        "actor_rollout_ref.model.path", "actor_rollout_ref.model.enable_gradient_checkpointing",
        "actor_rollout_ref.actor.optim.lr", "actor_rollout_ref.actor.optim.lr_warmup_steps",
        "actor_rollout_ref.actor.optim.weight_decay", "actor_rollout_ref.actor.ppo_mini_batch_size",
        "actor_rollout_ref.actor.fsdp_config.param_offload", "actor_rollout_ref.actor.fsdp_config.optimizer_offload",
        "actor_rollout_ref.actor.entropy_coeff", "actor_rollout_ref.actor.grad_clip",
        "actor_rollout_ref.actor.loss_agg_mode", "actor_rollout_ref.actor.ulysses_sequence_parallel_size",
        "actor_rollout_ref.rollout.gpu_memory_utilization", "actor_rollout_ref.rollout.tensor_model_parallel_size",
        "actor_rollout_ref.rollout.enable_chunked_prefill", "actor_rollout_ref.rollout.max_num_batched_tokens",
        "actor_rollout_ref.rollout.max_model_len", "actor_rollout_ref.rollout.temperature",
        "actor_rollout_ref.rollout.top_p", "actor_rollout_ref.rollout.top_k",
        "actor_rollout_ref.rollout.val_kwargs.top_p", "actor_rollout_ref.rollout.val_kwargs.temperature",
        "actor_rollout_ref.rollout.val_kwargs.max_response_len", "actor_rollout_ref.rollout.val_kwargs.top_k",
        "actor_rollout_ref.rollout.val_kwargs.do_sample", "actor_rollout_ref.rollout.val_kwargs.n",
        "actor_rollout_ref.rollout.enforce_eager", "actor_rollout_ref.rollout.free_cache_engine",
        "actor_rollout_ref.ref.fsdp_config.param_offload", "actor_rollout_ref.ref.ulysses_sequence_parallel_size",
        "actor_rollout_ref.actor.fsdp_config.fsdp_size", "actor_rollout_ref.actor.checkpoint.save_contents",
        "reward_model.reward_manager", "reward_model.overlong_buffer", "trainer.logger", "trainer.project_name",
        "trainer.experiment_name", "trainer.n_gpus_per_node", "trainer.nnodes", "trainer.val_before_train",
        "trainer.test_freq", "trainer.save_freq", "trainer.total_epochs", "trainer.default_local_dir",
        "trainer.resume_mode",
    }
    assert not reference - keys, sorted(reference - keys)


def test_fidelity_doc_is_the_rendered_yaml():
    """docs/fidelity.md's table is what scripts/render_fidelity.py writes from recipe/fidelity.yaml."""
    out = subprocess.run([sys.executable, str(RENDERER), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


@pytest.mark.integration
@pytest.mark.parametrize("size", ["1.5b", "7b"])
@pytest.mark.parametrize("recipe", ["dapo_erc", "gppo_erc"])
def test_recipe_matches_every_row_of_the_fidelity_table(recipe, size, data_dir):
    cfg = dry_run(recipe, MODEL_SIZE=size, DATA_DIR=data_dir)
    rows = fidelity_rows()
    assert len(rows) > 70
    for key, reference, ours, why in rows:
        where = f"fidelity.yaml entry {key or reference!r}"
        if ours.startswith("site:"):
            assert OmegaConf.select(cfg, key) is not None, where
            continue
        if ours.startswith("—"):
            assert OmegaConf.select(cfg, key, default=None) is None, where  # verl 0.9.1 has no such key
            continue
        items = cell_items(ours, size, recipe)
        assert len(items) == 1, (where, items)
        ours_key, value = items[0]
        ours_key = ours_key or key
        actual = OmegaConf.select(cfg, ours_key)
        actual = OmegaConf.to_container(actual) if OmegaConf.is_config(actual) else actual
        assert actual == value, (where, ours_key, actual, value)
        if why.startswith("same"):
            assert cell_items(reference, size, recipe) == [(None, value)], where
        else:
            assert cell_items(reference, size, recipe) != [(None, value)] or ours_key != key, where


@pytest.mark.integration
@pytest.mark.parametrize("recipe", ["dapo", "dapo_erc"])
def test_positive_nll_ablation_is_an_environment_switch(recipe, data_dir):
    """DAPO and DAPO+ERC, each with and without the reference scripts' extra NLL term."""
    off = dry_run(recipe, DATA_DIR=data_dir)
    on = dry_run(recipe, DATA_DIR=data_dir, POSITIVE_NLL_COEFF="0.1")
    assert off.actor_rollout_ref.actor.positive_nll_coeff == 0
    assert on.actor_rollout_ref.actor.positive_nll_coeff == 0.1
    assert off.trainer.experiment_name == f"{recipe}-1.5b" and on.trainer.experiment_name == f"{recipe}-1.5b-pnll0.1"
    assert off.actor_rollout_ref.actor.policy_loss == on.actor_rollout_ref.actor.policy_loss
    validate_erc_config(on)


@pytest.mark.integration
@pytest.mark.parametrize("nnodes, per_node", [(1, 1), (3, 2)])
def test_cpu_tiny_recipe_scales_out_with_whole_batches_per_rank(tmp_path, nnodes, per_node):
    """recipe/cpu_tiny.sh honours NNODES / GPUS_PER_NODE (default 1 / 1), and every rank trains what a one-rank
    run trains: whole prompts and a whole 16-sample mini-batch each (ERC_DRY_RUN=1: the launch's checks, no Ray)."""
    from erc_verl.demo.tiny_world import write_tiny_world

    write_tiny_world(str(tmp_path / "tiny"), warmup_steps=1)
    env = {**os.environ, "TINY_DIR": str(tmp_path / "tiny"), "ERC_DRY_RUN": "1", "PYTHON": sys.executable}
    env.pop("NNODES", None), env.pop("GPUS_PER_NODE", None)
    if (nnodes, per_node) != (1, 1):
        env.update(NNODES=str(nnodes), GPUS_PER_NODE=str(per_node))
    result = subprocess.run(["bash", str(RECIPES / "cpu_tiny.sh"), "dapo_erc"], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    ranks = nnodes * per_node
    assert (config["trainer"]["nnodes"], config["trainer"]["n_gpus_per_node"]) == (nnodes, per_node)
    n = config["actor_rollout_ref"]["rollout"]["n"]
    mini_batch_samples = config["actor_rollout_ref"]["actor"]["ppo_mini_batch_size"] * n
    assert config["data"]["train_batch_size"] // ranks == 8 and config["data"]["train_batch_size"] % ranks == 0
    assert mini_batch_samples % ranks == 0 and mini_batch_samples // ranks == 16
    # start-up work a CPU run does not need: Ray's dashboard, torch.compile of verl's entropy function
    assert config["ray_kwargs"]["ray_init"]["include_dashboard"] is False
    assert config["actor_rollout_ref"]["actor"]["fsdp_config"]["use_torch_compile"] is False
    assert config["actor_rollout_ref"]["ref"]["fsdp_config"]["use_torch_compile"] is False
