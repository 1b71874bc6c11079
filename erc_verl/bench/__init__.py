"""Benchmarks of what ERC costs: ``overhead`` (one actor micro-step, DAPO vs ERC vs graph entropy through verl's
real engine) and ``entropy`` (the entropy functions alone); ``gpu_evidence``, the GPU kit's measurements. Thin
command lines in ``scripts/bench_*.py``.

- ``engine_rig``: verl's ``FSDPEngineWithLMHead`` driven on a plain module (the rig the seam tests use too).
- ``fresh``: run a function in a fresh interpreter (own peak memory, own malloc settings), JSON result back.

May import ``erc_verl.algorithm``, ``erc_verl.seams``, ``erc_verl.demo`` (its one tiny-Qwen2 builder) and
``erc_verl.flags``; never the paper tooling (tests/test_layout.py).
"""
