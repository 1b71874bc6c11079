"""Current-policy entropy for the ERC gate, computed in the update micro-batch without a graph.

verl's engine computes entropy only with ``calculate_entropy=True``, and then with autograd on (it is
meant for the entropy bonus) and with the log-prob kernel's in-place backward switched off. ERC only
*reads* the entropy, so with ``entropy_coeff == 0`` that graph is pure cost. This seam wraps verl's own
``prepare_model_outputs`` per engine instance; verl's layout handling (remove-padding, Ulysses gather,
temperature, nested outputs) is reused, not copied. Three settings:

* verl computes log-probs with its plain torch function (no fused kernels, no flash-attn / NPU
  cross-entropy: always on CPU, and on GPUs without flash-attn): for the duration of the call verl's
  ``logprobs_from_logits`` is swapped for ``erc_verl.algorithm.entropy.log_probs_and_entropy``, one chunked
  pass that yields the log-probs (with gradient) and the entropy (without). The entropy costs one
  multiply-add per logit inside the pass that already computes the log-sum-exp.
* fused kernels (``use_fused_kernels``): verl's fused forward returns the entropy with the log-probs; it is
  read detached.
* flash-attn or NPU cross-entropy: verl keeps its kernel for the log-probs and a separate graph-free pass
  computes the entropy (``entropy_from_logits_no_grad``, or verl's own where ``torch.compile`` fuses it).

The old-policy pass (verl's ``compute_log_prob``, no grad, entropy requested) goes the same way, so on-policy
the two entropies, and the two log-probs, are computed alike and rho is exactly 1.

Tested against verl 0.9.x (see ``SUPPORTED_VERL``); ``check_engine_contract`` fails loudly if the engine no
longer reads the micro-batch keys or calls the log-prob function this relies on.
"""

from __future__ import annotations

import inspect
import os
import re
from contextlib import contextmanager

import torch
from packaging.version import Version
from tensordict import TensorDict

import verl
from verl.utils import tensordict_utils as tu
from verl.utils import torch_functional as verl_F

from erc_verl.algorithm.entropy import entropy_from_logits_no_grad, log_probs_and_entropy

# Non-tensor key the ERC trainer sets on update batches: "give the loss a detached current entropy".
DETACHED_ENTROPY_KEY = "erc_detached_entropy"
SUPPORTED_VERL = (0, 9)  # release series: 0.9.x, dev/pre/post/local builds included
_ENGINE_KEYS = ("calculate_entropy", "distillation_only", "distillation_use_topk", "calculate_sum_pi_squared")
_ENABLED_ATTR = "_erc_detached_entropy_enabled"
# verl's log-prob function as prepare_model_outputs calls it (a global of the engine's module; swapped for the
# duration of one call, module-wide: verl's engine workers run their calls one at a time)
_LOG_PROB_FUNCTION = "logprobs_from_logits"
# what verl_F.logprobs_from_logits reads to choose its kernel (see verl_uses_torch_log_probs)
_LOG_PROB_CHOICE = ("FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", "VERL_DISABLE_FLASH_ATTN_CE",
                    "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", "logprobs_from_logits_v2")


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


def _contract_broken(engine, what: str) -> RuntimeError:
    return RuntimeError(
        f"ERC: {what}; the verl engine changed and the detached-entropy seam (erc_verl/seams/engine.py) must be "
        f"updated for {type(engine).__name__}."
    )


def check_engine_contract(engine) -> None:
    """The seam relies on verl's ``prepare_model_outputs`` reading these micro-batch keys, calling its module's
    ``logprobs_from_logits`` and unpadding with ``_gather_and_unpad_packed``, and on verl's rule for choosing
    a log-prob kernel."""
    method = getattr(type(engine), "prepare_model_outputs", None)
    if method is None:
        raise RuntimeError(f"ERC: {type(engine).__name__} has no prepare_model_outputs; this engine is not supported.")
    source = inspect.getsource(method)
    missing = [key for key in _ENGINE_KEYS if f'"{key}"' not in source]
    if missing:
        raise _contract_broken(engine, f"{type(engine).__name__}.prepare_model_outputs no longer reads {missing}")
    # a bare call of the module global (not ``verl_F.logprobs_from_logits(``, which the swap would not reach)
    if not re.search(rf"(?<![\w.]){_LOG_PROB_FUNCTION}\(", source) or _LOG_PROB_FUNCTION not in method.__globals__:
        raise _contract_broken(engine, f"prepare_model_outputs no longer calls its module's {_LOG_PROB_FUNCTION}")
    if not callable(getattr(engine, "_gather_and_unpad_packed", None)):
        raise _contract_broken(engine, "the engine has no _gather_and_unpad_packed")
    choice = inspect.getsource(verl_F.logprobs_from_logits)
    moved = [name for name in _LOG_PROB_CHOICE if name not in choice]
    if moved:
        raise _contract_broken(engine, f"verl_F.logprobs_from_logits no longer chooses its kernel by {moved}")


