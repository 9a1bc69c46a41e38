"""DICOM reading with pydicom (and a MONAI ``ImageReader`` over it).

:func:`open_series` reads the headers of a series (order, geometry, checks) and
:meth:`DicomSeries.read` decodes a range of its files; :func:`read_volume` reads a whole series.
Writing a derived series is :mod:`medvae.io.derived_series`.

``MedvaeDicomReader`` plugs :func:`read_volume` into ``monai.transforms.LoadImage``. Unlike MONAI's
``PydicomReader`` it reads enhanced multi-frame files along their frames (geometry from the
Per-frame / Shared Functional Groups: PixelMeasuresSequence, PlanePositionSequence,
PlaneOrientationSequence, PixelValueTransformationSequence), orders single-frame series along
the slice normal, takes the slice spacing from the positions, and turns every user-fixable
problem into a one-line :class:`~medvae.errors.MedvaeError` naming the file. The reader class is
built on first use: importing this module imports pydicom, not MONAI.

Examples
--------
>>> from monai.transforms import LoadImage                                  # doctest: +SKIP
>>> img = LoadImage(reader=MedvaeDicomReader(), image_only=True)("series/")  # doctest: +SKIP
>>> img.shape, img.affine                                                   # doctest: +SKIP
"""
from __future__ import annotations

import functools
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom

from medvae.errors import MedvaeError
from medvae.io.scan import Scan, printable

log = logging.getLogger(__name__)

#: LPS (DICOM patient coordinates) <-> RAS (nibabel/MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

#: The image storage SOP classes medvae restores: CT and MR, single-frame and enhanced
#: multi-frame, grayscale. Everything else (RT Dose, Segmentation, SR, presentation states, PET,
#: ultrasound, radiography, secondary capture, ...) is refused: its pixels are not a CT or MR
#: image, or its geometry and value scaling follow other rules (DoseGridScaling, SUV, palettes).
RESTORABLE_SOP_CLASSES = {
    pydicom.uid.CTImageStorage: "CT",
    pydicom.uid.MRImageStorage: "MR",
    pydicom.uid.EnhancedCTImageStorage: "CT",
    pydicom.uid.EnhancedMRImageStorage: "MR",
}
#: Enhanced multi-frame classes: rescale lives in functional groups, ImageType value 2 is PRIMARY.
ENHANCED_SOP_CLASSES = (pydicom.uid.EnhancedCTImageStorage, pydicom.uid.EnhancedMRImageStorage)
RESTORABLE_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")
#: Tolerance on ImageOrientationPatient: unit length and orthogonality of the two directions.
ORIENTATION_TOLERANCE = 1e-3


def _quiet(func):
    """Silence pydicom's UserWarnings (VR validation of odd but readable files) inside ``func``."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return func(*args, **kwargs)
    return wrapper


class SeriesChoiceError(MedvaeError):
    """A folder holds several series and none (or an unknown one) was chosen.

    ``series`` lists them as ``(uid, description, n_slices)``.
    """

    def __init__(self, message: str, path, series: list[tuple[str, str, int]]):
        super().__init__(message, path)
        self.series = series


class NotRestorableError(MedvaeError):
    """A readable DICOM object that medvae does not restore.

    Raised for a SOP class other than CT/MR image storage, a colour or palette image, or
    invalid geometry (zero PixelSpacing, degenerate ImageOrientationPatient). ``medvae info``
    still describes such a file; reading it for restoration, corruption or training refuses it.
    ``kind`` is ``"object"`` (what the file is) or ``"geometry"`` (its plane geometry).
    """

    def __init__(self, message: str, path=None, *, kind: str = "object") -> None:
        super().__init__(message, path)
        self.kind = kind


def series_uid(path: str | os.PathLike) -> str | None:
    """The SeriesInstanceUID of a DICOM file, read from its header alone; None when it has none or
    cannot be read (reading it for restoring names that problem)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:
        return None
    return str(ds.get("SeriesInstanceUID", "") or "") or None


def frame_count(path: str | os.PathLike) -> int:
    """NumberOfFrames of a DICOM file, read from its header alone; 1 when it has none or cannot be read
    (reading it for restoring names that problem)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["NumberOfFrames"])
    except Exception:
        return 1
    return _n_frames(ds)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file has the DICOM Part 10 ``DICM`` marker at byte 128.

    Files without the preamble (bare ACR-NEMA datasets) are not recognised.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _read(path: Path, *, headers_only: bool = False) -> pydicom.Dataset:
    try:
        with warnings.catch_warnings(record=True) as said:  # pydicom's VR validation chatter is not for users
            warnings.simplefilter("always", UserWarning)
            ds = pydicom.dcmread(path, stop_before_pixels=headers_only)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors on truncation...
        raise MedvaeError(f"not a readable DICOM file, truncated or corrupt "
                          f"({type(exc).__name__}: {exc})", path) from exc
    # compressed (encapsulated) pixel data cut short: pydicom warns and returns an empty dataset, which
    # was then taken for another file written over this one while the series was read
    cut = next((str(w.message) for w in said if "End of file reached before delimiter" in str(w.message)), None)
    if cut is not None:
        raise MedvaeError(f"not a readable DICOM file, truncated or corrupt ({cut.split(' found in file')[0]})", path)
    return ds


def _n_frames(ds) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _fg_value(ds, frame: int, seq: str, attr: str):
    """An attribute from the Per-frame, then Shared Functional Groups (None if absent)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if not items or index >= len(items):
            continue
        sub = items[index].get(seq)
        if sub and attr in sub[0]:
            value = sub[0][attr].value
            if value not in (None, ""):
                return value
    return None


def _frame_value(ds, frame: int, seq: str, attr: str):
    """Functional-group value for ``frame`` if present, else the top-level attribute."""
    value = _fg_value(ds, frame, seq, attr)
    if value is None:
        value = ds.get(attr)
        value = None if value in (None, "") else value
    return value


def _floats(value, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, int, float)):
        value = [value]
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


