"""scripts/bench_overhead.py runs end to end (timing process + one memory process per variant) and writes its JSON.

Tiny model and vocabulary, one repetition: this checks the plumbing and the report, not the performance (the
acceptance targets are checked by the benchmark itself, see `--check`).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from erc_verl.bench import overhead

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_overhead.py"
RATIOS = ("time_ratio_erc", "mem_ratio_erc", "time_ratio_graph_entropy", "mem_ratio_graph_entropy")
VARIANTS = ("dapo", "erc", "graph_entropy")


def run_bench(tmp_path, *extra):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--vocab", "512", "--hidden-size", "32", "--layers", "1", "--tokens", "64",
           "--reps", "1", "--warmup", "0", "--mem-steps", "1", "--mem-runs", "1", "--threads", "1",
           "--json", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text()), proc.stdout


@pytest.mark.integration
def test_bench_overhead_json_and_table(tmp_path):
    result, stdout = run_bench(tmp_path)

    for key in RATIOS:
        assert isinstance(result[key], float) and math.isfinite(result[key]) and result[key] > 0, key
    assert result["device"] == "cpu" and result["tokens"] == 64 and result["vocab"] == 512
    assert result["memory_metric"] == "ru_maxrss"
    assert result["versions"]["verl"] and result["versions"]["torch"] and result["date"]
    assert result["config"]["hidden_size"] == 32 and result["config"]["reps"] == 1
    # the timing process ran with glibc reusing freed memory (no per-step page faults), and only that setting
    assert result["timing_malloc_env"] == {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
    assert {w["malloc_mmap_threshold"] for v in result["variants"].values() for w in v["workers"]} == {"131072"}

    for name in VARIANTS:
        v = result["variants"][name]
        assert len(v["raw_wall_s"]) == 1 and v["median_wall_s"] > 0 and v["median_cpu_s"] >= 0
        # peak memory comes from a separate process per variant and is at least what it held after the build
        assert v["peak_mem_bytes"] >= v["base_mem_bytes"] > 0
        assert [(w["variant"], w["tokens"]) for w in v["workers"]] == [(name, 64)]
        assert v["peak_mem_runs_bytes"] == [v["peak_mem_bytes"]]
    dapo = result["variants"]["dapo"]
    assert result["time_ratio_erc"] == pytest.approx(result["variants"]["erc"]["median_s"] / dapo["median_s"])
    erc_peak = result["variants"]["erc"]["peak_mem_bytes"]
    assert result["mem_ratio_erc"] == pytest.approx(erc_peak / dapo["peak_mem_bytes"])

    assert set(result["check"]["criteria"].values()) <= {True, False}
    assert ("PASS" in stdout) or ("FAIL" in stdout)
    for name in VARIANTS:
        assert f"64  {name}" in stdout


@pytest.mark.integration
def test_bench_overhead_sweep_reports_every_token_count(tmp_path):
    result, _ = run_bench(tmp_path, "--sweep", "32,64", "--no-memory", "--time-malloc", "default")

    assert [entry["tokens"] for entry in result["sweep"]] == [32, 64]
    assert result["tokens"] == 64  # the top-level numbers are those of the largest token count
    for entry in result["sweep"]:
        for key in ("time_ratio_erc", "time_ratio_graph_entropy"):
            assert math.isfinite(entry[key]) and entry[key] > 0
        assert entry["mem_ratio_erc"] is None  # --no-memory: no memory processes, no memory ratios
    assert "check" not in result
    assert result["timing_malloc_env"] == {}


def test_explicit_flags_override_quick_and_presets():
    cfg = overhead.parse_args(["--quick", "--reps", "2"])
    assert (cfg.reps, cfg.hidden_size, cfg.warmup) == (2, overhead.QUICK["hidden_size"], overhead.QUICK["warmup"])
    cfg = overhead.parse_args(["--preset", "r1-distill-1.5b", "--no-gradient-checkpointing", "--device", "cuda"])
    assert (cfg.layers, cfg.gradient_checkpointing, cfg.entropy_compile) == (28, False, "on")
    cfg = overhead.parse_args(["--sweep", "64,32,64", "--variants", "erc", "--seqs", "2"])
    assert (cfg.token_list, cfg.variants, cfg.max_position_embeddings) == ([32, 64], ("dapo", "erc"), 4096)
    assert overhead.OverheadConfig.from_json(json.loads(json.dumps(cfg.as_json()))) == cfg  # what a process gets


@pytest.mark.parametrize("argv", [["--tokens", "63"], ["--timer", "cpu", "--device", "cuda"], ["--variants", "erc,x"],
                                  ["--reps", "0"], ["--response-frac", "1"], ["--dtype", "float64"],
                                  ["--sweep", "32,x"]])
def test_bad_flags_exit_2_with_the_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        overhead.parse_args(argv)
    assert exit_.value.code == 2 and "usage:" in capsys.readouterr().err
