"""docs/lecture.md stays true: every test it cites exists, every file it names exists and holds the names the page
gives it."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "lecture.md").read_text()


def test_every_cited_test_exists():
    defined = set()
    for f in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", f.read_text(), re.M))
    cited = set(re.findall(r"\b(test_\w+)\b", DOC)) - {t.removesuffix(".py") for t in re.findall(r"test_\w+\.py", DOC)}
    assert cited, "the page cites no tests"
    assert not cited - defined, f"docs/lecture.md cites tests that do not exist: {sorted(cited - defined)}"


def test_every_named_file_and_definition_exists():
    rows = [r for r in DOC.splitlines() if r.startswith("| ") and ".py" in r]
    checked = 0
    for row in rows:
        code = row.split(" | ")[1]
        # "`path.py`: `a`, `b`; `other.py`: `c`" -> each file's names
        for part in re.split(r";\s*", code):
            m = re.search(r"`([\w/]+\.py)`", part)
            if not m:
                continue
            rel = m.group(1)
            matches = [p for p in (ROOT / "src" / "ldmkit").rglob(Path(rel).name) if p.as_posix().endswith(rel)]
            assert matches, f"docs/lecture.md names {rel}, which does not exist under src/ldmkit"
            text = matches[0].read_text()
            for name in re.findall(r"`(\w+)`", part[m.end():]):
                assert re.search(rf"\b{name}\b", text), f"docs/lecture.md: {rel} has no {name!r}"
                checked += bool(re.search(rf"^\s*(def|class) {name}\b|^{name}\s*=", text, re.M))
    assert checked >= 30, f"only {checked} definitions found: the page's format changed?"
