"""Restore many series: one output per series, a summary CSV, resumable, sharded across processes.

:func:`find_jobs` turns a manifest (CSV/YAML, see :func:`medvae.store.read_manifest`; ``subject`` is
optional here) or a folder of series (each NIfTI file, DICOM file and sub-folder directly inside
it is one series; loose DICOM files that share a SeriesInstanceUID are refused, since each would
become a series of its own) into jobs with stable output names. :func:`restore_batch` runs this process's
shard of them with :func:`medvae.restore.restore_scan`:

* **resumable**: a job whose output exists is skipped. Outputs are written atomically (a series
  appears whole or not at all), so an existing output is a complete one; a killed batch, run
  again, redoes only the unfinished series. Each output has a hidden ``.NAME.medvae-source``
  beside it (hashes of its input's path, real and within the data set, and series UID): an
  output restored from another input (names shifted by a changed manifest or folder) is never
  taken for this one's, but reported as failed; a data set moved elsewhere still matches;
* **fail-soft**: a series that cannot be restored is recorded with its error and the batch goes on;
* **sharded**: job ``j`` (in sorted order) belongs to shard ``j mod n``. The shard comes from
  ``shard=(i, n)``, else from ``torchrun`` (``RANK``/``WORLD_SIZE``) and/or a Slurm job array
  (``SLURM_ARRAY_TASK_ID`` − ``SLURM_ARRAY_TASK_MIN`` of ``SLURM_ARRAY_TASK_COUNT``; the two
  combine), see :func:`shard_from_env`. Shards need no communication: any number of machines can share one
  output folder.

Each shard appends one row per series to its summary CSV as soon as the series is done
(``medvae-summary.csv``, or ``medvae-summary.<i>-of-<n>.csv`` for shard ``i`` of ``n``): columns
``series, slices, seconds, output, status, error`` with status ``restored``, ``skipped`` or ``failed``.

Examples
--------
>>> from medvae.batch import restore_batch                          # doctest: +SKIP
>>> report = restore_batch("archive/", "restored/", shard=(0, 4))   # doctest: +SKIP
>>> report.counts()                                                 # doctest: +SKIP
{'restored': 250, 'skipped': 0, 'failed': 1}
"""
from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medvae.errors import MedvaeError

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

    if p.name.startswith(".") or p.name.startswith(SUMMARY_PREFIX):
        return False
    if p.is_dir():
        return True
    if is_nifti_path(p):
        return True
    from medvae.io.dicom import is_dicom_file

    return p.is_file() and is_dicom_file(p)


def _output_name(p: Path, series_uid: str | None) -> str:
    from medvae.io.scan import is_nifti_path

    if is_nifti_path(p):
        return p.name
    name = p.name if p.is_dir() else p.stem  # a DICOM input becomes a folder (a derived series)
    return f"{name}_{series_uid}" if series_uid else name


