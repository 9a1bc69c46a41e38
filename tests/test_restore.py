"""medvae restore on real scans: formats, geometry, UIDs, masks, uncertainty, and bad input."""
from __future__ import annotations

import os

import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch

from medvae.cli import main
from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
from medvae.models.vae import MaskedVAE, VAEConfig
from medvae.io import load_scan
from medvae.restore import restore_scan, restore_volume


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small untrained model whose output depends on its input, mask and latent."""
    torch.manual_seed(0)
    model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.05)
    return atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path_factory.mktemp("m") / "tiny.pt")


def _run(capsys, *argv):
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_restore_dicom_series_gives_a_new_series_in_the_same_study(dev_data, dev_expect, tmp_path, tiny_model,
                                                                  capsys):
    n = dev_expect.ct_head.n_slices  # dev: 108
    src = dev_data / "dicom" / "series_ct_head"
    out = tmp_path / "restored"
    code, stdout, _ = _run(capsys, "restore", src, out, "--model", tiny_model, "--batch-size", 16)
    assert code == 0 and f"restored {n} slices" in stdout and str(out) in stdout
    reader = sitk.ImageSeriesReader()
    a = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(src)))
    b = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(out)))
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetSpacing(), b.GetSpacing())
    assert np.allclose(a.GetDirection(), b.GetDirection())
    s0 = pydicom.dcmread(next(src.iterdir()), stop_before_pixels=True)
    outs = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(out.glob("*.dcm"))]
    assert len(outs) == n
    assert {d.SeriesInstanceUID for d in outs} != {s0.SeriesInstanceUID}
    assert len({d.SeriesInstanceUID for d in outs}) == 1
    assert {d.StudyInstanceUID for d in outs} == {s0.StudyInstanceUID}
    # CT stays in HU: the restored values are plausible tissue/air values, not [0, 1]
    arr = sitk.GetArrayFromImage(b)
    assert arr.min() < -500 and arr.max() > 500


def test_nifti_in_nifti_out_with_identical_affine(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    out = tmp_path / "restored.nii.gz"
    code, _, _ = _run(capsys, "restore", src, out, "--model", tiny_model)
    assert code == 0
    a, b = nib.load(src), nib.load(out)
    assert np.array_equal(a.affine, b.affine) and a.shape == b.shape
    assert not np.array_equal(np.asarray(a.dataobj, dtype=np.float32), b.get_fdata(dtype=np.float32))


def test_volume_of_a_4d_nifti_restores_as_that_3d_volume(tmp_path, tiny_model, capsys):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (24, 20, 3, 4)).astype(np.float32) + np.arange(4) * 50
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    img4 = nib.Nifti1Image(data, affine)
    img4.header.set_xyzt_units("mm", "sec")
    img4.header["pixdim"][4], img4.header["toffset"] = 2.5, 1.5
    img4.to_filename(tmp_path / "dwi.nii.gz")
    nib.Nifti1Image(data[..., 2], affine).to_filename(tmp_path / "vol2.nii.gz")
    flags = ["--model", tiny_model, "--modality", "MR", "--no-blend"]
    assert _run(capsys, "restore", tmp_path / "dwi.nii.gz", tmp_path / "a.nii.gz", "--volume", 2, *flags)[0] == 0
    assert _run(capsys, "restore", tmp_path / "vol2.nii.gz", tmp_path / "b.nii.gz", *flags)[0] == 0
    a, b = nib.load(tmp_path / "a.nii.gz"), nib.load(tmp_path / "b.nii.gz")
    assert a.shape == (24, 20, 3) and np.array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.get_fdata(), b.get_fdata())
    # volume 2 starts two repetitions after the file's toffset (it kept volume 0's start time)
    assert float(a.header["pixdim"][4]) == 2.5 and float(a.header["toffset"]) == 1.5 + 2 * 2.5
    code, _, err = _run(capsys, "restore", tmp_path / "dwi.nii.gz", tmp_path / "c.nii.gz", "--volume", 4, *flags)
    assert code == 2 and "dwi.nii.gz" in err and "volume 4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.nii.gz").exists()


def test_a_4d_mask_gives_the_restored_volumes_mask_and_other_4d_masks_are_refused(tmp_path, tiny_model, capsys):
    # the mask's volume 0 was used whatever --volume was restored, with a warning pointing at --volume
    rng = np.random.default_rng(0)
    data = rng.normal(100, 20, (24, 20, 3, 2)).astype(np.float32)
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    nib.Nifti1Image(data, affine).to_filename(tmp_path / "two.nii.gz")
    mask = np.zeros(data.shape, np.uint8)
    mask[2:8, 2:8, :, 0] = 1
    mask[12:20, 10:16, :, 1] = 1
    nib.Nifti1Image(mask, affine).to_filename(tmp_path / "mask4d.nii.gz")
    flags = ["--model", tiny_model, "--modality", "MR", "--no-blend", "--mask", tmp_path / "mask4d.nii.gz"]
    assert _run(capsys, "restore", tmp_path / "two.nii.gz", tmp_path / "r1.nii.gz", "--volume", 1, *flags)[0] == 0
    changed = nib.load(tmp_path / "r1.nii.gz").get_fdata() != data[..., 1]
    assert changed.any() and not changed[mask[..., 1] == 0].any()
    nib.Nifti1Image(data[..., 0], affine).to_filename(tmp_path / "one.nii.gz")
    code, _, err = _run(capsys, "restore", tmp_path / "one.nii.gz", tmp_path / "r2.nii.gz", *flags)
    assert code == 2 and "mask4d.nii.gz" in err and "4-D NIfTI with 2 volumes but the scan has 1" in err
    assert not (tmp_path / "r2.nii.gz").exists()


def test_a_mask_is_compared_with_its_scan_in_mm_whatever_the_header_units(tmp_path, tiny_model, capsys):
    # restore compared affines in the file's units: a metre header let a mask 0.9 mm off through, and a
    # micrometre scan refused an mm mask of the same geometry (evaluate compares in mm)
    data = np.random.default_rng(0).normal(100, 20, (24, 20, 3)).astype(np.float32)
    mm = np.diag([1.5, 1.5, 3.0, 1.0])

    def save(name, values, affine, unit):
        img = nib.Nifti1Image(values, affine)
        img.header.set_xyzt_units(unit)
        img.to_filename(tmp_path / name)
        return tmp_path / name

    box = np.zeros(data.shape, np.uint8)
    box[4:10, 4:10] = 1
    um = np.diag([1000, 1000, 1000, 1]) @ mm
    metres = np.diag([1e-3, 1e-3, 1e-3, 1]) @ mm
    flags = ["--model", tiny_model, "--modality", "MR", "--no-blend"]
    scan_um = save("scan_um.nii.gz", data, um, "micron")
    ok = _run(capsys, "restore", scan_um, tmp_path / "a.nii.gz", "--mask", save("m_mm.nii.gz", box, mm, "mm"), *flags)
    assert ok[0] == 0, ok[2]
    shifted = metres.copy()
    shifted[0, 3] += 0.9e-3  # 0.9 mm
    code, _, err = _run(capsys, "restore", save("scan_m.nii.gz", data, metres, "meter"), tmp_path / "b.nii.gz",
                        "--mask", save("m_shift.nii.gz", box, shifted, "meter"), *flags)
    assert code == 2 and "m_shift.nii.gz: mask geometry (affine) differs from the scan's" in err
    assert not (tmp_path / "b.nii.gz").exists()


def test_an_uncertainty_map_inside_the_restored_series_folder_is_refused(dev_data, tmp_path, tiny_model, capsys):
    # it was written there: the folder held two series, which info and restore then refused to read
    src = dev_data / "dicom/pydicom/CT_small.dcm"
    code, _, err = _run(capsys, "restore", src, tmp_path / "r", "--uncertainty", tmp_path / "r" / "unc",
                        "--model", tiny_model)
    assert code == 2 and "cannot be written inside the restored scan's folder" in err and not (tmp_path / "r").exists()


def test_a_write_error_names_the_output_being_written_never_a_staging_file(dev_data, tmp_path, tiny_model, capsys,
                                                                           monkeypatch):
    import medvae.io
    from medvae.restore import UNCERTAINTY_DESCRIPTION

    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    real = medvae.io.save_scan

    def full_for_the_map(scan, array, out, **k):  # the restoration was named for the map's full disk
        if k.get("description") == UNCERTAINTY_DESCRIPTION:
            raise OSError(28, "No space left on device")
        return real(scan, array, out, **k)

    monkeypatch.setattr(medvae.io, "save_scan", full_for_the_map)
    code, _, err = _run(capsys, "restore", src, tmp_path / "r.nii.gz", "--uncertainty", tmp_path / "u.nii.gz",
                        "--samples", 2, "--model", tiny_model)
    assert code == 2 and err.strip().splitlines()[-1] == f"medvae restore: error: {tmp_path / 'u.nii.gz'}: No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    def denied_in_staging(scan, array, out, **k):  # a folder made read-only mid-run named the staging file
        raise OSError(13, "Permission denied", f"/tmp/medvae-staging-abc123/{Path(out).name}")

    monkeypatch.setattr(medvae.io, "save_scan", denied_in_staging)
    code, _, err = _run(capsys, "restore", src, tmp_path / "r.nii.gz", "--model", tiny_model)
    assert code == 2 and err.strip().splitlines()[-1] == f"medvae restore: error: {tmp_path / 'r.nii.gz'}: Permission denied"


def test_an_upper_case_nifti_output_gets_its_uncertainty_map_beside_it(dev_data, tmp_path, tiny_model, capsys):
    # the map's name was OUT.NII.GZ_uncertainty, refused as "a NIfTI scan is written as NIfTI"
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    code, stdout, err = _run(capsys, "restore", src, tmp_path / "UP.NII.GZ", "--model", tiny_model, "--samples", 2)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UP.NII.GZ", "UP_uncertainty.NII.GZ"]
    assert nib.load(tmp_path / "UP_uncertainty.NII.GZ").shape == nib.load(src).shape


def _mask_file(src, path, box):
    img = nib.load(src)
    m = np.zeros(img.shape[:3], dtype=np.uint8)
    m[box] = 1
    nib.save(nib.Nifti1Image(m, img.affine, img.header), path)
    return m.astype(bool)


def test_mask_keeps_outside_pixels_bit_identical_and_uncertainty_is_positive_inside(
        dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    nz = nib.load(src).shape[2]  # dev: 35 slices, the box covers slices 10..19; stand-in (10): 2..4
    m = _mask_file(src, tmp_path / "mask.nii.gz", np.s_[20:40, 20:44, 10 * nz // 35:20 * nz // 35])
    out, unc = tmp_path / "r.nii.gz", tmp_path / "u.nii.gz"
    code, stdout, _ = _run(capsys, "restore", src, out, "--model", tiny_model, "--mask", tmp_path / "mask.nii.gz",
                           "--samples", 4, "--uncertainty", unc)
    assert code == 0 and str(unc) in stdout
    from medvae.io import load_scan

    a, b, u = load_scan(src), load_scan(out), load_scan(unc)
    assert np.array_equal(a.array[~m], b.array[~m])
    assert not np.array_equal(a.array[m], b.array[m])
    assert np.array_equal(u.affine, a.affine) and u.array.shape == a.array.shape
    assert (u.array[m] > 0).mean() > 0.99 and np.all(u.array[~m] == 0)


def test_restore_volume_api_keeps_input_and_returns_mean_and_std(tiny_model):
    vol = np.random.default_rng(0).normal(300, 50, (40, 36, 3)).astype(np.float32)
    before = vol.copy()
    mean, std = restore_volume(vol, model=tiny_model, modality="MR", samples=3)
    assert np.array_equal(vol, before)
    assert mean.shape == vol.shape and mean.dtype == np.float32 and std.shape == vol.shape
    assert np.all(std >= 0) and std.max() > 0
    mean2, none = restore_volume(vol, model=tiny_model, modality="MR")
    assert none is None and np.array_equal(mean, mean2)


class _FakeLibc:
    def __init__(self, calls):
        self.calls = calls

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc only")
def test_restore_volume_api_tunes_malloc_once_as_the_cli_does(dev_data, tiny_model, monkeypatch):
    """The API was ~4x slower than the CLI with glibc's defaults: its first call tunes malloc too."""
    import ctypes

    from medvae import runtime
    from medvae.io import load_scan

    calls: list = []
    monkeypatch.setattr(ctypes, "CDLL", lambda name: _FakeLibc(calls))
    monkeypatch.setattr(runtime, "_allocator_tuned", False)
    monkeypatch.delenv("MEDVAE_TUNE_MALLOC", raising=False)
    vol = load_scan(dev_data / "dicom" / "series_ct_head", reader="native").array[:, :, :2]
    restore_volume(vol, model=tiny_model, modality="CT", ensemble=1, blend=False)
    assert (-4, 0) in calls and (-1, 2**30) in calls  # M_MMAP_MAX 0, M_TRIM_THRESHOLD 1 GiB
    restore_volume(vol, model=tiny_model, modality="CT", ensemble=1, blend=False)
    assert len(calls) == 2  # idempotent: later calls do nothing