def rescale_of(ds, frame: int = 0) -> tuple[float, float]:
    """(slope, intercept) of ``frame``: PixelValueTransformationSequence, then top level; (1, 0)."""
    slope = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleSlope")
    inter = _frame_value(ds, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    s = _floats(slope, 1)
    i = _floats(inter, 1)
    return (s[0] if s and s[0] != 0 else 1.0), (i[0] if i else 0.0)


def value_units(ds) -> str | None:
    """The units of the rescaled values as the object states them (RescaleType, top level or in the
    Pixel Value Transformation functional group), upper case; None when not stated (HU for CT).

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.RescaleType = "us"
    >>> value_units(ds), value_units(Dataset())
    ('US', None)
    """
    value = _frame_value(ds, 0, "PixelValueTransformationSequence", "RescaleType")
    text = str(value or "").strip().upper()
    return text or None


#: real-world value units that are Hounsfield units (UCUM's code, and what writers put instead)
_HU_CODES = {"[HNSF'U]", "HU", "HOUNSFIELD UNIT", "HOUNSFIELD UNITS"}  # compared upper case


def _real_world_units(ds) -> str | None:
    """The units a RealWorldValueMappingSequence states (a functional group's, then the top level's)."""
    units = _fg_value(ds, 0, "RealWorldValueMappingSequence", "MeasurementUnitsCodeSequence")
    if units is None:
        mapping = ds.get("RealWorldValueMappingSequence")
        units = mapping[0].get("MeasurementUnitsCodeSequence") if mapping else None
    if not units:
        return None
    code = units[0]
    text = str(code.get("CodeValue") or code.get("CodeMeaning") or "").strip()
    return text or None


def not_hu_note(ds) -> str | None:
    """Why a CT object's values are not Hounsfield units, or None when they are HU.

    Not HU: a RescaleType other than HU or ``US`` (an iodine or density map states ``MGML``); with
    RescaleType HU, absent or ``US`` (unspecified, which many CT scanners write for HU values: 108 of
    the dev head CT's files), a real-world value mapping in other units, or an ImageType / FrameType
    of a perfusion map (``DERIVED\\PRIMARY\\PERFUSION\\RCBF`` in ml/100ml/s: it was called HU).

    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.RescaleType = "MGML"
    >>> not_hu_note(ds)
    'RescaleType MGML: values in MGML, not HU'
    >>> ds = Dataset(); ds.RescaleType = "US"; ds.ImageType = ["DERIVED", "PRIMARY", "PERFUSION", "RCBF"]
    >>> not_hu_note(ds)
    'ImageType PERFUSION RCBF: a perfusion map, not HU'
    """
    units = value_units(ds)
    if units not in (None, "HU", "US"):
        return f"RescaleType {units}: values in {units}, not HU"
    if units == "HU":
        return None
    real = _real_world_units(ds)
    if real is not None and real.upper() not in _HU_CODES:
        return f"real-world values in {real}, not HU"
    kinds = [str(v).upper() for v in (_frame_value(ds, 0, "CTImageFrameTypeSequence", "FrameType")
                                      or ds.get("ImageType") or [])]
    # PERFUSION in the third value describes the acquisition (its dynamic frames are HU); a fourth value
    # such as RCBF, RCBV, MTT or TTP names the derived map
    if len(kinds) > 3 and kinds[2] == "PERFUSION" and kinds[3] not in ("", "NONE"):
        return f"ImageType {' '.join(kinds[2:])}: a perfusion map, not HU"
    return None


def warn_if_not_hu(datasets, modality: str | None, src, *, hint: str = "") -> None:
    """Log a warning when a CT's values are not HU (:func:`not_hu_note`): medvae's CT window, the
    model's and the corruptions' and the evaluation's, is -1000..1000 HU. ``hint``: what to do instead."""
    if str(modality or "").upper() != "CT" or not datasets:
        return
    note = not_hu_note(datasets[0])
    if note:
        log.warning("%s: %s; medvae's CT window is -1000..1000 HU, which may not suit these values%s", src, note,
                    f" ({hint})" if hint else "")


def warn_if_modality_overridden(datasets, modality: str | None, src) -> None:
    """Log a warning when a given ``modality`` contradicts the DICOM's own Modality (CT against MR): the
    scan is then scaled as the other modality (an MR in the CT window of -1000..1000 HU) without a word.
    A tag other than CT or MR (OT, say) is nothing to contradict."""
    if not modality or not datasets:
        return
    tag = str(datasets[0].get("Modality", "") or "").strip().upper()
    if tag in ("CT", "MR") and tag != str(modality).upper():
        # "as given": --modality, or a manifest row's modality column in a batch
        log.warning("%s: its DICOM Modality is %s, but it is treated as %s, as given", src, tag, str(modality).upper())


@dataclass
class _Frame:
    ds_index: int
    frame: int
    position: np.ndarray | None
    orientation: np.ndarray
    pixel_spacing: tuple[float, float] | None
    shape: tuple[int, int]


@dataclass
class DicomVolume:
    """What :meth:`MedvaeDicomReader.read` returns: decoded voxels plus source datasets."""

    array: np.ndarray                 # (X, Y, Z) float32, rescale applied
    affine: np.ndarray                # RAS
    datasets: list = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    path: Path | None = None
    series_uid: str | None = None
    description: str | None = None
    modality: str = "OT"


def _collect_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MedvaeError("not a file or folder (a device, pipe or socket)" if path.exists() else
                          "no such file or folder", path)
    files = folder_files(path)
    if not files:
        raise MedvaeError("empty folder: no files to read", path)
    dicoms = [f for f in files if _marked(f)]
    if not dicoms:
        nifti = [f.name for f in files if f.name.lower().endswith((".nii", ".nii.gz"))]
        hint = f"; to read NIfTI give the file path, e.g. {nifti[0]}" if nifti else ""
        raise MedvaeError(f"no DICOM files in this folder ({len(files)} other file(s)){hint}", path)
    marked = set(dicoms)
    skipped = [f for f in files if f not in marked]
    # an empty or cut-off slice (an interrupted copy) has no marker either; dropped, an end slice
    # would shorten the series without a word
    slice_names = {_name_pattern(f) for f in dicoms}
    for f in skipped:
        size = f.stat().st_size
        if size < 132 and _named_like_a_slice(f, slice_names):
            raise MedvaeError(f"{'an empty file' if size == 0 else f'only {size} bytes'}, too short for a DICOM "
                              "file (cut off?): it would be missing from the series", f)
    # a file named like DICOM, or starting like a bare dataset (group 0002/0008 tag, no preamble),
    # is probably a slice of the series: say so, or the series would silently lose it
    suspect = [f for f in skipped if f.suffix.lower() in DICOM_SUFFIXES or _bare_dataset(f)]
    if suspect:
        names = ", ".join(f.name for f in suspect[:3]) + (", ..." if len(suspect) > 3 else "")
        log.warning("%s: ignoring %d file(s) that look like DICOM but have no DICM marker at byte "
                    "128 (%s); add the preamble (pydicom: dcmwrite with enforce_file_format=True) to "
                    "read them", path, len(suspect), names)
    if len(skipped) > len(suspect):
        log.info("%s: ignoring %d non-DICOM file(s)", path, len(skipped) - len(suspect))
    return dicoms


def folder_files(path: Path, *, strict: bool = True) -> list[Path]:
    """The files under ``path`` (hidden names left out), sorted, as the reader takes them. A folder it
    cannot list, or a link to a file that is missing (a git-annex file not fetched), is an error: the
    series would lose its slices without a word (rglob skipped them). With ``strict=False`` they are
    left out. Links to folders are not followed (said once)."""
    from medvae.errors import os_reason

    def refuse(exc: OSError) -> None:
        if strict:
            raise MedvaeError(f"cannot read this folder ({os_reason(exc)}): its slices would be missing from "
                              "the series", exc.filename or path)

    files, linked = [], []
    for root, dirs, names in os.walk(path, onerror=refuse):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        linked.extend(d for d in dirs if (Path(root) / d).is_symlink())
        for n in names:
            f = Path(root) / n
            if n.startswith("."):
                continue
            if f.is_file():
                files.append(f)
            elif strict and f.is_symlink() and not f.exists():
                raise MedvaeError("a link to a file that is missing: this slice would be missing from the series",
                                  f)
    if linked and strict:
        log.warning("%s: links to folders are not followed; ignoring %d (%s)", path, len(linked),
                    ", ".join(sorted(linked)[:3]) + (", ..." if len(linked) > 3 else ""))
    return sorted(files)


def _marked(path: Path) -> bool:
    """:func:`is_dicom_file`, but a file it cannot read is an error, not a file to leave out."""
    from medvae.errors import os_reason

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise MedvaeError(f"cannot read this file ({os_reason(exc)}): it would be missing from the series",
                          path) from None
    return len(head) == 132 and head[128:132] == b"DICM"


def _name_pattern(path: Path) -> str:
    """The shape of a file name: runs of digits as ``#`` (``IM0001`` and ``IM0002`` share ``im#``), and in a
    name of hexadecimal digits (and ``.-_``) every digit as ``x`` (``EE5F2A1B``, UUIDs: PACS exports)."""
    name = path.name.lower()
    # a name of hexadecimal digits: 8 or more of them (EE5F2A1B, ABCDEFAB and 12345678 alike: a slice dropped
    # unseen is worse than a DEADBEEF note refused by name), or fewer with a letter among them (0001 keeps
    # the digit shape, so that a FACE note beside 0001, 0002 is no slice)
    hexadecimal = re.fullmatch(r"[0-9a-f._-]+", name)
    if hexadecimal and (sum(ch not in "._-" for ch in name) >= 8 or re.search(r"[a-f]", name)):
        return re.sub(r"[0-9a-f]", "x", name)
    return re.sub(r"\d+", "#", name)


def _named_like_a_slice(path: Path, slice_names: set[str]) -> bool:
    """A DICOM suffix, a name of digits and dots (a UID), the shape of the series' own slice names
    (``IM0003`` beside ``IM0001``, hexadecimal beside hexadecimal), or no suffix and mostly digits
    (``I0004``): a slice, unlike a ``LOCKFILE``, ``VERSION`` or notes beside them."""
    name = path.name
    digits = sum(ch.isdigit() for ch in name)
    return (path.suffix.lower() in DICOM_SUFFIXES or bool(re.fullmatch(r"[\d.]+", name))
            or _name_pattern(path) in slice_names or (not path.suffix and 2 * digits >= len(name)))


def _bare_dataset(path: Path) -> bool:
    """True when the file starts with a little-endian group 0002 or 0008 tag (no preamble)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] in (b"\x02\x00", b"\x08\x00") and len(head) == 4


def _pixel_bytes_problem(ds, path: Path) -> str | None:
    """Why the header's image cannot fit in the file (NumberOfFrames, Rows or Columns far beyond its
    pixel data), for native (uncompressed, not deflated) pixel data; None when it can, or when the size
    cannot be told from the header."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        frames, samples = _n_frames(ds), int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsAllocated") or 0)
        if ts is None or ts.is_compressed or ts.is_deflated or not (rows and cols and bits):
            return None
        size = path.stat().st_size
    except (TypeError, ValueError, OSError, AttributeError):
        return None
    need = rows * cols * frames * samples * bits // 8
    # more than twice the file: a gross mismatch (chroma-subsampled YBR_FULL_422 stores 2 samples, not 3;
    # a file cut short by a little is named by the decoder), or no PixelData at all, which it names too
    if need <= 2 * size or not _has_pixel_tag(path):
        return None
    return (f"the header promises {frames} frame(s) of {rows}x{cols} pixels ({need:,} bytes of pixel data), "
            f"but the file has {size:,} bytes: truncated, or a wrong NumberOfFrames, Rows or Columns")


