"""A tiny verifiable RL world on disk, for running verl's whole trainer on a CPU.

``write_tiny_world(out)`` saves what a real recipe expects to find: a Hugging Face checkpoint (a
2-layer Qwen2 warmed up on the demo's arithmetic task, with its code-built tokenizer and a chat
template) and verl-format parquet files. The warm-up matters: a random model never earns the math
reward, so every advantage, and every gradient, would be zero and a run would prove nothing.

    python -m erc_verl.demo.tiny_world --out erc_tiny     # prints the paths it wrote
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from erc_verl.demo.task import (
    BOXED_OPEN,
    DATA_SOURCE,
    MAX_RESPONSE_LEN,
    PAD,
    PROMPT_LEN,
    Problem,
    build_policy,
    build_tokenizer,
    encode_prompts,
    greedy_responses,
    sample_problems,
    warm_up,
)
from erc_verl.paper.data import make_row, write_parquet

# The prompt is the bare problem ("3+5-7="); the template only adds <bos>, as the warm-up saw it.
CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
# verl's agent loop picks its Qwen token builder from model_type=qwen2, which needs these two tokens
# (ChatML turn end and a one-token newline); the arithmetic task itself never uses them.
# transformers 5 loads any qwen2 checkpoint's tokenizer as Qwen2Tokenizer, with Qwen's byte-level
# pre-tokenizer instead of the saved one, which drops `\boxed{`; as an added token (same id) it is
# matched before pre-tokenization, so verl and vLLM encode the task as the warm-up did.
QWEN_TOKENS = ("\n", BOXED_OPEN)
QWEN_SPECIAL_TOKENS = ("<|im_end|>",)
# vLLM and verl size buffers from max_position_embeddings; leave room above prompt + response.
MAX_POSITIONS = 64


@dataclass(frozen=True)
class TinyWorld:
    model_path: str
    train_file: str
    val_file: str
    greedy_accuracy: float  # of the warmed-up model on the validation problems: what RL starts from
    max_prompt_length: int = PROMPT_LEN
    max_response_length: int = MAX_RESPONSE_LEN


def write_tiny_world(
    out: str,
    seed: int = 0,
    warmup_steps: int = 150,
    train_prompts: int = 256,
    val_prompts: int = 32,
    hidden_size: int = 64,
    layers: int = 2,
) -> TinyWorld:
    """Warm up a tiny Qwen2 and write it (``out/model``) with ``out/train.parquet`` and ``out/val.parquet``."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.add_tokens(list(QWEN_TOKENS))
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    tokenizer.unk_token = PAD  # the vocabulary's own unknown token; else Qwen2Tokenizer adds <|endoftext|> past it
    model = build_policy(vocab_size=len(tokenizer), hidden_size=hidden_size, num_layers=layers, tokenizer=tokenizer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only contend with other work on the cores
    try:
        warm_up(model, tokenizer, rng, steps=warmup_steps)
    finally:
        torch.set_num_threads(threads)
    model.config.max_position_embeddings = MAX_POSITIONS
    model.config.use_cache = True
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    model_path = os.path.join(out, "model")
    model.save_pretrained(model_path)
    tokenizer.save_pretrained(model_path)

    def rows(problems: list[Problem], split: str) -> list[dict]:
        return [make_row(p.prompt, p.ground_truth, DATA_SOURCE, i, split, template="{question}")
                for i, p in enumerate(problems)]

    train_problems, val_problems = sample_problems(rng, train_prompts), sample_problems(rng, val_prompts)

    train_file = write_parquet(rows(train_problems, "train"), os.path.join(out, "train.parquet"))
    val_file = write_parquet(rows(val_problems, "test"), os.path.join(out, "val.parquet"))
    return TinyWorld(model_path, train_file, val_file, greedy_accuracy(model, tokenizer, val_problems))


def greedy_accuracy(model, tokenizer, problems: list[Problem]) -> float:
    """Fraction of problems whose greedy answer is exactly the reference ``\\boxed{answer}``."""
    responses = greedy_responses(model, encode_prompts(tokenizer, problems), tokenizer.eos_token_id,
                                 tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(text == p.response for text, p in zip(texts, problems)) / len(problems)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m erc_verl.demo.tiny_world", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write model/, train.parquet, val.parquet into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=150)
    args = parser.parse_args(argv)
    world = write_tiny_world(args.out, seed=args.seed, warmup_steps=args.warmup_steps)
    print(json.dumps(world.__dict__, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
