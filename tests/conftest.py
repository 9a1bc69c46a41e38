"""Shared test fixtures.

Real scans: ``../shared/data/dev`` beside the repository when it is there (``MEDVAE_DEV_DATA``
names another folder; ``MEDVAE_DEV_DATA=/nonexistent`` simulates a machine without it). Without it,
``dev_data`` is a tree with the same relative paths built once per session from pip packages
(:func:`build_dev_standin`): the pydicom, pydicom-data and nibabel files are the identical files
copied from the installed packages; the files of packages that are not installed (heudiconv) or
that come from Debian (the InVesalius CT head and its DICOM series) are replaced by stand-ins of
real scans from pip packages. Tests read what they assert exactly about those stand-ins (shape,
spacing, values, series UID) from ``dev_expect`` (:class:`DevExpect`), so they assert the real
behaviour in both cases. A test that needs a file that neither provides calls :func:`missing_data`:
it skips, or fails loudly when the environment variable ``CI`` is set.

``dev_data``: the development scans or their stand-ins. ``dev_expect``: the exact properties of the
files that differ between the two. ``sample_paths``: the pip-built sample set of ``medvae samples``
(built once per session). ``real_scans``: a CT and MR volumes from either (see :class:`RealScans`);
``ct_slice_hu`` and ``mr_volume``: arrays from them. ``copy_into``: copy files or folders into
``tmp_path`` (tests never modify the shared data). ``assert_same_image``: compare two (array, RAS
affine) images voxel by voxel at matching world positions.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

DEV_DATA = Path(os.environ.get("MEDVAE_DEV_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data" / "dev")
IN_CI = bool(os.environ.get("CI"))

# pytest runs with --doctest-modules (pyproject.toml), which imports every module it collects:
# ddp_worker.py is a script that torchrun starts, not a module to import.
collect_ignore = ["ddp_worker.py"]


def missing_data(what: str) -> None:
    """Skip the test because ``what`` is missing, or fail it when ``CI`` is set."""
    if IN_CI:
        pytest.fail(f"{what} (CI is set: missing test data fails instead of skipping)", pytrace=False)
    pytest.skip(what)


@dataclass(frozen=True)
class CTHead:
    """``nifti/invesalius_cranium_ct.nii.gz`` and ``dicom/series_ct_head`` (the same volume as a
    DICOM series of one file per slice, written by SimpleITK)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    value_range: tuple[float, float]      # HU
    nifti_orientation: str
    dicom_orientation: str                # of the series as medvae loads it (slice order reversed)
    series_uid: str
    description: str
    spacing_text: str                     # the ``spacing`` line of ``medvae info``

    @property
    def n_slices(self) -> int:
        return self.shape[2]


@dataclass(frozen=True)
class MRSmall:
    """``nifti/heudiconv_axasc35.nii.gz``: a small MR volume."""

    shape: tuple[int, int, int]
    orientation: str

    @property
    def n_slices(self) -> int:
        return self.shape[2]


@dataclass(frozen=True)
class DevExpect:
    """Exact properties of the ``dev_data`` files that the stand-ins do not share."""

    source: str           # "dev" (../shared/data/dev) or "stand-in" (built from pip packages)
    ct_head: CTHead
    mr_small: MRSmall


#: The files of ../shared/data/dev as they are (dev/manifest.json).
DEV_EXPECT = DevExpect(
    "dev",
    CTHead((256, 256, 108), (0.957031, 0.957031, 1.5), (-1024.0, 2986.0), "LAS", "LAI",
           "1.2.826.0.1.3680043.8.498.1002", "CT head sample series", "0.957 x 0.957 x 1.5 mm"),
    MRSmall((64, 64, 35), "PLS"),
)

