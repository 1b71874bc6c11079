"""Run one function in a fresh Python interpreter and get its JSON result back.

The benchmarks measure in fresh processes for two reasons: a process's peak memory (``ru_maxrss``, CUDA's peak
counter) is its own only when nothing else ran in it, and glibc reads its malloc settings (``MALLOC_*``) once, at
start. The child calls ``module:function`` with JSON arguments and writes the JSON result to a file: no tagged
output lines to pick out of what the measured code prints.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# glibc malloc settings a fresh interpreter may run with (CPU only; see erc_verl.bench.overhead's docstring).
MALLOC_ENV = {
    "pinned": {"MALLOC_MMAP_THRESHOLD_": "131072"},  # peak RSS follows live tensors
    "cached": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)},  # freed memory reused, as CUDA's
    "default": {},
}


def run_fresh(target: str, *args, malloc_env: dict[str, str] | None = None, live_output: bool = False):
    """``target`` ("package.module:function", or an attribute path after the colon) called with JSON-able ``args``
    in a new interpreter; its JSON result.

    The child runs with exactly ``malloc_env`` (inherited ``MALLOC_*`` and ``GLIBC_TUNABLES`` are dropped).
    ``live_output`` passes its stdout and stderr straight through; otherwise they are shown only if it fails.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(malloc_env or {})
    with tempfile.TemporaryDirectory(prefix="erc_bench_") as tmp:
        call, result = Path(tmp) / "call.json", Path(tmp) / "result.json"
        call.write_text(json.dumps({"target": target, "args": args}))
        pipe = None if live_output else subprocess.PIPE
        proc = subprocess.run([sys.executable, "-m", "erc_verl.bench.fresh", str(call), str(result)], env=env,
                              stdout=pipe, stderr=pipe, text=True)
        if proc.returncode != 0 or not result.exists():
            sys.stderr.write((proc.stdout or "")[-4000:] + (proc.stderr or "")[-8000:])
            raise RuntimeError(f"{target} in a fresh interpreter failed with exit code {proc.returncode}")
        return json.loads(result.read_text())


def _child(call_path: str, result_path: str) -> None:
    call = json.loads(Path(call_path).read_text())
    module, _, name = call["target"].partition(":")
    result = functools.reduce(getattr, name.split("."), importlib.import_module(module))(*call["args"])
    Path(result_path).write_text(json.dumps(result))


if __name__ == "__main__":
    _child(*sys.argv[1:])
