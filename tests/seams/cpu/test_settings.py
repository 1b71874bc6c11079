"""erc_verl.seams.cpu.settings.apply_cpu_mode on erc-verl's real composed Hydra config."""

from __future__ import annotations

import dataclasses

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from erc_verl.configs import CONFIG_DIR
from erc_verl.seams.cpu import settings
from erc_verl.seams.cpu.settings import apply_cpu_mode
from erc_verl.seams.errors import ConfigError
from erc_verl.seams.ray_address import JOB_CONFIG_ENV

# GRPO, as every CPU run and ERC recipe (verl's default estimator is GAE, which adds a critic)
BASE = ("actor_rollout_ref.actor.strategy=fsdp2", "trainer.n_gpus_per_node=2", "trainer.nnodes=1",
        "algorithm.adv_estimator=grpo")


@pytest.fixture(autouse=True)
def no_running_ray_cluster(monkeypatch, tmp_path):
    """Ray's own rule would join a cluster that `ray start` left on this machine (tests start some)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))


def compose_erc(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(config_name="erc_ppo_trainer", overrides=[*BASE, *overrides])


def test_sets_what_cpu_mode_needs_and_says_what_changed():
    config = compose_erc()
    changed = apply_cpu_mode(config)
    rollout = config.actor_rollout_ref.rollout
    assert rollout.enable_sleep_mode is False
    assert rollout.free_cache_engine is False
    assert rollout.enforce_eager is True
    assert config.actor_rollout_ref.model.override_config.attn_implementation == "sdpa"
    assert config.ray_kwargs.ray_init.num_gpus == 2  # one logical Ray GPU per worker
    assert config.ray_kwargs.ray_init.num_cpus == settings.RAY_BASE_CPUS + settings.RAY_CPUS_PER_GPU * 2
    assert changed == [
        "actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "actor_rollout_ref.rollout.enforce_eager=True",
        "actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "ray_kwargs.ray_init.num_gpus=2 (logical)",
        f"ray_kwargs.ray_init.num_cpus={settings.RAY_BASE_CPUS + 8} (logical)",
        "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM=cpu",
    ]
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"
    assert OmegaConf.is_struct(config), "the config must stay closed to typos after the keys are added"
    assert apply_cpu_mode(config) == [], "a second application changes nothing"


def test_logical_gpus_count_every_node():
    config = compose_erc("trainer.nnodes=2", "trainer.n_gpus_per_node=3")
    apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.num_gpus == 6


def test_leaves_the_users_ray_resources_and_sizes_alone():
    config = compose_erc("+ray_kwargs.ray_init.num_gpus=4", "ray_kwargs.ray_init.num_cpus=9",
                         "actor_rollout_ref.rollout.enforce_eager=True",
                         "data.train_batch_size=8")
    changed = apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.num_gpus == 4 and config.ray_kwargs.ray_init.num_cpus == 9
    assert config.data.train_batch_size == 8
    # a required setting the user already has is not announced as a change
    assert changed == [
        "actor_rollout_ref.rollout.enable_sleep_mode=False",
        "actor_rollout_ref.rollout.free_cache_engine=False",
        "actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        "ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM=cpu",
    ]


def test_required_settings_are_keys_verl_reads():
    """apply_cpu_mode adds keys with open_dict, so a key verl renamed would be set and silently ignored."""
    from verl.workers.config.rollout import RolloutConfig

    rollout_fields = {f.name for f in dataclasses.fields(RolloutConfig)}
    for key in settings.REQUIRED:
        if key.startswith("actor_rollout_ref.rollout."):
            assert key.rsplit(".", 1)[1] in rollout_fields, f"{key} is not a field of verl's RolloutConfig"
    # verl's model config reads the attention implementation from override_config (default flash-attention 2)
    import inspect

    from verl.workers.config import model as verl_model_config

    assert 'override_config.get("attn_implementation", "flash_attention_2")' in inspect.getsource(verl_model_config)


@pytest.mark.parametrize("key", ["actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy"])
def test_refuses_fsdp1_naming_the_key_and_the_fix(key):
    config = compose_erc(f"{key}=fsdp")
    before = OmegaConf.to_container(config)
    with pytest.raises(ConfigError) as raised:
        apply_cpu_mode(config)
    message = str(raised.value)
    assert f"{key}='fsdp'" in message and f"set {key}=fsdp2" in message and "VERL_PLATFORM=cpu" in message
    assert OmegaConf.to_container(config) == before, "a refused config is left as it was"


@pytest.mark.parametrize("uses_critic", [("algorithm.adv_estimator=gae",), ("critic.enable=true",)])
def test_refuses_fsdp1_critic_when_the_critic_is_used(uses_critic):
    """GAE (or critic.enable) trains a critic; verl's critic defaults to strategy=fsdp (FSDP1, which
    fails on CPU: torch refuses sync_module_states with CPU parameters) and does not follow the actor."""
    config = compose_erc(*uses_critic)
    assert config.critic.strategy == "fsdp"
    with pytest.raises(ConfigError, match=r"critic.strategy='fsdp'.*set critic.strategy=fsdp2"):
        apply_cpu_mode(config)
    apply_cpu_mode(compose_erc(*uses_critic, "critic.strategy=fsdp2"))


def test_unused_fsdp1_critic_is_not_refused():
    config = compose_erc("algorithm.adv_estimator=grpo")
    assert config.critic.strategy == "fsdp"  # verl's default, irrelevant without a critic
    apply_cpu_mode(config)


def test_refuses_separate_async_trainer_mode():
    with pytest.raises(ConfigError, match="trainer.v1.trainer_mode=separate_async is not supported in CPU mode"):
        apply_cpu_mode(compose_erc("trainer.v1.trainer_mode=separate_async"))
    # the V0 trainer has no trainer modes: the same key is ignored there
    apply_cpu_mode(compose_erc("trainer.use_v1=false", "trainer.v1.trainer_mode=separate_async"))


def test_fsdp1_is_what_torch_refuses_on_cpu(free_port):
    """Why FSDP1 is refused: verl's FSDP1 engine wraps with ``sync_module_states=True``, which torch
    refuses for CPU parameters (a single-rank gloo group here, as in a CPU run)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    dist.init_process_group(backend="cpu:gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        with pytest.raises(ValueError, match="CPU parameters or buffers when `sync_module_states=True`"):
            FullyShardedDataParallel(torch.nn.Linear(4, 4), device_id="cpu", sync_module_states=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("join", ["RAY_ADDRESS", "ray start", "ray_init.address"])
def test_joining_a_running_cluster_declares_no_resources(join, monkeypatch, tmp_path):
    """Ray refuses num_gpus/num_cpus from a driver that joins a cluster (ValueError in ray.init): a Ray job's
    driver (RAY_ADDRESS), a cluster `ray start` left on this machine, or an address in the config."""
    overrides = []
    if join == "RAY_ADDRESS":
        monkeypatch.setenv("RAY_ADDRESS", "head-node:6390")
    elif join == "ray start":
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text("head-node:6390")
    else:
        overrides = ["+ray_kwargs.ray_init.address=head-node:6390"]
    config = compose_erc(*overrides)
    changed = apply_cpu_mode(config)
    assert config.ray_kwargs.ray_init.get("num_gpus") is None and config.ray_kwargs.ray_init.num_cpus is None
    assert not [c for c in changed if "num_gpus" in c or "num_cpus" in c]
    # the cluster's workers get CPU mode from the job's runtime env, whatever their raylets were started with
    assert config.ray_kwargs.ray_init.runtime_env.env_vars.VERL_PLATFORM == "cpu"


@pytest.mark.parametrize("key", ["+ray_kwargs.ray_init.num_gpus=2", "ray_kwargs.ray_init.num_cpus=8"])
def test_resources_declared_while_joining_are_refused_naming_the_key(key, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "head-node:6390")
    name = key.lstrip("+").split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{name}=\d+: this run joins the Ray cluster at head-node:6390.*ray start --num-"):
        apply_cpu_mode(compose_erc(key))


def test_inside_a_ray_job_the_jobs_own_platform_variable_is_kept(monkeypatch):
    """Ray refuses to merge a driver's env var with the job's same one: a job that already carries
    VERL_PLATFORM=cpu gets nothing added; one that carries another platform is refused."""
    import json

    monkeypatch.setenv("RAY_ADDRESS", "head-node:6390")
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {"VERL_PLATFORM": "cpu"}}}))
    config = compose_erc()
    assert not [c for c in apply_cpu_mode(config) if "VERL_PLATFORM" in c]
    assert "env_vars" not in config.ray_kwargs.ray_init.runtime_env
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {"VERL_PLATFORM": "cuda"}}}))
    with pytest.raises(ConfigError, match="the Ray job's runtime env sets VERL_PLATFORM='cuda'"):
        apply_cpu_mode(compose_erc())