def _has_pixel_tag(path: Path) -> bool:
    """Whether the file holds a PixelData tag (7FE0,0010), little- or big-endian."""
    import mmap

    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return m.find(b"\xe0\x7f\x10\x00") >= 0 or m.find(b"\x7f\xe0\x00\x10") >= 0
    except (OSError, ValueError):  # an empty file cannot be mapped
        return False


def _group_series(files: list[Path]) -> dict[str, list[tuple[Path, Any]]]:
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        ds = _read(f, headers_only=True)
        sop_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if sop_class == MEDIA_STORAGE_DIRECTORY:  # a DICOMDIR index, not an image
            continue
        if _sop_class(ds) in RESTORABLE_SOP_CLASSES and not (ds.get("Rows") and ds.get("Columns")):
            # pydicom reads a header cut short without complaint; grouped as an "unknown" series, the file
            # would be a second series, and choosing the first would silently drop the slice
            raise MedvaeError("not a readable DICOM file, truncated or corrupt (an image header without Rows "
                              "and Columns)", f)
        if _sop_class(ds) is None and not ds.get("SeriesInstanceUID") and not (ds.get("Rows") and ds.get("Columns")):
            # cut before its SOP class (or junk behind a DICM marker): once an "unknown" series of its own
            raise MedvaeError("not a readable DICOM file, truncated or corrupt (no SOP class, no series, no "
                              "image header)", f)
        uid = printable(ds.get("SeriesInstanceUID", "") or "") or "unknown"  # it is printed and compared
        groups.setdefault(uid, []).append((f, ds))
    return groups


def _series_table(groups) -> list[tuple[str, str, int]]:
    table = []
    for uid, members in groups.items():
        desc = printable(members[0][1].get("SeriesDescription", "") or "")
        table.append((uid, desc, sum(_n_frames(ds) for _, ds in members)))
    return table


def series_listing(table) -> str:
    """``UID (N slices); ...``: the series of an error message by UID and size, never by description (a
    SeriesDescription can hold a patient's name, and stderr is a batch job's log)."""
    return "; ".join(f"{uid} ({n} slice{'' if n == 1 else 's'})" for uid, _desc, n in table)


def format_series_table(table) -> str:
    """:func:`series_listing` with where to find the descriptions (``medvae info FOLDER``)."""
    return series_listing(table) + " (medvae info lists their descriptions)"


@_quiet
def list_series(folder: str | os.PathLike) -> list[tuple[str, str, int]]:
    """List the DICOM series under ``folder`` (or of one file).

    Returns
    -------
    list of (uid, description, n_slices)
        ``n_slices`` counts frames of multi-frame files.

    Examples
    --------
    >>> list_series("dev/dicom/series_ct_head")  # doctest: +SKIP
    [('1.2.826.0.1.3680043.8.498.1002', 'CT head sample series', 108)]
    """
    path = Path(folder)
    if not path.exists():
        raise MedvaeError("no such file or folder", path)
    return _series_table(_group_series(_collect_files(path)))


def check_codec(ds, path: Path) -> None:
    """Refuse, in one line naming what to install, pixel data that no installed codec decodes."""
    from pydicom.pixels import get_decoder

    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is None:
        return
    name = f"{ts.name} ({ts})" if ts.name != str(ts) else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise MedvaeError(f"no codec for transfer syntax {name}: pydicom cannot decode it", path) from exc
    if not decoder.is_available:
        missing = ", or ".join(decoder.missing_dependencies) or "a pixel data plugin"
        raise MedvaeError(f"no codec installed for transfer syntax {name}; install {missing}", path)


