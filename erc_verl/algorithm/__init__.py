"""The ERC algorithm: what the paper defines, independent of how verl runs it.

- ``gate``: the rule itself (entropy ratio, keep mask, gated log-probability): read this first.
- ``losses``: the policy losses registered in verl's registry (``gppo``, ``grpo_erc``, ``gppo_erc``, ``erc+X``).
- ``entropy``: the current policy's entropy, read without an autograd graph.
- ``config``: actor config dataclasses that carry ``entropy_mask_low/high`` through verl's config conversion.

Imports torch and verl's public registries and config classes; never ``erc_verl.seams``, ``.paper`` or ``.demo``
(tests/test_layout.py checks).
"""
