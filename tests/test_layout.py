"""The package's import rules (each subpackage's docstring states its own): the algorithm stands alone, the
seams never reach into the paper tooling or the demo, and so on. Parsed from the source, not imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "erc_verl"

# subpackage -> the erc_verl subpackages its modules may import (besides itself and the YAML in erc_verl.configs)
ALLOWED = {
    "algorithm": set(),
    "seams": {"algorithm"},
    "paper": set(),
    "bench": {"algorithm", "seams"},
    "demo": {"algorithm", "seams", "paper"},
}


def erc_verl_imports(path: Path) -> set[str]:
    """The erc_verl subpackages a module imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            names = ["erc_verl.<relative import>"]  # the rules are written in absolute names: refuse these
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] if node.module != "erc_verl" else [f"erc_verl.{a.name}" for a in node.names]
        else:
            continue
        found.update(name.split(".")[1] for name in names if name.startswith("erc_verl."))
    return found


def test_every_module_lives_in_a_known_part():
    top = sorted(p.name for p in PACKAGE.iterdir() if not p.name.startswith(("_", ".")) and p.name != "configs")
    assert top == sorted([*ALLOWED, "cli.py", "main_ppo.py"]), "a new top-level module: put it in one of the parts"


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_follow_the_layering(part):
    violations = {}
    for path in sorted((PACKAGE / part).rglob("*.py")):
        bad = erc_verl_imports(path) - ALLOWED[part] - {part, "configs"}
        if bad:
            violations[str(path.relative_to(PACKAGE))] = sorted(bad)
    assert not violations, f"erc_verl.{part} may import only {sorted(ALLOWED[part])}: {violations}"


def test_the_rule_checker_sees_imports(tmp_path):
    """The checker itself: every import form counts (else the tests above could not fail)."""
    module = tmp_path / "module.py"
    module.write_text("import erc_verl.demo.task\nfrom erc_verl.seams import engine\ndef f():\n"
                      "    from erc_verl import paper\n    from ..bench import overhead\n")
    assert erc_verl_imports(module) == {"demo", "seams", "paper", "<relative import>"}


@pytest.mark.integration
def test_the_built_wheel_holds_every_module(tmp_path):
    """A non-editable install (`pip install erc-verl`) gets every module and the YAML configs."""
    import subprocess
    import sys
    import zipfile

    import shutil

    source = tmp_path / "source"  # a clean copy: setuptools would also pack a stale build/ of the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PACKAGE.parent / name, source / name)
    for name in ("erc_verl", "configs"):
        shutil.copytree(PACKAGE.parent / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True, capture_output=True, timeout=240)
    (wheel,) = tmp_path.glob("erc_verl-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    expected = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    expected |= {f"erc_verl/configs/{p.name}" for p in (PACKAGE.parent / "configs").glob("*.yaml")}
    assert expected - shipped == set()
