"""erc_verl.seams.ray_address on Ray's real code: the rule ray.init uses to join a cluster or start one."""

from __future__ import annotations

import json

import pytest

from erc_verl.seams.errors import ConfigError
from erc_verl.seams.ray_address import JOB_CONFIG_ENV, cluster_to_join, job_env_vars


@pytest.fixture(autouse=True)
def clean_ray_env(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's temp dir: where `ray start` leaves its address


def test_no_address_and_no_cluster_starts_ray():
    assert cluster_to_join({}) is None
    assert cluster_to_join({"address": "local"}) is None


def test_the_address_ray_start_left_behind_is_joined(tmp_path):
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("head-node:6391\n")
    assert cluster_to_join({}) == "head-node:6391"
    assert cluster_to_join({"address": "local"}) is None  # Ray's way to start a new one anyway


def test_ray_address_and_config_address(monkeypatch):
    assert cluster_to_join({"address": "head-node:6392"}) == "head-node:6392"
    assert cluster_to_join({"address": "ray://127.0.0.1:10001"}) == "ray://127.0.0.1:10001"
    monkeypatch.setenv("RAY_ADDRESS", "head-node:6393")  # what `ray job submit` sets for a job's driver
    assert cluster_to_join({}) == "head-node:6393"


def test_auto_without_a_cluster_is_one_line():
    with pytest.raises(ConfigError, match=r"ray_kwargs.ray_init.address='auto' .* none was found"):
        cluster_to_join({"address": "auto"})


def test_job_env_vars(monkeypatch):
    assert job_env_vars() == {}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {"env_vars": {"A": "1"}}, "metadata": {}}))
    assert job_env_vars() == {"A": "1"}
