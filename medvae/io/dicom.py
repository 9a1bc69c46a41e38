"""DICOM reading (a MONAI ``ImageReader`` built on pydicom) and derived-series writing.

:class:`MedvaeDicomReader` plugs into ``monai.transforms.LoadImage``. Unlike MONAI's
``PydicomReader`` it reads enhanced multi-frame files along their frames (geometry from the
Per-frame / Shared Functional Groups: PixelMeasuresSequence, PlanePositionSequence,
PlaneOrientationSequence, PixelValueTransformationSequence), orders single-frame series along
the slice normal, takes the slice spacing from the positions, and turns every user-fixable
problem into a one-line :class:`~medvae.errors.MedvaeError` naming the file.

Importing this module imports MONAI (slow); :mod:`medvae.io` imports it lazily.

Examples
--------
>>> from monai.transforms import LoadImage                                  # doctest: +SKIP
>>> img = LoadImage(reader=MedvaeDicomReader(), image_only=True)("series/")  # doctest: +SKIP
>>> img.shape, img.affine                                                   # doctest: +SKIP
"""
from __future__ import annotations

import copy
import functools
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys

from medvae.errors import MedvaeError
from medvae.io.scan import Scan

log = logging.getLogger(__name__)

#: LPS (DICOM patient coordinates) <-> RAS (nibabel/MONAI): negate x and y.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima", ".dic")
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


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
        with warnings.catch_warnings():  # pydicom's VR validation chatter is not for users
            warnings.simplefilter("ignore", UserWarning)
            return pydicom.dcmread(path, stop_before_pixels=headers_only)
    except Exception as exc:  # InvalidDicomError, EOFError, struct errors on truncation...
        raise MedvaeError(f"not a readable DICOM file, truncated or corrupt "
                          f"({type(exc).__name__}: {exc})", path) from exc


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
        raise MedvaeError("no such file or folder", path)
    files = sorted(p for p in path.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise MedvaeError("empty folder: no files to read", path)
    dicoms = [f for f in files if is_dicom_file(f)]
    if not dicoms:
        nifti = [f.name for f in files if f.name.lower().endswith((".nii", ".nii.gz"))]
        hint = f"; to read NIfTI give the file path, e.g. {nifti[0]}" if nifti else ""
        raise MedvaeError(f"no DICOM files in this folder ({len(files)} other file(s)){hint}", path)
    skipped = len(files) - len(dicoms)
    if skipped:
        log.info("%s: ignoring %d non-DICOM file(s)", path, skipped)
    return dicoms


def _group_series(files: list[Path]) -> dict[str, list[tuple[Path, Any]]]:
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for f in files:
        ds = _read(f, headers_only=True)
        sop_class = getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if sop_class == MEDIA_STORAGE_DIRECTORY:  # a DICOMDIR index, not an image
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "unknown")
        groups.setdefault(uid, []).append((f, ds))
    return groups


def _series_table(groups) -> list[tuple[str, str, int]]:
    table = []
    for uid, members in groups.items():
        desc = str(members[0][1].get("SeriesDescription", "") or "")
        table.append((uid, desc, sum(_n_frames(ds) for _, ds in members)))
    return table


def _format_table(table) -> str:
    return "; ".join(f"{uid} '{desc}' ({n} slices)" for uid, desc, n in table)


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


def _check_codec(ds, path: Path) -> None:
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
    _check_codec(ds, path)
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
    raw = raw.reshape((nf,) + raw.shape[-2:])  # single frame (R, C) -> (1, R, C)
    has_fg_rescale = _fg_value(ds, 0, "PixelValueTransformationSequence", "RescaleSlope") is not None
    if has_fg_rescale:  # enhanced files: pydicom's apply_rescale ignores functional groups
        out = np.empty(raw.shape, dtype=np.float32)
        for k in range(nf):
            slope, inter = rescale_of(ds, k)
            out[k] = raw[k] * slope + inter
        return out
    return np.asarray(apply_rescale(raw, ds), dtype=np.float32)  # Rescale or Modality LUT


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


