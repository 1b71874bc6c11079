"""``erc-verl demo``: the quick preset end to end (integration), determinism, and flag validation."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _demo_cmd(*args: str) -> list[str]:
    exe = shutil.which("erc-verl")
    base = [exe] if exe else [sys.executable, "-m", "erc_verl.cli"]
    return [*base, "demo", "--no-progress", *args]


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(_demo_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, f"demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _metrics(out: Path, arm: str) -> list[dict]:
    with open(out / arm / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _tokens(out: Path, arm: str) -> list[dict]:
    files = glob.glob(str(out / arm / "diagnostics" / "tokens-*.jsonl"))
    assert len(files) == 1, files
    with open(files[0], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.integration
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = _run("--quick", "--out", str(out))

    run = json.loads((out / "run.json").read_text())
    steps = run["settings"]["steps"]
    for arm in ("dapo", "dapo_erc"):
        rows = _metrics(out, arm)
        assert [r["step"] for r in rows] == list(range(1, steps + 1))
        assert all(r["arm"] == arm for r in rows)
        for r in rows:
            assert 0.0 <= r["reward"] <= 1.0 and r["entropy"] > 0 and r["grad_norm"] > 0
            assert r["entropy_ratio_min"] <= r["entropy_ratio_mean"] <= r["entropy_ratio_max"]
        assert "eval_acc" in rows[-1]
        tokens = _tokens(out, arm)
        assert len(tokens) > 0
        if arm == "dapo":
            assert all(r["erc_clipfrac"] == 0.0 for r in rows), "the ERC gate must not act in the plain DAPO arm"
            assert all(r["clipfrac_erc_only"] == 0.0 and r["clipfrac_both"] == 0.0 for r in rows)
            assert not any(t["erc_clipped"] for t in tokens)
            # ...although the entropy ratio does leave the band there: the gate, not the data, makes the difference.
            assert sum(r["entropy_ratio_outside_frac"] for r in rows) > 0
        else:
            assert sum(r["erc_clipfrac"] for r in rows) > 0
            assert any(t["erc_clipped"] for t in tokens)
            # The loss's own metric and the token bookkeeping agree.
            for r in rows:
                assert r["erc_clipfrac"] == pytest.approx(r["clipfrac_erc_only"] + r["clipfrac_both"], abs=1e-6)
                assert r["erc_clipfrac"] == pytest.approx(r["erc_clipfrac_upper"] + r["erc_clipfrac_lower"], abs=1e-6)

    assert (out / "training_curves.png").stat().st_size > 10_000
    for name in ("fig1a_prob_vs_entropy_ratio.png", "fig3_clipping_regions.png", "fig4_prob_vs_entropy.png",
                 "clip_fractions.png"):
        assert (out / "figures" / name).stat().st_size > 5_000
    with open(out / "summary.csv", encoding="utf-8") as f:
        summary = {row["arm"]: row for row in csv.DictReader(f)}
    assert set(summary) == {"dapo", "dapo_erc"}
    assert float(summary["dapo"]["erc_clipfrac"]) == 0.0 and float(summary["dapo_erc"]["erc_clipfrac"]) > 0
    assert "entropy_dstd" in result.stdout and "grad_norm_dstd" in result.stdout  # the printed table


@pytest.mark.integration
def test_same_seed_same_run(tmp_path):
    """Two tiny runs with one seed give identical metrics and token records; another seed does not."""
    tiny = ("--quick", "--steps", "2", "--warmup-steps", "30", "--arms", "dapo,gppo_erc")
    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    _run(*tiny, "--out", str(outs[0]))
    _run(*tiny, "--out", str(outs[1]))
    _run(*tiny, "--seed", "1", "--out", str(outs[2]))
    for arm in ("dapo", "gppo_erc"):
        assert _metrics(outs[0], arm) == _metrics(outs[1], arm)
        assert _tokens(outs[0], arm) == _tokens(outs[1], arm)
        assert _metrics(outs[0], arm) != _metrics(outs[2], arm)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--arms", "dapo,ppo"], "--arms"),
        (["--arms", "dapo,dapo"], "--arms"),
        (["--prompts", "10", "--minibatches", "4"], "--minibatches"),
        (["--n", "1"], "--n"),
        (["--erc-low", "1.1", "--erc-high", "1.05"], "--erc-low"),
        (["--clip-ratio-c", "1.0"], "--clip-ratio-c"),
        (["--hidden-size", "48"], "--hidden-size"),
    ],
)
def test_bad_flags_name_the_flag(argv, flag):
    from erc_verl import demo

    with pytest.raises(SystemExit) as exc:
        demo.settings_from_args(demo.build_parser().parse_args(argv))
    assert flag in str(exc.value)


def test_cli_lists_the_demo_subcommand():
    from erc_verl.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--arms", "gppo,gppo_erc"])
    assert args.command == "demo" and args.quick and args.arms == "gppo,gppo_erc"


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_cannot_be_a_directory_is_one_line(tmp_path, where):
    """--out naming a file (or a path under one) is refused before anything runs, not with a traceback."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    out = a_file if where == "file" else a_file / "demo"
    result = subprocess.run(_demo_cmd("--quick", "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    expected = (f"erc-verl demo: --out {out} is a file, not a directory; choose another --out." if where == "file" else
                f"erc-verl demo: --out {out} cannot be created: {a_file} is a file; choose another --out.")
    assert result.stderr.strip().splitlines() == [expected]
    assert a_file.read_text() == "keep me"


def test_a_file_error_mid_run_is_one_line(tmp_path, monkeypatch):
    from erc_verl import cli, demo

    def run(settings):
        raise PermissionError(13, "Permission denied", f"{settings.out}/run.json")

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--out", str(tmp_path)])
    assert str(exc.value) == f"erc-verl demo: Permission denied: {tmp_path}/run.json"
