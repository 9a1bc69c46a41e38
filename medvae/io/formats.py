"""Format-independent entry points: read any scan, write an array back in the scan's format.

``load_scan`` picks the reader from the path (a folder or a DICOM file: pydicom through
:class:`medvae.io.dicom.MedvaeDicomReader`; ``.nii``/``.nii.gz``: MONAI's ``NibabelReader``), both
through MONAI's ``LoadImage``; ``reader="native"`` reads the same scan with pydicom or nibabel alone
(no MONAI import: what ``medvae restore`` uses, to start fast).
``claim_scan_output`` claims an output before any work (:mod:`medvae.io.atomic`), and
``save_scan`` writes into it atomically, replacing only medvae's own earlier output.

This module only imports numpy at import time; nibabel, pydicom and MONAI are imported when
a scan is read or written.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from medvae.errors import MedvaeError
from medvae.io.scan import Scan, is_nifti_path, require_real

log = logging.getLogger(__name__)

RESCALE_MODES = ("keep", "fit", "unit")
NONFINITE_POLICIES = ("raise", "zero")
MODALITIES = ("CT", "MR")


def require_finite(array: np.ndarray, path=None, *, what: str = "the image") -> None:
    """Raise MedvaeError naming the count when ``array`` holds NaN or infinite values.

    Examples
    --------
    >>> require_finite(np.array([1.0, np.nan]), "x.nii.gz")
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: x.nii.gz: 1 of 2 voxels are NaN or infinite in the image; medvae works on finite images only
    """
    require_real(array, path, what=what)
    n = int(array.size - np.count_nonzero(np.isfinite(array)))
    if n:
        raise MedvaeError(f"{n} of {array.size} voxels are NaN or infinite in {what}; medvae works "
                          "on finite images only", path)



def as_mask(array, path=None, *, what: str = "the mask") -> np.ndarray:
    """A mask array as booleans: nonzero is True, the one rule every medvae mask follows.

    A mask holds 0 (known) and one other value (damaged: 1, or 255), or fractions of 0..1 (a resampled
    mask: every fraction counts as damaged). Negative values (a -1/1 convention) or, when one lies above 1,
    more than one positive value (a label map, an image or an uncertainty map given as the mask) are
    refused: read as nonzero, they made the whole image "damaged" without a word. NaN or infinite values
    are refused rather than counted (``NaN != 0`` is True), so a mask resampled or saved with NaN outside
    its support is never read as "restore everything".

    Examples
    --------
    >>> as_mask(np.array([0.0, 0.3, 1.0, 0.0]))
    array([False,  True,  True, False])
    >>> as_mask(np.array([0, 255, 255], np.uint8))
    array([False,  True,  True])
    >>> as_mask(np.array([-1.0, 1.0]), "m.nii.gz")
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: m.nii.gz: the mask holds negative values (down to -1): a mask is 0 for known voxels and 1 (or any one positive value) for damaged ones
    >>> as_mask(np.array([0.0, np.nan]), "m.nii.gz")
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: m.nii.gz: 1 of 2 voxels are NaN or infinite in the mask; medvae works on finite images only
    """
    a = np.asarray(array)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "biuf":
        raise MedvaeError(f"{what} has data type {a.dtype}; a mask is numbers or booleans", path)
    if a.dtype.kind == "f":
        require_finite(a, path, what=what)
    if not a.size:
        return a != 0
    lo, hi = a.min(), a.max()
    rule = "a mask is 0 for known voxels and 1 (or any one positive value) for damaged ones"
    if lo < 0:
        raise MedvaeError(f"{what} holds negative values (down to {float(lo):g}): {rule}", path)
    if hi > 1 and bool(((a != 0) & (a != hi)).any()):
        other = a[(a != 0) & (a != hi)].flat[0]
        raise MedvaeError(f"{what} holds several values above 0 ({float(other):g} and {float(hi):g}), not one "
                          f"value for damaged voxels: an image or an uncertainty map? {rule}", path)
    return a != 0


READERS = ("monai", "native")


def load_scan(path: str | os.PathLike, *, series: str | None = None, volume: int | None = None,
              modality: str | None = None, nonfinite: str = "raise", reader: str = "monai",
              what: str = "the scan") -> Scan:
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
    modality : {"CT", "MR"}, optional
        Override the modality. DICOM: from the ``Modality`` tag, or from the SOP
        class (CT or MR Image Storage) when the tag is missing. NIfTI:
        guessed with :func:`medvae.io.nifti.guess_modality`, and the reason kept in
        ``Scan.modality_guess`` so that commands can report it.
    nonfinite : {"raise", "zero"}, optional
        Policy for NaN/Inf voxels. **Default "raise"**: a MedvaeError naming the count.
        ``"zero"`` replaces them with 0 and logs a warning.
    reader : {"monai", "native"}, optional
        **Default "monai"**: MONAI's ``LoadImage`` with medvae's DICOM reader or MONAI's
        ``NibabelReader``. ``"native"``: the same readers' cores without MONAI (pydicom:
        :func:`medvae.io.dicom.read_volume`; nibabel: :func:`medvae.io.nifti.read_voxels`, slab by
        slab), giving the same array, affine, modality and rescale without MONAI's package import
        (seconds at start-up).
    what : str, optional
        What the file is, in errors ("1 of 9 voxels are NaN or infinite in the mask"); default "the scan".

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
    if modality is not None and str(modality).upper() not in MODALITIES:
        raise MedvaeError(f"modality must be one of {', '.join(MODALITIES)}, not {modality!r}", p)
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, not {nonfinite!r}")
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, not {reader!r}")
    if not p.exists():
        raise MedvaeError("no such file or folder", p)
    if p.is_dir() or not is_nifti_path(p):
        from medvae.io import dicom

        if p.is_file() and not dicom.is_dicom_file(p):
            if not os.access(p, os.R_OK):  # not "no 'DICM' marker": it could not be looked at
                raise MedvaeError("cannot read this file (Permission denied)", p)
            raise MedvaeError("neither a DICOM file (no 'DICM' marker) nor a NIfTI file "
                              "(.nii/.nii.gz)", p)
        if volume not in (None, 0):
            raise MedvaeError("--volume applies to 4-D NIfTI files only", p)
        if reader == "monai":
            scan = dicom.read_dicom(p, series=series)
        else:
            scan = dicom.volume_to_scan(dicom.read_volume(p, series=series), p)
    else:
        from medvae.io import nifti

        if series is not None:
            raise MedvaeError("--series applies to DICOM folders only", p)
        scan = nifti.read_nifti(p, volume=volume, reader="monai" if reader == "monai" else "nibabel")
        if modality is None:
            scan.modality, scan.modality_guess = nifti.guess_modality(scan.array)
    arr = scan.array
    # slab by slab: no volume-sized boolean array unless there is something to report or replace
    if not all(np.isfinite(arr[:, :, k0:k0 + 16]).all() for k0 in range(0, arr.shape[2], 16)):
        bad = ~np.isfinite(arr)
        if nonfinite == "zero":
            log.warning("%s: %d non-finite voxels (NaN/Inf) replaced with 0", p, int(bad.sum()))
            arr[bad] = 0
        del bad
        require_finite(arr, p, what=what)
    if modality is not None:
        scan.modality = str(modality).upper()
    return scan


def scan_slice_positions(scan: Scan) -> np.ndarray:
    """Each slice's position in mm along the unit normal of the slice plane that points to R, A or S
    (as the review page states positions), slice ``k`` = ``scan.array[:, :, k]``.

    A DICOM series gives the positions its slices store (ImagePositionPatient), so a missing slice
    or uneven gaps show; its affine steps by the mean gap. Otherwise, and for a series whose slices
    store no position, they follow :attr:`Scan.affine_mm`.

    Examples
    --------
    >>> scan = Scan(np.zeros((2, 2, 3), np.float32), np.diag([1.0, 1.0, 2.5, 1.0]), "MR", "nifti", Path("x.nii"))
    >>> scan_slice_positions(scan).tolist()
    [0.0, 2.5, 5.0]
    """
    a = scan.affine_mm
    normal = np.cross(a[:3, 0], a[:3, 1])
    norm = float(np.linalg.norm(normal))
    normal = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    sign = 1.0 if normal[int(np.argmax(np.abs(normal)))] >= 0 else -1.0
    normal = sign * normal
    if scan.format == "dicom" and scan.datasets:
        from medvae.io.dicom import slice_positions

        # along the plane's own normal (LPS on LPS: the same numbers as RAS on RAS, x and y both flip)
        stored = slice_positions(scan.datasets)
        if stored is not None and len(stored) == scan.n_slices:
            return sign * np.asarray(stored, dtype=np.float64)
    return np.array([float((a[:3, 2] * k + a[:3, 3]) @ normal) for k in range(scan.n_slices)])


def _refuse_input(out: Path, scan) -> None:
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
    src = Path(scan.path)
    if (getattr(scan, "format", None) == "dicom" and src.is_file() and not is_nifti_path(out)
            and src.resolve().parent in out_r.parents and _in_a_series_folder(src)):
        # a derived series inside the input's series folder would be read as part of it again
        raise MedvaeError(f"output lies inside the series folder of the input file {src.name}; a derived "
                          "series there would be read as part of that folder; choose another place", out)


def _in_a_series_folder(src: Path) -> bool:
    """True when another DICOM file beside ``src`` belongs to its series (the file is one slice of a
    series folder, not a lone file in a working folder)."""
    from medvae.io.dicom import is_dicom_file, series_uid

    own = series_uid(src)
    return own is not None and any(f.is_file() and f != src and is_dicom_file(f) and series_uid(f) == own
                                   for f in src.parent.iterdir())


def save_scan(scan: Scan, array: np.ndarray, out: str | os.PathLike, *, overwrite: bool = False,
              description: str = "medvae restored", rescale: str = "keep", model: str | None = None) -> Path:
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
        Replace an existing ``out`` that medvae wrote (a NIfTI file with a "medvae"
        description, or a folder holding only the derived series listed in its
        ``.medvae-output.json`` marker); the old one is removed only after the new one is
        complete. Anything else is refused. Default: refuse.
    description : str, optional
        DICOM: appended to SeriesDescription as ``" [description]"`` and written to
        DerivationDescription. NIfTI: ``descrip``.
    rescale : {"keep", "fit", "unit"}, optional
        DICOM stored values. ``"keep"``: re-quantized through the source RescaleSlope/Intercept
        into the source's stored integer type (clipped to its range). ``"fit"``: a new
        slope/intercept so that the values use the full signed 16-bit range (for small floats
        such as uncertainty maps). ``"unit"``: slope 1, intercept 0, signed 16-bit (whole
        numbers only: masks, whose 0 and 1 must come back exactly).
    model : str, optional
        DICOM: the model that made ``array``, named in DerivationDescription: a label
        (:func:`medvae.models.label.model_label`), never a local path, which can name a patient.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    MedvaeError
        Wrong shape, non-finite values, ``out`` equal to / inside / containing the input,
        ``out`` exists without ``overwrite`` or was not written by medvae, another process
        writes ``out``, NIfTI scan with a non-NIfTI ``out``.

    Examples
    --------
    >>> scan = load_scan("dev/dicom/series_ct_head")                 # doctest: +SKIP
    >>> save_scan(scan, scan.array * 0.5, "restored_series")         # doctest: +SKIP
    PosixPath('restored_series')
    >>> save_scan(scan, scan.array, "restored.nii.gz")               # doctest: +SKIP
    PosixPath('restored.nii.gz')
    """
    out = Path(out)
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}, not {rescale!r}")
    from medvae.io.derived_series import check_model_label

    check_model_label(model)  # before anything is written
    array = np.asarray(array)
    if array.shape != scan.array.shape:
        raise MedvaeError(f"array shape {array.shape} does not match the scan's shape "
                          f"{scan.array.shape}", out)
    require_finite(array, out, what="the array to write")
    if (is_nifti_path(out) and array.dtype.kind == "f" and array.dtype.itemsize > 4
            and array.size and float(np.max(np.abs(array))) > float(np.finfo(np.float32).max)):
        raise MedvaeError("the array to write holds values beyond float32's range (about ±3.4e38), the type "
                          "medvae writes NIfTI in", out)  # they were written as inf
    check_output(scan, out)
    with claim_scan_output(out, overwrite=overwrite) as claim:
        if is_nifti_path(out):
            from medvae.io import nifti

            with claim.writing() as tmp:
                nifti.write_nifti(scan, array, tmp, description=description)
        else:
            from medvae.io import derived_series

            with claim.writing(finalize=derived_series.arm_series) as tmp:
                derived_series.write_dicom_series(scan, array, tmp, description=description, rescale=rescale,
                                                  model=model)
    return out


