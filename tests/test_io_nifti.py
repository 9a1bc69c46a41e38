"""NIfTI through medvae.io: MONAI LoadImage + nibabel header, exact round trip, 4-D, NaN policy."""
from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest

from medvae.errors import MedvaeError
from medvae.io import Scan, load_scan, save_scan
from medvae.io.nifti import guess_modality


def test_ct_volume_loads_in_hu_with_nibabel_geometry(dev_data, dev_expect):
    head = dev_expect.ct_head
    path = dev_data / "nifti/invesalius_cranium_ct.nii.gz"
    scan = load_scan(path)
    img = nib.load(path)
    assert isinstance(scan, Scan) and scan.format == "nifti"
    assert scan.array.dtype == np.float32 and scan.array.shape == head.shape
    np.testing.assert_array_equal(scan.array, np.asanyarray(img.dataobj).astype(np.float32))
    assert scan.affine.dtype == np.float64 and np.array_equal(scan.affine, img.affine)
    assert scan.orientation == head.nifti_orientation
    np.testing.assert_allclose(scan.spacing, head.spacing, atol=1e-5)
    assert scan.modality == "CT"  # guessed from HU-like values
    assert (scan.array.min(), scan.array.max()) == head.value_range
    assert scan.header is not None and scan.datasets is None


def test_round_trip_keeps_affine_exactly_and_data(dev_data, tmp_path):
    src = dev_data / "nifti/invesalius_cranium_ct.nii.gz"
    scan = load_scan(src)
    before = scan.array.copy()
    out = save_scan(scan, scan.array, tmp_path / "restored.nii.gz")
    again = load_scan(out)
    assert np.array_equal(again.affine, scan.affine)
    assert np.array_equal(again.array, scan.array)
    np.testing.assert_array_equal(scan.array, before)  # input untouched
    a, b = nib.load(out), nib.load(src)
    assert a.get_data_dtype() == np.float32
    assert np.array_equal(a.get_sform(), b.get_sform()) and np.array_equal(a.get_qform(), b.get_qform())
    assert (int(a.header["sform_code"]), int(a.header["qform_code"])) == \
        (int(b.header["sform_code"]), int(b.header["qform_code"]))
    assert a.header["descrip"].tobytes().startswith(b"medvae restored")


def test_new_values_written_as_float32(dev_data, dev_expect, tmp_path):
    scan = load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    noisy = scan.array + np.float32(0.25)
    again = load_scan(save_scan(scan, noisy, tmp_path / "x.nii"))
    np.testing.assert_array_equal(again.array, noisy)
    assert np.array_equal(again.affine, scan.affine) and again.orientation == dev_expect.mr_small.orientation


def test_4d_volume_choice(dev_data, tmp_path, caplog):
    path = dev_data / "nifti/nibabel_example4d.nii.gz"
    data = np.asanyarray(nib.load(path).dataobj)
    with caplog.at_level(logging.WARNING, logger="medvae.io.nifti"):
        v0 = load_scan(path)  # documented default: volume 0, with a log message
    assert "2 volumes" in caplog.text and "--volume" in caplog.text
    v1 = load_scan(path, volume=1)
    assert v0.array.shape == v1.array.shape == (128, 96, 24)
    np.testing.assert_array_equal(v0.array, data[..., 0])
    np.testing.assert_array_equal(v1.array, data[..., 1])
    assert not np.array_equal(v0.array, v1.array)
    out = load_scan(save_scan(v1, v1.array, tmp_path / "v1.nii.gz"))
    assert np.array_equal(out.affine, v1.affine) and np.array_equal(out.array, v1.array)
    assert nib.load(tmp_path / "v1.nii.gz").ndim == 3
    with pytest.raises(MedvaeError, match="2 volume"):
        load_scan(path, volume=2)
    with pytest.raises(MedvaeError, match="volume must be a whole number, not 1.5"):  # once volume 1
        load_scan(path, volume=1.5)
    # its description holds a NUL byte mid-text, which `medvae info` once printed raw
    assert load_scan(path, reader="native").description == "FSL3.3 v2.25 NIfTI-1 Single file format"


