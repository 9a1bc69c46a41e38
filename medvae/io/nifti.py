"""NIfTI reading (MONAI ``LoadImage`` + ``NibabelReader``, or nibabel alone) and writing (nibabel).

The voxel data come from MONAI's ``LoadImage(reader="NibabelReader")`` (``reader="monai"``, what
:func:`medvae.io.load_scan` uses by default) or from nibabel's array proxy directly
(``reader="nibabel"``: the same values without MONAI's package import, read slab by slab); the
header and the affine come from nibabel itself, because MONAI's metadata dictionary does not keep a
nibabel header that can be written back (and may correct pixdim on the fly). Writing keeps
the source header: same sform, qform and codes, so the affine survives a round trip exactly;
the units and TR (pixdim[4]) are kept too (one volume of a 4-D file keeps its own start time: toffset + N
TR), while scaling, cal_min/cal_max and the intent are reset.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medvae.errors import MedvaeError
from medvae.intensity import CT_FOREGROUND_HU, smoothed_percentile
from medvae.io.scan import Scan, printable

log = logging.getLogger(__name__)


def guess_modality(array: np.ndarray) -> tuple[str, str]:
    """Guess ``"CT"`` or ``"MR"`` from the values of a NIfTI volume, and say why.

    NIfTI has no modality tag. CT when the minimum lies in [-3100, -500] (air at about
    -1000 HU, padding down to -3024) and the maximum is below 30000; everything else is taken
    as MR. A CT cropped to soft tissue (an atlas of the brain, say) has no air and is taken as
    MR: callers report the reason, and users pass ``modality="CT"`` (``--modality CT``).
    Zero-mean noise can push an MR background below -500 (a DWI under Gaussian noise of 10 % of its
    window reaches -1130), so for a volume the minimum is also taken of in-plane smoothed slices
    (:func:`medvae.intensity.smoothed_percentile`, at most 1 M voxels), where noise averages out and
    air, which fills whole regions, stays: MR when smoothing lifts the minimum above -500 and by more
    than three quarters of its depth.

    Returns
    -------
    modality : str
    reason : str
        One phrase for the user, e.g. ``"guessed: minimum 0 is above -500 (no air in HU)"``.

    Examples
    --------
    >>> guess_modality(np.array([-1024.0, 0.0, 1500.0]))[0]
    'CT'
    >>> guess_modality(np.array([-30.0, 385.0]))
    ('MR', 'guessed from the values: minimum -30 is above -500, so no air in HU')
    """
    if array.size == 0:
        return "MR", "guessed: the image is empty"
    if not np.isfinite(array).any():  # all NaN: refused by the caller in one line, without numpy's warning
        return "MR", "guessed: the image holds no finite value"
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if lo > CT_FOREGROUND_HU:
        return "MR", f"guessed from the values: minimum {lo:g} is above {CT_FOREGROUND_HU:g}, so no air in HU"
    if np.ndim(array) >= 2:
        smooth = smoothed_percentile(array, 0.0, max_voxels=1_000_000)
        # noise: smoothing takes away most of the depth (sigma 2 px: about 90 %); air, even a small pocket
        # of bowel gas (-1024 HU -> -391 smoothed), keeps much of it
        if smooth is not None and smooth > CT_FOREGROUND_HU and smooth > 0.25 * lo:
            return "MR", (f"guessed from the values: minimum {lo:g}, but {smooth:g} once smoothed (noise, "
                          f"not air in HU)")
    if lo < -3100.0 or hi >= 30000.0:
        return "MR", f"guessed from the values: range {lo:g}..{hi:g} is not a HU range"
    return "CT", f"guessed from the values: minimum {lo:g} looks like air in HU"


def nifti_description(path: Path) -> str | None:
    """The ``descrip`` text of a NIfTI file's header; None when it cannot be read as NIfTI."""
    import nibabel as nib

    try:
        return bytes(np.asarray(nib.load(str(path)).header.get("descrip"))).decode("latin-1")
    except Exception:  # not a NIfTI file nibabel reads: no description
        return None


def is_medvae_nifti(path: Path, _marker: object = None) -> None:
    """Raise MedvaeError unless ``path`` is a NIfTI file medvae wrote (``descrip`` "medvae ...").

    The ``owned`` check of :func:`medvae.io.atomic.claim_output` for NIfTI outputs.
    """
    descrip = nifti_description(path)
    if descrip is None:  # a text file at the output's name was said to have "a NIfTI description"
        raise MedvaeError("refusing to replace a file medvae did not write (it is not a NIfTI file); remove it "
                          "yourself or choose another output", path)
    if not descrip.startswith("medvae"):
        raise MedvaeError("refusing to replace a file medvae did not write (its NIfTI description "
                          "does not start with 'medvae'); remove it yourself or choose another output",
                          path)


