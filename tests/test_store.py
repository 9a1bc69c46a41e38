"""The slice store (issue 12): prepare from a manifest, read slices back, train from disk, DDP shards."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tiny_training import TINY
from medvae.cli import main as cli
from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy, normalize
from medvae.io import load_scan
from medvae.store import SliceStore, prepare_store, read_manifest, refuse_repeated_scans, subject_split
from medvae.training.config import load_config
from medvae.training.data import _fit
from medvae.training.loop import train


def _manifest(tmp_path: Path, dev: Path, rows: list[str], name: str = "data.csv") -> Path:
    m = tmp_path / name
    m.write_text("path,subject,modality,split,series_uid\n" + "\n".join(rows) + "\n")
    return m


def test_a_manifest_with_a_bad_modality_or_a_folder_for_a_manifest_is_refused_up_front(dev_data, tmp_path):
    """A modality PET failed its row alone, and the store was marked complete; a folder was "not found"."""
    m = _manifest(tmp_path, dev_data, [f"{dev_data}/dicom/pydicom/CT_small.dcm,s1,PET,,"])
    with pytest.raises(MedvaeError, match="manifest row 1: modality must be one of CT, MR or empty, got 'PET'"):
        read_manifest(m)
    with pytest.raises(MedvaeError, match="is a folder; give a manifest file"):
        read_manifest(dev_data)


def _dev_rows(dev: Path) -> list[str]:
    return [f"{dev}/nifti/heudiconv_axasc35.nii.gz,subjA,,train,",
            f"{dev}/dicom/pydicom/CT_small.dcm,subjB,,train,",
            f"{dev}/dicom/pydicom/MR_small.dcm,subjC,,val,"]


def test_prepare_store_slices_equal_normalized_scan_and_rerun_adds_nothing(dev_data, tmp_path):
    head = dev_data / "dicom" / "series_ct_head"
    m = _manifest(tmp_path, dev_data, _dev_rows(dev_data) + [f"{head},subjD,CT,,"])
    store_dir = tmp_path / "store"
    rep = prepare_store(m, store_dir)
    assert len(rep.added) == 4 and not rep.skipped and not rep.failed

    store = SliceStore(store_dir)
    assert store.intensity == IntensityPolicy()
    by_subject = {r.subject: r for r in store.records}
    policy = IntensityPolicy()
    for subject, path in (("subjA", dev_data / "nifti" / "heudiconv_axasc35.nii.gz"), ("subjD", head)):
        scan = load_scan(path)
        ref = normalize(scan.array, policy.window_for(scan.array, scan.modality))
        rec = by_subject[subject]
        assert rec.shape == list(scan.array.shape) and rec.modality == scan.modality
        mm = store.open_volume(rec.key)
        assert isinstance(mm, np.memmap) and mm.shape == (ref.shape[2], *ref.shape[:2])
        for k in (0, ref.shape[2] // 2, ref.shape[2] - 1):
            assert np.array_equal(store.read_slice(rec.key, k), ref[:, :, k])
    # the review figure's labels in MLflow: the keys are plain hashes of the scans' paths, so a guessed
    # path was matched against them; keyed again (medvae.identifiers)
    from medvae.training.data import store_volumes

    names = [v.name for v in store_volumes(store, split="train", min_size=8, min_foreground=0.0)]
    assert names and not any(r.key[:8] in n for r in store.records for n in names)
    # the head CT in HU: -1000..1000 maps to 0..1, air about 0, bone above 0.5
    ct = store.read_slice(by_subject["subjD"].key, by_subject["subjD"].shape[2] // 2)  # dev: 54 of 108
    assert ct.min() < 0.05 and ct.max() > 0.9

    # the index holds no file name and no DICOM identifier, only what the manifest gave
    text = (store_dir / "store.json").read_text()
    ds = pydicom.dcmread(sorted(head.iterdir())[0], stop_before_pixels=True)
    for word in ("heudiconv", "CT_small", "MR_small", "series_ct_head", str(dev_data),
                 str(ds.PatientName), str(ds.PatientID), str(ds.SeriesInstanceUID)):
        if len(word) >= 4:
            assert word not in text
    assert {r.subject for r in store.records} == {"subjA", "subjB", "subjC", "subjD"}
    assert by_subject["subjC"].split == "val"
    assert by_subject["subjD"].split == subject_split("subjD", val_fraction=0.2, seed=0)

    # a second run reads nothing and rewrites no volume
    mtimes = {p: p.stat().st_mtime_ns for p in (store_dir / "volumes").iterdir()}
    rep2 = prepare_store(m, store_dir)
    assert not rep2.added and len(rep2.skipped) == 4
    assert {p: p.stat().st_mtime_ns for p in (store_dir / "volumes").iterdir()} == mtimes
    # a new row is added alone, and existing subjects keep their split
    m2 = _manifest(tmp_path, dev_data, _dev_rows(dev_data) + [f"{head},subjD,CT,,",
                                                               f"{dev_data}/nifti/nibabel_example4d.nii.gz,subjE,,,"],
                   name="more.csv")
    rep3 = prepare_store(m2, store_dir)
    assert len(rep3.added) == 1 and len(rep3.skipped) == 4
    assert len(SliceStore(store_dir).records) == 5


def test_prepare_command_reports_a_bad_row_and_keeps_the_rest(dev_data, tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    m = _manifest(tmp_path, dev_data, [_dev_rows(dev_data)[0], f"{bad},subjX,,,", _dev_rows(dev_data)[1]])
    assert cli(["prepare", str(m), str(tmp_path / "store")]) == 2  # bad input (was 1)
    out, err = capsys.readouterr()
    assert "2 volume(s) added" in out and "1 failed" in out
    assert "manifest row 2 failed" in err and "broken.nii.gz" in err
    assert len(SliceStore(tmp_path / "store", allow_incomplete=True).records) == 2
    assert not [p for p in (tmp_path / "store").rglob("*") if ".medvae-" in p.name]  # no temporaries left
    # the store was marked complete: training ran on the rows it could read, one subject short
    with pytest.raises(MedvaeError, match=r"incomplete store: its last `medvae prepare` could not read manifest "
                                          r"row\(s\) 2; fix them or take them out of the manifest"):
        SliceStore(tmp_path / "store")
    bad.write_bytes((dev_data / "nifti/heudiconv_axasc35.nii.gz").read_bytes())  # the row fixed: complete
    assert cli(["prepare", str(m), str(tmp_path / "store")]) == 0
    assert len(SliceStore(tmp_path / "store").records) == 3


def test_a_repeated_row_is_refused_also_through_a_link(dev_data, tmp_path):
    # a linked copy under another subject was a volume of its own: the same scan trained and validated
    src = dev_data / "dicom" / "pydicom" / "CT_small.dcm"
    link = tmp_path / "copy.dcm"
    link.symlink_to(src)
    with pytest.raises(MedvaeError, match=r"rows 1 and 2 list the same scan \(one through a link\)"):
        prepare_store(_manifest(tmp_path, dev_data, [f"{src},a,,train,", f"{link},b,,val,"]), tmp_path / "s")
    with pytest.raises(MedvaeError, match="rows 1 and 2 list the same scan$"):
        prepare_store(_manifest(tmp_path, dev_data, [f"{src},a,,,", f"{src},b,,,"]), tmp_path / "s2")
    other = tmp_path / "other.dcm"  # a real copy is a file of its own (its pixels are another matter)
    other.write_bytes(src.read_bytes())
    assert len(prepare_store(_manifest(tmp_path, dev_data, [f"{src},a,,,", f"{other},b,,,"]), tmp_path / "s3").added) == 2


def test_a_store_inside_or_over_a_scan_folder_is_refused(dev_data, tmp_path, copy_into):
    series = copy_into(dev_data / "dicom" / "series_ct_head", "series")
    before = sorted(p.name for p in series.iterdir())
    manifest = _manifest(tmp_path, dev_data, [f"{series},a,,,"])
    for store in (series, series / "store", tmp_path):
        with pytest.raises(MedvaeError, match=r"the store folder overlaps the input .*series \(manifest row 1\)"):
            prepare_store(manifest, store)
    assert sorted(p.name for p in series.iterdir()) == before


def test_manifest_errors_name_the_row(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("path,subject,split\na.nii.gz,s1,train\nb.nii.gz,s1,val\n")
    with pytest.raises(MedvaeError, match=r"rows 1 and 2: subject 's1' is in both 'train' and 'val'"):
        read_manifest(m)
    m.write_text("path,subject,site\na.nii.gz,s1,x\n")
    with pytest.raises(MedvaeError, match=r"unknown manifest column\(s\) 'site'"):
        read_manifest(m)
    m.write_text("path,subject\na.nii.gz,\n")
    with pytest.raises(MedvaeError, match="row 1: 'path' and 'subject' are required"):
        read_manifest(m)
    m.write_text("path,subject\na.nii.gz,s1\nscans/smith,john.nii.gz,s2\n")  # an unquoted comma: once
    with pytest.raises(MedvaeError, match=r"row 2 has 1 more field\(s\) than the header \(path, subject\)"):
        read_manifest(m)                                                        # subject 'john.nii.gz'
    m.write_text('path,subject\n"scans/smith,john.nii.gz",s2\n')
    assert read_manifest(m)[0].path.name == "smith,john.nii.gz"
    m.write_text("path,subject,series_uid\nct.dcm,s1,1.2.3/../../escaped\n")  # it names an output folder
    with pytest.raises(MedvaeError, match=r"row 1: series_uid must be a DICOM UID \(digits and dots, at most 64 "
                                          r"characters\), got '1.2.3/../../escaped'"):
        read_manifest(m)
    y = tmp_path / "m.yaml"
    y.write_text("volumes:\n  - {path: scans/a.nii.gz, subject: s1, modality: CT}\n")
    (e,) = read_manifest(y)
    assert e.path == tmp_path / "scans" / "a.nii.gz" and e.modality == "CT" and e.split is None


def test_subject_split_is_per_subject_and_stable():
    subjects = [f"p{i:04d}" for i in range(2000)]
    val = [s for s in subjects if subject_split(s, val_fraction=0.2, seed=0) == "val"]
    assert 0.17 < len(val) / len(subjects) < 0.23
    # adding subjects never moves an existing one
    assert all(subject_split(s, val_fraction=0.2, seed=0) == "val" for s in val)
    assert val != [s for s in subjects if subject_split(s, val_fraction=0.2, seed=1) == "val"]


def test_fit_matches_the_former_numpy_pad_and_crop():
    def former(patch, size):  # training/data._fit before it used MONAI
        out = patch
        for ax in (0, 1):
            n = out.shape[ax]
            if n < size:
                before = (size - n) // 2
                pad = [(0, 0), (0, 0)]
                pad[ax] = (before, size - n - before)
                out = np.pad(out, pad, mode="reflect" if n > (size - n) // 2 + 1 else "edge")
            elif n > size:
                start = (n - size) // 2
                out = out.take(range(start, start + size), axis=ax)
        return out

    rng = np.random.default_rng(0)
    # even sizes (patches, crops of real slices): identical. MONAI centres an odd crop of an odd
    # excess one pixel further, which the former code did not.
    for shape, size in [((64, 35), 128), ((130, 127), 128), ((181, 217), 128), ((5, 40), 32), ((1, 3), 8),
                        ((48, 200), 128), ((256, 256), 256)]:
        a = rng.random(shape).astype(np.float32)
        got = _fit(a, size)
        assert isinstance(got, np.ndarray) and got.shape == (size, size)
        assert np.array_equal(got, former(a, size)), (shape, size)


# -- training from the store ------------------------------------------------------------------------

def _tiny(dev: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, "data.samples_per_epoch=40", "optim.epochs=1", "tracking.enabled=false",
            f"output_dir={out}", *extra]


def test_training_from_store_equals_training_in_memory(dev_data, tmp_path):
    rows = _dev_rows(dev_data)
    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, rows), store_dir)
    mem = train(load_config(None, _tiny(dev_data, tmp_path / "mem",
                                        f"data.paths=['{dev_data}/nifti/heudiconv_axasc35.nii.gz', "
                                        f"'{dev_data}/dicom/pydicom/CT_small.dcm']",
                                        f"data.val_paths=['{dev_data}/dicom/pydicom/MR_small.dcm']")))
    disk = train(load_config(None, _tiny(dev_data, tmp_path / "disk", f"data.store={store_dir}")))
    assert len(mem.history) == len(disk.history) == 10
    assert disk.history[0]["loss"] == mem.history[0]["loss"]
    assert [h["loss"] for h in disk.history] == [h["loss"] for h in mem.history]
    assert disk.val[0]["val_psnr"] == mem.val[0]["val_psnr"]
    # a manifest read into memory (split by subject) gives the same run again
    man = train(load_config(None, _tiny(dev_data, tmp_path / "man",
                                        f"data.manifest={_manifest(tmp_path, dev_data, rows)}")))
    assert [h["loss"] for h in man.history] == [h["loss"] for h in mem.history]
    # a finished training lets go of the store: a prepare in the same process may change it (it hung)
    rep = prepare_store(_manifest(tmp_path, dev_data, rows[1:], name="less.csv"), store_dir, wait=False)
    assert len(rep.removed) == 1


def test_training_from_a_manifest_reads_the_series_its_row_names(dev_data, tmp_path):
    # a folder of two series: prepare took the row's series_uid, training from the manifest did not
    # ("2 series found, choose one with --series", and train has no --series)
    import pydicom

    from medvae.training.data import build_training_data

    folder = tmp_path / "two_series"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:4]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "ct_small.dcm").write_bytes((dev_data / "dicom/pydicom/CT_small.dcm").read_bytes())
    head_uid = str(pydicom.dcmread(next((dev_data / "dicom/series_ct_head").glob("*.dcm"))).SeriesInstanceUID)
    small_uid = str(pydicom.dcmread(folder / "ct_small.dcm").SeriesInstanceUID)
    assert head_uid != small_uid
    m = _manifest(tmp_path, dev_data, [f"{folder},subjA,,train,{head_uid}", f"{folder},subjB,,val,{small_uid}"])
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.manifest={m}", "data.min_size=48"))
    data = build_training_data(cfg, intensity=IntensityPolicy())
    [train_vol] = data.volumes
    assert train_vol.array.shape[2] == 4 and train_vol.array.shape[:2] != (128, 128)  # the head series
    assert {v["name"] for v in data.val} == {"vol01_s000"}  # CT_small's one slice, not the head's four


def test_a_manifest_without_a_training_subject_is_named(dev_data, tmp_path):
    from medvae.training.data import build_training_data

    # val_fraction 1 (or a seed that drew every subject for validation): "no usable training slices",
    # naming no file
    m = _manifest(tmp_path, dev_data, [f"{dev_data}/dicom/pydicom/CT_small.dcm,s1,,,",
                                       f"{dev_data}/dicom/pydicom/MR_small.dcm,s2,,val,"])
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.manifest={m}", "data.val_fraction=1.0"))
    with pytest.raises(MedvaeError, match=r"data.csv: config key 'data.manifest': no training subject: all 2 "
                                          r"subject\(s\) fall in the validation split .*with seed 0"):
        build_training_data(cfg, intensity=IntensityPolicy())


def test_a_cut_off_store_volume_is_one_line_naming_it(dev_data, tmp_path):
    # a truncated volumes/<key>.npy gave "ValueError: EOF: reading array header", a traceback on its rank
    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)), store_dir)
    store = SliceStore(store_dir)
    key = store.records[0].key
    path = store.volume_path(key)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(MedvaeError, match=r"\.npy: cannot read this store volume \(.*\): the store is damaged"):
        store.read_slice(key, 0)


def test_a_listed_scan_gets_hints_for_the_manifest_not_for_cli_options(dev_data, tmp_path, caplog):
    # prepare and train have no --series or --volume: the hints named options they do not have
    folder = tmp_path / "two_series"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "ct_small.dcm").write_bytes((dev_data / "dicom/pydicom/CT_small.dcm").read_bytes())
    four_d = dev_data / "nifti/nibabel_example4d.nii.gz"
    m = _manifest(tmp_path, dev_data, [f"{folder},subjA,,train,", f"{four_d},subjB,,train,",
                                       f"{four_d},subjC,,val,1.2.3"])
    with caplog.at_level("WARNING"):
        rep = prepare_store(m, tmp_path / "store", wait=False)
    errors = dict(rep.failed)
    assert "2 series here: name the series in a manifest's series_uid column" in errors[1]
    assert "--series" not in errors[1] and "(2 slices)" in errors[1]
    assert "series_uid 1.2.3 is given for a NIfTI file" in errors[3]
    assert len(rep.added) == 1  # the 4-D file: volume 0, said once, without --volume
    [warning] = [r.getMessage() for r in caplog.records if "4-D" in r.getMessage()]
    assert "2 volumes; only its volume 0 is used for training" in warning and "--volume" not in warning


def test_one_series_named_two_ways_never_trains_and_validates(dev_data, tmp_path):
    # a glob of a folder's files stayed in training while the folder validated: validation on training slices
    from medvae.training.data import build_training_data

    ser = tmp_path / "ser"
    ser.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:3]:
        (ser / f.name).write_bytes(f.read_bytes())
    small = dev_data / "dicom/pydicom/CT_small.dcm"
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.paths=['{ser}/*.dcm', '{small}']",
                                  f"data.val_paths=['{ser}']", "data.min_size=48"))
    data = build_training_data(cfg, intensity=IntensityPolicy())
    assert [v.array.shape[:2] for v in data.volumes] == [(128, 128)]  # CT_small alone trains
    one = sorted(ser.glob("*.dcm"))[0]
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.paths=['{ser}', '{small}']",
                                  f"data.val_paths=['{one}']"))
    with pytest.raises(MedvaeError, match=f"'data.val_paths': {one} lies inside the training folder {ser}"):
        build_training_data(cfg, intensity=IntensityPolicy())
    # a manifest: a row inside another row's folder is refused; a NIfTI beside the series is a scan of its own
    (ser / "other.nii.gz").write_bytes((dev_data / "nifti/heudiconv_axasc35.nii.gz").read_bytes())
    ok = _manifest(tmp_path, dev_data, [f"{ser},a,,train,", f"{ser}/other.nii.gz,b,,val,"], name="ok.csv")
    assert len(read_manifest(ok)) == 2 and refuse_repeated_scans(read_manifest(ok), ok) is None
    uid = str(pydicom.dcmread(one).SeriesInstanceUID)
    for inner in (f"{one},b,,val,", f"{one},b,,val,{uid}"):  # with its own series_uid it slipped through
        bad = _manifest(tmp_path, dev_data, [f"{ser},a,,train,", inner], name="bad.csv")
        with pytest.raises(MedvaeError, match="manifest row 2 lists a scan inside the folder of row 1"):
            prepare_store(bad, tmp_path / "store", wait=False)
    # a study folder: series A on top, series B in a subfolder; a missing file is its row's own failure
    study = tmp_path / "study"
    (study / "B").mkdir(parents=True)
    for f in sorted(ser.glob("*.dcm")):
        (study / f.name).write_bytes(f.read_bytes())
    (study / "B" / "small.dcm").write_bytes(small.read_bytes())
    rows = [f"{study},a,,train,{uid}", f"{study}/B,b,,val,", f"{study}/typo.dcm,c,,val,"]
    rep = prepare_store(_manifest(tmp_path, dev_data, rows, name="study.csv"), tmp_path / "store2", wait=False)
    assert len(rep.added) == 2 and [row for row, _ in rep.failed] == [3]


def test_training_refuses_a_file_as_output_dir_and_too_many_threads_before_any_data(dev_data, tmp_path):
    (tmp_path / "out.pt").write_bytes(b"x")  # found an epoch later, when the first checkpoint was written
    cfg = load_config(None, _tiny(dev_data, tmp_path / "out.pt" / "run",
                                  f"data.paths=['{dev_data}/dicom/pydicom/CT_small.dcm']"))
    with pytest.raises(MedvaeError, match=f"config key 'output_dir': {tmp_path / 'out.pt'} is a file, not a folder"):
        train(cfg)
    with pytest.raises(MedvaeError, match="threads"):  # 100000 ran out of memory in a traceback
        load_config(None, _tiny(dev_data, tmp_path / "r", "threads=100000"))


def test_training_from_a_store_without_training_volumes_names_the_store(dev_data, tmp_path):
    store_dir = tmp_path / "store"
    report = prepare_store(_manifest(tmp_path, dev_data, [f"{dev_data}/dicom/pydicom/MR_small.dcm,subjC,,val,"]),
                           store_dir)
    assert len(report.added) == 1 and not report.failed
    with pytest.raises(MedvaeError) as err:  # once "check data.paths", which this config does not use
        train(load_config(None, _tiny(dev_data, tmp_path / "run", f"data.store={store_dir}")))
    msg = str(err.value)
    assert str(store_dir) in msg and "'data.store'" in msg and "1 volume(s), 0 of them for training" in msg


def test_a_float16_store_is_half_the_size_within_its_rounding_and_trains_alike(dev_data, tmp_path):
    rows = _dev_rows(dev_data)
    prepare_store(_manifest(tmp_path, dev_data, rows), tmp_path / "f32")
    assert cli(["prepare", str(_manifest(tmp_path, dev_data, rows)), str(tmp_path / "f16"), "--dtype", "float16"]) == 0
    f32, f16 = SliceStore(tmp_path / "f32"), SliceStore(tmp_path / "f16")
    assert (f32.dtype, f16.dtype) == ("float32", "float16")
    for a, b in zip(f32.records, f16.records):
        assert (a.key, a.shape) == (b.key, b.shape)
        v32, v16 = f32.open_volume(a.key), f16.open_volume(b.key)
        assert v16.dtype == np.float16 and v16.nbytes * 2 == v32.nbytes
        s32, s16 = f32.read_slice(a.key, 0), f16.read_slice(b.key, 0)
        assert s16.dtype == np.float32
        assert np.all(np.abs(s16 - s32) <= 2.0 ** -11 * np.maximum(1.0, np.abs(s32)))
    with pytest.raises(MedvaeError, match="holds float16 volumes, not float32"):
        prepare_store(_manifest(tmp_path, dev_data, rows), tmp_path / "f16")
    runs = [train(load_config(None, _tiny(dev_data, tmp_path / f"run{d}", f"data.store={tmp_path / d}")))
            for d in ("f32", "f16")]
    assert [h["loss"] for h in runs[1].history] == pytest.approx([h["loss"] for h in runs[0].history], rel=0.02)


def test_store_with_other_intensity_is_refused(dev_data, tmp_path):
    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)[:1]), store_dir)
    with pytest.raises(MedvaeError, match="store was normalized with"):
        train(load_config(None, _tiny(dev_data, tmp_path / "x", f"data.store={store_dir}",
                                      "intensity.ct_window=[-200, 300]")))
    with pytest.raises(MedvaeError, match="prepared with intensity"):
        prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)), store_dir,
                      intensity=IntensityPolicy(ct_window=(-200.0, 300.0)))


DDP_WORKER = '''
import json, os, sys
from pathlib import Path
import torch
from medvae.training import data
from medvae.training.config import load_config
from medvae.training.loop import train

read = set()
real = data.StoreVolume.slice
def spy(self, k):
    read.add(self.path.stem)
    return real(self, k)
data.StoreVolume.slice = spy
out = Path(sys.argv[1])
result = train(load_config(None, sys.argv[2:]))
rank = os.environ["RANK"]
torch.save(result.model.state_dict(), out / f"rank{rank}.pt")
(out / f"read{rank}.json").write_text(json.dumps(sorted(read)))
'''


def test_ddp_two_ranks_read_disjoint_shards_and_end_equal(dev_data, tmp_path):
    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)), store_dir)
    train_keys = {r.key for r in SliceStore(store_dir).records if r.split == "train"}
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(worker), str(out), *_tiny(dev_data, out / "run", f"data.store={store_dir}", "device=cpu",
                                         "data.samples_per_epoch=32", "optim.epochs=2")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = set(json.loads((out / "read0.json").read_text()))
    r1 = set(json.loads((out / "read1.json").read_text()))
    # rank 0 also reads the validation volume; the training shards are disjoint and cover the store
    assert r0 & train_keys and r1 and r1 <= train_keys
    assert not (r0 & r1) and (r0 & train_keys) | r1 == train_keys
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    ck = torch.load(out / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 16  # 2 epochs x 16 samples per rank / 2 per rank-batch


def test_resume_from_a_store_continues_exactly(dev_data, tmp_path, monkeypatch):
    from medvae.training.data import PatchDataset

    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)), store_dir)
    args = [f"data.store={store_dir}", "optim.epochs=2", "data.val_slices=0"]
    full = train(load_config(None, _tiny(dev_data, tmp_path / "full", *args)))
    real = PatchDataset.set_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        real(self, epoch)

    monkeypatch.setattr(PatchDataset, "set_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, _tiny(dev_data, tmp_path / "cut", *args)))
    monkeypatch.setattr(PatchDataset, "set_epoch", real)
    resumed = train(load_config(None, _tiny(dev_data, tmp_path / "cut", *args)), resume=True)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[10:]]
    # the store prepared again with one volume fewer: the resumed run mixed the two data sets, silently
    prepare_store(_manifest(tmp_path, dev_data, _dev_rows(dev_data)[1:], name="less.csv"), store_dir)
    with pytest.raises(MedvaeError, match="the training data changed since this run's last checkpoint"):
        train(load_config(None, _tiny(dev_data, tmp_path / "cut", *args)), resume=True)
    # a glob's file replaced by another scan of the same name (the digest of names and slices missed it)
    scans = tmp_path / "g"
    scans.mkdir()
    shutil.copy(dev_data / "dicom/pydicom/CT_small.dcm", scans / "a.dcm")
    globbed = [f"data.paths=['{scans}/*.dcm']", "optim.epochs=1", "data.val_slices=0"]
    train(load_config(None, _tiny(dev_data, tmp_path / "glob", *globbed)))
    train(load_config(None, _tiny(dev_data, tmp_path / "glob", *globbed)), resume=True)  # unchanged: resumes
    shutil.copy(dev_data / "dicom/pydicom/MR_small.dcm", scans / "a.dcm")
    with pytest.raises(MedvaeError, match="the training data changed since this run's last checkpoint"):
        train(load_config(None, _tiny(dev_data, tmp_path / "glob", *globbed)), resume=True)


def test_an_interrupted_prepare_keeps_what_it_finished(dev_data, tmp_path, monkeypatch):
    import medvae.store as store_mod

    real, calls = store_mod._write_volume, []

    def interrupted_on_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    m = _manifest(tmp_path, dev_data, _dev_rows(dev_data))
    monkeypatch.setattr(store_mod, "_write_volume", interrupted_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare_store(m, tmp_path / "store")
    # training must not run on part of a data set: the half store is refused until prepare finishes
    with pytest.raises(MedvaeError, match="incomplete store: .* run the same `medvae prepare` again"):
        SliceStore(tmp_path / "store")
    assert [r.subject for r in SliceStore(tmp_path / "store", allow_incomplete=True).records] == ["subjA"]
    monkeypatch.setattr(store_mod, "_write_volume", real)
    rep = prepare_store(m, tmp_path / "store")
    assert len(rep.skipped) == 1 and len(rep.added) == 2
    assert len(SliceStore(tmp_path / "store").records) == 3


def test_the_store_follows_the_manifest_subjects_and_removed_rows(dev_data, tmp_path, caplog):
    mr, ct, mr_small = (f"{dev_data}/nifti/heudiconv_axasc35.nii.gz", f"{dev_data}/dicom/pydicom/CT_small.dcm",
                        f"{dev_data}/dicom/pydicom/MR_small.dcm")
    store = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, [f"{mr},subjA,,train,", f"{ct},subjB,,,", f"{mr_small},subjC,,val,"]),
                  store, val_fraction=0.0)
    assert {r.subject: r.split for r in SliceStore(store).records} == {"subjA": "train", "subjB": "train",
                                                                       "subjC": "val"}
    # the CT slice turns out to be subjC's (a validation subject), and subjA's scan leaves the data set
    with caplog.at_level("DEBUG", logger="medvae"):
        rep = prepare_store(_manifest(tmp_path, dev_data, [f"{ct},subjC,,,", f"{mr_small},subjC,,val,"]), store,
                            val_fraction=0.0)
    assert "split train -> val" in caplog.text and "subjB" not in caplog.text  # subjects never reach logs
    recs = SliceStore(store).records
    assert sorted((r.subject, r.split) for r in recs) == [("subjC", "val"), ("subjC", "val")]
    assert sorted(p.name for p in (store / "volumes").iterdir()) == sorted(f"{r.key}.npy" for r in recs)
    assert rep.added == [] and len(rep.skipped) == 2 and len(rep.removed) == 1
    # a listed scan that is gone is not kept as stale data either
    shutil.copyfile(ct, tmp_path / "ct.dcm")
    prepare_store(_manifest(tmp_path, dev_data, [f"{tmp_path}/ct.dcm,subjD,,,"]), store, val_fraction=0.0)
    (tmp_path / "ct.dcm").unlink()
    rep = prepare_store(_manifest(tmp_path, dev_data, [f"{tmp_path}/ct.dcm,subjD,,,"]), store, val_fraction=0.0)
    assert len(rep.failed) == 1 and len(rep.removed) == 1
    assert SliceStore(store, allow_incomplete=True).records == []
    # another split rule would be recorded while the subjects kept theirs: refused, as another intensity is
    with pytest.raises(MedvaeError, match="subjects were split with val_fraction 0.0 and seed 0, not 0.2 and 0"):
        prepare_store(_manifest(tmp_path, dev_data, [f"{ct},subjC,,,"]), store)


# -- one prepare at a time, and changed scans ---------------------------------------------------------

PAUSED_PREPARE = r'''
import sys, time
from pathlib import Path
import medvae.store as s
real = s._write_volume
def paused(*a, **k):  # after its first volume, wait for the test's go-ahead
    out = real(*a, **k)
    Path(sys.argv[3]).write_text("paused")
    while not Path(sys.argv[4]).exists():
        time.sleep(0.05)
    return out
s._write_volume = paused
s.prepare_store(sys.argv[1], sys.argv[2])
'''


def _paused_prepare(tmp_path: Path, manifest: Path, store: Path) -> tuple[subprocess.Popen, Path]:
    """Start a real prepare in another process; return once it holds the store, and its go-file."""
    script, paused, go = tmp_path / "paused.py", tmp_path / "paused", tmp_path / "go"
    script.write_text(PAUSED_PREPARE)
    proc = subprocess.Popen([sys.executable, str(script), str(manifest), str(store), str(paused), str(go)],
                            stderr=subprocess.PIPE, text=True)
    for _ in range(2400):
        if paused.exists() or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert paused.exists(), proc.communicate()[1][-2000:]
    return proc, go


def test_a_second_prepare_waits_for_the_first_or_fails_at_once(dev_data, tmp_path, caplog, capsys):
    import threading

    store = tmp_path / "store"
    first = _manifest(tmp_path, dev_data, _dev_rows(dev_data), name="first.csv")
    second = _manifest(tmp_path, dev_data, _dev_rows(dev_data)[1:2], name="second.csv")
    proc, go = _paused_prepare(tmp_path, first, store)
    try:
        # training is refused while a prepare runs
        with pytest.raises(MedvaeError, match="incomplete store"):
            SliceStore(store)
        # --no-wait: one line naming the store, nothing written
        with pytest.raises(MedvaeError, match=r"store: another `medvae prepare` holds this store"):
            prepare_store(second, store, wait=False)
        assert cli(["prepare", str(second), str(store), "--no-wait"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{store}: another `medvae prepare` holds this store" in err
        assert "CT_small" not in err
        # by default the second waits, then runs as if after the first
        result: list = []
        with caplog.at_level("WARNING", logger="medvae.store"):
            waiter = threading.Thread(target=lambda: result.append(prepare_store(second, store)))
            waiter.start()
            waiter.join(timeout=2.0)
            assert waiter.is_alive() and not result
            assert f"{store}: another `medvae prepare` holds this store; waiting" in caplog.text
            go.write_text("go")
            assert proc.wait(timeout=120) == 0
            waiter.join(timeout=120)
    finally:
        go.write_text("go")
        proc.wait(timeout=120)
    rep = result[0]
    assert len(rep.skipped) == 1 and len(rep.removed) == 2 and not rep.added  # the first had finished
    s = SliceStore(store)
    assert [r.subject for r in s.records] == ["subjB"]
    assert sorted(p.name for p in (store / "volumes").iterdir()) == [f"{s.records[0].key}.npy"]
    assert not (store / ".medvae-prepare.lock").exists()


@contextlib.contextmanager
def _training_reads(store: Path):
    """Another process holds ``store`` for reading, as a running training does, until the block ends."""
    reader = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom medvae.store import SliceStore\n"
                               f"s = SliceStore({str(store)!r}); s.hold_for_reading(); print('reading', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        yield
    finally:
        reader.kill()
        reader.wait()


def test_a_prepare_changes_no_volume_a_training_reads(dev_data, tmp_path):
    """A prepare rewrote a volume under a training reading it: IndexError in the training."""
    store = tmp_path / "store"
    rows = _dev_rows(dev_data)
    prepare_store(_manifest(tmp_path, dev_data, rows[:2], name="two.csv"), store)
    with _training_reads(store):
        # adding a volume disturbs no reader
        assert len(prepare_store(_manifest(tmp_path, dev_data, rows, name="three.csv"), store, wait=False).added) == 1
        # removing one it may read waits for it, or (--no-wait) is refused in one line
        with pytest.raises(MedvaeError, match=r"store: a training is reading this store, whose volumes this "
                                              r"prepare would change"):
            prepare_store(_manifest(tmp_path, dev_data, rows[1:], name="less.csv"), store, wait=False)
    rep = prepare_store(_manifest(tmp_path, dev_data, rows[1:], name="less.csv"), store, wait=False)
    assert len(rep.removed) == 1 and len(SliceStore(store).records) == 2
    opened = SliceStore(store)  # a prepare between reading the index and taking the lock: said, not trained on
    prepare_store(_manifest(tmp_path, dev_data, rows[2:], name="one.csv"), store, wait=False)
    with pytest.raises(MedvaeError, match="the store changed while it was opened"):
        opened.hold_for_reading()


def test_a_prepare_refused_by_a_reading_training_keeps_the_volume_and_blames_no_row(dev_data, tmp_path):
    """--no-wait refused to rewrite a changed scan under a training, but as that row's failure: the readable
    scan's volume left the index and the store blamed its manifest row."""
    scan = tmp_path / "a.dcm"
    shutil.copyfile(dev_data / "dicom/pydicom/CT_small.dcm", scan)
    store = tmp_path / "store"
    m = _manifest(tmp_path, dev_data, [f"{scan},subjA,,train,"])
    key = prepare_store(m, store).added[0]
    with _training_reads(store):
        shutil.copyfile(dev_data / "dicom/pydicom/MR_small.dcm", scan)  # the scan changed
        with pytest.raises(MedvaeError, match="a training is reading this store"):
            prepare_store(m, store, wait=False)
    assert [r.key for r in SliceStore(store, allow_incomplete=True).records] == [key]
    with pytest.raises(MedvaeError, match="interrupted or is still running"):
        SliceStore(store)
    assert [r.modality for r in SliceStore(store, allow_incomplete=True).records] == ["CT"]
    assert len(prepare_store(m, store).added) == 1 and SliceStore(store).records[0].modality == "MR"
    # a scan gone under a reading training: its volume was dropped from the index before the refusal
    key = SliceStore(store).records[0].key
    with _training_reads(store):
        scan.unlink()
        with pytest.raises(MedvaeError, match="a training is reading this store"):
            prepare_store(m, store, wait=False)
    assert [r.key for r in SliceStore(store, allow_incomplete=True).records] == [key]
    assert (store / "volumes" / f"{key}.npy").is_file()


