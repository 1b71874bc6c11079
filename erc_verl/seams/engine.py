"""Current-policy entropy for the ERC gate, computed in the update micro-batch without a graph.

verl's engine computes entropy only with ``calculate_entropy=True``, and then with autograd on (it is
meant for the entropy bonus) and with the log-prob kernel's in-place backward switched off. ERC only
*reads* the entropy, so with ``entropy_coeff == 0`` that graph is pure cost: vocabulary-sized buffers
kept alive until backward. This seam asks verl's own ``prepare_model_outputs`` for the entropy alone
under ``torch.no_grad()`` (``distillation_only=True`` skips the log-prob half), then lets it build the
log-probs exactly as it does without ERC. verl's layout handling (remove-padding, Ulysses gather,
chunked entropy, fused kernels, temperature) is reused, not copied.

With remove-padding (verl's default) and without ``torch.compile`` (always on CPU) the graph-free pass
swaps verl's entropy function for ``erc_verl.algorithm.entropy.entropy_from_logits_no_grad``: one exponential per
logit in cache-sized chunks instead of verl's two and three tokens x vocab temporaries (+28% step time at
the 151,936-token vocabulary with verl's function, see scripts/bench_overhead.py and the README). verl's
compiled entropy is a fused pass and is kept as is.

Tested against verl 0.9.x (see ``SUPPORTED_VERL``); ``check_engine_contract`` fails loudly if the
engine no longer reads the micro-batch keys this relies on.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from packaging.version import Version
from tensordict import TensorDict

import verl
from verl.utils import tensordict_utils as tu

from erc_verl.algorithm.entropy import entropy_from_logits_no_grad

# Non-tensor key the ERC trainer sets on update batches: "give the loss a detached current entropy".
DETACHED_ENTROPY_KEY = "erc_detached_entropy"
SUPPORTED_VERL = (0, 9)  # release series: 0.9.x, dev/pre/post/local builds included
_ENGINE_KEYS = ("calculate_entropy", "distillation_only", "distillation_use_topk", "calculate_sum_pi_squared")


def check_verl_version(version: str | None = None) -> None:
    """Refuse a verl outside the 0.9 series (default: the installed one, read at call time).

    By release number, not a specifier set: ``>=0.9.0,<0.10`` turns away 0.9.x dev and pre-releases.
    """
    version = verl.__version__ if version is None else version
    if Version(version).release[:2] != SUPPORTED_VERL:
        series = ".".join(map(str, SUPPORTED_VERL))
        raise RuntimeError(
            f"erc-verl's actor seam was written for verl {series}.x, found verl {version}. "
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
            "and the detached-entropy seam (erc_verl/seams/engine.py) must be updated."
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


def _read_only_entropy(logits: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Stands in for verl's ``compute_entropy_from_logits``. ``chunk_size`` (verl's
    ``entropy_from_logits_chunk_size``, sized for graph memory) is ignored: the chunks here are sized for cache."""
    return entropy_from_logits_no_grad(logits)


@contextmanager
def _gate_entropy_function(engine, output):
    """While active, the engine computes entropy with the gate's function: the read-only float32 one, or
    verl's own where verl compiled it (a fused pass already). Both ERC passes use this, so rho compares
    entropies computed the same way."""
    verl_entropy = engine.compute_entropy_from_logits
    logits = getattr(output, "logits", None)  # None with fused kernels, which return the entropy themselves
    compiled = engine.engine_config.use_torch_compile and logits is not None and logits.device.type != "cpu"
    engine.compute_entropy_from_logits = verl_entropy if compiled else _read_only_entropy
    try:
        yield
    finally:
        engine.compute_entropy_from_logits = verl_entropy


def enable_detached_entropy(engine, gate_entropy_for_old_policy: bool = True) -> None:
    """Make this engine instance add a graph-free ``entropy`` to update micro-batches flagged by the trainer.

    ``gate_entropy_for_old_policy``: also compute the old-policy entropy (verl's ``compute_log_prob``,
    a no-grad pass asking for entropy) with the gate's function. Without it the old entropy would come from
    verl's function in the logits' dtype (bf16 under FSDP mixed precision) and the current one in float32,
    and for confident tokens (H ~ 1e-3) bf16 rounding alone moves rho far outside (0.95, 1.05). Pass False
    only when the update uses verl's graph entropy (``entropy_coeff != 0``), so that both sides are verl's.
    """
    check_verl_version()
    check_engine_contract(engine)
    verl_prepare_model_outputs = engine.prepare_model_outputs

    def prepare_model_outputs(output, output_args, micro_batch: TensorDict, logits_processor_func):
        wanted = tu.get_non_tensor_data(data=micro_batch, key=DETACHED_ENTROPY_KEY, default=False)
        graph_entropy = tu.get_non_tensor_data(data=micro_batch, key="calculate_entropy", default=False)
        if graph_entropy and not torch.is_grad_enabled() and gate_entropy_for_old_policy:
            with _gate_entropy_function(engine, output):  # the old-policy pass
                return verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if not wanted or graph_entropy or not torch.is_grad_enabled():
            return verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        with _gate_entropy_function(engine, output), torch.no_grad():
            entropy = verl_prepare_model_outputs(output, output_args, _entropy_only(micro_batch), None)["entropy"]
        model_output = verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        # detach: with fused kernels the entropy is a view of the forward's output, and views taken under
        # no_grad still report requires_grad
        model_output["entropy"] = entropy.detach()
        return model_output

    engine.prepare_model_outputs = prepare_model_outputs
