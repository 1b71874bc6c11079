"""Tests for erc_verl.paper.reward: extraction, math-verify equivalence, verl's reward dict, and the per-call time limit."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from erc_verl.paper import reward
from erc_verl.paper.reward import compute_score, extract_last_boxed


def _in_thread(fn, *args, **kwargs):
    out: dict = {}

    def target():
        out["value"] = fn(*args, **kwargs)
        out["thread_is_main"] = threading.current_thread() is threading.main_thread()

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive(), "compute_score did not return from a worker thread"
    assert out["thread_is_main"] is False
    return out["value"]


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so the answer is \boxed{540}.", "540"),
        (r"\boxed{1} then \boxed{2} and finally \boxed{3}", "3"),
        (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{1}{\sqrt{2}}"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\fbox{7}", "7"),
        (r"first \fbox{7} then \boxed{8}", "8"),
        (r"first \boxed{8} then \fbox{7}", "7"),
        (r"$\boxed 5$", "5"),
        (r"\boxed {  12 }", "12"),
        (r"\boxed{42} and \boxedfoo later", "42"),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    "text",
    [None, "", 42, "no box here", r"\boxed{unbalanced", r"\boxed{1} then truncated \boxed{2", r"\boxed"],
)
def test_extract_last_boxed_none(text):
    assert extract_last_boxed(text) is None


def test_extract_rejects_oversized_box():
    assert extract_last_boxed(r"\boxed{" + "1" * (reward.MAX_ANSWER_CHARS + 5) + "}") is None


# ----------------------------------------------------------------------------- scoring


def _score(*args, **kwargs) -> float:
    return compute_score(*args, **kwargs)["score"]


@pytest.mark.parametrize(
    "response, gt",
    [
        (r"The answer is \boxed{540}", "540"),
        (r"\boxed{540.}", "540"),
        (r"\boxed{540}", "540."),
        (r"\boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{\dfrac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{0.5}", r"\frac12"),
        (r"\boxed{\frac{\pi}{2}}", r"\pi/2"),
        (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"),
        (r"\boxed{x=3}", "3"),
        (r"\boxed{\{2,1\}}", r"\{1,2\}"),
        (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
        (r"\boxed{540}", "$540$"),
        (r"\boxed{204}", 204),
        (r"\boxed{204}", 204.0),
        (r"wrong draft \boxed{1} ... corrected: \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    ],
)
def test_correct_answers_score_one(response, gt):
    assert _score("math", response, gt) == 1.0


@pytest.mark.parametrize(
    "response, gt",
    [
        (r"\boxed{541}", "540"),
        (r"\boxed{\frac{1}{3}}", "0.5"),
        (r"\boxed{-\infty}", r"\infty"),
        (r"\boxed{540} ... no wait \boxed{541}", "540"),  # last box wins
        (r"The answer is 540", "540"),  # no box
        (r"\boxed{540", "540"),  # truncated box
        (r"\boxed{}", "540"),
        (r"\boxed{\frac{1}{}}{", "540"),  # malformed LaTeX
        (r"\boxed{\frac{{{}", "540"),
        (r"\boxed{540}", ""),
        (r"\boxed{540}", None),
    ],
)
def test_wrong_or_malformed_answers_score_zero(response, gt):
    assert _score("math", response, gt) == 0.0


@pytest.mark.parametrize(
    "response, gt",
    [
        ("\\boxed{４２}", "42"),  # fullwidth digits
        ("\\boxed｛42｝", "42"),  # fullwidth braces
        ("\\boxed{42\x00}", "42"),  # NUL inside the box
        ("\\boxed{42}\x00", "42"),
        ("\\boxed{42\u200f}", "42"),  # right-to-left mark
        ("\\boxed{\u200b4\u20602}", "42"),  # zero-width space, word joiner
        ("\ufeff\\boxed{42}", "42"),  # byte-order mark
        ("\\boxed{42}", "４２\u200e"),  # the ground truth is normalised too
    ],
)
def test_unicode_variants_are_not_false_negatives(response, gt):
    assert compute_score("math", response, gt) == {"score": 1.0, "acc": 1.0, "pred": "42", "timeout": 0.0}


def test_normalize_text_keeps_layout_whitespace():
    assert reward.normalize_text("a\tb\nc\r\x07d\u202e") == "a\tb\nc\rd"
    assert reward.normalize_text("ｘ²") == "x2"  # NFKC, as asked: compatibility forms fold


def test_returns_verls_reward_dict():
    # Same keys as verl's own math scorers (math_dapo: score, acc, pred), plus the timeout count.
    assert compute_score("m", r"so \boxed{\frac{1}{2}}.", "0.5") == {
        "score": 1.0, "acc": 1.0, "pred": r"\frac{1}{2}", "timeout": 0.0}
    assert compute_score("m", r"\boxed{3}", "4") == {"score": 0.0, "acc": 0.0, "pred": "3", "timeout": 0.0}
    # every call has the same keys: verl's reward loop stacks them per key over the batch
    assert compute_score("m", "no box", "4") == {"score": 0.0, "acc": 0.0, "pred": "", "timeout": 0.0}


def test_bad_arguments_never_raise():
    assert _score(None, None, None) == 0.0
    assert _score("x", b"\\boxed{5}", "5") == 0.0  # bytes are not a response
    assert _score("x", r"\boxed{5}", ["5", "6"]) == 1.0  # a list ground truth uses its first entry
    assert _score(data_source="x", solution_str=r"\boxed{5}", ground_truth="5", extra_info={"a": 1}) == 1.0


@pytest.mark.parametrize("value", ["abc", 0, -1, "inf", 0.1])
def test_bad_time_limit_is_a_one_line_error(value, monkeypatch):
    with pytest.raises(ValueError, match=r"^timeout_s=.* is not a time limit; give seconds above"):
        compute_score("x", r"\boxed{1}", "1", timeout_s=value)
    monkeypatch.setenv("ERC_REWARD_TIMEOUT_S", str(value))
    with pytest.raises(ValueError, match=r"^ERC_REWARD_TIMEOUT_S="):
        compute_score("x", r"\boxed{1}", "1")


def test_accepts_verl_call_signature_with_extra_kwargs():
    # NaiveRewardManager passes these when a reward router is configured.
    result = compute_score(
        data_source="aime2024",
        solution_str=r"\boxed{7}",
        ground_truth="7",
        extra_info={"index": 0, "num_turns": 2, "rollout_reward_scores": {}},
        reward_router_address=None,
        reward_model_tokenizer=None,
    )
    assert result["score"] == 1.0


def test_wired_through_verl_config_keys():
    # The exact keys and pkg:// path a recipe uses, resolved the way verl 0.9.1's reward loop does.
    import os

    import verl
    from hydra import compose, initialize_config_dir
    from verl.trainer.ppo.reward import get_custom_reward_fn

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    overrides = [
        "reward.custom_reward_function.path=pkg://erc_verl.paper.reward",
        "reward.custom_reward_function.name=compute_score",
        "+reward.custom_reward_function.reward_kwargs.timeout_s=2.5",
    ]
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        config = compose("ppo_trainer", overrides=overrides)
    fn = get_custom_reward_fn(config)
    assert fn(data_source="aime2024", solution_str=r"\boxed{2}", ground_truth="2", extra_info={})["score"] == 1.0
    assert fn(data_source="aime2024", solution_str=r"\boxed{3}", ground_truth="2", extra_info={})["score"] == 0.0
    start = time.monotonic()  # reward_kwargs.timeout_s reaches the call
    assert fn(data_source="a", solution_str=r"\boxed{10^{10^{10}}}", ground_truth="2", extra_info={})["timeout"] == 1.0
    assert time.monotonic() - start <= 2.5


def _verl_batch(texts: list[str], gts: list[str], sources: list[str]):
    """A DataProto as verl's rollout hands it to the reward manager; token id i decodes to texts[i]."""
    import numpy as np
    import torch
    from verl import DataProto

    n = len(texts)
    return DataProto.from_dict(
        tensors={
            "prompts": torch.full((n, 2), 5),
            "responses": torch.tensor([[i, 9, 9] for i in range(n)]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1]] * n),
        },
        non_tensors={
            "data_source": np.array(sources, dtype=object),
            "reward_model": np.array([{"ground_truth": g} for g in gts], dtype=object),
            "extra_info": np.array([{"index": i} for i in range(n)], dtype=object),
        },
    )


