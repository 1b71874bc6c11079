"""scripts/gpu_evidence.sh, the GPU evidence kit, rehearsed on CPU.

``test_kit_runs_in_the_gpu_layout`` runs ``gpu_evidence.sh run --device cpu`` (tiny shape) the way the GPU machine
will run ``run --device cuda``, in an interpreter built to see what that machine has and nothing else:

  real  a bare venv (``python -m venv --without-pip``: the standard library only; none of this venv's packages, so no
        Ray, no TransferQueue, no verl, no vLLM), whose site-packages holds links to this venv's copies of the
        distributions the GPU image lists (scripts/gpu_kit/gpu_image_packages.txt); erc_verl from its wheel, installed
        by the kit's own ``pip install --no-deps --target`` step into a separate folder on PYTHONPATH, as there; the
        kit's rule for Ray (no ray importable -> scripts/gpu_kit/ray_stub), its worker subprocesses, its files.
  not   Python 3.11 (there 3.12.3), torch 2.13.0+cpu (there 2.11.0+cu130), transformers 5.10.4 (there 5.17.0);
        the carried third-party packages (scripts/gpu_kit/carry.txt) are this venv's installs of the same pinned
        versions, linked into the target folder, not installed from the cp312 wheels ``prepare`` downloads (that
        needs the network and a 3.12 interpreter); the CUDA code paths (compiled entropy, cuda memory counters).

``test_what_travels_fits`` bounds the size without the network: erc_verl's wheel (built) + every file the carried
distributions installed here (uncompressed, plus a zip header per file: more than their wheels) + the working tree.
"""

import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.wheel import build_wheel

ROOT = Path(__file__).resolve().parents[2]
KIT = ROOT / "scripts" / "gpu_kit"
SCRIPT = ROOT / "scripts" / "gpu_evidence.sh"
LIMIT = 64 << 20
VARIANTS = ("dapo", "erc", "graph_entropy")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def names(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def carried() -> dict[str, str]:
    return dict(norm_pin(line) for line in names(KIT / "carry.txt"))


def norm_pin(line: str) -> tuple[str, str]:
    name, version = line.split("==")
    return norm(name), version


def distribution_tops(dist) -> set[str]:
    """Top-level entries (packages, modules, .dist-info) a distribution installed, from its RECORD."""
    tops = set()
    for f in dist.files or []:
        parts = Path(f).parts
        if parts and parts[0] != ".." and not parts[0].endswith(".pth") and parts[0] != "__pycache__":
            tops.add(parts[0])
    return tops


def link_distributions(wanted: set[str], dest: Path) -> dict[str, str]:
    """Link this venv's installed copies of the ``wanted`` distributions into ``dest``; returns name -> version."""
    linked = {}
    for dist in md.distributions():
        name = norm(dist.metadata["Name"])
        if name not in wanted or name in linked:
            continue
        for top in distribution_tops(dist):
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)
        linked[name] = dist.version
    return linked


@pytest.fixture(scope="module")
def erc_wheel(tmp_path_factory):
    """erc_verl's wheel, built from a clean copy as ``prepare`` builds it."""
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_carry_list_pins_what_the_cpu_stack_pins():
    """The kit carries the versions CI tests (requirements/cpu.txt), and neither Ray nor anything the GPU image has."""
    pinned = dict(norm_pin(line) for line in names(ROOT / "requirements" / "cpu.txt") if "==" in line)
    image = {norm(n) for n in names(KIT / "gpu_image_packages.txt")}
    for name, version in carried().items():
        assert pinned.get(name) == version, f"carry.txt {name}=={version}, requirements/cpu.txt {pinned.get(name)}"
        assert name not in image, f"{name} is in the GPU image already"
    assert "ray" not in carried() and "transferqueue" not in carried()
    assert {"torch", "transformers", "numpy", "accelerate", "peft", "pandas", "pyarrow"} <= image


def test_ray_stub_imports_and_fails_on_use(tmp_path):
    log = tmp_path / "uses"
    code = ("import ray, dataclasses\n"
            "@dataclasses.dataclass\nclass F:\n    futures: list[ray.ObjectRef]\n"  # verl/protocol.py's annotation
            "assert ray.IS_KIT_STUB and ray.ACCESSED == []\n"
            "try:\n    ray.init()\nexcept RuntimeError as e:\n    print('raised:', e)\n"
            "try:\n    ray.remote\nexcept RuntimeError:\n    pass\n"
            "assert ray.ACCESSED == ['init', 'remote'], ray.ACCESSED\n")
    env = dict(os.environ, PYTHONPATH=str(KIT / "ray_stub"), ERC_KIT_RAY_STUB_LOG=str(log))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "raised: ray.init was used" in proc.stdout
    assert log.read_text().split() == ["init", "remote"]


