"""Restore many series: one output per series, a summary CSV, resumable, sharded across processes.

:func:`find_jobs` turns a manifest (CSV/YAML, see :func:`medvae.store.read_manifest`; ``subject`` is
optional here) or a folder of series (each NIfTI file, DICOM file and sub-folder directly inside
it is one series, and so is a file named ``.dcm``/``.dicom``/``.ima``, so that one that cannot be read is
reported; loose DICOM files that share a SeriesInstanceUID are refused, since each would
become a series of its own) into jobs with stable output names: a series' name depends on it alone
(and on whether another series has the same name; a name already written stays), never on the order of
the rows or of a folder listing. :func:`restore_batch` runs this process's shard of them with :func:`medvae.restore.restore_scan`:

* **resumable**: a job whose output exists is skipped, if medvae wrote it (a NIfTI with medvae's
  description, a folder with its marker; anything else at the name is reported as failed, never
  replaced). Outputs are written atomically (a series appears whole or not at all), so an existing
  output is a complete one; a killed batch, run
  again, redoes only the unfinished series. Each output has a hidden ``.NAME.medvae-source``
  beside it (hashes of its input's path, real and within the data set, and series UID: the manifest
  row's, else the one its DICOM files hold now; and the restore's slices and seconds, which a skipped
  row shows when a killed run cut the summary): an output restored from another input (of the same
  name, in a changed manifest or folder, or a folder whose series was replaced) is never taken for this
  one's, but reported as failed; a data set moved elsewhere still matches. A NIfTI file replaced by
  another of the same name is taken as done: pass ``overwrite``;
* **fail-soft**: a series that cannot be restored is recorded with its error and the batch goes on;
* **sharded**: the first shard of ``n`` to start keeps the sorted series names as the output folder's
  hidden plan (``.medvae-shards.<n>.json``); series ``j`` of the plan belongs to shard ``j mod n``,
  and a series added later to the shard its name hashes to, so that a growing archive never moves a
  series to a shard that has already run (see :func:`shard_of`). The shard comes from
  ``shard=(i, n)``, else from ``torchrun`` (``RANK``/``WORLD_SIZE``) and/or a Slurm job array
  (``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``; the two
  combine), see :func:`shard_from_env`. Shards share nothing but the output folder: any number of
  machines can share one.

Each shard appends one row per series to its summary CSV as soon as the series is done
(``medvae-summary.csv``, or ``medvae-summary.<i>-of-<n>.csv`` for shard ``i`` of ``n``): columns
``series, slices, seconds, output, status, error`` with status ``restored``, ``skipped`` or ``failed``.
The ``error`` of a failed series (also printed by ``medvae restore`` and so kept in job logs) is the
error's kind and medvae's message without text that can identify a patient: no DICOM tag text
(SeriesDescription, PatientName...; a folder of several series is listed by UID and slice count),
no text of unexpected errors (restore the series alone to see it), and no names of the files inside
a series, each given as ``file #k`` (``k``-th in name order of the files under it, hidden ones
left out). Warnings logged while a series is restored are scrubbed alike.

Examples
--------
>>> from medvae.batch import restore_batch                          # doctest: +SKIP
>>> report = restore_batch("archive/", "restored/", shard=(0, 4))   # doctest: +SKIP
>>> report.counts()                                                 # doctest: +SKIP
{'restored': 250, 'skipped': 0, 'failed': 1}
"""
from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import logging
import os
import re
import threading
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from medvae.errors import MedvaeError, require_flags
from medvae.io.atomic import clear_stale, current_umask, exclusive
from medvae.runtime import env_int

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("series", "slices", "seconds", "output", "status", "error")
SUMMARY_PREFIX = "medvae-summary"


@dataclass(frozen=True)
class Job:
    """One series to restore: ``name`` (its row in the summary), input, output, optional series UID."""

    name: str
    input: Path
    output: Path
    series_uid: str | None = None
    modality: str | None = None
    base: Path | None = None  # the folder of series, or the manifest's folder


def _is_series(p: Path) -> bool:
    from medvae.io.scan import is_nifti_path

    if p.name.startswith("."):
        return False
    if p.is_dir():
        return True
    if is_nifti_path(p):
        return True
    from medvae.io.dicom import is_dicom_file

    # a DICOM name is a series even when its content is not: restored, or reported as failed, never
    # left out without a word (a file without the 128-byte preamble once vanished from the batch)
    return p.is_file() and (p.suffix.lower() in (".dcm", ".dicom", ".ima") or is_dicom_file(p))


def _output_name(p: Path, series_uid: str | None) -> str:
    from medvae.io.scan import is_nifti_path

    if is_nifti_path(p):
        return p.name
    name = p.name if p.is_dir() else p.stem  # a DICOM input becomes a folder (a derived series)
    return f"{name}_{series_uid}" if series_uid else name


