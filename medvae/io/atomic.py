"""Atomic output: write to a temporary sibling, then move it into place.

A reader of ``out`` never sees a half-written file or folder: the data are written to a
hidden temporary sibling (``.NAME.medvae-tmp-XXXX``) in the same folder, which is renamed
onto ``out`` only when everything was written. On any exception the temporary is removed
and nothing is left at ``out``; when ``out`` already existed (``overwrite=True``), the old
one is removed only after the new one is complete.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator, Literal

from medvae.errors import MedvaeError

TMP_MARKER = ".medvae-tmp-"
OLD_MARKER = ".medvae-old-"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, kind: Literal["file", "dir"],
                  overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write to; move it onto ``out`` when the block succeeds.

    Parameters
    ----------
    out : str or PathLike
        The final file or folder. Missing parent folders are created (and removed again if
        the write fails).
    kind : {"file", "dir"}
        ``"file"``: the yielded path is a file path (inside a private temporary folder) with
        the same name as ``out``, so suffixes such as ``.nii.gz`` are kept.
        ``"dir"``: the yielded path is an empty temporary folder to fill.
    overwrite : bool, optional
        Replace an existing ``out``. Without it an existing ``out`` is refused with
        :class:`~medvae.errors.MedvaeError` (an existing *empty* folder counts as free).

    Yields
    ------
    pathlib.Path
        Where to write.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "a.txt", kind="file") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
    """
    out = Path(out)
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    exists = out.exists() or out.is_symlink()
    if exists:
        if kind == "file" and out.is_dir():
            raise MedvaeError("is a folder; give a file path for this output", out)
        if kind == "dir" and not out.is_dir():
            raise MedvaeError("is a file; give a folder path for this output", out)
        if not overwrite and not (kind == "dir" and _is_empty_dir(out)):
            raise MedvaeError("already exists; pass --overwrite (overwrite=True) to replace it", out)

    parent = out.parent if str(out.parent) else Path(".")
    created: list[Path] = []
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
    except OSError as exc:
        raise MedvaeError(f"cannot create the output folder ({exc.strerror or exc})", parent) from exc

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TMP_MARKER}", dir=parent))
    try:
        if kind == "dir":
            os.chmod(tmp, 0o777 & ~_umask())
        target = tmp / out.name if kind == "file" else tmp
        yield target
        if kind == "file":
            if not target.exists():
                raise RuntimeError(f"nothing was written to {target}")
            os.replace(target, out)
            tmp.rmdir()
        elif out.exists():
            old = parent / f".{out.name}{OLD_MARKER}{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
