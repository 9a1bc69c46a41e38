"""Shared test fixtures.

Real scans: ``../shared/data/dev`` beside the repository when it is there (``MEDVAE_DEV_DATA``
names another folder; ``MEDVAE_DEV_DATA=/nonexistent`` simulates a machine without it), else the
sample set that :func:`medvae.io.samples.build_samples` builds from pip packages, where a sample can
stand in. A test that needs a data set that is missing skips, or fails loudly when the environment
variable ``CI`` is set (:func:`missing_data`).

``dev_data``: the development scans (no stand-in). ``sample_paths``: the pip-built sample set
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


@pytest.fixture(scope="session")
def dev_data() -> Path:
    """``Path`` of the development data set (``../shared/data/dev``); skips the test if missing."""
    if not DEV_DATA.is_dir():
        missing_data(f"development data not found at {DEV_DATA}")
    return DEV_DATA


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
