"""Bad input: each case is one MedvaeError line naming the file, through the API and `medvae info`."""
from __future__ import annotations

import warnings

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from medvae.cli import main
from medvae.errors import MedvaeError
from medvae.io import load_scan


def _missing(dev, tmp):
    return tmp / "does_not_exist.dcm", "no such file", "does_not_exist.dcm"


def _empty_folder(dev, tmp):
    (tmp / "empty_series").mkdir()
    return tmp / "empty_series", "empty folder", "empty_series"


def _no_dicom_in_folder(dev, tmp):
    (tmp / "docs").mkdir()
    (tmp / "docs" / "readme.txt").write_text("hello")
    return tmp / "docs", "no DICOM files", "docs"


def _neither(dev, tmp):
    p = tmp / "notes.txt"
    p.write_text("this is not a scan\n" * 20)
    return p, "neither a DICOM", "notes.txt"


def _truncated_dicom(dev, tmp):
    data = (dev / "dicom/pydicom/CT_small.dcm").read_bytes()
    p = tmp / "truncated.dcm"
    p.write_bytes(data[: len(data) // 2])
    return p, "truncated", "truncated.dcm"


def _truncated_header(dev, tmp):
    data = (dev / "dicom/pydicom/CT_small.dcm").read_bytes()
    p = tmp / "cut_header.dcm"
    p.write_bytes(data[:300])  # DICM marker present, cut inside the header
    return p, "truncated or corrupt", "cut_header.dcm"


def _series_with_a_cut_header(dev, tmp):
    # pydicom reads it without complaint: it once became a second, "unknown" series, and choosing the
    # real one with --series silently dropped the slice
    folder, dss, names = _series_files(dev, tmp)
    for ds, name in zip(dss, names):
        ds.save_as(folder / name)
    last = folder / names[-1]
    last.write_bytes(last.read_bytes()[:400])
    return folder, "truncated or corrupt", last.name


def _rt_struct_in_the_series(dev, tmp):
    # an RT Structure Set filed under the CT's SeriesInstanceUID: refused as what it is, not by its size
    folder, dss, names = _series_files(dev, tmp)
    for ds, name in zip(dss, names):
        ds.save_as(folder / name)
    rt = dss[0]
    for tag in ("PixelData", "Rows", "Columns"):
        delattr(rt, tag)
    rt.SOPClassUID = rt.file_meta.MediaStorageSOPClassUID = pydicom.uid.RTStructureSetStorage
    rt.save_as(folder / "rt.dcm")
    return folder, "RT Structure Set Storage", "rt.dcm"


def _no_pixel_data(dev, tmp):
    ds = pydicom.dcmread(dev / "dicom/pydicom/CT_small.dcm")
    del ds.PixelData
    p = tmp / "no_pixels.dcm"
    ds.save_as(p)
    return p, "no pixel data", "no_pixels.dcm"


def _series_files(dev, tmp, n=3):
    folder = tmp / "series"
    folder.mkdir()
    files = sorted((dev / "dicom/series_ct_head").glob("*.dcm"))[:n]
    return folder, [pydicom.dcmread(f) for f in files], [f.name for f in files]


def _sizes_differ(dev, tmp):
    folder, dss, names = _series_files(dev, tmp)
    dss[1].set_pixel_data(dss[1].pixel_array[:128, :128].copy(), "MONOCHROME2", 16)
    for ds, name in zip(dss, names):
        ds.save_as(folder / name)
    return folder, "differ in size", names[1]


def _duplicate_positions(dev, tmp):
    folder, dss, names = _series_files(dev, tmp)
    dss[2].ImagePositionPatient = dss[1].ImagePositionPatient
    for ds, name in zip(dss, names):
        ds.save_as(folder / name)
    return folder, "duplicate slice position", names[2]


def _absurd_frame_count(dev, tmp):
    # NumberOfFrames 1e6 on a 39 KB file: 90 s and 1 GB of per-frame work before a misleading error
    ds = pydicom.dcmread(dev / "dicom/pydicom/CT_small.dcm")
    ds.NumberOfFrames = 1_000_000
    p = tmp / "frames.dcm"
    ds.save_as(p)
    return p, "the header promises 1000000 frame(s) of 128x128 pixels", "frames.dcm"


def _nan_nifti(dev, tmp):
    arr = np.ones((8, 8, 4), np.float32)
    arr[1, 1, 1] = np.nan
    arr[2, 2, 2] = np.inf
    p = tmp / "with_nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), p)
    return p, "2 of 256 voxels are NaN or infinite", "with_nan.nii.gz"


def _truncated_nifti(dev, tmp):
    data = (dev / "nifti/heudiconv_axasc35.nii.gz").read_bytes()
    p = tmp / "cut.nii.gz"
    p.write_bytes(data[: len(data) // 2])
    return p, "truncated or corrupt", "cut.nii.gz"


def _relabelled(dev, tmp, uid, name):
    ds = pydicom.dcmread(dev / "dicom/pydicom/CT_small.dcm")
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = uid
    p = tmp / name
    ds.save_as(p)
    return p


def _jpeg2000_part2(dev, tmp):
    p = _relabelled(dev, tmp, "1.2.840.10008.1.2.4.92", "j2k_multicomponent.dcm")
    return p, "no codec for transfer syntax JPEG 2000 Part 2 Multi-component", p.name


def _private_syntax(dev, tmp):
    p = _relabelled(dev, tmp, "1.2.826.0.1.3680043.9.9999.1", "private_ts.dcm")
    return p, "no codec for transfer syntax 1.2.826.0.1.3680043.9.9999.1", p.name


CASES = {f.__name__.lstrip("_"): f for f in (
    _missing, _empty_folder, _no_dicom_in_folder, _neither, _truncated_dicom, _truncated_header,
    _series_with_a_cut_header, _rt_struct_in_the_series,
    _no_pixel_data, _sizes_differ, _duplicate_positions, _absurd_frame_count, _nan_nifti, _truncated_nifti,
    _jpeg2000_part2, _private_syntax)}


@pytest.fixture(params=sorted(CASES))
def bad_input(request, dev_data, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    return CASES[request.param](dev_data, src)


def test_api_raises_one_line_naming_the_file(bad_input):
    path, problem, name = bad_input
    with pytest.raises(MedvaeError) as err:
        load_scan(path)
    msg = str(err.value)
    assert problem in msg and name in msg and "\n" not in msg


def test_cli_info_exit_2_one_line(bad_input, capsys, tmp_path):
    path, problem, name = bad_input
    before = sorted(p for p in tmp_path.rglob("*"))
    assert main(["info", str(path)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("medvae info: error: ") and name in lines[0] and problem in lines[0]
    assert "Traceback" not in err and out == ""
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("slope, needle", [("0", "RescaleSlope is 0"), ("nan", "RescaleSlope is nan: not a finite")])
def test_a_zero_or_nan_slope_is_refused_by_the_file_and_info_says_why(dev_data, tmp_path, capsys, slope, needle):
    # pydicom maps every pixel of a zero slope to the intercept: a constant slice, restored without a word
    folder, dss, names = _series_files(dev_data, tmp_path)
    with warnings.catch_warnings():  # pydicom warns about 'nan' as a DS value: that is the point
        warnings.simplefilter("ignore", UserWarning)
        dss[2].RescaleSlope = slope
        for ds, name in zip(dss, names):
            ds.save_as(folder / name)
    with pytest.raises(MedvaeError, match=f"{names[2]}: {needle}"):
        load_scan(folder)
    assert main(["info", str(folder)]) == 0
    assert f"restorable   no: {needle}" in capsys.readouterr().out
