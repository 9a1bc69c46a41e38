"""Only CT/MR images are restored; derived series are valid DICOM; bad geometry is refused early.

Issue 9, points 3, 5 and 6: RT Dose, SEG and palette files were "restored" and written back
corrupted; enhanced MR output had ImageType SECONDARY (invalid for the IOD); a zero PixelSpacing
was found only after every slice had been computed. The dciodvfy checks run the validator of
Debian's ``dicom3tools`` on the source and on medvae's output and assert that no error is new.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest

from medvae.cli import main
from medvae.errors import MedvaeError
from medvae.io import load_scan

DCIODVFY = shutil.which("dciodvfy")

def _testdata(name: str) -> Path:
    path = pydicom.data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _require_dciodvfy() -> str:
    if DCIODVFY is None:
        if os.environ.get("CI"):
            pytest.fail("dciodvfy (Debian package dicom3tools) is missing in CI; .ci/run installs it")
        pytest.skip("dciodvfy not installed (apt-get install dicom3tools)")
    return DCIODVFY


def _dciodvfy_errors(path: Path) -> set[str]:
    res = subprocess.run([_require_dciodvfy(), str(path)], capture_output=True, text=True,
                         timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    assert any(line.strip() for line in lines), f"dciodvfy said nothing about {path}"
    return {line.strip() for line in lines if line.startswith("Error")}


# ------------------------------------------------------------------ objects that are not images

REFUSED = [
    ("rtdose_1frame.dcm", "RT Dose Storage"),
    ("liver.dcm", "Segmentation Storage"),
    ("examples_palette.dcm", "Ultrasound Image Storage"),
]


@pytest.mark.parametrize("name, sop_name", REFUSED)
def test_restore_refuses_non_image_objects_and_writes_nothing(name, sop_name, tmp_path, capsys):
    src = _testdata(name)
    assert pydicom.uid.UID(pydicom.dcmread(src, stop_before_pixels=True).SOPClassUID).name == sop_name
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    code, out, err = _run(capsys, "restore", src, outdir / "restored")
    _assert_one_line_error(code, err, sop_name, src.name, "not restored")
    assert out == ""
    assert list(outdir.iterdir()) == []  # no output, no claim file, no temporary


@pytest.mark.parametrize("name, sop_name", REFUSED)
def test_load_scan_refuses_before_decoding_but_info_describes(name, sop_name, capsys, monkeypatch):
    from medvae.io import dicom

    src = _testdata(name)
    decoded = []
    real_decode = dicom._decode
    monkeypatch.setattr(dicom, "_decode", lambda ds, path: decoded.append(path) or real_decode(ds, path))
    with pytest.raises(dicom.NotRestorableError) as err:
        load_scan(src)
    assert sop_name in str(err.value) and "\n" not in str(err.value)
    assert decoded == []  # refused from the header, before any pixel was decoded
    code, out, err_text = _run(capsys, "info", src)
    assert code == 0, err_text
    restorable = [line for line in out.splitlines() if line.startswith("restorable")]
    assert len(restorable) == 1 and restorable[0].split(None, 1)[1].startswith("no: ")
    assert sop_name in restorable[0]


def test_corrupt_refuses_rt_dose(tmp_path, capsys):
    src = _testdata("rtdose_1frame.dcm")
    code, _, err = _run(capsys, "corrupt", src, tmp_path / "corrupted", "--recipe", "mixed")
    _assert_one_line_error(code, err, "RT Dose Storage")
    assert not (tmp_path / "corrupted").exists()


def test_siemens_mosaic_is_refused_not_restored_as_one_slice(dev_data, tmp_path, capsys):
    # axasc35.dcm tiles 35 EPI slices of 64x64 into one 384x384 image; restored as one slice, its
    # geometry would be wrong and the network would filter across the tiles
    src = dev_data / "dicom/heudiconv/axasc35.dcm"
    code, out, err = _run(capsys, "restore", src, tmp_path / "restored.nii.gz")
    _assert_one_line_error(code, err, "axasc35.dcm", "Siemens mosaic (35 slices tiled in one image)")
    assert not (tmp_path / "restored.nii.gz").exists()
    code, out, err = _run(capsys, "corrupt", src, tmp_path / "noisy.nii.gz", "--recipe", "rician")
    _assert_one_line_error(code, err, "axasc35.dcm", "convert it to a volume first (dcm2niix, or "
                                                     "nibabel.nicom.dicomwrappers) and give medvae the NIfTI")
    code, out, _ = _run(capsys, "info", src)
    assert code == 0 and "restorable   no: a Siemens mosaic" in out


def test_rgb_ct_is_refused_by_photometric_interpretation(dev_data, tmp_path):
    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.save_as(tmp_path / "palette_ct.dcm")
    with pytest.raises(MedvaeError, match="PhotometricInterpretation PALETTE COLOR in a CT Image "
                                          "Storage object is not restored"):
        load_scan(tmp_path / "palette_ct.dcm")


def test_accepted_classes_load(dev_data):
    for rel, sop in [("pydicom/CT_small.dcm", pydicom.uid.CTImageStorage),
                     ("pydicom/MR_small.dcm", pydicom.uid.MRImageStorage),
                     ("pydicom-data/emri_small.dcm", pydicom.uid.EnhancedMRImageStorage),
                     ("pydicom-data/eCT_Supplemental.dcm", pydicom.uid.EnhancedCTImageStorage)]:
        scan = load_scan(dev_data / "dicom" / rel)
        assert scan.datasets[0].SOPClassUID == sop


# ----------------------------------------------------------------------------------- geometry

def _ct_with(tmp_path: Path, dev_data: Path, name: str, **attrs) -> Path:
    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    for key, value in attrs.items():
        setattr(ds, key, value)
    path = tmp_path / name
    ds.save_as(path)
    return path


@pytest.mark.parametrize("name, attrs, needle", [
    ("zero_spacing.dcm", {"PixelSpacing": ["0", "0"]}, "PixelSpacing is 0\\0"),
    ("negative_spacing.dcm", {"PixelSpacing": ["-0.5", "0.5"]}, "PixelSpacing is -0.5\\0.5"),
    ("flat_orientation.dcm", {"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]},
     "ImageOrientationPatient is 1\\0\\0\\1\\0\\0"),
    ("zero_orientation.dcm", {"ImageOrientationPatient": ["0"] * 6},
     "ImageOrientationPatient is 0\\0\\0\\0\\0\\0"),
])
def test_bad_geometry_is_refused_before_computing(dev_data, tmp_path, capsys, name, attrs, needle):
    src = _ct_with(tmp_path, dev_data, name, **attrs)
    with pytest.raises(MedvaeError) as err:
        load_scan(src)
    msg = str(err.value)
    assert needle in msg and name in msg and "\n" not in msg
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    t0 = time.perf_counter()
    code, _, err_text = _run(capsys, "restore", src, outdir / "restored")
    _assert_one_line_error(code, err_text, needle, name)
    assert list(outdir.iterdir()) == []
    code, out, err_text = _run(capsys, "info", src)
    assert code == 0, err_text
    spacing = next(line for line in out.splitlines() if line.startswith("spacing"))
    orientation = next(line for line in out.splitlines() if line.startswith("orientation"))
    assert spacing.split(None, 1)[1].startswith("invalid: ") and needle in spacing
    assert "undefined" in orientation and "?" not in orientation and " 0 x 0 " not in out
    assert time.perf_counter() - t0 < 60


def test_rg1_uncr_zero_spacing_named_by_info_and_restore(tmp_path, capsys):
    src = _testdata("RG1_UNCR.dcm")
    code, out, err = _run(capsys, "info", src)
    assert code == 0, err
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert fields["spacing"].startswith("invalid: PixelSpacing is 0")
    assert "mm" not in fields["spacing"].split(":")[0] and "??" not in fields["orientation"]
    assert fields["restorable"].startswith("no: Computed Radiography Image Storage")
    code, _, err = _run(capsys, "restore", src, tmp_path / "restored")
    _assert_one_line_error(code, err, "Computed Radiography Image Storage", "RG1_UNCR.dcm")
    assert not (tmp_path / "restored").exists()


def test_missing_spacing_is_said_not_hidden(dev_data, capsys):
    # emri_small has no geometry at all: readable (and restorable: the derived series keeps
    # the source's geometry), but info says what was assumed
    code, out, _ = _run(capsys, "info", dev_data / "dicom/pydicom-data/emri_small.dcm")
    assert code == 0
    fields = {line.split(None, 1)[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert fields["spacing"] == "1 x 1 x 1.2 mm  (no PixelSpacing: 1 mm pixels assumed)"
    assert fields["restorable"] == "yes"


# --------------------------------------------------------------- derived output against dciodvfy

ACCEPTED = [
    ("pydicom/CT_small.dcm", pydicom.uid.CTImageStorage),
    ("pydicom/MR_small.dcm", pydicom.uid.MRImageStorage),
    ("pydicom-data/emri_small.dcm", pydicom.uid.EnhancedMRImageStorage),
    ("pydicom-data/eCT_Supplemental.dcm", pydicom.uid.EnhancedCTImageStorage),
]


@pytest.mark.parametrize("rel, sop_class", ACCEPTED, ids=[Path(r).stem for r, _ in ACCEPTED])
def test_restored_series_has_no_new_dciodvfy_errors(dev_data, tmp_path, capsys, rel, sop_class):
    _require_dciodvfy()
    src = dev_data / "dicom" / rel
    out = tmp_path / "restored"
    code, stdout, err = _run(capsys, "restore", src, out, "--samples", "2")
    assert code == 0, err
    unc = tmp_path / "restored_uncertainty"  # written with rescale "fit"
    before = _dciodvfy_errors(src)
    src_ds = pydicom.dcmread(src, stop_before_pixels=True)
    for folder in (out, unc):
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == 1, folder
        new = _dciodvfy_errors(files[0]) - before
        assert new == set(), (folder, sorted(new))
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert ds.SOPClassUID == sop_class and ds.SeriesInstanceUID != src_ds.SeriesInstanceUID
        if sop_class in (pydicom.uid.EnhancedCTImageStorage, pydicom.uid.EnhancedMRImageStorage):
            assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"] and len(ds.ImageType) == 4
            assert list(ds.ImageType)[2:] == list(src_ds.ImageType)[2:]
            groups = [*(ds.get("SharedFunctionalGroupsSequence") or []),
                      *(ds.get("PerFrameFunctionalGroupsSequence") or [])]
            for item in groups:
                for seq in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
                    for ft in item.get(seq) or []:
                        assert ft.FrameType[0] == "DERIVED"
            if groups:  # rescale only in the Pixel Value Transformation functional group
                assert "RescaleSlope" not in ds and "SourceImageSequence" not in ds
                refs = [item.DerivationImageSequence[0].SourceImageSequence[0]
                        for item in groups if "DerivationImageSequence" in item]
                assert refs and all(r.ReferencedSOPInstanceUID == src_ds.SOPInstanceUID
                                    for r in refs)
                # what made the frames: a restoration is smoothed, the uncertainty map a standard deviation
                meanings = {item.DerivationImageSequence[0].DerivationCodeSequence[0].CodeMeaning
                            for item in groups if "DerivationImageSequence" in item}
                assert meanings == ({"Smoothing"} if folder == out else {"Standard Deviation"})
        else:
            assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src_ds.SOPInstanceUID


@pytest.mark.parametrize("description, meaning", [
    ("medvae corrupt gaussian seed 0", "Pixel by pixel addition"),
    ("medvae corrupt mask boxes (1 = corrupted)", "Segmentation"),
])
def test_enhanced_derived_frames_say_how_they_were_made(dev_data, tmp_path, description, meaning):
    from medvae.io import save_scan

    scan = load_scan(dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    out = save_scan(scan, scan.array.copy(), tmp_path / "out", description=description)
    ds = pydicom.dcmread(next(out.glob("*.dcm")), stop_before_pixels=True)
    groups = [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]
    codes = {i.DerivationImageSequence[0].DerivationCodeSequence[0].CodeMeaning
             for i in groups if "DerivationImageSequence" in i}
    assert codes == {meaning}


def test_enhanced_fit_rescale_goes_into_functional_groups(dev_data, tmp_path):
    from medvae.io import save_scan

    scan = load_scan(dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    std = np.random.default_rng(0).uniform(0, 3, scan.array.shape).astype(np.float32)
    out = save_scan(scan, std, tmp_path / "unc", rescale="fit", description="medvae uncertainty")
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    pvt = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    # the source's real-world value mapping described the old stored values: dropped
    assert "RealWorldValueMappingSequence" in scan.datasets[0].SharedFunctionalGroupsSequence[0]
    assert "RealWorldValueMappingSequence" not in ds.SharedFunctionalGroupsSequence[0]
    slope = float(pvt.RescaleSlope)
    assert 0 < slope < 3 / 30000
    np.testing.assert_allclose(load_scan(out).array, std, atol=slope / 2 + 1e-9)


# ------------------------------------------------------------ info over all pydicom test files

def test_info_over_all_pydicom_test_files(capsys):
    """Every pydicom / pydicom-data test file: a description (exit 0) or one line (exit 2).

    One process, about 20 s for the 154 files here (not marked slow); each file within 60 s.
    A folder with several series (``dicomdirtests``) also lists them on stdout.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sorted(set(pydicom.data.get_testdata_files("*")))
    assert len(files) > 100
    slow, bad = [], []
    for path in files:
        t0 = time.perf_counter()
        try:
            code = main(["info", path])
        except SystemExit as exc:  # argparse never exits for a plain path; count it as bad
            code = f"SystemExit({exc.code})"
        except Exception as exc:  # noqa: BLE001 - the point of this test
            code = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        out, err = capsys.readouterr()
        err_lines = [line for line in err.splitlines() if line.strip()]
        if seconds > 60:
            slow.append((path, round(seconds, 1)))
        if code == 0:
            if not out.startswith("path") or "Traceback" in out + err:
                bad.append((path, code, out[-300:], err[-300:]))
        elif code == 2:
            one_line = len(err_lines) == 1 and err_lines[0].startswith("medvae info: error:")
            listing = out.strip() == "" or (out.split(None, 2)[1:2] == ["series"]
                                            and "choose one with --series" in err)
            if not one_line or "Traceback" in err or not listing:
                bad.append((path, code, out[-300:], err[-300:]))
        else:
            bad.append((path, code, out[-300:], err[-300:]))
    assert slow == []
    assert bad == []