def is_sheared(affine: np.ndarray, *, tol: float = 1e-4) -> bool:
    """True when the voxel axes of ``affine`` are not orthogonal (e.g. a gantry-tilted CT).

    Examples
    --------
    >>> a = np.eye(4); a[1, 2] = 0.36
    >>> is_sheared(a), is_sheared(np.diag([-0.5, 0.5, 2.0, 1.0]))
    (True, False)
    """
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    unit = cols / np.linalg.norm(cols, axis=0)
    return bool(np.max(np.abs(unit.T @ unit - np.eye(3))) > tol)


def check_affine(affine: np.ndarray, path) -> None:
    """Raise MedvaeError when ``affine`` cannot be stored in a NIfTI header (before any work)."""
    import nibabel as nib

    a = np.asarray(affine, dtype=np.float64)
    # scale-free (the header's unit may be metres: a 1 mm^3 voxel is 1e-9 m^3): no zero spacing, and the
    # axes not collinear
    norms = np.linalg.norm(a[:3, :3], axis=0) if a.shape == (4, 4) else np.zeros(3)
    if (a.shape != (4, 4) or not np.all(np.isfinite(a)) or not np.all(norms > 0)
            or abs(np.linalg.det(a[:3, :3])) < 1e-6 * float(np.prod(norms))):
        raise MedvaeError("the scan's geometry is degenerate (zero or missing voxel spacing or "
                          "orientation); cannot write it as NIfTI", path)
    try:
        nib.Nifti1Header().set_qform(a, code=1)
    except Exception as exc:
        raise MedvaeError(f"the scan's geometry cannot be written as NIfTI ({exc})", path) from None


def _nib_load(path: Path, **kwargs):
    import nibabel as nib

    from medvae.io.scan import mixed_case_nifti_suffix

    suffix = mixed_case_nifti_suffix(Path(path).name)
    if suffix:  # nibabel looked for x.nii.gz: "No such file or directory" for a file that is there
        plain = suffix.lower()
        raise MedvaeError(f"the suffix {suffix} mixes upper and lower case, which nibabel cannot read: rename "
                          f"it to {plain} (or {plain.upper()})", path)
    try:
        img = nib.load(str(path), **kwargs)
    except Exception as exc:  # nibabel raises many types (ImageFileError, ValueError, OSError...)
        raise MedvaeError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path) from exc
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise MedvaeError(f"not a NIfTI image (nibabel read it as {type(img).__name__})", path)
    return img


def n_volumes(path: str | Path) -> int:
    """Number of 3-D volumes in a NIfTI file (1 for a 2-D or 3-D image), from the header only.

    Examples
    --------
    >>> n_volumes("dev/nifti/nibabel_example4d.nii.gz")  # doctest: +SKIP
    2
    """
    shape = _nib_load(Path(path)).shape
    return int(np.prod(shape[3:])) if len(shape) > 3 else 1


#: slices per read of an uncompressed NIfTI file (``reader="nibabel"``)
SLAB_SLICES = 16


