"""Claimed, atomic outputs: one writer per output, only medvae's own outputs replaced, no partial
output where other tools look.

Every output medvae writes goes through :func:`claim_output` (or :func:`atomic_output`, which
claims and writes in one step):

1. **One writer.** The claim is an exclusive ``flock`` on ``.NAME.medvae-lock`` beside the output,
   taken before any work starts. A second writer gets a one-line :class:`MedvaeError` at once.
   The kernel drops the lock when its process dies, so a killed run never leaves a stale claim.
2. **Only our own outputs are replaced.** Without ``overwrite`` an existing output is refused.
   With it, a folder is replaced only when it holds exactly the files listed in the
   ``.medvae-output.json`` marker that medvae writes into every folder output (and passes the
   caller's ``owned`` check, e.g. every DICOM file of the derived series); a file only when the
   caller's ``owned`` check says medvae wrote it. Anything else is refused and nothing is deleted.
3. **No partial output.** Data are written into a staging folder *outside* the output's folder:
   the system temporary folder when it is on the same filesystem (so the final rename is atomic),
   else a hidden sibling ``.NAME.medvae-partial-XXXX``. Every staging folder holds a
   ``.medvae-staging`` marker, and the next claim of the same output removes the staging
   folders a killed run left behind (only those: nothing medvae did not create is deleted); a
   previous output a killed run had moved into one (between its two renames) is put back first.
4. **Together or not at all** (:func:`all_or_none`): outputs of one command (a scan and its mask)
   are rolled back together on an exception or Ctrl-C/SIGTERM, and the outputs they replaced
   (``overwrite``) are put back.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from medvae.errors import MedvaeError
from medvae.runtime import signals_recorded

Kind = Literal["file", "dir"]
#: ``owned(path, marker) -> None``: raise MedvaeError when ``path`` is not medvae's own output
#: (``marker`` is the folder's ``.medvae-output.json`` content, or None for a file)
Owned = Callable[[Path, "dict[str, Any] | None"], None]
#: ``finalize(staged_path) -> dict | None``: last step before the rename; its dict goes into the
#: folder marker
Finalize = Callable[[Path], "dict[str, Any] | None"]

LOCK_SUFFIX = ".medvae-lock"
PARTIAL_MARKER = ".medvae-partial-"
STAGING_PREFIX = "medvae-staging-"
STAGING_FILE = ".medvae-staging"
OUTPUT_MARKER = ".medvae-output.json"
REPLACED = ".replaced"  # in a staging folder: the previous output while the new one is renamed in
KEPT = "kept"           # in a staging folder of all_or_none: the previous output, kept until all are written
_LEGACY_MARKERS = (".medvae-tmp-", ".medvae-old-")  # staging names of medvae 0.1

_HELD: dict[str, "OutputClaim"] = {}
_HELD_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask (read by setting it, and put back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _key(out: Path) -> str:
    # the absolute path: a rerun from another working folder finds the stale staging too
    return hashlib.sha1(os.path.abspath(out).encode()).hexdigest()[:16]


def is_staging_path(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` lies in one of medvae's staging folders (an error naming it should name the output).

    >>> is_staging_path("/tmp/medvae-staging-ab12-x/o.nii.gz"), is_staging_path("out/o.nii.gz")
    (True, False)
    """
    text = str(path or "")
    return STAGING_PREFIX in text or PARTIAL_MARKER in text


def _new_stage(out: Path) -> Path:
    """A new, marked staging folder for ``out`` (removed by the next claim if this process dies)."""
    parent = out.parent if str(out.parent) else Path(".")
    root = _staging_root(parent)
    if root is not None:
        stage = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_key(out)}-", dir=root))
    else:  # another filesystem: a hidden, marked sibling (still never a valid series)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}{PARTIAL_MARKER}", dir=parent))
    try:
        (stage / STAGING_FILE).write_text("medvae staging folder; safe to delete when no medvae runs\n")
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for a few renames; they act (as usual) when the block ends.

    Only the main thread can set handlers; elsewhere the block runs unshielded.
    """
    caught: list[int] = []
    old: dict = {}
    try:
        with signals_recorded(signal.SIGINT, signal.SIGTERM) as (caught, old):
            yield
    finally:  # the handlers are back: the first signal acts now
        for signum in caught[:1]:
            h = old[signum]
            if callable(h):
                h(signum, None)
            elif h == signal.SIG_DFL:
                signal.raise_signal(signum)


def _staging_root(parent: Path) -> Path | None:
    """The system temporary folder when it shares ``parent``'s filesystem (atomic rename), else None."""
    root = Path(tempfile.gettempdir())
    try:
        same_fs = root.stat().st_dev == parent.stat().st_dev
    except OSError:
        return None
    return root if same_fs and os.access(root, os.W_OK | os.X_OK) else None


