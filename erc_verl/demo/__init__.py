"""The CPU mini-reproduction: the paper's comparison, scaled down to a tiny model, on verl's real trainer.

- ``task`` / ``tiny_world``: a verifiable arithmetic task and a warmed-up 2-layer Qwen2 saved as a Hugging Face
  checkpoint with verl parquet data (``recipe/cpu_tiny.sh`` trains on it).
- ``recipe_run``: the one run launcher (demo, sweep and the end-to-end tests): a command in its own process
  group, followed through verl's file logger and the run identity, stopped with everything it started.
- ``commands``: what the two commands share: their config checks, the ERC band they hand the recipes.
- ``demo`` (``erc-verl demo``): one run per arm, the summary table and the figures.
- ``sweep`` (``erc-verl sweep``): DAPO vs DAPO+ERC over off-policy updates and learning rates, several seeds.
- ``metrics`` / ``plots``: verl's metrics and ERC's token diagnostics in numbers and figures.

May import the algorithm, the seams and the paper tooling; none of them imports it (tests/test_layout.py).
"""