def _geometry(frames: list[_Frame], datasets, files) -> np.ndarray:
    """Affine (LPS) from per-slice geometry; frames are already in Z order."""
    f0 = frames[0]
    row_dir, col_dir = f0.orientation[:3], f0.orientation[3:]
    for fr in frames[1:]:
        if not np.allclose(fr.orientation, f0.orientation, atol=1e-4):
            raise MedvaeError("slices have different orientations (ImageOrientationPatient "
                              f"{list(np.round(f0.orientation, 4))} vs "
                              f"{list(np.round(fr.orientation, 4))})", files[fr.ds_index])
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
            log.warning("%s: no ImagePositionPatient; slices ordered by file/frame order and "
                        "spaced by SpacingBetweenSlices/SliceThickness", files[0])
        affine[:3, 2] = normal * _slice_gap(datasets[frames[0].ds_index])
    origin = positions[0] if positions[0] is not None else np.zeros(3)
    affine[:3, 3] = origin
    return affine


def _order_single_frames(members: list[tuple[Path, Any]]) -> list[tuple[Path, Any]]:
    """Sort single-frame files along the slice normal; refuse duplicates and size mismatches."""
    f0, d0 = members[0]
    size0 = (int(d0.get("Rows", 0) or 0), int(d0.get("Columns", 0) or 0))
    for f, ds in members[1:]:
        size = (int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0))
        if size != size0:
            raise MedvaeError(f"slices differ in size: {size[0]}x{size[1]} here, "
                              f"{size0[0]}x{size0[1]} in {f0.name}", f)
    if any(_n_frames(ds) > 1 for _, ds in members):
        raise MedvaeError("a series mixing several multi-frame files is not supported; "
                          "give one file", f0.parent)
    keyed = []
    for f, ds in members:
        pos = _floats(ds.get("ImagePositionPatient"), 3)
        ori = _floats(ds.get("ImageOrientationPatient"), 6) or DEFAULT_ORIENTATION
        normal = np.cross(ori[:3], ori[3:])
        keyed.append((None if pos is None else float(np.dot(pos, normal)), f, ds))
    if all(k[0] is not None for k in keyed):
        keyed.sort(key=lambda k: k[0])
        for (z0, fa, _), (z1, fb, _) in zip(keyed, keyed[1:]):
            if abs(z1 - z0) < 1e-3:
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


@_quiet
def read_volume(path: str | os.PathLike | Sequence[str | os.PathLike], *,
                series: str | None = None, keep_pixel_data: bool = False) -> DicomVolume:
    """Read a DICOM file, a folder, or a list of files as one volume (see :func:`read_dicom`)."""
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
            raise SeriesChoiceError(f"no series {series} here; available: {_format_table(table)}",
                                    root, table)
        uid = series
    elif len(groups) > 1:
        raise SeriesChoiceError(f"{len(groups)} series found, choose one with --series UID: "
                                f"{_format_table(table)}", root, table)
    else:
        uid = next(iter(groups))
    members = groups[uid]
    if len(members) > 1:
        members = _order_single_frames(members)

    datasets, sel_files, stacks = [], [], []
    for f, _hdr in members:
        ds = _read(f)
        stacks.append(_decode(ds, f))
        if not keep_pixel_data:
            for tag in PIXEL_TAGS:
                if tag in ds:
                    delattr(ds, tag)
        datasets.append(ds)
        sel_files.append(f)
    frames = [fr for i, ds in enumerate(datasets) for fr in _frames_of(ds, i)]
    if len(datasets) == 1:
        _check_frame_order(frames, sel_files[0])
    shapes = {s.shape[1:] for s in stacks}
    if len(shapes) > 1:
        raise MedvaeError(f"slices differ in size: {sorted(shapes)}", root)
    affine = LPS_TO_RAS @ _geometry(frames, datasets, sel_files)
    vol = np.concatenate(stacks, axis=0) if len(stacks) > 1 else stacks[0]
    array = np.ascontiguousarray(vol.transpose(2, 1, 0), dtype=np.float32)  # (Z,R,C) -> (X,Y,Z)
    ds0 = datasets[0]
    return DicomVolume(
        array=array, affine=affine, datasets=datasets, files=sel_files, path=root,
        series_uid=None if uid == "unknown" else uid,
        description=str(ds0.get("SeriesDescription", "") or "") or None,
        modality=str(ds0.get("Modality", "") or "OT"),
    )


