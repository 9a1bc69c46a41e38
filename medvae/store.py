"""Dataset manifests and the on-disk slice store that training reads from.

A **manifest** (CSV or YAML) lists the scans of a data set, one row per volume::

    path,subject,modality,split,series_uid
    scans/p001_ct,p001,CT,,
    scans/p002_t1.nii.gz,p002,MR,val,

``path`` (relative to the manifest's folder) and ``subject`` are required; ``modality`` (else read
from the scan), ``split`` (``train``, ``val`` or ``test``; else drawn by subject) and ``series_uid``
(for a folder that holds several series) are optional. The split is decided **per subject**, so
slices of one patient never straddle training and validation.

A **store** is a folder that :func:`prepare_store` fills from a manifest: every scan is read once
through :mod:`medvae.io`, normalized with an :class:`~medvae.intensity.IntensityPolicy` and written as
one ``volumes/<key>.npy`` of shape ``(Z, X, Y)`` float32 (or float16, half the size: ``dtype``), so that one slice is one contiguous block
that ``np.load(mmap_mode="r")`` reads without touching the rest of the volume. ``store.json`` is the
index: the intensity policy, and per volume its key, subject, modality, split, shape, intensity
window, the foreground fraction of every slice (so training can pick usable slices without reading
the volumes) and provenance. It holds no file name and no DICOM value: the source path is recorded
only as a SHA-256 (and the source's bytes, to detect a replaced scan, likewise), and subjects and
series UIDs only as the manifest gave them. One ``prepare`` at a time writes a store (a lock).

Why not MONAI's caches: ``CacheDataset`` (any ``cache_rate``) and ``SmartCacheDataset`` keep whole
volumes in RAM on every rank, which is what this store avoids; ``PersistentDataset`` writes each
item with ``torch.save`` and reads it back whole, so a random slice costs a whole volume. A memory
map of a ``(Z, X, Y)`` array costs one slice, and the page cache does the rest.

Examples
--------
>>> from medvae.store import prepare_store, SliceStore            # doctest: +SKIP
>>> report = prepare_store("dataset.csv", "store/")                # doctest: +SKIP
>>> store = SliceStore("store/")                                   # doctest: +SKIP
>>> store.read_slice(store.records[0].key, 10).shape               # doctest: +SKIP
(256, 256)
"""
from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from medvae.errors import MedvaeError, os_reason
from medvae.intensity import CT_FOREGROUND_HU, DEFAULT_CT_WINDOW, MR_FOREGROUND_FRACTION, IntensityPolicy, normalize
from medvae.io.atomic import atomic_output
from medvae.io.formats import MODALITIES
from medvae.yamlsafe import check_expansion, describe_error, strict_loader

log = logging.getLogger(__name__)

STORE_FORMAT = "medvae-slice-store"
STORE_VERSION = 1
INDEX_NAME = "store.json"
SPLITS = ("train", "val", "test")
STORE_DTYPES = ("float32", "float16")
_UID = re.compile(r"[0-9][0-9.]{0,63}")  # PS3.5 9.1: digits and dots, at most 64 characters
MANIFEST_COLUMNS = ("path", "subject", "modality", "split", "series_uid")
INDEX_EVERY_S = 10.0   # seconds between index writes while preparing (and once at the end)
LOCK_NAME = ".medvae-prepare.lock"  # in the store; flock'ed by the one prepare writing it
#: in the store, never removed: trainings hold it shared while they read volumes; a prepare takes it
#: exclusively before it rewrites or removes a volume one of them may be reading
READERS_LOCK_NAME = ".medvae-readers.lock"
# a source changed less than this before it was read may change again within the same timestamp
# tick (1 s on ext3 and many NFS servers, 2 s on FAT) unseen by its times: its bytes are compared next run
RACY_S = 2.0


def foreground_fraction(slice_2d: np.ndarray, modality: str, *,
                        window: tuple[float, float] = DEFAULT_CT_WINDOW) -> float:
    """Fraction of foreground pixels of a slice normalized with ``window`` (CT > -500 HU; MR > 10 % of the
    window). A CT's ``window`` places -500 HU: read in the default one, a store made in -500..500 HU
    counted the pixels above -250 HU.

    Examples
    --------
    >>> foreground_fraction(np.array([[0.0, 0.2], [0.5, 1.0]]), "CT")    # -1000..1000 HU: above 0.25
    0.5
    >>> foreground_fraction(np.array([[0.0, 0.2], [0.5, 1.0]]), "CT", window=(-500, 500))   # above 0
    0.75
    """
    lo, hi = window
    thr = (CT_FOREGROUND_HU - lo) / (hi - lo) if modality == "CT" else MR_FOREGROUND_FRACTION
    return float((np.asarray(slice_2d) > thr).mean())


# -- manifests --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ManifestEntry:
    """One row of a dataset manifest (``row`` counts data rows from 1)."""

    path: Path
    subject: str
    modality: str | None = None
    split: str | None = None
    series_uid: str | None = None
    row: int = 0


_YAML_NULLS = ("~", "null", "Null", "NULL")  # an empty value, as YAML writes it


