"""``medvae corrupt`` on a real NIfTI scan: outputs, geometry, sidecar, reproducibility, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medvae.cli import main


@pytest.fixture(scope="module")
def src(real_scans) -> Path:
    """A small real MR NIfTI volume (dev 64 x 64 x 35, or the samples' 128 x 96 x 24)."""
    return real_scans.mr_small


def _load(path):
    import nibabel as nib

    img = nib.load(str(path))
    return np.asarray(img.get_fdata(dtype=np.float32)), img.affine


def test_corrupt_writes_output_mask_and_sidecar(src, tmp_path, capsys):
    out = tmp_path / "noisy.nii.gz"
    assert main(["corrupt", str(src), str(out), "--recipe", "mixed", "--seed", "7"]) == 0
    mask_p, side_p = tmp_path / "noisy_mask.nii.gz", tmp_path / "noisy.json"
    assert out.exists() and mask_p.exists() and side_p.exists()
    clean, aff = _load(src)
    noisy, aff_out = _load(out)
    mask, aff_mask = _load(mask_p)
    assert noisy.shape == clean.shape == mask.shape
    np.testing.assert_array_equal(aff_out, aff)
    np.testing.assert_array_equal(aff_mask, aff)
    assert set(np.unique(mask)) <= {0.0, 1.0} and mask.any()
    assert not np.allclose(noisy, clean)
    side = json.loads(side_p.read_text())
    assert side["recipe"]["name"] == "mixed" and side["seed"] == 7 and side["mode"] == "slices"
    assert len(side["records"]) == clean.shape[2] and side["modality"] == "MR"
    assert "wrote" in capsys.readouterr().out

    # replaying the sidecar reproduces every slice
    from medvae.corruption import replay
    from medvae.intensity import denormalize, normalize

    window = tuple(side["intensity_window"])
    x = normalize(clean, window)
    for rec in side["records"][:5]:
        k = rec["slice"]
        y, m = replay(x[:, :, k][None], rec)
        np.testing.assert_allclose(denormalize(y[0], window), noisy[:, :, k], rtol=1e-6, atol=1e-3)
        np.testing.assert_array_equal(m[0], mask[:, :, k] > 0)

    # same seed -> identical files; another seed -> different
    out2 = tmp_path / "again.nii.gz"
    assert main(["corrupt", str(src), str(out2), "--recipe", "mixed", "--seed", "7"]) == 0
    np.testing.assert_array_equal(_load(out2)[0], noisy)
    np.testing.assert_array_equal(_load(tmp_path / "again_mask.nii.gz")[0], mask)
    out3 = tmp_path / "other.nii.gz"
    assert main(["corrupt", str(src), str(out3), "--recipe", "mixed", "--seed", "8"]) == 0
    assert not np.array_equal(_load(out3)[0], noisy)


def test_corrupt_volume_recipe_and_custom_mask_path(src, tmp_path):
    out, mask_p = tmp_path / "gaps.nii", tmp_path / "m" / "holes.nii.gz"
    mask_p.parent.mkdir()
    assert main(["corrupt", str(src), str(out), "--recipe", "missing_slices", "--seed", "1",
                 "--mask-output", str(mask_p)]) == 0
    mask = _load(mask_p)[0]
    per_slice = mask.reshape(-1, mask.shape[2]).max(0)
    assert 0.05 <= per_slice.mean() <= 0.2
    assert json.loads((tmp_path / "gaps.json").read_text())["mode"] == "volume"


def test_corrupt_errors_are_one_line_exit_2(src, tmp_path, capsys):
    out = tmp_path / "o.nii.gz"
    assert main(["corrupt", str(src), str(out), "--recipe", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err and err.count("\n") == 1
    assert main(["corrupt", str(src), str(out), "--recipe", "gaussian"]) == 0
    assert main(["corrupt", str(src), str(out), "--recipe", "gaussian", "--seed", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["corrupt", str(src), str(out), "--recipe", "gaussian", "--seed", "1", "--overwrite"]) == 0
    foreign = tmp_path / "foreign.nii.gz"
    foreign.write_bytes(b"x")  # not written by medvae: kept even with --overwrite
    capsys.readouterr()
    assert main(["corrupt", str(src), str(foreign), "--recipe", "gaussian", "--overwrite"]) == 2
    assert foreign.read_bytes() == b"x" and capsys.readouterr().err.count("\n") == 1
    assert main(["corrupt", str(tmp_path / "missing.nii.gz"), str(tmp_path / "x.nii.gz"),
                 "--recipe", "gaussian"]) == 2


def test_corrupt_scan_refuses_to_overwrite_its_input(src, copy_into, tmp_path):
    from medvae.corruption import corrupt_scan
    from medvae.errors import MedvaeError

    scan = copy_into(src)
    before = scan.read_bytes()
    with pytest.raises(MedvaeError, match="overwrite the input"):
        corrupt_scan(scan, scan, recipe="gaussian", overwrite=True)
    with pytest.raises(MedvaeError, match="overwrite the input"):  # a folder output around the input
        corrupt_scan(scan, tmp_path, recipe="gaussian", mask_path=tmp_path.parent / "m.nii.gz", overwrite=True)
    assert scan.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [scan.name]  # nothing else written


def test_corrupt_help_lists_the_packaged_recipes(capsys):
    with pytest.raises(SystemExit):
        main(["corrupt", "--help"])
    out = capsys.readouterr().out
    assert "gaussian" in out and "lowdose_ct" in out and "(none found)" not in out


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
def test_voxels_outside_the_mask_come_back_exactly(dev_data, tmp_path, name):
    # they once went through the window and a fitted rescale: 14,912 of 14,913 CT_small voxels moved
    from medvae.io import load_scan

    src = dev_data / "dicom/pydicom" / name
    out = tmp_path / "holes"
    assert main(["corrupt", str(src), str(out), "--recipe", "boxes", "--seed", "3"]) == 0
    before, after = load_scan(src).array, load_scan(out).array
    mask = load_scan(tmp_path / "holes_mask.nii.gz").array > 0.5
    assert 0 < mask.mean() < 0.5
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert not np.array_equal(after[mask], before[mask])
