"""Small real objects the tests share: a random-weight Qwen2 and verl-format PPO update batches.

Test scaffolding, kept out of the wheel; the engine the tests drive these through is the benchmark's
(``erc_verl.bench.engine_rig``).
"""

from __future__ import annotations

import torch
from tensordict import TensorDict

from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import left_right_2_no_padding

from erc_verl.demo.task import tiny_qwen2 as build_tiny_qwen2


def tiny_qwen2(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 2, seed: int = 0, **config):
    """The tests' Qwen2: 4 heads, 2 KV heads, MLP 2 x hidden, float32 (``erc_verl.demo.task.tiny_qwen2``)."""
    return build_tiny_qwen2(vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=4,
                            num_kv_heads=2, intermediate_size=2 * hidden_size, seed=seed, **config)


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
