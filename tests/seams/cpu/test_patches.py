"""erc_verl.seams.cpu.patches, one patch at a time, in this process and undone after each test.

Each patch is shown doing its job on verl's real code, and failing loudly (``CPUModeUnsupported``
naming what changed) when the verl code it relies on is not what it was written for.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import types
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch
import zmq

import verl
from verl.utils import distributed
from verl.workers.engine.base import EngineRegistry
from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead
from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

from erc_verl.seams.cpu import patches
from erc_verl.seams.cpu.patches import CPUModeUnsupported

VERL_PG_INIT = distributed.initialize_global_process_group_ray


@pytest.fixture
def undo_patches(monkeypatch):
    """Every patch target restored after the test: verl's function defaults, a private copy of the
    engine registry (the patch registers into the copy), the worker extension's method, apply()'s flag."""
    monkeypatch.setattr(VERL_PG_INIT, "__defaults__", VERL_PG_INIT.__defaults__)
    monkeypatch.setattr(EngineRegistry, "_engines", copy.deepcopy(EngineRegistry._engines))
    monkeypatch.setattr(vLLMColocateWorkerExtension, "update_weights_from_ipc",
                        vLLMColocateWorkerExtension.__dict__["update_weights_from_ipc"])
    monkeypatch.setattr(patches, "_applied", False)
    assert VERL_PG_INIT.__defaults__ == (None, None), "verl's function was left patched by an earlier test"


# ---- gloo_only_process_group ------------------------------------------------------------------


def test_gloo_patch_sets_verl_default_backend_in_place(undo_patches):
    from verl.workers import engine_workers  # imported the function by name before the patch

    patches.gloo_only_process_group()
    assert VERL_PG_INIT.__defaults__ == (None, "cpu:gloo")
    # the function object itself changed, so every module that imported it by name sees the default
    assert engine_workers.initialize_global_process_group_ray.__defaults__ == (None, "cpu:gloo")
    assert inspect.signature(distributed.initialize_global_process_group_ray).parameters["backend"].default == "cpu:gloo"


@pytest.mark.parametrize("changed", [
    lambda timeout_second=None, backend=None, device_id=None: None,  # a new parameter
    lambda timeout=None, backend=None: None,  # a renamed one
    lambda timeout_second=None, backend="nccl": None,  # a new default backend
])
def test_gloo_patch_refuses_a_changed_verl_function(undo_patches, monkeypatch, changed):
    monkeypatch.setattr(distributed, "initialize_global_process_group_ray", changed)
    with pytest.raises(CPUModeUnsupported, match="initialize_global_process_group_ray changed signature"):
        patches.gloo_only_process_group()


# ---- fsdp_engines_on_cpu -----------------------------------------------------------------------


def test_fsdp_patch_registers_verl_engines_for_cpu(undo_patches, monkeypatch):
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cpu")  # verl's own override of the detected device
    with pytest.raises(ValueError, match="No engine registered for device='cpu'"):
        EngineRegistry.get_engine_cls("language_model", "fsdp2")

    patches.fsdp_engines_on_cpu()
    patches.fsdp_engines_on_cpu()  # a second call must not trip verl's duplicate-key assertion
    for backend in ("fsdp", "fsdp2"):
        assert EngineRegistry.get_engine_cls("language_model", backend) is FSDPEngineWithLMHead
        assert EngineRegistry.get_engine_cls("value_model", backend) is FSDPEngineWithValueHead
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cuda")  # GPU lookups unchanged
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead


def test_fsdp_patch_refuses_a_changed_engine_registry(undo_patches):
    EngineRegistry._engines["language_model"]["fsdp2"]["cuda"] = FSDPEngineWithValueHead  # verl moved the class
    with pytest.raises(CPUModeUnsupported, match="language_model/fsdp on cuda to FSDPEngineWithLMHead"):
        patches.fsdp_engines_on_cpu()


def test_fsdp_patch_refuses_a_missing_backend(undo_patches):
    del EngineRegistry._engines["value_model"]["fsdp"]
    with pytest.raises(CPUModeUnsupported, match="value_model/fsdp on cuda to FSDPEngineWithValueHead"):
        patches.fsdp_engines_on_cpu()


# ---- vllm_reload_weights_on_cpu ----------------------------------------------------------------


def test_weight_sync_patch_replaces_verl_method_once(undo_patches):
    verl_sync = vLLMColocateWorkerExtension.update_weights_from_ipc
    patches.vllm_reload_weights_on_cpu()
    cpu_sync = vLLMColocateWorkerExtension.update_weights_from_ipc
    assert cpu_sync is not verl_sync and cpu_sync._erc_cpu_mode is True
    # same call shape as verl's, so verl's rollout calls it unchanged
    assert list(inspect.signature(cpu_sync).parameters) == list(inspect.signature(verl_sync).parameters)
    patches.vllm_reload_weights_on_cpu()
    assert vLLMColocateWorkerExtension.update_weights_from_ipc is cpu_sync


def test_weight_sync_patch_refuses_a_changed_verl_method(undo_patches, monkeypatch):
    def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False, flush_cache=True):
        pass

    monkeypatch.setattr(vLLMColocateWorkerExtension, "update_weights_from_ipc", update_weights_from_ipc)
    with pytest.raises(CPUModeUnsupported, match="update_weights_from_ipc changed signature"):
        patches.vllm_reload_weights_on_cpu()


def test_vllm_reload_weights_takes_what_the_patch_passes():
    """The patch relies on vLLM's model runner (the CPU runner inherits it) taking these arguments."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert CPUModelRunner.reload_weights is GPUModelRunner.reload_weights
    params = inspect.signature(GPUModelRunner.reload_weights).parameters
    assert "weights_iterator" in params and params["is_checkpoint_format"].default is True