def read_manifest(manifest: str | os.PathLike, *, require_subject: bool = True) -> list[ManifestEntry]:
    """Read a CSV (``.csv``) or YAML (``.yaml``/``.yml``) dataset manifest.

    Relative paths are relative to the manifest's folder. A YAML manifest is a list of mappings
    with the CSV's column names (or a mapping with such a list under ``volumes``).
    ``require_subject=False`` (restoring, not training) makes ``subject`` optional.

    Raises
    ------
    MedvaeError
        Missing file, unknown format or column, a row without ``path`` or ``subject``, an unknown
        split, or one subject given two different splits; the message names the row.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "m.csv").write_text("path,subject,split\\na.nii.gz,s1,val\\nb.nii.gz,s2,\\n")
    >>> [(e.path.name, e.subject, e.split) for e in read_manifest(d / "m.csv")]
    [('a.nii.gz', 's1', 'val'), ('b.nii.gz', 's2', None)]
    """
    p = Path(manifest)
    if p.is_dir():
        raise MedvaeError("is a folder; give a manifest file (.csv or .yaml) that lists the scans", p)
    if not p.is_file():
        raise MedvaeError("manifest not found", p)
    suffix = p.suffix.lower()
    try:
        if suffix == ".csv":
            with p.open(newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                rows = list(reader)
                columns = list(reader.fieldnames or [])
            twice = sorted({c for c in columns if columns.count(c) > 1})
            if twice:  # DictReader keeps the last: a row's first path was never read
                raise MedvaeError(f"manifest column(s) {', '.join(map(repr, twice))} given twice in the header", p)
        elif suffix in (".yaml", ".yml"):
            import yaml

            text = p.read_text()
            # every value a string, as a CSV's: YAML 1.1 read subject 0012 as 10 and "no" as False, and
            # merged subjects; a key given twice is refused (a row's second path dropped the first)
            data = check_expansion(yaml.load(text, Loader=strict_loader(yaml.BaseLoader)), p, text=text)
            if isinstance(data, dict):
                data = data.get("volumes")
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise MedvaeError("a YAML manifest must be a list of mappings (or 'volumes: [...]')", p)
            rows = [{k: ("" if v in _YAML_NULLS else v) for k, v in r.items()} for r in data]
            columns = sorted({k for r in rows for k in r})
        else:
            raise MedvaeError("a manifest must be a .csv, .yaml or .yml file", p)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MedvaeError(f"cannot read the manifest ({exc})", p) from None
    except Exception as exc:  # yaml.YAMLError, without importing yaml for CSV users
        if type(exc).__module__.startswith("yaml"):
            raise MedvaeError(describe_error(exc), p) from None
        raise
    unknown = [c for c in columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise MedvaeError(f"unknown manifest column(s) {', '.join(map(repr, unknown))} "
                          f"(known: {', '.join(MANIFEST_COLUMNS)})", p)
    entries: list[ManifestEntry] = []
    for i, r in enumerate(rows, start=1):
        extra = [v for v in (r.get(None) or []) if str(v).strip()]  # csv.DictReader's restkey
        if extra:  # an unquoted comma in a path, or a shifted row: never drop a value silently
            raise MedvaeError(f"manifest row {i} has {len(extra)} more field(s) than the header "
                              f"({', '.join(columns)}); quote a value that holds a comma", p)
        nested = next((k for k, v in r.items() if k is not None and isinstance(v, (list, dict))), None)
        if nested:  # YAML [a, b] was stored as the text "['a', 'b']": a new subject, silently
            raise MedvaeError(f"manifest row {i}: {nested} must be one value, not a "
                              f"{'list' if isinstance(r[nested], list) else 'mapping'}", p)
        val = {k: (str(v).strip() if v is not None else "") for k, v in r.items() if k is not None}
        if not val.get("path") or (require_subject and not val.get("subject")):
            need = "'path' and 'subject' are" if require_subject else "'path' is"
            raise MedvaeError(f"manifest row {i}: {need} required", p)
        split = val.get("split") or None
        if split is not None and split not in SPLITS:
            raise MedvaeError(f"manifest row {i}: split must be one of {', '.join(SPLITS)}, got {split!r}", p)
        modality = val.get("modality") or None
        if modality is not None and str(modality).upper() not in MODALITIES:  # it failed its row alone
            raise MedvaeError(f"manifest row {i}: modality must be one of {', '.join(MODALITIES)} or empty, "
                              f"got {modality!r}", p)
        uid = val.get("series_uid") or ""
        if uid and not _UID.fullmatch(uid):  # it names an output folder: "1.2/../../x" wrote outside it
            raise MedvaeError(f"manifest row {i}: series_uid must be a DICOM UID (digits and dots, at most 64 "
                              f"characters), got {uid[:80]!r}", p)
        path = Path(val["path"]).expanduser()
        entries.append(ManifestEntry(path=path if path.is_absolute() else p.parent / path,
                                     subject=val.get("subject", ""), modality=modality,
                                     split=split, series_uid=val.get("series_uid") or None, row=i))
    if not entries:
        raise MedvaeError("the manifest lists no scans", p)
    _check_subject_splits(entries, p)
    return entries


def load_listed_scan(path: str | os.PathLike, *, series: str | None = None, modality: str | None = None):
    """:func:`medvae.io.load_scan` for a scan listed for training (a manifest row or ``data.paths``).

    Training has no ``--series`` or ``--volume`` option: a folder of several series is refused with a
    hint for the manifest's ``series_uid`` column, and a 4-D NIfTI is read as its volume 0, said once.
    """
    from medvae.io import load_scan
    from medvae.io.dicom import SeriesChoiceError, series_listing
    from medvae.io.scan import is_nifti_path
    from medvae.io.nifti import n_volumes

    nifti = is_nifti_path(Path(path)) and Path(path).is_file()
    if series and nifti:
        raise MedvaeError(f"series_uid {series} is given for a NIfTI file, which holds no DICOM series; "
                          "leave the column empty", path)
    try:
        scan = load_scan(path, series=series, modality=modality, volume=0 if nifti else None)
    except SeriesChoiceError as exc:
        listing = series_listing(exc.series)
        what = "no series " + series if series else f"{len(exc.series)} series"
        raise MedvaeError(f"{what} here: name the series in a manifest's series_uid column (one row per "
                          f"series): {listing}", exc.path) from None
    if nifti and (nvol := n_volumes(path)) > 1:
        log.warning("%s: 4-D NIfTI with %d volumes; only its volume 0 is used for training", path, nvol)
    return scan


def _holds_resolved(o: Path, i: Path, outer_series: str | None, inner_series: str | None) -> bool:
    """Whether the scan read from folder ``o`` (its series ``outer_series``, or its only one) holds the
    images of ``i``, an existing file or folder inside it (both resolved)."""
    from medvae.io.dicom import is_dicom_file, series_uid

    if i.is_file() and not is_dicom_file(i):  # a folder is read as DICOM: a NIfTI in it is a scan of its own
        return False
    if outer_series is None:  # a folder read whole holds one series: all the DICOM inside it
        return True
    if inner_series is not None:
        return inner_series == outer_series
    if i.is_file():  # one file, one series: told apart by its header
        return series_uid(i) == outer_series  # None when unreadable: not read into the outer series either
    # a folder read whole holds one series: that of its first DICOM file
    first = next((f for f in sorted(i.rglob("*")) if f.is_file() and is_dicom_file(f)), None)
    return first is not None and series_uid(first) == outer_series


def nested_scans(outers: Sequence[tuple[Any, str | os.PathLike, str | None]],
                 inners: Sequence[tuple[Any, str | os.PathLike, str | None]]) -> Iterator[tuple[Any, Any]]:
    """Each ``(outer_tag, inner_tag)`` whose outer folder's scan holds the inner file or folder: one scan
    listed twice, from ``(tag, path, series_uid)`` triples. A folder read whole holds one series, all the
    DICOM inside it; a folder read for one series holds that series' files; a NIfTI file is a scan of
    its own. Each path is resolved once and only its parents are looked up, so thousands of paths take
    milliseconds.

    >>> rows = [(1, "dev/dicom/series_ct_head", None), (2, "dev/dicom/series_ct_head/slice_0053.dcm", None)]
    >>> list(nested_scans(rows, rows))  # doctest: +SKIP
    [(1, 2)]
    """
    folders: dict[Path, list[tuple[Any, str | None]]] = {}
    for tag, path, series in outers:
        r = Path(path).resolve()
        if r.is_dir():
            folders.setdefault(r, []).append((tag, series))
    for tag, path, series in inners if folders else ():
        r = Path(path).resolve()
        for parent in r.parents:
            for o_tag, o_series in folders.get(parent, ()):
                if r.exists() and _holds_resolved(parent, r, o_series, series):
                    yield o_tag, tag


def refuse_repeated_scans(entries: Sequence[ManifestEntry], source: Path | None) -> None:
    """One scan listed twice (under two subjects it could be in training and validation at once): refused,
    also a file or folder listed inside another row's folder whose scan holds it."""
    first: dict[tuple[str, str], tuple[int, str]] = {}
    for e in entries:  # the file behind links too: a linked copy under another subject could validate
        row, path = first.setdefault((os.path.realpath(e.path), e.series_uid or ""), (e.row, _abs(e.path)))
        if row != e.row:
            how = "" if path == _abs(e.path) else " (one through a link)"
            raise MedvaeError(f"manifest rows {row} and {e.row} list the same scan{how}", source)
    _refuse_whole_and_named(entries, first, source)
    listed = [(e.row, e.path, e.series_uid) for e in entries]
    nested = next(nested_scans(listed, listed), None)
    if nested is not None:
        raise MedvaeError(f"manifest row {nested[1]} lists a scan inside the folder of row {nested[0]}, whose scan "
                          "holds it: the same images twice", source)


def _refuse_whole_and_named(entries: Sequence[ManifestEntry], first: dict[tuple[str, str], tuple[int, str]],
                            source: Path | None) -> None:
    """A file or folder listed once without a series UID and once with the UID of the one series it holds:
    the same scan twice (told apart by the UID's text alone, it was restored twice)."""
    whole = {path: row for (path, uid), (row, _) in first.items() if not uid}
    for (path, uid), (row, _) in first.items():
        if uid and path in whole:
            from medvae.io.dicom import list_series

            try:
                table = list_series(path)
            except MedvaeError:  # unreadable: each row fails on its own
                continue
            if [t[0] for t in table] == [uid]:
                a, b = sorted((whole[path], row))
                raise MedvaeError(f"manifest rows {a} and {b} list the same scan: it holds the one series "
                                  f"{uid}, which one row names and the other reads whole", source)


def _check_subject_splits(entries: Sequence[ManifestEntry], source: Path | None) -> None:
    seen: dict[str, tuple[str, int]] = {}
    for e in entries:
        if e.split is None or not e.subject:
            continue
        first = seen.setdefault(e.subject, (e.split, e.row))
        if first[0] != e.split:
            raise MedvaeError(f"manifest rows {first[1]} and {e.row}: subject {e.subject!r} is in both "
                              f"'{first[0]}' and '{e.split}'; a subject belongs to one split", source)


def subject_split(subject: str, *, val_fraction: float, seed: int = 0) -> str:
    """The split of a subject without an explicit one: ``"val"`` with probability ``val_fraction``.

    A hash of ``(seed, subject)``, so the answer does not depend on the other subjects: adding scans
    to a data set never moves an existing subject between splits.

    Examples
    --------
    >>> subject_split("p001", val_fraction=0.0), subject_split("p001", val_fraction=1.0)
    ('train', 'val')
    """
    h = int.from_bytes(hashlib.sha256(f"{seed}\0{subject}".encode()).digest()[:8], "big")
    return "val" if h / 2**64 < val_fraction else "train"


# -- the store --------------------------------------------------------------------------------------

@dataclass
class StoreRecord:
    """One volume of a store, as recorded in ``store.json``."""

    key: str
    subject: str
    modality: str
    split: str
    shape: list[int]                  # (X, Y, Z) of the scan; the .npy holds (Z, X, Y)
    window: list[float]               # intensity window used to normalize
    foreground: list[float]           # foreground fraction of every slice (store.foreground_fraction)
    source_sha256: str                # SHA-256 of the absolute source path (no file names)
    fingerprint: str                  # size and mtime of the source file(s), hashed: detects changes
    series_uid: str | None = None     # only when the manifest gave it
    spacing: list[float] = field(default_factory=list)
    prepared: str = ""                # UTC time
    source_ctime: str = ""            # status-change times of the source file(s), hashed; "" = not trusted
    source_content: str = ""          # SHA-256 of the source's bytes, compared only when its ctime moved
    modality_given: str | None = None  # the manifest's modality ("" when guessed); None: a store before it

    @property
    def file(self) -> str:
        return f"volumes/{self.key}.npy"

    def usable_slices(self, *, min_size: int, min_foreground: float) -> list[int]:
        """Slices at least ``min_size`` in-plane with at least ``min_foreground`` foreground."""
        if min(self.shape[:2]) < min_size:
            return []
        return [k for k, f in enumerate(self.foreground) if f >= min_foreground]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def _abs(path: str | os.PathLike) -> str:
    # absolute, normalized, but symlinks kept: a link is a volume of its own (as in the manifest)
    return os.path.abspath(os.fspath(path))


def volume_key(entry: ManifestEntry) -> str:
    """Store key of a manifest entry: a hash of its absolute path and series UID."""
    return _sha(f"{_abs(entry.path)}\0{entry.series_uid or ''}")[:24]


# file names are hashed as the bytes the file system holds: a name that is no UTF-8 (surrogate
# escapes in Python) crashed prepare ("surrogates not allowed")
def _source_files(p: Path) -> list[tuple[str, Path]]:
    """``(name relative to p, file)`` of a file (name ``""``) or of a folder's files, sorted."""
    if p.is_file():
        return [("", p)]
    return [(str(f.relative_to(p)), f) for f in sorted(f for f in p.rglob("*") if f.is_file())]


def _source_stamps(path: str | os.PathLike) -> tuple[str, str]:
    """``(fingerprint, ctime stamp)`` of a source from one ``stat`` per file (see :func:`source_fingerprint`).

    The ctime stamp is ``""`` when a file changed less than :data:`RACY_S` ago: a rewrite of the
    same size within the same timestamp tick would leave all its times as they are (git's "racy
    clean" rule), so the next run compares its bytes instead.
    """
    fp, ct = hashlib.sha256(), hashlib.sha256()
    racy_after = time.time_ns() - int(RACY_S * 1e9)
    racy = False
    for name, f in _source_files(Path(path)):
        st = f.stat()
        fp.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        ct.update(f"{name}\0{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
        racy |= max(st.st_mtime_ns, st.st_ctime_ns) >= racy_after
    return fp.hexdigest(), "" if racy else ct.hexdigest()


def source_fingerprint(path: str | os.PathLike) -> str:
    """Hash of the relative names, sizes and modification times of a file or of a folder's files.

    Like ``make`` and ``rsync``'s quick check, size and mtime decide whether a source changed, so a
    rerun of ``prepare`` reads no unchanged scan. That alone misses a file replaced by one of the
    same size whose mtime was kept (``cp -p``, ``tar``/``unzip``, ``touch -r``) or rewritten within
    one timestamp tick. :func:`prepare_store` therefore also keeps the files' ctimes, which no tool
    can set, and the SHA-256 of their bytes, read only when size and mtime match but a ctime moved
    (a copy with kept mtime, ``chmod``/``chown``, or a file changed just before it was prepared).
    A ``chmod -R`` thus costs one read of the scans, not a new normalization; a file system whose
    ctimes are not stable would cost that read on every run.
    """
    return _source_stamps(path)[0]


def source_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the bytes (and relative names) of a file or of a folder's files."""
    h = hashlib.sha256()
    for name, f in _source_files(Path(path)):
        fh_sha = hashlib.sha256()  # hashlib.file_digest is Python 3.11+; medvae supports 3.10
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                fh_sha.update(block)
        h.update(f"{name}\0{fh_sha.hexdigest()}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _unchanged(old: StoreRecord, path: str | os.PathLike, ctime: str) -> bool:
    """Whether a source whose size and mtime match ``old`` is still the scan ``old`` was made from."""
    if old.source_ctime and old.source_ctime == ctime:
        return True  # the common case: one stat per file, nothing read
    if old.source_content:  # a ctime moved: only the bytes can tell
        return source_digest(path) == old.source_content
    return not old.source_ctime  # prepared before ctimes were kept: size and mtime, as then


class SliceStore:
    """Read access to a store written by :func:`prepare_store`.

    Volumes are opened with ``np.load(mmap_mode="r")`` when a slice is asked for; nothing is read
    at construction but the index.

    Parameters
    ----------
    root : str or PathLike
        The store folder.
    allow_incomplete : bool
        Open a store whose last ``prepare`` did not finish, or could not read some manifest rows
        (``prepare_store`` does, to complete it); by default such a store is refused, so training never
        runs on part of a data set.

    Examples
    --------
    >>> store = SliceStore("store/")                                   # doctest: +SKIP
    >>> [r.split for r in store.records]                               # doctest: +SKIP
    ['train', 'train', 'val']
    """

    def __init__(self, root: str | os.PathLike, *, allow_incomplete: bool = False) -> None:
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if not index.is_file():
            raise MedvaeError(f"not a medvae store (no {INDEX_NAME}); create one with `medvae prepare`",
                              self.root)
        try:
            self._index_stamp = index.stat().st_mtime_ns  # hold_for_reading: unchanged since read
            data = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise MedvaeError(f"unreadable store index ({exc})", index) from None
        if data.get("format") != STORE_FORMAT or data.get("version") != STORE_VERSION:
            raise MedvaeError(f"not a {STORE_FORMAT} version {STORE_VERSION} index", index)
        if data.get("complete") is False and not allow_incomplete:  # stores before the flag were complete
            raise MedvaeError("incomplete store: a `medvae prepare` into it was interrupted or is still "
                              "running; run the same `medvae prepare` again to finish it", self.root)
        failed = data.get("failed_rows")
        if failed and not allow_incomplete:
            rows = ", ".join(str(r) for r in failed[:10]) + (f" and {len(failed) - 10} more" if len(failed) > 10 else "")
            raise MedvaeError(f"incomplete store: its last `medvae prepare` could not read manifest row(s) {rows}; "
                              "fix them or take them out of the manifest, then run `medvae prepare` again", self.root)
        self.info: dict[str, Any] = {k: v for k, v in data.items() if k != "volumes"}
        self.intensity = IntensityPolicy.from_dict(data["intensity"])
        known = {f.name for f in fields(StoreRecord)}  # a newer medvae's extra fields are ignored
        self.records = [StoreRecord(**{k: v for k, v in r.items() if k in known}) for r in data["volumes"]]
        self.dtype: str = data.get("dtype", "float32")  # stores before float16 were float32

    def hold_for_reading(self) -> None:
        """Hold the store's readers lock (shared) until :meth:`release_reading` (or until this object
        is dropped): a ``prepare`` then waits before it rewrites or removes a volume (it crashed a
        training that read it, with an IndexError). Several readers share it."""
        if getattr(self, "_reader", None) is not None:
            return
        fd = _open_lock(self.root / READERS_LOCK_NAME, self.root)
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MedvaeError("a `medvae prepare` is changing this store's volumes now; wait for it to finish",
                              self.root) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            return
        self._reader = os.fdopen(fd, "rb")  # a file object: closed (the lock released) when dropped too
        try:
            changed = (self.root / INDEX_NAME).stat().st_mtime_ns != self._index_stamp
        except OSError:
            changed = True
        if changed:  # a prepare changed it after this object read the index: its volumes may differ
            self.release_reading()
            raise MedvaeError("the store changed while it was opened (a `medvae prepare` ran); start again",
                              self.root)

    def release_reading(self) -> None:
        """Let a ``prepare`` change the volumes again (:meth:`hold_for_reading`)."""
        reader, self._reader = getattr(self, "_reader", None), None
        if reader is not None:
            reader.close()

    def record(self, key: str) -> StoreRecord:
        for r in self.records:
            if r.key == key:
                return r
        raise KeyError(key)

    def volume_path(self, key: str) -> Path:
        return self.root / "volumes" / f"{key}.npy"

    def open_volume(self, key: str) -> np.ndarray:
        """The normalized volume ``key`` as a read-only memory map of shape ``(Z, X, Y)``."""
        path = self.volume_path(key)
        try:
            return np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:  # cut off: "ValueError: EOF: reading array header", a traceback
            why = os_reason(exc) if isinstance(exc, OSError) else str(exc)
            raise MedvaeError(f"cannot read this store volume ({why}): the store is damaged; prepare it again "
                              "into a new folder", path) from None

    def read_slice(self, key: str, k: int) -> np.ndarray:
        """Normalized slice ``k`` of volume ``key`` (``(X, Y)`` float32, read from disk)."""
        return np.array(self.open_volume(key)[k], dtype=np.float32)


@dataclass
class PrepareReport:
    """What :func:`prepare_store` did: keys added, skipped and removed, and failures ``(row, message)``."""

    store: Path
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


def _write_index(root: Path, info: dict[str, Any], records: Iterable[StoreRecord]) -> None:
    # readable header, one line per volume (the index of a large store stays a few MB)
    head = json.dumps({**info, "volumes": []}, indent=1)[:-1].rstrip().removesuffix("[]")
    lines = ",\n".join("  " + json.dumps(asdict(r)) for r in records)
    with atomic_output(root / INDEX_NAME, kind="file", overwrite=True) as tmp:
        tmp.write_text(f"{head}[\n{lines}\n ]\n}}\n")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def prepare_store(manifest: str | os.PathLike | Sequence[ManifestEntry], store: str | os.PathLike, *,
                  intensity: IntensityPolicy | None = None, val_fraction: float = 0.2, seed: int = 0,
                  dtype: str = "float32", progress: bool = False, wait: bool = True) -> PrepareReport:
    """Read, normalize and write every scan of a manifest into a slice store (incrementally).

    Each scan is read once with :func:`medvae.io.load_scan`, normalized with ``intensity`` (the
    policy the model will be trained with) and written slice by slice into ``volumes/<key>.npy``
    (atomically). Scans already in the store with an unchanged fingerprint are skipped; a changed
    source is prepared again. A scan that cannot be read is reported in ``failed`` and the others
    go on; the store then records those rows, and :class:`SliceStore` refuses it until a run reads
    every row. The store follows the manifest: a volume whose row left the manifest, or whose scan
    can no longer be read, is removed (``removed``), and a row whose subject changed moves its
    volume to that subject (and to its split). The index is rewritten (atomically) every few
    seconds and at the end, also when interrupted; until a run finishes it is marked incomplete,
    and :class:`SliceStore` (training) refuses it. A volume written but not yet indexed is simply
    prepared again by the next run.

    One prepare at a time writes a store: it holds an exclusive ``flock`` on the store's
    ``.medvae-prepare.lock`` while it runs, and a second one waits for it (``wait``), then runs on
    what the first left, as if they had run one after the other. The kernel releases the lock when
    its process dies, so a killed prepare never blocks the next. A change of a scan is detected by
    its size and mtime, confirmed by ctime and content (see :func:`source_fingerprint`).

    Parameters
    ----------
    manifest : str, PathLike or sequence of ManifestEntry
        A manifest file (see :func:`read_manifest`) or its entries.
    store : str or PathLike
        The store folder (created when missing).
    intensity : IntensityPolicy, optional
        Default ``IntensityPolicy()``. An existing store keeps its own policy: a different one is
        refused.
    val_fraction, seed : float, int
        Split of subjects without an explicit split (:func:`subject_split`). A subject already in
        the store keeps its split.
    dtype : {"float32", "float16"}
        How the normalized values are stored. ``float16`` halves the store (a step of at most 2**-11
        of the window in [0, 1], about 1 HU in the default CT window; values above it are not
        clipped and get coarser steps, 2**-10, about 2 HU, up to one window width above its top, 2**-9
        beyond: far below any noise trained on), for stores that must be copied to another machine. An existing store keeps its own.
    progress : bool
        Show progress on stderr (:func:`medvae.progress.progress`).
    wait : bool
        When another prepare holds the store, wait for it to finish (saying so once on the log), so
        that every task of a Slurm array may run ``prepare`` before training; ``False`` raises
        :class:`MedvaeError` at once instead.

    Returns
    -------
    PrepareReport

    Raises
    ------
    MedvaeError
        A bad manifest, a store of another intensity policy or dtype, or (``wait=False``) a store
        another prepare holds.

    Examples
    --------
    >>> r = prepare_store("dataset.csv", "store/")            # doctest: +SKIP
    >>> len(r.added), len(r.skipped), r.failed                 # doctest: +SKIP
    (12, 0, [])
    """
    intensity = intensity or IntensityPolicy()
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, not {dtype!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], not {val_fraction}")
    source = None
    if isinstance(manifest, (str, os.PathLike)):
        source = Path(manifest)
        entries = read_manifest(source)
    else:
        entries = list(manifest)
        _check_subject_splits(entries, None)
    root = Path(store)
    if root.exists() and not root.is_dir():
        raise MedvaeError("is a file; give a folder for the store", root)
    root_r = root.resolve()
    for e in entries:  # the store must not write into a scan's series folder, nor hold a scan
        src = Path(e.path).resolve()
        if root_r == src or src in root_r.parents or root_r in src.parents:
            raise MedvaeError(f"the store folder overlaps the input {e.path} (manifest row {e.row}); choose "
                              "a folder outside the scans", root)
    refuse_repeated_scans(entries, source)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MedvaeError(f"cannot create the store folder ({exc.strerror or exc})", root) from None
    readers = _Readers(root, wait=wait)
    with _prepare_lock(root, wait=wait):  # the index is read and written only under the lock
        try:
            return _prepare_locked(entries, source, root, intensity=intensity, val_fraction=val_fraction,
                                   seed=seed, dtype=dtype, progress=progress, readers=readers)
        finally:
            readers.close()


_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP)  # a file system without flock: run unlocked


def _open_lock(path: Path, root: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_RDWR: NFS emulates flock by fcntl
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES):  # a read-only store: nobody can change it
            return None
        raise MedvaeError(f"cannot open the store's lock ({exc.strerror or exc})", root) from None


class StoreBusy(MedvaeError):
    """A training reads the store and ``prepare(wait=False)`` would change its volumes: the whole prepare
    stops (never one row's failure, which dropped a readable scan's volume from the index)."""


class _Readers:
    """The exclusive side of :data:`READERS_LOCK_NAME`, taken by a prepare only once it is about to
    rewrite or remove a volume (adding volumes disturbs no reader), and held to its end."""

    def __init__(self, root: Path, *, wait: bool) -> None:
        self.root, self.wait, self.fd = root, wait, None

    def exclude(self) -> None:
        if self.fd is not None:
            return
        fd = _open_lock(self.root / READERS_LOCK_NAME, self.root)
        if fd is None:
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not self.wait:
                    raise StoreBusy("a training is reading this store, whose volumes this prepare would "
                                      "change; wait for it to finish, or run without --no-wait to wait for it",
                                      self.root) from None
                log.warning("%s: a training is reading this store; waiting for it to finish before changing "
                            "its volumes", self.root)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            return
        except BaseException:  # refused (--no-wait), or Ctrl-C while waiting
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@contextlib.contextmanager
def _prepare_lock(root: Path, *, wait: bool) -> Iterator[None]:
    """Hold the exclusive ``flock`` of the store's :data:`LOCK_NAME` (see :func:`prepare_store`).

    The lock file is removed (while still held) on release, as :mod:`medvae.io.atomic` does for
    outputs: a waiter that then finds it gone, or replaced, opens the new one. A lock file left by a
    killed process holds no lock.
    """
    path = root / LOCK_NAME
    told = False
    fd: int | None = None
    while fd is None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # O_RDWR: NFS emulates flock by fcntl
        except OSError as exc:
            raise MedvaeError(f"cannot write in the store folder ({exc.strerror or exc})", root) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise MedvaeError("another `medvae prepare` holds this store (it is still running); "
                                      "wait for it to finish, or run without --no-wait to wait for it",
                                      root) from None
                if not told:  # the store path only: it is the user's output, never an input's name
                    log.warning("%s: another `medvae prepare` holds this store; waiting for it to finish",
                                root)
                    told = True
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            # e.g. Lustre mounted without -o flock: refusing would make prepare unusable there
            log.warning("%s: this file system cannot lock files; make sure no other `medvae prepare` "
                        "writes this store at the same time", root)
            fd = -1
            break
        except BaseException:  # MedvaeError, or Ctrl-C while waiting
            os.close(fd)
            raise
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder we waited for removed this file: lock the one there now
        fd = None
    try:
        yield
    finally:
        if fd >= 0:
            with contextlib.suppress(OSError):  # while still held, so no one locks a removed file
                os.unlink(path)
            os.close(fd)


def _prepare_locked(entries: list[ManifestEntry], source: Path | None, root: Path, *,
                    intensity: IntensityPolicy, val_fraction: float, seed: int, dtype: str,
                    progress: bool, readers: _Readers) -> PrepareReport:
    """The body of :func:`prepare_store`, run while holding the store's lock."""
    from medvae import __version__
    from medvae.io import load_scan

    if (root / INDEX_NAME).is_file():
        existing = SliceStore(root, allow_incomplete=True)
        if existing.intensity != intensity:
            raise MedvaeError(f"the store was prepared with intensity {existing.intensity.to_dict()}, "
                              f"not {intensity.to_dict()}; use a new store folder", root)
        if existing.dtype != dtype:
            raise MedvaeError(f"the store holds {existing.dtype} volumes, not {dtype}; use a new store folder",
                              root)
        info, records = existing.info, {r.key: r for r in existing.records}
        was = (info.get("val_fraction"), info.get("seed"))
        if None not in was and was != (val_fraction, seed):  # its subjects keep their splits: one rule per store
            raise MedvaeError(f"the store's subjects were split with val_fraction {was[0]} and seed {was[1]}, not "
                              f"{val_fraction} and {seed}; pass those, or use a new store folder", root)
    else:
        info = {"format": STORE_FORMAT, "version": STORE_VERSION, "created": _now(),
                "intensity": intensity.to_dict(), "layout": f"volumes/<key>.npy {dtype} (Z, X, Y)",
                "dtype": dtype}
        records = {}
    info.update(medvae_version=__version__, updated=_now(), val_fraction=val_fraction, seed=seed)

    # the store follows the manifest: volumes of rows no longer listed go (a scan withdrawn from the
    # data set must not be trained on), and a volume takes its row's current subject
    # the index follows the manifest's order (as training in memory reads it): a row that left and came
    # back is where the manifest lists it, not last, so the same data trains and is dealt to ranks alike
    listed = {volume_key(e): e for e in entries}
    indexed = set(records)  # the volumes a training of this store may be reading
    dropped = [k for k in records if k not in listed]
    if dropped:  # before the index changes: refused (--no-wait) with the store as it was
        readers.exclude()
    for k in dropped:
        del records[k]
    # the split of every subject: explicit > already in the store (a volume still listed under that
    # subject) > hash
    split_of: dict[str, str] = {}
    for k, r in records.items():
        if listed[k].subject == r.subject:
            split_of.setdefault(r.subject, r.split)
    for e in entries:
        if e.split and split_of.get(e.subject, e.split) != e.split:
            raise MedvaeError(f"manifest row {e.row}: subject {e.subject!r} is already in the store as "
                              f"'{split_of[e.subject]}', not '{e.split}'", source)
        if e.split:
            split_of[e.subject] = e.split
    for e in entries:
        split_of.setdefault(e.subject, subject_split(e.subject, val_fraction=val_fraction, seed=seed))

    for k, r in records.items():  # subject and split follow the manifest without reading the scan again
        subject = listed[k].subject
        if (r.subject, r.split) != (subject, split_of[subject]):
            # the key and the splits only: subject labels are often patient IDs, which never reach logs
            log.info("volume %s: its manifest subject changed; split %s -> %s", k, r.split, split_of[subject])
            r.subject, r.split = subject, split_of[subject]

    (root / "volumes").mkdir(parents=True, exist_ok=True)
    report = PrepareReport(store=root, removed=list(dropped))
    info["complete"] = False  # until this run finishes: training refuses a half-prepared store
    info.pop("failed_rows", None)  # this run tries them again
    _write_index(root, info, (records[k] for k in listed if k in records))
    items = entries
    if progress:
        from medvae.progress import progress as show_progress

        items = show_progress(entries, total=len(entries), desc="prepare", unit="scan")
    last_write = time.monotonic()
    try:
        for e in items:
            key = volume_key(e)
            try:
                # the times before the bytes: a change while this row is read shows up next run
                fp, ctime = _source_stamps(e.path) if Path(e.path).exists() else ("", "")
                old = records.get(key)
                given = (e.modality or "").upper()
                if old is None:
                    same_modality = False
                elif old.modality_given is None:  # recorded before the field: as then
                    same_modality = not given or given == old.modality
                else:  # a modality given, then left to the guess, is read again (it stayed as given)
                    same_modality = given == old.modality_given
                if (old is not None and old.fingerprint == fp and same_modality and (root / old.file).is_file()
                        and _unchanged(old, e.path, ctime)):
                    old.source_ctime = ctime  # after a chmod, read once, then stat only again
                    report.skipped.append(key)
                    continue
                scan = load_listed_scan(e.path, series=e.series_uid, modality=e.modality)
                content = source_digest(e.path)
                if old is not None:  # a changed scan: its volume is rewritten, under no reader
                    readers.exclude()
                rec = _write_volume(root, key, scan, intensity, dtype, row=e.row)
            except StoreBusy:
                raise
            except MedvaeError as exc:
                report.failed.append((e.row, str(exc)))
                log.info("manifest row %d failed: %s", e.row, exc)
                if key in records:  # the stored volume is of a scan that is gone or changed: it goes
                    readers.exclude()  # before the index drops it (refused under --no-wait: the store as it was)
                    del records[key]
                    report.removed.append(key)
                continue
            records[key] = StoreRecord(
                key=key, subject=e.subject, modality=scan.modality, split=split_of[e.subject],
                shape=list(scan.array.shape), window=rec["window"], foreground=rec["foreground"],
                source_sha256=_sha(_abs(e.path)), fingerprint=fp, series_uid=e.series_uid,
                spacing=[round(s, 6) for s in scan.spacing], prepared=_now(), source_ctime=ctime,
                source_content=content, modality_given=(e.modality or "").upper())
            report.added.append(key)
            del scan
            if time.monotonic() - last_write > INDEX_EVERY_S:  # a killed run keeps most of its work
                _write_index(root, info, (records[k] for k in listed if k in records))
                last_write = time.monotonic()
        if report.failed:  # training refuses a store that lacks rows of its manifest
            info["failed_rows"] = sorted(row for row, _ in report.failed)
        info["complete"] = True
    finally:  # also on Ctrl-C: what was written is indexed (a volume written but not indexed is redone)
        _write_index(root, info, (records[k] for k in listed if k in records))
    # volumes no longer indexed (removed rows, or written by a run killed before indexing them)
    kept = {f"{k}.npy" for k in records}
    for f in (root / "volumes").glob("*.npy"):  # only medvae's own names: 24 hex digits
        if f.name not in kept and len(f.stem) == 24 and all(c in "0123456789abcdef" for c in f.stem):
            if f.stem in indexed:  # a training may be reading it
                readers.exclude()
            f.unlink(missing_ok=True)
    return report


def _write_volume(root: Path, key: str, scan, intensity: IntensityPolicy, dtype: str, *,
                  row: int = 0) -> dict[str, Any]:
    """Normalize ``scan`` slice by slice into ``volumes/<key>.npy`` (no second full-volume copy).
    Values beyond what ``dtype`` holds (float16: ±65504 windows) are clipped to it: stored as inf, they
    stopped a training far from the store with a traceback naming no volume."""
    arr = scan.array
    window = intensity.window_for(arr, scan.modality)
    X, Y, Z = arr.shape
    fg = []
    limit = float(np.finfo(np.dtype(dtype)).max)
    clipped = 0
    t = time.perf_counter()
    with atomic_output(root / "volumes" / f"{key}.npy", kind="file", overwrite=True) as tmp:
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype), shape=(Z, X, Y))
        for k in range(Z):
            sl = normalize(arr[:, :, k], window)
            beyond = np.abs(sl) > limit
            if beyond.any():
                clipped += int(np.count_nonzero(beyond))
                sl = np.clip(sl, -limit, limit)
            mm[k] = sl
            # of what is stored, in the window it was stored in
            fg.append(foreground_fraction(mm[k].astype(np.float32), scan.modality, window=window))
        mm.flush()
        del mm
    if clipped:
        log.warning("manifest row %d: %d voxel(s) lie beyond what %s holds (%g windows from the window's low "
                    "end) and are stored clipped to it", row, clipped, dtype, limit)
    log.debug("volume %s: %s in %.1f s", key, arr.shape, time.perf_counter() - t)
    return {"window": [float(window[0]), float(window[1])], "foreground": fg}