def test_nonfinite_policy(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    arr[0, 0, 0] = np.nan
    arr[1, 2, 3] = np.inf
    arr[2, 2, 2] = -np.inf
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    with pytest.raises(MedvaeError, match="3 of 120 voxels") as err:
        load_scan(path)
    assert "nan.nii.gz" in str(err.value)
    scan = load_scan(path, nonfinite="zero")
    assert np.isfinite(scan.array).all() and scan.array[0, 0, 0] == 0


def test_modality_guess_and_override(dev_data):
    assert guess_modality(np.array([-1024.0, 50.0, 2000.0]))[0] == "CT"
    assert guess_modality(np.array([0.0, 1000.0]))[0] == "MR"
    assert guess_modality(np.array([-20000.0, 0.0]))[0] == "MR"
    scan = load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    assert scan.modality == "MR"
    assert load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz", modality="ct").modality == "CT"


def test_with_array_and_properties():
    scan = Scan(np.zeros((3, 4, 5), np.float32), np.diag([-1.0, 2.0, 3.0, 1.0]), "MR", "nifti",
                path=__import__("pathlib").Path("x.nii"))
    assert scan.spacing == (1.0, 2.0, 3.0) and scan.orientation == "LAS"
    new = scan.with_array(np.ones((3, 4, 5), np.float64))
    assert new.array.dtype == np.float32 and new.affine is scan.affine and scan.array.max() == 0
    with pytest.raises(MedvaeError, match="shape"):
        scan.with_array(np.ones((3, 4, 6)))
    # each was converted with at most numpy's warning: the imaginary part dropped, 1e39 made inf
    with pytest.raises(MedvaeError, match=r"^x.nii: the new array has data type complex128; .* magnitude"):
        scan.with_array(np.ones((3, 4, 5)) + 1j)
    with pytest.raises(MedvaeError, match="the new array has data type bool"):
        scan.with_array(np.ones((3, 4, 5), bool))
    with pytest.raises(MedvaeError, match="x.nii: the new array holds values beyond float32's range"):
        scan.with_array(np.full((3, 4, 5), 1e39))


def test_nifti_scan_needs_nifti_output(dev_data, tmp_path):
    scan = load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    with pytest.raises(MedvaeError, match=".nii"):
        save_scan(scan, scan.array, tmp_path / "folder_out")
    with pytest.raises(MedvaeError, match="shape"):
        save_scan(scan, scan.array[:, :, :3], tmp_path / "a.nii.gz")
    bad = scan.array.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(MedvaeError, match="NaN"):
        save_scan(scan, bad, tmp_path / "a.nii.gz")
    assert not any(tmp_path.iterdir())


def test_a_noisy_mr_volume_is_not_taken_for_ct_but_a_ct_is(dev_data):
    """Gaussian noise of 10 % of the window pushes nireports' DWI minimum below -500 (its raw minimum
    looks like air in HU); the smoothed minimum does not, while a real CT keeps its air."""
    from medvae.corruption import GaussianNoise
    from medvae.io import load_scan

    dwi = dev_data.parent / "extra" / "nifti" / "nireports_ds000114_dwi.nii.gz"
    mr = np.asarray(load_scan(dwi if dwi.is_file() else dev_data / "nifti" / "nibabel_example4d.nii.gz").array,
                    np.float32)
    lo, hi = np.percentile(mr, (0.5, 99.5))
    noisy = np.asarray(GaussianNoise(0.15 * (hi - lo), seed=0)(mr[None])[0][0])
    assert noisy.min() < -500
    modality, reason = guess_modality(noisy)
    assert modality == "MR" and "smoothed" in reason
    ct = load_scan(dev_data / "nifti" / "invesalius_cranium_ct.nii.gz").array
    assert guess_modality(ct)[0] == "CT"
    # a crop whose only air is a small pocket (smoothed to about -390 HU) was taken for a noisy MR
    pocket = np.clip(ct[100:148, 100:140, 40:43], -200, 200).copy()
    pocket[20:24, 18:22, 1] = -1024.0  # 4 x 4 px: -456 HU once smoothed
    assert guess_modality(pocket) == ("CT", "guessed from the values: minimum -1024 looks like air in HU")


def _head_slices(dev_data, folder, n=6):
    import pydicom

    folder.mkdir()
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:n]
    return [pydicom.dcmread(f) for f in files]