def test_corrupted_then_restored_dicom_names_the_model_by_label_never_by_path(dev_data, tmp_path, tiny_model,
                                                                             capsys, caplog):
    """A corrupt -> restore chain: the SeriesDescription's suffix is replaced whole (it was cut into
    "[medvae cor [medvae restored]"), and DerivationDescription names the medvae version and the model
    by its content (the file name can name a patient)."""
    import hashlib

    from medvae import __version__

    series = tmp_path / "DOE^JANE"
    series.mkdir()
    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    ds.SeriesDescription = "Head 1.0 H30s axial brain window iterative recon 3"  # 51 characters
    ds.save_as(series / "ct.dcm")
    model = tmp_path / "DOE^JANE_model.pt"
    model.write_bytes(open(tiny_model, "rb").read())
    label = f"sha256:{hashlib.sha256(model.read_bytes()).hexdigest()[:12]}"
    assert _run(capsys, "corrupt", series, tmp_path / "corrupted", "--recipe", "gaussian")[0] == 0
    code, _, err = _run(capsys, "restore", tmp_path / "corrupted", tmp_path / "restored", "--model", model,
                        "--samples", 2)  # single-frame files: the streamed path
    assert code == 0, err
    caplog.clear()
    code, _, err = _run(capsys, "restore", dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm",
                        tmp_path / "enhanced", "--model", model)  # multi-frame: read whole
    assert code == 0, err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == len(set(warnings)), warnings  # headers were read twice, each warning said twice
    # a CT of other units than HU is said to be (the CT window assumes HU): eCT_Supplemental is a blood-flow
    # map (RescaleType US, real-world values in ml/100ml/s); a plain CT's US is HU as CT has it
    assert "real-world values in ml/100ml/s, not HU" in caplog.text
    caplog.clear()
    assert _run(capsys, "restore", series, tmp_path / "plain_us", "--model", model)[0] == 0
    assert "not HU" not in caplog.text
    ds = pydicom.dcmread(series / "ct.dcm")
    ds.RescaleType = "MGML"
    ds.save_as(tmp_path / "iodine.dcm")
    assert _run(capsys, "restore", tmp_path / "iodine.dcm", tmp_path / "plain", "--model", model)[0] == 0
    assert "RescaleType MGML: values in MGML, not HU" in caplog.text and "--modality MR" in caplog.text
    caplog.clear()  # corrupt and evaluate say it too (their CT window is the same)
    assert _run(capsys, "corrupt", tmp_path / "iodine.dcm", tmp_path / "iodine_noisy", "--recipe", "gaussian")[0] == 0
    assert "values in MGML, not HU" in caplog.text and "the noise is scaled to that window" in caplog.text
    caplog.clear()  # holes add no noise: no word of it
    assert _run(capsys, "corrupt", tmp_path / "iodine.dcm", tmp_path / "iodine_boxes", "--recipe", "boxes")[0] == 0
    assert "values in MGML, not HU" in caplog.text and "noise" not in caplog.text
    caplog.clear()
    assert _run(capsys, "evaluate", tmp_path / "plain", tmp_path / "iodine.dcm", "--no-mlflow")[0] == 0
    assert "values in MGML, not HU" in caplog.text and "give --window or --data-range" in caplog.text
    for out, description in (("restored", "medvae restored"), ("restored_uncertainty", "medvae uncertainty (std)")):
        res = pydicom.dcmread(tmp_path / out / "IM0001.dcm", stop_before_pixels=True)
        assert res.SeriesDescription == f"Head 1.0 H30s axial brain [{description}]"  # cut by corrupt
        assert res.DerivationDescription.startswith(f"{description} (medvae {__version__}, model {label});")
        assert "DOE" not in res.DerivationDescription and "/" not in res.DerivationDescription
    enhanced = pydicom.dcmread(tmp_path / "enhanced" / "IM0001.dcm", stop_before_pixels=True)
    text = enhanced.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].DerivationDescription
    assert text.startswith(f"medvae restored (medvae {__version__}, model {label});") and "DOE" not in text


# -- bad input: one line, exit 2, nothing written -------------------------------------------------------