def find_jobs(source: str | os.PathLike, output_dir: str | os.PathLike) -> list[Job]:
    """The series of a manifest file or of a folder, each with its output under ``output_dir``.

    Output names are the input names (a DICOM file ``x.dcm`` gives the folder ``x``; a manifest row
    with a ``series_uid`` gives ``<folder>_<uid>``), made unique with ``-2``, ``-3``... in input
    order, so every run of the same source gives the same names. A manifest that lists one series
    twice (the same path and series UID) is refused: each row would become a derived series.

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
    rows: list[tuple[Path, str | None, str | None]]
    if src.is_dir():
        if src.resolve() == out.resolve() or src.resolve() in out.resolve().parents:
            raise MedvaeError("the output folder must not be inside the input folder", out)
        rows = [(p, None, None) for p in sorted(src.iterdir()) if _is_series(p)]
        if not rows:
            raise MedvaeError("no series found (NIfTI files, DICOM files or DICOM folders)", src)
        _refuse_split_series([p for p, _, _ in rows if p.is_file()], src)
    else:
        from medvae.store import read_manifest

        entries = read_manifest(src, require_subject=False)
        first: dict[tuple[str, str], int] = {}
        for e in entries:
            row = first.setdefault((os.path.abspath(e.path), e.series_uid or ""), e.row)
            if row != e.row:
                raise MedvaeError(f"manifest rows {row} and {e.row} list the same series; each row would "
                                  "become a derived series of its own: remove one", src)
        rows = [(e.path, e.series_uid, e.modality) for e in entries]
    jobs, used = [], set()
    for path, uid, modality in rows:
        name = _output_name(path, uid)
        base, n = name, 1
        while name in used:
            n += 1
            stem, dot, ext = base.partition(".")
            name = f"{stem}-{n}{dot}{ext}"
        used.add(name)
        jobs.append(Job(name=name, input=path, output=out / name, series_uid=uid, modality=modality,
                        base=src if src.is_dir() else src.parent))
    return jobs


def _refuse_split_series(files: list[Path], folder: Path) -> None:
    """Loose DICOM files of one series would each become a derived series of their own: refuse."""
    from medvae.io.dicom import is_dicom_file, series_uid

    seen: dict[str, Path] = {}
    for f in files:
        uid = series_uid(f) if is_dicom_file(f) else None
        if uid and uid in seen:
            raise MedvaeError(f"loose DICOM files {seen[str(uid)].name} and {f.name} belong to one series "
                              f"({uid}); --batch restores each file as a series of its own: move each series "
                              "into a folder of its own, or restore the folder without --batch", folder)
        if uid:
            seen[uid] = f


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
            i = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            step = int(env.get("SLURM_ARRAY_TASK_STEP", "1") or "1")  # --array=0-198:2
            if step > 1 and i % step == 0:
                i //= step
            n = int(env["SLURM_ARRAY_TASK_COUNT"])
        if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, alone or inside an array task
            world = int(env["WORLD_SIZE"])
            i, n = i * world + int(env["RANK"]), n * world
    if not (n >= 1 and 0 <= i < n):
        raise MedvaeError(f"shard {i} of {n} is out of range (0 <= i < n)")
    return i, n


def _uncertainty_path(output: Path) -> Path:
    from medvae.restore import _default_uncertainty_path

    return _default_uncertainty_path(output)


def _source_marker(output: Path) -> Path:
    return output.parent / f".{output.name}.medvae-source"


def _source_ids(job: Job) -> list[str]:
    """Which input an output was restored from, as hashes (the output folder names no input path):
    its real path, and its path within the data set (the same after the data set is moved)."""
    import hashlib

    where = [os.path.realpath(job.input)]
    if job.base is not None:
        where.append("rel:" + os.path.relpath(os.path.abspath(job.input), os.path.abspath(job.base)))
    return [hashlib.sha256(f"{w}\0{job.series_uid or ''}".encode()).hexdigest() for w in where]


def _restored_from_other(job: Job) -> bool:
    """The existing output was restored from another input (outputs written before markers carry none)."""
    try:
        recorded = set(_source_marker(job.output).read_text().split())
    except FileNotFoundError:
        return False
    return bool(recorded) and not recorded & set(_source_ids(job))


def _mark_source(job: Job) -> None:
    marker = _source_marker(job.output)
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}")
    tmp.write_text("\n".join(_source_ids(job)) + "\n")
    os.replace(tmp, marker)


def _complete(job: Job, samples: int) -> bool:
    """Outputs are written atomically: one that exists is whole (with its uncertainty map, if asked)."""
    if not (job.output.exists() or job.output.is_symlink()):
        return False
    return not samples or _uncertainty_path(job.output).exists()


def summary_path(output_dir: str | os.PathLike, shard: tuple[int, int]) -> Path:
    i, n = shard
    name = f"{SUMMARY_PREFIX}.csv" if n == 1 else f"{SUMMARY_PREFIX}.{i}-of-{n}.csv"
    return Path(output_dir) / name


def read_summaries(output_dir: str | os.PathLike) -> list[dict[str, str]]:
    """All rows of the summary CSVs in ``output_dir`` (every shard's), complete lines only."""
    rows = []
    for f in sorted(Path(output_dir).glob(f"{SUMMARY_PREFIX}*.csv")):
        with f.open(newline="") as fh:
            rows += [r for r in csv.DictReader(fh) if r.get("status")]
    return rows


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
    from medvae.restore import restore_scan
    from medvae.runtime import pick_device

    t_start = time.perf_counter()
    index, count = shard_from_env(shard)
    jobs = find_jobs(source, output_dir)
    mine = jobs[index::count]
    lm = dev = None
    if overwrite or not all(_complete(job, samples) for job in mine):
        # loaded once, as restore_scan loads it (the default: its TorchScript export), and before the
        # summary is opened: a wrong model is one line that leaves the output folder as it was
        from medvae.restore import _resolve_model

        dev = pick_device(device, int(os.environ.get("LOCAL_RANK", "0")))  # a GPU per rank
        lm = _resolve_model(model, dev, tracking_uri)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
    # a fresh summary for this run, one flushed row per series (a killed run keeps its rows)
    with summary.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        fh.flush()
        for job in items:
            row: dict[str, Any] = {"series": job.name, "slices": "", "seconds": "", "output": str(job.output),
                                   "status": "", "error": ""}
            done = _complete(job, samples)
            exists = job.output.exists() or job.output.is_symlink()
            if exists and not overwrite and _restored_from_other(job):
                row.update(status="failed", error=f"{job.output}: holds the restoration of another series (the "
                           "manifest or folder changed since it was written, so outputs named alike were "
                           "numbered anew); restore into a new output folder, or pass --overwrite")
            elif done and not overwrite:
                prev = earlier.get(job.name, {})
                row.update(status="skipped", slices=prev.get("slices", ""), seconds=prev.get("seconds", ""))
            else:
                t = time.perf_counter()
                try:
                    if not exists:  # marked first: an output never exists without its source
                        _mark_source(job)
                    elif _restored_from_other(job):  # --overwrite of another series' output
                        _source_marker(job.output).unlink(missing_ok=True)
                    s = restore_scan(job.input, job.output, model=lm, samples=samples, batch_size=batch_size,
                                     device=dev, series=job.series_uid, modality=job.modality or modality,
                                     ensemble=ensemble, blend=blend,
                                     # an output without its uncertainty map was cut short: replace it
                                     overwrite=overwrite or job.output.exists())
                    _mark_source(job)
                    row.update(status="restored", slices=s.slices, seconds=f"{s.seconds:.2f}")
                except (KeyboardInterrupt, SystemExit):
                    raise
                except MedvaeError as exc:
                    row.update(status="failed", seconds=f"{time.perf_counter() - t:.2f}", error=str(exc))
                except Exception as exc:  # an unexpected reader or codec error: record it, go on
                    log.debug("series %s failed", job.name, exc_info=True)
                    row.update(status="failed", seconds=f"{time.perf_counter() - t:.2f}",
                               error=f"{type(exc).__name__}: {exc}")
                if row["status"] == "failed" and not (job.output.exists() or job.output.is_symlink()):
                    _source_marker(job.output).unlink(missing_ok=True)
            writer.writerow(row)
            fh.flush()
            report.rows.append(row)
    report.seconds = time.perf_counter() - t_start
    return report
