"""Bad input: each case is one MedvaeError line naming the file, through the API and `medvae info`."""
from __future__ import annotations

import warnings
from pathlib import Path

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


def _series_with_its_last_file_cut(dev, tmp, size):
    folder, names = _written_series(dev, tmp)
    last = folder / names[-1]
    last.write_bytes(last.read_bytes()[:size])
    return folder, last.name


def _series_with_a_cut_header(dev, tmp):
    # pydicom reads it without complaint: it once became a second, "unknown" series, and choosing the
    # real one with --series silently dropped the slice
    folder, name = _series_with_its_last_file_cut(dev, tmp, 400)
    return folder, "truncated or corrupt", name


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


def _written_series(dev, tmp, edit=None):
    """Three slices of the CT head series written to ``tmp/series``, after ``edit(datasets)``."""
    folder, dss, names = _series_files(dev, tmp)
    if edit is not None:
        edit(dss)
    for ds, name in zip(dss, names):
        ds.save_as(folder / name)
    return folder, names


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


def _ct_small_with(dev, tmp, name, **tags):
    """pydicom's CT_small with some tags set, saved as ``tmp/name``."""
    ds = pydicom.dcmread(dev / "dicom/pydicom/CT_small.dcm")
    for tag, value in tags.items():
        setattr(ds, tag, value)
    ds.save_as(tmp / name)
    return tmp / name


def _absurd_frame_count(dev, tmp):
    # NumberOfFrames 1e6 on a 39 KB file: 90 s and 1 GB of per-frame work before a misleading error
    p = _ct_small_with(dev, tmp, "frames.dcm", NumberOfFrames=1_000_000)
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


def _series_cut_before_its_sop_class(dev, tmp):
    # cut behind its DICM marker: an "unknown" series of its own, and --series dropped it silently
    folder, name = _series_with_its_last_file_cut(dev, tmp, 140)
    return folder, "truncated or corrupt (no SOP class, no series, no image header)", name


def _more_pixels_than_the_header_says(dev, tmp):
    # a traceback: "cannot reshape array of size 16384 into shape (1,64,128)"
    p = _ct_small_with(dev, tmp, "rows.dcm", Rows=64)
    return p, "the pixel data holds 16384 values, but the header's 1 frame(s) of 64 x 128", "rows.dcm"


def _one_slice_without_a_position(dev, tmp):
    # the series fell back to file order and SliceThickness, reversed against the others' positions
    folder, names = _written_series(dev, tmp, lambda dss: delattr(dss[1], "ImagePositionPatient"))
    return folder, "has no ImagePositionPatient, while 2 other slices of the series have one", names[1]


def _one_slice_without_pixel_spacing(dev, tmp):
    # the first: the error blamed a neighbour's spacing; the last: read without a word
    folder, names = _written_series(dev, tmp, lambda dss: delattr(dss[2], "PixelSpacing"))
    return folder, "has no PixelSpacing, while 2 other slices of the series have one", names[2]


def _compressed_pixel_data_cut_short(dev, tmp):
    # pydicom warns and returns an empty dataset: once blamed on another command replacing the file
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("MR_small_RLE.dcm")).read_bytes()
    p = tmp / "rle_cut.dcm"
    p.write_bytes(data[:-2000])
    return p, "not a readable DICOM file, truncated or corrupt (End of file reached before delimiter", "rle_cut.dcm"


CASES = {f.__name__.lstrip("_"): f for f in (
    _missing, _empty_folder, _no_dicom_in_folder, _neither, _truncated_dicom, _truncated_header,
    _series_with_a_cut_header, _series_cut_before_its_sop_class, _rt_struct_in_the_series,
    _no_pixel_data, _sizes_differ, _duplicate_positions, _absurd_frame_count, _more_pixels_than_the_header_says,
    _one_slice_without_a_position, _one_slice_without_pixel_spacing, _nan_nifti, _truncated_nifti,
    _jpeg2000_part2, _private_syntax, _compressed_pixel_data_cut_short)}


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