def read_nifti(path: Path, *, volume: int | None = None, reader: str = "monai") -> Scan:
    """Read a 2-D, 3-D or 4-D NIfTI file; see :func:`medvae.io.load_scan`.

    A 4-D file gives one volume: ``volume`` (0-based), by default 0 with a log message.
    Dimensions beyond the 4th must be singletons. ``reader``: ``"monai"`` (``LoadImage`` with
    MONAI's ``NibabelReader``) or ``"nibabel"`` (:func:`read_voxels`: the same float32 values,
    without importing MONAI).
    """
    if reader not in ("monai", "nibabel"):
        raise ValueError(f"reader must be 'monai' or 'nibabel', not {reader!r}")
    # the nibabel reader reads only the bytes it needs (no memory map counted in the process)
    before = _stamp(path)
    img = _nib_load(path) if reader == "monai" else _nib_load(path, mmap=False, keep_file_open=True)
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 2:
        raise MedvaeError(f"NIfTI image has {len(shape)} dimension(s); need 2 to 4", path)
    if len(shape) > 4 and any(s != 1 for s in shape[4:]):
        raise MedvaeError(f"NIfTI image of shape {shape} is not supported (5-D data, e.g. "
                          "vectors or tensors)", path)
    _check_datatype(img, path)
    nvol = shape[3] if len(shape) >= 4 else 1
    if volume is not None and (isinstance(volume, bool) or not isinstance(volume, (int, np.integer))):
        raise MedvaeError(f"volume must be a whole number, not {volume!r}", path)  # 1.5 read volume 1
    if volume is not None and not 0 <= int(volume) < nvol:
        raise MedvaeError(f"volume {volume} does not exist: the file has {nvol} volume(s) "
                          f"(0..{nvol - 1})", path)
    if len(shape) >= 4 and nvol > 1 and volume is None:
        log.warning("%s: 4-D NIfTI with %d volumes; using volume 0 (a single restore picks another with --volume N)",
                    path, nvol)
    vol = int(volume or 0)
    try:
        with np.errstate(over="raise"):  # a float64 value beyond float32 became inf, then "NaN or infinite"
            arr = _monai_voxels(path, vol) if reader == "monai" else read_voxels(img, vol)
    except MedvaeError:
        raise
    except FloatingPointError:
        raise MedvaeError("holds values beyond float32's range (about ±3.4e38), the type medvae reads scans "
                          "in", path) from None
    except Exception as exc:  # truncated gzip, short file, bad datatype...
        raise MedvaeError(f"cannot read the NIfTI voxel data, file truncated or corrupt "
                          f"({type(exc).__name__}: {exc})", path) from exc
    if _stamp(path) != before:  # the header and the voxels are read apart: they must be one file's
        raise MedvaeError("the file was replaced or changed while it was read (its header and voxels could "
                          "come from two versions): read it again when no other command writes it", path)
    _warn_if_forms_disagree(img, path)
    descrip = img.header.get("descrip")
    description = None
    if descrip is not None:
        # a C string that some writers fill past a NUL ("FSL3.3\0 v2.25"): no control byte reaches a terminal
        text = bytes(np.asarray(descrip)).decode("latin-1")
        description = printable(text) or None
    header = img.header.copy()
    if vol and len(shape) >= 4:  # volume N starts N repetitions after volume 0 (toffset: the file's start)
        tr = float(header["pixdim"][4])
        start = float(header["toffset"]) + vol * tr if np.isfinite(tr) and tr > 0 else None
        # only where the header's own float type holds it (a TR of 3e38 made it inf, with numpy's warning)
        if start is not None and np.isfinite(start) and abs(start) <= float(np.finfo(header["toffset"].dtype).max):
            header["toffset"] = start
    return Scan(
        array=np.ascontiguousarray(arr),
        affine=np.array(img.affine, dtype=np.float64),
        modality="MR",
        format="nifti",
        path=Path(path),
        description=description,
        header=header,
    )


