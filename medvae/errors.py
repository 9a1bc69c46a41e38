"""User-facing errors.

Anything the user can fix (a bad file, a wrong shape, a mismatched model) is raised as
:class:`MedvaeError`. The CLI prints it as one line and exits with status 2; the Python API lets
it propagate, and because it subclasses ``ValueError`` scripts can catch it the usual way.
"""
from __future__ import annotations

from os import PathLike


class MedvaeError(ValueError):
    """A problem with the user's input, reported as ``"<path>: <problem>"``.

    Parameters
    ----------
    message : str
        What is wrong, in one line.
    path : str or PathLike, optional
        The file or folder concerned. It is put first so the user sees which input failed.
    """

    def __init__(self, message: str, path: str | PathLike | None = None) -> None:
        self.message = " ".join(str(message).split())  # one line, always
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {self.message}" if self.path else self.message)


def os_reason(exc: OSError) -> str:
    """One line for an OSError: its strerror, or the ``[Errno N] reason`` inside a library's re-raised
    message (pydicom wraps a full disk as "With tag (7FE0,0010) got exception: [Errno 28] ...",
    followed by a traceback).

    >>> os_reason(OSError(28, "No space left on device")), os_reason(OSError("x: [Errno 13] Permission denied\\nmore"))
    ('No space left on device', 'Permission denied')
    """
    import re

    if exc.strerror:
        return exc.strerror.strip()
    text = str(exc)
    found = re.search(r"\[Errno \d+\] ([^\n]+)", text)
    return found.group(1).strip() if found else (" ".join(text.splitlines()[:1]) or type(exc).__name__)


def require_flags(**flags: object) -> None:
    """Refuse a yes/no option given anything but a bool: ``blend="no"`` is true, and silently restored
    with the blend the caller turned down (and ``None`` is false).

    >>> require_flags(blend=True, progress=False)
    >>> require_flags(blend="no")
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: blend must be True or False, not 'no'
    """
    import numpy as np

    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise MedvaeError(f"{name} must be True or False, not {value!r}")


def require_seed(seed: object, source: str | PathLike | None = None) -> int:
    """``seed`` as an int: a whole number, also given as a float (``3.0`` is seed 3); ``1.5`` was silently
    seed 1, and a bool is refused.

    >>> require_seed(3.0)
    3
    >>> require_seed(1.5)
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: seed must be a whole number, not 1.5
    """
    import numpy as np

    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return int(seed)
    if isinstance(seed, (float, np.floating)) and float(seed).is_integer():
        return int(seed)
    raise MedvaeError(f"seed must be a whole number, not {seed!r}", source)
