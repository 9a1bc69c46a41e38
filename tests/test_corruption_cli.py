"""``medvae corrupt`` on a real NIfTI scan: outputs, geometry, sidecar, reproducibility, errors."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from medvae.cli import main
from medvae.errors import MedvaeError


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
    bad = tmp_path / "bad.yaml"  # named once, at the step's own place (was "bad.yaml: bad.yaml: steps.steps[0]")
    bad.write_text("steps:\n  - transform: gaussian\n    sigma: -0.5\n")
    assert main(["corrupt", str(src), str(out), "--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medvae corrupt: error: {bad}: steps[0] (gaussian): ") and err.count(str(bad)) == 1
    bad.write_text("steps:\n  - include: nope\n")  # the recipe holding the bad include is named
    assert main(["corrupt", str(src), str(out), "--recipe", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"medvae corrupt: error: {bad}: steps[0]: include: unknown recipe 'nope'")
    bad.write_bytes(b"\xff\xfe not text")
    assert main(["corrupt", str(src), str(out), "--recipe", str(bad)]) == 2
    assert capsys.readouterr().err == f"medvae corrupt: error: {bad}: not UTF-8 text (invalid start byte at byte 0)\n"
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


def test_a_mask_inside_the_corrupted_series_folder_is_refused(dev_data, tmp_path, capsys):
    src = dev_data / "dicom/pydicom/CT_small.dcm"
    code = main(["corrupt", str(src), str(tmp_path / "c"), "--recipe", "boxes", "--mask-output", str(tmp_path / "c" / "mask")])
    err = capsys.readouterr().err
    assert code == 2 and f"{tmp_path / 'c' / 'mask'}: an output cannot be written inside another output" in err
    assert list(tmp_path.iterdir()) == []


def test_corrupt_scan_refuses_to_overwrite_its_input(src, copy_into, tmp_path):
    from medvae.corruption import corrupt_scan

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


@pytest.mark.parametrize("name", ["pydicom/CT_small.dcm", "pydicom/MR_small.dcm", "pydicom-data/MR2_UNCR.dcm"])
def test_voxels_outside_the_mask_come_back_exactly(dev_data, tmp_path, name):
    # they once went through the window and a fitted rescale: 14,912 of 14,913 CT_small voxels moved;
    # MR2_UNCR (slope 3.77, intercept 6e-5) was refitted because a fill of 0 lies 6e-5 below its range
    import pydicom

    from medvae.io import load_scan

    src = dev_data / "dicom" / name
    out = tmp_path / "holes"
    assert main(["corrupt", str(src), str(out), "--recipe", "boxes", "--seed", "3"]) == 0
    before, after = load_scan(src).array, load_scan(out).array
    mask = load_scan(tmp_path / "holes_mask.nii.gz").array > 0.5
    assert 0 < mask.mean() < 0.5
    np.testing.assert_array_equal(after[~mask], before[~mask])
    assert not np.array_equal(after[mask], before[mask])
    a, b = pydicom.dcmread(src), pydicom.dcmread(next(out.glob("*.dcm")))
    assert (b.get("RescaleSlope", 1), b.get("RescaleIntercept", 0), b.PixelRepresentation) == (
        a.get("RescaleSlope", 1), a.get("RescaleIntercept", 0), a.PixelRepresentation)


def test_a_series_with_a_missing_slice_gets_its_mask_as_a_dicom_series(dev_data, tmp_path, capsys):
    # the NIfTI mask could not hold the gap, and the error told the user to write a DICOM series,
    # which the output already was
    import pydicom

    from medvae.io import load_scan

    src = tmp_path / "gap"
    src.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:6]:
        (src / f.name).write_bytes(f.read_bytes())
    sorted(src.glob("*.dcm"))[3].unlink()
    out = tmp_path / "holes"
    assert main(["corrupt", str(src), str(out), "--recipe", "boxes"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not evenly spaced" in err and "--mask-output DIR" in err and not out.exists()
    assert main(["corrupt", str(src), str(out), "--recipe", "boxes", "--mask-output", str(tmp_path / "m")]) == 0
    before, after, mask = load_scan(src), load_scan(out), load_scan(tmp_path / "m")
    assert mask.array.shape == before.array.shape and np.allclose(mask.affine, before.affine)
    def positions(folder):
        return sorted(tuple(map(float, pydicom.dcmread(f).ImagePositionPatient)) for f in folder.glob("*.dcm"))

    assert positions(tmp_path / "m") == positions(src) and len(positions(src)) == 5
    m = mask.array > 0.5
    assert 0 < m.mean() < 0.5 and set(np.unique(mask.array)) == {0.0, 1.0}
    np.testing.assert_array_equal(after.array[~m], before.array[~m])


@pytest.mark.parametrize("slope", [2.44, 0.00878])
def test_a_dicom_mask_holds_exact_zeros_and_ones_whatever_the_source_rescale(dev_data, tmp_path, slope):
    # the mask went through the source's rescale: slope 2.44 (Philips MR) stored 1 as 0, an empty mask;
    # a fitted slope with an intercept stored 0 as 0.002, and restore --mask then changed every pixel
    import pydicom

    from medvae.io import load_scan

    ds = pydicom.dcmread(dev_data / "dicom/pydicom/MR_small.dcm")
    ds.RescaleSlope, ds.RescaleIntercept = slope, 220.7 if slope < 1 else 0
    src = tmp_path / "mr.dcm"
    ds.save_as(src)
    assert main(["corrupt", str(src), str(tmp_path / "c"), "--recipe", "boxes", "--seed", "2",
                 "--mask-output", str(tmp_path / "m"), "--modality", "MR"]) == 0
    assert main(["corrupt", str(src), str(tmp_path / "n.nii.gz"), "--recipe", "boxes", "--seed", "2",
                 "--modality", "MR"]) == 0
    dicom_mask = load_scan(tmp_path / "m").array[:, :, 0]
    assert set(np.unique(dicom_mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(dicom_mask, _load(tmp_path / "n_mask.nii.gz")[0][:, :, 0])
    written = pydicom.dcmread(next((tmp_path / "m").glob("*.dcm")))
    assert (float(written.RescaleSlope), float(written.RescaleIntercept)) == (1.0, 0.0)


def test_corrupt_takes_the_volume_of_a_4d_nifti_it_names(dev_data, tmp_path, capsys):
    # it said "choose with --volume N" and had no --volume, as restore and info have
    import nibabel as nib

    src = dev_data / "nifti" / "nibabel_example4d.nii.gz"
    data = np.asarray(nib.load(src).dataobj, dtype=np.float64)
    assert main(["corrupt", str(src), str(tmp_path / "v1.nii.gz"), "--recipe", "boxes", "--volume", "1"]) == 0
    out = np.asarray(nib.load(tmp_path / "v1.nii.gz").dataobj, dtype=np.float64)
    kept = np.asarray(nib.load(tmp_path / "v1_mask.nii.gz").dataobj) == 0
    assert out.shape == data.shape[:3] and kept.any()
    np.testing.assert_allclose(out[kept], data[..., 1][kept], rtol=1e-6)
    assert not np.allclose(out[kept], data[..., 0][kept])
    assert json.loads((tmp_path / "v1.json").read_text())["volume"] == 1
    assert main(["corrupt", str(src), str(tmp_path / "v9.nii.gz"), "--recipe", "boxes", "--volume", "9"]) == 2
    assert "volume 9 does not exist" in capsys.readouterr().err and not (tmp_path / "v9.nii.gz").exists()


def test_ct_padding_outside_the_field_of_view_is_kept_and_left_out_of_the_mask(dev_data, tmp_path):
    # low-dose noise once filled 55,361 of 55,772 padding pixels of 693_UNCR (-3271..-2779 HU) while the
    # output still named -2000 its PixelPaddingValue: viewers showed noise outside the field of view
    import pydicom

    from medvae.io import load_scan

    src = dev_data / "dicom/pydicom-data/693_UNCR.dcm"
    assert main(["corrupt", str(src), str(tmp_path / "ld"), "--recipe", "lowdose_ct", "--seed", "2"]) == 0
    before, after = load_scan(src).array, load_scan(tmp_path / "ld").array
    mask = load_scan(tmp_path / "ld_mask.nii.gz").array > 0.5
    pad = before <= -2000
    assert pad.sum() == 55772 and not mask[pad].any() and mask[~pad].all()
    np.testing.assert_array_equal(after[pad], before[pad])
    assert (after[~pad] != before[~pad]).mean() > 0.9
    ds = pydicom.dcmread(next((tmp_path / "ld").glob("*.dcm")))
    assert int((ds.pixel_array == ds.PixelPaddingValue).sum()) == 55772
    side = json.loads((tmp_path / "ld.json").read_text())
    assert side["ct_padding_kept"] == {"at_or_below_hu": -2000.0, "voxels": 55772}


# --------------------------------------------------------------------------------------------
# physics of corrupt_volume: zero signal for MR magnitude, the scan's pixel size for low-dose CT
# --------------------------------------------------------------------------------------------
def _recipe(tmp_path, name, step):
    p = tmp_path / f"{name}.yaml"
    p.write_text(f"description: {name}\nsteps:\n  - {step}\n")
    from medvae.corruption import load_recipe

    return load_recipe(p)


def test_rician_noise_and_bias_field_act_around_zero_signal_on_mr_without_background(tmp_path):
    # an MR volume with no air: the 0.5 percentile (200) is tissue, not zero signal. Rician noise
    # formed around the window's low end made the floor ~1 sigma brighter instead of E[Rice] - nu
    from scipy.stats import rice

    from medvae.corruption import corrupt_volume
    from medvae.corruption.noise import legendre_field

    nu, bright = 200.0, 1000.0
    vol = np.full((64, 64, 4), nu, np.float32)
    vol[16:48, 16:48] = bright
    floor = vol == nu
    vc = corrupt_volume(vol, _recipe(tmp_path, "ric", "{transform: rician, sigma: 0.1}"), seed=0, modality="MR")
    sigma = 0.1 * (bright - nu)  # the noise is still a fraction of the window's width
    expected = rice.mean(nu / sigma, scale=sigma) - nu  # ~13: nu / sigma = 2.5
    got = float((vc.image - vol)[floor].mean())
    assert got == pytest.approx(expected, abs=0.05 * sigma), (got, expected)  # old code: ~100
    assert vc.policy_window == (nu, bright) and vc.window == (0.0, bright - nu) and vc.origin == "zero_signal"

    vc = corrupt_volume(vol, _recipe(tmp_path, "bias", "{transform: bias_field}"), seed=1, modality="MR")
    (rec,) = vc.records  # one field for the volume: a field drawn per slice banded it
    p = rec["steps"][0]["params"]
    field = np.exp(legendre_field(vol.shape, degree=p["degree"], coefficients=p["coefficients"]))
    np.testing.assert_allclose(vc.image, vol * field, rtol=1e-5)  # it multiplies the signal itself
    one = corrupt_volume(vol[:, :, :1], _recipe(tmp_path, "bias", "{transform: bias_field}"), seed=1, modality="MR")
    assert one.mode == "slices" and len(one.records[0]["steps"][0]["params"]["coefficients"]) == 10  # a 2-D field

    # CT and signed data keep the window's low end
    assert corrupt_volume(vol - 300, _recipe(tmp_path, "g", "{transform: gaussian, sigma: 0.1}"), seed=0,
                          modality="MR").window == (nu - 300, bright - 300)
    assert corrupt_volume(vol, _recipe(tmp_path, "g", "{transform: gaussian, sigma: 0.1}"), seed=0,
                          modality="CT").window == (-1000.0, 1000.0)


def test_a_recipe_that_applies_nothing_for_the_modality_says_so(tmp_path, caplog):
    # 'modalities: CT' on an MR scan wrote an unchanged copy with an empty mask, exit 0, without a word
    from medvae.corruption import corrupt_volume

    vol = np.full((16, 16, 3), 100, np.float32)
    ct_only = _recipe(tmp_path, "ct_only", "{transform: gaussian, modalities: CT}")
    with caplog.at_level("WARNING", logger="medvae"):
        vc = corrupt_volume(vol, ct_only, seed=0, modality="MR")
    assert not vc.mask.any() and np.array_equal(vc.image, vol)
    assert "recipe 'ct_only' applies no step to a scan of modality MR: the output is an unchanged copy" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvae"):  # a step skipped by its prob is the recipe's intent
        corrupt_volume(vol, _recipe(tmp_path, "rare", "{transform: gaussian, prob: 0.0}"), seed=0, modality="MR")
        corrupt_volume(vol, ct_only, seed=0, modality="CT")
        # a CT-only step beside one its prob skipped: MR gets boxes on other seeds
        mixed = _recipe(tmp_path, "mix", "{transform: gaussian, modalities: CT}\n  - {transform: boxes, prob: 0.0}")
        corrupt_volume(vol, mixed, seed=0, modality="MR")
    assert "applies no step" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvae"):  # the shipped low-dose recipe simulates a CT scanner only
        vc = corrupt_volume(vol, "lowdose_ct", seed=0, modality="MR")
    assert not vc.mask.any() and "recipe 'lowdose_ct' applies no step to a scan of modality MR" in caplog.text


def test_corrupt_volume_refuses_complex_and_boolean_volumes_and_keeps_float32_bit_for_bit(tmp_path):
    from medvae.corruption import corrupt_volume

    vol = np.full((16, 16, 2), 100, np.float32)
    with pytest.raises(MedvaeError, match=r"complex64; .*\(save the magnitude of complex data\)"):
        corrupt_volume(vol + 500j, "boxes", seed=0, modality="MR")  # was: the real part, with a warning
    with pytest.raises(MedvaeError, match="data type bool"):
        corrupt_volume(vol > 0, "boxes", seed=0, modality="MR")
    ramp = np.linspace(0, 1000.1, vol.size, dtype=np.float32).reshape(vol.shape)
    vc = corrupt_volume(ramp, "boxes", seed=0, modality="MR")
    assert vc.image.dtype == np.float32 and np.array_equal(vc.image[~vc.mask], ramp[~vc.mask])


def test_mr_small_sidecar_replays_in_the_recipe_window(dev_data, tmp_path):
    # pydicom's MR_small has no background (window 148..1841): the recipe works from zero signal
    from medvae.intensity import IntensityPolicy

    side, clean, noisy = _corrupt_dev_file(dev_data / "dicom/pydicom/MR_small.dcm", tmp_path, "rician", 2)
    lo, hi = IntensityPolicy().window_for(clean, "MR")
    assert lo > 100 and side["policy_window"] == [lo, hi] and side["intensity_origin"] == "zero_signal"
    assert side["intensity_window"] == [0.0, pytest.approx(hi - lo)]
    assert side["pixel_size_mm"] == pytest.approx(0.3125) and side["spacing_mm"][:2] == [0.3125, 0.3125]
    _assert_slices_replay(side, clean, noisy)


def _corrupt_dev_file(src, tmp_path, recipe: str, seed: int):
    """``medvae corrupt`` a dev file to NIfTI: (sidecar record, clean array, corrupted array)."""
    from medvae.io import load_scan

    if not src.exists():
        pytest.skip(f"{src.name} is missing")
    out = tmp_path / "corrupted.nii.gz"
    assert main(["corrupt", str(src), str(out), "--recipe", recipe, "--seed", str(seed)]) == 0
    side = json.loads((tmp_path / "corrupted.json").read_text())
    return side, load_scan(src).array, load_scan(out).array


def _assert_slices_replay(side, clean, noisy):
    """Every slice record of a corrupt sidecar replays to the written scan in its recipe window."""
    from medvae.corruption import replay
    from medvae.intensity import denormalize, normalize

    window = tuple(side["intensity_window"])
    x = normalize(clean, window)
    for rec in side["records"]:
        y, _ = replay(x[:, :, rec["slice"]][None], rec)
        np.testing.assert_allclose(denormalize(y[0], window), noisy[:, :, rec["slice"]], rtol=1e-6, atol=1e-3)


def _water_disk_noise(recipe, *, radius_mm, pixel_mm, roi_mm, n=128, slices=16):
    """Noise std (HU) in a central region of a water disk in air, the scan said to have ``pixel_mm`` pixels."""
    from medvae.corruption import corrupt_volume

    yy, xx = np.mgrid[:n, :n]
    r_mm = np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5) * pixel_mm
    hu = np.repeat(np.where(r_mm < radius_mm, 0.0, -1000.0).astype(np.float32)[:, :, None], slices, 2)
    vc = corrupt_volume(hu, recipe, seed=0, modality="CT", spacing=(pixel_mm, pixel_mm, 5.0))
    assert all(rec["steps"][0]["params"]["pixel_size_mm"] == pixel_mm for rec in vc.records)
    return float((vc.image - hu)[np.repeat((r_mm < roi_mm)[:, :, None], slices, 2)].std())


def test_lowdose_noise_follows_the_scans_pixel_size(tmp_path):
    # LowDoseCT: photons per ray (one detector bin = one pixel) are fixed, the line integrals are
    # sum(mu) * pixel, and the noise in mu is FBP(log-count noise) / pixel. So
    # std_HU ~ sqrt(exp(P)) / pixel, P the line integral through the region. The 250 mm FOV rule
    # gave every 128-pixel image 1.95 mm pixels, whatever its spacing.
    from medvae.corruption.noise import MU_WATER_PER_MM

    recipe = _recipe(tmp_path, "ld", "{transform: lowdose_ct, dose: 1.0, photons: 1.0e+5, "
                                     "hu_window: [-1000, 1000], fov_mm: 250}")
    # the same 120 mm water disk scanned with 1 mm and 2 mm pixels: same P, std ratio 2 (old: ~3.1)
    s1 = _water_disk_noise(recipe, radius_mm=60, pixel_mm=1.0, roi_mm=30)
    s2 = _water_disk_noise(recipe, radius_mm=60, pixel_mm=2.0, roi_mm=30)
    assert s1 / s2 == pytest.approx(2.0, rel=0.06), (s1, s2)
    # the same 128-pixel image said to have 1 mm or 2 mm pixels: the disk (radius 51.2 px) doubles,
    # so P through the centre doubles too: ratio exp(mu (L2 - L1) / 2) / 2 (old: identical images)
    radius_px = 0.4 * 128
    t1 = _water_disk_noise(recipe, radius_mm=radius_px * 1.0, pixel_mm=1.0, roi_mm=16 * 1.0)
    t2 = _water_disk_noise(recipe, radius_mm=radius_px * 2.0, pixel_mm=2.0, roi_mm=16 * 2.0)
    expected = np.exp(MU_WATER_PER_MM * (4 * radius_px - 2 * radius_px) / 2) / 2  # 1.34
    assert t2 / t1 == pytest.approx(expected, rel=0.05), (t1, t2, expected)


def test_lowdose_sidecar_records_the_pixel_size_and_replays(dev_data, tmp_path):
    side, clean, noisy = _corrupt_dev_file(dev_data / "dicom/pydicom/CT_small.dcm", tmp_path, "lowdose_ct", 4)
    assert side["intensity_window"] == [-1000.0, 1000.0] and side["intensity_origin"] == "window_low"
    assert side["pixel_size_mm"] == pytest.approx(0.661468)
    rec = side["records"][0]
    assert rec["pixel_size_mm"] == rec["steps"][0]["params"]["pixel_size_mm"] == side["pixel_size_mm"]
    _assert_slices_replay(side, clean, noisy)


def test_a_nifti_header_in_micrometres_gets_the_noise_of_its_size_in_mm(dev_data, tmp_path):
    # the header's unit was ignored: 500 um pixels were taken for 500 mm, and the noise was 18x
    import nibabel as nib

    img = nib.load(dev_data / "nifti/invesalius_cranium_ct.nii.gz")
    data = np.asarray(img.dataobj[:, :, 40:42], dtype=np.float32)
    mm = nib.Nifti1Image(data, img.affine)
    um = nib.Nifti1Image(data, img.affine * [[1000], [1000], [1000], [1]])
    um.header.set_xyzt_units("micron")
    mm.to_filename(tmp_path / "mm.nii.gz")
    um.to_filename(tmp_path / "um.nii.gz")
    noise, pixel = {}, {}
    for name in ("mm", "um"):
        out = tmp_path / f"{name}_noisy.nii.gz"
        assert main(["corrupt", str(tmp_path / f"{name}.nii.gz"), str(out), "--recipe", "lowdose_ct", "--seed", "3"]) == 0
        side = json.loads((tmp_path / f"{name}_noisy.json").read_text())
        noise[name] = nib.load(out).get_fdata() - data
        pixel[name] = side["pixel_size_mm"]
        assert side["spacing_mm"] == pytest.approx(list(img.header.get_zooms()[:3]), rel=1e-6)
        assert np.array_equal(nib.load(out).affine, nib.load(tmp_path / f"{name}.nii.gz").affine)  # its own unit
    assert pixel["um"] == pytest.approx(pixel["mm"], rel=1e-6) and 0.1 < pixel["mm"] < 2
    np.testing.assert_allclose(noise["um"], noise["mm"], atol=0.05)  # float rounding of the spacing; noise ~30 HU


def test_corrupt_volume_takes_a_recipe_name_and_refuses_other_objects():
    from medvae.corruption import corrupt_volume, load_recipe
    from medvae.errors import MedvaeError

    vol = np.full((32, 32, 2), 100, np.float32)
    vc = corrupt_volume(vol, "boxes", seed=0, modality="MR")  # was AttributeError
    ref = corrupt_volume(vol, load_recipe("boxes"), seed=0, modality="MR")
    assert np.array_equal(vc.image, ref.image) and vc.records == ref.records
    with pytest.raises(MedvaeError, match="unknown recipe 'nope'"):
        corrupt_volume(vol, "nope", seed=0, modality="MR")
    with pytest.raises(TypeError, match="recipe must be a recipe name, a YAML path or a Recipe"):
        corrupt_volume(vol, 3, seed=0, modality="MR")


@pytest.mark.parametrize("recipe", ["boxes", "gaussian", "lowdose_ct"])
def test_corrupt_volume_refuses_non_finite_or_empty_scans(recipe):
    from medvae.corruption import corrupt_volume
    from medvae.errors import MedvaeError

    vol = np.zeros((32, 32, 2), np.float32)
    vol[0, 0, 0] = np.nan  # passed through (masks, noise) or failed with "lam value too large" (low-dose CT)
    with pytest.raises(MedvaeError, match=r"scan.nii: 1 of 2048 voxels are NaN or infinite in the scan"):
        corrupt_volume(vol, recipe, seed=0, modality="CT", source="scan.nii")
    with pytest.raises(MedvaeError, match="the scan is empty"):
        corrupt_volume(np.zeros((0, 32, 2), np.float32), recipe, seed=0, modality="CT")
    # a coronal slice stored (X, 1, Z): each 32x1 line was corrupted as a slice (boxes as stripes), and
    # restore then refused the output
    with pytest.raises(MedvaeError, match=r"scan.nii: slices of 32x1 pixels \(20 of them\) cannot be corrupted"):
        corrupt_volume(np.zeros((32, 1, 20), np.float32), recipe, seed=0, modality="CT", source="scan.nii")


def test_ct_padding_is_kept_whatever_the_case_of_the_modality(dev_data):
    from medvae.corruption import corrupt_volume
    from medvae.io import load_scan

    ct = load_scan(dev_data / "dicom/pydicom-data/693_UNCR.dcm").array
    pad = ct <= -2000
    for modality in ("CT", "ct"):  # "ct" chose the CT window but once noised the padding
        vc = corrupt_volume(ct, "gaussian", seed=0, modality=modality)
        np.testing.assert_array_equal(vc.image[pad], ct[pad])
        assert vc.padding_voxels == int(pad.sum()) and not vc.mask[pad].any()


def test_a_bias_field_is_smooth_in_mm_across_a_thin_volume(tmp_path, caplog):
    """Four slices 6 mm deep took the field's whole variation: adjacent slices jumped by 0.4 in gain."""
    from medvae.corruption import corrupt_volume, replay
    from medvae.intensity import denormalize, normalize

    vol = np.full((64, 64, 4), 500.0, np.float32)
    recipe = _recipe(tmp_path, "bias", "{transform: bias_field}")
    vc = corrupt_volume(vol, recipe, seed=7, modality="MR", spacing=(3.0, 3.0, 1.5))  # 192 x 192 x 6 mm
    (rec,) = vc.records
    assert rec["steps"][0]["params"]["extent"] == [1.0, 1.0, 0.03125]
    gain = np.median(vc.image / vol, axis=(0, 1))
    assert np.abs(np.diff(gain)).max() < 0.02  # a field smooth in mm changes little over 1.5 mm
    again = replay(normalize(vol, vc.window)[None], rec)[0][0]  # the whole volume from its one record
    np.testing.assert_allclose(denormalize(again, vc.window), vc.image, rtol=1e-6)
    # a recipe that pairs it with slice-wise steps runs per slice, and says so
    mixed = _recipe(tmp_path, "mix", "{transform: bias_field}\n  - {transform: boxes}")
    with caplog.at_level("WARNING", logger="medvae.corruption.volume"):
        assert corrupt_volume(vol, mixed, seed=7, modality="MR").mode == "slices"
    assert "pairs a step drawn for the whole volume (a bias field, a mask file) with slice-wise steps" in caplog.text


