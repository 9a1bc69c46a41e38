"""Progress of long loops: a tqdm bar on a terminal, a plain line every few seconds otherwise.

Scripts, CI jobs and ``nohup`` runs have no terminal; a tqdm bar there either vanishes (stderr
redirected) or fills the log with carriage returns. :func:`progress` keeps one interface for both.
"""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_INTERVAL = 5.0


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _plain(iterable: Iterable[T], total: int | None, desc: str, unit: str, stream: TextIO,
           interval: float) -> Iterator[T]:
    t0 = last = time.monotonic()
    done = printed = 0
    head = f"{desc}: " if desc else ""

    def line(now: float) -> str:
        elapsed = now - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        text = f"{head}{done}/{total if total is not None else '?'} {unit}, {rate:.2f} {unit}/s"
        if total is not None and rate > 0:
            text += f", {_duration((total - done) / rate)} left"
        return text + f", {_duration(elapsed)} elapsed"

    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= interval and (total is None or done < total):
            print(line(now), file=stream, flush=True)
            last, printed = now, done
    if done and printed != done:  # close with the final count, so a log shows the loop finished
        print(line(time.monotonic()) + " (done)", file=stream, flush=True)


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it",
             stream: TextIO | None = None, interval: float = PLAIN_INTERVAL,
             enabled: bool = True) -> Iterable[T]:
    """Iterate over ``iterable`` while showing progress on ``stream`` (default: stderr).

    On a terminal this is a ``tqdm`` bar; otherwise a plain line such as
    ``restore: 12/40 slices, 2.10 slices/s, 0:13 left, 0:05 elapsed`` every ``interval`` seconds
    and a last one when the loop ends.

    Parameters
    ----------
    iterable : iterable
        What to loop over; it is consumed lazily.
    total : int, optional
        Number of items (default: ``len(iterable)`` when it has one); gives the time left.
    desc, unit : str
        What is done and what an item is, e.g. ``desc="restore", unit="slices"``.
    stream : text stream, optional
        Where to write (default ``sys.stderr``; stdout stays clean for results).
    interval : float
        Seconds between plain lines.
    enabled : bool
        False returns ``iterable`` unchanged (quiet mode).

    Examples
    --------
    >>> import io
    >>> log = io.StringIO()
    >>> sum(progress(range(4), desc="demo", unit="slices", stream=log))
    6
    >>> log.getvalue().splitlines()[-1].startswith("demo: 4/4 slices")
    True
    """
    if not enabled:
        return iterable
    if total is None:
        try:
            total = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc or None, unit=unit, file=stream, dynamic_ncols=True)
    return _plain(iterable, total, desc, unit, stream, interval)
