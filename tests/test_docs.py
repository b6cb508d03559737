"""The documentation stands on its own: every file it points at is in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
_PATH = re.compile(r"`((?:\.\./|[\w.-]+/)[\w./-]*\.\w+)`")  # `dir/file.ext`: a path, not a bare file name
# a design document outside the repository that older docs cited (the name is split so this file passes)
_OUTSIDE = "design" + ".md"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_linked_file_exists(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    missing = []
    for target in _LINK.findall(text) + _PATH.findall(text):
        if "://" in target:
            continue
        found = [p.resolve() for p in (doc.parent / target, REPO / target) if p.exists()]
        if not any(p.is_relative_to(REPO) for p in found):  # a file beside the checkout is not in it
            missing.append(target)
    assert missing == []


def test_no_file_cites_the_design_document_from_outside() -> None:
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    citing = []
    for name in files:
        path = REPO / name
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if _OUTSIDE in text.lower():
            citing.append(name)
    assert citing == []