def test_a_killed_prepare_does_not_block_the_next(dev_data, tmp_path):
    store = tmp_path / "store"
    m = _manifest(tmp_path, dev_data, _dev_rows(dev_data))
    proc, _ = _paused_prepare(tmp_path, m, store)
    proc.kill()
    proc.wait(timeout=60)
    assert (store / ".medvae-prepare.lock").exists()  # left behind, but no process holds it
    rep = prepare_store(m, store, wait=False)
    assert len(rep.added) + len(rep.skipped) == 3 and len(SliceStore(store).records) == 3
    assert not (store / ".medvae-prepare.lock").exists()


def test_a_scan_replaced_with_the_same_size_and_mtime_is_prepared_again(dev_data, tmp_path, copy_into,
                                                                        monkeypatch):
    import medvae.store as store_mod

    monkeypatch.setattr(store_mod, "RACY_S", 0.0)  # judge by ctime, not as a just-written file
    scan = copy_into(dev_data / "dicom" / "pydicom" / "CT_small.dcm", "ct.dcm")
    m = _manifest(tmp_path, dev_data, [f"{scan},a,,,"])
    store = tmp_path / "store"
    prepare_store(m, store)
    key = SliceStore(store).records[0].key
    before = SliceStore(store).read_slice(key, 0)
    st = scan.stat()
    # a corrected copy put in its place with the old mtime kept (cp -p, tar): pixel data reversed
    data = scan.read_bytes()
    pixels = pydicom.dcmread(scan).PixelData
    at = data.index(pixels)
    new = tmp_path / "new.dcm"
    new.write_bytes(data[:at] + pixels[::-1] + data[at + len(pixels):])
    os.replace(new, scan)
    os.utime(scan, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (scan.stat().st_size, scan.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    rep = prepare_store(m, store)
    assert rep.added == [key] and not rep.skipped
    after = SliceStore(store).read_slice(key, 0)
    ref = load_scan(scan)
    assert not np.array_equal(after, before)
    assert np.array_equal(after, normalize(ref.array, IntensityPolicy().window_for(ref.array, "CT"))[:, :, 0])

    # a chmod moves the ctime only: the bytes are compared once, nothing is prepared again
    volume = store / "volumes" / f"{key}.npy"
    mtime = volume.stat().st_mtime_ns
    os.chmod(scan, 0o600)
    reads: list = []
    real = store_mod.source_digest
    monkeypatch.setattr(store_mod, "source_digest", lambda p: reads.append(p) or real(p))
    rep = prepare_store(m, store)
    assert rep.skipped == [key] and len(reads) == 1 and volume.stat().st_mtime_ns == mtime
    rep = prepare_store(m, store)
    assert rep.skipped == [key] and len(reads) == 1  # stat only again


def test_a_manifest_listing_one_scan_for_two_subjects_is_refused_for_training(dev_data, tmp_path):
    """Under two subjects, one scan could be in training and validation at once (prepare refused it)."""
    from medvae.training.data import build_training_data

    ct = dev_data / "dicom/pydicom/CT_small.dcm"
    m = _manifest(tmp_path, dev_data, [f"{ct},b,,train,", f"{dev_data}/nifti/heudiconv_axasc35.nii.gz,c,,train,",
                                       f"{ct},a,,val,"])
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.manifest={m}"))
    with pytest.raises(MedvaeError, match="data.csv: manifest rows 1 and 3 list the same scan"):
        build_training_data(cfg, intensity=IntensityPolicy())


def test_manifest_values_are_read_as_text_and_a_key_or_column_twice_is_refused(tmp_path):
    """YAML 1.1 read subject 0012 as 10 and 007 as 7 (merging subjects), and a row's second path, or a
    CSV header's second path column, silently replaced the first."""
    (tmp_path / "m.yaml").write_text("- {path: a.nii.gz, subject: '0012'}\n- {path: b.nii.gz, subject: 0012}\n"
                                     "- {path: c.nii.gz, subject: no, split: ~}\n")
    assert [(e.subject, e.split) for e in read_manifest(tmp_path / "m.yaml")] == [("0012", None), ("0012", None),
                                                                                  ("no", None)]
    (tmp_path / "twice.yaml").write_text("- {path: a.nii.gz, subject: s, path: b.nii.gz}\n")
    with pytest.raises(MedvaeError, match="duplicate key 'path'"):
        read_manifest(tmp_path / "twice.yaml")
    (tmp_path / "twice.csv").write_text("path,subject,path\na.nii.gz,s,b.nii.gz\n")
    with pytest.raises(MedvaeError, match="twice.csv: manifest column\\(s\\) 'path' given twice in the header"):
        read_manifest(tmp_path / "twice.csv")
    (tmp_path / "list.yaml").write_text("- {path: a.nii.gz, subject: s}\n- {path: b.nii.gz, subject: [a, b]}\n")
    with pytest.raises(MedvaeError, match=r"list.yaml: manifest row 2: subject must be one value, not a list"):
        read_manifest(tmp_path / "list.yaml")  # it was the subject "['a', 'b']"


def test_a_modality_given_then_left_to_the_guess_is_read_again(dev_data, tmp_path):
    """The volume stayed as first given (MR, its window), where a fresh store guesses CT."""
    import nibabel as nib

    ct = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(ct.array, ct.affine), path)
    store_dir = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, [f"{path},s,MR,train,"]), store_dir)
    assert SliceStore(store_dir).records[0].modality == "MR"
    rep = prepare_store(_manifest(tmp_path, dev_data, [f"{path},s,,train,"]), store_dir)
    assert len(rep.added) == 1 and SliceStore(store_dir).records[0].modality == "CT"
    assert prepare_store(_manifest(tmp_path, dev_data, [f"{path},s,,train,"]), store_dir).skipped


