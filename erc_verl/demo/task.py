"""The demo's world: a verifiable arithmetic task, a tokenizer and a tiny Qwen2 policy, all built in code.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over digits, operators and
``\\boxed{`` / ``}`` wrapped in ``PreTrainedTokenizerFast``; the policy is a randomly initialised
``Qwen2ForCausalLM``. A short supervised warm-up teaches the answer format and some arithmetic, so
that sampled answers are sometimes right and sometimes wrong (GRPO needs both within a group).

The task: three single-digit operands joined by ``+``/``-`` (``3+5-7=``), answer ``\\boxed{1}``. A
2-layer model answers about a third of the problems right (greedy) after 150 warm-up steps, leaving room
for RL. Prompts have a fixed length, so batches need no left padding; responses are right-padded
after ``<eos>``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
BOXED_OPEN = "\\boxed{"
VOCAB = [PAD, BOS, EOS, *"0123456789", "+", "-", "=", BOXED_OPEN, "}"]
OPERATORS = ("+", "-")
NUM_OPERANDS = 3
PROMPT_LEN = 1 + 2 * NUM_OPERANDS  # <bos> a op b op c =
MAX_RESPONSE_LEN = 8  # \boxed{ - d d } <eos> needs at most 6; room for malformed answers
DATA_SOURCE = "erc_demo/arithmetic"


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokens, with ``\\boxed{`` kept whole; decoding concatenates tokens without spaces."""
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


@dataclass(frozen=True)
class Problem:
    prompt: str  # "3+5-7="
    answer: int

    @property
    def ground_truth(self) -> str:
        return str(self.answer)

    @property
    def response(self) -> str:
        return f"{BOXED_OPEN}{self.answer}}}"


def sample_problems(rng: np.random.Generator, count: int) -> list[Problem]:
    operands = rng.integers(0, 10, size=(count, NUM_OPERANDS)).tolist()
    ops = rng.integers(0, len(OPERATORS), size=(count, NUM_OPERANDS - 1)).tolist()
    problems = []
    for xs, os_ in zip(operands, ops):
        text, value = str(xs[0]), xs[0]
        for x, o in zip(xs[1:], os_):
            text += OPERATORS[o] + str(x)
            value = value + x if OPERATORS[o] == "+" else value - x
        problems.append(Problem(text + "=", value))
    return problems


def encode_prompts(tokenizer: PreTrainedTokenizerFast, problems: list[Problem]) -> torch.Tensor:
    """``[count, PROMPT_LEN]`` token ids, ``<bos>`` first."""
    ids = [[tokenizer.bos_token_id, *tokenizer.encode(p.prompt, add_special_tokens=False)] for p in problems]
    bad = [p.prompt for p, row in zip(problems, ids) if len(row) != PROMPT_LEN]
    if bad:
        raise ValueError(f"demo prompts must be {PROMPT_LEN} tokens; got {bad[:3]}")
    return torch.tensor(ids, dtype=torch.long)


def encode_targets(tokenizer: PreTrainedTokenizerFast, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference responses (``\\boxed{c}<eos>``) right-padded to MAX_RESPONSE_LEN, and their mask."""
    out = torch.full((len(problems), MAX_RESPONSE_LEN), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(problems), MAX_RESPONSE_LEN), dtype=torch.float32)
    for i, p in enumerate(problems):
        row = [*tokenizer.encode(p.response, add_special_tokens=False), tokenizer.eos_token_id]
        out[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1.0
    return out, mask


def tiny_qwen2(
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    seed: Optional[int] = None,
    attn_implementation: str = "sdpa",
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    **config,
) -> Qwen2ForCausalLM:
    """A Hugging Face ``Qwen2ForCausalLM`` with random weights, built from a config (nothing downloaded).

    The one builder of small Qwen2 models: the demo's policy, the overhead benchmark and the tests. ``config``
    takes further ``Qwen2Config`` fields (tied embeddings, token ids, RoPE base...).
    """
    if seed is not None:
        torch.manual_seed(seed)
    qwen2 = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        attn_implementation=attn_implementation,
        **{"max_position_embeddings": 4096, "tie_word_embeddings": False, **config},
    )
    with torch.device(device):
        model = Qwen2ForCausalLM(qwen2)
    return model.to(dtype)


def build_policy(vocab_size: int, hidden_size: int, num_layers: int, tokenizer: PreTrainedTokenizerFast) -> Qwen2ForCausalLM:
    """The demo's policy: a random tiny Qwen2 (float32, eager attention: deterministic on CPU)."""
    heads = max(1, hidden_size // 32)
    return tiny_qwen2(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=heads,
        intermediate_size=4 * hidden_size,
        attn_implementation="eager",
        max_position_embeddings=PROMPT_LEN + MAX_RESPONSE_LEN,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        use_cache=False,
    )


def response_logits(model: Qwen2ForCausalLM, prompts: torch.Tensor, responses: torch.Tensor) -> torch.Tensor:
    """Logits that predict each response token: ``[batch, response_len, vocab]``.

    Responses are right-padded; causal attention means pads after ``<eos>`` cannot change the logits
    of earlier positions, so no attention mask is needed.
    """
    seq = torch.cat([prompts, responses], dim=1)
    logits = model(input_ids=seq).logits
    return logits[:, prompts.shape[1] - 1 : -1, :]


def warm_up(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    rng: np.random.Generator,
    steps: int,
    batch_size: int = 128,
    lr: float = 3e-3,
) -> list[float]:
    """Supervised next-token training on reference answers; returns the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        problems = sample_problems(rng, batch_size)
        prompts = encode_prompts(tokenizer, problems)
        targets, mask = encode_targets(tokenizer, problems)
        logits = response_logits(model, prompts, targets)
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        loss = (token_loss * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


@torch.no_grad()
def greedy_responses(model: Qwen2ForCausalLM, prompts: torch.Tensor, eos_id: int, pad_id: int) -> torch.Tensor:
    """Greedy answers, right-padded with ``pad_id`` after ``<eos>`` (at most MAX_RESPONSE_LEN tokens)."""
    model.eval()
    n = prompts.shape[0]
    seq = prompts
    done = torch.zeros(n, dtype=torch.bool)
    for _ in range(MAX_RESPONSE_LEN):
        nxt = model(input_ids=seq).logits[:, -1, :].argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        done = done | (nxt == eos_id)
        seq = torch.cat([seq, nxt.unsqueeze(1)], dim=1)
        if bool(done.all()):
            break
    return seq[:, prompts.shape[1]:]