class MedvaeDicomReader(ImageReader):
    """MONAI ``ImageReader`` for DICOM files, folders and enhanced multi-frame files.

    Gives a ``(X, Y, Z)`` array (no channel) with the RAS affine, rescale applied (CT in HU).
    Geometry comes from the slices: in-plane from PixelSpacing and ImageOrientationPatient,
    Z from the first and last ImagePositionPatient (for multi-frame files, from the Per-frame /
    Shared Functional Groups). A single slice uses SpacingBetweenSlices, SliceThickness, or 1.

    Parameters
    ----------
    series : str, optional
        SeriesInstanceUID to read from a folder with several series.
    keep_pixel_data : bool, optional
        Keep PixelData in the datasets of :attr:`last` (default: dropped after decoding).

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

    def __init__(self, series: str | None = None, *, keep_pixel_data: bool = False) -> None:
        super().__init__()
        self.series = series
        self.keep_pixel_data = keep_pixel_data
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
        self.last = read_volume(data, series=series, keep_pixel_data=self.keep_pixel_data)
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


def read_dicom(path: Path, *, series: str | None = None) -> Scan:
    """Read DICOM through ``LoadImage(reader=MedvaeDicomReader(...))`` into a :class:`Scan`."""
    from medvae.io.scan import monai_load_image

    reader = MedvaeDicomReader(series=series)
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


# ----------------------------------------------------------------------------------- writing

_INT_TYPES = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}
_DROP_ALWAYS = ("LargestImagePixelValue", "SmallestImagePixelValue",
                "LargestPixelValueInSeries", "SmallestPixelValueInSeries")
_DROP_ON_FIT = ("PixelPaddingValue", "PixelPaddingRangeLimit", "ModalityLUTSequence")


def _ds_number(value: float) -> tuple[str, float]:
    """A DS string for ``value`` (at most 16 characters) and the float it stands for."""
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value))
    return text, float(text)


def fit_rescale(lo: float, hi: float) -> tuple[float, float]:
    """Slope/intercept mapping [lo, hi] onto signed 16-bit stored values (DS-representable).

    Examples
    --------
    >>> s, b = fit_rescale(0.0, 0.02)
    >>> round((32767 * s + b) - 0.02, 6) >= 0
    True
    """
    if not hi > lo:
        return 1.0, _ds_number(lo)[1]
    mid = _ds_number((hi + lo) / 2.0)[1]
    half = max(hi - mid, mid - lo)
    slope = half / 32767.0
    for _ in range(8):
        s = _ds_number(slope)[1]
        if s * 32767.0 >= half:
            return s, mid
        slope *= 1.0 + 1e-6
    return _ds_number(slope * 1.001)[1], mid


def _set_rescale(ds, slope: float, inter: float) -> None:
    """Write the rescale where the source kept it (functional groups or top level)."""
    s_txt, _ = _ds_number(slope)
    i_txt, _ = _ds_number(inter)
    in_groups = False
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(groups) or []:
            seq = item.get("PixelValueTransformationSequence")
            if seq:
                seq[0].RescaleSlope = s_txt
                seq[0].RescaleIntercept = i_txt
                in_groups = True
    if not in_groups or "RescaleSlope" in ds:
        ds.RescaleSlope = s_txt
        ds.RescaleIntercept = i_txt
        if "RescaleType" not in ds and ds.get("Modality") == "CT":
            ds.RescaleType = "HU"


def _quantize(values: np.ndarray, slope: float, inter: float, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    stored = np.rint((values.astype(np.float64) - inter) / slope)
    return np.clip(stored, info.min, info.max).astype(dtype)


def _derive(ds, *, series_uid: str, description: str) -> None:
    """Mark a deep-copied dataset as a derived image of a new series (in place)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    old_sop, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if sop_class:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    image_type = [str(v) for v in (ds.get("ImageType") or [])]
    ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
    suffix = f" [{description}]"
    base = str(ds.get("SeriesDescription", "") or "")
    ds.SeriesDescription = (base[: max(0, 64 - len(suffix))] + suffix).strip()[:64]
    ds.DerivationDescription = f"{description} (medvae); pixel data replaced, geometry unchanged"
    try:
        if "SeriesNumber" in ds and ds.SeriesNumber is not None and str(ds.SeriesNumber) != "":
            ds.SeriesNumber = int(ds.SeriesNumber) + 1000
    except (TypeError, ValueError):
        pass
    if old_sop and sop_class and "PerFrameFunctionalGroupsSequence" not in ds:
        ref = Dataset()
        ref.ReferencedSOPClassUID = sop_class
        ref.ReferencedSOPInstanceUID = old_sop
        ds.SourceImageSequence = DicomSequence([ref])
    for tag in _DROP_ALWAYS:
        if tag in ds:
            delattr(ds, tag)


