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
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
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


def test_the_rule_checker_sees_imports():
    """The checker itself: every import form counts (else the tests above could not fail)."""
    import tempfile

    source = "import erc_verl.demo.task\nfrom erc_verl.seams import engine\ndef f():\n    from erc_verl import paper\n"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    assert erc_verl_imports(Path(f.name)) == {"demo", "seams", "paper"}
