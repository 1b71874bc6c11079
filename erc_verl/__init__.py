"""Entropy Ratio Clipping (ERC) for stock verl.

Importing the package (or just ``import verl`` with the package installed) registers the policy
losses ``gppo``, ``grpo_erc``, ``gppo_erc`` and ``erc`` in verl's loss registry.

- ``algorithm``: the ERC rule, the losses, the read-only entropy and the config keys.
- ``seams``: where the algorithm plugs into verl (engine, actor loss, workers, trainer, preflight, CPU mode).
- ``paper``: the paper's math setting (data, math-verify reward, evaluation, generation).
- ``demo``: the CPU mini-reproduction (``erc-verl demo``, ``erc-verl sweep``) on verl's real trainer.
- ``bench``: what ERC costs per step.
- ``main_ppo`` (verl's ``main_ppo`` with the seams) and ``cli`` (``erc-verl``): the entry points; ``flags``: their
  command-line flags, generated from config dataclasses.
"""

from erc_verl.seams.quiet import quiet_if_entry_point

quiet_if_entry_point()  # our command lines only: verl's import-time engine/accelerator notices (erc_verl/seams/quiet.py)

from erc_verl.algorithm import losses as _losses  # noqa: E402,F401  (registers the losses)
from erc_verl.algorithm.gate import ERCBounds, erc_keep_mask, gate_log_prob
from erc_verl.algorithm.losses import ERC_LOSS_MODES, is_erc_loss_mode

__version__ = "0.1.0"
__all__ = ["ERCBounds", "ERC_LOSS_MODES", "erc_keep_mask", "gate_log_prob", "is_erc_loss_mode", "__version__"]
