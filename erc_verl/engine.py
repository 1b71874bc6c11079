"""Current-policy entropy for the ERC gate, computed in the update micro-batch without a graph.

verl's engine computes entropy only with ``calculate_entropy=True``, and then with autograd on (it is
meant for the entropy bonus) and with the log-prob kernel's in-place backward switched off. ERC only
*reads* the entropy, so with ``entropy_coeff == 0`` that graph is pure cost: vocabulary-sized buffers
kept alive until backward. This seam asks verl's own ``prepare_model_outputs`` for the entropy alone
under ``torch.no_grad()`` (``distillation_only=True`` skips the log-prob half), then lets it build the
log-probs exactly as it does without ERC. verl's layout handling (remove-padding, Ulysses gather,
chunked entropy, fused kernels, temperature) is reused, not copied.

Tested against verl 0.9.x (see ``SUPPORTED_VERL``); ``check_engine_contract`` fails loudly if the
engine no longer reads the micro-batch keys this relies on.
"""

from __future__ import annotations

import inspect

import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from tensordict import TensorDict

import verl
from verl.utils import tensordict_utils as tu

# Non-tensor key the ERC trainer sets on update batches: "give the loss a detached current entropy".
DETACHED_ENTROPY_KEY = "erc_detached_entropy"
SUPPORTED_VERL = SpecifierSet(">=0.9.0,<0.10")
_ENGINE_KEYS = ("calculate_entropy", "distillation_only", "distillation_use_topk", "calculate_sum_pi_squared")


def check_verl_version(version: str = verl.__version__) -> None:
    if Version(version) not in SUPPORTED_VERL:
        raise RuntimeError(
            f"erc-verl's actor seam was written for verl {SUPPORTED_VERL}, found verl {version}. "
            "Install a supported verl (pip install 'verl>=0.9.1,<0.10') or upgrade erc-verl."
        )


def check_engine_contract(engine) -> None:
    """The seam relies on verl's engine reading these micro-batch keys in ``prepare_model_outputs``."""
    method = getattr(type(engine), "prepare_model_outputs", None)
    if method is None:
        raise RuntimeError(f"ERC: {type(engine).__name__} has no prepare_model_outputs; this engine is not supported.")
    source = inspect.getsource(method)
    missing = [key for key in _ENGINE_KEYS if f'"{key}"' not in source]
    if missing:
        raise RuntimeError(
            f"ERC: {type(engine).__name__}.prepare_model_outputs no longer reads {missing}; the verl engine changed "
            "and the detached-entropy seam (erc_verl/engine.py) must be updated."
        )


def _entropy_only(micro_batch: TensorDict) -> TensorDict:
    """A shallow copy of the micro-batch that asks verl's engine for entropy and nothing else."""
    request = micro_batch.copy()
    tu.assign_non_tensor(
        request,
        calculate_entropy=True,
        distillation_only=True,
        distillation_use_topk=False,
        calculate_sum_pi_squared=False,
    )
    return request


def enable_detached_entropy(engine) -> None:
    """Make this engine instance add a graph-free ``entropy`` to update micro-batches flagged by the trainer."""
    check_verl_version()
    check_engine_contract(engine)
    verl_prepare_model_outputs = engine.prepare_model_outputs

    def prepare_model_outputs(output, output_args, micro_batch: TensorDict, logits_processor_func):
        wanted = tu.get_non_tensor_data(data=micro_batch, key=DETACHED_ENTROPY_KEY, default=False)
        graph_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        if not wanted or graph_entropy or not torch.is_grad_enabled():
            return verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        with torch.no_grad():
            entropy = verl_prepare_model_outputs(output, output_args, _entropy_only(micro_batch), None)["entropy"]
        model_output = verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        model_output["entropy"] = entropy
        return model_output

    engine.prepare_model_outputs = prepare_model_outputs