def _naive_manager(texts: list[str], compute_score_fn=compute_score):
    import types

    from verl.experimental.reward_loop.reward_manager.naive import NaiveRewardManager

    # The tokenizer is the one stand-in (no model here): token id i decodes to texts[i].
    tokenizer = types.SimpleNamespace(decode=lambda ids, skip_special_tokens=True: texts[int(ids[0])])
    return NaiveRewardManager(config=None, tokenizer=tokenizer, compute_score=compute_score_fn)


def test_through_verl_naive_reward_manager_and_validation_metrics():
    # verl's reward manager calls compute_score via run_in_executor (a thread) and passes the dict on as
    # reward_extra_info; verl's validation metrics then give acc per data source and majority votes on pred.
    import numpy as np
    from verl.trainer.ppo.metric_utils import process_validation_metrics

    texts = [r"so \boxed{\frac{1}{2}}", r"\boxed{0.5}", r"\boxed{3}", r"\boxed{4}"]
    gts = ["0.5", "0.5", "4", "4"]
    manager = _naive_manager(texts)
    batch = _verl_batch(texts, gts, ["aime2024", "aime2024", "math500", "math500"])
    results = [manager.loop.run_until_complete(manager.run_single(batch[i : i + 1])) for i in range(4)]
    assert [r["reward_score"] for r in results] == [1.0, 1.0, 0.0, 1.0]
    assert results[0]["reward_extra_info"] == {"score": 1.0, "acc": 1.0, "pred": r"\frac{1}{2}", "timeout": 0.0}

    infos = {k: [r["reward_extra_info"][k] for r in results] for k in ("acc", "pred", "timeout")}
    metrics = process_validation_metrics(np.array(["aime2024"] * 2 + ["math500"] * 2), ["p0", "p0", "p1", "p1"], infos)
    assert metrics["aime2024"]["acc"]["mean@2"] == 1.0
    assert metrics["math500"]["acc"]["mean@2"] == 0.5
    assert "maj@2/mean" in metrics["math500"]["acc"]  # votes over pred: verl read the extracted answers
    assert metrics["math500"]["timeout"]["mean@2"] == 0.0