def test_a_fractional_mask_restores_every_nonzero_voxel_as_the_help_says(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    img = nib.load(src)
    frac = np.zeros(img.shape[:3], np.float32)
    frac[20:40, 20:44, :3] = 0.3  # a resampled or soft mask: nonzero means restore, as --help says
    nib.save(nib.Nifti1Image(frac, img.affine), tmp_path / "soft.nii.gz")
    out = tmp_path / "r.nii.gz"
    code, _, err = _run(capsys, "restore", src, out, "--model", tiny_model, "--mask", tmp_path / "soft.nii.gz")
    assert code == 0, err
    from medvae.io import load_scan

    a, b, m = load_scan(src).array, load_scan(out).array, frac != 0
    assert np.array_equal(a[~m], b[~m]) and not np.array_equal(a[m], b[m])  # once `> 0.5`: nothing restored


def test_a_mask_with_nan_is_refused_not_read_as_restore_everything(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    img = nib.load(src)
    m = np.full(img.shape[:3], np.nan, np.float32)  # NaN outside the support, as some resamplers write
    m[20:40, 20:44, :3] = 1
    nib.save(nib.Nifti1Image(m, img.affine), tmp_path / "nan.nii.gz")  # float32 on disk, NaN kept
    out = tmp_path / "r.nii.gz"
    code, _, err = _run(capsys, "restore", src, out, "--model", tiny_model, "--mask", tmp_path / "nan.nii.gz")
    assert code == 2 and err.count("\n") == 1, err
    assert "nan.nii.gz" in err and "NaN or infinite" in err and not out.exists()
    from medvae.errors import MedvaeError

    with pytest.raises(MedvaeError, match="NaN or infinite in the mask"):
        restore_volume(np.ones((16, 16, 2), np.float32), model=tiny_model, mask=np.full((16, 16, 2), np.nan))


def _assert_refused(capsys, argv, needle, *not_written):
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert err.count("\n") == 1 and needle in err, err
    for p in not_written:
        assert not p.exists(), p


def test_mask_of_another_shape_is_refused(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "m.nii.gz")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", src, out, "--model", tiny_model, "--mask", tmp_path / "m.nii.gz"],
                    "does not match the scan shape", out)


@pytest.mark.parametrize("threads", ["0", "-3", "100000"])
def test_a_thread_count_out_of_range_is_refused(dev_data, tmp_path, threads, capsys):
    # -3 was taken as 1, and 100000 ended in a segmentation fault
    out = tmp_path / "r.nii.gz"
    with pytest.raises(SystemExit) as exc:
        main(["restore", str(dev_data / "dicom/pydicom/CT_small.dcm"), str(out), "--threads", threads])
    assert exc.value.code == 2 and f"--threads: must be from 1 to 1024, got {threads}" in capsys.readouterr().err
    assert not out.exists()


def test_mask_of_another_geometry_is_refused(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    img = nib.load(src)
    nib.save(nib.Nifti1Image(np.ones(img.shape, np.uint8), img.affine * 2), tmp_path / "m.nii.gz")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", src, out, "--model", tiny_model, "--mask", tmp_path / "m.nii.gz"],
                    "geometry", out)


def test_model_for_other_channels_is_refused(dev_data, tmp_path, capsys):
    model = MaskedVAE(VAEConfig(in_channels=3, out_channels=3, channels=(4, 8), latent_channels=2))
    path = atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path / "rgb.pt")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", dev_data / "nifti" / "heudiconv_axasc35.nii.gz", out, "--model", path],
                    "the model maps 3-channel images to 3-channel ones", out)


def test_a_scan_of_slices_too_small_to_restore_is_named_in_the_error(tmp_path, tiny_model, capsys):
    nib.save(nib.Nifti1Image(np.ones((64, 1, 6), np.float32), np.eye(4)), tmp_path / "thin.nii.gz")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", tmp_path / "thin.nii.gz", out, "--model", tiny_model, "--modality", "MR"],
                    "thin.nii.gz: slices of 64x1 pixels (6 of them) cannot be restored", out)


def test_an_empty_model_name_is_refused_not_read_as_the_working_folder(dev_data, tmp_path, tiny_model, capsys,
                                                                        monkeypatch):
    # an unset "$MODEL": Path("") is ".", whose medvae.pt was loaded and named by no label
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(tiny_model, tmp_path / "medvae.pt")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", dev_data / "nifti" / "heudiconv_axasc35.nii.gz", out, "--model", ""],
                    "the model name is empty", out)


def test_a_file_named_like_a_label_is_named_by_its_content(tmp_path, monkeypatch):
    import hashlib

    from medvae.models.label import model_label

    assert model_label("sha256:000000000000") == "sha256:000000000000"  # no such file: a label
    monkeypatch.chdir(tmp_path)
    Path("sha256:000000000000").write_bytes(b"not the model it claims")
    want = "sha256:" + hashlib.sha256(b"not the model it claims").hexdigest()[:12]
    assert model_label("sha256:000000000000") == want  # once recorded as the fake label


def test_non_medvae_and_pickled_models_are_refused(dev_data, tmp_path, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    junk = tmp_path / "junk.pt"
    junk.write_text("hello")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", src, out, "--model", junk], "not a medvae model", out)
    pickled = tmp_path / "pickled.pt"
    torch.save(MaskedVAE(VAEConfig(channels=(4, 8))), pickled)
    _assert_refused(capsys, ["restore", src, out, "--model", pickled], "weights_only", out)


@pytest.mark.parametrize("share", [0.3, 0.7])
def test_a_checkpoint_cut_short_is_called_truncated(dev_data, tmp_path, tiny_model, capsys, share):
    data = Path(tiny_model).read_bytes()  # once "could not read it ([Errno 22] Invalid argument)"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[:int(len(data) * share)])
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", dev_data / "nifti" / "heudiconv_axasc35.nii.gz", out, "--model", cut],
                    "the file is truncated or damaged", out)


