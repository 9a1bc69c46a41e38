"""Writing a derived DICOM series: pixels, geometry, UIDs, third-party readers, rescale modes."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from medvae.errors import MedvaeError
from medvae.io import load_scan, save_scan

# attributes a derived series may change; every other source attribute must be copied unchanged
CHANGED = {"SeriesInstanceUID", "SOPInstanceUID", "ImageType", "SeriesDescription", "SeriesNumber",
           "DerivationDescription", "SourceImageSequence", "PixelData", "BitsStored", "HighBit",
           "LargestImagePixelValue", "SmallestImagePixelValue", "ContentDate", "ContentTime",
           "InstanceCreationDate", "InstanceCreationTime", "InstanceCreatorUID", "IconImageSequence",
           "SeriesDate", "SeriesTime"}


@pytest.fixture(scope="module")
def ct_series(dev_data):
    return load_scan(dev_data / "dicom/series_ct_head")


@pytest.fixture(scope="module")
def written(ct_series, tmp_path_factory):
    """The CT head series written back with slightly changed values (module-scoped: written once)."""
    out = tmp_path_factory.mktemp("write") / "restored"
    values = ct_series.array + np.float32(0.3)  # rounds back to the same stored integers
    save_scan(ct_series, values, out)
    return out


def test_round_trip_pixels_and_geometry(ct_series, written, tmp_path):
    again = load_scan(written)
    assert again.array.shape == ct_series.array.shape
    slope = float(ct_series.datasets[0].get("RescaleSlope", 1))
    assert np.abs(again.array - ct_series.array).max() <= slope  # within one quantization step
    np.testing.assert_array_equal(again.array, ct_series.array)  # here: exact (integers + 0.3)
    np.testing.assert_allclose(again.affine, ct_series.affine, atol=1e-6)
    assert again.modality == "CT"
    # the source datasets are not modified (snapshot taken before a write of its own: the fixture's
    # write had run before any snapshot this test could take)
    before = [copy.deepcopy(ds) for ds in ct_series.datasets]
    array = ct_series.array.copy()
    save_scan(ct_series, ct_series.array + np.float32(0.3), tmp_path / "again")
    assert all(ds == b for ds, b in zip(ct_series.datasets, before)) and len(before) == len(ct_series.datasets)
    np.testing.assert_array_equal(ct_series.array, array)


def test_derived_series_metadata(ct_series, written, dev_expect):
    n = dev_expect.ct_head.n_slices  # dev: 108
    files = sorted(written.glob("*.dcm"))
    assert [f.name for f in files] == [f"IM{i + 1:04d}.dcm" for i in range(n)]
    outs = [pydicom.dcmread(f) for f in files]
    src0 = ct_series.datasets[0]
    series_uids = {ds.SeriesInstanceUID for ds in outs}
    assert len(series_uids) == 1 and src0.SeriesInstanceUID not in series_uids
    sops = {ds.SOPInstanceUID for ds in outs}
    assert len(sops) == n and not sops & {ds.SOPInstanceUID for ds in ct_series.datasets}
    for ds, src in zip(outs, ct_series.datasets):
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert not ds.file_meta.TransferSyntaxUID.is_compressed
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID
        assert ds.ImagePositionPatient == src.ImagePositionPatient
        assert ds.ImageOrientationPatient == src.ImageOrientationPatient
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] + list(src.ImageType)[2:]
        assert ds.SeriesDescription == f"{src.SeriesDescription} [medvae restored]"
        assert "medvae" in ds.DerivationDescription
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert ds.BitsAllocated == 16 and ds.BitsStored == 16 and ds.HighBit == 15
        assert ds.PixelRepresentation == src.PixelRepresentation
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
    assert int(outs[0].SeriesNumber) == int(src0.SeriesNumber) + 1000
    assert outs[0].file_meta.ImplementationVersionName.startswith("MEDVAE_")
    assert outs[0].file_meta.ImplementationClassUID == pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert "SourceApplicationEntityTitle" not in outs[0].file_meta
    assert len(outs[0].ContentDate) == 8 and outs[0].ContentDate >= "20260101"
    # everything else is copied unchanged
    for elem in src0:
        if elem.keyword and elem.keyword not in CHANGED:
            assert outs[0][elem.tag].value == elem.value, elem.keyword


def test_simpleitk_reads_the_output_series(ct_series, written, assert_same_image):
    sitk = pytest.importorskip("SimpleITK")
    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(written))
    assert len(ids) == 1
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(written), ids[0]))
    img = reader.Execute()
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    lps = np.eye(4)
    lps[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    lps[:3, 3] = img.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    assert_same_image(ct_series.array, ct_series.affine, arr, ras, atol_mm=1e-3)


def test_multiframe_in_multiframe_out(dev_data, tmp_path):
    scan = load_scan(dev_data / "dicom/pydicom-data/emri_small.dcm")
    out = save_scan(scan, scan.array * 0.5, tmp_path / "emri_out")
    files = list(out.glob("*.dcm"))
    assert [f.name for f in files] == ["IM0001.dcm"]
    ds = pydicom.dcmread(files[0])
    assert int(ds.NumberOfFrames) == 10 and ds.pixel_array.shape == (10, 64, 64)
    assert ds.SOPClassUID == pydicom.uid.EnhancedMRImageStorage
    again = load_scan(out)
    assert np.abs(again.array - scan.array * 0.5).max() <= 0.5  # one step of slope 1
    np.testing.assert_allclose(again.affine, scan.affine)


def test_enhanced_ct_rescale_in_functional_groups(dev_data, tmp_path):
    scan = load_scan(dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    again = load_scan(save_scan(scan, scan.array + 10, tmp_path / "ect"))
    np.testing.assert_array_equal(again.array, scan.array + 10)
    np.testing.assert_allclose(again.affine, scan.affine)
    # stored uint16 through intercept -1024: values below -1024 clip to it
    low = load_scan(save_scan(scan, scan.array - 10, tmp_path / "ect_low"))
    assert low.array.min() == -1024.0


def test_compressed_input_gives_uncompressed_output(dev_data, tmp_path):
    scan = load_scan(dev_data / "dicom/pydicom/MR_small_jp2klossless.dcm")
    out = save_scan(scan, scan.array, tmp_path / "mr")
    ds = pydicom.dcmread(out / "IM0001.dcm")
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    np.testing.assert_array_equal(load_scan(out).array, scan.array)


def test_keep_clips_to_the_stored_type_and_says_how_many(dev_data, tmp_path, caplog):
    scan = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")  # int16 stored, intercept -1024
    ds = scan.datasets[0]
    assert ds.PixelRepresentation == 1
    top = 32767 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    with caplog.at_level("WARNING", logger="medvae.io.derived_series"):
        again = load_scan(save_scan(scan, scan.array * 100, tmp_path / "clipped"))
    assert again.array.max() == pytest.approx(top)
    bottom = -32768 * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    n = int(np.count_nonzero((scan.array * 100 > top + 0.5) | (scan.array * 100 < bottom - 0.5)))
    warned = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    assert n > 0 and len(warned) == 1 and f"{n} pixel(s) lie outside" in warned[0]
    assert "CT_small.dcm" in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvae.io.derived_series"):
        save_scan(scan, scan.array, tmp_path / "same")
    assert not [r for r in caplog.records if "clipped" in r.getMessage()]


def test_the_clip_warning_counts_every_file_of_a_series(ct_series, tmp_path, caplog):
    # it counted the first file only: 8 pixels said where 24 were clipped
    hot = ct_series.array.copy()
    hot[:3, :2, :] = 40000.0  # beyond int16 at slope 1 in every file
    with caplog.at_level("WARNING", logger="medvae.io.derived_series"):
        save_scan(ct_series, hot, tmp_path / "hot")
    (warned,) = [r.getMessage() for r in caplog.records if "clipped" in r.getMessage()]
    nz = hot.shape[2]
    assert f"(and {nz - 1} more file(s)): {6 * nz} pixel(s) lie outside" in warned


def test_fit_rescale_keeps_small_floats(dev_data, tmp_path):
    scan = load_scan(dev_data / "dicom/pydicom/MR_small.dcm")
    rng = np.random.default_rng(0)
    std = rng.uniform(0.0, 0.02, scan.array.shape).astype(np.float32)  # an uncertainty map
    std[:8, :8] = 0  # known pixels: a zero std must read back as 0, not as -1e-4
    out = save_scan(scan, std, tmp_path / "unc", rescale="fit", description="medvae uncertainty")
    ds = pydicom.dcmread(out / "IM0001.dcm")
    slope = float(ds.RescaleSlope)
    assert 0 < slope < 0.02 / 30000 and ds.PixelRepresentation == 1 and ds.BitsStored == 16
    assert len(str(ds["RescaleSlope"].value)) <= 16
    again = load_scan(out)
    assert np.abs(again.array - std).max() <= slope / 2 + 1e-9
    assert np.all(again.array[:8, :8] == 0) and again.array.min() == 0
    assert ds.SeriesDescription.endswith("[medvae uncertainty]")
    # "keep" would have lost the map entirely (integer stored values, slope 1)
    kept = load_scan(save_scan(scan, std, tmp_path / "kept"))
    assert np.abs(kept.array).max() == 0


def test_dicom_scan_can_be_written_as_nifti(ct_series, tmp_path):
    out = save_scan(ct_series, ct_series.array, tmp_path / "ct.nii.gz")
    again = load_scan(out)
    np.testing.assert_allclose(again.affine, ct_series.affine, atol=1e-4)
    np.testing.assert_array_equal(again.array, ct_series.array)


def test_the_uncertainty_map_gets_its_own_series_number(dev_data, tmp_path):
    from medvae.restore import UNCERTAINTY_DESCRIPTION

    scan = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")
    src = int(scan.datasets[0].SeriesNumber)
    image = pydicom.dcmread(save_scan(scan, scan.array, tmp_path / "img") / "IM0001.dcm")
    std = pydicom.dcmread(save_scan(scan, np.full(scan.array.shape, 3.5, np.float32), tmp_path / "std",
                                    description=UNCERTAINTY_DESCRIPTION, rescale="fit") / "IM0001.dcm")
    assert (int(image.SeriesNumber), int(std.SeriesNumber)) == (src + 1000, src + 2000)
    assert image.SeriesInstanceUID != std.SeriesInstanceUID
    noisy = pydicom.dcmread(save_scan(scan, scan.array, tmp_path / "noisy", description="medvae corrupt noise seed 0")
                            / "IM0001.dcm")  # once 1001 too: the same number as the restoration's
    assert int(noisy.SeriesNumber) == src + 3000

    # the corrupted copy's mask, and the restoration and map of the corrupted copy: all apart
    mask = save_scan(scan, scan.array * 0, tmp_path / "mask", description="medvae corrupt mask noise (1 = corrupted)")
    copy = load_scan(tmp_path / "noisy")
    again = save_scan(copy, copy.array, tmp_path / "again")  # its number was the mask's: src + 4000
    again_std = save_scan(copy, np.full(copy.array.shape, 3.5, np.float32), tmp_path / "again_std",
                          description=UNCERTAINTY_DESCRIPTION, rescale="fit")
    twice = save_scan(load_scan(again), copy.array, tmp_path / "twice")  # 13000 + 10000 met again_std's number
    numbers = [int(pydicom.dcmread(d / "IM0001.dcm").SeriesNumber) for d in (mask, again, again_std, twice)]
    assert src < 1000 and numbers == [src + 4000, src + 3000 + 10000, src + 3000 + 20000, src + 3000 + 10000 + 100000]


def test_a_map_in_other_units_gets_a_display_window_of_its_own_and_no_source_thumbnail(dev_data, tmp_path):
    # the uncertainty map (0..141 HU) kept the source's C 40 / W 100 and showed saturated; a mask of 0/1
    # was black in a CT window; a corrupted copy kept the clean image's icon and its creation times
    from medvae.restore import UNCERTAINTY_DESCRIPTION

    scan = load_scan(dev_data / "dicom/pydicom-data/693_UNCR.dcm")
    assert "WindowCenter" in scan.datasets[0]
    std = np.linspace(0, 141, scan.array.size, dtype=np.float32).reshape(scan.array.shape)
    unc = pydicom.dcmread(save_scan(scan, std, tmp_path / "std", description=UNCERTAINTY_DESCRIPTION,
                                    rescale="fit") / "IM0001.dcm")
    assert (float(unc.WindowCenter), float(unc.WindowWidth)) == (70.5, 141.0)
    mask = pydicom.dcmread(save_scan(scan, (std > 70).astype(np.float32), tmp_path / "mask",
                                     description="medvae corrupt mask boxes (1 = corrupted)") / "IM0001.dcm")
    assert (float(mask.WindowCenter), float(mask.WindowWidth)) == (0.5, 1.0)
    image = pydicom.dcmread(save_scan(scan, scan.array, tmp_path / "img") / "IM0001.dcm")
    src = scan.datasets[0]
    assert image.WindowCenter == src.WindowCenter and image.WindowWidth == src.WindowWidth  # same HU
    icon = pydicom.dcmread(dev_data / "dicom/pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm")
    assert "IconImageSequence" in icon
    mr = load_scan(dev_data / "dicom/pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm")
    out = pydicom.dcmread(save_scan(mr, mr.array, tmp_path / "mr") / "IM0001.dcm")
    assert "IconImageSequence" not in out and "InstanceCreatorUID" not in out
    if "InstanceCreationDate" in icon:
        assert out.InstanceCreationDate != icon.InstanceCreationDate
    # a MONOCHROME1 source (0 shown white): its maps are MONOCHROME2 in their own window, its image stays as it was
    ds = pydicom.dcmread(dev_data / "dicom/pydicom-data/693_UNCR.dcm")
    ds.PhotometricInterpretation, ds.PresentationLUTShape = "MONOCHROME1", "INVERSE"
    ds.save_as(tmp_path / "mono1.dcm")
    scan = load_scan(tmp_path / "mono1.dcm")
    for name, values, desc in (("std1", std, UNCERTAINTY_DESCRIPTION), ("mask1", (std > 70).astype(np.float32),
                                                                      "medvae corrupt mask boxes (1 = corrupted)")):
        out = pydicom.dcmread(save_scan(scan, values, tmp_path / name, description=desc, rescale="fit") / "IM0001.dcm")
        assert (out.PhotometricInterpretation, out.PresentationLUTShape) == ("MONOCHROME2", "IDENTITY"), name
    out = pydicom.dcmread(save_scan(scan, scan.array, tmp_path / "img1") / "IM0001.dcm")
    assert (out.PhotometricInterpretation, out.PresentationLUTShape) == ("MONOCHROME1", "INVERSE")


def test_a_monochrome1_source_keeps_its_bits_stored_so_itk_reads_the_same_values(dev_data, tmp_path, caplog):
    """ITK inverts MONOCHROME1 over the range of the bits stored: the derived series said 16 bits where
    its 12-bit source said 12, and SimpleITK read it about 61,000 higher than the source."""
    import SimpleITK as sitk

    ds = pydicom.dcmread(dev_data / "dicom/pydicom-data/693_UNCR.dcm")  # int16: made unsigned 12-bit
    arr = np.clip(ds.pixel_array.astype(np.int32) + 2048, 0, 4095).astype(np.uint16)
    ds.set_pixel_data(arr, "MONOCHROME1", 12)
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 2048
    ds.save_as(tmp_path / "mono1.dcm")
    scan = load_scan(tmp_path / "mono1.dcm")
    hot = scan.array.copy()
    hot[:2, :2, :] = 1e5  # beyond 12 bits, within 16: clipped to the 12
    with caplog.at_level("WARNING", logger="medvae.io.derived_series"):
        out = save_scan(scan, hot, tmp_path / "out") / "IM0001.dcm"
    top = 4095 + float(ds.RescaleIntercept)
    assert f"4 pixel(s) lie outside the range of the source's stored type (uint16, 12 bits stored, slope 1, " \
           f"intercept {float(ds.RescaleIntercept):g}: {top - 4095:g}..{top:g})" in caplog.text
    written = pydicom.dcmread(out)
    assert (written.BitsStored, written.HighBit, written.PhotometricInterpretation) == (12, 11, "MONOCHROME1")
    assert load_scan(out).array.max() == pytest.approx(4095 + float(ds.RescaleIntercept))
    source_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "mono1.dcm")))
    out_itk = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    same = np.ones(source_itk.shape, bool)
    same[:, :2, :2] = False  # the hot corner
    np.testing.assert_array_equal(out_itk[same], source_itk[same])
    ct = pydicom.dcmread(save_scan(scan, scan.array, tmp_path / "mono2", description="x") / "IM0001.dcm")
    assert ct.BitsStored == 12
    ds.PhotometricInterpretation = "MONOCHROME2"  # MONOCHROME2: the stored type alone bounds the values
    (tmp_path / "m2").mkdir()
    ds.save_as(tmp_path / "m2" / "m2.dcm")
    m2 = load_scan(tmp_path / "m2" / "m2.dcm")
    assert pydicom.dcmread(save_scan(m2, m2.array, tmp_path / "m2out") / "IM0001.dcm").BitsStored == 16


def test_series_description_at_the_lo_limit_cuts_the_source_text_not_the_suffix(dev_data, tmp_path):
    """LO holds 64 characters: a corrupted-then-restored series came out as "... [medvae cor [medvae
    restored]". An earlier medvae suffix is replaced, and the source's text is cut at a word."""
    scan = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")
    text = "Head 1.0 H30s axial brain window iterative reconstruction 3"  # 59 characters
    scan.datasets[0].SeriesDescription = text
    first = save_scan(scan, scan.array, tmp_path / "corrupted", description="medvae corrupt gaussian seed 0")
    ds1 = pydicom.dcmread(first / "IM0001.dcm", stop_before_pixels=True)
    assert ds1.SeriesDescription == "Head 1.0 H30s axial brain [medvae corrupt gaussian seed 0]"
    second = load_scan(first)
    out = save_scan(second, second.array, tmp_path / "restored", description="medvae restored")
    ds2 = pydicom.dcmread(out / "IM0001.dcm", stop_before_pixels=True)
    assert ds2.SeriesDescription == "Head 1.0 H30s axial brain [medvae restored]"
    assert second.datasets[0].SeriesDescription == ds1.SeriesDescription  # the input is not modified


