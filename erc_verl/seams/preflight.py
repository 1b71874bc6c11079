"""Driver-side checks that stop a bad launch in seconds, before Ray starts.

``python -m erc_verl.main_ppo`` (and so every recipe) runs them; a failure is a
:class:`~erc_verl.seams.errors.ConfigError` that the entry point prints as one line,
``erc-verl: error: <message>``, exiting with status 2.

- :func:`compose`: our Hydra config with the command-line overrides; a mistyped ERC key gets a
  "did you mean", other override mistakes one line instead of Hydra's report.
- :func:`check_config`: what a real launch and a dry run (``--cfg job``, ``ERC_DRY_RUN=1``) both
  check: ERC key names and types, trainer sizes, the local model directory, verl's own
  ``validate_config`` (as verl's ``main_ppo`` calls it), :func:`erc_verl.algorithm.config.validate_erc_config`,
  then the local data files.
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
import typing
from typing import Any, Callable, Optional, Sequence

from erc_verl.seams.errors import ConfigError

ACTOR = "actor_rollout_ref.actor"
CONFIG_NAME = "erc_ppo_trainer"
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")  # hdfs://, s3://, gs://, ...: not checked here


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


# --------------------------------------------------------------------------- ERC keys, from the dataclasses


def _init_fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "_target_"]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else tp), len(args) < len(typing.get_args(tp))
    return tp, False


def _erc_fields() -> dict[str, Any]:
    """Field name -> type of the keys ERCFSDPActorConfig adds to verl's FSDPActorConfig."""
    from verl.workers.config import FSDPActorConfig

    from erc_verl.algorithm.config import ERCFSDPActorConfig

    hints = typing.get_type_hints(ERCFSDPActorConfig)
    base = set(_init_fields(FSDPActorConfig))
    return {name: hints[name] for name in _init_fields(ERCFSDPActorConfig) if name not in base}


def erc_actor_keys() -> list[str]:
    """The ERC keys of ``actor_rollout_ref.actor`` (nested dataclass fields dotted), read from the dataclasses."""
    keys = []
    for name, tp in _erc_fields().items():
        inner, _ = _unwrap_optional(tp)
        if dataclasses.is_dataclass(inner):
            keys += [f"{name}.{sub}" for sub in _init_fields(inner)]
        else:
            keys.append(name)
    return keys


def _actor_key_error(relative: str) -> Optional[ConfigError]:
    """A ConfigError when ``actor_rollout_ref.actor.<relative>`` is no key of the ERC actor config."""
    from erc_verl.algorithm.config import ERCFSDPActorConfig

    parts = relative.split(".")
    erc = _erc_fields()
    if parts[0] in _init_fields(ERCFSDPActorConfig) or parts[0] == "_target_":
        inner, _ = _unwrap_optional(erc.get(parts[0]))
        if len(parts) == 1 or not dataclasses.is_dataclass(inner) or parts[1] in _init_fields(inner) + ["_target_"]:
            return None
    candidates = _init_fields(ERCFSDPActorConfig) + [k for k in erc_actor_keys() if "." in k]
    close = difflib.get_close_matches(relative, candidates, n=1, cutoff=0.6)
    hint = f"; did you mean {ACTOR}.{close[0]}?" if close else "."
    keys = ", ".join(erc_actor_keys())
    return ConfigError(f"{ACTOR}.{relative} is not a key of the actor config{hint} ERC keys: {keys}.")


def check_erc_keys(actor) -> None:
    """Every key of the actor section is one ERCFSDPActorConfig accepts; the ERC keys have the right types."""
    keys = [str(key) for key in actor]
    for name, tp in _erc_fields().items():
        node = actor.get(name)
        if dataclasses.is_dataclass(_unwrap_optional(tp)[0]) and hasattr(node, "keys"):
            keys += [f"{name}.{key}" for key in node.keys()]
    for key in keys:
        error = _actor_key_error(key)
        if error:
            raise error
    for name, tp in _erc_fields().items():
        if name in actor:
            _check_type(f"{ACTOR}.{name}", actor.get(name), tp)