#: Files of ../shared/data/dev that are byte-identical copies of files in installed pip packages
#: (dev/manifest.json: ``source.package``, ``source.path_in_package``).
PIP_COPIES = {
    **{f"dicom/pydicom/{n}.dcm": ("pydicom", f"pydicom/data/test_files/{n}.dcm")
       for n in ("CT_small", "MR_small", "MR_small_RLE", "MR_small_jp2klossless",
                 "MR_small_jpeg_ls_lossless", "J2K_pixelrep_mismatch")},
    **{f"dicom/pydicom-data/{n}.dcm": ("pydicom-data", f"data_store/data/{n}.dcm")
       for n in ("693_UNCR", "MR2_UNCR", "MR-SIEMENS-DICOM-WithOverlays", "bad_sequence",
                 "eCT_Supplemental", "emri_small", "emri_small_RLE", "explicit_VR-UN")},
    "nifti/nibabel_example4d.nii.gz": ("nibabel", "nibabel/tests/data/example4d.nii.gz"),
}
#: Stand-in for the InVesalius CT head (Debian, 256x256x108): the four distinct real 512x512 CT
#: slices of four patients that pip packages hold, inferior to superior (k = 0..3), HU clipped to
#: -1024..3071, every second pixel kept (256x256, as the dev head). pip packages carry no real CT
#: volume, so this is a stack of slices with one synthetic geometry (twice the pixel spacing of the
#: head slice, 0.957 mm as the dev head, slices 5 mm apart), not an anatomical volume.
STANDIN_CT_SLICES = (
    ("pydicom-data", "data_store/data/explicit_VR-UN.dcm"),           # abdomen (pancreas case 0001)
    ("pydicom-data", "data_store/data/bad_sequence.dcm"),             # neck
    ("pydicom", "pydicom/data/test_files/J2K_pixelrep_mismatch.dcm"),  # head, skull base
    ("pydicom-data", "data_store/data/693_UNCR.dcm"),                 # head (CQ500 case 310)
)
STANDIN_CT_SPACING = (0.957032, 0.957032, 5.0)
#: Stand-in for heudiconv's small MR volume (64x64x35): the 10 frames of 64x64 of pydicom-data's
#: enhanced MR head file as a uint16 NIfTI. The file has no pixel spacing or positions: 1 mm pixels
#: (as medvae assumes), SpacingBetweenSlices (1.2 mm) apart, LPS.
STANDIN_MR = ("pydicom-data", "data_store/data/emri_small.dcm")
#: Not built (no test reads them): heudiconv's b0 DWI volumes and the Siemens mosaic DICOM files.
NOT_BUILT = ("nifti/heudiconv_b0dwi_1.nii.gz", "nifti/heudiconv_b0dwi_2.nii.gz",
             "nifti/heudiconv_b0dwi_3.nii.gz", "dicom/heudiconv/")


def _package_file(package: str, inner: str) -> Path:
    from importlib import metadata

    path = Path(str(metadata.distribution(package).locate_file(inner)))
    if not path.is_file():
        missing_data(f"{inner} not found in the installed {package} package")
    return path


def _uid(*parts: str) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["medvae-tests-dev-standin", *parts]))


def _standin_ct_nifti(path: Path) -> np.ndarray:
    """Write the CT stand-in as an int16 LAS NIfTI (sform code 2, as the InVesalius file)."""
    import warnings

    import nibabel as nib
    import pydicom
    from pydicom.pixels import apply_rescale, pixel_array

    slices = []
    for package, inner in STANDIN_CT_SLICES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ds = pydicom.dcmread(_package_file(package, inner))
            hu = np.asarray(apply_rescale(pixel_array(ds), ds), dtype=np.float64)
        if float(ds.ImageOrientationPatient[4]) < 0:  # rows run anterior: turn to posterior
            hu = hu[::-1]
        # pixel [row, col]: col to the patient's left, row to posterior -> i: L, j: A
        slices.append(np.clip(np.rint(hu), -1024, 3071).astype(np.int16)[::-2, ::2].T)
    vol = np.stack(slices, axis=2)
    sx, sy, sz = STANDIN_CT_SPACING
    affine = np.array([[-sx, 0, 0, sx * (vol.shape[0] - 1) / 2], [0, sy, 0, -sy * (vol.shape[1] - 1) / 2],
                       [0, 0, sz, 0], [0, 0, 0, 1]])
    img = nib.Nifti1Image(vol, affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=0)
    nib.save(img, str(path))
    return vol


def _standin_ct_series(volume: Path, folder: Path, description: str) -> str:
    """Write ``volume`` as a DICOM series with SimpleITK, as dev/dicom/series_ct_head was written
    (../shared/data/make_dicom_series.py): placeholder identifiers, pixels and geometry of the volume."""
    import locale

    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series_with_simpleitk(volume, folder, description)
    finally:  # GDCM's writer leaves the process in the "C" locale: text=True subprocesses then decode ASCII
        locale.setlocale(locale.LC_ALL, saved)


