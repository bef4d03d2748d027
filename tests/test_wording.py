"""The product speaks of itself only: no word in its code, docs or results about how it was built."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".sh", ".cpp", ".cu", ".h", ".toml", ".cfg", ".txt"}
# "lent" as a word (not silent, excellent, ...), work sessions, numbered or "the" issues
PATTERN = re.compile(r"\blent\b|\bsessions?\b|\bissue (?:\d|that)|\bthe issue\b|\bissue's\b", re.IGNORECASE)


def _product_files():
    for folder in ("rlhf_fast", "csrc", "benchmarks", "tests", "docs"):
        yield from (p for p in (ROOT / folder).rglob("*") if p.suffix in SUFFIXES and p.is_file())
    yield from (ROOT / name for name in ("README.md", "setup.py", "pyproject.toml") if (ROOT / name).is_file())


def test_no_file_speaks_of_how_the_product_was_made():
    found = []
    for path in _product_files():
        if path == Path(__file__):
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            if PATTERN.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not found, "\n".join(found)
