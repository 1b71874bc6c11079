"""README.md and docs/*.md: every relative link (and image) points at a file of the repository, and every
``#anchor`` at a heading of its target, so moving text between the docs cannot leave a dead link behind."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.DOTALL | re.MULTILINE)


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = _FENCE.sub("", path.read_text())
    headings = re.findall(r"^#+\s+(.*?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def relative_links(path: Path) -> list[str]:
    text = _FENCE.sub("", path.read_text())
    return [link for link in _LINK.findall(text) if not re.match(r"[a-z][a-z0-9+.-]*:", link)]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    links = relative_links(doc)
    dead = []
    for link in links:
        target, _, anchor = link.partition("#")
        file = (doc.parent / target).resolve() if target else doc
        if not file.is_file():
            dead.append(link)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            dead.append(link)
    assert not dead, f"{doc.relative_to(REPO)}: dead links {dead}"


def test_every_doc_is_linked_from_the_readme():
    linked = {(REPO / link.partition("#")[0]).resolve() for link in relative_links(REPO / "README.md")}
    assert not [d.name for d in DOCS[1:] if d not in linked]


def test_the_readme_is_the_verl_users_path_first():
    """Under 16 KB, in the order a verl user needs it: the two commands (CI runs them), ERC in one's own verl run,
    recipes and cluster, keys, metrics, then the links to docs/."""
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) < 16 * 1024
    sections = re.findall(r"^## (.*)$", _FENCE.sub("", readme), flags=re.MULTILINE)
    assert sections == ["Two commands on a fresh machine", "ERC in your own verl run", "The recipes and the cluster",
                        "Config keys (`actor_rollout_ref.actor.*`)", "Metrics", "More"]