def _write_series_with_simpleitk(volume: Path, folder: Path, description: str) -> str:
    import SimpleITK as sitk

    img = sitk.Cast(sitk.ReadImage(str(volume)), sitk.sitkInt16)
    folder.mkdir(parents=True)
    series_uid = _uid("series")
    d = img.GetDirection()
    common = {
        "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL",
        "0010|0010": "STANDIN^PATIENT", "0010|0020": "STANDIN-0001",
        "0020|000d": _uid("study"), "0020|000e": series_uid, "0020|0052": _uid("frame-of-reference"),
        "0020|0011": "1", "0008|103e": description,
        "0020|0037": "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0018|0050": f"{img.GetSpacing()[2]:.6f}", "0008|0020": "19700101",
        "0028|1052": "0", "0028|1053": "1",  # stored values are HU already
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(img.GetDepth()):
        s = img[:, :, z]
        for key, value in common.items():
            s.SetMetaData(key, value)
        pos = img.TransformIndexToPhysicalPoint((0, 0, z))
        s.SetMetaData("0020|0032", "\\".join(f"{p:.6f}" for p in pos))
        s.SetMetaData("0020|0013", str(z + 1))
        s.SetMetaData("0008|0018", _uid("instance", str(z)))
        writer.SetFileName(str(folder / f"slice_{z + 1:04d}.dcm"))
        writer.Execute(s)
    return series_uid


def _standin_mr_nifti(path: Path) -> np.ndarray:
    import nibabel as nib
    import pydicom

    ds = pydicom.dcmread(_package_file(*STANDIN_MR))
    vol = ds.pixel_array.transpose(2, 1, 0).astype(np.uint16)  # (frame, row, col) -> (col, row, frame)
    affine = np.diag([-1.0, -1.0, float(ds.SpacingBetweenSlices), 1.0])  # LPS
    img = nib.Nifti1Image(vol, affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=0)
    nib.save(img, str(path))
    return vol


def build_dev_standin(root: Path) -> DevExpect:
    """Build a tree with the relative paths of ../shared/data/dev from pip packages only.

    Returns the exact properties of the stand-in files (the copies are identical to dev's)."""
    import nibabel as nib

    for rel, (package, inner) in PIP_COPIES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_package_file(package, inner), root / rel)
    ct_path = root / "nifti/invesalius_cranium_ct.nii.gz"
    vol = _standin_ct_nifti(ct_path)
    description = "CT stand-in series (pip packages)"
    series_uid = _standin_ct_series(ct_path, root / "dicom/series_ct_head", description)
    mr_path = root / "nifti/heudiconv_axasc35.nii.gz"
    mr = _standin_mr_nifti(mr_path)
    sx, sy, sz = STANDIN_CT_SPACING
    return DevExpect(
        "stand-in",
        CTHead(vol.shape, STANDIN_CT_SPACING, (float(vol.min()), float(vol.max())),
               "".join(nib.aff2axcodes(nib.load(str(ct_path)).affine)), "LAI", series_uid,
               description, f"{sx:.4g} x {sy:.4g} x {sz:.4g} mm"),
        MRSmall(mr.shape, "".join(nib.aff2axcodes(nib.load(str(mr_path)).affine))),
    )


@pytest.fixture(scope="session")
def _dev_set(tmp_path_factory) -> tuple[Path, DevExpect]:
    if DEV_DATA.is_dir():
        return DEV_DATA, DEV_EXPECT
    root = tmp_path_factory.mktemp("dev_standin") / "dev"
    return root, build_dev_standin(root)


@pytest.fixture(scope="session")
def dev_data(_dev_set) -> Path:
    """``Path`` of the development data set (``../shared/data/dev``), or of its stand-in tree."""
    return _dev_set[0]


@pytest.fixture(scope="session")
def dev_expect(_dev_set) -> DevExpect:
    """The exact properties of the files of ``dev_data`` that its stand-ins do not share."""
    return _dev_set[1]


@pytest.fixture(scope="session")
def dev_ct_head(dev_data, dev_expect) -> Path:
    """The dev head CT NIfTI, for tests built on contiguous brain slices (a 6- or 8-slice slab).

    The stand-in has no such slab (pip packages hold two unrelated head CT slices), so without
    ../shared these tests skip, naming the file (or fail when ``CI`` is set)."""
    path = dev_data / "nifti/invesalius_cranium_ct.nii.gz"
    if dev_expect.source != "dev":
        missing_data(f"needs contiguous brain slices of a real head CT, {DEV_DATA}/nifti/"
                     "invesalius_cranium_ct.nii.gz: pip packages hold no such volume")
    return path


def pytest_report_header(config) -> str:
    if DEV_DATA.is_dir():
        return f"real scans: {DEV_DATA}"
    return f"real scans: stand-ins from pip packages ({DEV_DATA} not found; see tests/conftest.py)"


@pytest.fixture(scope="session")
def sample_paths(tmp_path_factory) -> dict[str, Path]:
    """The sample set of ``medvae samples`` (built once per session, from pip packages only)."""
    from medvae.io.samples import build_samples

    return build_samples(tmp_path_factory.mktemp("samples") / "samples")


