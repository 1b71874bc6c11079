"""Keep verl's known-harmless import-time notices out of our command lines' output.

Importing verl prints about a dozen lines on a machine without every optional engine: one
``UserWarning`` per engine that is not installed (torchtitan, veomni, automodel, mindspeed, megatron)
and the platform manager's "no accelerator detected" / "registered but not available" notices. Our
entry points (``python -m erc_verl.main_ppo``, ``erc-verl``) drop exactly those messages, nothing
else: other warnings and every error still print. The GPU count itself is checked at launch
(erc_verl.seams.preflight.check_gpu_count). Library imports of ``erc_verl`` change nothing.

erc_verl/__init__.py calls :func:`quiet_if_entry_point` before it imports verl.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

ENTRY_MODULES = ("erc_verl.main_ppo", "erc_verl.cli")
ENTRY_SCRIPTS = ("erc-verl",)

# verl/workers/engine/__init__.py: `warnings.warn(f"{name} engine is not available: {e!r}")` for a missing package
_ENGINE_WARNING = r"(torchtitan|veomni|automodel|mindspeed|megatron) engine is not available: ModuleNotFoundError\("
_PLATFORM_LOGGER = "verl.plugin.platform.platform_manager"
_PLATFORM_NOTICES = (
    "No supported accelerator detected. Registered: %s. Falling back to 'nvidia'.",
    "Platform '%s' (%s) is registered but not available. This may be due to this ray actor being a CPU-only actor.",
)


def launched_as_entry_point(orig_argv=None, argv0=None) -> bool:
    """True in a process started as ``python -m erc_verl.main_ppo|erc_verl.cli`` or the ``erc-verl`` script."""
    args = list(getattr(sys, "orig_argv", []) if orig_argv is None else orig_argv)[1:]
    while args:
        arg = args.pop(0)
        if arg == "-m":
            return bool(args) and args[0] in ENTRY_MODULES
        if arg.startswith("-m"):
            return arg[2:] in ENTRY_MODULES
        if arg in ("-X", "-W"):  # interpreter options with a separate value
            args = args[1:]
        elif arg == "-c" or not arg.startswith("-"):  # -c code, or a script: ours only as the erc-verl script
            break
    argv0 = (sys.argv[0] if sys.argv else "") if argv0 is None else argv0
    return os.path.basename(argv0) in ENTRY_SCRIPTS


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.msg in _PLATFORM_NOTICES)


def silence_import_notices() -> None:
    """Drop verl's import-time engine-availability warnings and accelerator notices (exact messages only)."""
    warnings.filterwarnings("ignore", message=_ENGINE_WARNING, category=UserWarning, module=r"verl\.workers\.engine$")
    logger = logging.getLogger(_PLATFORM_LOGGER)
    if not any(isinstance(f, _DropNotices) for f in logger.filters):
        logger.addFilter(_DropNotices())


def quiet_if_entry_point() -> None:
    if launched_as_entry_point():
        silence_import_notices()