def find_jobs(source: str | os.PathLike, output_dir: str | os.PathLike) -> list[Job]:
    """The series of a manifest file or of a folder, each with its output under ``output_dir``.

    Output names are the input names (a DICOM file ``x.dcm`` gives the folder ``x``; a manifest row
    with a ``series_uid`` gives ``<folder>_<uid>``). Inputs whose names collide (``p1/CT`` and
    ``p2/CT``) each get ``-<digest>`` of their own path within the data set (relative to the folder
    or the manifest's folder) and series UID, before a NIfTI extension (``CT-1f0c9a2e``): a name never
    depends on the order of the rows or of a folder listing, so a reordered manifest resumes and
    shards alike, and an output already written under another of an input's names (an input of the same
    name was added or removed since) keeps that name. Jobs come sorted by name (the order that shards
    split). A manifest that lists one series twice is refused (:func:`medvae.store.refuse_repeated_scans`):
    each row would become a derived series.

    Raises
    ------
    MedvaeError
        Missing source, a folder with no series, a bad manifest (or one listing a series twice),
        or an output folder inside the source folder.

    Examples
    --------
    >>> jobs = find_jobs("archive/", "restored/")   # doctest: +SKIP
    >>> jobs[0].name, jobs[0].output                # doctest: +SKIP
    ('patient_0001_ct', PosixPath('restored/patient_0001_ct'))
    """
    src, out = Path(source), Path(output_dir)
    if not src.exists():
        raise MedvaeError("no such file or folder", src)
    if out.exists() and not out.is_dir():
        raise MedvaeError("is a file; give a folder for the outputs of a batch", out)
    rows: list[tuple[Path, str | None, str | None]]
    if src.is_dir():
        if src.resolve() == out.resolve() or src.resolve() in out.resolve().parents:
            raise MedvaeError("the output folder must not be inside the input folder", out)
        rows = [(p, None, None) for p in sorted(src.iterdir()) if _is_series(p)]
        if not rows:
            raise MedvaeError("no series found (NIfTI files, DICOM files or DICOM folders)", src)
        _refuse_linked_twice([p for p, _, _ in rows], src)  # first: a linked file is no second file of its series
        _refuse_split_series([p for p, _, _ in rows], src)
    else:
        from medvae.store import read_manifest, refuse_repeated_scans

        entries = read_manifest(src, require_subject=False)
        refuse_repeated_scans(entries, src)  # each row would become a derived series of its own
        from medvae.io.scan import is_nifti_path

        for e in entries:
            if e.series_uid and is_nifti_path(Path(e.path)):
                raise MedvaeError(f"manifest row {e.row}: series_uid {e.series_uid} is given for a NIfTI file, "
                                  "which holds no DICOM series; leave the column empty", src)
        rows = [(e.path, e.series_uid, e.modality) for e in entries]
    base = src if src.is_dir() else src.parent
    if not src.is_dir():  # a row inside the output folder, or the output inside a row's series
        o = out.resolve()
        for path, _, _ in rows:
            r = path.resolve()
            if r == o or r in o.parents or o in r.parents:
                raise MedvaeError(f"the output folder and the input {path} lie one inside the other", out)
    plain = [_output_name(path, uid) for path, uid, _ in rows]
    names = list(plain)
    for digits in (8, 16, 64):  # a longer digest only if a digest, or a name like one, collides
        seen: dict[str, int] = {}
        for name in names:
            seen[name] = seen.get(name, 0) + 1
        # a name may also be another output's uncertainty map (a.nii.gz and a_uncertainty.nii.gz)
        maps = {_uncertainty_path(Path(name)).name for name in names}
        clash = [seen[name] > 1 or name in maps for name in names]
        if not any(clash):
            break
        names = [_with_digest(plain[i], _input_key(path, uid, base), digits) if clash[i] else names[i]
                 for i, (path, uid, _) in enumerate(rows)]
    jobs = [Job(name=name, input=path, output=out / name, series_uid=uid, modality=modality, base=base)
            for name, (path, uid, modality) in zip(names, rows)]
    return sorted(_keep_written_names(jobs, plain, out), key=lambda j: j.name)


def _refuse_linked_twice(paths: list[Path], src: Path) -> None:
    """A link beside its target: each was restored as a scan of its own, the same images twice. A broken
    link fails on its own. A link into a sibling folder (``latest -> patient1/CT``) is only warned about,
    from the paths alone: it duplicates images when that folder restores as one series, and is the way to
    restore one series of a folder that holds several (telling which would read its headers)."""
    seen: dict[str, Path] = {}
    for p in paths:
        if not p.exists():
            continue
        first = seen.setdefault(os.path.realpath(p), p)
        if first != p:
            raise MedvaeError(f"{first.name} and {p.name} are the same scan (one through a link): each would be "
                              "restored on its own; remove the link", src)
    real = {os.path.realpath(p): p for p in paths if p.exists()}
    for p in paths:
        if not p.is_symlink() or not p.exists():
            continue
        target = Path(os.path.realpath(p))
        holder = next((q for r, q in real.items() if q != p and Path(r) in target.parents), None)
        if holder is not None and holder.is_dir():
            log.warning("%s: %s is a link into %s, which this batch restores too: if %s reads as one series, "
                        "the linked images are restored twice (remove the link)", src, p.name, holder.name,
                        holder.name)