def test_dicom_with_a_missing_slice_is_refused_as_nifti(dev_data, tmp_path):
    # one affine puts slice k at origin + k * step: with a gap, slices after it would be misplaced
    datasets = _head_slices(dev_data, tmp_path / "gap")
    for i, ds in enumerate(datasets):
        if i != 2:
            ds.save_as(tmp_path / "gap" / f"IM{i:04d}.dcm")
    scan = load_scan(tmp_path / "gap")
    assert scan.n_slices == 5
    with pytest.raises(MedvaeError, match=r"not evenly spaced .* slice \d+ \d+\.\d+ mm from its "
                                          r"ImagePositionPatient; write a DICOM series") as err:
        save_scan(scan, scan.array, tmp_path / "gap.nii.gz")
    assert "\n" not in str(err.value) and ".dcm" in str(err.value)
    assert not (tmp_path / "gap.nii.gz").exists()
    save_scan(scan, scan.array, tmp_path / "gap_out")  # DICOM keeps each slice's position
    assert len(list((tmp_path / "gap_out").glob("*.dcm"))) == 5


def test_gantry_tilt_is_kept_in_the_sform_and_the_qform_is_off(dev_data, tmp_path, caplog):
    import pydicom

    datasets = _head_slices(dev_data, tmp_path / "tilt")
    normal = np.cross(*np.reshape([float(v) for v in datasets[0].ImageOrientationPatient], (2, 3)))
    step = float(np.dot(np.subtract([float(v) for v in datasets[1].ImagePositionPatient],
                                    [float(v) for v in datasets[0].ImagePositionPatient]), normal))
    for i, ds in enumerate(datasets):  # shift each slice along the columns: a 20° gantry tilt
        pos = np.array([float(v) for v in datasets[0].ImagePositionPatient]) + i * step * normal
        pos += i * step * np.tan(np.radians(20)) * np.array(
            [float(v) for v in ds.ImageOrientationPatient[3:]])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        ds.save_as(tmp_path / "tilt" / f"IM{i:04d}.dcm")
    scan = load_scan(tmp_path / "tilt")
    with caplog.at_level(logging.WARNING, logger="medvae.io.nifti"):
        save_scan(scan, scan.array, tmp_path / "tilt.nii.gz")
    assert any("sheared geometry" in r.getMessage() for r in caplog.records)
    hdr = nib.load(tmp_path / "tilt.nii.gz").header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 0)
    assert hdr.get_xyzt_units()[0] == "mm"
    ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    positions = [[float(v) for v in pydicom.dcmread(f).ImagePositionPatient]
                 for f in (tmp_path / "tilt").glob("*.dcm")]
    for k, ipp in enumerate(sorted(positions, key=lambda p: float(np.dot(p, normal)))):  # Z order
        world = hdr.get_sform() @ [0, 0, k, 1]  # voxel (0, 0, k) is the slice's first pixel
        np.testing.assert_allclose(world[:3], (ras @ [*ipp, 1])[:3], atol=1e-3)


