"""erc_verl.bench.entropy (scripts/bench_entropy.py) reports every function with its error (plumbing, not speed)."""

import re

from erc_verl.bench import entropy as bench_entropy


def test_bench_entropy_reports_each_function(capsys):
    bench_entropy.main(["--tokens", "16", "--vocab", "300", "--min-run-time", "0.05"])
    out = capsys.readouterr().out
    rows = dict(re.findall(r"^\s+(\S+(?: \(fwd\+bwd\))?)\s+[\d.]+ ms\s+max \|error\| (\S+)$", out, flags=re.M))
    assert set(rows) == {"verl_log_probs (fwd+bwd)", "verl_log_probs+entropy (fwd+bwd)", "erc_one_pass (fwd+bwd)",
                         "verl", "verl_chunked", "erc"}
    assert all(float(err) < 1e-5 for err in rows.values())


def test_bad_flags_are_usage_errors(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        bench_entropy.main(["--tokens", "0"])
    assert exc.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith("--tokens must be >= 1, got 0")
