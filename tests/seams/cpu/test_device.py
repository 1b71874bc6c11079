"""erc_verl.seams.cpu.device: the ``torch.<device>`` namespace verl calls through ``get_torch_device()``.

The first two tests read verl's installed source: a verl upgrade that starts calling something new on
the device module fails here instead of with an AttributeError mid-run.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import psutil
import pytest
import torch

import verl
from erc_verl.seams.cpu import device as cpu_device

VERL_ROOT = Path(verl.__file__).resolve().parent

# Functions of verl's that use device attributes CPU mode does not have, all behind verl's
# `torch_memory` profiler tool (CUDA allocator snapshots; none exists on CPU) or only called by it.
PROFILER_ONLY = {
    ("utils/memory_utils.py", "reset_memory_stats"),
    ("utils/memory_utils.py", "get_memory_info"),
    ("utils/memory_utils.py", "enable_memory_visualize"),
    ("utils/memory_utils.py", "clear_memory_history"),
    ("utils/memory_utils.py", "dump_memory_snapshot"),
}


def _verl_sources():
    sources = sorted(VERL_ROOT.rglob("*.py"))
    assert len(sources) > 100, f"verl's source not found under {VERL_ROOT}"
    return sources


def test_every_attribute_verl_calls_on_get_torch_device_exists():
    called = set()
    for path in _verl_sources():
        called |= set(re.findall(r"get_torch_device\(\)\.(\w+)", path.read_text(encoding="utf-8")))
    # the grep finds verl's calls (a handful at least, e.g. empty_cache, synchronize, mem_get_info)
    assert {"empty_cache", "synchronize", "mem_get_info", "get_rng_state", "current_stream"} <= called
    missing = sorted(name for name in called if not hasattr(cpu_device, name))
    assert not missing, f"verl calls get_torch_device().{missing} but erc_verl.seams.cpu.device lacks them"


def _aliased_device_attributes(path: Path):
    """(function, attribute) for ``x = get_torch_device()`` followed by ``x.attribute`` in one function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for function in ast.walk(tree):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        aliases = {
            target.id
            for node in ast.walk(function) if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "get_torch_device"
            for target in node.targets if isinstance(target, ast.Name)
        }
        for node in ast.walk(function):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
                yield function.name, node.attr


def test_device_attributes_verl_reaches_through_a_variable_exist_outside_the_profiler():
    """``device = get_torch_device(); device.memory_reserved()`` (verl's aggressive_empty_cache, on the
    training path) is not caught by the grep above; missing attributes are allowed only where the
    whole function is the CUDA memory profiler's."""
    seen, missing = set(), set()
    for path in _verl_sources():
        relative = path.relative_to(VERL_ROOT).as_posix()
        for function, attribute in _aliased_device_attributes(path):
            seen.add((relative, function, attribute))
            if not hasattr(cpu_device, attribute):
                missing.add((relative, function, attribute))
    assert ("utils/memory_utils.py", "aggressive_empty_cache", "memory_reserved") in seen
    unexpected = sorted(m for m in missing if m[:2] not in PROFILER_ONLY)
    assert not unexpected, f"verl reaches these on the device module, erc_verl.seams.cpu.device lacks them: {unexpected}"


def test_verl_training_path_memory_helpers_run_on_cpu(cpu_platform):
    """verl's own callers, run against the CPU device module (the engine worker calls the first one)."""
    from verl.utils.memory_utils import aggressive_empty_cache
    from verl.utils.profiler.performance import _get_current_mem_info

    aggressive_empty_cache(force_sync=True)
    allocated, reserved, used, total = (float(x) for x in _get_current_mem_info(unit="GB"))
    assert 0 < allocated <= total and 0 < used <= total
    assert total == pytest.approx(psutil.virtual_memory().total / 1024**3, abs=0.01)


def test_mem_get_info_is_plausible_host_memory():
    free, total = cpu_device.mem_get_info()
    assert 0 < free <= total
    assert total == psutil.virtual_memory().total
    assert 0 < cpu_device.memory_allocated() < total
    assert cpu_device.max_memory_allocated() > 0 and cpu_device.memory_reserved() > 0


def test_rng_state_round_trip_reproduces_torch_rand():
    cpu_device.manual_seed(1234)
    state = cpu_device.get_rng_state()
    first = torch.rand(8)
    second = torch.rand(8)
    assert not torch.equal(first, second)  # the generator moved on
    cpu_device.set_rng_state(state)
    assert torch.equal(torch.rand(8), first)


def test_manual_seed_seeds_the_generator_tensors_use():
    cpu_device.manual_seed_all(7)
    a = torch.randn(4)
    cpu_device.manual_seed(7)
    assert torch.equal(torch.randn(4), a)


def test_streams_and_device_queries_are_torch_cpu():
    assert cpu_device.is_available() is True
    assert cpu_device.device_count() >= 1
    assert cpu_device.get_device_name() == "cpu"
    # as verl's activation offload uses them: a side stream, entered, then ordered after the current one
    side = cpu_device.Stream()
    with cpu_device.stream(side):
        torch.ones(2).add_(1)
    side.wait_stream(cpu_device.current_stream())
    event = cpu_device.Event()
    event.record()
    event.synchronize()
    cpu_device.synchronize()
    cpu_device.empty_cache()
    cpu_device.ipc_collect()
    cpu_device.set_per_process_memory_fraction(0.9)
    cpu_device.reset_peak_memory_stats()