def test_every_file_of_a_derived_series_carries_the_series_one_time(dev_data, tmp_path, monkeypatch):
    import datetime as real

    import medvae.io.derived_series as ds_module

    src = tmp_path / "src"
    src.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]:
        d = pydicom.dcmread(f)
        d.SeriesDate, d.SeriesTime = "20040101", "101010"
        d.save_as(src / f.name)
    ticks = iter(range(100))

    class Clock(real.datetime):  # every call a second later: a slow write crosses seconds
        @classmethod
        def now(cls, tz=None):
            return real.datetime(2026, 12, 7, 1, 0, 0) + real.timedelta(seconds=next(ticks))

    monkeypatch.setattr(ds_module.datetime, "datetime", Clock)
    out = save_scan(load_scan(src), load_scan(src).array, tmp_path / "out")
    times = {(d.SeriesDate, d.SeriesTime) for d in map(pydicom.dcmread, sorted(out.glob("*.dcm")))}
    assert len(times) == 1 and times != {("20040101", "101010")}  # one new time, not the source's


def test_save_scan_names_the_model_it_is_given_and_refuses_a_path(ct_series, tmp_path):
    """The DerivationDescription names the model by its label; a path there could name a patient."""
    from medvae.models.label import model_label

    one = load_scan(sorted(Path(ct_series.path).glob("*.dcm"))[0])  # one slice: quick to write
    out = save_scan(one, one.array, tmp_path / "r", model="default")
    assert ", model default)" in pydicom.dcmread(next(out.glob("*.dcm"))).DerivationDescription
    ckpt = tmp_path / "DOE^JANE_model.pt"
    ckpt.write_bytes(b"weights")
    with pytest.raises(MedvaeError, match=r"model '.*DOE\^JANE_model.pt' is no model label"):
        save_scan(one, one.array, tmp_path / "r2", model=str(ckpt))
    assert not (tmp_path / "r2").exists()
    label = model_label(ckpt)
    out = save_scan(one, one.array, tmp_path / "r3", model=label)
    assert f", model {label})" in pydicom.dcmread(next(out.glob("*.dcm"))).DerivationDescription