def _keep_written_names(jobs: list[Job], plain: list[str], out: Path) -> list[Job]:
    """Each job whose output is not written under its name now, but under another of its names (plain, or
    with a digest) by an earlier run, keeps that name; a job whose name it takes gets its digest instead.
    An input added or removed beside one of the same name changed the others' names, and they were
    restored a second time under the new one. Whatever the order of the rows: a kept name is told by the
    output's source marker alone (its inputs' path hashes, read once per name), and wins."""
    try:
        present = set(os.listdir(out))
    except OSError:  # no output folder yet: nothing written
        return jobs
    marked: dict[str, tuple[set[str], bool]] = {}  # name -> the path hashes its marker holds, any hash

    def paths_of(name: str) -> tuple[set[str], bool]:
        if name not in marked:
            try:
                words = (out / _source_marker(Path(name)).name).read_text().split()
            except OSError:
                words = []
            marked[name] = ({w for w in words if w.startswith("path:")}, any("=" not in w for w in words))
        return marked[name]

    kept: dict[int, str] = {}
    for i, (job, name) in enumerate(zip(jobs, plain)):
        if job.name in present:  # written under its name (or another's output, which the run reports)
            continue
        key = _input_key(job.input, job.series_uid, job.base or out)
        mine = set(_path_ids(job))
        for alt in (name, *(_with_digest(name, key, d) for d in (8, 16, 64))):
            if alt == job.name or alt not in present or _source_marker(Path(alt)).name not in present:
                continue
            paths, hashed = paths_of(alt)
            # a marker of an older medvae holds no path hashes: its full hashes alone tell (read below;
            # a skipped output's marker gains them, so this is paid once)
            if not hashed or (paths and not mine & paths):
                continue
            moved = replace(job, name=alt, output=out / alt)
            if not _restored_from_other(moved, _input_uid(moved)):  # its series too (a folder's may change)
                kept[i] = alt
                break
    if not kept:
        return jobs
    fixed = {n for alt in kept.values() for n in (alt, _uncertainty_path(Path(alt)).name)}
    result = []
    for i, (job, name) in enumerate(zip(jobs, plain)):
        if i in kept:
            job = replace(job, name=kept[i], output=out / kept[i])
        elif job.name in fixed or _uncertainty_path(Path(job.name)).name in fixed:
            key = _input_key(job.input, job.series_uid, job.base or out)
            for d in (8, 16, 64):
                alt = _with_digest(name, key, d)
                if alt not in fixed and _uncertainty_path(Path(alt)).name not in fixed:
                    break
            job = replace(job, name=alt, output=out / alt)
        result.append(job)
    return result


def _input_key(path: Path, series_uid: str | None, base: Path) -> str:
    """An input as its path within the data set and series UID: the same wherever the data set lies."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(base))).as_posix()
    return f"{rel}\0{series_uid or ''}"


def _with_digest(name: str, key: str, digits: int) -> str:
    """``name`` made unique by a digest of its input's key, before a NIfTI extension (kept last)."""
    from medvae.io.scan import NIFTI_SUFFIXES

    tag = "-" + hashlib.sha256(key.encode()).hexdigest()[:digits]
    ext = next((name[-len(x):] for x in sorted(NIFTI_SUFFIXES, key=len, reverse=True)
                if name.lower().endswith(x)), "")
    return f"{name[:len(name) - len(ext)]}{tag}{ext}"


def _refuse_split_series(rows: list[Path], folder: Path) -> None:
    """Loose DICOM files of one series would each become a derived series of their own: refuse. Folders
    (or a folder and a loose file) holding images of one series are only warned about: a multi-phase or
    multi-echo series split into a folder per phase shares its UID and is restored so on purpose, while
    an export split into folders of 500 files had better be one folder. A folder is known by the first
    DICOM file among its first entries that names a series: one header or two per folder."""
    from medvae.io.dicom import is_dicom_file, series_uid

    loose: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    for p in rows:
        if p.is_dir():
            uid = next((u for f in _first_entries(p) if f.is_file() and is_dicom_file(f)
                        for u in [series_uid(f)] if u), None)  # a DICOMDIR names none: the next file
        else:
            uid = series_uid(p) if is_dicom_file(p) else None
        if not uid:
            continue
        if not p.is_dir() and uid in loose:
            raise MedvaeError(f"loose DICOM files {loose[uid].name} and {p.name} belong to one series "
                              f"({uid}); --batch restores each file as a series of its own: move each series "
                              "into a folder of its own, or restore the folder without --batch", folder)
        other = folders.get(uid) or (loose.get(uid) if p.is_dir() else None)
        if other is not None:
            log.warning("%s: %s and %s hold images of one series (%s): each is restored as a derived series "
                        "of its own (right for a series split by phase or echo; an export split into "
                        "folders is better restored as one folder)", folder, other.name, p.name, uid)
        (folders if p.is_dir() else loose).setdefault(uid, p)