# ----------------------------------------------------------------------------- the time limit

#: Held-out worst answers: each stalls sympy for minutes (or gigabytes) when not stopped.
WORST_ANSWERS = [
    r"\boxed{10^{10^{10}}}",
    r"\boxed{\binom{10^9}{10^8}}",
    r"\boxed{(10^7)!}",
    r"\boxed{9^{9^{9^{9}}}}",
    r"\boxed{2^{2^{2^{2^{2^{2}}}}}}",
    r"\boxed{\binom{10^{12}}{10^{11}} - \binom{10^{12}}{10^{11}}}",
    r"\boxed{((10^6)!)!}",
    r"\boxed{7^{7^{7^{7^{7}}}} \bmod 10}",
]


def test_huge_inputs_are_fast():
    for response, expected in [
        ("x" * 1_000_000 + r"\boxed{540}", 1.0),
        ("{" * 1_000_000, 0.0),
        (r"\boxed{" + "{" * 1_000_000, 0.0),
        (r"\boxed{" * 200_000, 0.0),
        (("\\" * 1_000_000) + "}", 0.0),
        ("é" * 1_000_000 + r"\boxed{540}", 1.0),
        (r"\boxed{" * 60_000 + "540" + "}" * 60_000, 1.0),  # the innermost box is the last one
    ]:
        start = time.monotonic()
        score = _score("x", response, "540")
        assert time.monotonic() - start < 2.0
        assert score == expected


@pytest.mark.parametrize("answer", WORST_ANSWERS[:3])
@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_worst_answer_scores_zero_within_the_limit(answer, where):
    start = time.monotonic()
    call = (lambda: compute_score("x", answer, "42", timeout_s=2)) if where == "main thread" else (
        lambda: _in_thread(compute_score, "x", answer, "42", timeout_s=2))
    result = call()
    assert time.monotonic() - start <= 2.0
    assert result["score"] == 0.0 and result["pred"] == answer[len(r"\boxed{") : -1]


