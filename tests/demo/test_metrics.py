"""erc_verl.demo.metrics on rows shaped as verl's file logger writes them (validation at step 0 and at the end)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from erc_verl.demo import metrics

VAL = "val-core/erc_demo/arithmetic/acc/mean@8"


def _rows(erc: bool) -> list[dict]:
    rows = [{"step": 0, VAL: 0.25}]  # val_before_train: a row without training metrics
    for step, (entropy, grad) in enumerate([(0.5, 1.0), (0.6, 3.0), (0.4, 2.0), (0.5, 2.0), (0.7, 1.0)], 1):
        row = {"step": step, metrics.REWARD: step / 10, metrics.ENTROPY: entropy, metrics.GRAD_NORM: grad,
               metrics.PG_CLIPFRAC: 0.01, metrics.PPO_KL: 0.001}
        if erc:
            row.update({metrics.ERC_CLIPFRAC: 0.02 * step, metrics.RATIO_STD: 0.03})
        rows.append(row)
    rows[-1][VAL] = 0.5
    return rows


def test_run_summary_counts_training_steps_and_reads_validation_before_and_after():
    out = metrics.run_summary(_rows(erc=True))
    assert out["steps"] == 5
    assert (out["reward_first"], out["reward_last"]) == pytest.approx((0.1, 0.5))
    assert (out["val_acc_start"], out["val_acc_end"]) == (0.25, 0.5)
    assert out["entropy_fluct"] == pytest.approx(np.std([0.1, -0.2, 0.1, 0.2], ddof=1))
    assert out["grad_norm_fluct"] == pytest.approx(np.std([2.0, -1.0, 0.0, -1.0], ddof=1))
    assert out["grad_norm_max"] == 3.0 and out["erc_clipfrac"] == pytest.approx(0.06)


def test_metrics_a_baseline_does_not_log_are_nan():
    out = metrics.run_summary(_rows(erc=False))
    assert math.isnan(out["erc_clipfrac"]) and math.isnan(out["entropy_ratio_std"])
    no_start = metrics.run_summary(_rows(erc=False)[1:])
    assert math.isnan(no_start["val_acc_start"]) and no_start["val_acc_end"] == 0.5


def test_fluctuation_needs_three_points_and_two_data_sources_are_refused():
    assert math.isnan(metrics.fluctuation(np.array([1.0, 2.0])))
    with pytest.raises(ValueError, match="several validation accuracies"):
        metrics.val_accuracy_key([{VAL: 0.1, "val-core/other/acc/mean@8": 0.2}])
