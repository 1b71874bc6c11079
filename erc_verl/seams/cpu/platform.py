"""``PlatformCPU``: verl's platform interface answered for a machine without accelerators.

Registered in verl 0.9's platform registry as ``cpu`` on ``import verl`` (the ``verl.plugins`` entry
point), so every process, Ray workers included, resolves it; ``VERL_PLATFORM=cpu`` selects it (verl
never auto-detects it: on a GPU machine nothing changes). Selecting it also applies the CPU-mode
workarounds in ``erc_verl.seams.cpu.patches``.

Ray scheduling: verl's resource pools count ``GPU`` resources only, so CPU mode schedules every worker
on a *logical* Ray ``GPU`` (``ray_kwargs.ray_init.num_gpus``, set by ``erc_verl.main_ppo`` in CPU mode).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any, Optional

from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import PlatformRegistry

from erc_verl.seams.cpu import device as cpu_device

PLATFORM_NAME = "cpu"
PLATFORM_ENV = "VERL_PLATFORM"  # verl's platform switch, read in every process


def cpu_mode_selected() -> bool:
    """True when ``VERL_PLATFORM=cpu`` (the one documented switch for CPU mode)."""
    return os.environ.get(PLATFORM_ENV, "").strip().lower() == PLATFORM_NAME


@PlatformRegistry.register(platform=PLATFORM_NAME)
class PlatformCPU(PlatformBase):
    """Host CPU as verl's device: ``gloo`` collectives, logical Ray GPUs, no IPC, no profiler."""

    def __init__(self):
        if _patch_error is not None:
            raise _patch_error

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return cpu_device

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # Never auto-detected: a CPU is always there, so only VERL_PLATFORM=cpu picks this platform.
        return cpu_mode_selected()

    def current_device(self) -> str:
        # verl passes this to `.to(...)` / `torch.device(...)`; "cpu" is valid for both.
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: Optional[int] = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        cpu_device.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        cpu_device.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[Optional[int], Optional[int]]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        # Ray assigns logical GPUs through this variable; nothing on CPU reads it as hardware.
        return "CUDA_VISIBLE_DEVICES"

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def cudart(self) -> Any:
        return None


# verl's plugin loader logs an exception from this import at debug level and goes on; keep a patch
# failure here and raise it when verl instantiates the platform, so it cannot pass unseen.
_patch_error: Exception | None = None
if cpu_mode_selected():
    from erc_verl.seams.cpu import patches

    try:
        patches.apply()
    except patches.CPUModeUnsupported as error:
        _patch_error = error
