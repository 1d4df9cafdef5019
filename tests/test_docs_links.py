"""Every relative link in the README and the docs reaches a file of the repository, and every
`#anchor` a heading (or an `<a name>`) of the page it names, as GitHub renders them: a user who
follows a link lands where the text said."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "benchmarks").glob("**/*.md")),
]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*)")
NAMED = re.compile(r'<a name="([^"]+)"')


def _prose(text: str) -> list[tuple[int, str]]:
    """The page's lines outside fenced code blocks, numbered from 1."""
    lines, fenced = [], False
    for number, line in enumerate(text.split("\n"), 1):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append((number, line))
    return lines


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: link texts and code marks kept as text, then
    lower case, every character but letters, digits, `-`, `_` and spaces dropped, spaces `-`."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    """The anchors a page has: its headings' (the n-th repeat of one gets `-n`) and `<a name>`s."""
    text = page.read_text(encoding="utf-8")
    found = set(NAMED.findall(text))
    seen: dict[str, int] = {}
    for _, line in _prose(text):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(1))
            repeat = seen.get(base, 0)
            seen[base] = repeat + 1
            found.add(base if repeat == 0 else f"{base}-{repeat}")
    return frozenset(found)


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """`page`'s links that lead nowhere, each as `file:line: link (why)`, the file named from
    `root`."""
    bad = []
    for number, line in _prose(page.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            path, _, fragment = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(root)}:{number}: {target}"
            if not dest.exists():
                bad.append(f"{where} (no such file)")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
                bad.append(f"{where} (no such anchor)")
    return bad


def test_the_slug_follows_githubs_rules() -> None:
    assert slug("Where a typing event's CPU goes") == "where-a-typing-events-cpu-goes"
    assert slug("Several processes (`--processes`)") == "several-processes---processes"
    assert slug("[The engine](x.md), rebuilt") == "the-engine-rebuilt"


def test_a_broken_link_and_anchor_are_named(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](#top) [gone](#nowhere) [file](missing.md)\n")
    assert broken_links(page, tmp_path) == [
        "page.md:3: #nowhere (no such anchor)",
        "page.md:3: missing.md (no such file)",
    ]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_leads_somewhere(page: Path) -> None:
    assert broken_links(page) == []