def _stamp(path: Path) -> tuple[int, ...]:
    """Which file is at ``path`` and which version of it: device, inode, size, modification time."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _warn_if_forms_disagree(img, path: Path) -> None:
    """Say so when a file's sform and qform place its voxels apart: medvae (as nibabel) uses the sform,
    ITK-based tools the qform, so the two would compare or overlay the scan a distance apart."""
    hdr = img.header
    if not (int(hdr["sform_code"]) > 0 and int(hdr["qform_code"]) > 0):
        return
    s, q = hdr.get_sform(), hdr.get_qform()
    corners = np.array([[i, j, k, 1.0] for i in (0, hdr["dim"][1] - 1) for j in (0, hdr["dim"][2] - 1)
                        for k in (0, max(hdr["dim"][3], 1) - 1)])
    from medvae.io.scan import nifti_mm_per_unit

    # in mm: a header in metres hid a 5 cm gap, one in micrometres called 50 µm "50 mm"
    apart = nifti_mm_per_unit(hdr) * float(np.max(np.linalg.norm((corners @ s.T - corners @ q.T)[:, :3], axis=1)))
    if apart > 0.1:  # mm; a qform rounds an sform's rotation to float32 quaternions, far below this
        log.warning("%s: its sform and qform place voxels up to %.1f mm apart; medvae uses the sform "
                    "(as nibabel does), ITK-based tools the qform", path, apart)


def _check_datatype(img, path: Path) -> None:
    """Raise MedvaeError for voxels that are not one real number each (RGB, complex, ...).

    Casting them to float32 would fail with a misleading "corrupt" message (RGB) or silently keep
    the real part only (complex).
    """
    dtype = np.dtype(img.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "biuf":
        kind = ("RGB/RGBA colour" if dtype.fields is not None else
                "complex" if dtype.kind == "c" else str(dtype))
        raise MedvaeError(f"NIfTI datatype {kind} ({dtype.str}) is not supported: medvae restores "
                          "scalar real-valued images (save the magnitude or one channel as a "
                          "NIfTI of its own)", path)


def _monai_voxels(path: Path, vol: int) -> np.ndarray:
    from monai.data import NibabelReader

    from medvae.io.scan import monai_load_image

    reader = NibabelReader()
    loader = monai_load_image(reader)  # LoadImage(reader=NibabelReader(), image_only=False)
    data, _meta = loader(str(path), reader=reader)
    arr = np.asarray(data.numpy() if hasattr(data, "numpy") else data, dtype=np.float32)
    if arr.ndim > 3:
        arr = arr.reshape(arr.shape[:3] + (-1,))[..., vol]
    elif arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def read_voxels(img, volume: int = 0, *, slab: int = SLAB_SLICES) -> np.ndarray:
    """The float32 ``(X, Y, Z)`` voxels of volume ``volume`` of a nibabel NIfTI image.

    The values of MONAI's ``NibabelReader`` (nibabel's scaled ``dataobj``, then float32), read
    ``slab`` slices at a time into the one float32 array: the stored values are never held whole
    beside it. Slabs are read in file order, so a gzipped file opened with ``keep_file_open=True``
    is decompressed once.

    Examples
    --------
    >>> import nibabel as nib
    >>> img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    >>> read_voxels(img, slab=3)[1, 2]
    array([20., 21., 22., 23.], dtype=float32)
    """
    shape = tuple(int(s) for s in img.shape)
    nz = shape[2] if len(shape) >= 3 else 1
    out = np.empty(shape[:2] + (nz,), dtype=np.float32)
    if len(shape) == 2:
        out[:, :, 0] = np.asanyarray(img.dataobj)
        return out
    rest = (int(volume),) + (0,) * (len(shape) - 4) if len(shape) >= 4 else ()
    for k0 in range(0, nz, max(1, slab)):
        k1 = min(k0 + slab, nz)
        out[:, :, k0:k1] = img.dataobj[(slice(None), slice(None), slice(k0, k1)) + rest]
    return out


def write_nifti(scan: Scan, array: np.ndarray, out: Path, *, description: str = "medvae restored"
                ) -> Path:
    """Write ``array`` as a float32 NIfTI file at ``out`` with the geometry of ``scan``.

    With a NIfTI source the header is copied (sform, qform and their codes kept, so the affine
    is reproduced exactly); otherwise a new header gets ``scan.affine`` as sform and qform
    (code 1, scanner). Use :func:`medvae.io.save_scan`, which adds the atomic write and checks.
    """
    import nibabel as nib

    array = np.asarray(array, dtype=np.float32)  # save_scan refused values float32 cannot hold
    header = scan.header
    if isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)):
        hdr = header.copy()
        cls = nib.Nifti2Image if isinstance(hdr, nib.Nifti2Header) else nib.Nifti1Image
        same_geometry = np.array_equal(hdr.get_best_affine(), np.asarray(scan.affine))
        if len(hdr.get_data_shape()) == 2 and array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]  # a 2-D source comes back 2-D
        pixdim = hdr["pixdim"].copy()
        hdr.set_data_shape(array.shape)
        # set_data_shape resets pixdim beyond the new rank to 1: keep the source's (a 2-D slice's
        # thickness in pixdim[3], which the qform is built from; the TR in pixdim[4])
        hdr["pixdim"][1:] = pixdim[1:]
        hdr.set_data_dtype(np.float32)
        # restored intensities are no statistic: drop intent code, parameters and name
        hdr.set_intent("none", (), name="")
        img = cls(array, None if same_geometry else scan.affine, header=hdr)
        if not same_geometry:
            img.set_sform(scan.affine, code=int(hdr["sform_code"]) or 1)
            img.set_qform(scan.affine, code=int(hdr["qform_code"]) or 1)
    else:
        affine = np.asarray(scan.affine, dtype=np.float64)
        img = nib.Nifti1Image(array, affine)
        img.set_sform(affine, code=1)
        # a qform is a rotation: it cannot hold the shear of a gantry-tilted series, and a qform
        # approximating it would put far voxels centimetres off for readers that trust the qform
        sheared = is_sheared(affine)
        img.set_qform(affine, code=0 if sheared else 1)
        if sheared:
            log.warning("%s: sheared geometry (gantry tilt): the NIfTI keeps it in the sform only "
                        "(qform code 0); ITK refuses such files, nibabel and MONAI read them exactly",
                        scan.path)
        img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"] = 0
    img.header["cal_max"] = 0
    if not description.startswith("medvae"):  # the mark by which --overwrite knows its own files
        description = f"medvae {description}"
    img.header["descrip"] = description.encode("ascii", "replace")[:79]
    nib.save(img, str(out))
    return out
