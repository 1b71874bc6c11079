"""The benchmark's measuring rig: verl's ``FSDPEngineWithLMHead`` driven on a plain module, without FSDP.

The overhead benchmark times what the actor pays per micro-step in verl's own ``forward_step`` (packing, model
call, log-probs, entropy, loss). Building the engine the normal way needs torch.distributed, device meshes and an
FSDP-wrapped model, which would time FSDP and need a process group even on one CPU. So the engine object is made
without ``__init__`` and given only the attributes ``forward_step`` reads; every line it then runs is verl's. The
seam tests drive the same object, so the bench measures exactly the code the tests check.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


def cpu_lm_engine(model, **engine_overrides):
    """verl's ``FSDPEngineWithLMHead`` around ``model``, for its forward/loss path; ``engine_overrides`` are
    ``FSDPEngineConfig`` fields (entropy chunking, ``use_torch_compile``...)."""
    from verl.utils import torch_functional as verl_F
    from verl.workers.config import FSDPEngineConfig
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    engine = FSDPEngineWithLMHead.__new__(FSDPEngineWithLMHead)
    engine.engine_config = FSDPEngineConfig(**engine_overrides)
    chunked = engine.engine_config.entropy_from_logits_with_chunking
    engine.compute_entropy_from_logits = (
        verl_F.entropy_from_logits_with_chunking if chunked else verl_F.entropy_from_logits
    )
    engine.module = model
    engine.use_ulysses_sp = False
    engine.ulysses_sequence_parallel_size = 1
    engine.pad_to_length = False
    engine.pad_to_length_bucket = 1
    engine._autocast_dtype = torch.float32
    engine.get_data_parallel_group = lambda: None
    return engine


@contextmanager
def engine_on_cpu():
    """verl's engine asks the CUDA platform for its device; on a CPU-only machine, answer "cpu" while inside.

    Only that lookup is replaced (the module's ``get_device_id`` / ``get_device_name``), and restored on exit.
    """
    from verl.workers.engine.fsdp import transformer_impl

    saved = transformer_impl.get_device_id, transformer_impl.get_device_name
    transformer_impl.get_device_id = transformer_impl.get_device_name = lambda: "cpu"
    try:
        yield
    finally:
        transformer_impl.get_device_id, transformer_impl.get_device_name = saved