def test_a_file_name_that_is_no_utf8_is_prepared(dev_data, tmp_path):
    """prepare hashed the names of a folder's files as UTF-8: "surrogates not allowed", a traceback
    that aborted every row, on every rerun."""
    folder = tmp_path / "series"
    folder.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:2]:
        shutil.copyfile(f, folder / os.fsdecode(b"s\xe9rie_" + f.name.encode()))
    rep = prepare_store(_manifest(tmp_path, dev_data, [f"{folder},s,,train,"]), tmp_path / "store")
    assert len(rep.added) == 1 and not rep.failed
    assert prepare_store(_manifest(tmp_path, dev_data, [f"{folder},s,,train,"]), tmp_path / "store").skipped


def test_exclude_is_read_from_the_config_folder_and_leaves_out_a_folder_whole(dev_data, tmp_path, monkeypatch):
    from medvae.training.config import expand_paths

    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("a.nii.gz", "sub/b.nii.gz"):
        shutil.copyfile(dev_data / "nifti/heudiconv_axasc35.nii.gz", data / name)
    found = expand_paths([str(data / "*.nii.gz"), str(data / "*/*.nii.gz")], "data.paths", exclude=[str(data / "sub")])
    assert found == [data / "a.nii.gz"]  # the folder's file was kept before
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("data:\n  paths: ['../data/*.nii.gz', '../data/sub/*.nii.gz']\n"
                                              "  exclude: ['../data/sub']\n")
    monkeypatch.chdir(data / "sub")  # not the config's folder: exclude matched nothing from here
    cfg = load_config(tmp_path / "cfg" / "c.yaml")
    paths = expand_paths(cfg.data.paths, "data.paths", exclude=cfg.data.exclude)
    assert [p.name for p in paths] == ["a.nii.gz"]


