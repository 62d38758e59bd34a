"""Every relative link of the user documentation resolves inside the repository, anchors
included, and every Markdown file the documentation names is in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = sorted(
    {
        REPO / "README.md",
        *(REPO / "docs").glob("*.md"),
        REPO / "slurm" / "README.md",
        REPO / "benchmarks" / "RESULTS.md",
    }
)
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
MD_NAME = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
URL = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


def prose(text: str) -> str:
    """The text without fenced or indented code blocks and without inline code."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    text = "\n".join(line for line in text.splitlines() if not line.startswith("    "))
    return re.sub(r"`[^`\n]*`", "", text)


def anchors(markdown: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", markdown.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative_links(doc: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(doc.read_text()))
        if not re.match(r"[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto:
    ]


def broken(doc: Path, target: str) -> str | None:
    """Why `target`, a relative link in `doc`, does not resolve; None when it does."""
    path_part, _, anchor = target.partition("#")
    path = (doc.parent / path_part).resolve() if path_part else doc
    if REPO not in path.parents and path != REPO:
        return "points outside the repository"
    if not path.exists():
        return "no such file or folder"
    if anchor and path.suffix == ".md" and anchor not in anchors(path):
        return f"no heading with anchor #{anchor}"
    return None


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc):
    assert doc.is_file()
    problems = [f"{t}: {why}" for t in relative_links(doc) if (why := broken(doc, t))]
    assert problems == [], f"{doc.relative_to(REPO)}: " + "; ".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_named_markdown_files_exist(doc):
    """A Markdown file named in the text, linked or not (`seed/notes.md`, DESIGN.md), is one
    a reader of the repository can open: by its path, or by its name somewhere in it."""
    in_repo = {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
    missing = []
    for name in set(MD_NAME.findall(URL.sub("", doc.read_text()))):
        candidates = (doc.parent / name, REPO / name)
        if not any(c.is_file() for c in candidates) and ("/" in name or name not in in_repo):
            missing.append(name)
    assert sorted(missing) == [], doc.relative_to(REPO)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_path_leads_out_of_the_repository(doc):
    """`../something` in a command or in prose means nothing to someone with only the
    repository (the data folder of the machine the docs were written on, say)."""
    outside = [
        path
        for path in re.findall(r"(?<![\w.])\.\./[\w./-]*", doc.read_text())
        if REPO not in (doc.parent / path).resolve().parents
    ]
    assert outside == [], doc.relative_to(REPO)


def test_the_checks_see_the_links():
    """The README's links are found (a regex that matched nothing would pass every doc)."""
    found = relative_links(REPO / "README.md")
    assert {"docs/bad-input.md", "docs/first-run.md", "#tests"} <= set(found)
    readme = REPO / "README.md"
    assert broken(readme, "docs/no-such-page.md") == "no such file or folder"
    assert broken(readme, "#no-such-heading") == "no heading with anchor #no-such-heading"
    assert broken(readme, "../outside.md") == "points outside the repository"
    assert broken(readme, "#recipes-and-results") is None
