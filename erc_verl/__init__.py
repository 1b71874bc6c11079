"""Entropy Ratio Clipping (ERC) for stock verl.

Importing the package (or just ``import verl`` with the package installed) registers the policy
losses ``gppo``, ``grpo_erc``, ``gppo_erc`` and ``erc`` in verl's loss registry.
"""

from erc_verl.quiet import quiet_if_entry_point

quiet_if_entry_point()  # our command lines only: verl's import-time engine/accelerator notices (erc_verl/quiet.py)

from erc_verl import losses as _losses  # noqa: E402,F401  (registers the losses)
from erc_verl.gate import ERCBounds, erc_keep_mask, gate_log_prob
from erc_verl.losses import ERC_LOSS_MODES, is_erc_loss_mode

__version__ = "0.1.0"
__all__ = ["ERCBounds", "ERC_LOSS_MODES", "erc_keep_mask", "gate_log_prob", "is_erc_loss_mode", "__version__"]
