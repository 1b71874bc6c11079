"""erc_verl.demo.tiny_world: the checkpoint and parquet files CPU runs train on, loaded as verl loads them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from erc_verl.demo.task import MAX_RESPONSE_LEN, PROMPT_LEN, build_tokenizer, greedy_responses, sample_problems
from erc_verl.paper.reward import compute_score
from erc_verl.demo.tiny_world import TinyWorld, write_tiny_world

TRAIN_PROMPTS, VAL_PROMPTS = 128, 64


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The model is tiny: one thread warms it up in seconds, while two threads on a machine busy with
    other work spin against each other (measured 15-25x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory, one_torch_thread) -> TinyWorld:
    """The default warm-up (150 steps, a few seconds on CPU), written once for the module."""
    return write_tiny_world(str(tmp_path_factory.mktemp("tiny_world")), train_prompts=TRAIN_PROMPTS,
                            val_prompts=VAL_PROMPTS)


@pytest.fixture(scope="module")
def tokenizer(world):
    from verl.utils.tokenizer.tokenizer import hf_tokenizer  # what verl's trainer and workers load it with

    return hf_tokenizer(world.model_path)


@pytest.fixture(scope="module")
def model(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world.model_path).eval()


def test_checkpoint_loads_as_a_hugging_face_qwen2(world, tokenizer, model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(world.model_path)
    assert config.model_type == "qwen2"  # what verl's token builder and vLLM pick their code by
    assert config.max_position_embeddings >= PROMPT_LEN + MAX_RESPONSE_LEN
    assert tokenizer.pad_token_id is not None and tokenizer.eos_token_id != tokenizer.pad_token_id
    assert world.max_prompt_length == PROMPT_LEN and world.max_response_length == MAX_RESPONSE_LEN


def test_tokenizer_verl_loads_is_the_one_the_model_was_warmed_up_with(tokenizer, model):
    """transformers 5 loads every `qwen2` checkpoint's tokenizer as Qwen2Tokenizer (AutoTokenizer, so
    verl's hf_tokenizer and vLLM alike), with Qwen's byte-level pre-tokenizer instead of the saved one.
    It must still encode the task as the warm-up's code-built tokenizer did, and fit the embedding."""
    assert type(tokenizer).__name__ == "Qwen2Tokenizer"  # if this changes, the test has nothing to guard
    reference = build_tokenizer()
    problems = sample_problems(np.random.default_rng(1), 300)
    texts = [p.prompt for p in problems] + [p.response for p in problems]
    changed = [t for t in texts
               if tokenizer.encode(t, add_special_tokens=False) != reference.encode(t, add_special_tokens=False)]
    assert not changed, f"{len(changed)} of {len(texts)} task strings tokenized differently, e.g. {changed[:3]}"
    assert all(tokenizer.decode(reference.encode(t, add_special_tokens=False)) == t for t in texts)
    assert len(tokenizer) == model.get_input_embeddings().weight.shape[0]


def test_chat_template_renders_the_bare_problem_after_bos(tokenizer):
    messages = [{"role": "user", "content": "3+5-7="}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<bos>3+5-7="
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == PROMPT_LEN and ids[0] == tokenizer.bos_token_id


def test_verl_qwen_token_builder_accepts_the_tokenizer(world, tokenizer):
    """verl's agent loop picks its builder from config.json's model_type; the Qwen one needs a
    one-token newline and <|im_end|>, which the task itself never uses."""
    from transformers import AutoConfig
    from verl.utils.tokenizer.continuous_token import QwenContinuousTokenBuilder
    from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder
    from verl.utils.tokenizer.tokenizer import hf_processor

    assert len(tokenizer.encode("\n", add_special_tokens=False)) == 1
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") != tokenizer.unk_token_id
    processor = hf_processor(world.model_path)
    assert processor is None  # a text model: verl builds the text builder
    builder = create_continuous_token_builder(
        tokenizer, hf_model_type=AutoConfig.from_pretrained(world.model_path).model_type, processor=processor)
    assert type(builder) is QwenContinuousTokenBuilder
    ids = builder.build_initial_tokens([{"role": "user", "content": "3+5-7="}])
    assert tokenizer.decode(ids) == "<bos>3+5-7="


def test_parquet_rows_load_with_verl_rlhf_dataset(world, tokenizer, tmp_path, monkeypatch):
    import datasets
    from verl.utils.dataset.rl_dataset import RLHFDataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    data_config = OmegaConf.create({
        "max_prompt_length": world.max_prompt_length,  # verl drops longer prompts
        "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": 1,
        "cache_dir": str(tmp_path / "verl_cache"),
    })
    train = RLHFDataset(world.train_file, tokenizer, data_config)
    assert len(train) == TRAIN_PROMPTS  # none dropped: every prompt fits max_prompt_length
    row = train[0]
    assert row["data_source"] == "erc_demo/arithmetic" and row["ability"] == "math"
    assert row["raw_prompt"][0]["role"] == "user"
    rendered = tokenizer.apply_chat_template(row["raw_prompt"], tokenize=False, add_generation_prompt=True)
    assert rendered == "<bos>" + row["raw_prompt"][0]["content"]
    assert row["index"] == 0 and row["extra_info"]["split"] == "train"
    # the filter is real: one token less and every prompt is too long
    data_config.max_prompt_length = world.max_prompt_length - 1
    assert len(RLHFDataset(world.val_file, tokenizer, data_config)) == 0


def test_parquet_rows_have_verl_columns_and_true_answers(world):
    for path, split, count in ((world.train_file, "train", TRAIN_PROMPTS), (world.val_file, "test", VAL_PROMPTS)):
        frame = pd.read_parquet(path)
        assert set(frame.columns) >= {"data_source", "prompt", "ability", "reward_model", "extra_info"}
        assert len(frame) == count
        assert list(frame["extra_info"].map(lambda e: e["index"])) == list(range(count))
        assert set(frame["extra_info"].map(lambda e: e["split"])) == {split}
        for prompt, reward_model in zip(frame["prompt"], frame["reward_model"]):
            question = prompt[0]["content"]
            # the ground truth is the problem's value (operands and +/- only, so eval is exact)
            assert int(reward_model["ground_truth"]) == eval(question.rstrip("="))  # noqa: S307


def test_warmed_up_model_is_sometimes_right(world, tokenizer, model):
    """GRPO learns only from groups with both rewards: the warmed-up model must be neither hopeless
    nor perfect. Greedy answers to 64 validation prompts, scored by the reward CPU runs use."""
    frame = pd.read_parquet(world.val_file)
    messages = list(frame["prompt"].map(list))
    from verl.utils.tokenizer.tokenizer import normalize_token_ids

    prompts = torch.tensor([normalize_token_ids(tokenizer.apply_chat_template(m, tokenize=True, add_generation_prompt=True))
                            for m in messages])
    assert prompts.shape == (VAL_PROMPTS, PROMPT_LEN)
    responses = greedy_responses(model, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    scores = np.array([compute_score("erc_demo/arithmetic", text, rm["ground_truth"])["score"]
                       for text, rm in zip(texts, frame["reward_model"])])
    assert sum(t.startswith("\\boxed{") for t in texts) >= VAL_PROMPTS // 2, texts[:8]  # the format was learned
    accuracy = scores.mean()
    assert 0.05 < accuracy < 1.0, (accuracy, texts[:8])
    assert world.greedy_accuracy == pytest.approx(accuracy)  # what write_tiny_world reports, via verl's loading
