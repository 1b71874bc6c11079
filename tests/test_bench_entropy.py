"""scripts/bench_entropy.py runs and reports every entropy function with its error (plumbing, not speed)."""

import importlib.util
import re
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_entropy.py"


def test_bench_entropy_reports_each_function(capsys):
    spec = importlib.util.spec_from_file_location("bench_entropy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--tokens", "16", "--vocab", "300", "--reps", "2"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\s+(\w+)\s+[\d.]+ ms .*max \|error\| (\S+)$", out, flags=re.M))
    assert set(rows) == {"verl", "verl_chunked", "erc"}
    assert all(float(err) < 1e-5 for err in rows.values())
