"""Shared helpers for the CPU-mode unit tests (erc_verl.seams.cpu).

Two ways to get CPU mode, for two kinds of test:

- ``run_python``: a fresh interpreter, with or without ``VERL_PLATFORM=cpu``. Needed wherever the
  test is about what ``import verl`` does (the plugin applies the patches at import, only when the
  variable is set, and verl caches its platform singleton for the life of the process).
- ``cpu_platform``: this process, with erc-verl's ``PlatformCPU`` installed as verl's platform
  singleton for one test and the previous one put back after, for tests of code that asks verl for
  the device (``get_torch_device()``, ``is_support_ipc()``) and of one patch at a time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile

import pytest

# Variables that would change which platform / plugins / engines a fresh interpreter picks.
_SCRUBBED = ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VERL_ENGINE_VENDOR", "VERL_USE_EXTERNAL_PLUGINS",
             "VERL_USE_EXTERNAL_MODULES", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
             "DIST_INIT_METHOD")
SUBPROCESS_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a TCP port on 127.0.0.1 nothing listens on (for torch.distributed rendezvous)."""
    return _free_port


@pytest.fixture(scope="session")
def run_python():
    """``run_python(code, cpu_mode=True, **env)`` runs ``code`` in a fresh interpreter (cwd ``/``, so the
    installed packages are what is imported) and returns the JSON the code printed with ``emit(obj)``."""

    def run(code: str, cpu_mode: bool = True, **env: str) -> dict:
        child_env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        if cpu_mode:
            child_env["VERL_PLATFORM"] = "cpu"
        child_env.update(env)
        with tempfile.TemporaryDirectory() as tmp:
            result = os.path.join(tmp, "result.json")
            prelude = (f"import json as _json\ndef emit(obj):\n    with open({result!r}, 'x') as f:\n"
                       "        _json.dump(obj, f)\n")
            proc = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd="/",
                                  env=child_env, timeout=SUBPROCESS_TIMEOUT_S)
            output = proc.stdout + proc.stderr
            assert proc.returncode == 0 and os.path.exists(result), f"probe exited {proc.returncode}:\n{output[-6000:]}"
            with open(result) as f:
                return json.load(f)

    return run


@pytest.fixture
def cpu_platform(monkeypatch):
    """erc-verl's PlatformCPU as verl's platform singleton for this test only."""
    from verl.plugin.platform import platform_manager

    from erc_verl.seams.cpu.platform import PlatformCPU

    platform = PlatformCPU()
    monkeypatch.setattr(platform_manager, "_current_platform", platform)
    return platform