@dataclass(frozen=True)
class RealScans:
    """Real scans for tests, from the development data or, without it, the pip-built samples."""

    source: str       # "dev" or "samples"
    ct: Path          # a CT volume in HU (dev: head CT NIfTI 256x256; samples: DICOM series 512x512x4)
    ct_slice: int     # a head slice of ``ct`` (axis 2)
    mr: Path          # an MR volume (dev: b0 DWI 152x150x81; samples: EPI 128x96x24)
    mr_small: Path    # a small MR NIfTI volume (dev: 64x64x35; samples: the same EPI)


@pytest.fixture(scope="session")
def real_scans(request) -> RealScans:
    nifti = DEV_DATA / "nifti"
    ct, mr, small = (nifti / n for n in ("invesalius_cranium_ct.nii.gz", "heudiconv_b0dwi_1.nii.gz",
                                         "heudiconv_axasc35.nii.gz"))
    if all(p.is_file() for p in (ct, mr, small)):
        import nibabel as nib

        return RealScans("dev", ct, nib.load(str(ct)).shape[2] // 2, mr, small)
    samples = request.getfixturevalue("sample_paths")
    return RealScans("samples", samples["ct_series"], 0, samples["mr"], samples["mr"])


@pytest.fixture(scope="session")
def ct_slice_hu(real_scans) -> np.ndarray:
    """A real axial head-CT slice in HU, ``(1, 256, 256)`` float32 (a 512² sample slice is halved)."""
    from medvae.io import load_scan

    vol = load_scan(real_scans.ct).array
    sl = np.asarray(vol[:, :, real_scans.ct_slice], dtype=np.float32)
    if sl.shape[0] >= 512:
        sl = sl[::2, ::2]
    return sl[None].copy()


@pytest.fixture(scope="session")
def mr_volume(real_scans) -> np.ndarray:
    """The real MR volume normalized by its 0.5-99.5 percentiles, ``(1, X, Y, Z)`` float32."""
    from medvae.intensity import IntensityPolicy, normalize
    from medvae.io import load_scan

    vol = np.asarray(load_scan(real_scans.mr).array, dtype=np.float32)
    return normalize(vol, IntensityPolicy().window_for(vol, "MR"))[None]


@pytest.fixture
def copy_into(tmp_path):
    """``copy_into(src, name=None) -> Path``: copy a file or folder into ``tmp_path``."""

    def _copy(src: str | Path, name: str | None = None) -> Path:
        src = Path(src)
        dst = tmp_path / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
        return dst

    return _copy


def corner_world_points(shape, affine) -> np.ndarray:
    """World coordinates (N, 3) of the 8 corner voxels of an image, sorted lexicographically."""
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1)
                    for k in (0, shape[2] - 1)])
    pts = (np.asarray(affine) @ idx.T).T[:, :3]
    return pts[np.lexsort(pts.T[::-1])]


def _same_image(a, a_affine, b, b_affine, *, atol_mm: float = 1e-3, atol_value: float = 0.0,
                n_points: int = 4000, seed: int = 0) -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape or sorted(a.shape) == sorted(b.shape), (a.shape, b.shape)
    np.testing.assert_allclose(corner_world_points(a.shape, a_affine),
                               corner_world_points(b.shape, b_affine), atol=atol_mm)
    rng = np.random.default_rng(seed)
    idx_b = np.stack([rng.integers(0, s, n_points) for s in b.shape], axis=1)
    corners = np.array([[i, j, k] for i in (0, b.shape[0] - 1) for j in (0, b.shape[1] - 1)
                        for k in (0, b.shape[2] - 1)])
    idx_b = np.concatenate([corners, idx_b])
    world = (np.asarray(b_affine) @ np.c_[idx_b, np.ones(len(idx_b))].T)
    idx_a_f = (np.linalg.inv(np.asarray(a_affine)) @ world).T[:, :3]
    idx_a = np.rint(idx_a_f).astype(int)
    np.testing.assert_allclose(idx_a_f, idx_a, atol=1e-3)  # voxel centres coincide
    va = a[tuple(idx_a.T)]
    vb = b[tuple(idx_b.T)]
    np.testing.assert_allclose(va, vb, atol=atol_value, rtol=0)


@pytest.fixture(scope="session")
def assert_same_image():
    """``assert_same_image(a, a_affine, b, b_affine, atol_mm=1e-3, atol_value=0)``.

    Asserts the two images cover the same corner world points and hold the same values at
    matching world positions (all corners plus random voxels), whatever their axis order.
    """
    return _same_image
