"""`medvae info` and `medvae samples` through `medvae.cli.main`."""
from __future__ import annotations

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
