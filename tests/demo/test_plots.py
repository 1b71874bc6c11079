"""The diagnostics plotting script and the figure helpers, on small synthetic diagnostics directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from erc_verl.algorithm.config import ERCDiagnosticsConfig
from erc_verl.seams.diagnostics import TokenDiagnostics
from erc_verl.algorithm.gate import ERCBounds, erc_keep_mask
from erc_verl.demo.plots import clip_fractions, load_token_records, plot_training_curves

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "plot_erc_diagnostics.py"
FIGURES = ("fig1a_prob_vs_entropy_ratio.png", "fig3_clipping_regions.png", "fig4_prob_vs_entropy.png",
           "clip_fractions.png")
ACTOR = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0,
                          "entropy_mask_low": 0.95, "entropy_mask_high": 1.05})


def _write_run(directory: Path, gate: bool, calls: int = 6, seed: int = 0) -> None:
    """A fake run written through the real writer: drifted policies, with or without the ERC gate."""
    g = torch.Generator().manual_seed(seed)
    diag = TokenDiagnostics(ERCDiagnosticsConfig(dir=str(directory), tokens_per_step=50), rank=0)
    for _ in range(calls):
        old_lp = -torch.rand(8, 16, generator=g) * 4
        lp = old_lp + torch.randn(8, 16, generator=g) * 0.3
        old_h = torch.rand(8, 16, generator=g) + 0.01
        h = old_h * torch.exp(torch.randn(8, 16, generator=g) * 0.1)
        mask = torch.ones(8, 16)
        keep, _ = erc_keep_mask(h, old_h, mask, ERCBounds(0.95, 1.05)) if gate else (mask.bool(), None)
        diag.record(log_prob=lp, old_log_prob=old_lp, entropy=h, old_entropy=old_h,
                    advantages=torch.randn(8, 16, generator=g), response_mask=mask, keep=keep, config=ACTOR)
    diag.close()


def _assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 5_000, f"{path} missing or nearly empty"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200
    assert image[..., :3].std() > 0.01, f"{path} is blank"


def test_script_writes_all_figures_for_two_runs(tmp_path):
    _write_run(tmp_path / "dapo" / "diag", gate=False)
    _write_run(tmp_path / "erc" / "diag", gate=True, seed=1)
    out = tmp_path / "plots"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "dapo"), str(tmp_path / "erc"), "--labels", "DAPO", "ERC",
         "--out", str(out), "--max-points", "200"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in FIGURES:
        _assert_png(out / name)
    assert sorted(result.stdout.split()) == sorted(str(out / n) for n in FIGURES)


def test_script_explains_a_directory_without_records(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty"), "--out", str(tmp_path / "o")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "erc_diagnostics.dir" in result.stderr and not (tmp_path / "o").exists()


def test_script_rejects_label_count_mismatch(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--labels", "a", "b", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "--labels" in result.stderr


def test_loader_reads_every_process_file_and_skips_a_torn_line(tmp_path):
    _write_run(tmp_path / "run", gate=True, calls=2)
    _write_run(tmp_path / "run", gate=True, calls=1, seed=3)  # same rank and pid: a second file
    files = sorted(os.listdir(tmp_path / "run"))
    assert len(files) == 2
    with open(tmp_path / "run" / files[0], "a", encoding="utf-8") as f:
        f.write('{"call": 9, "prob": 0.')  # a process killed mid-write
    df = load_token_records(str(tmp_path))
    assert len(df) == 150
    assert set(df["erc_direction"]) <= {"", "upper", "lower"}


def test_clip_fractions_count_each_mechanism():
    df = pd.DataFrame({"ppo_clipped": [True, True, False, False, False, False, False, False, False, False],
                       "erc_clipped": [True, False, True, True, False, False, False, False, False, False]})
    assert clip_fractions(df) == {"PPO-clip only": 0.1, "ERC only": 0.2, "both": 0.1, "either": 0.4}


def test_training_curves_figure(tmp_path):
    """From verl's metric names, as its file logger writes them; ERC's curves only where an arm logged them."""
    def row(arm, step):
        values = {"step": step, "critic/score/mean": 0.1 * step, "actor/entropy": 1 - 0.01 * step,
                  "actor/grad_norm": 1.0 + (step % 3), "actor/pg_clipfrac": 0.01}
        if arm == "dapo_erc":
            values.update({"actor/erc_clipfrac": 0.05, "actor/entropy_ratio_std": 0.02})
        if step % 4 == 0:
            values["val-core/erc_demo/arithmetic/acc/mean@8"] = 0.5
        return values

    rows = {arm: [row(arm, step) for step in range(1, 9)] for arm in ("dapo", "dapo_erc")}
    path = tmp_path / "curves.png"
    assert plot_training_curves(rows, str(path), title="t") == str(path)
    _assert_png(path)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="erc_diagnostics.dir"):
        load_token_records(str(tmp_path / "nope"))
