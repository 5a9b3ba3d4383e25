"""The repository stands alone: what it cites is in it, and it names no one machine's paths.

Code comments and docs cite the project's own docs/ (design.md, katapult-protocol.md,
testing.md); a citation of a file that is not in the repository, or a path of the machine
the code was written on, is useless to everyone else. Links between the docs must resolve,
down to the heading they point at.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "build", "dist"}

# Built from parts so that this file does not match itself.
OUTSIDE = [
    re.compile(re.escape("/" + "work/")),                      # the build machine's tree
    re.compile(re.escape("shared" + "/reference")),           # notes that never were in the repo
    re.compile(re.escape("../" + "shared")),
    re.compile(r"\b" + "DESIGN" + r"\.md\b"),                  # the design page is docs/design.md
    re.compile(r"/home/(?!pi\b)[a-z_][a-z0-9_-]*/"),           # a home other than the Pi default
    re.compile(r"(?<![\w.~])/" + "root/"),                      # root's home
]


def text_files() -> Iterator[Tuple[Path, str]]:
    """Every text file of the checkout (not the venv, caches or git's own files)."""
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts) or not path.is_file():
            continue
        try:
            yield rel, path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary


def test_nothing_cites_files_outside_the_repository_or_machine_paths() -> None:
    found: List[str] = []
    for rel, text in text_files():
        for number, line in enumerate(text.splitlines(), 1):
            for pattern in OUTSIDE:
                if pattern.search(line):
                    found.append(f"{rel}:{number}: {line.strip()}")
    assert found == []


def test_cited_docs_exist() -> None:
    cited: Dict[str, Set[str]] = {}
    for rel, text in text_files():
        # Ours are lower-case (Klipper's own docs/API_Server.md is cited as Klipper's).
        for name in re.findall(r"\bdocs/([a-z0-9-]+\.md)\b", text):
            cited.setdefault(name, set()).add(str(rel))
    assert {"design.md", "katapult-protocol.md", "testing.md"} <= set(cited)
    missing = {name: sorted(where) for name, where in cited.items() if not (REPO / "docs" / name).is_file()}
    assert missing == {}


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> Set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", markdown, re.M)}


def test_slug_matches_githubs_rule() -> None:
    assert slug("Interfaces (a contract: extend, never rename or drop)") == \
        "interfaces-a-contract-extend-never-rename-or-drop"
    assert slug("`out/klipper.dict` and the image's own dictionary") == \
        "outklipperdict-and-the-images-own-dictionary"


def test_links_between_docs_resolve() -> None:
    broken: List[str] = []
    pages = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target, fragment in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto
            dest = (page.parent / target).resolve() if target else page
            where = f"{page.relative_to(REPO)} -> {target}{'#' + fragment if fragment else ''}"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif fragment and dest.suffix == ".md" and fragment not in anchors(dest.read_text(encoding="utf-8")):
                broken.append(f"{where}: no such heading")
    assert broken == []
