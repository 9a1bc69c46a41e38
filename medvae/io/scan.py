"""The :class:`Scan` container and the format-independent entry points.

``load_scan`` picks the reader from the path (a folder or a DICOM file: pydicom through
:class:`medvae.io.dicom.MedvaeDicomReader`; ``.nii``/``.nii.gz``: MONAI's ``NibabelReader``),
``save_scan`` writes an array back in the scan's own format, atomically.

This module only imports numpy at import time; nibabel, pydicom and MONAI are imported when
a scan is read or written.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae.errors import MedvaeError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RESCALE_MODES = ("keep", "fit")
NONFINITE_POLICIES = ("raise", "zero")


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


@dataclass
class Scan:
    """A 3-D scan with its geometry and the source metadata needed to write it back.

    Attributes
    ----------
    array : numpy.ndarray
        ``float32``, shape ``(X, Y, Z)`` in the voxel order of ``affine`` (MONAI's convention
        with the channel dropped). Slices are ``array[:, :, k]``; a single 2-D DICOM image has
        ``Z == 1``. CT values are HU (DICOM rescale applied).
    affine : numpy.ndarray
        4x4 ``float64``, voxel index -> world millimetres in RAS (DICOM's LPS x and y negated).
    modality : str
        ``"CT"``, ``"MR"``, ... (``"OT"`` when unknown).
    format : str
        ``"nifti"`` or ``"dicom"``.
    path : pathlib.Path
        The input path as given (file or folder).
    series_uid, description : str or None
        DICOM SeriesInstanceUID and SeriesDescription (NIfTI: ``descrip``).
    datasets : list of pydicom.Dataset or None
        DICOM only: one dataset per file in Z order (pixel data dropped after decoding); a
        multi-frame file is one dataset whose frames run along Z.
    files : list of pathlib.Path or None
        DICOM only: the source file of each dataset.
    header : nibabel header or None
        NIfTI only: the source header, used when writing back.

    Examples
    --------
    >>> import numpy as np
    >>> s = Scan(np.zeros((4, 5, 6), np.float32), np.diag([-2.0, 2.0, 3.0, 1.0]), "MR",
    ...          "nifti", Path("x.nii.gz"))
    >>> s.spacing, s.orientation
    ((2.0, 2.0, 3.0), 'LAS')
    >>> s.with_array(np.ones((4, 5, 6))).array.dtype
    dtype('float32')
    """

    array: np.ndarray
    affine: np.ndarray
    modality: str
    format: str
    path: Path
    series_uid: str | None = None
    description: str | None = None
    datasets: list | None = None
    files: list[Path] | None = None
    header: Any = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (norms of the affine's columns)."""
        a = np.asarray(self.affine, dtype=np.float64)
        return tuple(float(np.linalg.norm(a[:3, i])) for i in range(3))  # type: ignore[return-value]

    @property
    def orientation(self) -> str:
        """Axis codes of the voxel axes in RAS space, e.g. ``"LAS"`` (nibabel ``aff2axcodes``)."""
        from nibabel.orientations import aff2axcodes

        return "".join(c or "?" for c in aff2axcodes(np.asarray(self.affine)))

    @property
    def n_slices(self) -> int:
        """Number of 2-D slices (``array.shape[2]``)."""
        return int(self.array.shape[2])

    def with_array(self, array: np.ndarray) -> "Scan":
        """Return a scan with the same geometry and metadata and a new ``array``.

        Parameters
        ----------
        array : array_like
            Same shape as ``self.array``; converted to ``float32``.

        Raises
        ------
        MedvaeError
            If the shape differs.

        Examples
        --------
        >>> s = Scan(np.zeros((2, 2, 1), np.float32), np.eye(4), "CT", "dicom", Path("a.dcm"))
        >>> s.with_array(np.full((2, 2, 1), 5)).array.max()
        np.float32(5.0)
        """
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise MedvaeError(f"array shape {array.shape} does not match the scan's shape "
                              f"{self.array.shape}", self.path)
        return dataclasses.replace(self, array=array.astype(np.float32, copy=False))


def monai_load_image(reader):
    """``monai.transforms.LoadImage(reader=reader, image_only=False, dtype=float32)``, quietly.

    LoadImage instantiates every default reader, and MONAI's GPU DICOM reader logs a warning
    when nvImageCodec is missing; that noise is silenced here (nothing else is changed).
    """
    import logging as _logging
    import warnings

    from monai.transforms import LoadImage

    noisy = _logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")
    level = noisy.level
    noisy.setLevel(_logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            return LoadImage(reader=reader, image_only=False, dtype=np.float32)
    finally:
        noisy.setLevel(level)


def _check_finite(array: np.ndarray, path, *, nonfinite: str) -> np.ndarray:
    bad = ~np.isfinite(array)
    n = int(bad.sum())
    if not n:
        return array
    if nonfinite == "zero":
        log.warning("%s: %d non-finite voxels (NaN/Inf) replaced with 0", path, n)
        array = array.copy()
        array[bad] = 0
        return array
    raise MedvaeError(f"{n} of {array.size} voxels are NaN or infinite; medvae refuses non-finite "
                      "values (replace them in the file, or use load_scan(..., nonfinite='zero'))",
                      path)


def load_scan(path: str | os.PathLike, *, series: str | None = None, volume: int | None = None,
              modality: str | None = None, nonfinite: str = "raise") -> Scan:
    """Read a NIfTI file, a DICOM file or a DICOM folder as a :class:`Scan`.

    Parameters
    ----------
    path : str or PathLike
        A ``.nii``/``.nii.gz`` file, a DICOM file (single- or multi-frame) or a folder of DICOM
        files (searched recursively; non-DICOM files are ignored).
    series : str, optional
        SeriesInstanceUID to read when the folder holds several series. Without it a folder
        with several series raises :class:`~medvae.errors.MedvaeError` listing them.
    volume : int, optional
        Volume of a 4-D NIfTI file (0-based). **Default: volume 0**, with a log message naming
        the number of volumes; out of range raises. Only valid for NIfTI.
    modality : str, optional
        Override the modality. DICOM: from the ``Modality`` tag (``"OT"`` when absent). NIfTI:
        guessed: ``"CT"`` when the minimum lies in [-3100, -500] and the maximum below
        30000 (HU-like), else ``"MR"``.
    nonfinite : {"raise", "zero"}, optional
        Policy for NaN/Inf voxels. **Default "raise"**: a MedvaeError naming the count.
        ``"zero"`` replaces them with 0 and logs a warning.

    Returns
    -------
    Scan

    Raises
    ------
    MedvaeError
        Missing path, empty folder, unknown format, truncated or unreadable file, no pixel
        data, a transfer syntax with no codec, inconsistent slices, several series, non-finite
        values.

    Examples
    --------
    >>> scan = load_scan("dev/nifti/invesalius_cranium_ct.nii.gz")   # doctest: +SKIP
    >>> scan.array.shape, scan.modality, scan.orientation             # doctest: +SKIP
    ((256, 256, 108), 'CT', 'LAS')
    >>> load_scan("dev/dicom/series_ct_head").spacing                 # doctest: +SKIP
    (0.957..., 0.957..., 1.5)
    """
    p = Path(path)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, not {nonfinite!r}")
    if not p.exists():
        raise MedvaeError("no such file or folder", p)
    if p.is_dir() or not is_nifti_path(p):
        from medvae.io import dicom

        if p.is_file() and not dicom.is_dicom_file(p):
            raise MedvaeError("neither a DICOM file (no 'DICM' marker) nor a NIfTI file "
                              "(.nii/.nii.gz)", p)
        if volume not in (None, 0):
            raise MedvaeError("--volume applies to 4-D NIfTI files only", p)
        scan = dicom.read_dicom(p, series=series)
    else:
        from medvae.io import nifti

        if series is not None:
            raise MedvaeError("--series applies to DICOM folders only", p)
        scan = nifti.read_nifti(p, volume=volume)
        if modality is None:
            scan.modality = nifti.guess_modality(scan.array)
    scan.array = _check_finite(scan.array, p, nonfinite=nonfinite)
    if modality is not None:
        scan.modality = str(modality).upper()
    return scan


def _refuse_input(out: Path, scan: Scan) -> None:
    """Refuse an ``out`` that is, contains, or lies inside the scan's inputs."""
    out_r = out.resolve()
    inputs = [Path(scan.path)] + [Path(f) for f in (scan.files or [])]
    resolved = [src.resolve() for src in inputs]
    if out_r in resolved:
        raise MedvaeError("output path is the input; choose another output", out)
    for src, src_r in zip(inputs, resolved):
        if out_r in src_r.parents:
            raise MedvaeError(f"output would replace a folder that holds the input {src}", out)
        if src_r.is_dir() and src_r in out_r.parents:
            raise MedvaeError(f"output lies inside the input folder {src}; choose another place",
                              out)


def save_scan(scan: Scan, array: np.ndarray, out: str | os.PathLike, *, overwrite: bool = False,
              description: str = "medvae restored", rescale: str = "keep") -> Path:
    """Write ``array`` with the geometry and metadata of ``scan``, atomically.

    Parameters
    ----------
    scan : Scan
        The source scan (geometry, headers, datasets). Never modified.
    array : numpy.ndarray
        Same shape as ``scan.array``, in the scan's units (HU for CT). Must be finite.
    out : str or PathLike
        A ``.nii``/``.nii.gz`` file (float32 NIfTI with the same affine, sform and qform; any
        source format) or, for a DICOM scan, a folder that receives a new derived series
        (``IM0001.dcm``, ...).
    overwrite : bool, optional
        Replace an existing ``out``; the old one is removed only after the new one is
        complete. Default: refuse.
    description : str, optional
        DICOM: appended to SeriesDescription as ``" [description]"`` and written to
        DerivationDescription. NIfTI: ``descrip``.
    rescale : {"keep", "fit"}, optional
        DICOM stored values. ``"keep"``: re-quantized through the source RescaleSlope/Intercept
        into the source's stored integer type (clipped to its range). ``"fit"``: a new
        slope/intercept so that the values use the full signed 16-bit range (for small floats
        such as uncertainty maps).

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    MedvaeError
        Wrong shape, non-finite values, ``out`` equal to / inside / containing the input,
        ``out`` exists without ``overwrite``, NIfTI scan with a non-NIfTI ``out``.

    Examples
    --------
    >>> scan = load_scan("dev/dicom/series_ct_head")                 # doctest: +SKIP
    >>> save_scan(scan, scan.array * 0.5, "restored_series")         # doctest: +SKIP
    PosixPath('restored_series')
    >>> save_scan(scan, scan.array, "restored.nii.gz")               # doctest: +SKIP
    PosixPath('restored.nii.gz')
    """
    from medvae.io.atomic import atomic_output

    out = Path(out)
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, not {rescale!r}")
    array = np.asarray(array)
    if array.shape != scan.array.shape:
        raise MedvaeError(f"array shape {array.shape} does not match the scan's shape "
                          f"{scan.array.shape}", out)
    n_bad = int((~np.isfinite(array)).sum())
    if n_bad:
        raise MedvaeError(f"refusing to write {n_bad} NaN/infinite values", out)
    _refuse_input(out, scan)
    if is_nifti_path(out):
        from medvae.io import nifti

        with atomic_output(out, kind="file", overwrite=overwrite) as tmp:
            nifti.write_nifti(scan, array, tmp, description=description)
    elif scan.format == "dicom":
        from medvae.io import dicom

        with atomic_output(out, kind="dir", overwrite=overwrite) as tmp:
            dicom.write_dicom_series(scan, array, tmp, description=description, rescale=rescale)
    else:
        raise MedvaeError("a NIfTI scan is written as NIfTI: give a path ending in .nii or "
                          ".nii.gz", out)
    return out
