"""`medvae info` and `medvae samples` through `medvae.cli.main`."""
from __future__ import annotations

import shutil

import pytest

from medvae.cli import main


def _info(capsys, *argv):
    code = main(["info", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def _field(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.split(None, 1)[0] == name:
            return line.split(None, 1)[1]
    raise AssertionError(f"no {name!r} line in:\n{out}")


def test_info_dicom_series(dev_data, dev_expect, capsys):
    head = dev_expect.ct_head  # dev: 256 x 256 x 108, 0.957 x 0.957 x 1.5 mm, -1024..2986 HU
    code, out, err = _info(capsys, dev_data / "dicom/series_ct_head")
    assert code == 0 and err == ""
    assert _field(out, "format").startswith(f"DICOM ({head.n_slices} files)")
    assert head.series_uid in _field(out, "series") and head.description in out
    assert _field(out, "modality") == "CT"
    assert _field(out, "shape").startswith(" x ".join(map(str, head.shape)))
    assert _field(out, "slices") == str(head.n_slices)
    assert _field(out, "spacing") == head.spacing_text
    assert _field(out, "orientation").startswith(head.dicom_orientation)
    low, high = head.value_range
    assert _field(out, "values") == f"min {low:.0f}, max {high:.0f} HU"


def test_info_names_a_missing_slice_and_a_gantry_tilt_beside_the_mean_step(dev_data, dev_expect, tmp_path, capsys):
    # the spacing line gave the mean step alone: a missing slice or a tilt showed only in a log line, or nowhere
    import numpy as np
    import pydicom

    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:12]
    gap, tilt = tmp_path / "gap", tmp_path / "tilt"
    gap.mkdir(), tilt.mkdir()
    dz = dev_expect.ct_head.spacing[2]
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i != 5:
            ds.save_as(gap / f.name)
        p = [float(v) for v in ds.ImagePositionPatient]
        p[1] += p[2] * np.tan(np.radians(20))  # sheared along Y: a 20-degree gantry tilt
        ds.ImagePositionPatient = p
        ds.save_as(tilt / f.name)
    code, out, _ = _info(capsys, gap)
    step = float(_field(out, "spacing").split(" x ")[2].split()[0])
    assert code == 0 and _field(out, "spacing").endswith(
        f"mm  (slice gaps {dz:.4g} to {2 * dz:.4g} mm, the mean shown: a missing slice or uneven spacing)"), out
    assert step == pytest.approx(11 * dz / 10, abs=1e-3)  # 11 slices over 11 gaps' length
    code, out, _ = _info(capsys, tilt)
    assert code == 0 and _field(out, "spacing").endswith(
        f"mm  (slices step at 20.0 degrees to their plane's normal (gantry tilt): {dz:.4g} mm apart)"), out


def test_info_nifti_4d_and_volume(dev_data, capsys):
    path = dev_data / "nifti/nibabel_example4d.nii.gz"
    code, out, _ = _info(capsys, path)
    assert code == 0 and _field(out, "format") == "NIfTI"
    assert _field(out, "volumes").startswith("2 (showing volume 0")
    assert _field(out, "shape").startswith("128 x 96 x 24") and _field(out, "orientation").startswith("LAS")
    code, out1, _ = _info(capsys, path, "--volume", "1")
    assert code == 0 and "showing volume 1" in out1
    code, out, err = _info(capsys, path, "--volume", "5")
    assert code == 2 and "2 volume(s)" in err and len(err.strip().splitlines()) == 1


def test_info_multiframe(dev_data, capsys):
    code, out, _ = _info(capsys, dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    assert code == 0
    assert _field(out, "shape").startswith("512 x 512 x 2") and _field(out, "slices") == "2"
    assert _field(out, "spacing") == "0.3887 x 0.3887 x 10 mm"
    # RescaleType US, but a cerebral blood flow map (FrameType PERFUSION RCBF, real-world values in
    # ml/100ml/s): it was called HU
    assert _field(out, "values") == "min -1024, max 172 (real-world values in ml/100ml/s, not HU)"


def test_info_does_not_call_a_ct_map_of_other_units_hu(dev_data, tmp_path, capsys):
    import pydicom

    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    ds.RescaleType = "MGML"  # an iodine map's mg/ml
    ds.save_as(tmp_path / "iodine.dcm")
    code, out, _ = _info(capsys, tmp_path / "iodine.dcm")
    assert code == 0 and _field(out, "values").endswith(" (RescaleType MGML: values in MGML, not HU)")
    ds.RescaleType = "US"
    ds.ImageType = ["DERIVED", "PRIMARY", "PERFUSION", "MTT"]
    ds.save_as(tmp_path / "mtt.dcm")
    code, out, _ = _info(capsys, tmp_path / "mtt.dcm")
    assert code == 0 and _field(out, "values").endswith(" (ImageType PERFUSION MTT: a perfusion map, not HU)")
    # the dynamic frames of a perfusion study are HU (PERFUSION alone names the acquisition), and so is
    # a value mapping in UCUM's Hounsfield unit
    from pydicom.dataset import Dataset

    ds.ImageType = ["ORIGINAL", "PRIMARY", "PERFUSION", "NONE"]
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "[hnsf'U]", "UCUM", "Hounsfield unit"
    mapping = Dataset()
    mapping.MeasurementUnitsCodeSequence = [unit]
    ds.RealWorldValueMappingSequence = [mapping]
    ds.save_as(tmp_path / "dynamic.dcm")
    code, out, _ = _info(capsys, tmp_path / "dynamic.dcm")
    assert code == 0 and _field(out, "values").endswith(" HU") and "not HU" not in out


def test_info_several_series_lists_them(dev_data, dev_expect, tmp_path, capsys):
    uid = dev_expect.ct_head.series_uid
    folder = tmp_path / "mixed"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "mr.dcm").write_bytes((dev_data / "dicom/pydicom/MR_small.dcm").read_bytes())
    code, out, err = _info(capsys, folder)
    assert code == 2
    assert out.startswith("2 series in") and uid in out and "2 slices" in out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--series" in lines[0] and "mixed" in lines[0]
    code, out, err = _info(capsys, folder, "--series", uid)
    assert code == 0 and _field(out, "slices") == "2"


def test_samples_command(tmp_path, capsys):
    assert main(["samples", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "ct_series" in out and "mr.nii.gz" in out
    assert main(["info", str(tmp_path / "s" / "ct_series")]) == 0
    from medvae.io.samples import CT_SOURCES

    assert f"DICOM ({len(CT_SOURCES)} files)" in capsys.readouterr().out  # one file per source slice
    assert main(["samples", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "already exists" in err


def test_samples_without_a_decoder_for_a_source_is_one_line(tmp_path, capsys, monkeypatch):
    """A source slice whose codec is not installed (JPEG 2000 without pylibjpeg) gave a 32-line traceback."""
    import pydicom.pixels

    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg-openjpeg"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda ts: Missing())
    assert main(["samples", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no codec installed for transfer syntax" in err and "pylibjpeg-openjpeg" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv", [["info", "--help"], ["samples", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_options_that_do_not_apply(dev_data, capsys):
    code, _, err = _info(capsys, dev_data / "nifti/heudiconv_axasc35.nii.gz", "--series", "1.2.3")
    assert code == 2 and "--series applies to DICOM" in err
    code, _, err = _info(capsys, dev_data / "dicom/pydicom/CT_small.dcm", "--volume", "1")
    assert code == 2 and "--volume applies to 4-D NIfTI" in err and "CT_small.dcm" in err


def test_devices_and_fractions_outside_what_medvae_supports_are_one_line_errors(dev_data, tmp_path, capsys):
    from medvae.errors import MedvaeError
    from medvae.runtime import pick_device

    for name, needle in (("mps", "device 'mps' is not supported"), ("gpu", "unknown device 'gpu'")):
        with pytest.raises(MedvaeError, match=needle):
            pick_device(name)
    assert main(["restore", str(dev_data / "dicom/pydicom/CT_small.dcm"), str(tmp_path / "r"), "--device", "mps"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("medvae restore: error: device 'mps' is not supported (use auto, cpu, cuda "
                                            "or cuda:N)") and not (tmp_path / "r").exists()
    with pytest.raises(SystemExit) as exc:
        main(["prepare", str(tmp_path / "m.csv"), str(tmp_path / "store"), "--val-fraction", "7"])
    assert exc.value.code == 2 and "--val-fraction: must be a number in [0, 1], not '7'" in capsys.readouterr().err


# ------------------------------------------- objects with no grayscale image: described, not restored

def _testdata(name: str):
    import pydicom.data

    path = pydicom.data.get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return path


def _rgb_ct(tmp_path, dev_data):
    """A CT Image Storage object holding a colour image (CT_small's header, SC_ybr's pixels)."""
    import pydicom

    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    ybr = pydicom.dcmread(_testdata("SC_ybr_full_422_uncompressed.dcm"))
    ds.set_pixel_data(ybr.pixel_array, "RGB", 8)  # pydicom converts YBR to RGB
    ds.save_as(tmp_path / "rgb_ct.dcm")
    return tmp_path / "rgb_ct.dcm"


def _with_preamble(tmp_path, name):
    """pydicom's ``name`` as a DICOM Part 10 file (rtstruct.dcm has no preamble, which medvae requires)."""
    import pydicom

    ds = pydicom.dcmread(_testdata(name), force=True)
    ds.save_as(tmp_path / name, enforce_file_format=True)
    return tmp_path / name


# name, how to get the file, SOP class, modality, (shape, photometric) or None for no image, reason
NOT_IMAGES = [
    ("SC_rgb.dcm", lambda tmp, dev: _testdata("SC_rgb.dcm"), "Secondary Capture Image Storage", "OT",
     ("100 x 100 x 1", "RGB, 3 samples per pixel"), "Secondary Capture Image Storage"),
    ("SC_ybr_full_422_uncompressed.dcm", lambda tmp, dev: _testdata("SC_ybr_full_422_uncompressed.dcm"),
     "Secondary Capture Image Storage", "OT", ("100 x 100 x 1", "YBR_FULL_422, 3 samples per pixel"),
     "Secondary Capture Image Storage"),
    ("rgb_ct.dcm", _rgb_ct, "CT Image Storage", "CT", ("100 x 100 x 1", "RGB, 3 samples per pixel"),
     "PhotometricInterpretation RGB in a CT Image Storage object is not restored"),
    ("test-SR.dcm", lambda tmp, dev: _testdata("test-SR.dcm"), "Comprehensive SR Storage", "SR", None,
     "Comprehensive SR Storage"),
    ("rtstruct.dcm", lambda tmp, dev: _with_preamble(tmp, "rtstruct.dcm"), "RT Structure Set Storage",
     "RTSTRUCT", None, "RT Structure Set Storage"),
]


@pytest.mark.parametrize("name, make, sop_name, modality, image, reason", NOT_IMAGES,
                         ids=[case[0] for case in NOT_IMAGES])
def test_info_describes_reports_structure_sets_and_colour_images_that_restore_refuses(
        dev_data, tmp_path, capsys, name, make, sop_name, modality, image, reason):
    """``info`` exited 2 on these ("colour images are not supported", "no pixel data in this DICOM file")
    where its docstring promised a ``restorable  no`` line."""
    import pydicom

    src = make(tmp_path, dev_data)
    header = pydicom.dcmread(src, stop_before_pixels=True)
    code, out, err = _info(capsys, src)
    assert code == 0 and err == "", err
    assert _field(out, "path") == str(src) and _field(out, "format") == "DICOM (1 file)"
    assert _field(out, "series").split()[0] == header.SeriesInstanceUID
    assert _field(out, "object") == f"{sop_name} ({header.SOPClassUID})"
    assert _field(out, "modality") == modality
    if image is None:
        assert _field(out, "pixels") == "none: not an image (no Rows and Columns)"
        assert "shape" not in out and "values" not in out
    else:
        assert _field(out, "shape") == f"{image[0]}  (X, Y, Z)" and _field(out, "photometric") == image[1]
    restorable = _field(out, "restorable")
    assert restorable.startswith("no: ") and reason in restorable
    # restore still refuses it, in one line naming the file, and writes nothing
    outdir = tmp_path / "outputs"
    outdir.mkdir()
    assert main(["restore", str(src), str(outdir / "restored")]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and reason in lines[0] and str(src) in lines[0], err
    assert list(outdir.iterdir()) == []


def test_info_describes_a_multiframe_colour_image_and_a_colour_series(tmp_path, capsys):
    import pydicom

    code, out, _ = _info(capsys, _testdata("SC_rgb_2frame.dcm"))
    assert code == 0 and _field(out, "shape") == "100 x 100 x 2  (X, Y, Z)"
    folder = tmp_path / "colour"  # two colour objects of pydicom's that share one series
    folder.mkdir()
    for name in ("SC_rgb_small_odd.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        shutil.copy(_testdata(name), folder / name)
    assert len({pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in folder.iterdir()}) == 1
    code, out, err = _info(capsys, folder)
    assert code == 0 and err == "" and _field(out, "format") == "DICOM (2 files)"
    assert _field(out, "shape") == "images of different sizes (3 x 3, 100 x 100), 2 frames in all"
    assert _field(out, "photometric") == "RGB, 3 samples per pixel; YBR_FULL_422, 3 samples per pixel"
    assert _field(out, "restorable").startswith("no: Secondary Capture Image Storage")


def test_info_describes_a_multiframe_rt_dose_as_restore_refuses_it(tmp_path, capsys):
    """``info`` exited 2 on pydicom's rtdose.dcm ("duplicate frame positions") where ``restore`` names
    the object: what it is comes before its frame geometry."""
    src = _testdata("rtdose.dcm")
    code, out, err = _info(capsys, src)
    assert code == 0 and err == "", err
    assert _field(out, "object").startswith("RT Dose Storage") and _field(out, "modality") == "RTDOSE"
    assert _field(out, "shape") == "10 x 10 x 15  (X, Y, Z)"
    assert _field(out, "volume").startswith("none: duplicate frame positions")
    assert _field(out, "restorable").startswith("no: RT Dose Storage")
    assert main(["restore", str(src), str(tmp_path / "restored")]) == 2
    assert "RT Dose Storage" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_info_says_a_guessed_modality_once(dev_data, capsys):
    """It printed "MR (guessed: guessed from the values: ...)"."""
    code, out, _ = _info(capsys, dev_data / "nifti/heudiconv_axasc35.nii.gz")
    assert code == 0
    assert _field(out, "modality").startswith("MR (guessed from the values: minimum ")
    assert out.count("guessed") == 1


def test_info_names_medvae_maps_instead_of_guessing_a_modality(dev_data, tmp_path, capsys):
    """A CT's uncertainty map (std, minimum 0) was described as an MR image."""
    import numpy as np

    from medvae.io import load_scan, save_scan

    ct = load_scan(dev_data / "dicom/series_ct_head")
    std = np.abs(ct.array[:, :, :2] - ct.array[:, :, :2].mean()).astype(np.float32)
    nifti = load_scan(dev_data / "nifti/invesalius_cranium_ct.nii.gz")
    for description, content in (("medvae uncertainty (std)", "a medvae uncertainty map"),
                                 ("medvae corrupt mask boxes (1 = corrupted)", "a medvae mask")):
        values = std if "uncertainty" in description else (std > std.mean()).astype(np.float32)
        pad = np.zeros(nifti.array.shape, np.float32)
        pad[:, :, :2] = values[: pad.shape[0], : pad.shape[1]]
        out = save_scan(nifti, pad, tmp_path / f"{description.split()[1]}.nii.gz", description=description)
        code, out_text, _ = _info(capsys, out)
        assert code == 0 and _field(out_text, "content").startswith(content)
        assert _field(out_text, "modality").startswith("unknown (not guessed")
        assert not _field(out_text, "values").endswith("HU")
    # a DICOM mask series keeps the source's Modality CT, but its 0/1 values are not HU
    mask = (ct.array > 0).astype(np.float32)
    out = save_scan(ct, mask, tmp_path / "mask_series", description="medvae corrupt mask boxes (1 = corrupted)")
    code, out_text, _ = _info(capsys, out)
    assert code == 0 and _field(out_text, "content") == "a medvae mask: 1 = corrupted"
    assert _field(out_text, "modality") == "CT" and _field(out_text, "values") == "min 0, max 1"


def test_a_mask_of_the_sample_series_is_named_a_mask(sample_paths, tmp_path, capsys):
    """The sample series' description starts with "medvae sample: ...", so its corrupted copy's mask was
    taken for a medvae restoration: info called it a restorable CT in HU, numbered it as a medvae chain."""
    import pydicom

    src = sample_paths["ct_series"]
    assert main(["corrupt", str(src), str(tmp_path / "boxes"), "--recipe", "boxes",
                 "--mask-output", str(tmp_path / "mask")]) == 0
    capsys.readouterr()
    code, out_text, _ = _info(capsys, tmp_path / "mask")
    assert code == 0 and _field(out_text, "content") == "a medvae mask: 1 = corrupted"
    number = int(pydicom.dcmread(next(iter(sorted(src.glob("*.dcm"))))).SeriesNumber)
    first = sorted((tmp_path / "mask").rglob("*.dcm"))[0]
    assert int(pydicom.dcmread(first).SeriesNumber) == number + 4000


def test_info_gives_the_spacing_in_the_nifti_header_unit(dev_data, tmp_path, capsys):
    import nibabel as nib

    img = nib.load(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    micro = nib.Nifti1Image(img.get_fdata(dtype="float32"), img.affine * [[1000], [1000], [1000], [1]])
    micro.header.set_xyzt_units("micron")
    nib.save(micro, tmp_path / "micro.nii.gz")
    code, out, _ = _info(capsys, tmp_path / "micro.nii.gz")
    zooms = img.header.get_zooms()[:3]
    assert code == 0
    assert _field(out, "spacing") == " x ".join(f"{z:.4g}" for z in zooms) + " mm (the header's unit: micrometres)"


def test_control_characters_in_a_description_never_reach_the_terminal(dev_data, tmp_path, capsys):
    """An escape code in SeriesDescription cleared the screen and faked output lines (info, errors)."""
    import pydicom

    hostile = "HEAD\x1b[2J\x1b[31mPWN\x07\r\nrestorable  yes"
    folder = tmp_path / "series"
    folder.mkdir()
    for k, uid in enumerate(("1.2.3", "1.2.4")):
        ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
        ds.SeriesDescription, ds.SeriesInstanceUID = hostile, uid
        ds.save_as(folder / f"{k}.dcm")
    code, out, _ = _info(capsys, folder / "0.dcm")
    assert code == 0 and "\x1b" not in out and "\x07" not in out and "\r" not in out
    assert _field(out, "series") == "1.2.3 'HEAD [2J [31mPWN restorable yes'" and out.count("restorable") == 2
    code, _, err = _info(capsys, folder)  # two series: the error lists them
    assert code == 2 and "\x1b" not in err and len(err.strip().splitlines()) == 1


def test_info_describes_a_model_file_as_restore_reads_it(dev_data, tmp_path, capsys):
    """``info`` on a model: what it restores and how far its uncertainty map is calibrated, from the
    checkpoint itself (weights_only); a training checkpoint's data paths (which can name a patient) are
    never printed."""
    import hashlib

    import torch

    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, atomic_torch_save, checkpoint_dict, read_checkpoint
    from medvae.models.vae import MaskedVAE, VAEConfig

    code, out, err = _info(capsys, "default")
    cal = read_checkpoint(DEFAULT_WEIGHTS)["meta"]["calibration"]
    assert code == 0 and err == "" and _field(out, "path") == str(DEFAULT_WEIGHTS)
    assert _field(out, "sha256") == hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()
    assert _field(out, "network").startswith("2-D masked VAE, channels 16 32 64 96, latent 8")
    assert _field(out, "restores").startswith("yes")
    assert (f"noise {100 * cal['coverage_2std_noise']:.1f} %, holes {100 * cal['coverage_2std_holes']:.1f} %"
            in _field(out, "uncertainty"))
    # a 3-D model, uncalibrated, in a training checkpoint whose config names the patient
    model = MaskedVAE(VAEConfig(spatial_dims=3, channels=(4, 8), latent_channels=2, prefill="none"))
    ck = checkpoint_dict(model, IntensityPolicy(), meta={"hole_radius": "big"}, optimizer={}, scheduler={}, epoch=2,
                         step=10, best=1.0, config={"data": {"paths": ["/scans/DOE_JANE_PID123456"]}})
    atomic_torch_save(ck, tmp_path / "last.pt")
    code, out, err = _info(capsys, tmp_path / "last.pt")
    assert code == 0 and "DOE_JANE" not in out
    assert _field(out, "format").startswith("medvae training checkpoint (resumable)")
    assert _field(out, "restores") == "no: this model restores 3-D patches; slice restoration needs spatial_dims 2"
    assert _field(out, "hole") == "radius  broken: the model's meta['hole_radius'] = 'big' is not a positive number " \
                                  "of pixels"
    assert _field(out, "uncertainty") == "not calibrated: the map is the raw posterior std"
    # a model restore refuses to read is refused here too, in one line
    ck = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    ck["meta"]["calibration"]["std_scale_noise"] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    code, out, err = _info(capsys, tmp_path / "nan.pt")
    assert code == 2 and err.count("\n") == 1 and "nan.pt: the model's uncertainty calibration is broken" in err
    code, out, err = _info(capsys, "default", "--volume", "1")
    assert code == 2 and "--series and --volume describe scans, not a model file" in err
    # a weight restore reads as a number though stored as text; a DICOM named .pt is a scan; an MLflow
    # model folder is its medvae.pt
    ck = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    ck["meta"]["blend"]["weight_noise_ct"] = "0.5"
    torch.save(ck, tmp_path / "text.pt")
    code, out, err = _info(capsys, tmp_path / "text.pt")
    assert code == 0 and "weight_noise_ct 0.5" in _field(out, "blend"), err
    shutil.copy(dev_data / "dicom/pydicom/CT_small.dcm", tmp_path / "scan.pt")
    code, out, err = _info(capsys, tmp_path / "scan.pt")
    assert code == 0 and _field(out, "format") == "DICOM (1 file)"
    (tmp_path / "mlmodel" / "extra_files").mkdir(parents=True)
    shutil.copy(DEFAULT_WEIGHTS, tmp_path / "mlmodel" / "extra_files" / "medvae.pt")
    code, out, err = _info(capsys, tmp_path / "mlmodel")
    assert code == 0 and _field(out, "path") == str(tmp_path / "mlmodel" / "extra_files" / "medvae.pt")


def test_info_into_a_pipe_whose_reader_has_gone_exits_quietly(dev_data):
    import subprocess
    import sys

    # `medvae info X | head -1`: it printed "error: cannot write the output, Broken pipe" and exited 2
    p = subprocess.Popen([sys.executable, "-m", "medvae", "info", str(dev_data / "dicom/pydicom/CT_small.dcm")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # before it writes: it is still importing
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and err == ""
