"""erc_verl.seams.cpu.platform: what ``VERL_PLATFORM=cpu`` changes in verl, and that nothing changes without it.

The fresh-process probes ask verl's own functions (``verl.utils.device``, ``EngineRegistry``,
``initialize_global_process_group_ray``), not erc-verl's, so they show what verl's trainer and workers
will see after ``import verl`` in a Ray worker.
"""

from __future__ import annotations

import pytest
import torch

from erc_verl.seams.cpu import device as cpu_device
from erc_verl.seams.cpu import platform as cpu_platform_module
from erc_verl.seams.cpu.patches import CPUModeUnsupported
from erc_verl.seams.cpu.platform import PlatformCPU

# Everything a Ray worker of a CPU run asks verl for, after `import verl` and nothing else.
CPU_MODE_PROBE = """
import verl
import torch
import torch.distributed as dist
from verl.plugin.platform import get_platform
from verl.utils import device
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

out = {
    "platform": type(get_platform()).__module__ + "." + type(get_platform()).__name__,
    "device_name": device.get_device_name(),
    "torch_device": device.get_torch_device().__name__,
    "nccl_backend": device.get_nccl_backend(),
    "resource_name": device.get_resource_name(),
    "visible_devices": device.get_visible_devices_keyword(),
    "ipc": device.is_support_ipc(),
}
for model_type in ("language_model", "value_model"):
    for backend in ("fsdp", "fsdp2"):
        cls = EngineRegistry.get_engine_cls(model_type, backend)
        out[f"engine/{model_type}/{backend}"] = cls.__module__ + "." + cls.__name__

sync = vLLMColocateWorkerExtension.update_weights_from_ipc
out["weight_sync"] = [sync.__module__, sync.__qualname__, getattr(sync, "_erc_cpu_mode", False)]

# verl's own process-group setup, first as verl 0.9 builds it unpatched (explicit backend=None
# skips the patched default and reaches verl's `cpu:gloo,{device}:{backend}` string) ...
try:
    initialize_global_process_group_ray(timeout_second=60, backend=None)
    out["unpatched_init"] = "initialised"
except Exception as error:
    out["unpatched_init"] = f"{type(error).__name__}: {error}"
out["initialised_after_unpatched"] = dist.is_initialized()
# ... then as verl's workers call it (no backend argument).
initialize_global_process_group_ray(timeout_second=60)
value = torch.tensor([3.0])
dist.all_reduce(value)
out["pg"] = {"backend": dist.get_backend(), "rank": dist.get_rank(), "world_size": dist.get_world_size(),
             "all_reduce": value.item()}
dist.destroy_process_group()
emit(out)
"""

DEFAULT_PROBE = """
import sys
import verl
from verl.plugin.platform import PlatformRegistry
from verl.utils import device
from verl.utils.distributed import initialize_global_process_group_ray
from verl.workers.engine.base import EngineRegistry
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
from erc_verl.seams.cpu.platform import PlatformCPU

emit({
    "cpu_registered": PlatformRegistry.get("cpu") is PlatformCPU,
    "cpu_available": PlatformCPU().is_platform_available(use_smi_check=True),
    "device_name": device.get_device_name(),
    "torch_device": device.get_torch_device().__name__,
    "nccl_backend": device.get_nccl_backend(),
    "pg_defaults": list(initialize_global_process_group_ray.__defaults__ or ()),
    "cpu_engines": sorted(mt for mt, backends in EngineRegistry._engines.items()
                          if any("cpu" in devices for devices in backends.values())),
    "weight_sync": vLLMColocateWorkerExtension.update_weights_from_ipc.__module__,
    "patches_imported": "erc_verl.seams.cpu.patches" in sys.modules,
})
"""