def test_32_threads_of_worst_answers_through_verls_reward_manager():
    """verl's reward manager with the executor verl gets on a 28+ core node (32 threads): 31 worst answers and
    one right one at once. Every call returns within the limit (entry to return, timed around compute_score)
    and the right answer scores 1."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    texts = [WORST_ANSWERS[i % len(WORST_ANSWERS)] for i in range(31)] + [r"so the answer is \boxed{42}"]
    walls: list[float] = []

    def timed(**kwargs):
        start = time.monotonic()
        try:
            return compute_score(**kwargs)
        finally:
            walls.append(time.monotonic() - start)

    manager = _naive_manager(texts, timed)
    manager.loop.set_default_executor(ThreadPoolExecutor(max_workers=32))
    batch = _verl_batch(texts, ["42"] * 32, ["aime2024"] * 32)

    async def all_at_once():
        return await asyncio.gather(*(manager.run_single(batch[i : i + 1]) for i in range(32)))

    start = time.monotonic()
    results = manager.loop.run_until_complete(all_at_once())
    total = time.monotonic() - start
    print(f"32 threads: worst call {max(walls):.2f} s, all {total:.2f} s (limit {reward.DEFAULT_TIMEOUT_S} s)")
    assert len(walls) == 32 and max(walls) <= reward.DEFAULT_TIMEOUT_S
    assert results[-1]["reward_score"] == 1.0 and results[-1]["reward_extra_info"]["timeout"] == 0.0
    assert all(r["reward_score"] == 0.0 for r in results[:-1])
    assert sum(r["reward_extra_info"]["timeout"] for r in results) >= 1  # the limit did stop some


def _new_children(before: set[int], recursive: bool, timeout_s: float = 10.0) -> list:
    import psutil

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        new = [c for c in psutil.Process().children(recursive=recursive) if c.pid not in before]
        if new:
            return new
        time.sleep(0.02)
    raise AssertionError("no new process appeared")


@pytest.mark.parametrize("victim", ["check child", "helper"])
def test_death_mid_check_scores_zero_at_once(victim):
    import psutil

    assert _score("x", r"\boxed{1}", "1") == 1.0  # the helper is up
    helper = reward._helper.proc.pid
    before = {c.pid for c in psutil.Process().children(recursive=True)}
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=compute_score("x", WORST_ANSWERS[0], "3", timeout_s=30)))
    start = time.monotonic()
    worker.start()
    check_child = _new_children(before, recursive=True)[0]
    assert check_child.ppid() == helper
    (check_child if victim == "check child" else psutil.Process(helper)).kill()
    worker.join(30)
    assert time.monotonic() - start < 10  # not the 30 s limit: the death was seen at once
    assert out["r"] == {"score": 0.0, "acc": 0.0, "pred": WORST_ANSWERS[0][7:-1], "timeout": 0.0}
    assert _score("x", r"\boxed{2}", "2") == 1.0  # the next call works (after a restart if the helper died)


@pytest.fixture
def fresh_start(monkeypatch):
    """The reward as in a new process, with no helper yet (restored afterwards, the test's helper killed)."""
    monkeypatch.setattr(reward, "_helper", None)
    monkeypatch.setattr(reward, "_helper_pid", None)
    monkeypatch.setattr(reward, "_start_error", None)
    yield monkeypatch
    if reward._helper is not None:
        reward._helper.close()


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-c", "raise SystemExit(3)"],
        [sys.executable, "-c", "import time; time.sleep(600)"],
        [sys.executable, "-I", "-c", "import math_verify_is_not_installed"],
        [sys.executable, "-c", "print('not json', flush=True); import time; time.sleep(600)"],
    ],
    ids=["exits", "hangs", "no-math-verify", "bad-handshake"],
)
def test_helpers_that_never_start_fail_loudly(fresh_start, argv):
    fresh_start.setattr(reward, "START_TIMEOUT_S", 1.0)
    fresh_start.setattr(reward, "_helper_argv", lambda: argv)
    start = time.monotonic()
    with pytest.raises(reward.RewardHelperError, match=r"helper process .*\(pip install math-verify\)"):
        compute_score("x", r"\boxed{1}", "1", timeout_s=4)
    assert time.monotonic() - start <= 4.0
    with pytest.raises(reward.RewardHelperError):  # and stays failed: nothing runs without a limit
        compute_score("x", r"\boxed{1}", "1", timeout_s=4)


def test_a_slow_start_still_keeps_each_calls_limit(fresh_start):
    fresh_start.setattr(reward, "START_TIMEOUT_S", 3.0)
    fresh_start.setattr(reward, "_helper_argv", lambda: [sys.executable, "-c", "import time; time.sleep(600)"])
    start = time.monotonic()
    assert compute_score("x", r"\boxed{1}", "1", timeout_s=1)["timeout"] == 1.0
    assert time.monotonic() - start <= 1.0


def test_a_forked_process_starts_its_own_helper(fresh_start):
    import os

    assert _score("x", r"\boxed{1}", "1") == 1.0
    first = reward._helper
    fresh_start.setattr(reward, "_helper_pid", os.getpid() + 1)  # as if this process were a fork of another
    assert _score("x", r"\boxed{2}", "2") == 1.0
    assert reward._helper is not first and reward._helper_pid == os.getpid()
    first.close()