def _first_entries(folder: Path, limit: int = 16) -> list[Path]:
    """Up to ``limit`` visible entries of ``folder`` in name order (a DICOMDIR or a readme may come first)."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError:  # unreadable: restoring it names the problem
        return []
    return [folder / n for n in names[:limit]]


def shard_from_env(shard: str | tuple[int, int] | None = None) -> tuple[int, int]:
    """``(index, count)`` of this process: ``shard`` (``"i/n"``, 0-based), else from the launcher.

    A Slurm array task ``t`` of ``T`` (``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN``,
    ``SLURM_ARRAY_TASK_COUNT``) and torchrun's ``RANK`` of ``WORLD_SIZE`` combine: rank ``r`` of a
    torchrun inside task ``t`` is shard ``t * WORLD_SIZE + r`` of ``T * WORLD_SIZE``. Neither: ``(0, 1)``.

    Examples
    --------
    >>> shard_from_env("1/4")
    (1, 4)
    """
    env = os.environ
    if shard is not None:
        if isinstance(shard, str):
            try:
                i, n = (int(x) for x in shard.split("/"))
            except ValueError:
                raise MedvaeError(f"--shard must look like i/n (for example 0/4), got {shard!r}") from None
        else:
            i, n = shard
    else:
        i, n = 0, 1
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            task, low, n = (_env_int(k, default) for k, default in (("SLURM_ARRAY_TASK_ID", None),
                                                                     ("SLURM_ARRAY_TASK_MIN", 0),
                                                                     ("SLURM_ARRAY_TASK_COUNT", None)))
            step = max(1, _env_int("SLURM_ARRAY_TASK_STEP", 1))  # --array=0-198:2
            high = _env_int("SLURM_ARRAY_TASK_MAX", low + (n - 1) * step)
            i, off = divmod(task - low, step)
            # a list (--array=1,5,7) is no stepped range: its task ids cannot be told apart as shards
            if off or not 0 <= i < n or high - low != (n - 1) * step:
                raise MedvaeError(f"the Slurm array's task ids are not one evenly stepped range (task {task}; "
                                  f"min {low}, max {high}, {n} tasks, as from --array=1,5,7): use a range such "
                                  "as --array=0-99, or give each task --shard i/n")
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, alone or inside an array task
            world = _env_int("WORLD_SIZE", None)
            i, n = i * world + _env_int("RANK", None), n * world
    if not (n >= 1 and 0 <= i < n):
        raise MedvaeError(f"shard {i} of {n} is out of range (0 <= i < n)")
    return i, n


def _env_int(name: str, default: int | None) -> int:
    return env_int(name, default, hint="unset it, or give --shard i/n")


def _plan_path(output_dir: Path, count: int) -> Path:
    return output_dir / f".medvae-shards.{count}.json"


def _read_plan(output_dir: Path, count: int) -> list[str] | None:
    """The series names of the first run of ``count`` shards into ``output_dir``, or None before it."""
    plan = _plan_path(output_dir, count)
    try:
        names = json.loads(plan.read_text())["series"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MedvaeError(f"unreadable shard plan ({exc}); it fixes which shard restores which series: remove it "
                          "only when no shard of this output runs", plan) from None
    if not (isinstance(names, list) and all(isinstance(x, str) for x in names)):
        raise MedvaeError("the shard plan holds no list of series names; remove it only when no shard of this "
                          "output runs", plan)
    return names


def _write_plan(output_dir: Path, count: int, names: list[str]) -> list[str]:
    """Keep this run's listing as the plan of ``count`` shards, unless another shard's came first: the plan
    that holds is returned. Linked into place, so a shard reads a whole plan or none."""
    import tempfile

    plan = _plan_path(output_dir, count)
    fd, name = tempfile.mkstemp(prefix=f"{plan.name}.", dir=output_dir)  # unique across machines too
    tmp = Path(name)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # as every other output: mkstemp's 0600 locked out another account
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps({"shards": count, "series": names}) + "\n")
        try:
            os.link(tmp, plan)
        except FileExistsError:
            pass
        except OSError:  # a file system without hard links: a rename, unless a plan came first
            if not plan.exists():
                os.replace(tmp, plan)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_plan(output_dir, count) or names


def shard_of(name: str, plan: dict[str, int], count: int) -> int:
    """The shard of the series ``name``: its place in the plan (``{name: place}``) modulo ``count``, so
    shards are even; a series newer than the plan goes by a hash of its name. Either way it depends on
    the plan and the name alone, never on what else the folder holds when a shard starts.

    >>> plan = {"a": 0, "b": 1, "c": 2}
    >>> shard_of("b", plan, 2), shard_of("c", plan, 2), shard_of("b", plan, 1)
    (1, 0, 0)
    """
    place = plan.get(name)
    if place is None:
        place = int(hashlib.sha256(name.encode()).hexdigest()[:12], 16)
    return place % count


def _uncertainty_path(output: Path) -> Path:
    from medvae.restore import _default_uncertainty_path

    return _default_uncertainty_path(output)


def _source_marker(output: Path) -> Path:
    return output.parent / f".{output.name}.medvae-source"


def _source_ids(job: Job, uid: str | None) -> list[str]:
    """Which input an output was restored from, as hashes (the output folder names no input path):
    its real path, and its path within the data set (the same after the data set is moved), each
    with the series UID ``uid``."""
    return [hashlib.sha256(f"{w}\0{uid or ''}".encode()).hexdigest() for w in _places(job)]


def _path_ids(job: Job) -> list[str]:
    """The input's path hashes alone (``path:`` words of the marker): which input an output is told by
    them without reading its series UID (a folder walk and a header per input)."""
    return ["path:" + hashlib.sha256(w.encode()).hexdigest() for w in _places(job)]


def _places(job: Job) -> list[str]:
    """The input's real path, and its path within the data set (the same after the data set is moved)."""
    where = [os.path.realpath(job.input)]
    if job.base is not None:
        where.append("rel:" + os.path.relpath(os.path.abspath(job.input), os.path.abspath(job.base)))
    return where


def _input_uid(job: Job) -> str | None:
    """The series UID of the input: its manifest row's, else that of the first DICOM file it holds now, so
    that a folder whose series was replaced is another input; None for a NIfTI file."""
    from medvae.io.scan import is_nifti_path

    if job.series_uid or is_nifti_path(job.input):
        return job.series_uid
    from medvae.io.dicom import series_uid

    for f in _series_files(job)[:16]:  # a folder of non-DICOM files is not read whole
        uid = series_uid(f)
        if uid:
            return uid
    return None


