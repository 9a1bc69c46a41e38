"""The :class:`Scan` container: a 3-D array with its geometry and source metadata.

The readers and writers (:mod:`medvae.io.dicom`, :mod:`medvae.io.nifti`) build and consume
scans; :mod:`medvae.io.formats` picks between them. This module imports only numpy.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medvae.errors import MedvaeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def printable(text: Any) -> str:
    r"""``text`` from a file's header with control characters (escape codes, bell, line breaks) as spaces
    and runs of spaces as one: a SeriesDescription or NIfTI descrip reaches terminals, errors and the
    derived series' own description, where an escape code could clear the screen or fake lines.

    >>> printable("HEAD\x1b[2J\r\nX\x07  axial")
    'HEAD [2J X axial'
    """
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def is_nifti_path(path: str | os.PathLike) -> bool:
    """True when the file name ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def require_real(array: np.ndarray, path=None, *, what: str = "the image") -> None:
    """Raise MedvaeError unless ``array`` holds real numbers (integers or floats): complex values
    would lose their imaginary part with only a warning, booleans and objects are no image.

    Examples
    --------
    >>> require_real(np.array([1 + 2j]), "x.nii.gz")
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: x.nii.gz: the image has data type complex128; medvae works on real numbers (save the magnitude of complex data)
    """
    kind = np.asarray(array).dtype.kind
    if kind not in "iuf":
        hint = " (save the magnitude of complex data)" if kind == "c" else ""
        raise MedvaeError(f"{what} has data type {np.asarray(array).dtype}; medvae works on real numbers{hint}", path)


def mixed_case_nifti_suffix(name: str) -> str | None:
    """The NIfTI suffix of ``name`` when it mixes upper and lower case within a part (``.Nii.gz``), which
    nibabel can neither write nor read under that name; else None.

    >>> mixed_case_nifti_suffix("a.Nii.gz"), mixed_case_nifti_suffix("A.NII.GZ")
    ('.Nii.gz', None)
    """
    suffix = split_nifti_suffix(name)[1]
    return suffix if any(part not in (part.lower(), part.upper()) for part in suffix.split(".")) else None


def split_nifti_suffix(name: str) -> tuple[str, str]:
    """``(stem, suffix)`` of a file name ending with ``.nii`` or ``.nii.gz`` in any case, the suffix
    as written; ``(name, "")`` for other names.

    >>> split_nifti_suffix("UP.NII.GZ"), split_nifti_suffix("a.nii"), split_nifti_suffix("series")
    (('UP', '.NII.GZ'), ('a', '.nii'), ('series', ''))
    """
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    return name, ""


def nifti_mm_per_unit(header: Any) -> float:
    """Millimetres per unit of a NIfTI header's space: 0.001 for micrometres, 1000 for metres, else 1."""
    try:
        space = header.get_xyzt_units()[0]
    except Exception:  # noqa: BLE001  (units nibabel cannot parse: NIfTI's usual mm)
        return 1.0
    return {"micron": 0.001, "meter": 1000.0}.get(space, 1.0)


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
    modality_guess : str or None
        Why ``modality`` was guessed from the values (NIfTI has no modality tag), or None when
        it came from the file's header or the caller.

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
    modality_guess: str | None = None

    @property
    def mm_per_unit(self) -> float:
        """Millimetres per unit of :attr:`affine`: 1, unless a NIfTI header gives its space in
        micrometres (0.001) or metres (1000). ``affine`` stays in the file's unit, so a restoration
        is written back in it; physics (low-dose noise, bias-field smoothness) and the review page
        need mm: :attr:`spacing` and :attr:`affine_mm`."""
        if self.format != "nifti" or self.header is None:
            return 1.0
        return nifti_mm_per_unit(self.header)

    @property
    def affine_mm(self) -> np.ndarray:
        """:attr:`affine` with its positions in mm (see :attr:`mm_per_unit`)."""
        a = np.array(self.affine, dtype=np.float64)
        a[:3] *= self.mm_per_unit
        return a

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along X, Y, Z (norms of :attr:`affine_mm`'s columns: a NIfTI header in
        micrometres or metres is converted)."""
        a = self.affine_mm
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
            If the shape differs, the values are not real numbers (complex, boolean) or lie beyond
            float32's range.

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
        require_real(array, self.path, what="the new array")  # complex lost its imaginary part here
        if (array.dtype.itemsize > 4 and array.dtype.kind == "f" and array.size
                and float(np.nanmax(np.abs(array))) > float(np.finfo(np.float32).max)):
            raise MedvaeError("the new array holds values beyond float32's range (about ±3.4e38), the "
                              "type a scan holds", self.path)  # they became inf
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
