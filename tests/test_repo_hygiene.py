"""The tracked tree speaks of the project alone: no absolute path of a build machine, no diary of its making."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r"(?<![\w.~])/(work|root|home|tmp|Users|mnt|scratch)/")  # paths of some machine
DIARY = re.compile(r"\bsessions?\b|\bround \d+ of\b|\btried and dropped\b", re.IGNORECASE)  # the work's history


def tracked_text_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, timeout=60)
    except OSError:
        pytest.skip("git is not available")
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    files = []
    for name in out.stdout.splitlines():
        p = ROOT / name
        if name.startswith("tests/") or not p.is_file() or p.suffix in (".png", ".safetensors", ".jpg"):
            continue
        files.append(p)
    return files


@pytest.mark.parametrize("pattern", [ABSOLUTE, DIARY], ids=["absolute-paths", "diary"])
def test_tracked_files_hold_no_machine_paths_or_diary(pattern):
    hits = []
    for p in tracked_text_files():
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{p.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits[:20])


def test_the_patterns_catch_what_they_are_for():
    assert ABSOLUTE.search('"pipeline": "/work/runs/p13a"') and ABSOLUTE.search("see /tmp/x.json")
    assert not ABSOLUTE.search("usr/share/datasets/fashion-mnist") and not ABSOLUTE.search("runs/demo/report.html")
    assert DIARY.search("measured in session 14") and not DIARY.search("a SessionToken")