@pytest.mark.parametrize("drop, kept", [("RescaleSlope", "RescaleIntercept"), ("RescaleIntercept", "RescaleSlope")])
def test_a_rescale_of_one_tag_alone_is_applied_as_itk_reads_it_and_restored_in_the_same_units(
        dev_data, tmp_path, drop, kept):
    """pydicom's apply_rescale ignores a lone tag, the writer did not: a lone intercept -1024 came back
    1024 HU high from restore, and evaluate scored 15 dB where the intact file gives 47."""
    import SimpleITK as sitk

    from medvae.restore import restore_scan

    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    ds.RescaleSlope = 2
    delattr(ds, drop)
    p = tmp_path / "lone.dcm"
    ds.save_as(p)
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[0].astype(np.float32)  # (rows, cols)
    scan = load_scan(p)
    np.testing.assert_array_equal(scan.array[:, :, 0].T, itk)
    restore_scan(p, tmp_path / "out", ensemble=1)
    back = load_scan(tmp_path / "out").array
    assert abs(float(np.median(back - scan.array))) < 5  # the same units: no 1024 HU shift, no halving


def test_a_big_endian_file_is_restored_as_its_little_endian_twin(dev_data, tmp_path):
    """pydicom's save_as refuses to change the byte order: restore and corrupt ended in a traceback."""
    from pydicom.uid import ExplicitVRBigEndian

    from medvae.restore import restore_scan

    src = dev_data / "dicom/pydicom/CT_small.dcm"
    ds = pydicom.dcmread(src)
    be = tmp_path / "be.dcm"
    pixels = ds.pixel_array
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    for _ in ds.iterall():  # every element read into its value, so that it can be written big endian
        pass
    ds.set_original_encoding(False, False, ds.original_character_set)
    ds.save_as(be, enforce_file_format=True)
    assert pydicom.dcmread(be).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    np.testing.assert_array_equal(load_scan(be).array, load_scan(src).array)
    restore_scan(be, tmp_path / "r_be", ensemble=1)
    restore_scan(src, tmp_path / "r_le", ensemble=1)
    a, b = (pydicom.dcmread(next((tmp_path / d).glob("*.dcm"))) for d in ("r_be", "r_le"))
    np.testing.assert_array_equal(a.pixel_array, b.pixel_array)
    assert a.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (a.ImagePositionPatient, a.PixelSpacing, a.RescaleIntercept) == (b.ImagePositionPatient, b.PixelSpacing,
                                                                          b.RescaleIntercept)