def test_a_bias_record_from_before_the_2d_order_changed_replays_as_drawn():
    from medvae.corruption import replay
    from medvae.corruption.noise import legendre_field

    coeff = [0.1, -0.2, 0.15, 0.05, -0.1, 0.2, 0.0, 0.1, -0.05, 0.12]
    img = np.ones((1, 32, 24), np.float32)
    out, _ = replay(img, {"transform": "bias_field", "params": {"coefficients": coeff, "degree": 3}})
    np.testing.assert_allclose(out[0], np.exp(legendre_field((32, 24), degree=3, coefficients=coeff, order="monai")),
                               rtol=1e-6)


def test_a_mask_file_of_the_whole_volume_masks_each_slice_by_its_own(src, tmp_path, monkeypatch, capsys):
    """A mask the shape of the scan was refused ("the image's spatial shape is (64, 64)"): only a
    one-slice mask, repeated on every slice, worked; an empty path masked with the working folder."""
    import nibabel as nib

    vol, affine = _load(src)
    lesion = np.zeros(vol.shape, np.uint8)
    lesion[10:20, 12:30, 3] = 1
    lesion[30:34, 5:9, 5:8] = 1
    nib.save(nib.Nifti1Image(lesion, affine), str(tmp_path / "lesion.nii.gz"))

    def recipe(name, steps):
        (tmp_path / f"{name}.yaml").write_text(f"steps:\n  - {steps}\n")
        return str(tmp_path / f"{name}.yaml")

    lesion_recipe = recipe("lesion", f"{{transform: file_mask, path: {tmp_path / 'lesion.nii.gz'}}}")
    assert main(["corrupt", str(src), str(tmp_path / "out.nii.gz"), "--recipe", lesion_recipe]) == 0
    mask, _ = _load(tmp_path / "out_mask.nii.gz")
    assert np.array_equal(mask > 0, lesion > 0)
    out, _ = _load(tmp_path / "out.nii.gz")
    assert np.unique(out[lesion > 0]).size == 1 and np.array_equal(out[lesion == 0], vol[lesion == 0])
    # on CT, the padding outside the field of view is left out of the mask (the cached mask was read-only)
    from medvae.corruption import corrupt_volume

    ct = np.where(vol > 0, 40.0, -3024.0).astype(np.float32)
    vc = corrupt_volume(ct, lesion_recipe, seed=0, modality="CT")
    assert np.array_equal(vc.mask, (lesion > 0) & (ct > -2000)) and vc.mode == "volume"
    # a one-slice mask still masks every slice alike
    nib.save(nib.Nifti1Image(lesion[:, :, 3:4], affine), str(tmp_path / "one.nii.gz"))
    one = recipe("one", f"{{transform: file_mask, path: {tmp_path / 'one.nii.gz'}}}")
    assert main(["corrupt", str(src), str(tmp_path / "o1.nii.gz"), "--recipe", one]) == 0
    m1, _ = _load(tmp_path / "o1_mask.nii.gz")
    assert all(np.array_equal(m1[:, :, k] > 0, lesion[:, :, 3] > 0) for k in range(vol.shape[2]))
    # a mask in another geometry was placed by voxel index: a flipped one erased the mirror region
    flipped = affine.copy()
    flipped[:, 0] *= -1
    shifted = affine.copy()
    shifted[:3, 3] += 3 * affine[:3, 2]  # one slice further along the slice axis: the same in-plane grid
    nib.save(nib.Nifti1Image(lesion, flipped), str(tmp_path / "flipped.nii.gz"))
    nib.save(nib.Nifti1Image(lesion[:, :, 3:4], shifted), str(tmp_path / "slice3.nii.gz"))
    capsys.readouterr()
    assert main(["corrupt", str(src), str(tmp_path / "of.nii.gz"), "--recipe",
                 recipe("flipped", f"{{transform: file_mask, path: {tmp_path / 'flipped.nii.gz'}}}")]) == 2
    assert (f"{tmp_path / 'flipped.nii.gz'}: a file_mask step's mask has another geometry (affine) than the scan"
            in capsys.readouterr().err) and not (tmp_path / "of.nii.gz").exists()
    assert main(["corrupt", str(src), str(tmp_path / "os.nii.gz"), "--recipe",
                 recipe("slice3", f"{{transform: file_mask, path: {tmp_path / 'slice3.nii.gz'}}}")]) == 0
    nib.save(nib.Nifti1Image(vol[:, :, :1], affine), str(tmp_path / "single.nii.gz"))  # so on a one-slice scan
    assert main(["corrupt", str(tmp_path / "single.nii.gz"), str(tmp_path / "o1s.nii.gz"), "--recipe",
                 str(tmp_path / "slice3.yaml")]) == 0
    # beside a slice-wise step the volume mask is refused by name, not read as a wrong shape
    mixed = recipe("mixed", f"{{transform: file_mask, path: {tmp_path / 'lesion.nii.gz'}}}\n  - {{transform: boxes}}")
    capsys.readouterr()
    assert main(["corrupt", str(src), str(tmp_path / "o2.nii.gz"), "--recipe", mixed]) == 2
    assert "is a volume (shape" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    empty = recipe("empty", '{transform: file_mask, path: ""}')
    assert main(["corrupt", str(src), str(tmp_path / "o3.nii.gz"), "--recipe", empty]) == 2
    assert "the mask file's path is empty" in capsys.readouterr().err
    assert not (tmp_path / "o2.nii.gz").exists() and not (tmp_path / "o3.nii.gz").exists()


