"""The exception for a user's configuration mistake (as opposed to a bug in erc-verl or verl).

Raised by the driver-side checks (erc_verl.seams.preflight, erc_verl.algorithm.config); the entry points
(``python -m erc_verl.main_ppo``, the recipes) print it as one line, ``erc-verl: error: <message>``
on stderr, and exit with status 2. It is a ``ValueError``, so callers that catch those still do.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting that would fail or hang later; the message names the setting and the fix."""