def test_a_float16_store_clips_what_it_cannot_hold_and_counts_ct_foreground_in_its_own_window(dev_data, tmp_path,
                                                                                              caplog):
    """One voxel of 1e8 was stored as inf (training then died with a traceback naming no volume); a CT store
    made in -500..500 HU counted the pixels above -250 HU as foreground, not those above -500."""
    import nibabel as nib

    img = nib.load(dev_data / "nifti" / "heudiconv_axasc35.nii.gz")
    arr = np.asarray(img.dataobj, dtype=np.float32)[..., :2]
    arr[0, 0, 0] = 1e8
    nib.save(nib.Nifti1Image(arr, img.affine), tmp_path / "spike.nii.gz")
    with caplog.at_level("WARNING"):
        prepare_store(_manifest(tmp_path, dev_data, [f"{tmp_path}/spike.nii.gz,s1,MR,train,"]), tmp_path / "f16",
                      dtype="float16")
    store = SliceStore(tmp_path / "f16")
    vol = np.asarray(store.open_volume(store.records[0].key))
    assert np.isfinite(vol).all() and vol.max() == np.finfo(np.float16).max
    assert "manifest row 1: 1 voxel(s) lie beyond what float16 holds" in caplog.text
    ct = load_scan(dev_data / "dicom" / "pydicom" / "CT_small.dcm").array[:, :, 0]
    prepare_store(_manifest(tmp_path, dev_data, [f"{dev_data}/dicom/pydicom/CT_small.dcm,s2,,train,"]),
                  tmp_path / "ct", intensity=IntensityPolicy(ct_window=(-500.0, 500.0)))
    assert SliceStore(tmp_path / "ct").records[0].foreground == [pytest.approx(float((ct > -500).mean()))]


