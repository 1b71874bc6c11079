"""The paper's math setting, usable with or without ERC.

- ``data``: the training set (KlearReasoner-MathSub-30K, as the authors' scripts use) and the six evaluation
  sets as verl parquet (``scripts/prepare_data.py``).
- ``reward``: the math-verify reward in verl's dict format, with a hard per-call time limit
  (``reward.custom_reward_function.path=pkg://erc_verl.paper.reward``); ``_checker.py`` is its helper process.
- ``evaluation``: avg@k per benchmark with its spread over the k samples, and pass@k, scored from saved
  generations, as the paper's Table 1 (``scripts/evaluate.py score``).
- ``generation``: sampling the answers with verl's own rollout, a validation-only run per benchmark on every
  GPU of the Ray cluster (``scripts/evaluate.py generate``).

Imports nothing else from erc_verl (tests/test_layout.py checks).
"""