def check_output(scan, out: str | os.PathLike, *,
                 uneven_advice: str = "write a DICOM series (an output folder) instead") -> None:
    """Every check of an output that needs no data: not the input, a format that fits, a
    geometry the format can store. Run it before restoring, so nothing fails after the work.

    ``scan`` is a :class:`Scan` or a series opened by :func:`medvae.io.dicom.open_series` (its
    ``path``, ``files``, ``affine`` and ``format`` are used)."""
    from medvae.io.dicom import DICOM_SUFFIXES

    out = Path(out)
    _refuse_input(out, scan)
    if is_nifti_path(out):
        from medvae.io import nifti
        from medvae.io.scan import mixed_case_nifti_suffix

        suffix = mixed_case_nifti_suffix(out.name)
        if suffix:  # nibabel wrote x.Nii as x.nii (the staged output was then not found) and cannot read it
            raise MedvaeError(f"the suffix {suffix} mixes upper and lower case, which nibabel cannot write "
                              f"or read back: give {suffix.lower()} (or {suffix.upper()})", out)

        nifti.check_affine(scan.affine, scan.path)
        if scan.format == "dicom":
            _check_even_slices(scan, uneven_advice)
    elif scan.format != "dicom":
        raise MedvaeError("a NIfTI scan is written as NIfTI: give a path ending in .nii or "
                          ".nii.gz", out)
    elif out.suffix.lower() in DICOM_SUFFIXES and not (
            scan.path is not None and Path(scan.path).is_dir()
            and out.name in (Path(scan.path).name, Path(scan.path).resolve().name)):
        # it became a folder named like a file, which viewers failed to open (but a series folder named
        # x.dcm gives one named so: a batch keeps its inputs' names)
        raise MedvaeError("a DICOM output is a folder that receives the derived series' slices: give a folder "
                          f"name, not a file name ending in {out.suffix}", out)