@pytest.fixture(scope="module")
def cpu_mode_answers(run_python, free_port):
    """One fresh ``VERL_PLATFORM=cpu`` interpreter (each costs ~10 s of imports), shared by the tests below."""
    return run_python(CPU_MODE_PROBE, cpu_mode=True, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


@pytest.mark.integration
def test_verl_device_functions_answer_cpu(cpu_mode_answers):
    assert cpu_mode_answers["platform"] == "erc_verl.seams.cpu.platform.PlatformCPU"
    assert cpu_mode_answers["device_name"] == "cpu"
    assert cpu_mode_answers["torch_device"] == "erc_verl.seams.cpu.device"
    assert cpu_mode_answers["nccl_backend"] == "gloo"
    # Ray schedules CPU-mode workers on logical GPUs: verl's resource pools only count GPUs.
    assert cpu_mode_answers["resource_name"] == "GPU"
    assert cpu_mode_answers["visible_devices"] == "CUDA_VISIBLE_DEVICES"
    # verl's weight sender falls back to shared memory when the platform has no IPC.
    assert cpu_mode_answers["ipc"] is False


@pytest.mark.integration
def test_verl_engine_registry_finds_fsdp_engines_for_cpu(cpu_mode_answers):
    fsdp = "verl.workers.engine.fsdp.transformer_impl."
    for backend in ("fsdp", "fsdp2"):
        assert cpu_mode_answers[f"engine/language_model/{backend}"] == fsdp + "FSDPEngineWithLMHead"
        assert cpu_mode_answers[f"engine/value_model/{backend}"] == fsdp + "FSDPEngineWithValueHead"


@pytest.mark.integration
def test_verl_process_group_setup_fails_unpatched_and_works_patched(cpu_mode_answers):
    # verl 0.9's own backend string on CPU names cpu twice, which torch refuses ...
    assert cpu_mode_answers["unpatched_init"].startswith("ValueError: Duplicate device type cpu")
    assert cpu_mode_answers["initialised_after_unpatched"] is False
    # ... and with the patched default verl's call builds a working single-rank gloo group.
    assert cpu_mode_answers["pg"] == {"backend": "cpu:gloo", "rank": 0, "world_size": 1, "all_reduce": 3.0}


@pytest.mark.integration
def test_vllm_weight_sync_is_the_cpu_mode_version(cpu_mode_answers):
    module, qualname, marked = cpu_mode_answers["weight_sync"]
    assert module == "erc_verl.seams.cpu.patches"
    assert qualname.startswith("vllm_reload_weights_on_cpu.")
    assert marked is True


def test_duplicate_cpu_backend_string_is_what_torch_refuses(free_port):
    """Why ``patches.gloo_only_process_group`` exists: verl 0.9 builds ``cpu:gloo,{device}:{backend}``,
    which on CPU is this string; torch refuses it before any rendezvous."""
    import torch.distributed as dist

    verl_backend_on_cpu = f"cpu:gloo,{PlatformCPU().device_name}:{PlatformCPU().communication_backend_name()}"
    assert verl_backend_on_cpu == "cpu:gloo,cpu:gloo"
    with pytest.raises(ValueError, match="Duplicate device type cpu"):
        dist.init_process_group(backend=verl_backend_on_cpu, rank=0, world_size=1,
                                init_method=f"tcp://127.0.0.1:{free_port()}")
    assert not dist.is_initialized()


@pytest.mark.integration
def test_without_verl_platform_nothing_changes(run_python):
    answers = run_python(DEFAULT_PROBE, cpu_mode=False)
    # registered (the entry point loads in every process) but never auto-detected
    assert answers["cpu_registered"] is True
    assert answers["cpu_available"] is False
    # verl picks its usual accelerator (cuda, even on this GPU-less machine) ...
    assert answers["device_name"] == "cuda"
    assert answers["torch_device"] == "torch.cuda"
    assert answers["nccl_backend"] == "nccl"
    # ... and none of verl's code is patched
    assert answers["pg_defaults"] == [None, None]
    assert answers["cpu_engines"] == []
    assert answers["weight_sync"] == "verl.workers.rollout.vllm_rollout.utils"
    assert answers["patches_imported"] is False


def test_platform_is_selected_only_by_verl_platform(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    assert PlatformCPU().is_platform_available(use_smi_check=True) is False
    monkeypatch.setenv("VERL_PLATFORM", "nvidia")
    assert PlatformCPU().is_platform_available(use_smi_check=True) is False
    monkeypatch.setenv("VERL_PLATFORM", " CPU ")  # verl strips and lower-cases it too
    assert PlatformCPU().is_platform_available(use_smi_check=True) is True


def test_verl_resolves_cpu_through_its_own_registry(monkeypatch):
    """verl's platform manager (detection from VERL_PLATFORM, then registry lookup) builds our class."""
    from verl.plugin.platform import platform_manager

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.setattr(platform_manager, "_current_platform", None)
    platform = platform_manager.get_platform()
    assert type(platform) is PlatformCPU
    assert platform.device_module is cpu_device
    assert platform.ray_resource_options(0.5) == {"num_gpus": 0.5}
    assert platform.current_device() == "cpu" and torch.device(platform.current_device()).type == "cpu"


def test_patch_failure_at_import_surfaces_when_verl_builds_the_platform(monkeypatch):
    """verl's plugin loader swallows import errors; the platform re-raises a patch failure when verl
    instantiates it, so a CPU run stops at its first `get_platform()` instead of running unpatched."""
    from verl.plugin.platform import platform_manager

    error = CPUModeUnsupported("erc-verl CPU mode ...; verl's EngineRegistry no longer maps ...")
    monkeypatch.setattr(cpu_platform_module, "_patch_error", error)
    with pytest.raises(CPUModeUnsupported) as raised:
        PlatformCPU()
    assert raised.value is error

    monkeypatch.setenv("VERL_PLATFORM", "cpu")
    monkeypatch.setattr(platform_manager, "_current_platform", None)
    with pytest.raises(CPUModeUnsupported):
        platform_manager.get_platform()


LAZY_VLLM_PROBE = """
import sys
import verl
from verl.utils import device
out = {"device_name": device.get_device_name(), "vllm_after_import_verl": "vllm" in sys.modules}
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension
sync = vLLMColocateWorkerExtension.update_weights_from_ipc
out["weight_sync"] = [sync.__module__, getattr(sync, "_erc_cpu_mode", False)]
emit(out)
"""


@pytest.mark.integration
def test_cpu_mode_imports_vllm_only_where_verl_uses_it(run_python):
    # most Ray workers of a run (reward, agent loop, transfer queue) never touch vLLM: `import verl` there
    # must not import it for the weight-sync patch (~5 s of CPU per process) ...
    answers = run_python(LAZY_VLLM_PROBE, cpu_mode=True)
    assert answers["device_name"] == "cpu"
    assert answers["vllm_after_import_verl"] is False
    # ... and where verl's vLLM worker extension is imported, it is already the patched one
    assert answers["weight_sync"] == ["erc_verl.seams.cpu.patches", True]
