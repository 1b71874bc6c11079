"""The ``torch.<device>`` namespace for CPU mode: ``torch.cpu`` plus what verl calls on ``torch.cuda``.

verl reaches the device through ``get_torch_device()`` (the platform's ``device_module``) and calls
memory, RNG and stream functions on it. ``torch.cpu`` has the stream and device-count half; the rest
are answered here with what is true on a CPU: no cache to empty, host memory as "device" memory, the
global CPU generator as the device RNG.
"""

from __future__ import annotations

import psutil
import torch
from torch.cpu import (  # noqa: F401  (re-exported: verl calls these on the device module)
    Event,
    Stream,
    StreamContext,
    current_device,
    current_stream,
    device_count,
    is_available,
    set_device,
    stream,
    synchronize,
)


def empty_cache() -> None:
    """CPU tensors go straight back to the allocator: nothing is cached."""


def ipc_collect() -> None:
    """No CUDA IPC handles exist on CPU."""


def set_per_process_memory_fraction(fraction: float, device=None) -> None:
    """No device memory pool to cap on CPU."""


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes of host memory, the memory CPU tensors live in."""
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def memory_allocated(device=None) -> int:
    return psutil.Process().memory_info().rss


memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated


def reset_peak_memory_stats(device=None) -> None:
    """RSS has no resettable peak."""


def get_rng_state(device=None) -> torch.Tensor:
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device=None) -> None:
    torch.set_rng_state(state)


def manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


manual_seed_all = manual_seed


def get_device_name(device=None) -> str:
    return "cpu"