def _marker_words(job: Job) -> list[str]:
    """The words of the output's source marker (hashes, then ``slices=``/``seconds=``); none without one."""
    try:
        return _source_marker(job.output).read_text().split()
    except OSError:
        return []


def _restored_from_other(job: Job, uid: str | None) -> bool:
    """The existing output was restored from another input (outputs written before markers carry none;
    markers written before they held a folder's series UID hold the path's hashes alone)."""
    recorded = {w for w in _marker_words(job) if "=" not in w and not w.startswith("path:")}
    return bool(recorded) and not recorded & {*_source_ids(job, uid), *_source_ids(job, job.series_uid)}


def _mark_source(job: Job, uid: str | None, **figures: Any) -> None:
    """Write the output's source marker: the input's hashes, and the restore's ``slices`` and
    ``seconds`` once it is done (a rerun's skipped row shows them after a killed run cut the summary)."""
    marker = _source_marker(job.output)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    text = "\n".join([*_source_ids(job, uid), *_path_ids(job), *(f"{k}={v}" for k, v in figures.items())]) + "\n"
    created = False
    try:
        with open(tmp, "w") as fh:
            created = True
            fh.write(text)
        os.replace(tmp, marker)
    except BaseException:  # a full disk: no half-written temporary left (only one this call created)
        if created:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        raise


def _marked_figures(job: Job) -> dict[str, str]:
    """The ``slices`` and ``seconds`` the source marker keeps (none in a marker of an older medvae)."""
    return dict(w.split("=", 1) for w in _marker_words(job) if w.startswith(("slices=", "seconds=")))


def _ours(path: Path) -> bool:
    """An output medvae wrote (a NIfTI with its description, a folder with its marker), not any file
    that has the name (a copy of an input once counted as its own restoration)."""
    from medvae.io.atomic import read_marker
    from medvae.io.nifti import is_medvae_nifti
    from medvae.io.scan import is_nifti_path

    if is_nifti_path(path):
        try:
            is_medvae_nifti(path)
        except MedvaeError:
            return False
        return path.is_file()
    return path.is_dir() and read_marker(path) is not None


def _complete(job: Job, samples: int) -> bool:
    """Outputs are written atomically: one of medvae's that exists is whole (with its uncertainty map,
    if asked). Anything else at its name is restored over, which refuses what medvae did not write."""
    if not _ours(job.output):
        return False
    return not samples or _ours(_uncertainty_path(job.output))


# free-text tags that can carry patient identifiers at some sites: their values never reach the
# summary, the log or stderr (DICOM PS3.15 Annex E lists these among many others)
IDENTIFYING_TAGS = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthDate",
                    "PatientAddress", "PatientComments", "AccessionNumber", "StudyID", "StudyDescription",
                    "SeriesDescription", "ProtocolName", "PerformedProcedureStepDescription",
                    "RequestedProcedureDescription", "ImageComments", "InstitutionName", "InstitutionAddress",
                    "InstitutionalDepartmentName", "StationName", "ReferringPhysicianName",
                    "PerformingPhysicianName", "OperatorsName", "DeviceSerialNumber")


#: errors of the output's file system, which every later series would meet too: the batch stops
_STOPS_THE_BATCH = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}


def _unmark_unwritten(job: Job) -> None:
    """Remove the source marker of a series whose output does not exist (its restore failed or stopped)."""
    if not (job.output.exists() or job.output.is_symlink()):
        _source_marker(job.output).unlink(missing_ok=True)


def _failure(exc: Exception, job: Job) -> str:
    """The summary's ``error`` for ``job``: the error's kind and medvae's message, without DICOM tag
    text, the text of unexpected errors (a reader's may quote a value), or names of files inside the
    series (see the module docstring). The series itself is the row's ``series``."""
    from medvae.io.dicom import SeriesChoiceError, series_listing

    if isinstance(exc, SeriesChoiceError):  # its message quotes each SeriesDescription: rebuilt without
        table = series_listing(exc.series)
        text = (f"no series {job.series_uid} here; available: {table}" if job.series_uid else
                f"{len(exc.series)} series found: {table}; give each a manifest row with its series_uid")
    elif isinstance(exc, MedvaeError):
        where = _where(exc.path, job)
        text = f"{where}: {exc.message}" if where else exc.message
    elif isinstance(exc, OSError) and exc.strerror:  # the system's reason quotes no input (its file name is left out)
        text = exc.strerror
    else:
        text = ("unexpected error, its text left out as it may quote the input; restore this series alone "
                "(medvae restore INPUT OUTPUT) to see it")
    try:
        return f"{type(exc).__name__}: {_scrub(text, job)}"
    except OSError:  # the series cannot be listed: its files' names and tags cannot be taken out
        return (f"{type(exc).__name__}: its text left out (the series could not be listed); restore this "
                "series alone (medvae restore INPUT OUTPUT) to see it")


def _series_files(job: Job) -> list[Path]:
    """The files of a folder input in the reader's order (sorted, hidden ones left out); a file: itself."""
    src = job.input
    if not src.is_dir():
        return [src]
    from medvae.io.dicom import folder_files

    return folder_files(src, strict=False)  # for names and tags to leave out: reading the series says the rest


