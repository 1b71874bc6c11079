"""Driver-side checks that stop a bad launch in seconds, before Ray starts.

``python -m erc_verl.main_ppo`` (and so every recipe) runs them; a failure is a
:class:`~erc_verl.seams.errors.ConfigError` that the entry point prints as one line,
``erc-verl: error: <message>``, exiting with status 2.

Types, values and key names are verl's dataclass schema's to judge: verl's ``validate_config`` converts
the actor section with ``omega_conf_to_dataclass`` into our ERCFSDPActorConfig, whose ``__post_init__``
(and ERCBounds, the one check of the ERC band) refuses bad ERC values. This module adds what the schema
cannot know and says every refusal in one line naming the key and the fix:

- :func:`compose`: our Hydra config with the command-line overrides; a mistyped key gets a "did you mean".
- :func:`check_config`: what a real launch and a dry run (``--cfg job``, ``ERC_DRY_RUN=1``) both check:
  trainer sizes, the local model directory, verl's ``validate_config`` (as verl's ``main_ppo`` calls it),
  :func:`erc_verl.algorithm.config.validate_erc_config`, then the local data files.
- :func:`check_gpu_count`: right after ``ray.init``, before the task runner starts, the cluster has
  the GPUs the config asks for (otherwise verl waits for them forever in placement-group scheduling).
- :func:`launch`: the entry point's command line: composes and checks, then hands over to Hydra.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

from erc_verl.seams.errors import ConfigError

ACTOR = "actor_rollout_ref.actor"
CONFIG_NAME = "erc_ppo_trainer"
HYDRA_SERIES = (1, 3)  # the Hydra releases whose private argument parser launch() reads
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # hdfs://, s3://, gs://, ...: not checked here
# Hydra's and Python's texts we read (tests/seams/test_preflight.py checks them on the real output):
_COULD_NOT = re.compile(r"Could not (override|append to|delete) '([^']+)'")  # Hydra's override failure
_FULL_KEY = re.compile(r"full_key: (\S+)")  # the section an InstantiationException names
_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")  # a dataclass's TypeError for an unknown key


# --------------------------------------------------------------------------- presenting refusals


def one_line(text: str) -> str:
    return " ".join(str(text).split())


@contextlib.contextmanager
def refusing_config_errors():
    """Print a :class:`ConfigError` as ``erc-verl: error: <message>`` on stderr and exit with status 2."""
    try:
        yield
    except ConfigError as error:
        sys.stdout.flush()
        print(f"erc-verl: error: {one_line(error)}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# --------------------------------------------------------------------------- unknown keys, from the dataclasses


def _dataclass_of(node) -> Optional[type]:
    """The dataclass verl builds a config section into (the section's ``_target_``), if it is one."""
    from hydra.utils import get_class
    from omegaconf import DictConfig

    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        cls = get_class(target) if isinstance(target, str) else None
    except (ImportError, ValueError):
        return None
    return cls if dataclasses.is_dataclass(cls) else None


def unknown_key(section: str, key: str, cls: type) -> ConfigError:
    """``section.key`` is no field of ``cls``: the closest field, and for the ERC sections the ERC keys."""
    from erc_verl.algorithm.config import ERCDiagnosticsConfig, ERCFSDPActorConfig, erc_actor_keys

    candidates = [f.name for f in dataclasses.fields(cls) if f.init and f.name != "_target_"]
    erc = cls in (ERCFSDPActorConfig, ERCDiagnosticsConfig)
    if cls is ERCFSDPActorConfig:
        candidates += [k for k in erc_actor_keys() if "." in k]
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {section}.{close[0]}?" if close else "."
    listing = f" ERC keys: {', '.join(erc_actor_keys())}." if erc else ""
    return ConfigError(f"{section}.{key} is not a key of the {section.rsplit('.', 1)[-1]} config{hint}{listing}")


# --------------------------------------------------------------------------- composition


def _deepest_section(config, dotted: str) -> tuple[Any, list[str]]:
    """The deepest section of ``config`` on the path ``dotted``, and its path."""
    from omegaconf import DictConfig

    node, prefix = config, []
    for part in dotted.split(".")[:-1]:
        child = node.get(part) if isinstance(node, DictConfig) and part in node else None
        if not isinstance(child, DictConfig):
            break
        node, prefix = child, prefix + [part]
    return node, prefix


def _override_refusal(base, key: str, cause: str) -> ConfigError:
    """Hydra could not override ``key`` (``cause``: OmegaConf's reason); ``base`` is the config without overrides."""
    node, prefix = _deepest_section(base, key)
    missing = key.split(".")[len(prefix)]
    cls = _dataclass_of(node)
    if cls is not None and missing not in node:  # a section verl builds a dataclass from: `+key=` would not do
        return unknown_key(".".join(prefix), missing, cls)
    close = difflib.get_close_matches(missing, [str(k) for k in node.keys()], n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join(prefix + [close[0]])}?" if close else ""
    return ConfigError(f"{key}: {cause}{hint} (to add a key the config lacks, write +{key}=...)")


def compose(overrides: Sequence[str], config_name: str = CONFIG_NAME, config_dir: Optional[str] = None):
    """Our Hydra config with ``overrides``, as ``python -m erc_verl.main_ppo`` composes it; mistakes as ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from erc_verl.configs import CONFIG_DIR

    with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base=None):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            message = str(error).split("\n")[0]
            if not isinstance(error.__cause__, OmegaConfBaseException):
                raise ConfigError(one_line(message)) from error
            cause = str(error.__cause__).split("\n")[0]
            match = _COULD_NOT.match(message)
            if match is None:
                raise ConfigError(one_line(f"{message}: {cause}")) from error
            action, key = match.groups()
            if action != "override":
                raise ConfigError(f"{key}: {cause}") from error
            raise _override_refusal(hydra_compose(config_name=config_name), key, cause) from error


# --------------------------------------------------------------------------- checks on the composed config


def _local_missing(value) -> list[str]:
    files = [value] if isinstance(value, str) else list(value or [])
    local = [f for f in files if isinstance(f, str) and not _REMOTE.match(f)]
    return [f for f in local if not os.path.exists(os.path.expanduser(f))]


def check_data_files(config) -> None:
    """data.train_files / data.val_files (a path or a list) exist, remote URIs (hdfs://, s3://, ...) aside."""
    data = config.get("data") or {}
    for key, env in (("train_files", "TRAIN_FILE"), ("val_files", "VAL_FILES")):
        missing = _local_missing(data.get(key))
        if missing:
            relative = any(not os.path.isabs(os.path.expanduser(m)) for m in missing)
            where = f" (relative to {os.getcwd()})" if relative else ""
            verb = "does" if len(missing) == 1 else "do"
            raise ConfigError(
                f"data.{key}: {', '.join(missing)} {verb} not exist{where}; run scripts/prepare_data.py (it writes "
                f"data/erc/, the recipes' DATA_DIR) or set data.{key}= (recipes: {env}= or DATA_DIR=)"
            )


def check_model_path(config) -> None:
    """actor_rollout_ref.model.path exists when it is a local path (/, ., ~); a Hugging Face id is not checked."""
    path = config.actor_rollout_ref.model.get("path")
    if (
        isinstance(path, str)
        and not _REMOTE.match(path)
        and path.startswith(("/", ".", "~"))
        and not os.path.exists(os.path.expanduser(path))
    ):
        raise ConfigError(
            f"actor_rollout_ref.model.path: {path} does not exist; set actor_rollout_ref.model.path= (recipes: "
            "MODEL_PATH=) to a local checkpoint directory or a Hugging Face id such as "
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
        )


def check_sizes(config) -> None:
    from omegaconf import OmegaConf

    for key in ("nnodes", "n_gpus_per_node"):
        value = config.trainer.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"trainer.{key} must be a positive integer, got {value!r}")
    if OmegaConf.is_missing(config.actor_rollout_ref.rollout, "name"):
        raise ConfigError(
            "actor_rollout_ref.rollout.name is not set; name the rollout engine, e.g. "
            "actor_rollout_ref.rollout.name=vllm"
        )


def _conversion_refusal(config, error) -> Optional[ConfigError]:
    """verl's dataclass conversion refused a section (Hydra's InstantiationException): the key and the reason."""
    from omegaconf import OmegaConf

    cause, section = error.__cause__, _FULL_KEY.search(str(error))
    unexpected = _UNEXPECTED.search(str(cause)) if isinstance(cause, TypeError) else None
    cls = _dataclass_of(OmegaConf.select(config, section.group(1))) if section and unexpected else None
    if cls is not None:
        return unknown_key(section.group(1), unexpected.group(1), cls)
    if not isinstance(cause, (AssertionError, ValueError, OSError)):
        return None
    text = one_line(cause)
    return ConfigError(f"{section.group(1)}: {text}" if section and section.group(1) not in text else text)


def _verl_checks(config) -> None:
    """verl's validate_config as verl's main_ppo calls it (it builds the actor dataclass), then ERC's."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import MissingMandatoryValue

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    from erc_verl.algorithm.config import validate_erc_config

    auto_set_device(config)
    try:
        validate_config(
            config=config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config)
        )
        validate_erc_config(config)
    except InstantiationException as error:
        refusal = _conversion_refusal(config, error)
        if refusal is None:
            raise
        raise refusal from error
    except (AssertionError, ValueError, MissingMandatoryValue) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(one_line(error)) from error


def check_config(config) -> None:
    """Everything a launch checks on the driver before Ray starts (the GPU count comes after ray.init)."""
    check_sizes(config)
    check_model_path(config)  # before verl's checks, which would try a missing local path as a hub id
    _verl_checks(config)
    check_data_files(config)


# --------------------------------------------------------------------------- after ray.init


def required_gpus(config) -> dict[str, tuple[int, int]]:
    """``{"<nnodes key> * <n_gpus_per_node key>": (nnodes, n_gpus_per_node)}`` for every resource pool verl 0.9's
    V1 trainer builds (``_init_resource_pool_mgr``): the global pool, the rollout's own pool in separate_async,
    a reward-model pool, a distillation teacher pool."""
    from verl.trainer.distillation import is_distillation_enabled

    trainer = config.trainer
    pools = {"trainer.nnodes * trainer.n_gpus_per_node": (trainer.nnodes, trainer.n_gpus_per_node)}
    if trainer.get("use_v1", True) and trainer.v1.trainer_mode == "separate_async":
        rollout = config.actor_rollout_ref.rollout
        pools["actor_rollout_ref.rollout.nnodes * .n_gpus_per_node"] = (rollout.nnodes, rollout.n_gpus_per_node)
    reward_model = config.reward.reward_model
    if reward_model.get("enable_resource_pool", False):
        pools["reward.reward_model.nnodes * .n_gpus_per_node"] = (reward_model.nnodes, reward_model.n_gpus_per_node)
    distillation = config.get("distillation")
    if is_distillation_enabled(distillation):
        pools["distillation.nnodes * .n_gpus_per_node"] = (distillation.nnodes, distillation.n_gpus_per_node)
    return pools


def total_gpus(config) -> int:
    return sum(nodes * per_node for nodes, per_node in required_gpus(config).values())


def check_gpu_count(config, resources: Optional[dict] = None) -> None:
    """The Ray cluster has the GPUs of every resource pool (logical ones on the CPU platform)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    need, have = total_gpus(config), resources.get("GPU", 0)
    if have < need:
        asked = " + ".join(f"{name} = {nodes} * {per} = {nodes * per}" if len(required_gpus(config)) > 1
                           else f"{name} = {nodes} * {per}" for name, (nodes, per) in required_gpus(config).items())
        raise ConfigError(
            f"{asked} = {need} GPUs, but the Ray cluster has {have:g}; set trainer.n_gpus_per_node= and "
            "trainer.nnodes= (recipes: GPUS_PER_NODE=, NNODES=) to the GPUs you have, or join more nodes to the "
            "cluster (with VERL_PLATFORM=cpu the GPUs are logical: ray_kwargs.ray_init.num_gpus for a run that starts "
            "its own Ray, ray start --num-gpus=N on each node of a running cluster)"
        )


class GPUCheckedRunner:
    """Stands in for the task-runner actor class given to verl's ``run_ppo``, which calls ``ray.init`` and then
    creates the runner (``.remote()`` or ``.options(...).remote()``): the GPU count is checked at that moment."""

    def __init__(self, runner, config):
        self._runner, self._config = runner, config

    def remote(self, *args, **kwargs):
        check_gpu_count(self._config)
        return self._runner.remote(*args, **kwargs)

    def options(self, *args, **kwargs):
        check_gpu_count(self._config)
        return self._runner.options(*args, **kwargs)


# --------------------------------------------------------------------------- the command line


def hydra_args_parser():
    """The argument parser ``@hydra.main`` itself uses, so launch() reads the command line exactly as Hydra will.

    Hydra keeps it private (``hydra._internal.utils``): it is read only from the Hydra series it was checked
    against, and tests/seams/test_preflight.py calls the real one for every attribute launch() reads.
    """
    import hydra
    from packaging.version import Version

    if Version(hydra.__version__).release[:2] != HYDRA_SERIES:
        series = ".".join(map(str, HYDRA_SERIES))
        raise RuntimeError(
            f"erc-verl reads the command line with Hydra {series}.x's hydra._internal.utils.get_args_parser, found "
            f"Hydra {hydra.__version__}. Install hydra-core=={series}.* or upgrade erc-verl."
        )
    from hydra._internal.utils import get_args_parser

    return get_args_parser()


def launch(
    hydra_main: Callable[[], Any],
    check: Callable[[Any], None] = check_config,
    argv: Optional[Sequence[str]] = None,
    config_name: str = CONFIG_NAME,
) -> None:
    """Run ``hydra_main`` (a ``@hydra.main`` function) after composing the command line's config ourselves.

    Composition mistakes are refused as one line in every mode; ``--cfg job`` / ``--cfg all`` (the recipes'
    ERC_DRY_RUN=1) also run ``check`` (what the launch runs on the driver) before Hydra prints the config. A
    real run is checked inside ``hydra_main`` (erc_verl.main_ppo.run). ``--help``, ``--multirun`` and the like,
    and ``--config-path`` / ``--config-dir`` (another config tree), go to Hydra unchanged.
    """
    args = hydra_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    hands_over = args.help or args.hydra_help or args.info or args.shell_completion or args.multirun
    if not hands_over and args.config_path is None and args.config_dir is None:
        with refusing_config_errors():
            config = compose(args.overrides, config_name=args.config_name or config_name)
            if args.cfg in ("job", "all"):
                with contextlib.redirect_stdout(sys.stderr):  # verl's notices; stdout is the config
                    check(config)
    hydra_main()
