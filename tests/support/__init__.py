"""What the tests share (test scaffolding, kept out of the wheel), one module per kind, imported by name so that a
test pays only for what it uses:

- ``objects``: a random-weight tiny Qwen2 and verl-format PPO update batches.
- ``wheel``: erc_verl's wheel, built from a clean copy of the checkout.
"""
