"""The README is the user's guide: short, with its two copy-paste commands, and links to the docs that hold
the rest (the generated benchmark table is checked in test_bench.py, the cluster commands in
test_cluster_yaml.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

QUICKSTART = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
              'pip install -e ".[text]" && llmrec-dist quickstart')
TESTS = ('python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && '
         'pip install -e ".[test]" && python -m pytest')


def test_readme_is_short():
    assert len(README.splitlines()) <= 260, "the lab notebook belongs in docs/, not in the README"


@pytest.mark.parametrize("command", [QUICKSTART, TESTS], ids=["quickstart", "tests"])
def test_readme_keeps_the_two_commands_as_copyable_lines(command):
    assert f"```bash\n{command}\n```" in README


@pytest.mark.parametrize("doc", ["docs/benchmarks.md", "docs/cluster.md", "docs/reference.md"])
def test_readme_links_docs_that_exist(doc):
    assert f"]({doc})" in README
    assert (ROOT / doc).is_file()


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown page (headings inside code blocks do not count)."""
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_relative_links_in_readme_and_docs_resolve():
    """Every relative link resolves, anchors included; docs/language-model.md may still be in the making."""
    pending = {ROOT / "docs" / "language-model.md"}
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", page.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            path = (page.parent / target).resolve() if target else page
            if path in pending and not path.exists():
                continue
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"
            if anchor:
                assert anchor in _anchors(path), f"{page.relative_to(ROOT)}: no heading for {target}#{anchor}"