def test_an_enhanced_ct_with_a_rescale_in_some_frames_only_is_refused(dev_data, tmp_path):
    """The frames without one came out in stored values beside frames in HU (1024 apart)."""
    import copy

    ds = pydicom.dcmread(dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    shared = ds.SharedFunctionalGroupsSequence[0]
    pvt = shared.PixelValueTransformationSequence
    del shared.PixelValueTransformationSequence
    ds.PerFrameFunctionalGroupsSequence[1].PixelValueTransformationSequence = copy.deepcopy(pvt)
    p = tmp_path / "partial.dcm"
    ds.save_as(p)
    with pytest.raises(MedvaeError, match=r"partial.dcm: frame 1 has no rescale \(Pixel Value Transformation\), "
                                          r"while 1 other frames have one"):
        load_scan(p)


def test_a_whole_image_without_sop_class_or_series_is_described_not_called_truncated(dev_data, tmp_path, capsys):
    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    for tag in ("SOPClassUID", "SeriesInstanceUID"):
        delattr(ds, tag)
    del ds.file_meta.MediaStorageSOPClassUID
    ds.save_as(tmp_path / "nosop.dcm")
    assert main(["info", str(tmp_path / "nosop.dcm")]) == 0
    assert "restorable   no: no SOP Class UID" in capsys.readouterr().out


@pytest.mark.parametrize("name, size, said", [("IM0", 0, "an empty file"), ("IM2.dcm", 100, "only 100 bytes"),
                                             ("1.2.840.5", 0, "an empty file")])
def test_an_empty_or_cut_off_slice_is_an_error_not_a_shorter_series(dev_data, tmp_path, capsys, name, size, said):
    # a file under 132 bytes has no DICM marker and was left out: an empty end slice shortened the
    # series with exit 0 and no warning at all
    src = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]
    folder = tmp_path / "series"
    folder.mkdir()
    for i, f in enumerate(src):
        (folder / f"IM{i}").write_bytes(f.read_bytes())
    # small, but not named like a slice: still ignored
    (folder / "notes.txt").write_text("export notes")
    (folder / "LOCKFILE").write_bytes(b"")
    (folder / "VERSION").write_bytes(b"1.0\n")
    victim = folder / name
    victim.write_bytes(src[0].read_bytes()[:size])
    if name != "IM0":
        (folder / "IM0").unlink()
    with pytest.raises(MedvaeError, match=f"{said}, too short for a DICOM file") as exc:
        load_scan(folder)
    assert exc.value.path == str(victim)
    assert main(["restore", str(folder), str(tmp_path / "out"), "--ensemble", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and name in err and not (tmp_path / "out").exists()
    victim.unlink()
    assert load_scan(folder).array.shape[2] == 3  # the other small files are no error


def test_an_empty_slice_among_hexadecimal_names_is_an_error(dev_data, tmp_path):
    # PACS exports name slices by hex digits or UUIDs: an empty one shared no digit pattern and was dropped
    src = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]
    folder = tmp_path / "series"
    folder.mkdir()
    for name, f in zip(["EE5F2A1B", "AB12CD34", "0F1E2D3C"], src):
        (folder / name).write_bytes(f.read_bytes())
    for empty in ("D4E5F6A7", "ABCDEFAB"):  # a hexadecimal name need not hold a digit
        (folder / empty).write_bytes(b"")
        with pytest.raises(MedvaeError, match=f"{empty}: an empty file, too short for a DICOM file"):
            load_scan(folder)
        (folder / empty).unlink()
    # slices named by digits alone: a note named by hexadecimal letters (FACE) is no slice of theirs
    digits = tmp_path / "digits"
    digits.mkdir()
    for name, f in zip(["0001", "0002", "0003"], src):
        (digits / name).write_bytes(f.read_bytes())
    (digits / "FACE").write_text("notes")
    assert load_scan(digits).array.shape[2] == 3
    # eight hexadecimal digits are a slice name whether or not a letter is among them
    for old_name, name in zip(["0001", "0002", "0003"], ["12345678", "23456789", "34567890"]):
        (digits / old_name).rename(digits / name)
    (digits / "EE5F2A1B").write_bytes(b"")
    with pytest.raises(MedvaeError, match="EE5F2A1B: an empty file, too short for a DICOM file"):
        load_scan(digits)


def test_a_slice_or_subfolder_that_cannot_be_read_is_an_error_not_a_shorter_series(dev_data, tmp_path, monkeypatch,
                                                                                    capsys):
    # an unreadable file was left out as "no DICM marker", an unreadable subfolder skipped: a 4-slice
    # series was restored as 3 or 2 slices with exit 0 (as root nothing is unreadable: denied here)
    import builtins
    import os
    import shutil

    import medvae.io.dicom

    src = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]
    flat, nested = tmp_path / "flat", tmp_path / "nested"
    for i, f in enumerate(src):
        (flat / f"IM{i}").parent.mkdir(exist_ok=True)
        shutil.copy(f, flat / f"IM{i}")
        (nested / "ab"[i // 2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, nested / "ab"[i // 2] / f.name)
    denied = {str(flat / "IM3"), str(nested / "b")}
    real_open, real_scandir = builtins.open, os.scandir

    def guarded_open(path, *a, **k):
        if str(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    def guarded_scandir(path="."):
        if str(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(medvae.io.dicom, "open", guarded_open, raising=False)
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    with pytest.raises(MedvaeError, match="cannot read this file \\(Permission denied\\): it would be missing") as e:
        load_scan(flat)
    assert str(e.value.path) == str(flat / "IM3")
    with pytest.raises(MedvaeError, match="cannot read this folder \\(Permission denied\\): its slices would") as e:
        load_scan(nested)
    assert str(e.value.path) == str(nested / "b")
    monkeypatch.undo()
    assert load_scan(flat).array.shape[2] == load_scan(nested).array.shape[2] == 4
    (flat / "IM4").symlink_to(tmp_path / "not_fetched.dcm")  # a git-annex file not fetched was left out
    with pytest.raises(MedvaeError, match="a link to a file that is missing: this slice would be missing") as e:
        load_scan(flat)
    assert str(e.value.path) == str(flat / "IM4")
