"""erc_verl.bench.entropy (scripts/bench_entropy.py) reports every entropy function with its error (plumbing, not speed)."""

import re

from erc_verl.bench import entropy as bench_entropy


def test_bench_entropy_reports_each_function(capsys):
    bench_entropy.main(["--tokens", "16", "--vocab", "300", "--reps", "2"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\s+(\w+)\s+[\d.]+ ms .*max \|error\| (\S+)$", out, flags=re.M))
    assert set(rows) == {"verl", "verl_chunked", "erc"}
    assert all(float(err) < 1e-5 for err in rows.values())
