"""What ``erc-verl demo`` and ``erc-verl sweep`` share: the checks of their config values, the ERC band handed to
the recipes, and the checks of finished runs (metrics, same trainer).

Each command's options are one dataclass whose fields carry their help (:func:`erc_verl.flags.option`, as verl's
and TRL's configs do); :mod:`erc_verl.flags` makes the ``--flags`` from it, and the dataclass's ``__post_init__`` is
the one place their values are checked, raising a ``ValueError`` naming the flag (argparse's usage error, exit 2).
"""

from __future__ import annotations

import os

from erc_verl.algorithm.config import ERCFSDPActorConfig
from erc_verl.algorithm.gate import ERCBounds
from erc_verl.flags import flag, option

ERC_ARMS = ("dapo_erc", "gppo_erc")  # the recipes that gate with ERC (and log its metrics and token diagnostics)


def erc_bound(which: str, **metadata) -> float:
    """The --erc-low / --erc-high field: the ERC recipes' ENTROPY_MASK_LOW / _HIGH (see :func:`erc_env`), by
    default the actor config's (the paper's band)."""
    key = f"entropy_mask_{which}"
    return option(getattr(ERCFSDPActorConfig, key), f"the ERC recipes' {key} (the default is the paper's)", **metadata)


def check_erc_band(low: float, high: float) -> None:
    """The band rule is the algorithm's (:class:`erc_verl.algorithm.gate.ERCBounds`), its refusal naming the flags."""
    ERCBounds(low, high, keys=("--erc-low", "--erc-high"))


def check_arms(arms: tuple[str, ...], minimum: int) -> None:
    from erc_verl.demo.recipe_run import CPU_RECIPES

    unknown = [arm for arm in arms if arm not in CPU_RECIPES]
    if unknown:
        raise ValueError(f"--arms: unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(CPU_RECIPES)}.")
    if len(set(arms)) != len(arms):
        raise ValueError(f"--arms lists a recipe twice: {','.join(arms)}.")
    if len(arms) < minimum:
        raise ValueError(f"--arms needs {minimum} or more recipes from {', '.join(CPU_RECIPES)}, got {len(arms)}.")


def check_positive(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ValueError(f"{flag(name)} must be positive, got {getattr(config, name)}.")


def check_group_size(n: int) -> None:
    if n < 2:
        raise ValueError(f"--n must be >= 2, got {n}: GRPO advantages compare samples of the same prompt.")


def check_out_dir(out: str) -> None:
    """--out must be, or become, a writable directory: refused now, in one line, not minutes into the run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a directory; choose another --out.")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable; choose another --out.")


def erc_env(erc_low: float, erc_high: float) -> dict[str, str]:
    """The ERC recipes read their band from these variables (recipe/dapo_erc.sh, recipe/gppo_erc.sh)."""
    return {"ENTROPY_MASK_LOW": repr(erc_low), "ENTROPY_MASK_HIGH": repr(erc_high)}


def check_arm(arm: str, rows: list[dict], steps: int, run_dir: str) -> None:
    """Every step logged, ERC's metrics present exactly in ERC arms: else the arm did not run as its recipe says."""
    from erc_verl.demo.metrics import ERC_CLIPFRAC, REWARD

    logged = sum(REWARD in row for row in rows)
    if logged != steps:
        raise SystemExit(f"erc-verl: {arm} logged {logged} training steps, expected {steps}; "
                         f"see {run_dir}/train.log.")
    logged_erc = any(ERC_CLIPFRAC in row for row in rows)
    if logged_erc != (arm in ERC_ARMS):
        raise SystemExit(f"erc-verl: {arm} {'logged' if logged_erc else 'did not log'} {ERC_CLIPFRAC}: the "
                         f"{'ERC' if arm in ERC_ARMS else 'baseline'} loss did not run as its recipe says.")


def check_same_trainer(identities: dict[str, dict], command: str) -> None:
    """Runs compared only on the same trainer (V1 or not, mode, replay buffer: the run identity of
    :mod:`erc_verl.seams.run_identity`), else a difference could be the trainer's rather than ERC's."""
    modes: dict[tuple, str] = {}
    for name, identity in identities.items():
        modes.setdefault(tuple((k, identity[k]) for k in ("use_v1", "trainer_mode", "replay_buffer")), name)
    if len(modes) > 1:
        seen = "; ".join(f"{name}: {dict(mode)}" for mode, name in modes.items())
        raise SystemExit(f"erc-verl {command}: the runs used different trainers ({seen}); compare like with like.")