@pytest.mark.parametrize("name", ["one.dcm", "one.DICOM", "one.ima", "one.dic"])
def test_a_dicom_output_of_a_file_named_like_a_file_is_refused(ct_series, tmp_path, name):
    one = load_scan(sorted(Path(ct_series.path).glob("*.dcm"))[0])
    # it became a folder named one.dcm, which a viewer or dcmdump then failed to open as a file
    with pytest.raises(MedvaeError, match=f"{name}: a DICOM output is a folder .* not a file name ending in"):
        save_scan(one, one.array, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_a_series_folder_named_like_a_file_gives_an_output_folder_named_so(ct_series, tmp_path):
    import shutil

    from medvae.batch import find_jobs

    src = tmp_path / "archive"
    shutil.copytree(ct_series.path, src / "head.dcm")
    # a batch keeps its inputs' names (and finds the outputs of earlier runs by them)
    assert [j.output.name for j in find_jobs(src, tmp_path / "out")] == ["head.dcm"]
    series = load_scan(src / "head.dcm")
    assert save_scan(series, series.array, tmp_path / "out" / "head.dcm").is_dir()
    (tmp_path / "link").symlink_to(src / "head.dcm")  # the folder's own name, through a link too
    linked = load_scan(tmp_path / "link")
    assert save_scan(linked, linked.array, tmp_path / "out2" / "head.dcm").is_dir()
    (src / "alias.dcm").symlink_to(src / "head.dcm")  # a batch names it by the link: alias.dcm
    aliased = load_scan(src / "alias.dcm")
    assert save_scan(aliased, aliased.array, tmp_path / "out3" / "alias.dcm").is_dir()
    with pytest.raises(MedvaeError, match="out.dcm: a DICOM output is a folder"):  # another name: refused
        save_scan(series, series.array, tmp_path / "out.dcm")
