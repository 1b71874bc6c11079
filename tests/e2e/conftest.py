"""Fixtures for the end-to-end tests (the harness itself is e2e_harness.py)."""

import pytest


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """The warmed-up tiny Qwen2 and arithmetic data, written once for every run."""
    from erc_verl.demo.tiny_world import write_tiny_world

    return write_tiny_world(str(tmp_path_factory.mktemp("tiny_world")))