def _write_dataset(ds, path: Path) -> None:
    """Write one file (a seam for tests that simulate a failure mid-series)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.save_as(path, enforce_file_format=True)


@_quiet
def write_dicom_series(scan: Scan, array: np.ndarray, out_dir: Path, *,
                       description: str = "medvae restored", rescale: str = "keep") -> list[Path]:
    """Write ``array`` as a new derived series into the (existing, empty) folder ``out_dir``.

    Every source dataset is deep-copied and only its pixels replaced; see
    :func:`medvae.io.save_scan` for the rules. Files are named ``IM0001.dcm``, ... in Z order.
    Use :func:`medvae.io.save_scan`, which adds the atomic write and the input checks.
    """
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    if not scan.datasets:
        raise MedvaeError("this scan has no DICOM datasets to write back", scan.path)
    counts = [_n_frames(ds) for ds in scan.datasets]
    if sum(counts) != array.shape[2]:
        raise MedvaeError(f"array has {array.shape[2]} slices, the DICOM datasets "
                          f"{sum(counts)}", scan.path)
    fit = None
    if rescale == "fit":
        fit = fit_rescale(float(array.min()), float(array.max()))
    series_uid = generate_uid()
    written: list[Path] = []
    z = 0
    for i, (src, nf) in enumerate(zip(scan.datasets, counts)):
        frames = np.asarray(array[:, :, z:z + nf], dtype=np.float64).transpose(2, 1, 0)
        z += nf
        rows, cols = int(src.get("Rows", 0)), int(src.get("Columns", 0))
        if frames.shape[1:] != (rows, cols):
            raise MedvaeError(f"array slices are {frames.shape[2]}x{frames.shape[1]}, the DICOM "
                              f"images {cols}x{rows}", scan.files[i] if scan.files else scan.path)
        ds = copy.deepcopy(src)
        for tag in PIXEL_TAGS:
            if tag in ds:
                delattr(ds, tag)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        bits = int(ds.get("BitsAllocated", 16) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0)
        dtype = _INT_TYPES.get((bits, signed))
        use_fit = fit is not None or dtype is None or "ModalityLUTSequence" in ds
        if use_fit:
            slope, inter = fit if fit is not None else fit_rescale(float(array.min()), float(array.max()))
            stored = _quantize(frames, slope, inter, np.int16)
            for tag in _DROP_ON_FIT:
                if tag in ds:
                    delattr(ds, tag)
            _set_rescale(ds, slope, inter)
        else:
            stored = np.empty(frames.shape, dtype=dtype)
            for k in range(nf):
                slope, inter = rescale_of(src, k)
                stored[k] = _quantize(frames[k], slope, inter, dtype)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2")
        if photometric not in ("MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"):
            photometric = "MONOCHROME2"
        had_frames = "NumberOfFrames" in src
        ds.set_pixel_data(stored if nf > 1 else stored[0], photometric,
                          stored.dtype.itemsize * 8, generate_instance_uid=False)
        if had_frames and "NumberOfFrames" not in ds:
            ds.NumberOfFrames = nf
        _derive(ds, series_uid=series_uid, description=description)
        name = out_dir / f"IM{i + 1:04d}.dcm"
        _write_dataset(ds, name)
        written.append(name)
    return written
