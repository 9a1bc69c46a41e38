"""Restoring a DICOM series file by file, and the restore command's MONAI-free reading path.

A streamed restore (read a batch of files, restore it, write those files) gives the files of a
whole-volume restore bit for bit; the readers ``medvae restore`` uses (pydicom and nibabel alone)
give what ``load_scan`` (MONAI's ``LoadImage``) gives on every dev file; and the command imports
neither MONAI nor MLflow, matplotlib or pandas.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

import medvae.restore
from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.io import load_scan, save_scan
from medvae.io.atomic import OUTPUT_MARKER
from medvae.io.derived_series import DerivedSeriesWriter
from medvae.io.dicom import DicomSeries, open_series
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
from medvae.models.vae import MaskedVAE, VAEConfig
from medvae.restore import restore_scan, restore_volume

SERIES = "dicom/series_ct_head"  # dev: 108 CT slices of 256²; stand-in: 4 of 512²
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns",
            "RescaleSlope", "RescaleIntercept", "StudyInstanceUID", "FrameOfReferenceUID")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.05)  # an output that depends on the input
    return atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path_factory.mktemp("m") / "tiny.pt")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("IM*.dcm"))


def _series_part(dev_data: Path, tmp_path: Path, n: int = 12) -> Path:
    """The first ``n`` files of the dev CT series (all of the 4-slice stand-in): one series, faster (24
    slices made the streaming tests a minute of the suite)."""
    part = tmp_path / "series"
    part.mkdir()
    for f in sorted((dev_data / SERIES).glob("*.dcm"))[:n]:
        (part / f.name).write_bytes(f.read_bytes())
    return part


def _as_rician_mr(folder: Path) -> None:
    """Rewrite a CT series in place as MR magnitude data under Rician noise: all values above 0 and no
    constant fill, so the low end of its window is the Rician floor (IntensityPolicy.window_for)."""
    rng = np.random.default_rng(0)
    for f in _files(folder) or sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        signal = ds.pixel_array.astype(np.float64) - float(ds.pixel_array.min()) + 300.0
        noisy = np.hypot(signal + rng.normal(0, 150, signal.shape), rng.normal(0, 150, signal.shape))
        ds.PixelData = np.round(noisy).clip(0, 32767).astype(ds.pixel_array.dtype).tobytes()
        ds.RescaleIntercept, ds.RescaleSlope, ds.Modality = 0, 1, "MR"
        ds.save_as(f)


# CT: the fixed window; MR: a first pass; "slices": a mask holding whole slices (a batch wholly inside
# the mask is still restored as inpainting: restore_volume(holes=) carries the whole scan's regime);
# "rician": MR whose low end is the Rician floor (the series took the plain percentile, 2026-12-07)
@pytest.mark.parametrize("modality, masked", [(None, False), ("MR", True), (None, "slices"), ("MR", "rician")])
def test_streamed_series_equals_the_whole_volume_restore_bit_for_bit(dev_data, tmp_path, tiny_model, monkeypatch,
                                                                      modality, masked):
    src = _series_part(dev_data, tmp_path)
    if masked == "rician":
        _as_rician_mr(src)
        masked = False
    scan = load_scan(src)  # MONAI's LoadImage: the reference path reads through it
    if modality == "MR" and not masked:  # the case is one where the Rician floor moves the low end
        assert IntensityPolicy().window_for(scan.array, "MR", noisy=True) != IntensityPolicy().window_for(scan.array, "MR")
    nx, ny, nz = scan.array.shape
    mask = None
    if masked:  # a box over some slices, as a NIfTI in the series' geometry
        mask = np.zeros(scan.array.shape, bool)
        mask[nx // 4:nx // 2, ny // 3:ny // 2, nz // 4:max(nz // 4 + 1, nz // 2)] = True
        if masked == "slices":  # a batch wholly inside the mask would be taken for global noise
            mask[:, :, :2] = True
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), scan.affine), tmp_path / "mask.nii.gz")
    mean, _ = restore_volume(scan.array, model=tiny_model, modality=modality or scan.modality, mask=mask,
                             batch_size=2)
    save_scan(scan, mean, tmp_path / "whole")

    # batches of one forward pass each (2 slices): several batches even on the 4-slice stand-in
    monkeypatch.setattr(medvae.restore, "STREAM_PIXELS", 1)
    reads = []
    real_read = DicomSeries.read
    monkeypatch.setattr(DicomSeries, "read", lambda self, a=0, b=None, **kw: (reads.append((a, b)),
                                                                               real_read(self, a, b, **kw))[1])
    s = restore_scan(src, tmp_path / "streamed", model=tiny_model, modality=modality, batch_size=2,
                     mask_path=tmp_path / "mask.nii.gz" if masked else None)
    assert s.slices == nz and s.modality == (modality or scan.modality)
    assert len(reads) >= 2 and max(b - a for a, b in reads) < max(nz, 3)  # never the whole series at once
    whole, streamed = _files(tmp_path / "whole"), _files(tmp_path / "streamed")
    assert len(whole) == len(streamed) == nz
    for a, b in zip(map(pydicom.dcmread, whole), map(pydicom.dcmread, streamed)):
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
        for tag in GEOMETRY:
            assert a.get(tag) == b.get(tag), tag
        assert a.SOPInstanceUID != b.SOPInstanceUID
    again = load_scan(tmp_path / "streamed")
    np.testing.assert_array_equal(again.array, load_scan(tmp_path / "whole").array)
    np.testing.assert_array_equal(again.affine, scan.affine)
    assert again.series_uid not in (scan.series_uid, load_scan(tmp_path / "whole").series_uid)
    if masked:  # known pixels as they were, in HU
        np.testing.assert_array_equal(again.array[~mask], scan.array[~mask])


def test_missing_slices_at_the_series_edges_fill_as_in_the_whole_volume(dev_data, tmp_path, tiny_model, monkeypatch):
    """A gap at the first or last slices was filled from the streamed batch's own slices: the same values
    (held from the nearest known slice) but another uncertainty, up to 8462 HU off the whole volume's
    (first 12 dev slices, slices 0, 10 and 11 missing, batches of 2 slices)."""
    from medvae.io.dicom import slice_positions

    src = _series_part(dev_data, tmp_path, n=12)
    scan = load_scan(src)
    nz = scan.array.shape[2]
    edges = [0, nz - 2, nz - 1] if nz >= 8 else [0, nz - 1]  # the 4-slice stand-in: one at each end
    mask = np.zeros(scan.array.shape, bool)
    mask[:, :, edges] = True
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), scan.affine), tmp_path / "mask.nii.gz")
    mean, std = restore_volume(scan.array, model=tiny_model, modality=scan.modality, mask=mask, samples=2,
                               batch_size=2, slice_positions=slice_positions(scan.datasets))
    save_scan(scan, mean, tmp_path / "whole")

    monkeypatch.setattr(medvae.restore, "STREAM_PIXELS", 1)  # batches of one forward pass (2 slices)
    restore_scan(src, tmp_path / "streamed", model=tiny_model, mask_path=tmp_path / "mask.nii.gz", samples=2,
                 uncertainty_path=tmp_path / "u", batch_size=2)
    for a, b in zip(map(pydicom.dcmread, _files(tmp_path / "whole")), map(pydicom.dcmread, _files(tmp_path / "streamed"))):
        np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    # the filled slices' std is computed from the restored slices: the same, to the map's quantization
    # (the known slices' std are other posterior draws per batch, by design)
    unc = load_scan(tmp_path / "u")
    slope = float(pydicom.dcmread(_files(tmp_path / "u")[0]).RescaleSlope)
    filled = std[:, :, edges].astype(np.float32)
    assert filled.min() >= 0 and filled.mean() > 10 * slope
    np.testing.assert_allclose(unc.array[:, :, edges], filled, rtol=0, atol=slope)


def test_streamed_uncertainty_map_is_a_whole_fitted_series(dev_data, tmp_path, tiny_model, monkeypatch):
    src = _series_part(dev_data, tmp_path)
    monkeypatch.setattr(medvae.restore, "STREAM_PIXELS", 1)
    s = restore_scan(src, tmp_path / "r", model=tiny_model, samples=2, uncertainty_path=tmp_path / "u")
    assert s.uncertainty == tmp_path / "u"
    scan, unc = load_scan(src), load_scan(tmp_path / "u")
    assert unc.array.shape == scan.array.shape and np.array_equal(unc.affine, scan.affine)
    assert unc.array.max() > 0 and unc.array.min() >= -unc.array.max() / 32767  # 0 within one quantization step
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in _files(tmp_path / "u")]
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({(d.RescaleSlope, d.RescaleIntercept) for d in dss}) == 1
    assert dss[0].StudyInstanceUID == pydicom.dcmread(next(src.glob("*.dcm"))).StudyInstanceUID
    # one rescale fitted to the whole map: the largest std uses the top of the int16 range
    stored = max(int(pydicom.dcmread(f).pixel_array.max()) for f in _files(tmp_path / "u"))
    assert stored >= 32000


def test_a_failure_mid_series_leaves_no_output(dev_data, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(medvae.restore, "STREAM_PIXELS", 1)
    real_write, written = DerivedSeriesWriter.write, []

    def failing(self, *a, **k):
        if len(written) == 3:
            raise OSError("disk full")
        written.append(real_write(self, *a, **k))
        return written[-1]

    monkeypatch.setattr(DerivedSeriesWriter, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        restore_scan(dev_data / SERIES, tmp_path / "out", model=tiny_model, batch_size=1)
    assert len(written) == 3 and not any(p.exists() for p in written)  # the staged files went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_window_of_slabs_equals_the_window_of_the_volume():
    rng = np.random.default_rng(0)
    policy = IntensityPolicy()
    for shape in [(40, 30, 20), (256, 256, 70), (300, 301, 53), (1500, 1400, 2)]:  # whole, then subsampled
        vol = rng.gamma(2.0, 100.0, shape).astype(np.float32)
        sample = medvae.restore._window_sample(lambda a, b: vol[:, :, a:b], shape, 7)
        assert policy.window_for(sample, "MR") == policy.window_for(vol, "MR")


def test_the_window_sample_of_a_large_volume_reads_every_slice():
    # a stride of 2 on (1500, 1400, 2) once read slice 0 alone: a window of 0.5..99.5 for 0.9..990
    vol = np.empty((1500, 1400, 2), np.float32)
    vol[:, :, 0] = np.linspace(0, 1, 1400, dtype=np.float32)
    vol[:, :, 1] = np.linspace(0, 1000, 1400, dtype=np.float32)
    lo, hi = IntensityPolicy().window_for(vol, "MR")
    exact = np.percentile(vol, (0.5, 99.5))
    assert abs(hi - exact[1]) < 0.01 * exact[1] and hi > 900
    assert IntensityPolicy().window_for(vol, "MR", exact=True) == tuple(float(v) for v in exact)


def _restorable_dev_files(dev: Path) -> list[Path]:
    nifti = sorted((dev / "nifti").glob("*.nii*"))
    dicom = [dev / SERIES] + sorted(p for p in (dev / "dicom").rglob("*.dcm") if SERIES not in p.as_posix())
    return nifti + dicom


def test_native_readers_give_what_load_scan_gives_on_every_dev_file(dev_data):
    compared = 0
    for path in _restorable_dev_files(dev_data):
        try:
            a = load_scan(path)
        except MedvaeError as exc:  # not restorable: the same refusal
            with pytest.raises(MedvaeError) as native:
                load_scan(path, reader="native")
            assert str(native.value) == str(exc), path
            continue
        b = load_scan(path, reader="native")
        assert a.array.dtype == b.array.dtype == np.float32, path
        np.testing.assert_array_equal(a.array, b.array, err_msg=str(path))
        np.testing.assert_array_equal(a.affine, b.affine, err_msg=str(path))
        assert (a.modality, a.modality_guess, a.format, a.series_uid, a.description, a.files) == \
               (b.modality, b.modality_guess, b.format, b.series_uid, b.description, b.files), path
        if a.format == "dicom":  # the datasets carry the rescale the writer re-applies
            with warnings.catch_warnings():  # pydicom's VR validation of odd values while comparing
                warnings.simplefilter("ignore", UserWarning)
                assert a.datasets == b.datasets, path
            opened = open_series(path)  # the streaming path: headers now, pixels in two halves
            assert opened.shape == a.array.shape and np.array_equal(opened.affine, a.affine), path
            half = len(opened.files) // 2
            parts = [opened.read(0, half)[0], opened.read(half)[0]]
            np.testing.assert_array_equal(np.concatenate(parts, axis=2), a.array, err_msg=str(path))
        compared += 1
    assert compared >= 8


HEAVY = ("monai", "mlflow", "matplotlib", "pandas", "scipy.stats")


def test_restore_command_imports_neither_monai_nor_mlflow(dev_data, tmp_path):
    """The default model restores a NIfTI volume and a DICOM series (with its uncertainty map) in one
    process that never imports MONAI, MLflow, matplotlib, pandas or scipy.stats (seconds of start-up each)."""
    img = nib.load(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    nib.save(img.slicer[:, :, :4], tmp_path / "mr4.nii.gz")
    series = tmp_path / "series4"
    series.mkdir()
    for f in sorted((dev_data / SERIES).glob("*.dcm"))[:4]:
        (series / f.name).write_bytes(f.read_bytes())
    code = (
        "import json, sys\n"
        "from medvae.cli import main\n"
        f"rc = [main(['restore', {str(tmp_path / 'mr4.nii.gz')!r}, {str(tmp_path / 'r.nii.gz')!r}]),\n"
        f"      main(['restore', {str(series)!r}, {str(tmp_path / 'r_series')!r}, '--samples', '2'])]\n"
        f"print(json.dumps({{'rc': rc, 'heavy': sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r})}}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["rc"] == [0, 0], proc.stderr
    assert res["heavy"] == [], res["heavy"]
    assert nib.load(tmp_path / "r.nii.gz").shape == (*img.shape[:2], 4)
    assert len(_files(tmp_path / "r_series")) == 4 and (tmp_path / "r_series" / OUTPUT_MARKER).is_file()
    assert len(_files(tmp_path / "r_series_uncertainty")) == 4  # the streamed map, with --samples
