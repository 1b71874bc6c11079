"""Benchmarks of what ERC costs: ``overhead`` (one actor micro-step, DAPO vs ERC vs graph entropy through verl's
real engine) and ``entropy`` (the entropy functions alone). Thin command lines in ``scripts/bench_*.py``.

May import ``erc_verl.algorithm`` and ``erc_verl.seams``; never the paper tooling or the demo.
"""