def test_a_2d_nifti_comes_back_2d(tmp_path):
    affine = np.diag([-0.8, 0.8, 3.0, 1.0])
    nib.Nifti1Image(np.arange(12, dtype=np.float32).reshape(3, 4), affine).to_filename(tmp_path / "a.nii.gz")
    scan = load_scan(tmp_path / "a.nii.gz", modality="MR")
    assert scan.array.shape == (3, 4, 1)
    save_scan(scan, scan.array * 2, tmp_path / "b.nii.gz")
    out = nib.load(tmp_path / "b.nii.gz")
    assert out.shape == (3, 4) and int(out.header["dim"][0]) == 2
    np.testing.assert_array_equal(out.get_fdata(), np.arange(12).reshape(3, 4) * 2)
    np.testing.assert_array_equal(out.affine, nib.load(tmp_path / "a.nii.gz").affine)
    # the slice's thickness stays in pixdim[3] (it was reset to 1, so the qform disagreed with the sform)
    assert float(out.header["pixdim"][3]) == 3.0
    np.testing.assert_allclose(out.get_qform(), affine)


def test_header_fields_of_a_restored_volume(tmp_path):
    """A 4-D input restored as one 3-D volume keeps its TR and units; intent and cal range go."""
    affine = np.diag([-2.0, 2.0, 3.0, 1.0])
    img = nib.Nifti1Image(np.arange(4 * 5 * 6 * 3, dtype=np.int16).reshape(4, 5, 6, 3), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["pixdim"][4] = 16.5  # TR
    img.header.set_intent("t test", (12,), name="tstat")
    img.header["cal_min"], img.header["cal_max"] = 0, 300
    img.to_filename(tmp_path / "in.nii.gz")
    scan = load_scan(tmp_path / "in.nii.gz", volume=1, modality="MR")
    hdr = nib.load(save_scan(scan, scan.array + 1, tmp_path / "out.nii.gz")).header
    assert int(hdr["dim"][0]) == 3 and hdr.get_xyzt_units() == ("mm", "sec")
    assert float(hdr["pixdim"][4]) == 16.5
    assert hdr.get_intent() == ("none", (), "")
    assert (float(hdr["cal_min"]), float(hdr["cal_max"])) == (0.0, 0.0)


@pytest.mark.parametrize("data", [
    (np.arange(60) * (1 + 1j)).astype(np.complex64).reshape(3, 4, 5),
    np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]),
], ids=["complex", "rgb"])
@pytest.mark.parametrize("reader", ["monai", "native"])
def test_complex_and_rgb_niftis_are_refused_in_one_line(tmp_path, data, reader):
    path = tmp_path / "odd.nii.gz"
    nib.Nifti1Image(data, np.eye(4)).to_filename(path)
    with pytest.raises(MedvaeError, match="is not supported: medvae restores scalar real") as err:
        load_scan(path, modality="MR", reader=reader)
    assert "\n" not in str(err.value) and "odd.nii.gz" in str(err.value)


def test_a_file_whose_sform_and_qform_disagree_is_read_by_its_sform_with_a_warning(tmp_path, caplog):
    # nibabel (and medvae) take the sform, ITK the qform: 10 mm apart, a comparison ITK would see shifted
    img = nib.Nifti1Image(np.ones((8, 8, 4), np.float32), None)
    s = np.diag([1.0, 1.0, 2.0, 1.0])
    q = s.copy()
    q[0, 3] = -10.0
    img.set_sform(s, 2)
    img.set_qform(q, 1)
    img.to_filename(tmp_path / "two.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medvae.io.nifti"):
        scan = load_scan(tmp_path / "two.nii.gz", modality="MR")
    np.testing.assert_array_equal(scan.affine, s)
    assert "sform and qform place voxels up to 10.0 mm apart" in caplog.text
    caplog.clear()
    img.set_qform(s, 1)
    img.to_filename(tmp_path / "one.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medvae.io.nifti"):
        load_scan(tmp_path / "one.nii.gz", modality="MR")
    assert "qform" not in caplog.text
    # measured in mm whatever the header's unit: in metres 0.05 apart (5 cm) passed without a word
    q[0, 3] = -0.05
    img.set_qform(q, 1)
    img.header.set_xyzt_units("meter")
    img.to_filename(tmp_path / "metres.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medvae.io.nifti"):
        load_scan(tmp_path / "metres.nii.gz", modality="MR")
    assert "sform and qform place voxels up to 50.0 mm apart" in caplog.text


