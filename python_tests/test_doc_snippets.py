"""Every ```python block of README.md and docs/*.md runs as written.

Each block runs in a fresh namespace, in a scratch folder, with the data cache in the session's.
A block that cannot run in a test (it needs files a clone does not have) is fenced as
```python no-run``` and counted: at most MAX_NO_RUN of them. Interface listings that are not
Python (signatures with `...`, `a|b` choices) are fenced as ```text```, not ```python```.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
MAX_NO_RUN = 1
MIN_SNIPPETS = 5  # README: backend, FastUpdateController; data.md: prepare; design.md: UpdateController; ops.md
HAS_RECBOLE = importlib.util.find_spec("recbole") is not None


def python_blocks():
    blocks = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            words = match["info"].split()
            if words and words[0] == "python":
                line = text.count("\n", 0, match.start()) + 1
                blocks.append((f"{path.relative_to(ROOT)}:{line}", words[1:], match["body"]))
    return blocks


BLOCKS = python_blocks()


def test_python_is_fenced_as_python():
    """A block fenced `py`, `python3`, `pycon`... would escape the runner."""
    odd = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            words = match["info"].split()
            if words and words[0].lower().startswith("py") and words[0] != "python":
                odd.append(f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}: {words[0]}")
    assert not odd, f"fence these as ```python (or ```text for listings that are not code): {odd}"


def test_snippets_are_found_and_exceptions_are_few():
    runnable = [b for b in BLOCKS if "no-run" not in b[1]]
    assert len(runnable) >= MIN_SNIPPETS, [b[0] for b in BLOCKS]
    skipped = [b[0] for b in BLOCKS if "no-run" in b[1]]
    assert len(skipped) <= MAX_NO_RUN, f"too many `python no-run` blocks: {skipped}"
    for where, extra, _ in BLOCKS:
        assert set(extra) <= {"no-run"}, f"{where}: unknown fence option(s) {extra}"


@pytest.mark.parametrize("where,extra,code", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_snippet_runs(where, extra, code, tmp_path, monkeypatch, cache_dir):
    if "no-run" in extra:
        pytest.skip("fenced as `python no-run`")
    if 'prepare("ml100k"' in code and not HAS_RECBOLE:
        pytest.skip("MovieLens-100K comes with recbole (pip install --no-deps recbole==1.2.1)")
    monkeypatch.setenv("S2META_CACHE", cache_dir)  # shared with the data tests: ml100k is prepared once
    monkeypatch.chdir(tmp_path)
    exec(compile(code, where, "exec"), {"__name__": "__doc_snippet__"})
