"""DICOM reading: series geometry against NIfTI, multi-frame, codecs, series choice, MONAI reader."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medvae.errors import MedvaeError
from medvae.io import list_series, load_scan


def test_simpleitk_series_matches_nifti_voxels_and_geometry(dev_data, dev_expect, assert_same_image):
    head = dev_expect.ct_head
    nii = load_scan(dev_data / "nifti/invesalius_cranium_ct.nii.gz")
    dcm = load_scan(dev_data / "dicom/series_ct_head")
    assert dcm.format == "dicom" and dcm.modality == "CT"
    assert dcm.array.shape == nii.array.shape == head.shape
    assert dcm.series_uid == head.series_uid and dcm.description == head.description
    assert len(dcm.datasets) == len(dcm.files) == head.n_slices
    np.testing.assert_allclose(dcm.spacing, nii.spacing, atol=1e-5)
    # same physical corners (slice order may be reversed) and the same HU at matching points
    assert_same_image(nii.array, nii.affine, dcm.array, dcm.affine, atol_mm=1e-3)
    # files are in Z order: position along the affine's Z column increases
    z = [float(np.dot(ds.ImagePositionPatient, np.cross(ds.ImageOrientationPatient[:3],
                                                      ds.ImageOrientationPatient[3:])))
         for ds in dcm.datasets]
    assert np.all(np.diff(z) > 0)
    assert all("PixelData" not in ds for ds in dcm.datasets)  # dropped after decoding


def test_slice_spacing_comes_from_positions_not_thickness(dev_data, dev_expect, tmp_path):
    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SliceThickness = "7.5"  # misleading thickness; positions are 1.5 mm (stand-in: 5 mm) apart
        ds.save_as(folder / f.name)
    scan = load_scan(folder)
    assert scan.array.shape == (*dev_expect.ct_head.shape[:2], 3)
    assert dev_expect.ct_head.spacing[2] != 7.5
    assert scan.spacing[2] == pytest.approx(dev_expect.ct_head.spacing[2], abs=1e-6)


def test_single_slice_uses_spacing_between_slices_or_thickness(dev_data, tmp_path):
    ct = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")
    ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    assert ct.array.shape == (128, 128, 1)
    np.testing.assert_allclose(ct.spacing, (0.661468, 0.661468, float(ds.SpacingBetweenSlices)),
                               atol=1e-6)
    assert (ct.array.min(), ct.array.max()) == (-896.0, 1167.0)  # rescale applied (HU)
    del ds.SpacingBetweenSlices
    ds.SliceThickness = "3.25"
    ds.save_as(tmp_path / "thick.dcm")
    assert load_scan(tmp_path / "thick.dcm").spacing[2] == pytest.approx(3.25)
    del ds.SliceThickness
    ds.save_as(tmp_path / "none.dcm")
    assert load_scan(tmp_path / "none.dcm").spacing[2] == pytest.approx(1.0)
    mr2 = load_scan(dev_data / "dicom/pydicom-data/MR2_UNCR.dcm")  # MONAI gets this spacing wrong
    ds2 = pydicom.dcmread(dev_data / "dicom/pydicom-data/MR2_UNCR.dcm", stop_before_pixels=True)
    np.testing.assert_allclose(mr2.spacing[:2], [float(v) for v in ds2.PixelSpacing], rtol=1e-5)
    assert mr2.spacing[2] == pytest.approx(float(ds2.SpacingBetweenSlices))
    assert mr2.array.shape == (1024, 1024, 1)
    assert mr2.array.max() == pytest.approx(float(pydicom.dcmread(
        dev_data / "dicom/pydicom-data/MR2_UNCR.dcm").pixel_array.max()) * float(ds2.get("RescaleSlope", 1)), rel=1e-5)


@pytest.mark.parametrize("reader", ["monai", "native"])
def test_modality_falls_back_to_the_sop_class(dev_data, tmp_path, reader):
    # without the Modality tag a CT Image Storage object is still CT: restored as "OT" it would take
    # the MR path (percentile window, no CT padding rule)
    for name, want in (("dicom/pydicom/CT_small.dcm", "CT"), ("dicom/pydicom/MR_small.dcm", "MR")):
        ds = pydicom.dcmread(dev_data / name)
        del ds.Modality
        ds.save_as(tmp_path / f"{want}.dcm")
        assert load_scan(tmp_path / f"{want}.dcm", reader=reader).modality == want


def test_enhanced_mr_multiframe_emri_small(dev_data):
    path = dev_data / "dicom/pydicom-data/emri_small.dcm"
    scan = load_scan(path)
    ds = pydicom.dcmread(path)
    assert scan.array.shape == (64, 64, 10)  # MONAI's PydicomReader gives (64, 10, 64)
    # this file carries no functional groups, so no PixelMeasuresSequence / PixelSpacing: the
    # in-plane spacing is unknown (1 mm assumed) and the slice spacing is SpacingBetweenSlices
    assert "SharedFunctionalGroupsSequence" not in ds and "PixelSpacing" not in ds
    assert scan.spacing == pytest.approx((1.0, 1.0, float(ds.SpacingBetweenSlices)))
    assert scan.spacing[2] == pytest.approx(1.2)
    frames = ds.pixel_array  # (frames, rows, cols)
    np.testing.assert_array_equal(scan.array, frames.transpose(2, 1, 0).astype(np.float32))
    assert len(scan.datasets) == 1 and scan.modality == "MR"


def test_enhanced_ct_geometry_from_functional_groups(dev_data):
    path = dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm"
    scan = load_scan(path)
    ds = pydicom.dcmread(path)
    shared = ds.SharedFunctionalGroupsSequence[0]
    ps = [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing]
    pos = [np.array(f.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
           for f in ds.PerFrameFunctionalGroupsSequence]
    assert scan.array.shape == (512, 512, 2)  # MONAI's PydicomReader gives (512, 2, 512)
    np.testing.assert_allclose(scan.spacing, (ps[1], ps[0], np.linalg.norm(pos[1] - pos[0])),
                               rtol=1e-6)
    assert scan.spacing[2] == pytest.approx(10.0)
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    lps_to_ras = np.array([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(scan.affine[:3, 3], pos[0] * lps_to_ras)
    np.testing.assert_allclose(scan.affine[:3, 0], iop[:3] * ps[1] * lps_to_ras, atol=1e-9)
    # rescale from the shared PixelValueTransformationSequence (intercept -1024)
    inter = float(shared.PixelValueTransformationSequence[0].RescaleIntercept)
    np.testing.assert_array_equal(scan.array, ds.pixel_array.transpose(2, 1, 0) + inter)


def test_a_series_of_single_frame_enhanced_files_is_ordered_by_position(dev_data, tmp_path):
    """Their positions are in functional groups: the series was ordered by InstanceNumber, 1.667 mm apart."""
    import copy

    from pydicom.sequence import Sequence

    src = pydicom.dcmread(dev_data / "dicom/pydicom-data/eCT_Supplemental.dcm")
    uid, folder = pydicom.uid.generate_uid(), tmp_path / "enhanced_series"
    folder.mkdir()
    for k, (z, number) in enumerate(zip((0.0, 5.0, 10.0, 15.0), (3, 1, 4, 2))):
        ds = copy.deepcopy(src)
        ds.NumberOfFrames = 1
        frame = copy.deepcopy(src.PerFrameFunctionalGroupsSequence[0])
        frame.PlanePositionSequence[0].ImagePositionPatient = [99.5, -301.5, z]
        ds.PerFrameFunctionalGroupsSequence = Sequence([frame])
        ds.PixelData = np.full(src.pixel_array.shape[1:], 1024 + 100 * k, src.pixel_array.dtype).tobytes()
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.InstanceNumber = uid, pydicom.uid.generate_uid(), number
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(folder / f"f{k}.dcm")
    scan = load_scan(folder)
    assert scan.spacing[2] == pytest.approx(5.0)
    z = scan.affine[2, 3] + scan.affine[2, 2] * np.arange(4)
    np.testing.assert_allclose(scan.array[0, 0], z / 5 * 100)  # the slice at z mm holds 100 * z / 5 HU


def test_a_broken_file_of_another_series_blocks_only_its_own(dev_data, dev_expect, tmp_path):
    """A scout claiming 2048x2048 pixels in a 39 KB file made every series of its folder unreadable."""
    from medvae.errors import MedvaeError

    folder = tmp_path / "study"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    scout = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")
    scout.Rows = scout.Columns = 2048
    scout.SeriesInstanceUID = "1.2.3.200"
    scout.save_as(folder / "scout.dcm")
    uid = dev_expect.ct_head.series_uid
    assert load_scan(folder, series=uid).array.shape[2] == 3
    with pytest.raises(MedvaeError, match=r"scout.dcm: the header promises 1 frame\(s\) of 2048x2048 pixels"):
        load_scan(folder, series="1.2.3.200")


def test_a_tri_plane_localizer_is_named_as_mixed_orientations(dev_data, tmp_path):
    from medvae.errors import MedvaeError

    folder = tmp_path / "localizer"
    folder.mkdir()
    for name, iop in (("axial", [1, 0, 0, 0, 1, 0]), ("coronal", [1, 0, 0, 0, 0, -1]), ("sagittal", [0, 1, 0, 0, 0, -1])):
        ds = pydicom.dcmread(dev_data / "dicom/pydicom/MR_small.dcm")
        ds.ImageOrientationPatient, ds.ImagePositionPatient = iop, [0, 0, 0]  # all through the isocentre
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"{name}.dcm")
    with pytest.raises(MedvaeError, match=r"different orientations \(ImageOrientationPatient 1\\0\\0\\0\\1\\0 "
                                          r"vs .*a localizer or a reformat"):
        load_scan(folder)


@pytest.mark.parametrize("variant", ["MR_small_RLE", "MR_small_jp2klossless",
                                     "MR_small_jpeg_ls_lossless"])
def test_codec_variants_decode_to_the_uncompressed_pixels(dev_data, variant):
    ref = load_scan(dev_data / "dicom/pydicom/MR_small.dcm")
    scan = load_scan(dev_data / f"dicom/pydicom/{variant}.dcm")
    np.testing.assert_array_equal(scan.array, ref.array)
    np.testing.assert_allclose(scan.affine, ref.affine)


def test_jpeg_lossless_and_jpeg2000_ct_decode(dev_data):
    ds = pydicom.dcmread(dev_data / "dicom/pydicom-data/bad_sequence.dcm", stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    scan = load_scan(dev_data / "dicom/pydicom-data/bad_sequence.dcm")
    assert scan.array.shape == (512, 512, 1) and scan.modality == "CT"
    assert (scan.array.min(), scan.array.max()) == (-1011.0, 1243.0)
    j2k = load_scan(dev_data / "dicom/pydicom/J2K_pixelrep_mismatch.dcm")
    assert (j2k.array.min(), j2k.array.max()) == (-2000.0, 1896.0)


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")
def test_monai_loadimage_with_medvae_reader(dev_data, dev_expect):
    from monai.transforms import LoadImage

    from medvae.io.dicom import MedvaeDicomReader

    reader = MedvaeDicomReader()
    img = LoadImage(reader=reader, image_only=True)(str(dev_data / "dicom/pydicom-data/emri_small.dcm"))
    assert tuple(img.shape) == (64, 64, 10)
    assert reader.verify_suffix(str(dev_data / "dicom/series_ct_head"))
    assert not reader.verify_suffix(str(dev_data / "nifti/nibabel_example4d.nii.gz"))
    img2, meta = LoadImage(reader=MedvaeDicomReader(), image_only=False)(
        str(dev_data / "dicom/series_ct_head"))
    scan = load_scan(dev_data / "dicom/series_ct_head")
    np.testing.assert_allclose(np.asarray(img2.affine), scan.affine)
    assert meta["modality"] == "CT" and meta["series_uid"] == dev_expect.ct_head.series_uid


def test_the_dicom_reader_travels_to_spawned_workers():
    """DataLoader workers started by spawn (macOS, Windows) or forkserver pickle the pipeline."""
    import pickle

    from medvae.io.dicom import MedvaeDicomReader

    reader = pickle.loads(pickle.dumps(MedvaeDicomReader(series="1.2.3")))
    assert type(reader) is MedvaeDicomReader


@pytest.fixture
def two_series(dev_data, tmp_path):
    folder = tmp_path / "two_series"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "other").mkdir()
    (folder / "other" / "ct_small.dcm").write_bytes((dev_data / "dicom/pydicom/CT_small.dcm").read_bytes())
    (folder / "notes.txt").write_text("not dicom")
    return folder


def test_two_series_listing_error_and_choice(two_series, dev_data, dev_expect):
    head = dev_expect.ct_head
    other_uid = str(pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm").SeriesInstanceUID)
    with pytest.raises(MedvaeError) as err:
        load_scan(two_series)
    msg = str(err.value)
    assert "2 series" in msg and "--series" in msg and "\n" not in msg
    # a SeriesDescription can name the patient, and stderr is a batch job's log: UIDs and sizes only
    assert head.series_uid in msg and other_uid in msg and head.description not in msg
    assert "(4 slices)" in msg and "(1 slice)" in msg and "medvae info lists their descriptions" in msg
    assert err.value.series  # structured listing for `medvae info`
    scan = load_scan(two_series, series=head.series_uid)
    assert scan.array.shape == (*head.shape[:2], 4) and scan.series_uid == head.series_uid
    assert load_scan(two_series, series=other_uid).array.shape == (128, 128, 1)
    with pytest.raises(MedvaeError, match="no series 1.2.3"):
        load_scan(two_series, series="1.2.3")
    table = sorted(list_series(two_series))
    assert (head.series_uid, head.description, 4) in table and len(table) == 2


def test_list_series_of_the_dev_series(dev_data, dev_expect):
    head = dev_expect.ct_head
    assert list_series(dev_data / "dicom/series_ct_head") == [(head.series_uid, head.description, head.n_slices)]


def test_hidden_folders_dicomdir_and_other_files_are_ignored(dev_data, dev_expect, tmp_path):
    head = dev_expect.ct_head
    from pydicom.dataset import Dataset, FileMetaDataset

    folder = tmp_path / "export"
    (folder / ".medvae-tmp").mkdir(parents=True)
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / ".medvae-tmp" / "IM0001.dcm").write_bytes(
        (dev_data / "dicom/pydicom/CT_small.dcm").read_bytes())  # another series, hidden
    (folder / "README.txt").write_text("export notes")
    index = Dataset()
    index.file_meta = FileMetaDataset()
    index.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    index.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    index.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    index.FileSetID = "TEST"
    index.save_as(folder / "DICOMDIR", enforce_file_format=True)
    scan = load_scan(folder)
    assert scan.array.shape == (*head.shape[:2], 3) and len(scan.files) == 3
    assert list_series(folder) == [(head.series_uid, head.description, 3)]


def test_a_slice_without_preamble_is_named_in_a_warning(dev_data, dev_expect, tmp_path, caplog):
    # pydicom reads a bare dataset with force=True, medvae needs the DICM marker; a silently
    # dropped end slice would shorten the series without an uneven-spacing warning
    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]
    for f in files:
        (folder / f.name).write_bytes(f.read_bytes())
    ds = pydicom.dcmread(folder / files[-1].name)
    ds.preamble = None
    pydicom.dcmwrite(folder / files[-1].name, ds, enforce_file_format=False)
    (folder / "notes.txt").write_text("export notes")
    with caplog.at_level("INFO", logger="medvae.io.dicom"):
        scan = load_scan(folder)
    assert scan.array.shape[2] == 3
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "ignoring 1 file(s) that look like DICOM" in warned[0]
    assert files[-1].name in warned[0] and "notes.txt" not in warned[0]
