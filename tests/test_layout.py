"""The package's import rules (each subpackage's docstring states its own): the algorithm stands alone, the
seams never reach into the paper tooling or the demo, and so on. Parsed from the source, not imported."""

import ast
import tomllib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "erc_verl"

# subpackage -> the erc_verl subpackages its modules may import (besides itself and the YAML in erc_verl.configs)
ALLOWED = {
    "algorithm": set(),
    "seams": {"algorithm"},
    "paper": set(),
    "bench": {"algorithm", "seams", "demo", "flags"},  # demo: the one tiny-Qwen2 builder (demo.task.tiny_qwen2)
    "demo": {"algorithm", "seams", "paper", "flags"},
}
# top-level modules besides the parts: the entry points and erc_verl.flags (config dataclass -> argparse flags)
TOP_LEVEL = ("cli.py", "main_ppo.py", "flags.py")


SCAFFOLDING_MODULES = ("pytest", "unittest.mock", "_pytest")


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
    assert top == sorted([*ALLOWED, *TOP_LEVEL]), "a new top-level module: put it in one of the parts"


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


def scaffolding_reasons(path: str, source: str) -> list[str]:
    """Why a shipped module looks like test scaffolding: its name (testing, conftest, test_*) or a test-only import."""
    name = path.rsplit("/", 1)[-1]
    reasons = [f"named {name}"] if name in ("testing.py", "conftest.py") or name.startswith("test_") else []
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        reasons += [f"imports {n}" for n in names if any(n == m or n.startswith(f"{m}.") for m in SCAFFOLDING_MODULES)]
    return reasons


def test_the_scaffolding_check_sees_test_code():
    """The wheel's scaffolding check itself (the shape of the erc_verl/seams/testing.py it once shipped)."""
    assert scaffolding_reasons("erc_verl/seams/testing.py", "from unittest import mock\n") == [
        "named testing.py", "imports unittest.mock"]
    assert scaffolding_reasons("erc_verl/bench/x.py", "def f():\n    import pytest\n") == ["imports pytest"]
    assert scaffolding_reasons("erc_verl/x.py", "import unittest.mock as m\nfrom _pytest import fixtures\n") == [
        "imports unittest.mock", "imports _pytest", "imports _pytest.fixtures"]
    assert scaffolding_reasons("erc_verl/demo/test_x.py", "import unittest\nimport torch.testing\n") == [
        "named test_x.py"]


@pytest.mark.integration
def test_the_built_wheel_holds_every_module(tmp_path):
    """A non-editable install (`pip install erc-verl`) gets every module and the YAML configs, and no test
    scaffolding (that lives under tests/)."""
    import zipfile

    from support.wheel import build_wheel, package_folders

    wheel = build_wheel(tmp_path)
    archive = zipfile.ZipFile(wheel)
    shipped = set(archive.namelist())
    expected = {str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}
    data = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"].get("package-data", {})
    for package, folder in package_folders().items():  # e.g. configs/ installs as erc_verl.configs
        for pattern in ("*.py", *data.get(package, [])):
            expected |= {f"{package.replace('.', '/')}/{p.name}" for p in (PACKAGE.parent / folder).glob(pattern)}
    assert expected - shipped == set()
    scaffolding = {name: scaffolding_reasons(name, archive.read(name).decode())
                   for name in sorted(shipped) if name.endswith(".py")}
    assert {name: why for name, why in scaffolding.items() if why} == {}
