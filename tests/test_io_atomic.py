"""Atomic writes: a failure leaves nothing, overwrite rules, refusing to write onto the input."""
from __future__ import annotations

import os

import numpy as np
import pydicom
import pytest

import medvae.io.derived_series as derived_series
from medvae.errors import MedvaeError
from medvae.io import load_scan, save_scan
from medvae.io.atomic import atomic_output


@pytest.fixture
def small_series(dev_data, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))
    start = min(40, len(files) - 3)  # dev: slices 41..43 of 108; the 4-slice stand-in: its last 3
    for f in files[start:start + 3]:
        (folder / f.name).write_bytes(f.read_bytes())
    return load_scan(folder)


def _fail_after_first(monkeypatch):
    real = derived_series._write_dataset
    calls = []

    def flaky(ds, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError("disk full (simulated)")
        real(ds, path)

    monkeypatch.setattr(derived_series, "_write_dataset", flaky)
    return calls


def _leftovers(folder, name):
    return [p.name for p in folder.iterdir() if p.name.startswith(f".{name}")]


def test_failure_mid_series_leaves_nothing(small_series, tmp_path, monkeypatch):
    calls = _fail_after_first(monkeypatch)
    out = tmp_path / "out" / "restored"  # parent folder created on the fly, removed on failure
    with pytest.raises(OSError, match="simulated"):
        save_scan(small_series, small_series.array, out)
    assert len(calls) == 2  # the first file was written before the failure
    assert not out.exists() and not out.parent.exists()
    assert _leftovers(tmp_path, "restored") == []


def test_failure_with_overwrite_keeps_the_old_output(small_series, tmp_path, monkeypatch):
    out = tmp_path / "restored"
    save_scan(small_series, small_series.array, out)
    old = sorted(p.read_bytes() for p in out.iterdir())
    _fail_after_first(monkeypatch)
    with pytest.raises(OSError):
        save_scan(small_series, small_series.array * 0, out, overwrite=True)
    assert sorted(p.read_bytes() for p in out.iterdir()) == old
    assert _leftovers(tmp_path, "restored") == []


def test_overwrite_refusal_and_replacement(small_series, tmp_path):
    out = save_scan(small_series, small_series.array, tmp_path / "restored")
    with pytest.raises(MedvaeError, match="already exists") as err:
        save_scan(small_series, small_series.array, out)
    assert "restored" in str(err.value)
    save_scan(small_series, small_series.array - 5, out, overwrite=True)
    assert np.array_equal(load_scan(out).array, small_series.array - 5)
    assert sorted(p.name for p in out.iterdir()) == [".medvae-output.json", "IM0001.dcm", "IM0002.dcm",
                                                     "IM0003.dcm"]
    assert _leftovers(tmp_path, "restored") == []
    nii = save_scan(small_series, small_series.array, tmp_path / "r.nii.gz")
    with pytest.raises(MedvaeError, match="already exists"):
        save_scan(small_series, small_series.array, nii)
    save_scan(small_series, small_series.array + 1, nii, overwrite=True)
    assert np.array_equal(load_scan(nii).array, small_series.array + 1)


def test_nifti_failure_leaves_nothing(dev_data, tmp_path, monkeypatch):
    import nibabel

    scan = load_scan(dev_data / "nifti/heudiconv_axasc35.nii.gz")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated")

    monkeypatch.setattr(nibabel, "save", broken)
    with pytest.raises(RuntimeError):
        save_scan(scan, scan.array, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_output_equal_to_input_is_refused(small_series, dev_data, tmp_path, copy_into):
    with pytest.raises(MedvaeError, match="is the input"):
        save_scan(small_series, small_series.array, small_series.path, overwrite=True)
    with pytest.raises(MedvaeError, match="inside the input folder"):
        save_scan(small_series, small_series.array, small_series.path / "restored")
    with pytest.raises(MedvaeError, match="holds the input"):
        save_scan(small_series, small_series.array, tmp_path, overwrite=True)
    with pytest.raises(MedvaeError, match="is the input"):
        save_scan(small_series, small_series.array, small_series.files[0], overwrite=True)
    nii = copy_into(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    scan = load_scan(nii)
    with pytest.raises(MedvaeError, match="is the input") as err:
        save_scan(scan, scan.array, nii, overwrite=True)
    assert "heudiconv_axasc35.nii.gz" in str(err.value)
    assert len(list(small_series.path.iterdir())) == 3  # input untouched


def test_atomic_output_kinds(tmp_path):
    with atomic_output(tmp_path / "a.txt", kind="file") as tmp:
        assert tmp.name == "a.txt" and tmp.parent != tmp_path
        tmp.write_text("x")
    assert (tmp_path / "a.txt").read_text() == "x"
    (tmp_path / "empty").mkdir()
    with atomic_output(tmp_path / "empty", kind="dir") as tmp:  # an empty folder is free
        (tmp / "f").write_text("y")
    assert (tmp_path / "empty" / "f").read_text() == "y"
    with pytest.raises(MedvaeError, match="is a folder"):
        with atomic_output(tmp_path / "empty", kind="file", overwrite=True):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "empty"]
    (tmp_path / "link").symlink_to(tmp_path / "gone")  # was "is a file" (a folder) or "already exists" (a file)
    for kind in ("file", "dir"):
        with pytest.raises(MedvaeError, match=r"link: is a broken symbolic link \(to .*gone\); remove it"):
            with atomic_output(tmp_path / "link", kind=kind, overwrite=True):
                pass
    assert not (tmp_path / "gone").exists()
    # a link to an empty folder or an earlier output: the commit replaced the link, the target kept the old data
    (tmp_path / "target").mkdir()
    (tmp_path / "to_dir").symlink_to(tmp_path / "target")
    (tmp_path / "to_file").symlink_to(tmp_path / "a.txt")
    for name, kind in (("to_dir", "dir"), ("to_file", "file")):
        with pytest.raises(MedvaeError, match=rf"{name}: is a symbolic link \(to .*\); give the path it points to"):
            with atomic_output(tmp_path / name, kind=kind, overwrite=True):
                pass
        assert (tmp_path / name).is_symlink()
    assert list((tmp_path / "target").iterdir()) == []


def test_interrupt_inside_all_or_none_puts_the_replaced_outputs_back(tmp_path):
    from medvae.io.atomic import all_or_none, claim_output

    scan, mask = tmp_path / "o.nii", tmp_path / "o_mask.nii"
    scan.write_text("old scan")
    mask.write_text("old mask")
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the scan was replaced, before the mask
        with claim_output(scan, kind="file", overwrite=True), claim_output(mask, kind="file", overwrite=True):
            with all_or_none(scan, mask):
                with atomic_output(scan, kind="file", overwrite=True) as tmp:
                    tmp.write_text("new scan")
                assert scan.read_text() == "new scan"
                raise KeyboardInterrupt
    assert (scan.read_text(), mask.read_text()) == ("old scan", "old mask")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.nii", "o_mask.nii"]


def test_a_rerun_puts_back_the_output_a_killed_rename_left_in_staging(tmp_path):
    from medvae.io.atomic import REPLACED, STAGING_FILE, _new_stage, claim_output

    out = tmp_path / "restored"
    stage = _new_stage(out)  # killed between moving the old series away and moving the new one in
    (stage / REPLACED).mkdir()
    (stage / REPLACED / "IM0001.dcm").write_text("old")
    assert (stage / STAGING_FILE).is_file() and not out.exists()
    with pytest.raises(MedvaeError, match="refusing to replace a folder medvae did not write"):  # (no marker here)
        with claim_output(out, kind="dir"):
            pass
    assert (out / "IM0001.dcm").read_text() == "old" and not stage.exists()


def test_files_written_into_a_folder_output_meanwhile_are_never_removed(tmp_path):
    """A report folder empty at its claim, and a restore writing into it meanwhile: the report's rename
    moved the folder aside and removed it, the restored file with it (both commands exited 0)."""
    out = tmp_path / "report"
    out.mkdir()
    with pytest.raises(MedvaeError, match=r"report: files were written into this folder while medvae wrote it "
                                          r"\(.*o\.nii\.gz.*\); nothing was replaced"):
        with atomic_output(out, kind="dir") as tmp:
            (tmp / "index.html").write_text("page")
            (out / "o.nii.gz").write_bytes(b"another command's output")
    assert (out / "o.nii.gz").read_bytes() == b"another command's output"
    (out / "o.nii.gz").unlink()
    for text in ("page", "page 2"):  # an empty folder, then medvae's own earlier output: replaced as before
        with atomic_output(out, kind="dir", overwrite=True) as tmp:
            (tmp / "index.html").write_text(text)
    assert sorted(p.name for p in out.iterdir()) == [".medvae-output.json", "index.html"]
    assert (out / "index.html").read_text() == "page 2"


def test_a_dicom_file_replaced_while_its_series_is_read_is_refused(dev_data, tmp_path):
    """Restore reads headers first and pixels later, slab by slab: a file replaced meanwhile (another
    command's --overwrite) mixed two series, and two patients, into one restored series."""
    import shutil

    from medvae.io.dicom import open_series

    folder = tmp_path / "series"
    folder.mkdir()
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]
    for f in files:
        shutil.copyfile(f, folder / f.name)
    series = open_series(folder)
    series.headers.clear()  # as the streamed restore drops them once checked
    other = pydicom.dcmread(folder / files[1].name)
    other.SOPInstanceUID = other.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    other.save_as(folder / files[1].name)  # a new instance at the same path
    series.read(0, 1)  # the files before it are as they were
    with pytest.raises(MedvaeError, match=f"{files[1].name}: the file was replaced while the series was read"):
        series.read(0, 3)


def test_a_nifti_file_replaced_while_it_is_read_is_refused(dev_data, tmp_path, monkeypatch):
    """The header and the voxels are read by two opens: a swap between them gave one version's affine
    with the other's voxels (3 of 15 restores in the audit)."""
    import shutil

    import medvae.io.nifti as nifti

    path = tmp_path / "in.nii.gz"
    shutil.copyfile(dev_data / "nifti/heudiconv_axasc35.nii.gz", path)
    shape = load_scan(path, reader="native").array.shape
    real = nifti.read_voxels

    def swapped(img, *a, **k):  # another version renamed into place, as --overwrite does
        other = tmp_path / "v2.nii.gz"
        shutil.copyfile(dev_data / "nifti/heudiconv_axasc35.nii.gz", other)
        os.replace(other, path)
        return real(img, *a, **k)

    monkeypatch.setattr(nifti, "read_voxels", swapped)
    with pytest.raises(MedvaeError, match="in.nii.gz: the file was replaced or changed while it was read"):
        load_scan(path, reader="native")
    monkeypatch.setattr(nifti, "read_voxels", real)
    assert load_scan(path, reader="native").array.shape == shape
