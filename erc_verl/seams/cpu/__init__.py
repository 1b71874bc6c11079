"""CPU mode: verl's whole trainer (Ray, FSDP engine workers, vLLM rollout) on a machine without GPUs.

For tests, debugging recipes and the demo; GPU clusters never load any of it. Selected with
``VERL_PLATFORM=cpu``; installed with the CPU lock file (``requirements/cpu.txt``, vLLM's CPU build).

- ``device``: the ``torch.<device>`` namespace verl calls through ``get_torch_device()``.
- ``platform``: ``PlatformCPU``, registered in verl's own platform registry as ``cpu``.
- ``patches``: the few verl / vLLM workarounds CPU mode needs, each version-guarded.

May import verl, vLLM and the other seams (``errors``, ``preflight``); never the paper tooling or the demo.
"""