@pytest.mark.parametrize("mods", ['""', "[CTT]", "[]"])
def test_a_modality_name_that_is_no_modality_is_refused_not_a_step_switched_off(tmp_path, mods):
    from medvae.corruption import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"one_of:\n  - modalities: {mods}\n    steps: [{{transform: gaussian}}]\n"
                    "  - steps: [{transform: rician}]\n")
    with pytest.raises(ValueError, match="modalities must name CT or MR"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["gibbs", "kspace_spikes"])
def test_a_fourier_corruption_is_the_same_bit_for_bit_whatever_the_memory_order(src, name):
    """nibabel's get_fdata gives Fortran order: a replay of the record on it differed by 1e-3 HU."""
    from medvae.corruption import load_recipe

    vol, _ = _load(src)
    sl = np.asarray(vol[:, :, 3] / vol.max(), np.float32)[None]
    recipe = load_recipe(name)
    c = recipe(np.ascontiguousarray(sl), seed=3, modality="MR")
    f = recipe(np.asfortranarray(sl), seed=3, modality="MR")
    assert np.array_equal(c.image, f.image) and not np.array_equal(c.image, sl)


def test_corrupt_volume_refuses_a_fractional_seed_and_names_another_modality(caplog):
    from medvae.corruption import corrupt_volume

    vol = np.full((16, 16, 2), 100, np.float32)
    with pytest.raises(MedvaeError, match="seed must be a whole number, not 1.5"):  # it was seed 1
        corrupt_volume(vol, "noise", seed=1.5, modality="MR")
    with pytest.raises(MedvaeError, match="^seed must be a non-negative whole number, not -1$"):  # "recipe 'noise': ..."
        corrupt_volume(vol, "noise", seed=-1, modality="MR")
    same = corrupt_volume(vol, "noise", seed=3, modality="MR").image
    assert np.array_equal(corrupt_volume(vol, "noise", seed=3.0, modality="MR").image, same)
    assert np.array_equal(corrupt_volume(vol, "noise", seed=np.float64(3), modality="MR").image, same)
    lower = corrupt_volume(vol, "noise", seed=0, modality="mr")
    assert np.array_equal(lower.image, corrupt_volume(vol, "noise", seed=0, modality="MR").image)
    assert not caplog.records
    with caplog.at_level(logging.WARNING):  # "MRI" silently got Gaussian noise where MR gets Rician
        corrupt_volume(vol, "noise", seed=0, modality="MRI")
    assert "modality 'MRI' is neither CT nor MR: the recipe's CT and MR steps are skipped" in caplog.text