class _RecordingRunner:
    """Stands in for vLLM's model runner; checks each call binds to vLLM's real reload_weights."""

    def __init__(self):
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        self._signature = inspect.signature(GPUModelRunner.reload_weights)
        self.calls = []
        self.vllm_config = types.SimpleNamespace(quant_config=None)  # an unquantised model (no fp8 config)

    def reload_weights(self, *args, **kwargs):
        bound = self._signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        self.calls.append((list(bound.arguments["weights_iterator"]), bound.arguments["is_checkpoint_format"]))


def test_cpu_weight_sync_hands_every_bucket_to_vllm_reload_weights(undo_patches, cpu_platform, monkeypatch):
    """verl's real sender (shared memory, as on a platform without IPC) with 1 MiB buckets: several
    buckets through one reused buffer. Every tensor must reach reload_weights intact."""
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightSender

    # verl's sockets block without limit when the other side dies; give every recv in this test a limit
    monkeypatch.setitem(zmq.Context.instance().sockopts, zmq.RCVTIMEO, 30_000)
    patches.vllm_reload_weights_on_cpu()
    generator = torch.Generator().manual_seed(0)
    weights = [(f"model.layers.{i}.mlp.down_proj.weight", torch.randn(300, 300, generator=generator))
               for i in range(5)]  # 352 KiB each: two per bucket
    weights.append(("model.norm.weight", torch.randn(300, generator=generator).to(torch.bfloat16)))
    handle = f"ipc:///tmp/erc-test-sync-{uuid.uuid4().hex[:12]}.sock"
    runner = _RecordingRunner()
    worker = SimpleNamespace(_is_qat_model=False, _is_modelopt_qat=False, _get_zmq_handle=lambda: handle,
                             model_runner=runner)
    errors = {}

    def run(side, call):
        try:
            call()
        except BaseException as error:  # noqa: BLE001  (reported by the test below)
            errors[side] = repr(error)

    sender = BucketedWeightSender(zmq_handle=handle, bucket_size_mb=1, use_shm=True)
    threads = [
        threading.Thread(target=run, args=("receiver", lambda: vLLMColocateWorkerExtension.update_weights_from_ipc(
            worker, use_shm=True)), daemon=True),
        threading.Thread(target=run, args=("sender", lambda: asyncio.run(
            sender.async_send_weights(iter(weights)))), daemon=True),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads) and not errors, errors

    assert len(runner.calls) == 1, "one reload for the whole sync, after the last bucket"
    received, is_checkpoint_format = runner.calls[0]
    assert is_checkpoint_format is True
    assert [name for name, _ in received] == [name for name, _ in weights]
    for (name, sent), (_, got) in zip(weights, received):
        assert got.dtype == sent.dtype and torch.equal(got, sent), f"{name} arrived changed"


@pytest.mark.parametrize("worker_state, kwargs", [
    ({}, {"peft_config": {"r": 8}}),
    ({"_is_qat_model": True}, {}),
    ({"_is_modelopt_qat": True}, {}),
])
def test_cpu_weight_sync_refuses_lora_and_qat(undo_patches, worker_state, kwargs):
    patches.vllm_reload_weights_on_cpu()
    worker = SimpleNamespace(**{"_is_qat_model": False, "_is_modelopt_qat": False, **worker_state})
    # no socket, no runner: the refusal comes before any transfer starts
    with pytest.raises(CPUModeUnsupported, match="plain weights only"):
        vLLMColocateWorkerExtension.update_weights_from_ipc(worker, **kwargs)


# ---- apply ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["0.8.5", "0.10.0", "1.0.0"])
def test_apply_refuses_other_verl_series(undo_patches, monkeypatch, version):
    monkeypatch.setattr(verl, "__version__", version)
    with pytest.raises(CPUModeUnsupported, match=f"found verl {version}"):
        patches.apply()
    assert VERL_PG_INIT.__defaults__ == (None, None), "nothing may be patched before the version check"
    assert patches._applied is False


def test_apply_patches_everything_once(undo_patches, monkeypatch):
    monkeypatch.setattr(verl, "__version__", "0.9.7")  # any 0.9.x
    patches.apply()
    assert VERL_PG_INIT.__defaults__ == (None, "cpu:gloo")
    assert EngineRegistry._engines["language_model"]["fsdp2"]["cpu"] is FSDPEngineWithLMHead
    assert vLLMColocateWorkerExtension.update_weights_from_ipc._erc_cpu_mode is True
    patches.apply()  # once per process: a second call is a no-op, not a "changed signature" refusal


def test_apply_stops_at_a_failing_patch_and_is_not_marked_applied(undo_patches, monkeypatch):
    monkeypatch.setattr(distributed, "initialize_global_process_group_ray", lambda timeout=None: None)
    with pytest.raises(CPUModeUnsupported):
        patches.apply()
    assert patches._applied is False
