"""A small sample set built from files that ship inside pip packages (no download).

``build_samples(out_dir)`` writes:

``ct_series/``
    A CT DICOM series folder (``IM0001.dcm``, ``IM0002.dcm``). pip packages hold no real
    multi-slice CT of useful size (pydicom's only CT series, ``dicomdirtests/.../CT5N``, is
    16x16 pixels), so this is a **stack of two distinct real 512x512 CT slices** from two
    different patients (a head and an abdomen, pydicom-data test files), given one synthetic
    geometry (nominal 0.478516 mm pixels, 5 mm apart) and placeholder identifiers. It is a format
    and pipeline sample, not an anatomical volume. Both slices are **held out** from the default
    model's training (they are validation volumes of ``configs/default.yaml``, see
    :data:`CT_HELD_OUT`), so the demo scores the model on CT it never trained on. The other
    512x512 CT slices in pip packages (``J2K_pixelrep_mismatch``, ``bad_sequence``) are training
    slices and are not used.
``mr.nii.gz``
    A real MR EPI volume: volume 0 of nibabel's ``tests/data/example4d.nii.gz`` (128x96x24,
    int16, header and affine kept).
``mr_multiframe.dcm``
    pydicom-data's ``emri_small.dcm`` unchanged: an Enhanced MR multi-frame file, 10 frames of
    64x64 (it has no pixel spacing; medvae assumes 1 mm in-plane).
``README.txt``, ``manifest.json``
    What each file is, its source package, version, path and license, and SHA-256 sums.

The build is deterministic (fixed UIDs, dates and gzip header) and takes well under 5 s.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np

from medvae.errors import MedvaeError

#: (package, path inside the package, short description, license) of the CT slices, in Z order.
CT_SOURCES = (
    ("pydicom-data", "data_store/data/693_UNCR.dcm",
     "head CT (CQ500 case 310), uncompressed",
     "MIT (pydicom-data LICENSE); the image is case 310 of qure.ai's CQ500 data set, "
     "CC BY-NC-SA 4.0 (attribution, non-commercial, share-alike)"),
    ("pydicom-data", "data_store/data/explicit_VR-UN.dcm",
     "abdominal CT (pancreas data set, case 0001), JPEG 2000 lossless",
     "MIT (pydicom-data LICENSE); the image is case 0001 of the NIH Pancreas-CT collection on TCIA "
     "(TCIA data usage policy: cite the collection)"),
)
#: Why these CT slices: both are validation volumes of configs/default.yaml (``data.val_paths``),
#: which training leaves out by volume, so the shipped model never trained on them.
CT_HELD_OUT = "held out from the default model's training (validation volumes of configs/default.yaml)"
MR_NIFTI_SOURCE = ("nibabel", "nibabel/tests/data/example4d.nii.gz",
                   "MR EPI time series, volume 0 of 2", "MIT (nibabel COPYING covers the data)")
MR_MULTIFRAME_SOURCE = ("pydicom-data", "data_store/data/emri_small.dcm",
                        "Enhanced MR multi-frame, 10 frames of 64x64, head",
                        "MIT (pydicom-data LICENSE)")

CT_PIXEL_SPACING = (0.478516, 0.478516)
CT_SLICE_GAP = 5.0
CT_ORIGIN = (-122.5, -122.5, 0.0)
UID_SEED = "medvae-samples-v1"
CT_STUDY_DATE = "20000101"


def _package_file(package: str, inner: str) -> Path:
    """Locate a file shipped inside an installed distribution (no download, no import)."""
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError as exc:
        raise MedvaeError(f"sample source needs the pip package {package!r}; pip install {package}",
                          inner) from exc
    path = Path(str(dist.locate_file(inner)))
    if not path.is_file():
        raise MedvaeError(f"sample source missing from the installed {package} package", inner)
    return path


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[UID_SEED, *parts]))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ct_slice_dataset(hu: np.ndarray, k: int, source: str):
    """A clean CT Image Storage dataset carrying ``hu`` (stored uint16 12-bit, intercept -1024)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

    sop_uid = _uid("ct", "instance", str(k))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = CT_STUDY_DATE
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "medvae sample data"
    ds.SeriesDescription = f"medvae sample: {len(CT_SOURCES)} distinct real CT slices (not a volume)"
    ds.DerivationDescription = (f"pixels of {source} (HU clipped to -1024..3071); geometry and "
                                "identifiers are synthetic")
    ds.PatientName = "SAMPLE^CT"
    ds.PatientID = "MEDVAE-SAMPLE-CT"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.KVP = ""
    ds.SliceThickness = f"{CT_SLICE_GAP:g}"
    ds.StudyInstanceUID = _uid("ct", "study")
    ds.SeriesInstanceUID = _uid("ct", "series")
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [f"{CT_ORIGIN[0]:g}", f"{CT_ORIGIN[1]:g}",
                               f"{CT_ORIGIN[2] + k * CT_SLICE_GAP:g}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid("ct", "frame-of-reference")
    ds.PositionReferenceIndicator = ""
    ds.PixelSpacing = [f"{v:g}" for v in CT_PIXEL_SPACING]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    stored = (np.clip(np.rint(hu), -1024, 3071) + 1024).astype(np.uint16)
    ds.set_pixel_data(stored, "MONOCHROME2", 12, generate_instance_uid=False)
    return ds


def _write_ct_series(folder: Path) -> list[dict]:
    import warnings

    import pydicom
    from pydicom.pixels import apply_rescale, pixel_array

    from medvae.io.dicom import check_codec

    folder.mkdir()
    entries = []
    shape = None
    for k, (pkg, inner, what, lic) in enumerate(CT_SOURCES):
        src = _package_file(pkg, inner)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            src_ds = pydicom.dcmread(src)
            check_codec(src_ds, src)  # a JPEG 2000 source without its decoder: one line, not a traceback
            hu = np.asarray(apply_rescale(pixel_array(src_ds), src_ds), dtype=np.float64)
        # the series' synthetic orientation is 1\\0\\0\\0\\1\\0: mirror a source stored otherwise so the
        # anatomy keeps its place (the abdomen slice, stored 1\\0\\0\\0\\-1\\0, had its spine anterior)
        iop = [float(v) for v in src_ds.get("ImageOrientationPatient") or (1, 0, 0, 0, 1, 0)]
        if iop[0] < 0:
            hu = hu[:, ::-1]
        if iop[4] < 0:
            hu = hu[::-1, :]
        if shape is None:
            shape = hu.shape
        if hu.shape != shape:
            raise MedvaeError(f"sample CT slice is {hu.shape}, expected {shape}", src)
        ds = _ct_slice_dataset(hu, k, f"{pkg} {inner}")
        name = folder / f"IM{k + 1:04d}.dcm"
        ds.save_as(name, enforce_file_format=True)
        entries.append({"file": f"ct_series/{name.name}", "source_package": pkg,
                        "source_version": _version(pkg), "path_in_package": inner,
                        "content": what, "license": lic, "sha256": _sha256(name)})
    return entries


def _write_mr_nifti(path: Path) -> dict:
    import nibabel as nib

    pkg, inner, what, lic = MR_NIFTI_SOURCE
    src = _package_file(pkg, inner)
    img = nib.load(str(src))
    vol = np.asanyarray(img.dataobj[..., 0])
    hdr = img.header.copy()
    pixdim = hdr["pixdim"].copy()
    hdr.set_data_shape(vol.shape)
    hdr["pixdim"][1:] = pixdim[1:]  # set_data_shape resets the TR (pixdim[4]) to 1: "header kept"
    out = nib.Nifti1Image(vol, None, header=hdr)
    raw = out.to_bytes()
    path.write_bytes(gzip.compress(raw, compresslevel=6, mtime=0))
    return {"file": path.name, "source_package": pkg, "source_version": _version(pkg),
            "path_in_package": inner, "content": what, "license": lic,
            "shape": list(vol.shape), "sha256": _sha256(path)}


def _copy_mr_multiframe(path: Path) -> dict:
    pkg, inner, what, lic = MR_MULTIFRAME_SOURCE
    shutil.copyfile(_package_file(pkg, inner), path)
    return {"file": path.name, "source_package": pkg, "source_version": _version(pkg),
            "path_in_package": inner, "content": what, "license": lic,
            "sha256": _sha256(path)}


README = """medvae sample data
==================

Built by `medvae samples` from files shipped inside pip packages; nothing is downloaded.

ct_series/   CT DICOM series, 2 files IM0001, IM0002 (512 x 512, 12-bit, rescale -1024, HU).
             NOT an anatomical volume: pip packages carry no real multi-slice CT of useful size,
             so these are two distinct real CT slices of two different patients (head, abdomen)
             stacked into one series. Pixels are real (HU clipped to -1024..3071); pixel spacing
             (0.478516 mm, that of the first slice), positions (5 mm apart), patient/study
             identifiers and UIDs are synthetic. Both slices are held out from the training of
             medvae's default model (validation volumes of configs/default.yaml). Sources, in Z order:
{ct_list}
mr.nii.gz    MR EPI volume 128 x 96 x 24 (2 x 2 x 2.2 mm, LAS, int16): volume 0 of
             nibabel {nib_version} nibabel/tests/data/example4d.nii.gz, header and affine kept.
             License: MIT (nibabel's COPYING covers the package including its data).
mr_multiframe.dcm
             Enhanced MR multi-frame DICOM, 10 frames of 64 x 64 (head), copied unchanged from
             pydicom-data {pdd_version} data_store/data/emri_small.dcm. It carries no pixel
             spacing or positions: medvae assumes 1 mm pixels and uses SpacingBetweenSlices
             (1.2 mm). License: MIT (pydicom-data LICENSE).
manifest.json  the same, machine-readable, with SHA-256 sums.
"""


def build_samples(out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Build the sample set in ``out_dir`` (atomically) and return the scan paths.

    Parameters
    ----------
    out_dir : str or PathLike
        Folder to create. An existing non-empty folder is refused unless ``overwrite``.
    overwrite : bool, optional
        Replace an existing ``out_dir`` (only after the new set is complete).

    Returns
    -------
    dict of str to pathlib.Path
        ``"ct_series"`` (DICOM folder), ``"mr"`` (``mr.nii.gz``) and ``"mr_multiframe"``
        (enhanced MR DICOM file); ``manifest.json`` and ``README.txt`` lie beside them.

    Raises
    ------
    MedvaeError
        ``out_dir`` exists, or a source file is missing from the installed packages
        (pydicom, pydicom-data, nibabel).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> paths = build_samples(pathlib.Path(tempfile.mkdtemp()) / "samples")  # doctest: +SKIP
    >>> sorted(paths)                                                       # doctest: +SKIP
    ['ct_series', 'mr', 'mr_multiframe']
    """
    from medvae.io.atomic import atomic_output

    out = Path(out_dir)
    with atomic_output(out, kind="dir", overwrite=overwrite) as tmp:
        ct = _write_ct_series(tmp / "ct_series")
        mr = _write_mr_nifti(tmp / "mr.nii.gz")
        mf = _copy_mr_multiframe(tmp / "mr_multiframe.dcm")
        manifest = {
            "name": "medvae samples",
            "built_by": "medvae.io.samples.build_samples",
            "network": False,
            "samples": {
                "ct_series": {"path": "ct_series", "format": "dicom", "modality": "CT",
                              "shape": [512, 512, len(ct)],
                              "nature": f"stack of distinct real CT slices ({len(ct)} patients), "
                                        "synthetic geometry and identifiers; not an anatomical volume",
                              "training": CT_HELD_OUT,
                              "pixel_spacing_mm": list(CT_PIXEL_SPACING),
                              "slice_gap_mm": CT_SLICE_GAP, "files": ct},
                "mr": {"path": "mr.nii.gz", "format": "nifti", "modality": "MR", **mr},
                "mr_multiframe": {"path": "mr_multiframe.dcm", "format": "dicom",
                                  "modality": "MR", "shape": [64, 64, 10], **mf},
            },
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        ct_list = "\n".join(f"               IM{k + 1:04d}.dcm  {pkg} {_version(pkg)} {inner}: {what}; "
                            f"license {lic}" for k, (pkg, inner, what, lic) in enumerate(CT_SOURCES))
        (tmp / "README.txt").write_text(README.format(
            ct_list=ct_list, nib_version=_version("nibabel"), pdd_version=_version("pydicom-data")))
    return {"ct_series": out / "ct_series", "mr": out / "mr.nii.gz",
            "mr_multiframe": out / "mr_multiframe.dcm"}