def _where(path: str | None, job: Job) -> str:
    """Where an error lies, without the input's own path (the row's ``series``) or its files' names."""
    if not path or os.path.abspath(path) == os.path.abspath(job.input):
        return ""
    files = [os.path.abspath(f) for f in _series_files(job)]
    if os.path.abspath(path) in files:
        return f"file #{files.index(os.path.abspath(path)) + 1} of {len(files)}"
    inside = os.path.abspath(job.input) + os.sep
    return "a file in this series" if os.path.abspath(path).startswith(inside) else str(path)


def _scrub(text: str, job: Job) -> str:
    """``text`` without the identifying tag values of ``job``'s DICOM files and with the names of the
    files inside a folder input as ``file #k``: a message that quotes either (a reader's error kept
    inside medvae's message, a slice named by the file it clashes with) does not carry it on."""
    return _scrubber(job)(text)


def _scrubber(job: Job) -> Callable[[str], str]:
    """:func:`_scrub` for ``job``, its series listed and its tags read once (raises OSError if it cannot be)."""
    subs: dict[str, str] = {}
    values: set[str] = set()
    # the input's own path (a reader's error may quote it) as the user named it: within the data set
    own = os.path.relpath(os.path.abspath(job.input), os.path.abspath(job.base)) if job.base else job.input.name
    for form in (str(job.input), os.path.abspath(job.input)):
        subs[form] = Path(own).as_posix()
    for k, f in enumerate(_series_files(job), 1):
        if f != job.input:
            for form in {str(f), os.path.abspath(f), f.relative_to(job.input).as_posix(), f.name}:
                # short numeric names (1, 2...) identify nobody and would clash with the message's numbers
                if not (form.isdigit() and len(form) < 6):
                    subs[form] = f"{subs[form]} or #{k}" if form in subs else f"file #{k}"
        values.update(_tag_values(f))
    # one pass each, longest first (a path before its name), so no replacement is replaced again
    forms = "|".join(re.escape(f) for f in sorted(subs, key=len, reverse=True))
    names = re.compile(rf"(?<![\w.^-])(?:{forms})(?![\w^-])")
    values = {v for v in values if len(v) >= 3}
    # the row's own series and output, as the user named them, stay readable: the row shows them
    # anyway, and a name part taken out of them gave a path that does not exist
    keep = {str(job.output), os.path.abspath(job.output), job.name, Path(own).as_posix()} - {""}
    # the row's paths case-sensitively, as they are; the tag values in any case
    tags = re.compile("|".join([*(re.escape(v) for v in sorted(keep, key=len, reverse=True)),
                                *(f"(?i:{re.escape(v)})" for v in sorted(values, key=len, reverse=True))]))

    def scrub(text: str) -> str:
        text = names.sub(lambda m: subs[m.group(0)], text)
        if values:
            text = tags.sub(lambda m: m.group(0) if m.group(0) in keep else "[redacted]", text)
        return text

    return scrub


_scrubbing = threading.local()  # the job this thread restores (its log records are scrubbed)
_factory_lock = threading.Lock()


@contextmanager
def _scrubbed_logs(job: Job) -> Iterator[None]:
    """Log records made in this thread while ``job`` runs are scrubbed as its summary error is: a reader's
    warning named a slice by its file (``DOE_JANE_53.dcm: uneven slice spacing``) on a batch job's stderr.
    Other threads' records are left alone, and the record factory is wrapped once (a factory swapped per
    job was put back out of order by two batches in two threads)."""
    with _factory_lock:
        made = logging.getLogRecordFactory()
        if not getattr(made, "_medvae_scrubs", False):  # once, or again over a factory set since
            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = made(*args, **kwargs)
                scrub = getattr(_scrubbing, "scrub", None)
                if scrub is not None:
                    _scrub_record(record, scrub)
                return record

            factory._medvae_scrubs = True  # type: ignore[attr-defined]
            logging.setLogRecordFactory(factory)
    outer = getattr(_scrubbing, "scrub", None)
    _scrubbing.scrub = _Lazy(job)
    try:
        yield
    finally:
        _scrubbing.scrub = outer


class _Lazy:
    """:func:`_scrubber` of a job, made at its first record (most series log nothing). Records made while
    it is made (pydicom warns of a tag value it reads) have their text left out: scrubbing them made it
    again, without end (a RecursionError that stopped the shard)."""

    def __init__(self, job: Job) -> None:
        self.job, self.scrub, self.making = job, None, False

    def __call__(self, text: str) -> str:
        if self.scrub is None:
            if self.making:
                return "a message of this series, its text left out (it came while its tag values were read)"
            self.making = True
            try:
                self.scrub = _scrubber(self.job)
            finally:
                self.making = False
        return self.scrub(text)


def _scrub_record(record: logging.LogRecord, scrub: Callable[[str], str]) -> None:
    try:
        text = record.getMessage()
    except Exception:  # a malformed call: logging reports it as it would have
        return
    try:
        record.msg = scrub(text)
    except Exception:  # the series cannot be listed (or read): its files' names and tags cannot be taken out
        record.msg = "a message of this series, its text left out (the series could not be listed)"
    record.args = ()


