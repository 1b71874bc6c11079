"""erc_verl's wheel, built as a user's ``pip install`` (and the GPU kit's ``prepare``) builds it."""

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def package_folders() -> dict[str, str]:
    """Top-level folders that install as packages of their own (pyproject's package-dir), e.g. configs/."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-dir", {})


def build_wheel(dest: Path) -> Path:
    """Build from a clean copy (setuptools would also pack a stale build/ of the checkout); the wheel's path."""
    source = dest / "source"
    source.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("erc_verl", *package_folders().values()):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dest / "dist"), str(source)], check=True, capture_output=True, timeout=240)
    (wheel,) = (dest / "dist").glob("erc_verl-*.whl")
    return wheel
