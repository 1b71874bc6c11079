"""Token diagnostics writer: sampling bounds, record cap, one file per process, and record values."""

from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch
from omegaconf import OmegaConf

from erc_verl.algorithm.config import ERCDiagnosticsConfig
from erc_verl.seams.diagnostics import TokenDiagnostics, maybe_diagnostics, ppo_clipped_mask, ClipBounds
from erc_verl.algorithm.gate import ERCBounds, erc_keep_mask

ACTOR = OmegaConf.create(
    {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
     "entropy_mask_low": 0.95, "entropy_mask_high": 1.05, "global_batch_info": {}}
)


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _files(directory):
    return sorted(os.path.join(directory, n) for n in os.listdir(directory))


def _batch(rows=4, cols=6, valid_per_row=None, seed=0):
    """A random batch; positions outside the mask carry sentinel values that must never be sampled."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, cols)
    if valid_per_row is not None:
        mask = (torch.arange(cols).expand(rows, cols) < torch.tensor(valid_per_row).unsqueeze(1)).float()
    old_lp = -torch.rand(rows, cols, generator=g) * 3
    lp = old_lp + torch.randn(rows, cols, generator=g) * 0.3
    old_ent = torch.rand(rows, cols, generator=g) + 0.05
    ent = old_ent * (1 + torch.randn(rows, cols, generator=g) * 0.08)
    adv = torch.randn(rows, cols, generator=g)
    sentinel = ~mask.bool()
    lp, old_lp = lp.masked_fill(sentinel, -99.0), old_lp.masked_fill(sentinel, -99.0)
    keep, _ = erc_keep_mask(ent, old_ent, mask, ERCBounds(0.95, 1.05))
    return dict(log_prob=lp, old_log_prob=old_lp, entropy=ent, old_entropy=old_ent, advantages=adv,
                response_mask=mask, keep=keep)


def test_off_means_none(tmp_path):
    assert maybe_diagnostics(None, rank=0) is None
    assert maybe_diagnostics(ERCDiagnosticsConfig(), rank=0) is None
    on = maybe_diagnostics(ERCDiagnosticsConfig(dir=str(tmp_path)), rank=3)
    assert isinstance(on, TokenDiagnostics) and on.rank == 3
    assert os.listdir(tmp_path) == []  # nothing is created before the first record


def test_samples_at_most_tokens_per_step_valid_tokens(tmp_path):
    diag = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path), tokens_per_step=5), rank=0)
    assert diag.record(**_batch(valid_per_row=[6, 4, 2, 0]), config=ACTOR) == 5
    assert diag.record(**_batch(rows=1, valid_per_row=[3]), config=ACTOR) == 3  # fewer valid than asked
    assert diag.record(**_batch(rows=2, valid_per_row=[0, 0]), config=ACTOR) == 0
    records = _read(diag.path)
    assert [r["call"] for r in records] == [0] * 5 + [1] * 3
    assert all(r["old_prob"] > math.exp(-50) for r in records), "a masked position was sampled"
    first_call = [(r["prob"], r["old_prob"]) for r in records[:5]]
    assert len(set(first_call)) == 5, "a token was sampled twice in one call"


def test_max_records_caps_the_file_and_warns_once(tmp_path, caplog):
    diag = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path), tokens_per_step=5, max_records=12), rank=0)
    with caplog.at_level(logging.WARNING, logger="erc_verl.seams.diagnostics"):
        written = [diag.record(**_batch(seed=i), config=ACTOR) for i in range(5)]
    assert written == [5, 5, 2, 0, 0]
    assert len(_read(diag.path)) == 12
    assert sum("max_records" in r.message for r in caplog.records) == 1


def test_ranks_and_restarts_get_their_own_files(tmp_path):
    cfg = ERCDiagnosticsConfig(dir=str(tmp_path), tokens_per_step=4)
    writers = [TokenDiagnostics(cfg, rank=0), TokenDiagnostics(cfg, rank=1), TokenDiagnostics(cfg, rank=0)]
    for i, w in enumerate(writers):
        w.record(**_batch(seed=i), config=ACTOR)
        w.close()
    paths = [w.path for w in writers]
    assert len(set(paths)) == 3
    pid = os.getpid()
    assert os.path.basename(paths[0]) == f"tokens-rank0-pid{pid}.jsonl"
    assert os.path.basename(paths[1]) == f"tokens-rank1-pid{pid}.jsonl"
    assert os.path.basename(paths[2]) == f"tokens-rank0-pid{pid}.1.jsonl"  # same rank+pid: a restart
    assert [len(_read(p)) for p in paths] == [4, 4, 4]
    assert [r["rank"] for p in paths for r in _read(p)] == [0] * 4 + [1] * 4 + [0] * 4


def test_same_seed_and_rank_sample_the_same_tokens(tmp_path):
    a = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path / "a"), tokens_per_step=7, seed=5), rank=2)
    b = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path / "b"), tokens_per_step=7, seed=5), rank=2)
    c = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path / "c"), tokens_per_step=7, seed=5), rank=3)
    for w in (a, b, c):
        w.record(**_batch(), config=ACTOR)
    assert _read(a.path) == _read(b.path)
    assert [r["prob"] for r in _read(a.path)] != [r["prob"] for r in _read(c.path)]


def test_record_values_match_a_hand_computation(tmp_path):
    """Four tokens chosen to hit each case: kept, PPO upper clip, dual clip, ERC below/above the band."""
    old_p = torch.tensor([[0.5, 0.4, 0.1, 0.8, 0.3]])
    new_p = torch.tensor([[0.55, 0.6, 0.5, 0.8, 0.2]])
    adv = torch.tensor([[1.0, 2.0, -1.0, -0.5, 0.0]])
    old_h = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.5]])
    new_h = torch.tensor([[1.01, 1.04, 0.97, 0.9, 0.6]])
    mask = torch.ones(1, 5)
    keep, _ = erc_keep_mask(new_h, old_h, mask, ERCBounds(0.95, 1.05))
    diag = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path), tokens_per_step=100), rank=0)
    diag.record(log_prob=new_p.log(), old_log_prob=old_p.log(), entropy=new_h, old_entropy=old_h, advantages=adv,
                response_mask=mask, keep=keep, config=ACTOR)
    by_old_prob = {round(r["old_prob"], 6): r for r in _read(diag.path)}
    assert len(by_old_prob) == 5

    expected = {
        # old_prob: (ratio, ppo_clipped, erc_clipped, direction, adv_sign)
        0.5: (1.1, False, False, "", 1),   # inside both
        0.4: (1.5, True, False, "", 1),    # A>0, r > 1.28: PPO clips
        0.1: (5.0, True, False, "", -1),   # A<0, r > clip_ratio_c=3: dual clip
        0.8: (1.0, False, True, "lower", -1),  # rho = 0.9 <= 0.95
        0.3: (2 / 3, False, True, "upper", 0),  # rho = 1.2 >= 1.05; A=0 is never PPO-clipped
    }
    for old, (ratio, ppo, erc, direction, sign) in expected.items():
        r = by_old_prob[old]
        i = [0.5, 0.4, 0.1, 0.8, 0.3].index(old)
        assert r["prob"] == pytest.approx(new_p[0, i].item(), rel=1e-6)
        assert r["ratio"] == pytest.approx(ratio, rel=1e-5)
        assert r["entropy"] == pytest.approx(new_h[0, i].item(), rel=1e-6)
        assert r["old_entropy"] == pytest.approx(old_h[0, i].item(), rel=1e-6)
        assert r["entropy_ratio"] == pytest.approx(new_h[0, i].item() / old_h[0, i].item(), rel=1e-5)
        assert r["advantage"] == pytest.approx(adv[0, i].item())
        assert (r["ppo_clipped"], r["erc_clipped"], r["erc_direction"], r["adv_sign"]) == (ppo, erc, direction, sign)


def test_ppo_clipped_matches_verls_clip_metrics():
    """Our per-token PPO-clip test reproduces verl's pg_clipfrac + pg_clipfrac_lower (disjoint cases)."""
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    b = _batch(rows=16, cols=32, seed=3)
    b["log_prob"] = b["old_log_prob"] + torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) * 0.8
    _, metrics = get_policy_loss_fn("vanilla")(
        old_log_prob=b["old_log_prob"], log_prob=b["log_prob"], advantages=b["advantages"],
        response_mask=b["response_mask"], loss_agg_mode="token-mean", config=ACTOR, rollout_is_weights=None,
    )
    clipped, _ = ppo_clipped_mask(b["log_prob"], b["old_log_prob"], b["advantages"], ClipBounds.from_config(ACTOR))
    ours = clipped.float().mean().item()
    assert metrics["actor/pg_clipfrac_lower"] > 0  # the dual-clip case is exercised
    assert ours == pytest.approx(metrics["actor/pg_clipfrac"] + metrics["actor/pg_clipfrac_lower"], abs=1e-6)


def test_reads_verls_actor_dataclass():
    from erc_verl.algorithm.config import ERCFSDPActorConfig

    cfg = ERCFSDPActorConfig(strategy="fsdp", ppo_mini_batch_size=2, ppo_micro_batch_size_per_gpu=2, rollout_n=2,
                             clip_ratio_low=0.1, clip_ratio_high=0.3, clip_ratio_c=4.0, entropy_mask_low=0.9,
                             entropy_mask_high=1.2)
    assert ClipBounds.from_config(cfg) == ClipBounds(0.1, 0.3, 4.0, 0.9, 1.2)


def test_mismatched_shapes_are_rejected(tmp_path):
    diag = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(tmp_path)), rank=0)
    b = _batch()
    b["entropy"] = b["entropy"][:, :-1]
    with pytest.raises(ValueError, match="same|share"):
        diag.record(**b, config=ACTOR)