def verl_uses_torch_log_probs() -> bool:
    """verl 0.9's own choice in ``verl_F.logprobs_from_logits``: flash-attn's cross-entropy when importable and
    not disabled with ``VERL_DISABLE_FLASH_ATTN_CE=1``, else NPU's, else its torch function."""
    flash = verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE and os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    return not flash and not verl_F.NPU_CROSS_ENTROPY_LOSS_AVAILABLE


def _flag(micro_batch: TensorDict, key: str, default):
    return tu.get_non_tensor_data(data=micro_batch, key=key, default=default)


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


@contextmanager
def _log_probs_with_entropy(module_globals: dict, entropies: list):
    """While active, verl's engine module computes log-probs with ``log_probs_and_entropy`` and each call's
    entropy is appended to ``entropies``."""
    verl_log_probs = module_globals[_LOG_PROB_FUNCTION]

    def log_probs(logits, labels, inplace_backward=True):  # verl's signature; the backward never keeps a graph
        log_prob, entropy = log_probs_and_entropy(logits, labels)
        entropies.append(entropy)
        return log_prob

    module_globals[_LOG_PROB_FUNCTION] = log_probs
    try:
        yield
    finally:
        module_globals[_LOG_PROB_FUNCTION] = verl_log_probs


def _one_pass_applies(output, micro_batch: TensorDict) -> bool:
    """Whether verl would compute these log-probs with its plain torch function from materialised logits."""
    return (
        getattr(output, "logits", None) is not None
        and not _flag(micro_batch, "use_fused_kernels", False)
        and not _flag(micro_batch, "distillation_use_topk", False)
        and not _flag(micro_batch, "distillation_only", False)
        and verl_uses_torch_log_probs()
    )


def enable_detached_entropy(engine, gate_entropy_for_old_policy: bool = True) -> None:
    """Make this engine instance add a graph-free ``entropy`` to update micro-batches flagged by the trainer.

    ``gate_entropy_for_old_policy``: also compute the old-policy entropy (verl's ``compute_log_prob``,
    a no-grad pass asking for entropy) the gate's way. Without it the old entropy would come from verl's
    function in the logits' dtype (bf16 under FSDP mixed precision) and the current one in float32, and for
    confident tokens (H ~ 1e-3) bf16 rounding alone moves rho far outside (0.95, 1.05). Pass False only when
    the update uses verl's graph entropy (``entropy_coeff != 0``), so that both sides are verl's.
    """
    check_verl_version()
    check_engine_contract(engine)
    if getattr(engine, _ENABLED_ATTR, False):
        raise RuntimeError(f"ERC: the detached-entropy seam is already enabled on this {type(engine).__name__}.")
    setattr(engine, _ENABLED_ATTR, True)
    verl_prepare_model_outputs = engine.prepare_model_outputs
    module_globals = type(engine).prepare_model_outputs.__globals__

    def one_pass(output, output_args, micro_batch: TensorDict, logits_processor_func):
        """verl's pass with verl's entropy off and the log-prob function yielding the entropy as well."""
        request = micro_batch.copy()
        tu.assign_non_tensor(request, calculate_entropy=False)
        entropies: list[torch.Tensor] = []
        with _log_probs_with_entropy(module_globals, entropies):
            model_output = verl_prepare_model_outputs(output, output_args, request, logits_processor_func)
        (entropy,) = entropies  # one log-prob call per micro-batch
        if _flag(micro_batch, "use_remove_padding", True):  # as verl treats the log-probs of this layout
            entropy = engine._gather_and_unpad_packed(entropy, output_args["pad_size"])
        model_output["entropy"] = torch.nested.nested_tensor_from_jagged(entropy, model_output["log_probs"].offsets())
        return model_output

    def prepare_model_outputs(output, output_args, micro_batch: TensorDict, logits_processor_func):
        graph_entropy = _flag(micro_batch, "calculate_entropy", False)
        old_policy_pass = graph_entropy and not torch.is_grad_enabled() and gate_entropy_for_old_policy
        update_pass = _flag(micro_batch, DETACHED_ENTROPY_KEY, False) and not graph_entropy and torch.is_grad_enabled()
        if not (old_policy_pass or update_pass):
            return verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        if _one_pass_applies(output, micro_batch):
            return one_pass(output, output_args, micro_batch, logits_processor_func)
        if old_policy_pass:
            with _gate_entropy_function(engine, output):
                return verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        with _gate_entropy_function(engine, output), torch.no_grad():
            entropy = verl_prepare_model_outputs(output, output_args, _entropy_only(micro_batch), None)["entropy"]
        model_output = verl_prepare_model_outputs(output, output_args, micro_batch, logits_processor_func)
        # detach: with fused kernels the entropy is a view of the forward's output, and views taken under
        # no_grad still report requires_grad
        model_output["entropy"] = entropy.detach()
        return model_output

    engine.prepare_model_outputs = prepare_model_outputs