def _files_under(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def read_marker(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The ``.medvae-output.json`` marker of a folder medvae wrote, or None."""
    try:
        data = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), list) else None


def _check_ours(out: Path, kind: Kind, owned: Owned | None) -> None:
    """Raise unless ``out`` is an output medvae wrote (and may therefore replace)."""
    if kind == "file":
        if owned is None:
            return
        owned(out, None)
        return
    marker = read_marker(out)
    if marker is None:
        raise MedvaeError(f"refusing to replace a folder medvae did not write (no {OUTPUT_MARKER} "
                          "marker); remove it yourself or choose another output", out)
    foreign = sorted(_files_under(out) - set(marker["files"]) - {OUTPUT_MARKER})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MedvaeError(f"refusing to replace: the folder holds files medvae did not write ({shown})", out)
    if owned is not None:
        owned(out, marker)


def _remove_stale(out: Path, parent: Path) -> None:
    """Remove staging folders a killed run left for this output (we hold its lock)."""
    stale = [d for d in parent.glob(f".{out.name}{PARTIAL_MARKER}*") if (d / STAGING_FILE).is_file()]
    stale += [d for m in _LEGACY_MARKERS for d in parent.glob(f".{out.name}{m}*") if d.is_dir()]
    root = _staging_root(parent)
    if root is not None:
        stale += [d for d in root.glob(f"{STAGING_PREFIX}{_key(out)}-*") if (d / STAGING_FILE).is_file()]
    for d in stale:
        # a run killed between its two renames, or inside all_or_none, left the previous output
        # here and none at ``out``: put it back rather than delete it
        for name in (REPLACED, KEPT):
            if (d / STAGING_FILE).is_file() and (d / name).exists() and not (out.exists() or out.is_symlink()):
                with contextlib.suppress(OSError):
                    os.rename(d / name, out)
        shutil.rmtree(d, ignore_errors=True)


def clear_stale(out: str | os.PathLike) -> None:
    """Remove the staging folders a killed run left for ``out``, unless a process is writing it now.

    A claim does this too; this is for an output that is not claimed again: a batch skips an output
    that is complete, and a run killed while it replaced that output (``--overwrite``) left a staging
    folder that may hold the previous version's files, patient data included.
    """
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return
    with contextlib.suppress(MedvaeError), exclusive(out):  # another process holding it: its staging is in use
        _remove_stale(out, parent)


@dataclass
class OutputClaim:
    """An output this process holds the lock of; write it with :meth:`writing`."""

    out: Path
    kind: Kind
    overwrite: bool
    owned: Owned | None = None
    _fd: int | None = field(default=None, repr=False)
    _depth: int = field(default=0, repr=False)

    @contextlib.contextmanager
    def writing(self, *, finalize: Finalize | None = None,
                record: dict[str, Any] | None = None) -> Iterator[Path]:
        """Yield a staging path; move it onto the output when the block succeeds.

        ``kind="file"``: a file path with the output's name (suffixes such as ``.nii.gz`` kept).
        ``kind="dir"``: an empty folder to fill; the marker (``record`` plus ``finalize``'s dict
        and the list of files) is added before the rename. On any exception the staging folder is
        removed and the output is untouched.
        """
        out = self.out
        stage = _new_stage(out)
        try:
            target = stage / out.name
            if self.kind == "dir":
                target.mkdir(mode=0o777 & ~current_umask())
            yield target
            if not target.exists():
                raise RuntimeError(f"nothing was written to {target}")
            extra = finalize(target) if finalize is not None else None
            if self.kind == "file":
                os.replace(target, out)
            else:
                files = sorted(_files_under(target))
                marker = {"medvae": _version(), **(record or {}), **(extra or {}), "files": files}
                (target / OUTPUT_MARKER).write_text(json.dumps(marker, indent=1))
                with _signals_deferred():  # never left between the two renames by Ctrl-C / SIGTERM
                    if out.exists():  # an empty folder, or our own previous output (checked at claim)
                        old = stage / REPLACED
                        os.rename(out, old)
                        # checked again once it is ours alone: another command may have written into
                        # it since the claim (a restore into a report folder lost its file here)
                        marker = read_marker(old) or {"files": []}
                        foreign = sorted(_files_under(old) - set(marker["files"]) - {OUTPUT_MARKER})
                        if foreign:
                            os.rename(old, out)
                            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                                              else "")
                            raise MedvaeError(f"files were written into this folder while medvae wrote it "
                                              f"({shown}); nothing was replaced", out)
                        try:
                            os.rename(target, out)
                        except BaseException:
                            os.rename(old, out)
                            raise
                    else:
                        os.rename(target, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)


def _version() -> str:
    from medvae import __version__

    return __version__


def _lock(out: Path, parent: Path) -> int:
    lock = parent / f".{out.name}{LOCK_SUFFIX}"
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise MedvaeError(f"cannot write in the output folder ({exc.strerror or exc})", parent) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise MedvaeError("another medvae process is writing this output now; wait for it to "
                                  "finish or choose another output", out) from None
            raise
        try:  # the lock file may have been removed by the previous holder after we opened it
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise MedvaeError("could not lock the output (its lock file keeps changing)", out)


@contextlib.contextmanager
def exclusive(out: str | os.PathLike) -> Iterator[None]:
    """Hold ``out``'s lock (the one :func:`claim_output` takes) for a block that writes into ``out`` over
    time, as training writes its checkpoints: a second process is refused in one line, never left to
    replace the first one's files. The lock goes with the process (``flock``), also when it is killed.

    Raises
    ------
    MedvaeError
        Another process holds it.
    """
    out = Path(out)
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _lock(out, out.parent)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):  # removed while still held, as _unlock does
                os.unlink(out.parent / f".{out.name}{LOCK_SUFFIX}")
            os.close(fd)
    finally:
        for d in created:  # folders made only for the lock: gone again when nothing was written in them
            with contextlib.suppress(OSError):
                d.rmdir()


def _unlock(claim: OutputClaim) -> None:
    if claim._fd is None:
        return
    with contextlib.suppress(OSError):  # remove the lock file while we still hold the lock
        os.unlink(claim.out.parent / f".{claim.out.name}{LOCK_SUFFIX}")
    os.close(claim._fd)
    claim._fd = None


@contextlib.contextmanager
def claim_output(out: str | os.PathLike, *, kind: Kind, overwrite: bool = False,
                 owned: Owned | None = None) -> Iterator[OutputClaim]:
    """Claim ``out`` for this process before any work: lock it, check it may be (re)written,
    and remove stale staging folders of a killed earlier run.

    Parameters
    ----------
    out : str or PathLike
        The final file or folder. Missing parent folders are created (and removed again if
        nothing was written).
    kind : {"file", "dir"}
        Whether ``out`` is a file or a folder.
    overwrite : bool, optional
        Allow replacing an existing ``out`` that medvae wrote (see the module docstring).
        Without it an existing ``out`` is refused; an existing *empty* folder counts as free.
    owned : callable, optional
        ``owned(path, marker)`` raises :class:`MedvaeError` when an existing ``out`` is not
        medvae's own output (e.g. a NIfTI file another tool wrote).

    Yields
    ------
    OutputClaim
        Claims are re-entrant within one thread: claiming an output this thread already
        holds yields the same claim, so a function can claim early and a writer below it can
        claim again.

    Raises
    ------
    MedvaeError
        Another process holds the claim, ``out`` exists (without ``overwrite``) or is not
        medvae's, the folder cannot be written, or ``out`` is a file where a folder is wanted
        (or the reverse).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with claim_output(d / "a.txt", kind="file") as claim:
    ...     # ... long computation: a second writer of a.txt is refused meanwhile ...
    ...     with claim.writing() as tmp:
    ...         _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
    """
    out = Path(out)
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    if out.is_symlink() and not out.exists():  # it was called "a file", or "already exists"
        raise MedvaeError(f"is a broken symbolic link (to {os.readlink(out)}); remove it or choose another output",
                          out)
    if out.is_symlink():  # the commit renames onto the link: it replaced the link, and its target kept the old data
        raise MedvaeError(f"is a symbolic link (to {os.readlink(out)}); give the path it points to, or remove "
                          "the link", out)
    if out.is_dir() and kind == "file":
        raise MedvaeError("is a folder; give a file path for this output", out)
    if (out.exists() or out.is_symlink()) and not out.is_dir() and kind == "dir":
        raise MedvaeError("is a file; give a folder path for this output", out)
    parent = out.parent if str(out.parent) else Path(".")
    ident = f"{threading.get_ident()}:{os.path.abspath(out)}"
    with _HELD_LOCK:
        held = _HELD.get(ident)
    if held is not None:
        if held.kind != kind:
            raise ValueError(f"{out} is already claimed as a {held.kind}")
        held._depth += 1
        try:
            yield held
        finally:
            held._depth -= 1
        return

    created: list[Path] = []
    p = parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
    except OSError as exc:
        raise MedvaeError(f"cannot create the output folder ({exc.strerror or exc})", parent) from None
    claim = OutputClaim(out, kind, overwrite, owned)
    try:
        claim._fd = _lock(out, parent)
        _remove_stale(out, parent)
        if (out.exists() or out.is_symlink()) and not (kind == "dir" and _is_empty_dir(out)):
            _check_ours(out, kind, owned)  # first: --overwrite is no remedy for what it refuses
            if not overwrite:
                raise MedvaeError("already exists; pass --overwrite (overwrite=True) to replace a "
                                  "previous medvae output", out)
        with _HELD_LOCK:
            _HELD[ident] = claim
        try:
            yield claim
        finally:
            with _HELD_LOCK:
                _HELD.pop(ident, None)
    finally:
        _unlock(claim)
        if not out.exists():
            for d in created:  # innermost first
                with contextlib.suppress(OSError):
                    d.rmdir()


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike, *, kind: Kind, overwrite: bool = False,
                  owned: Owned | None = None, finalize: Finalize | None = None,
                  record: dict[str, Any] | None = None) -> Iterator[Path]:
    """Claim ``out``, yield a staging path to write to, and move it onto ``out`` at the end.

    The one-step form of :func:`claim_output` + :meth:`OutputClaim.writing`; see them for the
    parameters. On any exception nothing is left at ``out`` (an existing output is kept).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_output(d / "a.txt", kind="file") as tmp:
    ...     _ = tmp.write_text("hello")
    >>> (d / "a.txt").read_text()
    'hello'
    >>> with atomic_output(d / "series", kind="dir") as tmp:
    ...     _ = (tmp / "IM0001.dcm").write_bytes(b"...")
    >>> sorted(p.name for p in (d / "series").iterdir())
    ['.medvae-output.json', 'IM0001.dcm']
    """
    with claim_output(out, kind=kind, overwrite=overwrite, owned=owned) as claim:
        with claim.writing(finalize=finalize, record=record) as tmp:
            yield tmp


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def all_or_none(*outs: str | os.PathLike) -> Iterator[None]:
    """Outputs written one after another in the block appear together or not at all.

    Each output is still written atomically by itself; when the block fails (a full disk while the
    second is written, an interrupt), those of ``outs`` that the block already wrote are removed and
    the outputs they replaced (``overwrite``) are put back, so a restored scan never stands without
    its uncertainty map, nor a corrupted scan without its mask, nor a new scan beside an old mask.
    The previous outputs are kept meanwhile as hard links (a copy where links fail) in a marked
    staging folder. Use it inside the claims of the outputs.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> try:
    ...     with all_or_none(d / "a.nii", d / "b.nii"):
    ...         _ = (d / "a.nii").write_text("image")
    ...         raise OSError(28, "No space left on device")
    ... except OSError:
    ...     pass
    >>> sorted(p.name for p in d.iterdir())
    []
    """
    paths = [Path(p) for p in outs]
    before = {p: _stamp(p) for p in paths}
    kept: dict[Path, Path] = {}  # output -> staging folder holding its previous version as KEPT
    try:
        for p in paths:
            if before[p] is not None:
                kept[p] = _new_stage(p)
                _keep(p, kept[p] / KEPT)
        yield
    except BaseException:
        with _signals_deferred():  # a second Ctrl-C does not stop the rollback half-way
            for p in paths:
                if _stamp(p) != before[p]:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    elif p.exists() or p.is_symlink():
                        p.unlink()
                    if p in kept:
                        os.rename(kept[p] / KEPT, p)
            for stage in kept.values():
                shutil.rmtree(stage, ignore_errors=True)
        raise
    for stage in kept.values():
        shutil.rmtree(stage, ignore_errors=True)


def _keep(src: Path, dst: Path) -> None:
    """Keep ``src`` (a file or folder) at ``dst`` by hard links, or by a copy where they fail."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src, dst, copy_function=link, symlinks=True)
    else:
        link(str(src), str(dst))
