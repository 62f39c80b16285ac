"""Every relative link and backticked repository path in the README and docs/ names a file that
exists, so that renaming a config, result or module cannot leave the docs pointing at nothing."""
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "assets" / "README.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
# A backticked path under one of the repository's own top-level folders, e.g. `configs/compare/x.yaml`.
PATH = re.compile(r"`((?:configs|docs|bench|scripts|pipeline|tests|slurm|launch)/[A-Za-z0-9_./-]+\.[a-z]+)`")


def _targets(doc: Path):
    text = doc.read_text()
    for link in LINK.findall(text):
        if not re.match(r"[a-z]+:|#", link):
            yield link.split("#")[0], doc.parent / link.split("#")[0]
    for path in PATH.findall(text):
        yield path, REPO / path


@pytest.mark.parametrize("doc", [d for d in DOCS if d.is_file()], ids=lambda d: str(d.relative_to(REPO)))
def test_links_and_paths_in_docs_exist(doc):
    missing = sorted({name for name, target in _targets(doc) if not target.exists()})
    assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"