def _check_type(path: str, value: Any, tp: Any) -> None:
    tp, optional = _unwrap_optional(tp)
    if value is None and optional:
        return
    if dataclasses.is_dataclass(tp):
        if not hasattr(value, "keys"):
            raise ConfigError(f"{path} must be a mapping of {', '.join(_init_fields(tp))}, got {value!r}")
        hints = typing.get_type_hints(tp)
        for name in _init_fields(tp):
            if name in value:
                _check_type(f"{path}.{name}", value.get(name), hints[name])
        return
    expected = {float: ("a number", (int, float)), int: ("an integer", (int,)), bool: ("true or false", (bool,)),
                str: ("a string", (str,))}.get(tp)
    if expected is None:
        return
    what, types = expected
    if not isinstance(value, types) or (tp is not bool and isinstance(value, bool)):
        raise ConfigError(f"{path} must be {what}, got {value!r}")


# --------------------------------------------------------------------------- composition


def check_overrides(overrides: Sequence[str]) -> None:
    """Refuse an override of an ERC-actor key that does not exist, with or without Hydra's ``+``/``++``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except OverrideParseException as error:
        raise ConfigError(f"cannot parse the override: {one_line(error)}") from error
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or not key.startswith(ACTOR + "."):
            continue
        error = _actor_key_error(key[len(ACTOR) + 1 :])
        if error:
            raise error


def _close_key(config, dotted: str) -> Optional[str]:
    """The existing key of ``config`` closest to the missing ``dotted`` one (same parent), if any."""
    from omegaconf import DictConfig

    parts = dotted.split(".")
    node, prefix = config, []
    for part in parts[:-1]:
        child = node.get(part) if isinstance(node, DictConfig) and part in node else None
        if not isinstance(child, DictConfig):
            break
        node, prefix = child, prefix + [part]
    missing = parts[len(prefix)]
    close = difflib.get_close_matches(missing, [str(k) for k in node.keys()], n=1, cutoff=0.6)
    return ".".join(prefix + [close[0]]) if close else None


def compose(overrides: Sequence[str], config_name: str = CONFIG_NAME, config_dir: Optional[str] = None):
    """Our Hydra config with ``overrides``, as ``python -m erc_verl.main_ppo`` composes it; mistakes as ConfigError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from erc_verl.configs import CONFIG_DIR

    check_overrides(overrides)
    with initialize_config_dir(config_dir=str(config_dir or CONFIG_DIR), version_base=None):
        try:
            return hydra_compose(config_name=config_name, overrides=list(overrides))
        except (HydraException, OmegaConfBaseException) as error:
            message = str(error).split("\n")[0]
            match = re.match(r"Could not (override|append to|delete) '([^']+)'", message)
            if match and isinstance(error.__cause__, OmegaConfBaseException):
                key = match.group(2)
                cause = str(error.__cause__).split("\n")[0]
                overriding = match.group(1) == "override"
                close = _close_key(hydra_compose(config_name=config_name), key) if overriding else None
                hint = f"; did you mean {close}?" if close else ""
                add = f" (to add a key the config lacks, write +{key}=...)" if overriding else ""
                raise ConfigError(f"{key}: {cause}{hint}{add}") from error
            if isinstance(error.__cause__, OmegaConfBaseException):
                message += ": " + str(error.__cause__).split("\n")[0]
            raise ConfigError(one_line(message)) from error


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


def _verl_checks(config) -> None:
    """verl's validate_config as verl's main_ppo calls it, then ERC's; their refusals as ConfigError."""
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
    except InstantiationException as error:  # a dataclass refused its section: report the section and the reason
        cause = error.__cause__
        if not isinstance(cause, (AssertionError, ValueError, OSError)):
            raise
        section = re.search(r"full_key: (\S+)", str(error))
        text = one_line(cause)
        if section and section.group(1) not in text:
            text = f"{section.group(1)}: {text}"
        raise ConfigError(text) from error
    except (AssertionError, ValueError, MissingMandatoryValue) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(one_line(error)) from error


def check_config(config) -> None:
    """Everything a launch checks on the driver before Ray starts (the GPU count comes after ray.init)."""
    check_erc_keys(config.actor_rollout_ref.actor)
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
    from hydra._internal.utils import get_args_parser  # the parser @hydra.main itself uses (Hydra 1.3)

    args = get_args_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    hands_over = args.help or args.hydra_help or args.info or args.shell_completion or args.multirun
    if not hands_over and args.config_path is None and args.config_dir is None:
        with refusing_config_errors():
            config = compose(args.overrides, config_name=args.config_name or config_name)
            if args.cfg in ("job", "all"):
                with contextlib.redirect_stdout(sys.stderr):  # verl's notices; stdout is the config
                    check(config)
    hydra_main()