@pytest.mark.integration
@pytest.mark.timeout(600)  # ~70 s on 2 idle cores; 250 s seen with the cores shared (load average 12)
def test_kit_runs_in_the_gpu_layout(tmp_path, erc_wheel):
    # the interpreter: standard library + the GPU image's packages (linked), nothing else
    venv = tmp_path / "gpu_like"
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", "--without-pip", str(venv)],
                   check=True, timeout=120)
    python = venv / "bin" / "python"
    site_packages = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        capture_output=True, text=True, check=True).stdout.strip())
    image = {norm(n) for n in names(KIT / "gpu_image_packages.txt")}
    linked = link_distributions(image, site_packages)
    assert {"torch", "transformers", "numpy"} <= set(linked)
    probe = ("import importlib.util as u; print([n for n in ('ray', 'verl', 'transfer_queue', 'vllm', 'tensordict', "
             "'erc_verl', 'torch') if u.find_spec(n)])")
    seen = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout
    assert seen.strip() == "['torch']", seen  # the real Ray, verl, TransferQueue, ... are out of reach

    # the kit's --target folder: the carried packages (same pins, linked) + erc_verl, installed there by the kit
    site = tmp_path / "kit_site"
    site.mkdir()
    carry = carried()
    versions = link_distributions(set(carry), site)
    assert versions == carry, "this venv's carried packages differ from scripts/gpu_kit/carry.txt"
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / erc_wheel.name).symlink_to(erc_wheel)

    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHON=str(python), PIP=f"{sys.executable} -m pip")
    proc = subprocess.run(["bash", str(SCRIPT), "run", "--device", "cpu", "--out", str(out), "--wheels", str(wheels),
                           "--site", str(site)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "no ray importable: the import-only stub" in proc.stdout

    evidence = json.loads((out / "evidence.json").read_text())
    assert evidence["pass"] is True
    ray = evidence["ray"]
    assert ray["stub"] and ray["origin"].startswith(str(KIT / "ray_stub")) and ray["uses"] == []
    assert evidence["versions"]["erc_verl_file"].startswith(str(site))  # the wheel's copy, not the checkout
    assert evidence["versions"]["verl_file"].startswith(str(site))

    check = json.loads((out / "check.json").read_text())
    assert check["pass"] and set(check["runs"]) == {"float32", "bfloat16"}
    for run in check["runs"].values():
        assert all(run["criteria"].values())
        assert run["metrics"]["actor/erc_clipfrac"]["device"] == pytest.approx(run["expected_erc_clipfrac"])
        assert 0 < run["expected_erc_clipfrac"] < 1

    bench = json.loads((out / "overhead.json").read_text())
    assert set(bench["variants"]) == set(VARIANTS)
    for name in VARIANTS:
        v = bench["variants"][name]
        assert v["median_wall_s"] > 0 and v["peak_mem_bytes"] > 0
    assert evidence["bench"]["ok"] and evidence["bench"]["time_ratio_erc"] == bench["time_ratio_erc"]

    table = (out / "evidence.md").read_text()
    for row in ("| dapo |", "| erc (plugin) |", "| graph_entropy |", "| float32 |", "| bfloat16 |"):
        assert row in table and row in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "evidence.json", "evidence.md", "overhead.json",
                                                     "run.log"]  # the device tool returns at most 8 files


@pytest.mark.integration
def test_what_travels_fits(erc_wheel):
    carry = carried()
    bound = erc_wheel.stat().st_size
    for dist in md.distributions():
        if norm(dist.metadata["Name"]) in carry:
            files = [Path(dist.locate_file(f)) for f in dist.files or []]
            bound += sum(f.stat().st_size + 200 for f in files if f.is_file() and "__pycache__" not in f.parts)
    listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True).stdout.split(b"\0")
    tree = sum((ROOT / os.fsdecode(p)).stat().st_size for p in listed if p and (ROOT / os.fsdecode(p)).is_file())
    assert bound + tree < LIMIT, f"wheels <= {bound} B + working tree {tree} B >= 64 MiB"
    assert bound < 16 << 20  # ~3.5 MB of wheels measured by `prepare`; this bound is looser (uncompressed)