def test_ranks_are_dealt_even_draw_weights_and_the_run_counts_all_ranks_volumes(dev_data, tmp_path):
    """Dealt in equal counts, the mix of a store's volumes changed with the number of ranks; and MLflow got
    rank 0's share as the data set's size (2 volumes where one process logged 4)."""
    from medvae.training.data import build_training_data, deal_volumes

    head = dev_data / "dicom" / "series_ct_head"
    rows = [f"{head},s0,CT,train,", *(r.replace(",val,", ",train,") for r in _dev_rows(dev_data))]
    prepare_store(_manifest(tmp_path, dev_data, rows), tmp_path / "store")
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.store={tmp_path / 'store'}"))
    intensity = IntensityPolicy()
    parts = [build_training_data(cfg, intensity=intensity, rank=r, world=2, with_val=False) for r in range(2)]
    one = build_training_data(cfg, intensity=intensity, with_val=False)
    for d in (*parts, one):
        d.store.release_reading()
    assert [p.n_volumes for p in parts] == [one.n_volumes] * 2 == [len(one.volumes)] * 2
    assert parts[0].n_slices == one.n_slices == sum(len(v.slices) for v in one.volumes)
    keys = [sorted(v.path.stem for v in p.volumes) for p in parts]
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(v.path.stem for v in one.volumes)
    weights = [sum(np.sqrt(len(v.slices)) for v in p.volumes) for p in parts]
    sizes = sorted(len(v.slices) for v in one.volumes)
    # the heaviest volume alone on one rank, the rest on the other: as even as these volumes allow
    assert sorted(len(p.volumes) for p in parts) == [1, len(sizes) - 1] and max(weights) == pytest.approx(
        max(np.sqrt(sizes[-1]), sum(np.sqrt(s) for s in sizes[:-1])))
    assert [len(p) for p in deal_volumes(one.volumes, 3)] == [1, 1, len(sizes) - 2] or len(sizes) < 3