@pytest.mark.parametrize("damage, needle", [
    (lambda ck: ck.update(meta="calibrated"), "its 'meta' is a str, not a mapping"),
    (lambda ck: ck["meta"].update(blend="0.2"), "its meta['blend'] is a str, not a mapping"),
    # read as the raw std (1.39x wider on CT_small's holes) while the page quoted the measured coverage
    (lambda ck: ck["meta"].update(calibration={"std_scale_holes": float("nan"), "coverage_2std_holes": 0.93}),
     "the model's uncertainty calibration is broken: its 'std_scale_holes' = nan is not a finite number above 0"),
    (lambda ck: ck["meta"].update(calibration={"std_floor_noise": "0.1"}), "its 'std_floor_noise' = '0.1' is not"),
    (lambda ck: ck["meta"].update(calibration={"coverage_2std_noise": 93.0}), "'coverage_2std_noise' = 93.0 is "
                                                                              "not a finite number in [0, 1]"),
    (lambda ck: ck["model_config"].update(act="NOSUCHACT"), "invalid model configuration in checkpoint: "
                                                            "Unsupported option 'NOSUCHACT'"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(dev_data, tmp_path, tiny_model, capsys, damage, needle):
    ck = torch.load(tiny_model, weights_only=True)
    ck.setdefault("meta", {})
    damage(ck)
    bad = atomic_torch_save(ck, tmp_path / "bad.pt")
    out = tmp_path / "r.nii.gz"
    _assert_refused(capsys, ["restore", dev_data / "nifti" / "heudiconv_axasc35.nii.gz", out, "--model", bad],
                    needle, out)


def test_output_over_the_input_is_refused(dev_data, tmp_path, tiny_model, capsys, copy_into):
    series = copy_into(dev_data / "dicom" / "series_ct_head", "series")
    before = sorted(p.name for p in series.iterdir())
    _assert_refused(capsys, ["restore", series, series, "--model", tiny_model], "overwrite the input")
    _assert_refused(capsys, ["restore", series, series, "--model", tiny_model, "--overwrite"], "overwrite the input")
    _assert_refused(capsys, ["restore", series, series / "sub", "--model", tiny_model], "overwrite the input",
                    series / "sub")
    assert sorted(p.name for p in series.iterdir()) == before


def test_output_over_the_mask_is_refused(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    mask = tmp_path / "holes.nii.gz"
    _mask_file(src, mask, (slice(10, 20), slice(10, 20), slice(None)))
    before = mask.read_bytes()
    for extra in (["restored.nii.gz"], ["restored.nii.gz", "--uncertainty", mask, "--samples", "2"]):
        out = mask if len(extra) == 1 else tmp_path / extra[0]
        _assert_refused(capsys, ["restore", src, out, "--mask", mask, "--model", tiny_model, "--overwrite",
                                 *extra[1:]], "overwrite the mask")
    assert mask.read_bytes() == before and not (tmp_path / "restored.nii.gz").exists()


def test_a_full_disk_leaves_neither_the_restoration_nor_its_map(dev_data, tmp_path, tiny_model, capsys,
                                                                 monkeypatch):
    from medvae.io import nifti

    real = nifti.write_nifti

    def full_disk(scan, array, out, *, description="medvae restored"):
        if "uncertainty" in description:  # the restoration was written; its map does not fit
            raise OSError(28, "No space left on device")
        return real(scan, array, out, description=description)

    monkeypatch.setattr(nifti, "write_nifti", full_disk)
    out, unc = tmp_path / "r.nii.gz", tmp_path / "r_std.nii.gz"
    code, _, err = _run(capsys, "restore", dev_data / "nifti" / "heudiconv_axasc35.nii.gz", out, "--model",
                        tiny_model, "--uncertainty", unc, "--samples", "2")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"medvae restore: error: {unc}: No space left on device"  # the map's disk
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []


def test_a_full_disk_under_a_dicom_writer_is_one_line(dev_data, tmp_path, tiny_model, capsys, monkeypatch):
    """pydicom re-raises a failed write as OSError(message + its traceback): the traceback was printed."""
    from medvae.io import derived_series

    def full_disk(ds, path):
        raise OSError("With tag (7FE0,0010) got exception: [Errno 28] No space left on device\n"
                      "Traceback (most recent call last):\n  File \"filewriter.py\", line 1\n")

    monkeypatch.setattr(derived_series, "_write_dataset", full_disk)
    out = tmp_path / "restored"
    code, _, err = _run(capsys, "restore", dev_data / "dicom/pydicom/CT_small.dcm", out, "--model", tiny_model)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"medvae restore: error: {out}: No space left on device"  # the series
    assert not out.exists()


def test_a_dicom_restoration_is_renamed_in_before_its_map(dev_data, tmp_path, tiny_model, capsys, monkeypatch):
    """A kill between the two renames left the map without its restoration, which a batch rerun refused."""
    import medvae.io.atomic

    renamed, real = [], os.rename

    def rename(src, dst):
        renamed.append(Path(dst).name)
        return real(src, dst)

    monkeypatch.setattr(medvae.io.atomic.os, "rename", rename)
    out = tmp_path / "restored"
    assert _run(capsys, "restore", dev_data / "dicom/pydicom/CT_small.dcm", out, "--model", tiny_model,
                "--samples", 2)[0] == 0
    finals = [n for n in renamed if n in ("restored", "restored_uncertainty")]
    assert finals == ["restored", "restored_uncertainty"]


def test_existing_output_needs_overwrite(dev_data, tmp_path, tiny_model, capsys):
    src = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    out = tmp_path / "r.nii.gz"
    out.write_text("keep me")
    # --overwrite replaces only what medvae wrote: a file of the user's is not told to pass it
    for extra in ([], ["--overwrite"]):
        _assert_refused(capsys, ["restore", src, out, "--model", tiny_model, *extra], "medvae did not write")
    assert out.read_text() == "keep me"
    out.unlink()
    assert _run(capsys, "restore", src, out, "--model", tiny_model)[0] == 0
    _assert_refused(capsys, ["restore", src, out, "--model", tiny_model], "already exists; pass --overwrite")
    code, _, _ = _run(capsys, "restore", src, out, "--model", tiny_model, "--overwrite", "--samples", 2)
    assert code == 0 and nib.load(out).shape == nib.load(src).shape


def test_bf16_denoising_moves_psnr_by_far_less_than_the_noise_and_inpainting_stays_fp32(ct_slice_hu):
    from medvae.evaluate import psnr

    clean = np.squeeze(ct_slice_hu).astype(np.float32)
    noisy = clean + np.random.default_rng(0).normal(0, 100, clean.shape).astype(np.float32)
    fp32, _ = restore_volume(noisy, modality="CT", precision="fp32")
    bf16, _ = restore_volume(noisy, modality="CT", precision="bf16")
    gain = psnr(clean, fp32, data_range=2000.0) - psnr(clean, noisy, data_range=2000.0)
    assert gain > 1.0
    assert abs(psnr(clean, bf16, data_range=2000.0) - psnr(clean, fp32, data_range=2000.0)) < 0.05 * gain
    holes = np.zeros(clean.shape, bool)
    holes[20:40, 30:60] = True
    auto, _ = restore_volume(clean, modality="CT", mask=holes)
    exact, _ = restore_volume(clean, modality="CT", mask=holes, precision="fp32")
    np.testing.assert_array_equal(auto, exact)
    with pytest.raises(Exception, match="unknown precision 'fp8'"):
        restore_volume(clean, modality="CT", precision="fp8")


def test_the_flip_ensemble_averages_the_mirrored_restoration_and_is_mirror_symmetric(ct_slice_hu):
    from medvae.errors import MedvaeError
    from medvae.evaluate import psnr

    clean = np.squeeze(ct_slice_hu)[64:192, 32:224].astype(np.float32)
    noisy = clean + np.random.default_rng(1).normal(0, 100, clean.shape).astype(np.float32)
    kw = dict(modality="CT", precision="fp32", blend=False)                         # the network alone
    one, _ = restore_volume(noisy, ensemble=1, **kw)
    mirrored, _ = restore_volume(np.ascontiguousarray(noisy[:, ::-1]), ensemble=1, **kw)
    two, _ = restore_volume(noisy, **kw)                                            # the default: 2
    np.testing.assert_allclose(two, (one + mirrored[:, ::-1]) / 2, atol=0.05)      # HU
    two_of_mirror, _ = restore_volume(np.ascontiguousarray(noisy[:, ::-1]), **kw)
    np.testing.assert_allclose(two_of_mirror[:, ::-1], two, atol=0.05)             # mirror in, mirror out
    assert psnr(clean, two, data_range=2000.0) > psnr(clean, one, data_range=2000.0)
    holes = np.zeros(clean.shape, bool)
    holes[20:40, 30:60] = True
    filled, _ = restore_volume(noisy, modality="CT", mask=holes, ensemble=4)
    np.testing.assert_array_equal(filled[~holes], noisy[~holes])                   # known pixels stay exact
    with pytest.raises(MedvaeError, match="ensemble must be one of"):
        restore_volume(noisy, modality="CT", ensemble=3)


def test_a_noisy_mr_scan_is_windowed_as_its_clean_self(dev_data):
    """Zero-mean noise spreads the background below 0, which shifts the plain 0.5 percentile by ~10 %
    of the window; restore_volume takes that percentile from smoothed slices instead, so it restores as
    well as with the clean scan's window (and far better than with the shifted one)."""
    from medvae.corruption import GaussianNoise, RicianNoise
    from medvae.evaluate import psnr
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan

    vol = np.asarray(load_scan(dev_data / "nifti/nibabel_example4d.nii.gz").array, np.float32)[:, :, 10:14]
    clean_w = IntensityPolicy().window_for(vol, "MR")
    rng_width = clean_w[1] - clean_w[0]
    noisy = np.asarray(GaussianNoise(0.05 * rng_width, seed=0)(vol[None])[0][0], np.float32)
    kw = dict(modality="MR", precision="fp32", ensemble=1, blend=False)
    score = lambda m: np.mean([psnr(vol[:, :, k], m[:, :, k], data_range=rng_width) for k in range(4)])  # noqa: E731
    default, _ = restore_volume(noisy, **kw)
    with_clean, _ = restore_volume(noisy, window=clean_w, **kw)
    plain, _ = restore_volume(noisy, window=IntensityPolicy().window_for(noisy, "MR"), **kw)
    assert abs(score(default) - score(with_clean)) < 0.5
    assert score(default) > score(plain) + 3.0
    rician = np.asarray(RicianNoise(0.05 * rng_width, seed=0)(vol[None])[0][0], np.float32)
    plain_low = IntensityPolicy().window_for(rician, "MR")[0]
    assert plain_low > 0.005 * rng_width                   # the Rayleigh background lifts the plain percentile
    assert IntensityPolicy().window_for(rician, "MR", noisy=True)[0] == clean_w[0] == 0.0   # its bias removed
    # stored as integers (300 counts a window), the noise piles 1.6 % onto the low percentile's value: once
    # taken for a constant fill, which kept the Rayleigh-lifted plain percentile
    counts = np.round(np.asarray(RicianNoise(6.0, seed=0)(vol[None] * (300 / rng_width))[0][0])).astype(np.int16)
    assert IntensityPolicy().window_for(counts, "MR")[0] == 1.0
    assert IntensityPolicy().window_for(counts, "MR", noisy=True)[0] == 0.0


def test_rician_noise_on_a_background_above_zero_keeps_the_clean_window():
    """sdcflows' EPI has a constant background 8 % up its window. Rician noise of 5 % spreads it down to
    0, so the plain 0.5 percentile fell 6.5 % of the window and the restoration lost 6.7 dB against the
    clean window (scripts/bench_window.py). The Rician floor (IntensityPolicy.window_for, noisy=True)
    finds the background again; the clean scan, whose low end is that constant fill, keeps its plain
    percentile exactly."""
    from pathlib import Path

    from medvae.corruption import RicianNoise
    from medvae.evaluate import psnr
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan

    path = Path(__file__).resolve().parents[2] / "shared/data/extra/nifti/sdcflows_epi.nii.gz"
    if not path.is_file():
        pytest.skip("../shared/data/extra not present")
    vol = np.asarray(load_scan(path).array, np.float32)
    policy = IntensityPolicy()
    clean_w = policy.window_for(vol, "MR")
    width = clean_w[1] - clean_w[0]
    assert policy.window_for(vol, "MR", noisy=True) == clean_w
    noisy = np.asarray(RicianNoise(0.05 * width, seed=0)(vol[None])[0][0], np.float32)
    plain = policy.window_for(noisy, "MR")
    assert plain[0] < clean_w[0] - 0.05 * width
    ks = [22, 36]
    kw = dict(modality="MR", precision="fp32", ensemble=1, blend=False)
    score = lambda m: np.mean([psnr(vol[:, :, k], m[:, :, i], data_range=width) for i, k in enumerate(ks)])  # noqa: E731
    default, _ = restore_volume(noisy[:, :, ks], window=policy.window_for(noisy, "MR", noisy=True), **kw)
    shifted, _ = restore_volume(noisy[:, :, ks], window=plain, **kw)
    with_clean, _ = restore_volume(noisy[:, :, ks], window=clean_w, **kw)
    assert abs(policy.window_for(noisy, "MR", noisy=True)[0] - clean_w[0]) < 0.04 * width
    assert score(default) > score(shifted) + 3.0
    assert abs(score(default) - score(with_clean)) < 0.5


def test_a_blank_slice_or_noise_clipped_at_zero_does_not_take_the_mr_window():
    """sdcflows' EPI (background 8 % up its window) under Gaussian noise of 5 %: one zero-filled slice, or
    the noise stored unsigned (clipped at 0), made 0 the window's low end, as a masked scan's constant
    fill; every slice was then restored about 8 dB worse than its noisy input (audit)."""
    from pathlib import Path

    from medvae.intensity import IntensityPolicy
    from medvae.restore import scan_window

    path = Path(__file__).resolve().parents[2] / "shared/data/extra/nifti/sdcflows_epi.nii.gz"
    if not path.is_file():
        pytest.skip("../shared/data/extra not present")
    import nibabel as nib

    clean = np.asarray(nib.load(path).dataobj, np.float64)[:, :, 28:31]
    lo, hi = np.percentile(clean, [0.5, 99.5])
    noisy = (clean + np.random.default_rng(7).normal(0, 0.05 * (hi - lo), clean.shape)).astype(np.float32)
    window = lambda v: scan_window(IntensityPolicy(), lambda a, b: v[:, :, a:b], v.shape, "MR")  # noqa: E731
    ref = window(noisy)
    assert ref[0] > 0.05 * (hi - lo)
    blank = noisy.copy()
    blank[:, :, 1] = 0
    clipped = np.clip(np.round(noisy), 0, 65535).astype(np.float32)
    for v in (blank, clipped):
        got = window(v)
        assert abs(got[0] - ref[0]) < 0.05 * (hi - lo), (got, ref)  # it was 0
    # a masked scan's constant fill still holds the low end: a region, not scattered pixels
    masked = noisy.copy()
    masked[:20] = 0
    assert window(masked)[0] == 0
    assert window(np.zeros((8, 8, 3), np.float32)) == (0.0, 1.0)  # every slice blank: what there is


def test_what_fills_the_holes_does_not_move_an_mr_window(dev_data, tmp_path):
    """The MR window was taken over every voxel, the holes' fill too: zeros from `medvae corrupt` or a
    -32768 sentinel there pulled its low end down and changed the restored holes; the same scan with
    another fill is now restored alike, in its known pixels' window (by a model that prefills its holes,
    as the shipped one does: a model without the prefill sees the fill itself)."""
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan
    from medvae.restore import scan_window

    torch.manual_seed(0)
    prefilling = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2, prefill="harmonic"))
    tiny_model = atomic_torch_save(checkpoint_dict(prefilling, IntensityPolicy()), tmp_path / "tiny.pt")

    vol = np.asarray(load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz").array, np.float32)[:, :, 15:19]
    mask = np.zeros(vol.shape, bool)
    mask[16:32, 20:36, :] = True
    kw = dict(model=tiny_model, modality="MR", ensemble=1, blend=False, samples=0, mask=mask)
    known = IntensityPolicy().window_for(np.where(mask, np.nan, vol), "MR", noisy=True)
    results = []
    for fill in (0.0, -32768.0, 65535.0):
        filled = np.where(mask, np.float32(fill), vol)
        assert scan_window(IntensityPolicy(), lambda a, b: filled[:, :, a:b], vol.shape, "MR", unknown=mask) == known
        results.append(restore_volume(filled, **kw)[0])
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    np.testing.assert_array_equal(results[0][~mask], vol[~mask])


def test_what_fills_the_holes_does_not_decide_a_nifti_scans_modality(dev_data, tmp_path, tiny_model):
    # the guess read the holes too: a CT crop whose holes hold -32768 was restored as MR
    import nibabel as nib

    from medvae.io import load_scan
    from medvae.restore import restore_scan

    img = nib.load(dev_data / "nifti/invesalius_cranium_ct.nii.gz")
    ct = np.asarray(load_scan(dev_data / "nifti/invesalius_cranium_ct.nii.gz").array, np.float32)
    z = ct.shape[2] // 2
    vol = ct[:, :, z:z + 2].copy()
    mask = np.zeros(vol.shape, np.uint8)
    mask[10:30, 10:30, :] = 1
    nib.save(nib.Nifti1Image(mask, img.affine), tmp_path / "mask.nii.gz")
    for fill in (0.0, -32768.0):
        nib.save(nib.Nifti1Image(np.where(mask > 0, np.float32(fill), vol), img.affine), tmp_path / f"in{fill:g}.nii.gz")
        s = restore_scan(tmp_path / f"in{fill:g}.nii.gz", tmp_path / f"out{fill:g}.nii.gz", model=tiny_model,
                         mask_path=tmp_path / "mask.nii.gz", ensemble=1)
        assert s.modality == "CT", (fill, s.modality_guess)
        assert "-32768" not in s.modality_guess  # the reason is the known voxels' too
        api_vol = np.where(mask > 0, np.float32(fill), vol)
        before = api_vol.copy()
        restore_volume(api_vol, model=tiny_model, mask=mask > 0, ensemble=1, blend=False)  # guessed alike
        np.testing.assert_array_equal(api_vol, before)  # the input is not modified by the guess
    assert "the voxels the mask leaves known" in s.modality_guess
    np.testing.assert_array_equal(load_scan(tmp_path / "in-32768.nii.gz").array[mask > 0], -32768)  # input kept


def test_a_padding_value_that_holds_the_mr_window_is_named(dev_data, caplog):
    # a -32768 fill under a 0..1300 MR gave the window (-32768, 1298) without a word: the anatomy in 4 % of it
    from medvae.intensity import IntensityPolicy
    from medvae.io import load_scan
    from medvae.restore import scan_window

    vol = np.asarray(load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz").array, np.float32)
    padded = np.where(vol < 30, np.float32(-32768), vol)
    with caplog.at_level("WARNING", logger="medvae.restore"):
        assert scan_window(IntensityPolicy(), lambda a, b: vol[:, :, a:b], vol.shape, "MR") == (0.0, 1298.0)
        assert not caplog.records  # its own zero background is no padding
        lo, _ = scan_window(IntensityPolicy(), lambda a, b: padded[:, :, a:b], vol.shape, "MR")
    assert lo < -32000
    [record] = caplog.records
    assert record.getMessage().startswith("the MR window runs from -32768, which 32 % of the voxels hold, far below "
                                          "the rest (30 to 1298): a padding value?")


def test_the_rician_floor_is_free_of_scale_and_needs_2x2_blocks():
    """Squares of values near 1e160 overflowed to a NaN window; slices one pixel wide have no noise
    estimate, which once left the Rician bias in place."""
    from medvae.intensity import rician_floor

    rng = np.random.default_rng(0)
    clean = np.full((96, 96, 2), 100.0)
    clean[24:72, 24:72] = 1000.0
    noisy = np.hypot(clean + rng.normal(0, 50, clean.shape), rng.normal(0, 50, clean.shape))
    assert 60 < rician_floor(noisy, 0.5) < 100 < np.percentile(noisy, 50)
    assert rician_floor(noisy * 1e150, 0.5) == pytest.approx(rician_floor(noisy, 0.5) * 1e150, rel=1e-9)
    assert rician_floor(noisy[:, :1], 0.5) is None


def test_a_faintly_noisy_ct_is_not_smoothed_far_below_its_input():
    """Do little harm: noise of 10 HU (0.5 % of the -1000..1000 HU window) on a real abdomen CT slice
    (TotalSegmentator's, resampled, so its own noise is smooth). v4, never trained below 1 % noise, ended
    5.4 dB below its input; the shipped model, trained with faint noise too, 2.8 dB (scripts/bench_faint.py
    measures every validation volume)."""
    from pathlib import Path

    from medvae.evaluate import psnr
    from medvae.io import load_scan

    path = Path(__file__).resolve().parents[2] / "shared/data/extra/nifti/totalseg_abdomen_ct.nii.gz"
    if not path.is_file():
        pytest.skip("../shared/data/extra not present")
    clean = np.asarray(load_scan(path).array, np.float32)[:, :, 56:57]
    noisy = clean + np.random.default_rng(0).normal(0, 10.0, clean.shape).astype(np.float32)
    restored, _ = restore_volume(noisy, modality="CT")
    window = (-1000.0, 1000.0)
    before = psnr(clean[:, :, 0], noisy[:, :, 0], window=window)
    assert psnr(clean[:, :, 0], restored[:, :, 0], window=window) > before - 4.0


def test_ct_padding_outside_the_field_of_view_is_returned_as_it_came_and_does_not_cost_the_air(dev_data,
                                                                                             monkeypatch):
    """693_UNCR stores -3024 HU outside its reconstruction circle, a step no training CT has. That padding
    comes back bit-identical with zero uncertainty, the input is untouched, and moving it to -1500 HU for
    the network (noise kept) restores the noisy slice better than feeding the step as it is (+1.1 dB
    measured with v6 on the benchmark's slice, docs/benchmarks.md run 12)."""
    import medvae.restore as restore_module
    from medvae.evaluate import psnr
    from medvae.io import load_scan

    clean = np.asarray(load_scan(dev_data / "dicom/pydicom-data/693_UNCR.dcm").array, np.float32)
    noisy = clean + np.random.default_rng(1).normal(0, 100.0, clean.shape).astype(np.float32)
    before = noisy.copy()
    padding = clean[:, :, 0] < -2000
    assert 0.15 < padding.mean() < 0.3  # the corners outside the circle

    restored, std = restore_volume(noisy, modality="CT", samples=2)
    np.testing.assert_array_equal(noisy, before)
    np.testing.assert_array_equal(restored[:, :, 0][padding], noisy[:, :, 0][padding])
    assert not std[:, :, 0][padding].any() and std[:, :, 0][~padding].min() > 0
    monkeypatch.setattr(restore_module, "CT_INPUT_FLOOR_HU", -1e12)
    monkeypatch.setattr(restore_module, "CT_PADDING_HU", -1e12)
    as_is, _ = restore_volume(noisy, modality="CT")
    window = (-1000.0, 1000.0)
    assert psnr(clean[:, :, 0], restored[:, :, 0], window=window) > psnr(clean[:, :, 0], as_is[:, :, 0],
                                                                        window=window) + 0.5


@pytest.mark.parametrize("value", [-2000.0, -2048.0])
def test_ct_padding_at_other_vendor_values_is_returned_as_it_came(dev_data, value):
    # -2000 HU (exactly the threshold) was not recognised at all, and -2048 slivers were restored
    from medvae.io import load_scan

    ct = np.asarray(load_scan(dev_data / "dicom/pydicom-data/693_UNCR.dcm").array, np.float32)
    padding = ct < -2000
    ct[padding] = value
    restored, std = restore_volume(ct, modality="CT", samples=2, ensemble=1)
    np.testing.assert_array_equal(restored[padding], ct[padding])
    assert not std[padding].any()


@pytest.mark.parametrize("window", ["brain", (-1024.0, 3071.0)])
def test_ct_padding_is_read_in_hu_whatever_window_the_caller_passes(dev_data, window):
    # the padding thresholds were window units of -1000..1000 HU: in a brain window all air and fat came
    # back as it went in (63 % of a head slice) with zero uncertainty, and in a wide one the -3024 HU
    # padding was restored
    from medvae.io import load_scan

    clean = np.asarray(load_scan(dev_data / "dicom/pydicom-data/693_UNCR.dcm").array, np.float32)
    noisy = clean + np.random.default_rng(1).normal(0, 40.0, clean.shape).astype(np.float32)
    padding = clean < -2000
    restored, std = restore_volume(noisy, modality="CT", window=window, samples=2, ensemble=1)
    np.testing.assert_array_equal(restored[padding], noisy[padding])
    assert not std[padding].any()
    air = (clean > -1100) & (clean < -900)
    assert air.sum() > 1000 and (restored[air] != noisy[air]).mean() > 0.99 and (std[air] > 0).all()


@pytest.mark.parametrize("shape, kwargs, needle", [
    ((117, 1, 3), {}, "slices of 117x1 pixels (3 of them) cannot be restored"),
    ((8, 8, 0), {"modality": "CT"}, "slices of 8x8 pixels (0 of them) cannot be restored"),
    ((16, 16, 2), {"modality": "PET"}, "modality must be CT or MR, not 'PET'"),
])
def test_restore_volume_refuses_what_it_cannot_restore_in_one_line(tiny_model, shape, kwargs, needle):
    from medvae.errors import MedvaeError

    with pytest.raises(MedvaeError) as err:  # a 1-pixel side once crashed in the noise estimate's median
        restore_volume(np.ones(shape, np.float32), model=tiny_model, **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_restore_volume_given_a_path_says_it_takes_arrays(tiny_model):
    from medvae.errors import MedvaeError

    # both were "expected a 2-D or 3-D volume, got shape ()" / "mask shape () does not match"
    with pytest.raises(MedvaeError, match=r"^restore_volume takes the volume as an array, not a path \('ct/'\): "
                                          r"read a file with medvae.io.load_scan, or restore files with restore_scan$"):
        restore_volume("ct/", model=tiny_model)
    with pytest.raises(MedvaeError, match=r"^restore_volume takes the mask as an array, not a path \('holes.nii.gz'"):
        restore_volume(np.ones((8, 8, 1), np.float32), model=tiny_model, modality="CT", mask=Path("holes.nii.gz"))


@pytest.mark.parametrize("scale", [1e-7, 1e6])
def test_the_uncertainty_of_a_scan_in_unusual_units_is_neither_zero_nor_clipped(tiny_model, caplog, scale):
    """A float16 map read 0 on 98 % of a scan in 1e-5 units and was clipped at 65504 on one in 1e9 units."""
    vol = np.random.default_rng(0).normal(100, 30, (32, 32, 2)).astype(np.float32)  # MR in ordinary units
    _, std = restore_volume(vol, model=tiny_model, modality="MR", samples=2, ensemble=1)
    assert std.dtype == np.float16  # 2 bytes a voxel where that loses nothing
    with caplog.at_level("WARNING", logger="medvae.restore"):
        _, odd = restore_volume(vol * np.float32(scale), model=tiny_model, modality="MR", samples=2, ensemble=1)
    assert odd.dtype == np.float32 and not caplog.records
    np.testing.assert_allclose(odd / scale, std.astype(np.float32), rtol=2e-3, atol=1e-3 * float(std.max()))


def test_window_takes_what_evaluate_takes_and_refuses_an_empty_or_infinite_one(tiny_model):
    """A preset name, a Window (center, width) and "CENTER,WIDTH" mean what they mean in medvae.evaluate;
    a plain pair is (lo, hi). (100, 100) returned NaN voxels silently, (1000, -1000) was accepted and
    "brain" or a Window failed with "too many values to unpack"."""
    from medvae.errors import MedvaeError
    from medvae.evaluate import Window

    vol = np.random.default_rng(0).normal(40, 20, (24, 24, 2)).astype(np.float32)
    kw = dict(model=tiny_model, modality="CT", ensemble=1, blend=False)
    ref, _ = restore_volume(vol, window=(0, 80), **kw)
    assert np.isfinite(ref).all()
    for window in ("brain", Window(40, 80), "40,80", [0.0, 80.0]):
        np.testing.assert_array_equal(restore_volume(vol, window=window, **kw)[0], ref)
    # (-3e38, 3e38) is finite in float64 but not in float32, where the images are scaled: ±inf came back
    for window in ((100, 100), (1000, -1000), (0, float("inf")), (float("nan"), 80), "40,0", "nope", (1, 2, 3),
                   (-3e38, 3e38), (100, 100.000001)):
        with pytest.raises(MedvaeError, match="bad window") as err:
            restore_volume(vol, window=window, **kw)
        assert "\n" not in str(err.value)
    # the same from the image itself: float64 detail on a 1e9 offset came back flat, 1e39 as ±inf
    with pytest.raises(MedvaeError, match=r"the image's window 1000000\d+ to 1000000\d+: its width [\d.]+ is lost"):
        restore_volume(1e9 + vol.astype(np.float64) / 10, **{**kw, "modality": "MR"})
    with pytest.raises(MedvaeError, match=r"the input holds values beyond float32's range"):
        restore_volume(vol.astype(np.float64) * 1e38, **{**kw, "modality": "MR"})


@pytest.mark.parametrize("kwargs, needle", [
    ({"ensemble": 3}, "ensemble must be one of [1, 2, 4], not 3"),
    ({"ensemble": True}, "ensemble must be one of"),
    ({"batch_size": 0}, "batch_size must be a whole number >= 1, not 0"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"samples": -1}, "samples must be a whole number >= 0, not -1"),
    ({"out": np.empty((16, 16, 2))}, "out must be float32 of shape (16, 16, 2)"),
    ({"precision": "fp16"}, "unknown precision 'fp16'"),
    ({"out": []}, "out must be a float32 numpy array of shape (16, 16, 2), not list"),
    ({"seed": 1.5}, "seed must be a whole number, not 1.5"),
    ({"seed": 1e300}, "seed must be in -2**63..2**64-1, not 1e+300"),  # a bare ValueError in manual_seed
    ({"seed": 10 ** 400}, "seed must be in -2**63..2**64-1, not 1000"),  # float(seed) overflowed
    ({"seed": 2 ** 64}, "seed must be in -2**63..2**64-1, not 18446744073709551616"),
    # positions that once gave NaN slices without a word (a repeated position, a zero step)
    ({"slice_positions": np.array([0.0, 0.0])}, "slice_positions must be finite and strictly rising or falling"),
    ({"slice_positions": np.array([0.0, np.nan])}, "slice_positions must be finite and strictly rising or falling"),
    ({"slice_positions": np.array([0.0, 1.0, 2.0])}, "slice_positions must be 2 numbers, one per slice"),
    ({"slice_step": 0.0}, "slice_step must be a finite number of mm > 0, not 0.0"),
    ({"slice_step": float("nan")}, "slice_step must be a finite number of mm > 0"),
    # a yes/no option given a string: "no" is true, and the blend the caller turned down was applied
    ({"blend": "no"}, "blend must be True or False, not 'no'"),
    ({"holes": "no"}, "holes must be True or False, not 'no'"),
    ({"coarse_holes": 0}, "coarse_holes must be True or False, not 0"),
    ({"blend": None}, "blend must be True or False, not None"),  # None was no blend
])
def test_bad_option_values_are_refused_as_medvae_errors_in_one_line(tiny_model, kwargs, needle):
    from medvae.errors import MedvaeError

    with pytest.raises(MedvaeError) as err:  # ensemble=3 and a bad out= raised a bare ValueError
        restore_volume(np.zeros((16, 16, 2), np.float32), model=tiny_model, modality="CT", **kwargs)
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("dtype, needle", [(np.complex64, "complex64; medvae works on real numbers (save the "
                                                             "magnitude"), (bool, "bool"), (object, "object")])
def test_an_input_that_is_not_real_numbers_is_refused_not_cast(tiny_model, dtype, needle):
    from medvae.errors import MedvaeError

    vol = np.ones((16, 16, 2)).astype(dtype)  # complex lost its imaginary part with only a warning
    with pytest.raises(MedvaeError, match=re.escape(needle)):
        restore_volume(vol, model=tiny_model, modality="MR")


def test_a_bare_network_as_model_is_named_not_read_as_a_path(tiny_model):
    from medvae import load_model
    from medvae.errors import MedvaeError

    net = load_model(tiny_model).model  # it was taken for a path: "File name too long"
    with pytest.raises(MedvaeError, match="model must be 'default', a checkpoint path, an MLflow model URI or a "
                                          r"LoadedModel \(medvae.load_model\), not a "):
        restore_volume(np.zeros((16, 16, 2), np.float32), model=net, modality="MR")


def test_an_out_overlapping_the_volume_is_refused_as_a_medvae_error(tiny_model):
    from medvae.errors import MedvaeError

    buf = np.zeros((16, 16, 3), np.float32)
    with pytest.raises(MedvaeError, match="out must be the volume itself or not overlap it"):
        restore_volume(buf[:, :, :2], model=tiny_model, modality="CT", out=buf[:, :, 1:])


def test_restore_scan_refuses_a_bad_ensemble_before_reading_anything(tmp_path):
    from medvae.errors import MedvaeError
    from medvae.restore import restore_scan

    with pytest.raises(MedvaeError, match="ensemble must be one of"):  # not "file not found": checked first
        restore_scan(tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz", ensemble=3)
    with pytest.raises(MedvaeError, match="overwrite must be True or False, not 'yes'"):
        restore_scan(tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz", overwrite="yes")
    assert not list(tmp_path.iterdir())


def test_a_callers_model_keeps_its_training_mode_device_and_weights(dev_ct_head):
    """restore_volume(model=lm) left a model in training switched to eval mode (and moved it to
    ``device``); it now restores with a copy, and the result is the eval-mode model's."""
    import medvae.restore as restore_module
    from medvae.errors import MedvaeError
    from medvae.io import load_scan
    from medvae.models.checkpoint import load_model
    from medvae.models.export import load_inference_model

    vol = np.asarray(load_scan(dev_ct_head).array[96:160, 96:160, 40:43], np.float32)  # 3 brain slices
    lm = load_model("default")
    lm.model.train()
    lm.model.enc.eval()                                  # a caller's own mix of modes stays as it was
    modes = [m.training for m in lm.model.modules()]
    weights = {k: v.clone() for k, v in lm.model.state_dict().items()}
    kw = dict(modality="CT", ensemble=1, precision="fp32")
    mean, _ = restore_volume(vol, model=lm, **kw)
    assert [m.training for m in lm.model.modules()] == modes and lm.model.training
    assert all(torch.equal(v, weights[k]) and v.device.type == "cpu" for k, v in lm.model.state_dict().items())
    np.testing.assert_array_equal(mean, restore_volume(vol, model=load_model("default"), **kw)[0])
    with pytest.raises(MedvaeError):                     # an error after the model is resolved
        restore_volume(vol, model=lm, modality="CT", precision="fp16")
    assert [m.training for m in lm.model.modules()] == modes
    ready = load_model("default")                        # eval mode, on the device: used as it is
    assert restore_module._ready(ready, torch.device("cpu")) is ready
    scripted = load_inference_model("default")           # its TorchScript export: a copy keeps its config
    scripted.model.train()
    np.testing.assert_allclose(restore_volume(vol, model=scripted, **kw)[0], mean, atol=0.01)
    assert scripted.model.training


def test_a_3d_model_is_refused_before_the_demo_or_a_batch_writes_anything(tmp_path, dev_data):
    """The demo wrote its samples and a corrupted case before restore_volume refused the model."""
    from medvae.batch import restore_batch
    from medvae.demo import run_demo

    path = tmp_path / "m3d.pt"
    model = MaskedVAE(VAEConfig(spatial_dims=3, channels=(4, 8), latent_channels=2))
    atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), path)
    with pytest.raises(MedvaeError, match="m3d.pt: this model restores 3-D patches"):
        run_demo(tmp_path / "demo", model=str(path), log_mlflow=False)
    assert not (tmp_path / "demo").exists()
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copyfile(dev_data / "dicom/pydicom/CT_small.dcm", archive / "ct.dcm")
    with pytest.raises(MedvaeError, match="this model restores 3-D patches"):  # once, not a failed row per series
        restore_batch(archive, tmp_path / "out", model=str(path))
    assert not (tmp_path / "out").exists()


def test_an_overwrite_without_samples_removes_the_replaced_restorations_map(dev_data, tmp_path, tiny_model, caplog):
    """The old map stayed under the default name beside the new restoration, and passed for its map."""
    src = dev_data / "nifti/heudiconv_axasc35.nii.gz"
    out = tmp_path / "r.nii.gz"
    restore_scan(src, out, model=tiny_model, samples=2, ensemble=1)
    assert (tmp_path / "r_uncertainty.nii.gz").is_file()
    with caplog.at_level("WARNING", logger="medvae.restore"):
        restore_scan(src, out, model=tiny_model, overwrite=True, ensemble=1)
    assert not (tmp_path / "r_uncertainty.nii.gz").exists() and "removed the uncertainty map" in caplog.text
    # the map written elsewhere (--uncertainty): the old one beside the output stayed too
    restore_scan(src, out, model=tiny_model, samples=2, ensemble=1, overwrite=True)
    restore_scan(src, out, model=tiny_model, overwrite=True, ensemble=1, uncertainty_path=tmp_path / "u.nii.gz")
    assert not (tmp_path / "r_uncertainty.nii.gz").exists() and (tmp_path / "u.nii.gz").is_file()
    foreign = tmp_path / "r_uncertainty.nii.gz"  # a file medvae did not write under that name stays
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), foreign)
    restore_scan(src, out, model=tiny_model, overwrite=True, ensemble=1)
    assert foreign.is_file()
    # a link to the old map (the user moved it): the link goes, not the command (it failed after the commit)
    foreign.unlink()
    restore_scan(src, out, model=tiny_model, samples=2, ensemble=1, overwrite=True)
    (tmp_path / "r_uncertainty.nii.gz").rename(tmp_path / "kept.nii.gz")
    (tmp_path / "r_uncertainty.nii.gz").symlink_to(tmp_path / "kept.nii.gz")
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvae.restore"):
        restore_scan(src, out, model=tiny_model, overwrite=True, ensemble=1)
    assert not (tmp_path / "r_uncertainty.nii.gz").is_symlink() and (tmp_path / "kept.nii.gz").is_file()
    assert "removed this link to the uncertainty map" in caplog.text and "kept.nii.gz is kept" in caplog.text


def test_samples_0_with_an_uncertainty_path_is_refused_not_read_as_8(dev_data, tmp_path, capsys):
    out = tmp_path / "r.nii.gz"
    assert main(["restore", str(dev_data / "dicom/pydicom/CT_small.dcm"), str(out), "--samples", "0",
                 "--uncertainty", str(tmp_path / "u.nii.gz")]) == 2
    assert "--samples 0 makes no uncertainty map" in capsys.readouterr().err and not out.exists()


def test_a_nifti_output_with_a_mixed_case_suffix_is_refused_before_the_work(dev_data, tmp_path, tiny_model):
    """nibabel wrote x.Nii as x.nii, and the staged output was not found: a traceback after the work."""
    src = dev_data / "nifti/heudiconv_axasc35.nii.gz"
    for name in ("x.Nii", "x.Nii.Gz", "x.nii.Gz"):
        with pytest.raises(MedvaeError, match=f"{name}: the suffix .* mixes upper and lower case"):
            restore_scan(src, tmp_path / name, model=tiny_model, ensemble=1)
    s = restore_scan(src, tmp_path / "x.NII.GZ", model=tiny_model, samples=2, ensemble=1)  # one case: written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.NII.GZ", "x_uncertainty.NII.GZ"]
    assert s.uncertainty == tmp_path / "x_uncertainty.NII.GZ"
    assert load_scan(tmp_path / "x.NII.GZ").array.shape == load_scan(src).array.shape
    mixed = tmp_path / "In.Nii.gz"  # as an input: "No such file or directory: 'In.nii.gz'", for a file that is there
    shutil.copyfile(src, mixed)
    with pytest.raises(MedvaeError, match=r"In.Nii.gz: the suffix .Nii.gz mixes upper and lower case, which nibabel "
                                          r"cannot read: rename it to .nii.gz"):
        load_scan(mixed)
    shutil.copyfile(dev_data / "nifti/heudiconv_axasc35.nii.gz", tmp_path / "plain.nii.gz")
    import nibabel as nib

    nib.save(nib.load(tmp_path / "plain.nii.gz"), tmp_path / "un.nii")
    (tmp_path / "un.nii").rename(tmp_path / "Un.Nii")  # uncompressed: renamed .nii.gz it was "not a gzip file"
    with pytest.raises(MedvaeError, match=r"Un.Nii: the suffix .Nii mixes .* rename it to .nii \(or .NII\)$"):
        load_scan(tmp_path / "Un.Nii")


def test_a_mask_folder_of_two_series_or_with_nan_is_refused_as_the_mask(dev_data, tmp_path, tiny_model):
    src = dev_data / "nifti/heudiconv_axasc35.nii.gz"
    masks = tmp_path / "masks"
    masks.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(dev_data / "dicom/pydicom" / name, masks / name)
    with pytest.raises(MedvaeError, match="masks: the mask folder holds 2 series; give a folder holding the mask"):
        restore_scan(src, tmp_path / "o.nii.gz", model=tiny_model, mask_path=masks)
    scan = load_scan(src)
    bad = np.zeros(scan.array.shape, np.float32)
    bad[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(bad, scan.affine), tmp_path / "nan.nii.gz")
    with pytest.raises(MedvaeError, match=r"nan.nii.gz: 1 of \d+ voxels are NaN or infinite in the mask;"):
        restore_scan(src, tmp_path / "o.nii.gz", model=tiny_model, mask_path=tmp_path / "nan.nii.gz")
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_signal_after_the_outputs_are_complete_keeps_them_and_is_not_an_interrupt(dev_data, tmp_path, tiny_model,
                                                                                     monkeypatch, capsys):
    # SIGTERM just after the renames: exit 143 with both outputs in place, and the rerun was refused them
    # ("already exists"); a batch still stops there, as interrupted
    import signal

    import medvae.restore
    from medvae.batch import restore_batch
    from medvae.runtime import LateSignal

    monkeypatch.setattr(medvae.restore, "_drop_replaced_map", lambda dst: signal.raise_signal(signal.SIGTERM))
    src, out = dev_data / "dicom/pydicom/CT_small.dcm", tmp_path / "r.nii.gz"
    rc = main(["restore", str(src), str(out), "--model", str(tiny_model), "--ensemble", "1", "--overwrite"])
    assert rc == 0 and "SIGTERM came after the outputs were complete; they are kept" in capsys.readouterr().err
    assert out.is_file()
    # later, as the locks are released and the summary made: exit 143 too, once the hold ended inside restore
    monkeypatch.setattr(medvae.restore, "_drop_replaced_map", lambda dst: None)
    real = medvae.restore.RestoreSummary
    monkeypatch.setattr(medvae.restore, "RestoreSummary",
                        lambda *a, **k: (signal.raise_signal(signal.SIGTERM), real(*a, **k))[1])
    rc = main(["restore", str(src), str(out), "--model", str(tiny_model), "--ensemble", "1", "--overwrite"])
    said = capsys.readouterr()
    assert rc == 0 and "SIGTERM came after the outputs were complete" in said.err and "restored 1 slice as" in said.out
    monkeypatch.setattr(medvae.restore, "RestoreSummary", real)
    # the Python API and a batch (many commits) keep signals as they are: a plain interrupt, no LateSignal
    monkeypatch.setattr(medvae.restore, "_drop_replaced_map", lambda dst: signal.raise_signal(signal.SIGINT))
    archive = tmp_path / "archive"
    archive.mkdir()
    shutil.copyfile(src, archive / "ct.dcm")
    with pytest.raises(KeyboardInterrupt) as exc:
        restore_batch(archive, tmp_path / "out", model=tiny_model, overwrite=True, ensemble=1)
    assert not isinstance(exc.value, LateSignal)
    with pytest.raises(KeyboardInterrupt) as exc:
        restore_scan(src, tmp_path / "api.nii.gz", model=tiny_model, overwrite=True, ensemble=1)
    assert not isinstance(exc.value, LateSignal)


def test_the_command_once_its_status_is_decided_ignores_one_signal_and_not_two():
    """Shutting torch and MLflow down takes seconds in native code, where SIGTERM killed a finished
    ``medvae`` outright (exit -15, no message, its outputs complete): the first is ignored, a second acts."""
    # SIGTERM is ignored at the OS level (the interpreter resets its own handlers as it finalizes, and a
    # handler in Python lasted only until then); Ctrl-C: the first is ignored, a second acts
    code = ("import os, signal, sys; sys.argv = ['medvae']; from medvae.cli import main; rc = main(); "
            "[os.kill(os.getpid(), signal.SIGTERM) for _ in range(2)]; "
            "print('alive', rc, signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, flush=True); "
            "os.kill(os.getpid(), signal.SIGINT); print('still alive', flush=True); "
            "os.kill(os.getpid(), signal.SIGINT); print('not reached', flush=True)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT and "alive 2 True" in proc.stdout and "still alive" in proc.stdout
    assert "not reached" not in proc.stdout
    # a caller's main([...]) keeps its own handlers: the program's hold is the program's
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_held_signal_lets_a_second_one_act_when_asked():
    """After the commit the rest of a command may wait on an MLflow store: a hung one held every Ctrl-C."""
    from medvae.runtime import signals_recorded

    with pytest.raises(KeyboardInterrupt):
        with signals_recorded(signal.SIGINT, second_acts=True) as (caught, _):
            signal.raise_signal(signal.SIGINT)
            assert caught == [signal.SIGINT]  # the first is only recorded
            signal.raise_signal(signal.SIGINT)
            raise AssertionError("the second Ctrl-C did not act")
    with signals_recorded(signal.SIGINT) as (caught, _):  # a rename shield holds them all
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    assert caught == [signal.SIGINT, signal.SIGINT] and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_corrupts_noise_mask_of_a_padded_ct_is_denoised_not_inpainted(dev_data, tmp_path, capsys):
    # `corrupt` leaves CT padding out of its noise mask; `restore --mask` with it inpainted three quarters of
    # the image (858 HU RMS error against 19 without the mask) and the review page quoted the holes calibration
    from medvae.io import load_scan
    from medvae.slice_gaps import is_hole_mask

    ct = load_scan(dev_data / "dicom/pydicom/CT_small.dcm").array.copy()
    yy, xx = np.mgrid[:ct.shape[0], :ct.shape[1]]
    ct[(yy - 64) ** 2 + (xx - 64) ** 2 > 60 ** 2] = -3024  # padding outside a circular field of view
    src = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct, np.eye(4)), src)
    assert main(["corrupt", str(src), str(tmp_path / "noisy.nii.gz"), "--recipe", "lowdose_ct", "--modality", "CT"]) == 0
    mask = nib.load(tmp_path / "noisy_mask.nii.gz").get_fdata() > 0
    noisy = nib.load(tmp_path / "noisy.nii.gz").get_fdata().astype(np.float32)
    assert 0.5 < mask.mean() < 1 and not is_hole_mask(mask, lambda a, b: noisy[:, :, a:b], "CT")
    assert is_hole_mask(mask, lambda a, b: noisy[:, :, a:b], "MR")  # only CT has such padding
    with_mask, std = restore_volume(noisy, model="default", modality="CT", mask=mask, ensemble=1, samples=2)
    without, _ = restore_volume(noisy, model="default", modality="CT", ensemble=1)
    np.testing.assert_allclose(with_mask[mask], without[mask], atol=1e-3)
    assert np.array_equal(with_mask[~mask], noisy[~mask]) and not std[~mask].any()
    holes = mask.copy()
    holes[40:60, 40:60] = False  # a tissue pixel left out: an inpainting mask, as before
    assert is_hole_mask(holes, lambda a, b: noisy[:, :, a:b], "CT")


def test_a_modality_that_contradicts_the_dicom_tag_is_said(dev_data, tmp_path, tiny_model, caplog):
    """MR_small restored with --modality CT was windowed at -1000..1000 HU without a word (below its input)."""
    src = dev_data / "dicom/pydicom/MR_small.dcm"
    args = ["--model", str(tiny_model), "--ensemble", "1"]
    said = lambda: [r.getMessage() for r in caplog.records if "its DICOM Modality" in r.getMessage()]  # noqa: E731
    with caplog.at_level("WARNING"):
        assert main(["restore", str(src), str(tmp_path / "ct.nii.gz"), "--modality", "CT", *args]) == 0
        assert said() == [f"{src}: its DICOM Modality is MR, but it is treated as CT, as given"]
        caplog.clear()
        assert main(["restore", str(src), str(tmp_path / "mr.nii.gz"), "--modality", "MR", *args]) == 0
        assert said() == []
        assert main(["corrupt", str(src), str(tmp_path / "c"), "--recipe", "gaussian", "--modality", "CT"]) == 0
        assert said() == [f"{src}: its DICOM Modality is MR, but it is treated as CT, as given"]