def _tag_values(f: Path) -> list[str]:
    """The :data:`IDENTIFYING_TAGS` values of a DICOM file (a person's name also by its parts);
    nothing for a file that is no readable DICOM (its error then quotes none of them)."""
    import pydicom
    from pydicom.multival import MultiValue

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=list(IDENTIFYING_TAGS))
    except Exception:
        return []
    out = []
    for tag in IDENTIFYING_TAGS:
        value = ds.get(tag)
        for v in (value if isinstance(value, MultiValue) else [value]):
            if v is not None:
                out.append(str(v).strip())
                out += [str(getattr(v, part, "")).strip() for part in ("family_name", "given_name", "middle_name")]
    return out


def summary_path(output_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    i, n = shard
    name = f"{SUMMARY_PREFIX}.csv" if n == 1 else f"{SUMMARY_PREFIX}.{i}-of-{n}.csv"
    return Path(output_dir) / name


def read_summaries(output_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of the summary CSVs in ``output_dir`` (every shard's), complete lines only, one per
    series: the newest summary's row where several name it (a rerun with another shard count leaves
    the earlier layout's files, whose rows a later run has made stale)."""
    files = sorted(Path(output_dir).glob(f"{SUMMARY_PREFIX}*.csv"), key=lambda f: (f.stat().st_mtime_ns, f.name))
    rows: dict[str, dict[str, str]] = {}
    for f in files:  # oldest first: a newer file's row replaces an older one's
        with f.open(newline="") as fh:
            for r in csv.DictReader(fh):
                if r.get("status"):
                    rows.pop(r["series"], None)
                    rows[r["series"]] = r
    return list(rows.values())


@dataclass
class BatchReport:
    """What :func:`restore_batch` did in this shard."""

    shard: tuple[int, int]
    summary: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> dict[str, int]:
        c = {"restored": 0, "skipped": 0, "failed": 0}
        for r in self.rows:
            c[r["status"]] += 1
        return c

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] == "failed"]


def restore_batch(source: str | os.PathLike, output_dir: str | os.PathLike, *, model: Any = "default",
                  shard: str | tuple[int, int] | None = None, samples: int = 0, batch_size: int = 8,
                  device: Any = None, modality: str | None = None, overwrite: bool = False,
                  threads: int | None = None,
                  tracking_uri: str | None = None, progress: bool = False, ensemble: int = 2,
                  blend: bool = True) -> BatchReport:
    """Restore this shard's series of ``source`` into ``output_dir``; returns the rows written.

    Parameters
    ----------
    source : str or PathLike
        A manifest (``.csv``/``.yaml``) or a folder of series (see :func:`find_jobs`).
    output_dir : str or PathLike
        One output per series, and the shard's summary CSV.
    model : str or LoadedModel
        As for :func:`~medvae.restore.restore_scan`; loaded once per process.
    shard : ``"i/n"`` or ``(i, n)``, optional
        This process's shard; default from the environment (:func:`shard_from_env`).
    samples, batch_size, device, tracking_uri
        As for :func:`~medvae.restore.restore_scan` (with ``samples``, each series gets an
        uncertainty map beside its output).
    modality : {"CT", "MR"}, optional
        For series whose manifest row gives none (NIfTI has no modality tag; see
        :func:`~medvae.restore.restore_scan`).
    overwrite : bool
        Restore every series again, replacing earlier medvae outputs (default: skip them).
    threads : int, optional
        torch CPU threads of this process. Default: torch's own, or the cores divided by the
        processes on this machine under torchrun (``LOCAL_WORLD_SIZE``).
    progress : bool
        Progress over the shard's series on stderr (:func:`medvae.progress.progress`).
    ensemble : {1, 2, 4}
        Test-time flip ensemble of :func:`~medvae.restore.restore_volume` (default 2).
    blend : bool
        Blend with the classical restoration by the model's weights (default True; see
        :func:`~medvae.restore.restore_volume`).

    Examples
    --------
    >>> r = restore_batch("series.csv", "out/", shard="0/2")   # doctest: +SKIP
    >>> r.summary.name                                          # doctest: +SKIP
    'medvae-summary.0-of-2.csv'
    """
    from medvae.restore import _check_options, restore_scan
    from medvae.runtime import pick_device

    t_start = time.perf_counter()
    require_flags(overwrite=overwrite, progress=progress, blend=blend)
    # before the first series: each failed alone, into a summary of failures and exit 1
    _check_options(samples=samples, batch_size=batch_size, ensemble=ensemble, window=None)
    if modality is not None and str(modality).upper() not in ("CT", "MR"):
        raise MedvaeError(f"modality must be CT or MR, not {modality!r}: the model's intensity scaling knows no other")
    index, count = shard_from_env(shard)
    jobs = find_jobs(source, output_dir)
    from_folder = Path(source).is_dir()  # no manifest row to give a modality in
    out_dir = Path(output_dir)
    names = [job.name for job in jobs]
    # the plan: the listing of the first shard to start. Split by each shard's own listing, a series
    # added between two shards' starts moved others to shards that had already run: never restored
    listed = (_read_plan(out_dir, count) if count > 1 else None) or names
    lm = dev = None

    def load_model_for(mine: list[Job]) -> None:
        nonlocal lm, dev
        if lm is None and (overwrite or not all(_complete(job, samples) for job in mine)):
            # loaded once, as restore_scan loads it (the default: its TorchScript export), and before the
            # summary is opened: a wrong model is one line that leaves the output folder as it was
            from medvae.restore import _resolve_model

            dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))  # a GPU per rank
            lm = _resolve_model(model, dev, tracking_uri)

    plan = {name: k for k, name in enumerate(listed)}
    mine = [job for job in jobs if shard_of(job.name, plan, count) == index]
    load_model_for(mine)
    out_dir.mkdir(parents=True, exist_ok=True)
    if count > 1 and listed is names:
        listed = _write_plan(out_dir, count, names)
        if listed != names:  # another shard's plan came first: its split holds
            plan = {name: k for k, name in enumerate(listed)}
            mine = [job for job in jobs if shard_of(job.name, plan, count) == index]
            load_model_for(mine)
    newer = sum(name not in plan for name in names)
    if newer:
        log.warning("%d series are newer than this output folder's shard plan (the listing when its first shard "
                    "started); each goes to the shard its name hashes to: run every shard again when the "
                    "archive has stopped growing, so that none is missed", newer)
    summary = summary_path(out_dir, (index, count))
    report = BatchReport(shard=(index, count), summary=summary)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: processes on this machine
    if not threads and local > 1:
        threads = max(1, (os.cpu_count() or 1) // local)
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    earlier = {r["series"]: r for r in read_summaries(out_dir) if r["status"] != "failed"}
    items = mine
    if progress:
        from medvae.progress import progress as show_progress

        items = show_progress(mine, total=len(mine), desc=f"shard {index}/{count}", unit="series")
    # a fresh summary for this run, one flushed row per series (a killed run keeps its rows); one run of a
    # shard at a time: two runs of one shard interleaved their rows into one file
    with exclusive(summary), summary.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        fh.flush()
        for job in items:
            with _scrubbed_logs(job):  # a job log keeps no file names or tag values of the series
                row: dict[str, Any] = {"series": job.name, "slices": "", "seconds": "", "output": str(job.output),
                                       "status": "", "error": ""}
                done = _complete(job, samples)
                exists = job.output.exists() or job.output.is_symlink()
                uid = _input_uid(job)  # what the input holds now: the marker records it, and is checked against it
                if exists and not overwrite and _restored_from_other(job, uid):
                    row.update(status="failed", error=f"{job.output}: holds the restoration of another series (the "
                               "manifest or folder changed since it was written, and another input now has this "
                               "name); restore into a new output folder, or pass --overwrite")
                elif done and not overwrite:
                    for path in (job.output, _uncertainty_path(job.output)):
                        clear_stale(path)  # what a killed --overwrite run left of it (never claimed again)
                    prev = earlier.get(job.name) or _marked_figures(job)
                    words = _marker_words(job)
                    if words and not any(w.startswith("path:") for w in words):  # an older medvae's marker
                        with contextlib.suppress(OSError):  # gains the path hashes, once; best effort: the
                            _mark_source(job, uid, **_marked_figures(job))  # output is complete either way
                    row.update(status="skipped", slices=prev.get("slices", ""), seconds=prev.get("seconds", ""))
                else:
                    t = time.perf_counter()
                    try:
                        if not exists:  # marked first: an output never exists without its source
                            _mark_source(job, uid)
                        # --overwrite of another series' output keeps that one's marker until this restore
                        # has replaced it: removed first, a failed restore left the other output unmarked
                        # and the next run took it for this series' (the audit)
                        s = restore_scan(job.input, job.output, model=lm, samples=samples, batch_size=batch_size,
                                         device=dev, series=job.series_uid, modality=job.modality or modality,
                                         ensemble=ensemble, blend=blend,
                                         # an output without its uncertainty map (or a map without its output)
                                         # was cut short: replace what medvae wrote of it
                                         overwrite=overwrite or job.output.exists()
                                         or bool(samples and _ours(_uncertainty_path(job.output))))
                        row.update(status="restored", slices=s.slices, seconds=f"{s.seconds:.2f}")
                        _mark_source(job, uid, slices=row["slices"], seconds=row["seconds"])
                        if s.modality_guess:  # as a single restore prints it: a CT taken for MR is windowed wrong
                            how = "pass --modality" if from_folder else "give its manifest row a modality, or pass --modality"
                            log.warning("%s: restored as %s (%s); %s to override", job.name, s.modality,
                                        s.modality_guess, how)
                    except (KeyboardInterrupt, SystemExit):
                        _unmark_unwritten(job)  # the marker of a series never written was left behind
                        raise
                    except OSError as exc:
                        if exc.errno in _STOPS_THE_BATCH:  # every later series would fail the same way
                            _unmark_unwritten(job)
                            raise
                        row.update(status="failed", seconds=f"{time.perf_counter() - t:.2f}", error=_failure(exc, job))
                    except Exception as exc:  # a bad series, or an unexpected reader or codec error: record it, go on
                        row.update(status="failed", seconds=f"{time.perf_counter() - t:.2f}", error=_failure(exc, job))
                        if not isinstance(exc, MedvaeError):  # where it broke, not its text (it may quote the input)
                            frames = traceback.extract_tb(exc.__traceback__)[::-1]
                            log.debug("series %s failed: %s; at %s", job.name, row["error"],
                                      " < ".join(f"{fr.filename}:{fr.lineno} {fr.name}" for fr in frames))
                    if row["status"] == "failed":
                        _unmark_unwritten(job)
            writer.writerow(row)
            fh.flush()
            report.rows.append(row)
    report.seconds = time.perf_counter() - t_start
    return report