def test_a_volumes_start_time_that_the_header_cannot_hold_keeps_the_files(tmp_path):
    import warnings

    import nibabel as nib

    from medvae.io.nifti import read_nifti

    img = nib.Nifti1Image(np.zeros((4, 4, 2, 4), np.float32), np.eye(4))
    img.header["pixdim"][4], img.header["toffset"] = 3e38, 3e38
    img.to_filename(tmp_path / "big.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow warning once reached stderr
        scan = read_nifti(tmp_path / "big.nii.gz", volume=3)
    assert float(scan.header["toffset"]) == pytest.approx(3e38)


def test_a_float64_value_beyond_float32_is_named_not_called_infinite(tmp_path):
    # 1e39 became inf in the float32 read: "1 of 3072 voxels are NaN or infinite", and a numpy warning
    import warnings

    a = np.random.default_rng(0).normal(100, 10, (32, 32, 3))
    a[3, 3, 1] = -1e39
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "big.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MedvaeError, match=r"big.nii.gz: holds values beyond float32's range \(about ±3.4e38\)"):
            load_scan(tmp_path / "big.nii.gz")
    a[3, 3, 1] = 3e38  # within float32: read as it is
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "ok.nii.gz")
    assert load_scan(tmp_path / "ok.nii.gz").array[3, 3, 1] == np.float32(3e38)


def test_a_float64_array_beyond_float32_is_not_written_as_infinite(tmp_path):
    import warnings

    a = np.random.default_rng(0).normal(100, 10, (16, 16, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), tmp_path / "in.nii.gz")
    scan = load_scan(tmp_path / "in.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MedvaeError, match=r"out.nii.gz: the array to write holds values beyond float32's range"):
            save_scan(scan, scan.array.astype(np.float64) * 1e300, tmp_path / "out.nii.gz")
    assert not (tmp_path / "out.nii.gz").exists()
    save_scan(scan, scan.array.astype(np.float64) * 1e30, tmp_path / "ok.nii.gz")  # within float32
    assert np.isfinite(load_scan(tmp_path / "ok.nii.gz").array).all()


def test_a_header_in_metres_with_voxels_under_one_cubic_mm_is_written_and_a_degenerate_one_refused(dev_data,
                                                                                                tmp_path):
    """In metres a 1 x 0.98 x 0.98 mm voxel is 1e-9 m^3, which an absolute determinant check took for
    degenerate geometry: restore and corrupt refused the scan."""
    src = nib.load(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    affine = src.affine.copy()
    affine[:3] *= 0.001 * 0.25  # quarter-size voxels (0.8 x 0.8 x 0.9 mm), in metres
    img = nib.Nifti1Image(np.asarray(src.dataobj, np.float32), affine)
    img.header.set_xyzt_units("meter", "sec")
    img.to_filename(tmp_path / "metres.nii.gz")
    scan = load_scan(tmp_path / "metres.nii.gz", modality="MR")
    assert np.prod(scan.spacing) < 1.0
    out = nib.load(save_scan(scan, scan.array, tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(out.affine, affine, rtol=1e-6, atol=1e-12)
    assert out.header.get_xyzt_units()[0] == "meter"
    flat = affine.copy()
    flat[:3, 2] = flat[:3, 1]  # two axes along one line
    bad = scan.__class__(scan.array, flat, "MR", "nifti", scan.path)
    with pytest.raises(MedvaeError, match="the scan's geometry is degenerate"):
        save_scan(bad, scan.array, tmp_path / "bad.nii.gz")
