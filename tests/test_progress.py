"""medvae.progress: plain progress lines without a terminal, tqdm on one."""
from __future__ import annotations

import io
import re
import time

from medvae.progress import progress


def test_plain_lines_without_a_terminal():
    log = io.StringIO()  # not a tty, like a CI log or nohup
    out = []
    for i in progress(range(6), desc="restore", unit="slices", stream=log, interval=0.05):
        time.sleep(0.03)
        out.append(i)
    assert out == list(range(6))  # the items pass through unchanged, in order
    lines = log.getvalue().splitlines()
    assert 2 <= len(lines) <= 6
    pat = re.compile(r"^restore: (\d)/6 slices, [\d.]+ slices/s(, \d+:\d\d left)?, \d+:\d\d elapsed( \(done\))?$")
    assert all(pat.match(ln) for ln in lines), lines
    assert lines[-1].startswith("restore: 6/6 slices") and lines[-1].endswith("(done)")
    assert "left" in lines[0]  # a known total gives the time left


def test_unknown_total_disabled_and_terminal():
    log = io.StringIO()
    assert list(progress(iter("abc"), desc="x", stream=log, interval=0)) == ["a", "b", "c"]
    assert "3/? it" in log.getvalue() and "left" not in log.getvalue()
    items = [1, 2]
    assert progress(items, enabled=False) is items  # quiet mode: the iterable itself

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    assert list(progress(range(3), desc="bar", stream=tty)) == [0, 1, 2]
    assert "bar" in tty.getvalue() and "\r" in tty.getvalue()  # a tqdm bar, redrawn in place
