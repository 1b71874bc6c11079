"""The losses are registered by `import verl` alone: in a fresh interpreter and in a local Ray worker."""

import os
import subprocess
import sys

import pytest

ERC_LOSSES = ["gppo", "grpo_erc", "gppo_erc", "erc"]
PROBE = (
    "import sys, verl; from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY as R; "
    "print(sorted(k for k in R if k in {names!r}), 'erc_verl' in sys.modules)"
)


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    env.update(extra)
    return env


@pytest.mark.integration
def test_fresh_interpreter_registers_losses_on_import_verl():
    out = subprocess.run([sys.executable, "-c", PROBE.format(names=set(ERC_LOSSES))], capture_output=True,
                         text=True, check=True, env=_clean_env(), cwd="/")
    assert out.stdout.strip().splitlines()[-1] == f"{sorted(ERC_LOSSES)} True"


@pytest.mark.integration
def test_plugin_can_be_switched_off_like_any_verl_plugin():
    out = subprocess.run([sys.executable, "-c", PROBE.format(names=set(ERC_LOSSES))], capture_output=True,
                         text=True, check=True, env=_clean_env(VERL_USE_EXTERNAL_PLUGINS="none"), cwd="/")
    assert out.stdout.strip().splitlines()[-1] == "[] False"


@pytest.mark.integration
def test_ray_worker_sees_losses_after_import_verl_alone():
    ray = pytest.importorskip("ray")

    def registered():
        import sys

        import verl  # noqa: F401  (the only import: the entry point must do the rest)
        from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY

        return sorted(k for k in POLICY_LOSS_REGISTRY if k in set(ERC_LOSSES)), "erc_verl" in sys.modules, os.getpid()

    ray.init(num_cpus=1, include_dashboard=False, runtime_env={"env_vars": _clean_env()}, log_to_driver=False)
    try:
        names, loaded, pid = ray.get(ray.remote(registered).remote())

        @ray.remote
        class Actor:
            def check(self):
                return registered()

        actor_names, actor_loaded, actor_pid = ray.get(Actor.remote().check.remote())
    finally:
        ray.shutdown()
    assert pid != os.getpid() and actor_pid != os.getpid()
    assert names == actor_names == sorted(ERC_LOSSES) and loaded and actor_loaded
