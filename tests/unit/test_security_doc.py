"""docs/security.md names, for every threat and every claim, the test that shows it: each named
test must exist, so that the tables cannot drift from the tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
# `tests/x/test_y.py`, `tests/x/test_y.py::test_z`, and `::test_z` of the last file named before it
NAMED = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def named_tests(section: str) -> list[tuple[str, str | None]]:
    """(file, test or None) of every test a section's rows name."""
    found: list[tuple[str, str | None]] = []
    for row in section.splitlines():
        if not row.startswith("|"):
            continue
        last: str | None = None
        for path, name in NAMED.findall(row):
            if path:
                last = path
            if last is not None and (path or name):
                found.append((last, name or None))
    return found


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else len(text)]


def missing(section_text: str) -> list[str]:
    gone = []
    for path, name in named_tests(section_text):
        source = ROOT / path
        if not source.is_file():
            gone.append(path)
        elif name and not re.search(rf"^(async )?def {name}\(", source.read_text(), re.MULTILINE):
            gone.append(f"{path}::{name}")
    return gone


def test_every_row_of_the_threat_model_names_a_test_that_exists():
    rows = [r for r in section("Threat model").splitlines() if r.startswith("| ") and "---" not in r]
    assert len(rows) > 10  # the header and the threats
    assert all("`tests/" in row for row in rows[1:]), "a threat without its test"
    assert missing(section("Threat model")) == []


def test_every_claim_names_a_test_that_exists():
    assert missing(section("Which test shows what")) == []


def test_a_test_that_does_not_exist_is_found():
    row = (
        "| x | `tests/unit/test_security_doc.py::test_no_such_test`, "
        "`::test_a_test_that_does_not_exist_is_found` |"
    )
    assert missing(row) == ["tests/unit/test_security_doc.py::test_no_such_test"]