def _check_even_slices(scan, advice: str) -> None:
    """Refuse to write a DICOM series whose slices a single NIfTI affine would misplace."""
    from medvae.io.dicom import affine_position_error

    datasets = getattr(scan, "datasets", None) or getattr(scan, "headers", None) or []
    error, k = affine_position_error(datasets, scan.affine)
    step = float(np.linalg.norm(np.asarray(scan.affine)[:3, 2]))
    if error > 0.05 * step + 0.01:
        files = list(scan.files or [scan.path])
        raise MedvaeError(
            f"the slices are not evenly spaced (a missing slice or uneven gaps): a NIfTI affine would "
            f"put slice {k + 1} {error:.2f} mm from its ImagePositionPatient; {advice}, which keeps "
            "every slice's position",
            files[k] if len(files) > k and len(files) == len(datasets) else files[0])


@contextlib.contextmanager
def claim_scan_output(out: str | os.PathLike, *, overwrite: bool = False) -> Iterator:
    """Claim a scan output before the work (see :func:`medvae.io.atomic.claim_output`).

    A ``.nii``/``.nii.gz`` path is a file that only a NIfTI medvae wrote may replace; anything
    else is a folder for a derived DICOM series that only that series may replace.
    :func:`save_scan` into a claimed output re-uses the claim.
    """
    from medvae.io.atomic import claim_output

    if is_nifti_path(out):
        from medvae.io.nifti import is_medvae_nifti

        with claim_output(out, kind="file", overwrite=overwrite, owned=is_medvae_nifti) as claim:
            yield claim
    else:
        from medvae.io.derived_series import check_derived_series

        with claim_output(out, kind="dir", overwrite=overwrite, owned=check_derived_series) as claim:
            yield claim