def test_a_row_that_left_the_store_and_came_back_trains_and_deals_as_before(dev_data, tmp_path):
    """prepare put such a row at the end of the index: the same data then drew other patches than it did,
    and than the same manifest read into memory."""
    from medvae.training.data import build_training_data

    head = dev_data / "dicom" / "series_ct_head"
    rows = [f"{head},s0,CT,train,", *(r.replace(",val,", ",train,") for r in _dev_rows(dev_data))]
    store = tmp_path / "store"
    prepare_store(_manifest(tmp_path, dev_data, rows), store)
    cfg = load_config(None, _tiny(dev_data, tmp_path / "run", f"data.store={store}"))

    def built():
        out = [build_training_data(cfg, intensity=IntensityPolicy(), rank=r, world=w, with_val=False)
               for w in (1, 2) for r in range(w)]
        for d in out:  # as the training does when it ends: a prepare waits for its readers
            d.store.release_reading()
        return out

    before = built()
    prepare_store(_manifest(tmp_path, dev_data, rows[1:]), store)
    prepare_store(_manifest(tmp_path, dev_data, rows), store)
    from medvae.store import volume_key

    assert [r.key for r in SliceStore(store).records] == [volume_key(e) for e in read_manifest(tmp_path / "data.csv")]
    after = built()
    assert [d.ranks for d in after] == [d.ranks for d in before]
    assert [[v.path for v in d.volumes] for d in after] == [[v.path for v in d.volumes] for d in before]
