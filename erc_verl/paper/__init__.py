"""The paper's math setting, usable with or without ERC.

- ``data``: DAPO-Math-17k and the evaluation sets as verl parquet (``scripts/prepare_data.py``).
- ``reward``: the math-verify reward, ``reward.custom_reward_function.path=pkg://erc_verl.paper.reward``.
- ``evaluation``: avg@k / pass@k scoring of generated answers (``scripts/evaluate.py``).
- ``generation``: sampling the answers with vLLM.

Imports nothing else from erc_verl (tests/test_layout.py checks).
"""