def _decode(ds, path: Path) -> np.ndarray:
    """Decoded pixels of ``ds`` as float32 (frames, rows, cols), rescale applied."""
    from pydicom.pixels import apply_rescale, pixel_array

    if not any(t in ds for t in PIXEL_TAGS):
        sop = getattr(ds.get("SOPClassUID"), "name", None) or ds.get("SOPClassUID") or "unknown"
        hint = "" if "Rows" in ds else "; the file may be truncated"
        raise MedvaeError(f"no pixel data in this DICOM file (SOP class {sop}){hint}", path)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1:
        raise MedvaeError(f"colour images are not supported (SamplesPerPixel {spp}, "
                          f"{ds.get('PhotometricInterpretation', '?')})", path)
    check_codec(ds, path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            raw = pixel_array(ds)
    except NotImplementedError as exc:
        ts = ds.file_meta.TransferSyntaxUID
        raise MedvaeError(f"no codec for transfer syntax {ts.name} ({ts}): {exc}", path) from exc
    except Exception as exc:  # short pixel data, bad encapsulation, codec failure
        raise MedvaeError(f"cannot decode the pixel data, file truncated or corrupt "
                          f"({type(exc).__name__}: {exc})", path) from exc
    nf = _n_frames(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if raw.size != nf * rows * cols:  # the header's size is wrong, or the data is another image's
        raise MedvaeError(f"the pixel data holds {raw.size} values, but the header's {nf} frame(s) of "
                          f"{rows} x {cols} (NumberOfFrames, Rows, Columns) need {nf * rows * cols}: the "
                          "header does not describe the pixel data", path)
    raw = raw.reshape((nf,) + raw.shape[-2:])  # single frame (R, C) -> (1, R, C)
    # pydicom's apply_rescale ignores functional groups, and a rescale of one tag alone (a lone
    # RescaleIntercept -1024 came out 1024 HU high): the writer's rescale_of rule, as GDCM/ITK read it
    has = [] if "ModalityLUTSequence" in ds else [
        any(_frame_value(ds, k, "PixelValueTransformationSequence", tag) is not None
            for tag in ("RescaleSlope", "RescaleIntercept")) for k in range(nf)]
    if any(has) and not all(has):  # which units would the others be in?
        raise MedvaeError(f"frame {has.index(False) + 1} has no rescale (Pixel Value Transformation), while "
                          f"{sum(has)} other frames have one: their values cannot be told in one unit", path)
    if any(has):
        out = np.empty(raw.shape, dtype=np.float32)
        for k in range(nf):
            slope, inter = rescale_of(ds, k)
            out[k] = raw[k] * slope + inter
        return out
    return np.asarray(apply_rescale(raw, ds), dtype=np.float32)  # no rescale: a Modality LUT, or none


def _frames_of(ds, index: int) -> list[_Frame]:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = []
    for k in range(_n_frames(ds)):
        pos = _floats(_frame_value(ds, k, "PlanePositionSequence", "ImagePositionPatient"), 3)
        ori = _floats(_frame_value(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(_frame_value(ds, k, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ps is None:
            ps = _floats(ds.get("ImagerPixelSpacing"), 2)
        frames.append(_Frame(index, k, None if pos is None else np.array(pos),
                             np.array(ori if ori is not None else DEFAULT_ORIENTATION),
                             ps, (rows, cols)))
    return frames


def _slice_gap(ds) -> float:
    for attr, seq in (("SpacingBetweenSlices", "PixelMeasuresSequence"),
                      ("SliceThickness", "PixelMeasuresSequence")):
        v = _floats(_frame_value(ds, 0, seq, attr), 1)
        if v and v[0] > 0:
            return abs(v[0])
    return 1.0


def _cosines(orientation: np.ndarray) -> str:
    """Direction cosines as DICOM writes them: ``1\\0\\0\\0\\1\\0``."""
    return "\\".join(f"{float(v):.4g}" for v in np.round(orientation, 4) + 0.0)  # + 0.0: no "-0"


def _require_all_or_none(frames: list[_Frame], files) -> None:
    """A position or pixel spacing in some slices and not in others: refused, naming a slice without it.

    The series fell back to file order and SliceThickness (reversed against the others' positions), or
    blamed a neighbour's spacing, or took a slice without spacing for one with it."""
    for attr, tag in (("position", "ImagePositionPatient"), ("pixel_spacing", "PixelSpacing")):
        lacking = [fr for fr in frames if getattr(fr, attr) is None]
        if lacking and len(lacking) < len(frames):
            fr = lacking[0]
            where = f"frame {fr.frame + 1} of this file" if len(files) == 1 else "this slice"
            raise MedvaeError(f"{where} has no {tag}, while {len(frames) - len(lacking)} other slices of the series "
                              "have one: the series' geometry is unknown", files[fr.ds_index])


def _geometry(frames: list[_Frame], datasets, files) -> np.ndarray:
    """Affine (LPS) from per-slice geometry; frames are already in Z order."""
    _require_all_or_none(frames, files)
    f0 = frames[0]
    row_dir, col_dir = f0.orientation[:3], f0.orientation[3:]
    for fr in frames[1:]:
        if not np.allclose(fr.orientation, f0.orientation, atol=1e-4):
            raise MedvaeError("slices have different orientations (ImageOrientationPatient "
                              f"{_cosines(f0.orientation)} vs {_cosines(fr.orientation)}; a localizer or "
                              "a reformat mixed into the series?)", files[fr.ds_index])
    ps = f0.pixel_spacing
    if ps is None:
        log.warning("%s: no PixelSpacing; assuming 1 mm pixels", files[0])
        ps = (1.0, 1.0)
    for fr in frames[1:]:
        if fr.pixel_spacing is not None and not np.allclose(fr.pixel_spacing, ps, rtol=1e-4):
            raise MedvaeError(f"slices differ in pixel spacing ({list(ps)} vs "
                              f"{list(fr.pixel_spacing)})", files[fr.ds_index])
    normal = np.cross(row_dir, col_dir)
    affine = np.eye(4)
    affine[:3, 0] = row_dir * ps[1]   # X: along a row = increasing column index
    affine[:3, 1] = col_dir * ps[0]   # Y: down a column = increasing row index
    positions = [fr.position for fr in frames]
    n = len(frames)
    if all(p is not None for p in positions) and n >= 2:
        first, last = positions[0], positions[-1]
        affine[:3, 2] = (last - first) / (n - 1)
        gaps = np.diff([float(np.dot(p, normal)) for p in positions])
        mean = float(np.mean(gaps))
        if np.max(np.abs(gaps - mean)) > 0.01 * abs(mean) + 0.01:
            log.warning("%s: uneven slice spacing (%.3f to %.3f mm); using the mean %.3f mm",
                        files[0], float(np.min(np.abs(gaps))), float(np.max(np.abs(gaps))), abs(mean))
    else:
        if n >= 2:
            log.warning("%s: no ImagePositionPatient; slices ordered by InstanceNumber (frames: by their "
                        "order in the file) and spaced by SpacingBetweenSlices/SliceThickness", files[0])
        affine[:3, 2] = normal * _slice_gap(datasets[frames[0].ds_index])
    origin = positions[0] if positions[0] is not None else np.zeros(3)
    affine[:3, 3] = origin
    return affine


def slice_positions(datasets: Sequence) -> np.ndarray | None:
    """Each slice's position along the series' normal (mm), in Z order (a multi-frame file's frames
    along Z); None when a slice stores no ImagePositionPatient. Headers suffice.

    A missing slice of a series with uneven gaps is interpolated by these
    (:func:`medvae.slice_gaps.fill_missing_slices`), not by the slice indices.
    """
    frames = [fr for i, ds in enumerate(datasets) for fr in _frames_of(ds, i)]
    if not frames or any(fr.position is None for fr in frames):
        return None
    normal = np.cross(frames[0].orientation[:3], frames[0].orientation[3:])
    return np.array([float(np.dot(fr.position, normal)) for fr in frames])


def affine_position_error(datasets: Sequence, affine: np.ndarray) -> tuple[float, int]:
    """How far the slice positions of a series lie from where its affine puts them.

    A NIfTI file has one affine, so slice ``k`` lies at ``origin + k * slice_vector``; a DICOM
    series stores each slice's ImagePositionPatient. With a missing slice or uneven spacing the
    two differ (by up to half the gap), and a NIfTI written from the series would misplace slices.

    Parameters
    ----------
    datasets : headers of the series in Z order (a multi-frame file's frames run along Z).
    affine : the series' 4x4 RAS affine (:func:`open_series`).

    Returns
    -------
    (error_mm, slice) : the largest distance in mm and the 0-based slice where it occurs;
    ``(0.0, 0)`` when no slice stores a position.
    """
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)  # LPS_TO_RAS is its own inverse
    frames = [fr for i, ds in enumerate(datasets) for fr in _frames_of(ds, i)]
    errors = [(float(np.linalg.norm(fr.position - (lps[:3, 3] + k * lps[:3, 2]))), k)
              for k, fr in enumerate(frames) if fr.position is not None]
    return max(errors, default=(0.0, 0))


def _order_single_frames(members: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Sort single-frame files along the slice normal; refuse duplicates and size mismatches."""
    f0, d0 = members[0]
    size0 = (int(d0.get("Rows", 0) or 0), int(d0.get("Columns", 0) or 0))
    for f, ds in members[1:]:
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if size != size0:
            for g, other in ((f, ds), (f0, d0)):  # a non-image object is refused as such, not by its size
                problem = object_problem(other)
                if problem:
                    raise NotRestorableError(problem, g)
            raise MedvaeError(f"slices differ in size: {size[0]}x{size[1]} here, "
                              f"{size0[0]}x{size0[1]} in {f0.name}", f)
    if any(_n_frames(ds) > 1 for _, ds in members):
        raise MedvaeError("a series mixing several multi-frame files is not supported; "
                          "give one file", f0.parent)
    # position and orientation where the IOD keeps them: the top level, or an enhanced file's
    # functional groups (a series of single-frame enhanced files was ordered by InstanceNumber)
    planes = [_frames_of(ds, 0)[0] for _, ds in members]
    normal = np.cross(planes[0].orientation[:3], planes[0].orientation[3:])
    # one orientation: else _geometry names the mix (a tri-plane localizer is not a duplicate position)
    same_plane = all(np.allclose(p.orientation, planes[0].orientation, atol=1e-4) for p in planes)
    keyed = [(None if p.position is None else float(np.dot(p.position, normal)), f, ds)
             for p, (f, ds) in zip(planes, members)]
    if all(k[0] is not None for k in keyed):
        keyed.sort(key=lambda k: k[0])
        for (z0, fa, _), (z1, fb, _) in zip(keyed, keyed[1:]):
            if same_plane and abs(z1 - z0) < 1e-3:
                raise MedvaeError(f"duplicate slice position ({z0:.3f} mm along the normal) "
                                  f"shared with {fa.name}", fb)
    else:
        def inst(ds):
            try:
                return int(ds.get("InstanceNumber", 0) or 0)
            except (TypeError, ValueError):
                return 0
        keyed.sort(key=lambda k: inst(k[2]))
    return [(f, ds) for _, f, ds in keyed]


def _check_frame_order(frames: list[_Frame], path: Path) -> None:
    pos = [fr.position for fr in frames]
    if len(frames) < 2 or any(p is None for p in pos):
        return
    o = frames[0].orientation
    d = np.array([float(np.dot(p, np.cross(o[:3], o[3:]))) for p in pos])
    gaps = np.diff(d)
    if np.any(np.abs(gaps) < 1e-3):
        raise MedvaeError("duplicate frame positions in this multi-frame file (several stacks "
                          "or time points), not a single volume", path)
    if not (np.all(gaps > 0) or np.all(gaps < 0)):
        raise MedvaeError("frames are not ordered along the slice normal (multi-stack file); "
                          "not supported", path)


def sop_class_name(uid) -> str:
    """``"RT Dose Storage (1.2.840.10008.5.1.4.1.1.481.2)"``: pydicom's name and the UID.

    Examples
    --------
    >>> sop_class_name("1.2.840.10008.5.1.4.1.1.481.2")
    'RT Dose Storage (1.2.840.10008.5.1.4.1.1.481.2)'
    """
    name = pydicom.uid.UID(str(uid)).name
    return f"{name} ({uid})" if name != str(uid) else f"SOP class {uid}"


def _sop_class(ds) -> str | None:
    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None),
                                           "MediaStorageSOPClassUID", None)
    return str(uid).strip() if uid else None


_ACCEPTED = "CT Image, MR Image, Enhanced CT Image and Enhanced MR Image Storage"


def object_problem(ds) -> str | None:
    """Why the DICOM object ``ds`` is not an image medvae restores; None when it is one.

    Accepted: the SOP classes in :data:`RESTORABLE_SOP_CLASSES` (CT and MR, single-frame and
    enhanced multi-frame), grayscale (MONOCHROME1/2, one sample per pixel), 8 or 16 bits
    allocated. Only the header is needed (``stop_before_pixels`` datasets work).

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.SOPClassUID = pydicom.uid.SegmentationStorage
    >>> object_problem(ds)
    'Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4) is not restored: medvae restores CT Image, MR Image, Enhanced CT Image and Enhanced MR Image Storage only'
    """
    uid = _sop_class(ds)
    if uid is None:
        return ("no SOP Class UID (0008,0016): cannot tell whether this is a CT or MR image; "
                f"medvae restores {_ACCEPTED} only")
    if uid not in RESTORABLE_SOP_CLASSES:
        return f"{sop_class_name(uid)} is not restored: medvae restores {_ACCEPTED} only"
    name = pydicom.uid.UID(uid).name
    # a missing Image Pixel attribute (a truncated header) is left to the decoder to report
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    if photometric and photometric not in RESTORABLE_PHOTOMETRIC:
        return (f"PhotometricInterpretation {photometric} in a {name} object is not restored: "
                "medvae restores grayscale MONOCHROME1/MONOCHROME2 images only")
    spp = ds.get("SamplesPerPixel", 1)
    if spp not in (None, "", 1):
        return f"SamplesPerPixel {spp} in a {name} object is not restored: grayscale images only"
    # a Siemens mosaic tiles a whole volume into one image: restored as one slice, the network would
    # filter across tile borders and the geometry of a single 2-D image would be wrong
    image_type = [str(v).strip().upper() for v in (ds.get("ImageType") or [])]
    n_tiles = ds.get((0x0019, 0x100A))
    try:
        n_tiles = int(n_tiles.value) if n_tiles is not None else 0
    except (TypeError, ValueError):
        n_tiles = 0
    if "MOSAIC" in image_type or n_tiles > 1:
        count = f"{n_tiles} slices tiled" if n_tiles > 1 else "slices tiled"
        return (f"a Siemens mosaic ({count} in one image) in a {name} object is not restored: "
                "convert it to a volume first (dcm2niix, or nibabel.nicom.dicomwrappers) and give medvae "
                "the NIfTI")
    bits = ds.get("BitsAllocated")
    if bits is not None and bits not in (8, 16):
        return (f"BitsAllocated {bits} in a {name} object is not restored: medvae restores 8- and "
                "16-bit images only")
    return None


def _shown(value) -> str:
    """A DICOM value as DICOM writes it (``0\\0``)."""
    if isinstance(value, (str, bytes, int, float)):
        return str(value)
    try:
        return "\\".join(str(v) for v in value)
    except TypeError:
        return str(value)


def geometry_problem(ds) -> str | None:
    """Why the plane geometry of ``ds`` is invalid; None when it is valid or simply absent.

    Checked per frame (Per-frame, then Shared Functional Groups, then the top level):
    PixelSpacing (or ImagerPixelSpacing) must be two finite positive numbers,
    ImageOrientationPatient two orthogonal unit vectors (within
    :data:`ORIENTATION_TOLERANCE`), ImagePositionPatient three finite numbers. Missing values are
    not a problem here: the reader assumes 1 mm pixels / the axial orientation and says so.

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.PixelSpacing = ["0", "0"]
    >>> geometry_problem(ds)
    'PixelSpacing is 0\\\\0: the pixel spacing must be two positive numbers (mm)'
    """
    nf = _n_frames(ds)
    for k in range(nf):
        where = f" (frame {k + 1})" if nf > 1 else ""
        tag, raw = "PixelSpacing", _frame_value(ds, k, "PixelMeasuresSequence", "PixelSpacing")
        if raw is None:
            tag, raw = "ImagerPixelSpacing", ds.get("ImagerPixelSpacing") or None
        if raw is not None:
            ps = _floats(raw, 2)
            if ps is None or not np.all(np.isfinite(ps)) or min(ps) <= 0:
                return (f"{tag} is {_shown(raw)}{where}: the pixel spacing must be two positive "
                        "numbers (mm)")
        raw = _frame_value(ds, k, "PlaneOrientationSequence", "ImageOrientationPatient")
        if raw is not None:
            o = _floats(raw, 6)
            ok = o is not None and bool(np.all(np.isfinite(o)))
            if ok:
                r, c = np.array(o[:3]), np.array(o[3:])
                ok = (abs(np.linalg.norm(r) - 1) <= ORIENTATION_TOLERANCE
                      and abs(np.linalg.norm(c) - 1) <= ORIENTATION_TOLERANCE
                      and abs(float(np.dot(r, c))) <= ORIENTATION_TOLERANCE)
            if not ok:
                return (f"ImageOrientationPatient is {_shown(raw)}{where}: degenerate orientation, "
                        "the row and column directions must be orthogonal unit vectors")
        raw = _frame_value(ds, k, "PlanePositionSequence", "ImagePositionPatient")
        if raw is not None:
            pos = _floats(raw, 3)
            if pos is None or not np.all(np.isfinite(pos)):
                return f"ImagePositionPatient is {_shown(raw)}{where}: must be three numbers (mm)"
    return None


def assumed_geometry(ds) -> dict[str, str]:
    """What the reader assumes for ``ds`` because the file does not say (first frame).

    Returns ``{"spacing": ..., "orientation": ...}`` notes, only for what is missing.

    Examples
    --------
    >>> from pydicom import Dataset
    >>> assumed_geometry(Dataset())["spacing"]
    'no PixelSpacing: 1 mm pixels assumed'
    """
    notes = {}
    if (_frame_value(ds, 0, "PixelMeasuresSequence", "PixelSpacing") is None
            and not ds.get("ImagerPixelSpacing")):
        notes["spacing"] = "no PixelSpacing: 1 mm pixels assumed"
    if _frame_value(ds, 0, "PlaneOrientationSequence", "ImageOrientationPatient") is None:
        notes["orientation"] = "no ImageOrientationPatient: axial assumed"
    return notes


def rescale_problem(ds) -> str | None:
    """Why the rescale of ``ds`` cannot give real values (a zero or non-finite slope, a non-finite
    intercept, in any frame); None when it can or is absent.

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.RescaleSlope = "0"; ds.RescaleIntercept = "-1024"
    >>> rescale_problem(ds)
    'RescaleSlope is 0: every pixel would map to the intercept; the stored values cannot be turned into real values'
    """
    for k in range(_n_frames(ds)):
        where = f" (frame {k + 1})" if _n_frames(ds) > 1 else ""
        for attr in ("RescaleSlope", "RescaleIntercept"):
            raw = _frame_value(ds, k, "PixelValueTransformationSequence", attr)
            value = _floats(raw, 1)
            if raw is not None and (value is None or not np.isfinite(value[0])):
                return f"{attr} is {_shown(raw)}{where}: not a finite number"
            if attr == "RescaleSlope" and value is not None and value[0] == 0:
                return (f"RescaleSlope is {_shown(raw)}{where}: every pixel would map to the intercept; the "
                        "stored values cannot be turned into real values")
    return None


def find_problems(datasets: Sequence, files: Sequence[Path]) -> list[NotRestorableError]:
    """Every reason (at most one per kind: object, geometry, rescale) why a series is not restorable.

    Empty when :func:`check_restorable` would pass. Used by ``medvae info`` to describe a file
    it can show but medvae will not restore.
    """
    found: dict[str, NotRestorableError] = {}
    for ds, f in zip(datasets, files):
        for kind, check in (("object", object_problem), ("geometry", geometry_problem),
                            ("rescale", rescale_problem)):
            if kind not in found:
                problem = check(ds)
                if problem:
                    found[kind] = NotRestorableError(problem, f, kind=kind)
        if len(found) == 3:
            break
    return list(found.values())


def check_restorable(datasets: Sequence, files: Sequence[Path]) -> None:
    """Raise :class:`NotRestorableError` (one line, naming the file) unless the series is restorable.

    Runs on headers, before any pixel is decoded: a wrong object or bad geometry is refused
    before any work is done.
    """
    problems = find_problems(datasets, files)
    if problems:
        raise problems[0]


@dataclass
class DicomSeries:
    """A DICOM series opened for reading: files, order, headers and geometry now, pixels on demand.

    What :func:`open_series` returns. Nothing has been decoded yet: :meth:`read` decodes a range of
    the ordered files, so a long series can be read (and restored, and written) a batch of files at a
    time, with memory bounded by the batch. :func:`read_volume` reads all files at once.

    Attributes
    ----------
    files : list of pathlib.Path
        The series' files in Z order (along the slice normal).
    headers : list of pydicom.Dataset
        One header per file, read without pixel data (``stop_before_pixels``).
    frames : list of int
        Number of frames (slices) of each file: 1 for every file of a single-frame series.
    shape : (X, Y, Z)
        Columns, rows, and the number of slices of the whole series.
    affine : numpy.ndarray
        4x4 RAS affine of the whole series (DICOM's LPS x and y negated).

    Examples
    --------
    >>> s = open_series("dev/dicom/series_ct_head")      # doctest: +SKIP
    >>> s.shape, len(s.files)                             # doctest: +SKIP
    ((256, 256, 108), 108)
    >>> slab, datasets = s.read(0, 8)                     # doctest: +SKIP
    >>> slab.shape                                        # doctest: +SKIP
    (256, 256, 8)
    """

    files: list[Path]
    headers: list
    frames: list[int]
    shape: tuple[int, int, int]
    affine: np.ndarray
    path: Path
    series_uid: str | None = None
    description: str | None = None
    modality: str = "OT"
    format: str = "dicom"
    #: each file's (SOPInstanceUID, SeriesInstanceUID) as its header was read: :meth:`read` reads the files
    #: again and refuses one replaced meanwhile (kept when the caller drops ``headers`` to save memory)
    instances: list = field(default_factory=list)

    @property
    def single_frame(self) -> bool:
        """True when every file holds one slice (file ``i`` is slice ``i``)."""
        return all(n == 1 for n in self.frames)

    @_quiet
    def read(self, start: int = 0, stop: int | None = None, *,
             keep_pixel_data: bool = False) -> tuple[np.ndarray, list]:
        """Decode the files ``files[start:stop]``.

        Returns
        -------
        array : float32 ``(X, Y, n)``, rescale applied (CT in HU); ``n`` is the frames of those files.
        datasets : the files' full datasets, pixel data dropped unless ``keep_pixel_data``.
        """
        stop = len(self.files) if stop is None else stop
        cols, rows = self.shape[0], self.shape[1]
        out = np.empty((cols, rows, sum(self.frames[start:stop])), dtype=np.float32)
        datasets, z = [], 0
        for i, f in enumerate(self.files[start:stop], start):
            ds = _read(f)
            # read again by path, slab by slab: a file replaced meanwhile (another command's --overwrite)
            # mixed two series, even two patients, into one restored series
            if self.instances and _instance(ds) != self.instances[i]:
                raise MedvaeError("the file was replaced while the series was read (another SOP instance "
                                  "than the one whose header was checked): read it again when no other "
                                  "command writes the series", f)
            stack = _decode(ds, f)  # (frames, rows, cols)
            if stack.shape[1:] != (rows, cols):
                raise MedvaeError(f"slices differ in size: {stack.shape[1]}x{stack.shape[2]} decoded "
                                  f"here, {rows}x{cols} in the series", f)
            out[:, :, z:z + stack.shape[0]] = stack.transpose(2, 1, 0)  # (Z, R, C) -> (X, Y, Z)
            z += stack.shape[0]
            if not keep_pixel_data:
                for tag in PIXEL_TAGS:
                    if tag in ds:
                        delattr(ds, tag)
            datasets.append(ds)
        return out, datasets


@_quiet
def open_series(path: str | os.PathLike | Sequence[str | os.PathLike], *,
                series: str | None = None, check: bool = True) -> DicomSeries:
    """Open a DICOM file, a folder, or a list of files as one series, reading headers only.

    Every check that needs no pixel data runs here: one series (or ``series``), files of one size,
    no duplicate positions, restorable objects and geometry (:func:`check_restorable`, with
    ``check``), consistent orientation and spacing. Decoding is left to :meth:`DicomSeries.read`.

    Examples
    --------
    >>> open_series("dev/dicom/pydicom/CT_small.dcm").shape   # doctest: +SKIP
    (128, 128, 1)
    """
    root, uid, members = _choose_series(path, series)
    if check:  # before ordering: an RT Structure Set in the CT's series is refused as such, not by its size
        check_restorable([hdr for _, hdr in members], [f for f, _ in members])
    if len(members) > 1:
        members = _order_single_frames(members)
    sel_files, headers = [f for f, _ in members], [hdr for _, hdr in members]
    frames = [fr for i, ds in enumerate(headers) for fr in _frames_of(ds, i)]
    if len(headers) == 1:
        _check_frame_order(frames, sel_files[0])
    affine = LPS_TO_RAS @ _geometry(frames, headers, sel_files)
    rows, cols = frames[0].shape
    ds0 = headers[0]
    return DicomSeries(
        files=sel_files, headers=headers, frames=[_n_frames(ds) for ds in headers],
        instances=[_instance(ds) for ds in headers],
        shape=(cols, rows, len(frames)), affine=affine, path=root,
        series_uid=None if uid == "unknown" else uid,
        description=printable(ds0.get("SeriesDescription", "") or "") or None,
        modality=_modality(ds0),
    )


def _instance(ds) -> tuple[str, str]:
    return str(ds.get("SOPInstanceUID", "") or ""), str(ds.get("SeriesInstanceUID", "") or "")


def _choose_series(path: str | os.PathLike | Sequence[str | os.PathLike],
                   series: str | None) -> tuple[Path, str, list[tuple[Path, Any]]]:
    """(root, uid, [(file, header), ...]) of the one series ``path`` holds, or of ``series``."""
    paths = [Path(p) for p in ([path] if isinstance(path, (str, os.PathLike)) else path)]
    if not paths:
        raise MedvaeError("no input files")
    root = paths[0]
    files: list[Path] = []
    for p in paths:
        if not p.exists():
            raise MedvaeError("no such file or folder", p)
        if p.is_file() and not is_dicom_file(p):
            raise MedvaeError("not a DICOM file (no 'DICM' marker)", p)
        files.extend(_collect_files(p))
    groups = _group_series(files)
    if not groups:
        raise MedvaeError("no DICOM images here, only a DICOMDIR index", root)
    table = _series_table(groups)
    if series is not None:
        if series not in groups:
            raise SeriesChoiceError(f"no series {series} here; available: {format_series_table(table)}",
                                    root, table)
        uid = series
    elif len(groups) > 1:
        raise SeriesChoiceError(f"{len(groups)} series found, choose one with --series UID: "
                                f"{format_series_table(table)}", root, table)
    else:
        uid = next(iter(groups))
    for f, ds in groups[uid]:  # the chosen series only: a broken scout of another series blocks nothing
        problem = _pixel_bytes_problem(ds, f)
        if problem:  # before any per-frame work: NumberOfFrames 1e6 on a 39 KB file took 90 s and 1 GB
            raise MedvaeError(problem, f)
    return root, uid, groups[uid]


@dataclass
class DicomObjects:
    """The headers of one series, read without pixels, ordering or checks: what :func:`read_headers`
    returns, for describing objects whose pixels are no grayscale volume (``medvae info``).

    ``sop_classes``: the distinct SOP classes (:func:`sop_class_name`) in file order; ``frames``: the
    number of frames of each file, 0 for a file without an image (no Rows and Columns).
    """

    files: list[Path]
    headers: list
    path: Path
    series_uid: str | None
    description: str | None
    modality: str
    sop_classes: list[str]
    frames: list[int]


@_quiet
def read_headers(path: str | os.PathLike | Sequence[str | os.PathLike], *,
                 series: str | None = None) -> DicomObjects:
    """The headers of the series :func:`open_series` would open, without its checks.

    Nothing is decoded, ordered or checked beyond choosing the series (several series without
    ``series`` still raise :class:`SeriesChoiceError`): a Structured Report, an RT Structure Set or a
    colour image has no grayscale volume for :func:`open_series` to build, but its headers say what it is.

    Examples
    --------
    >>> read_headers("test-SR.dcm").sop_classes        # doctest: +SKIP
    ['Comprehensive SR Storage (1.2.840.10008.5.1.4.1.1.88.33)']
    """
    root, uid, members = _choose_series(path, series)
    headers = [hdr for _, hdr in members]
    ds0 = headers[0]
    classes = [sop_class_name(c) if c else "no SOP Class UID" for c in map(_sop_class, headers)]
    return DicomObjects(
        files=[f for f, _ in members], headers=headers, path=root,
        series_uid=None if uid == "unknown" else uid,
        description=printable(ds0.get("SeriesDescription", "") or "") or None,
        modality=_modality(ds0), sop_classes=list(dict.fromkeys(classes)),
        frames=[_n_frames(ds) if pixel_problem(ds) != NO_IMAGE else 0 for ds in headers],
    )


#: what :func:`pixel_problem` says of an object without an image (a report, a structure set, a plan)
NO_IMAGE = "not an image (no Rows and Columns)"


def pixel_problem(ds) -> str | None:
    """Why the pixels of ``ds`` are no grayscale image :meth:`DicomSeries.read` can decode, as far as its
    header tells: no image at all (:data:`NO_IMAGE`), or a colour image (SamplesPerPixel above 1).
    None otherwise. Only the header is needed (``stop_before_pixels`` datasets work).

    Examples
    --------
    >>> from pydicom import Dataset
    >>> ds = Dataset(); ds.Rows = ds.Columns = 8; ds.SamplesPerPixel = 3; ds.PhotometricInterpretation = "RGB"
    >>> pixel_problem(ds)
    'a colour image (SamplesPerPixel 3, RGB)'
    """
    if not (ds.get("Rows") and ds.get("Columns")):
        return NO_IMAGE
    spp = ds.get("SamplesPerPixel", 1)
    if spp not in (None, "", 1):
        return f"a colour image (SamplesPerPixel {spp}, {ds.get('PhotometricInterpretation', '?')})"
    return None


def _modality(ds) -> str:
    """The series' modality: its Modality tag, or the SOP class's when the tag is missing or odd.

    A CT Image Storage object without Modality is still a CT image (in HU); restored as "OT" it
    would take the MR path (percentile window, no CT padding rule).
    """
    tag = str(ds.get("Modality", "") or "").strip().upper()
    if tag in ("CT", "MR"):
        return tag
    return RESTORABLE_SOP_CLASSES.get(_sop_class(ds) or "", tag or "OT")


def read_volume(path: str | os.PathLike | Sequence[str | os.PathLike], *,
                series: str | None = None, keep_pixel_data: bool = False,
                check: bool = True) -> DicomVolume:
    """Read a DICOM file, a folder, or a list of files as one volume (see :func:`read_dicom`).

    :func:`open_series` then :meth:`DicomSeries.read` of every file. With ``check`` (the default)
    the headers are checked with :func:`check_restorable` before any pixel is decoded;
    ``check=False`` reads any image object (for ``medvae info``).
    """
    s = open_series(path, series=series, check=check)
    array, datasets = s.read(keep_pixel_data=keep_pixel_data)
    return DicomVolume(array=array, affine=s.affine, datasets=datasets, files=s.files, path=s.path,
                       series_uid=s.series_uid, description=s.description, modality=s.modality)


def volume_to_scan(vol: DicomVolume, path: Path) -> Scan:
    """The :class:`Scan` of a volume :func:`read_volume` read (what :func:`read_dicom` returns)."""
    return Scan(array=vol.array, affine=np.asarray(vol.affine, dtype=np.float64), modality=vol.modality,
                format="dicom", path=Path(path), series_uid=vol.series_uid, description=vol.description,
                datasets=vol.datasets, files=vol.files)


def __getattr__(name: str):
    # MedvaeDicomReader subclasses MONAI's ImageReader, so it is built on first use: importing this
    # module (pydicom reading) or medvae.io.derived_series (writing) never runs MONAI's package import
    # (issue 10)
    if name == "MedvaeDicomReader":
        return _reader_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _reader_class() -> type:
    """Build :class:`MedvaeDicomReader` (imports MONAI)."""
    from monai.data import ImageReader
    from monai.utils import MetaKeys, SpaceKeys

    class MedvaeDicomReader(ImageReader):
        """MONAI ``ImageReader`` for DICOM files, folders and enhanced multi-frame files.

        Gives a ``(X, Y, Z)`` array (no channel) with the RAS affine, rescale applied (CT in HU).
        Geometry comes from the slices: in-plane from PixelSpacing and ImageOrientationPatient,
        Z from the first and last ImagePositionPatient (for multi-frame files, from the Per-frame /
        Shared Functional Groups). A single slice uses SpacingBetweenSlices, SliceThickness, or 1.
        The reading itself is :func:`read_volume` (pydicom only).

        Parameters
        ----------
        series : str, optional
            SeriesInstanceUID to read from a folder with several series.
        keep_pixel_data : bool, optional
            Keep PixelData in the datasets of :attr:`last` (default: dropped after decoding).
        check : bool, optional
            Refuse objects medvae does not restore (:func:`check_restorable`: SOP class, colour,
            geometry) before decoding. Default True.

        Attributes
        ----------
        last : DicomVolume or None
            The volume of the latest :meth:`read`, with the pydicom datasets (MONAI's metadata
            dictionary only holds plain values, so the datasets are kept here).

        Notes
        -----
        Problems are raised as :class:`~medvae.errors.MedvaeError`. ``LoadImage(reader=r)(path)``
        wraps any reader error in its own ``RuntimeError`` (the message is kept in the text);
        ``LoadImage(reader=r)(path, reader=r)`` lets the MedvaeError through unchanged, which is
        what :func:`medvae.io.load_scan` does.

        Examples
        --------
        >>> from monai.transforms import LoadImage                                   # doctest: +SKIP
        >>> reader = MedvaeDicomReader()                                             # doctest: +SKIP
        >>> img = LoadImage(reader=reader, image_only=True)("emri_small.dcm")        # doctest: +SKIP
        >>> tuple(img.shape)                                                         # doctest: +SKIP
        (64, 64, 10)
        """

        def __init__(self, series: str | None = None, *, keep_pixel_data: bool = False,
                     check: bool = True) -> None:
            super().__init__()
            self.series = series
            self.keep_pixel_data = keep_pixel_data
            self.check = check
            self.last: DicomVolume | None = None

        def verify_suffix(self, filename: Sequence[str | os.PathLike] | str | os.PathLike) -> bool:
            """True for folders, DICOM suffixes, and files carrying the ``DICM`` marker."""
            names = [filename] if isinstance(filename, (str, os.PathLike)) else list(filename)
            for name in names:
                p = Path(name)
                if not (p.is_dir() or p.suffix.lower() in DICOM_SUFFIXES or is_dicom_file(p)):
                    return False
            return True

        def read(self, data: Sequence[str | os.PathLike] | str | os.PathLike, **kwargs) -> DicomVolume:
            """Read a file, a folder, or a list of files; ``kwargs`` may hold ``series``."""
            series = kwargs.get("series", self.series)
            self.last = read_volume(data, series=series, keep_pixel_data=self.keep_pixel_data,
                                    check=self.check)
            return self.last

        def get_data(self, img: DicomVolume) -> tuple[np.ndarray, dict]:
            """Return the ``(X, Y, Z)`` array and MONAI metadata (affine in RAS, no channel)."""
            meta = {
                MetaKeys.AFFINE: img.affine.copy(),
                MetaKeys.ORIGINAL_AFFINE: img.affine.copy(),
                MetaKeys.SPATIAL_SHAPE: np.asarray(img.array.shape),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
                "modality": img.modality,
                "series_uid": img.series_uid or "",
                "series_description": img.description or "",
                "n_files": len(img.files),
            }
            return img.array, meta

    # found as medvae.io.dicom.MedvaeDicomReader (the module's __getattr__): picklable, so DataLoader
    # workers started by "spawn" (macOS, Windows) or "forkserver" can receive a pipeline holding it
    MedvaeDicomReader.__module__ = __name__
    MedvaeDicomReader.__qualname__ = "MedvaeDicomReader"
    return MedvaeDicomReader


def read_dicom(path: Path, *, series: str | None = None, check: bool = True) -> Scan:
    """Read DICOM through ``LoadImage(reader=MedvaeDicomReader(...))`` into a :class:`Scan`.

    ``check`` (default): refuse what medvae does not restore (:func:`check_restorable`), before
    decoding. ``check=False`` reads any grayscale image object, for describing it.
    :func:`read_volume` + :func:`volume_to_scan` give the same scan without MONAI.
    """
    from medvae.io.scan import monai_load_image

    reader = _reader_class()(series=series, check=check)
    loader = monai_load_image(reader)  # LoadImage(reader=reader, image_only=False, float32)
    # the reader is passed again at call time so that MedvaeError propagates unchanged
    img, _meta = loader(str(path), reader=reader)
    vol = reader.last
    assert vol is not None
    return Scan(
        array=np.ascontiguousarray(img.numpy(), dtype=np.float32),
        affine=np.asarray(img.affine.numpy() if hasattr(img.affine, "numpy") else img.affine,
                          dtype=np.float64),
        modality=vol.modality, format="dicom", path=Path(path), series_uid=vol.series_uid,
        description=vol.description, datasets=vol.datasets, files=vol.files,
    )
