"""Small real objects for tests and benchmarks: a random-weight Qwen2, verl-format update batches, and
verl's FSDP language-model engine class driven on CPU without FSDP wrapping (no GPU here)."""

from __future__ import annotations

from contextlib import contextmanager
from unittest import mock

import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding


def tiny_qwen2(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, **overrides):
    """A Hugging Face Qwen2ForCausalLM with random weights, built from a config (nothing downloaded)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
        **overrides,
    )
    return Qwen2ForCausalLM(config).float()


def padded_update_batch(
    batch_size: int = 4,
    prompt_len: int = 5,
    response_len: int = 7,
    vocab_size: int = 64,
    seed: int = 0,
    old_entropy: bool = True,
) -> TensorDict:
    """A left/right padded PPO update batch, as verl's trainers hold it (random old log-probs, advantages,
    reference log-probs and, optionally, old entropies)."""
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, prompt_len + 1, (batch_size,), generator=g)
    response_lens = torch.randint(1, response_len + 1, (batch_size,), generator=g)
    prompts = torch.randint(1, vocab_size, (batch_size, prompt_len), generator=g)
    responses = torch.randint(1, vocab_size, (batch_size, response_len), generator=g)
    positions = torch.arange(prompt_len + response_len)
    prompt_mask = positions[None, :prompt_len] >= (prompt_len - prompt_lens[:, None])  # left padded
    response_mask = positions[None, :response_len] < response_lens[:, None]  # right padded
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1).long()
    fields = dict(
        prompts=prompts,
        responses=responses,
        input_ids=torch.cat([prompts, responses], dim=1) * attention_mask,
        attention_mask=attention_mask,
        position_ids=(attention_mask.cumsum(dim=1) - 1).clamp_min(0),
        response_mask=response_mask.long(),
        old_log_probs=-torch.rand(batch_size, response_len, generator=g) * 4,
        advantages=torch.randn(batch_size, 1, generator=g).expand(-1, response_len).contiguous(),
        ref_log_prob=-torch.rand(batch_size, response_len, generator=g) * 4,
    )
    if old_entropy:
        fields["old_entropy"] = torch.rand(batch_size, response_len, generator=g) * 3
    return TensorDict(fields, batch_size=[batch_size])


def update_batch(**kwargs) -> TensorDict:
    """``padded_update_batch`` converted by verl's own ``left_right_2_no_padding`` (nested input ids), with
    the non-tensor keys verl's engine adds before the loss (single data-parallel rank)."""
    padded = padded_update_batch(**kwargs)
    td = left_right_2_no_padding(padded.clone())
    tu.assign_non_tensor(
        td,
        dp_size=1,
        batch_num_tokens=int(padded["response_mask"].sum()),
        global_batch_size=padded.batch_size[0],
        use_remove_padding=True,
        use_fused_kernels=False,
        temperature=1.0,
    )
    return td


def cpu_lm_engine(model, **engine_overrides):
    """verl's ``FSDPEngineWithLMHead`` around a plain module, for its forward/loss path on CPU.

    The object skips ``__init__`` (which builds FSDP, device meshes and optimizers on a GPU) and
    sets only the attributes ``forward_step`` reads; everything it runs is verl's own code.
    """
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
    """verl's engine asks the CUDA platform for its device; there is no GPU here, so answer "cpu".

    This is the only thing mocked: the platform lookup that cannot run on a CPU-only machine.
    """
    from verl.workers.engine.fsdp import transformer_impl

    with (
        mock.patch.object(transformer_impl, "get_device_id", lambda: "cpu"),
        mock.patch.object(transformer_impl, "get_device_name", lambda: "cpu"),
    ):
        yield
