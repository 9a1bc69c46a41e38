"""Batch restore (issue 12): one output per series, a summary CSV, failures recorded, resumable, sharded."""
from __future__ import annotations

import csv
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from medvae.batch import SUMMARY_COLUMNS as SUMMARY
from medvae.batch import find_jobs, read_summaries, restore_batch, shard_from_env
from medvae.errors import MedvaeError
from medvae.io import load_scan


@pytest.fixture
def archive(dev_data, tmp_path) -> Path:
    """Three series, sorted a, b, c; the middle one is a corrupt NIfTI file."""
    d = tmp_path / "archive"
    d.mkdir()
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", d / "a_mr.nii.gz")
    (d / "b_broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", d / "c_ct.dcm")
    (d / ".hidden").write_text("ignored")
    return d


def _rows(summary: Path) -> dict[str, dict[str, str]]:
    with summary.open(newline="") as fh:
        return {r["series"]: r for r in csv.DictReader(fh)}


def test_a_corrupt_series_is_reported_and_the_others_are_written_then_a_rerun_skips_them(archive, tmp_path, dev_data,
                                                                                         dev_expect):
    mr_slices = str(dev_expect.mr_small.n_slices)  # dev: 35
    out = tmp_path / "restored"
    rep = restore_batch(archive, out)
    assert rep.counts() == {"restored": 2, "skipped": 0, "failed": 1}
    rows = _rows(out / "medvae-summary.csv")
    assert list(rows) == ["a_mr.nii.gz", "b_broken.nii.gz", "c_ct"]
    # the row's series names the input; the error gives its kind and medvae's message, not the path
    broken = rows["b_broken.nii.gz"]
    assert broken["status"] == "failed" and broken["error"].startswith("MedvaeError: ")
    assert str(archive) not in broken["error"]
    assert rows["a_mr.nii.gz"]["status"] == "restored" and rows["a_mr.nii.gz"]["slices"] == mr_slices
    assert rows["c_ct"]["status"] == "restored" and rows["c_ct"]["slices"] == "1"
    # the outputs are real restorations in the input's format and geometry
    src, res = load_scan(archive / "a_mr.nii.gz"), load_scan(out / "a_mr.nii.gz")
    assert res.array.shape == src.array.shape and np.allclose(res.affine, src.affine)
    assert not np.array_equal(res.array, src.array)
    ct = load_scan(out / "c_ct")
    assert ct.format == "dicom" and ct.modality == "CT" and ct.array.shape == (128, 128, 1)
    assert not (out / "b_broken.nii.gz").exists()
    # no temporaries left; each output has its source marker (a hash), a failed series none
    assert not [p for p in out.iterdir() if ".medvae-" in p.name and not p.name.endswith(".medvae-source")]
    assert sorted(p.name for p in out.glob(".*.medvae-source")) == [".a_mr.nii.gz.medvae-source",
                                                                   ".c_ct.medvae-source"]

    # a rerun skips what is done, keeps its figures, and tries the failed one again
    mtime = (out / "a_mr.nii.gz").stat().st_mtime_ns
    rep2 = restore_batch(archive, out)
    assert rep2.counts() == {"restored": 0, "skipped": 2, "failed": 1}
    rows2 = _rows(out / "medvae-summary.csv")
    assert rows2["a_mr.nii.gz"]["status"] == "skipped" and rows2["a_mr.nii.gz"]["slices"] == mr_slices
    assert (out / "a_mr.nii.gz").stat().st_mtime_ns == mtime
    # once the file is repaired, only it is restored
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", archive / "b_broken.nii.gz")
    rep3 = restore_batch(archive, out)
    assert rep3.counts() == {"restored": 1, "skipped": 2, "failed": 0}


def test_a_killed_batch_redoes_only_the_unfinished_series(archive, tmp_path, monkeypatch):
    (archive / "b_broken.nii.gz").unlink()
    out = tmp_path / "restored"
    import medvae.restore

    real = medvae.restore.restore_scan
    calls = []

    def killed_on_second(*a, **k):
        calls.append(Path(a[0]).name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job was cancelled
        return real(*a, **k)

    monkeypatch.setattr(medvae.restore, "restore_scan", killed_on_second)
    with pytest.raises(KeyboardInterrupt):
        restore_batch(archive, out)
    assert (out / "a_mr.nii.gz").is_file() and not (out / "c_ct").exists()
    assert list(_rows(out / "medvae-summary.csv")) == ["a_mr.nii.gz"]  # the row written before the kill
    calls.clear()
    monkeypatch.setattr(medvae.restore, "restore_scan", lambda *a, **k: (calls.append(Path(a[0]).name), real(*a, **k))[1])
    rep = restore_batch(archive, out)
    assert calls == ["c_ct.dcm"]
    assert rep.counts() == {"restored": 1, "skipped": 1, "failed": 0}


def test_a_full_disk_stops_the_batch_and_leaves_no_marker_of_an_unwritten_series(archive, tmp_path, monkeypatch):
    # every series was recorded "unexpected error, its text left out", and the batch went on failing;
    # a killed batch left the source marker of the series it never wrote
    (archive / "b_broken.nii.gz").unlink()
    out = tmp_path / "restored"
    import medvae.restore

    real = medvae.restore.restore_scan

    def full_on_second(*a, **k):
        if Path(a[0]).name == "c_ct.dcm":
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(medvae.restore, "restore_scan", full_on_second)
    with pytest.raises(OSError, match="No space left on device"):
        restore_batch(archive, out)
    assert sorted(p.name for p in out.glob(".*.medvae-source")) == [".a_mr.nii.gz.medvae-source"]

    def denied(*a, **k):  # another OSError: recorded with the system's reason, and the batch goes on
        raise OSError(13, "Permission denied", str(a[0]))

    monkeypatch.setattr(medvae.restore, "restore_scan", denied)
    rep = restore_batch(archive, out, overwrite=True)
    assert [r["error"] for r in rep.rows] == ["PermissionError: Permission denied"] * 2


def test_a_map_left_without_its_restoration_is_redone(archive, tmp_path):
    out = tmp_path / "restored"
    restore_batch(archive, out, samples=2)
    shutil.rmtree(out / "c_ct")  # as a kill between the two renames of an older medvae left it
    rep = restore_batch(archive, out, samples=2)  # was "c_ct_uncertainty: already exists" on every rerun
    assert {r["series"]: r["status"] for r in rep.rows}["c_ct"] == "restored"
    assert (out / "c_ct").is_dir() and (out / "c_ct_uncertainty").is_dir()


def test_shards_split_the_series_and_together_cover_them(archive, tmp_path):
    out = tmp_path / "restored"
    r0 = restore_batch(archive, out, shard="0/2")
    r1 = restore_batch(archive, out, shard=(1, 2))
    assert r0.summary.name == "medvae-summary.0-of-2.csv" and r1.summary.name == "medvae-summary.1-of-2.csv"
    names0, names1 = {r["series"] for r in r0.rows}, {r["series"] for r in r1.rows}
    assert names0 == {"a_mr.nii.gz", "c_ct"} and names1 == {"b_broken.nii.gz"}
    assert {r["series"] for r in read_summaries(out)} == names0 | names1
    # the broken series fixed, all rerun as one shard: the 2-shard files stay, but a series has one row, the newest
    shutil.copyfile(archive / "a_mr.nii.gz", archive / "b_broken.nii.gz")
    assert restore_batch(archive, out).counts() == {"restored": 1, "skipped": 2, "failed": 0}
    rows = read_summaries(out)
    assert sorted(r["series"] for r in rows) == sorted(names0 | names1)
    assert {r["series"]: r["status"] for r in rows}["b_broken.nii.gz"] == "restored"


def _crops(dev_data, folder: Path, names: list[str]) -> None:
    """Two-slice crops of a real MR volume, one NIfTI file per name."""
    import nibabel as nib

    img = nib.load(dev_data / "nifti" / "heudiconv_axasc35.nii.gz")
    for name in names:
        nib.save(img.slicer[:, :, :2], folder / f"{name}.nii.gz")


def test_a_series_added_between_shard_starts_moves_no_other_series(dev_data, tmp_path, caplog):
    # shards split each its own listing: with "a" added before shard 1 started, shard 1 took b and d
    # again ("already done") and c and e were restored by no shard, while every shard exited 0
    archive, out = tmp_path / "archive", tmp_path / "restored"
    archive.mkdir()
    _crops(dev_data, archive, ["b", "c", "d", "e"])
    r0 = restore_batch(archive, out, shard="0/2", modality="MR", ensemble=1)
    assert [r["series"] for r in r0.rows] == ["b.nii.gz", "d.nii.gz"]
    _crops(dev_data, archive, ["a"])
    with caplog.at_level(logging.WARNING, logger="medvae.batch"):
        r1 = restore_batch(archive, out, shard="1/2", modality="MR", ensemble=1)
    assert {"c.nii.gz", "e.nii.gz"} <= {r["series"] for r in r1.rows}
    assert "1 series are newer than this output folder's shard plan" in caplog.text
    assert (out / ".medvae-shards.2.json").stat().st_mode & 0o044 == 0o044  # readable by the other accounts
    # run again, every shard restores what is left: each series once, by one shard
    again = [restore_batch(archive, out, shard=f"{i}/2", modality="MR", ensemble=1) for i in range(2)]
    restored = [r["series"] for rep in (r0, r1, *again) for r in rep.rows if r["status"] == "restored"]
    assert sorted(restored) == ["a.nii.gz", "b.nii.gz", "c.nii.gz", "d.nii.gz", "e.nii.gz"]
    assert all((out / n).is_file() for n in restored)


def test_a_dicom_folder_whose_series_was_replaced_is_not_skipped_as_done(dev_data, tmp_path):
    from medvae.batch import _source_ids, _source_marker, find_jobs

    archive, out = tmp_path / "archive", tmp_path / "restored"
    (archive / "p1").mkdir(parents=True)
    for f in sorted((dev_data / "dicom" / "series_ct_head").glob("*.dcm"))[:2]:
        shutil.copyfile(f, archive / "p1" / f.name)
    assert restore_batch(archive, out, ensemble=1).counts()["restored"] == 1
    # a marker of an older medvae (the folder's path alone) still matches the same series
    job = find_jobs(archive, out)[0]
    _source_marker(job.output).write_text("\n".join(_source_ids(job, None)) + "\n")
    assert restore_batch(archive, out, ensemble=1).counts() == {"restored": 0, "skipped": 1, "failed": 0}
    restore_batch(archive, out, ensemble=1, overwrite=True)  # the marker with the folder's series UID
    for f in (archive / "p1").iterdir():  # the folder now holds another series: skipped as done before
        f.unlink()
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", archive / "p1" / "x.dcm")
    rep = restore_batch(archive, out, ensemble=1)
    assert rep.counts() == {"restored": 0, "skipped": 0, "failed": 1}
    assert "holds the restoration of another series" in rep.rows[0]["error"]
    assert len(list((out / "p1").glob("*.dcm"))) == 2  # the earlier output is left as it was


def test_a_skipped_output_loses_the_staging_a_killed_overwrite_left(archive, tmp_path):
    from medvae.io.atomic import _new_stage

    (archive / "b_broken.nii.gz").unlink()
    out = tmp_path / "restored"
    restore_batch(archive, out, ensemble=1)
    stage = _new_stage(out / "c_ct")  # as a run killed while it replaced c_ct left it: the old series inside
    (stage / "kept").mkdir()
    (stage / "kept" / "IM0001.dcm").write_bytes(b"the previous output, with its patient module")
    assert restore_batch(archive, out, ensemble=1).counts() == {"restored": 0, "skipped": 2, "failed": 0}
    assert not stage.exists()  # it stayed for good before: only a claim of c_ct removed it, and a skip claims none


def test_a_series_named_like_a_summary_is_restored_not_left_out(archive, tmp_path):
    shutil.copyfile(archive / "a_mr.nii.gz", archive / "medvae-summary_scan.nii.gz")
    (archive / "b_broken.nii.gz").unlink()
    (archive / "c_ct.dcm").unlink()
    (archive / "a_mr.nii.gz").unlink()
    rep = restore_batch(archive, tmp_path / "restored", ensemble=1)
    assert [(r["series"], r["status"]) for r in rep.rows] == [("medvae-summary_scan.nii.gz", "restored")]


def test_a_second_run_of_a_shard_at_once_is_refused(archive, tmp_path):
    """Two runs of one shard interleaved their rows into one summary (a malformed row, series twice)."""
    import subprocess
    import sys

    from medvae.batch import summary_path
    from medvae.errors import MedvaeError

    out = tmp_path / "restored"
    out.mkdir()
    summary = summary_path(out, (0, 1))
    holder = subprocess.Popen([sys.executable, "-c", "import time\nfrom medvae.io.atomic import exclusive\n"
                               f"with exclusive({str(summary)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MedvaeError, match="another medvae process is writing this output now"):
            restore_batch(archive, out)
    finally:
        holder.kill()
        holder.wait()
    assert not summary.exists()


def test_loose_slices_of_one_series_are_refused_not_split(dev_data, archive, tmp_path):
    # two loose files of series_ct_head would become two one-slice derived series
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:2]:
        shutil.copyfile(f, archive / f"d_{f.name}")
    with pytest.raises(MedvaeError, match=r"loose DICOM files d_\S+ and d_\S+ belong to one series .* "
                                          r"move each series into a folder of its own") as err:
        find_jobs(archive, tmp_path / "restored")
    assert "\n" not in str(err.value) and str(archive) in str(err.value)
    assert not (tmp_path / "restored").exists()


def test_folders_each_holding_images_of_one_series_are_said_and_restored_each(dev_data, archive, tmp_path, caplog):
    # a series split into folders (by phase, or an export in parts) became two derived series without a word;
    # refused, a multi-phase series split by phase (one UID, repeated positions) could not be restored at all
    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))
    for part, chunk in (("part1", files[:2]), ("part2", files[2:4])):
        (archive / part).mkdir()
        for f in chunk:
            shutil.copyfile(f, archive / part / f.name)
    (archive / "part1" / "DICOMDIR.txt").write_text("not DICOM: the first DICOM file tells the series")
    with caplog.at_level("WARNING", logger="medvae"):
        jobs = find_jobs(archive, tmp_path / "restored")
    assert {"part1", "part2"} <= {j.name for j in jobs}
    assert f"part1 and part2 hold images of one series ({dev_expect_uid(files[0])}): each is restored" in caplog.text
    assert not (tmp_path / "restored").exists()
    caplog.clear()
    (archive / "mr_small").mkdir()  # folders of different series: no word
    shutil.copyfile(dev_data / "dicom/pydicom/MR_small.dcm", archive / "mr_small" / "MR_small.dcm")
    shutil.rmtree(archive / "part2")
    with caplog.at_level("WARNING", logger="medvae"):
        find_jobs(archive, tmp_path / "restored")
    assert "hold images of one series" not in caplog.text
    # loose files of a series whose folder sorts first are still refused (each compared with the folder only)
    shutil.copyfile(files[5], archive / "part2.dcm")
    shutil.copyfile(files[6], archive / "part3.dcm")
    with pytest.raises(MedvaeError, match=r"loose DICOM files part2.dcm and part3.dcm belong to one series"):
        find_jobs(archive, tmp_path / "restored")


def dev_expect_uid(path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_shard_from_the_environment(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN",
              "SLURM_ARRAY_TASK_MAX", "SLURM_ARRAY_TASK_STEP"):
        monkeypatch.delenv(k, raising=False)
    assert shard_from_env() == (0, 1)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "5")
    assert shard_from_env() == (2, 4)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert shard_from_env() == (5, 8)          # rank 1 of a torchrun inside array task 2 of 4
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert shard_from_env() == (1, 2)          # torchrun alone
    assert shard_from_env("3/8") == (3, 8)     # --shard wins
    with pytest.raises(MedvaeError, match="out of range"):
        shard_from_env("2/2")
    with pytest.raises(MedvaeError, match="must look like i/n"):
        shard_from_env("half")
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    # sbatch --array=0-198:2: 100 tasks with ids 0, 2, ..., 198 are shards 0..99
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_STEP", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "198")
    assert shard_from_env() == (99, 100)
    # --array=1,5,7: no stepped range, so task 5 is no shard ("shard 4 of 3 is out of range" before)
    for k, v in {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
                 "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_STEP": "1"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(MedvaeError, match=r"task ids are not one evenly stepped range \(task 5; min 1, max 7, "
                                          r"3 tasks, .*give each task --shard i/n"):
        shard_from_env()
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")   # its first task is no shard either: the array is wrong
    with pytest.raises(MedvaeError, match="not one evenly stepped range"):
        shard_from_env()
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("RANK", "")                   # a traceback (int('')) before
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MedvaeError, match=r"environment variable RANK='' is not an integer"):
        shard_from_env()


def test_manifest_jobs_get_unique_names(dev_data, tmp_path):
    head = dev_data / "dicom" / "series_ct_head"
    m = tmp_path / "series.csv"
    m.write_text("path,series_uid\n"
                 f"{dev_data}/nifti/heudiconv_axasc35.nii.gz,\n"
                 f"{tmp_path}/other/heudiconv_axasc35.nii.gz,\n"
                 f"{head},1.2.3\n")
    jobs = find_jobs(m, tmp_path / "out")
    # names that collide each get a digest of their own input, before the NIfTI extension
    names = {j.input: j.name for j in jobs}
    assert re.fullmatch(r"heudiconv_axasc35-[0-9a-f]{8}\.nii\.gz", names[dev_data / "nifti/heudiconv_axasc35.nii.gz"])
    assert len(set(names.values())) == 3 and [j.name for j in jobs] == sorted(names.values())
    assert jobs[2].name == "series_ct_head_1.2.3" and jobs[2].series_uid == "1.2.3"
    assert jobs[2].output == tmp_path / "out" / "series_ct_head_1.2.3"
    with pytest.raises(MedvaeError, match="must not be inside the input folder"):
        find_jobs(dev_data / "nifti", dev_data / "nifti" / "out")


def test_a_manifest_listing_a_series_twice_is_refused(dev_data, tmp_path):
    m = tmp_path / "series.csv"
    m.write_text(f"path\n{dev_data}/dicom/pydicom/CT_small.dcm\n{dev_data}/nifti/heudiconv_axasc35.nii.gz\n"
                 f"{dev_data}/dicom/pydicom/../pydicom/CT_small.dcm\n")
    with pytest.raises(MedvaeError, match="manifest rows 1 and 3 list the same scan"):
        find_jobs(m, tmp_path / "out")


def test_an_output_restored_from_another_series_is_not_skipped_as_done(dev_data, tmp_path):
    # p1/CT alone gives the output CT; a manifest whose CT is p0's must not take p1's restoration for it
    for p, f in (("p0", "MR_small.dcm"), ("p1", "CT_small.dcm"), ("p2", "MR_small.dcm")):
        (tmp_path / p / "CT").mkdir(parents=True)
        shutil.copyfile(dev_data / "dicom" / "pydicom" / f, tmp_path / p / "CT" / f)
    (tmp_path / "run1.csv").write_text("path\np1/CT\n")
    (tmp_path / "run2.csv").write_text("path\np0/CT\n")
    out = tmp_path / "out"
    assert restore_batch(tmp_path / "run1.csv", out, ensemble=1).counts()["restored"] == 1
    rep = restore_batch(tmp_path / "run2.csv", out, ensemble=1)
    assert rep.rows[0]["series"] == "CT" and rep.rows[0]["status"] == "failed"
    assert "holds the restoration of another series" in rep.rows[0]["error"]
    assert load_scan(out / "CT").modality == "CT"  # p1's restoration, untouched
    # the same data set, moved, still matches its outputs
    shutil.copytree(tmp_path / "p1", tmp_path / "moved" / "p1")
    shutil.copyfile(tmp_path / "run1.csv", tmp_path / "moved" / "run1.csv")
    assert restore_batch(tmp_path / "moved" / "run1.csv", out, ensemble=1).counts() == {
        "restored": 0, "skipped": 1, "failed": 0}


def test_a_failed_overwrite_keeps_the_other_series_output_marked_as_theirs(dev_data, tmp_path):
    # --overwrite removed the other series' marker before restoring; the restore failed, and the next
    # run skipped the other patient's restoration as this series' own
    import pydicom

    for p in ("p0", "p1"):
        (tmp_path / p / "CT").mkdir(parents=True)
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", tmp_path / "p1" / "CT" / "ct.dcm")
    ds = pydicom.dcmread(dev_data / "dicom" / "pydicom" / "CT_small.dcm")
    ds.RescaleSlope = 0  # unrestorable
    ds.save_as(tmp_path / "p0" / "CT" / "ct.dcm")
    (tmp_path / "run1.csv").write_text("path\np1/CT\n")
    (tmp_path / "run2.csv").write_text("path\np0/CT\n")
    out = tmp_path / "out"
    assert restore_batch(tmp_path / "run1.csv", out, ensemble=1).counts()["restored"] == 1
    assert restore_batch(tmp_path / "run2.csv", out, ensemble=1, overwrite=True).counts()["failed"] == 1
    rep = restore_batch(tmp_path / "run2.csv", out, ensemble=1)
    assert rep.rows[0]["status"] == "failed" and "holds the restoration of another series" in rep.rows[0]["error"]


def test_a_dicom_named_file_that_is_not_read_as_dicom_is_reported_not_left_out(archive, tmp_path):
    raw = (archive / "c_ct.dcm").read_bytes()
    (archive / "d_nopreamble.dcm").write_bytes(raw[132:])  # no preamble, no "DICM"
    (archive / "e_text.dcm").write_text("not dicom")
    names = [j.name for j in find_jobs(archive, tmp_path / "out")]
    assert "d_nopreamble" in names and "e_text" in names


def test_a_file_medvae_did_not_write_at_an_output_name_is_not_taken_as_done(archive, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copyfile(archive / "a_mr.nii.gz", out / "a_mr.nii.gz")  # the unrestored input, copied there
    before = (out / "a_mr.nii.gz").read_bytes()
    rows = {r["series"]: r for r in restore_batch(archive, out, ensemble=1).rows}
    assert rows["a_mr.nii.gz"]["status"] == "failed" and "medvae did not write" in rows["a_mr.nii.gz"]["error"]
    assert rows["c_ct"]["status"] == "restored" and (out / "a_mr.nii.gz").read_bytes() == before


def test_an_output_never_takes_the_name_of_another_ones_uncertainty_map(dev_data, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", d / "a.nii.gz")
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", d / "a_uncertainty.nii.gz")
    names = [j.output.name for j in find_jobs(d, tmp_path / "out")]
    maps = {n.replace(".nii.gz", "_uncertainty.nii.gz") for n in names}
    assert len(set(names)) == 2 and not set(names) & maps, names


def test_a_manifest_output_inside_an_input_series_is_refused_before_writing(dev_data, tmp_path):
    series = tmp_path / "ser"
    series.mkdir()
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", series / "ct.dcm")
    (tmp_path / "list.csv").write_text("path\nser\n")
    with pytest.raises(MedvaeError, match="lie one inside the other"):
        restore_batch(tmp_path / "list.csv", series / "out", ensemble=1)
    assert sorted(p.name for p in series.iterdir()) == ["ct.dcm"]


def test_output_names_and_shards_do_not_depend_on_the_order_of_the_rows(dev_data, tmp_path):
    # p1/CT, p2/CT and p3/CT collide: numbered in row order (CT, CT-2...), a reordered manifest gave
    # p2 the output CT of p1, and a rerun reported both as failed (or another shard took them)
    for p, f in (("p1", "CT_small.dcm"), ("p2", "MR_small.dcm"), ("p3", "CT_small.dcm")):
        (tmp_path / p / "CT").mkdir(parents=True)
        shutil.copyfile(dev_data / "dicom" / "pydicom" / f, tmp_path / p / "CT" / f)
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", tmp_path / "mr.nii.gz")
    rows = ["p1/CT", "p2/CT", "p3/CT", "mr.nii.gz"]
    seen = set()
    for k, order in enumerate((rows, rows[::-1], [rows[2], rows[0], rows[3], rows[1]])):
        (tmp_path / f"m{k}.csv").write_text("path\n" + "\n".join(order) + "\n")
        jobs = find_jobs(tmp_path / f"m{k}.csv", tmp_path / "out")
        seen.add(tuple((j.input.relative_to(tmp_path).as_posix(), j.name) for j in jobs))
    assert len(seen) == 1  # the same input gets the same name, at the same place (shard), every time
    names = dict(seen.pop())
    assert names["mr.nii.gz"] == "mr.nii.gz" and len({names[r] for r in rows}) == 4
    # restored from one order, resumed from another: all done, none taken for another's
    out = tmp_path / "out"
    assert restore_batch(tmp_path / "m0.csv", out, shard="1/2", ensemble=1).counts()["failed"] == 0
    assert restore_batch(tmp_path / "m1.csv", out, shard="1/2", ensemble=1).counts() == {
        "restored": 0, "skipped": 2, "failed": 0}
    for r in rows[:3]:
        if (out / names[r]).exists():
            assert load_scan(out / names[r]).modality == ("MR" if r == "p2/CT" else "CT")


# -- bounded memory: restore in place ---------------------------------------------------------------

def test_restore_in_place_equals_a_new_array_without_a_second_volume(dev_data):
    import tracemalloc

    import torch

    from medvae.restore import restore_volume
    from medvae.tracking import load_model

    lm = load_model("default", device=torch.device("cpu"))
    # a CT block of the dev head CT (HU): its intensity window is fixed, so NumPy allocates nothing
    # volume-sized for it (MR percentiles of a small volume would copy it)
    head = load_scan(dev_data / "nifti" / "invesalius_cranium_ct.nii.gz").array
    nz = head.shape[2]  # dev: 108; the pip stand-in: 4, repeated to 60 (this measures memory, not anatomy)
    vol = np.ascontiguousarray(head[96:160, 96:160, 40:100] if nz >= 100 else
                               np.take(head[96:160, 96:160], np.arange(60) % nz, axis=2))
    assert vol.shape[2] == 60
    del head
    mask = np.zeros(vol.shape, bool)
    mask[10:40, 20:50, 5:25] = True
    # the network alone, from a model without blend weights: the holes blend's biharmonic solve (which
    # the map's disagreement term needs even under blend=False) adds a per-slice workspace (about 1 MB for
    # these 64² slices, as much at 240 slices as at 60) that would swamp what is measured here on so small
    # a volume: whether anything volume-sized is allocated
    import dataclasses

    lm = dataclasses.replace(lm, meta={k: v for k, v in lm.meta.items() if k != "blend"})
    kw = dict(model=lm, modality="CT", mask=mask, samples=2, batch_size=2)
    ref, ref_std = restore_volume(vol, **kw)
    work = vol.copy()
    tracemalloc.start()
    got, std = restore_volume(work, out=work, **kw)
    peak_samples = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.shares_memory(got, work)
    assert np.array_equal(got, ref) and np.array_equal(std, ref_std)
    assert np.array_equal(got[~mask], vol[~mask]) and not np.array_equal(got[mask], vol[mask])
    # without a mask every pixel is restored, in place as well
    ref = restore_volume(vol, model=lm, modality="CT", batch_size=2)[0]
    work = vol.copy()
    tracemalloc.start()
    got, _ = restore_volume(work, model=lm, modality="CT", batch_size=2, out=work)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(got, ref) and np.shares_memory(got, work)
    # NumPy's allocations while restoring (traced): a few 2-slice batches of this 60-slice block,
    # plus the float16 uncertainty map (0.5x) with samples; never a second float32 volume (1x)
    assert peak < 0.5 * vol.nbytes, peak / vol.nbytes
    assert peak_samples < 1.0 * vol.nbytes, peak_samples / vol.nbytes


def test_restore_command_runs_a_batch_and_exits_1_when_a_series_failed(archive, tmp_path, capsys):
    from medvae.cli import main as cli

    out = tmp_path / "restored"
    assert cli(["restore", str(archive), str(out), "--batch", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert "2 restored, 0 already done, 1 failed" in captured.out
    assert "b_broken.nii.gz failed" in captured.err
    # a manifest of the two good series is a batch too: both are already done
    m = tmp_path / "series.csv"
    m.write_text(f"path\n{archive / 'a_mr.nii.gz'}\n{archive / 'c_ct.dcm'}\n")
    assert cli(["restore", str(m), str(out), "--device", "cpu"]) == 0
    assert "0 restored, 2 already done, 0 failed" in capsys.readouterr().out
    assert cli(["restore", str(archive), str(out), "--batch", "--mask", "m.nii.gz"]) == 2
    assert "--mask applies to one series" in capsys.readouterr().err


def test_a_batch_restores_exactly_as_a_single_restore_does(dev_data, tmp_path):
    # the batch once loaded the default model eagerly while restore used its TorchScript export:
    # under bf16 on a CPU the two differed by up to 1.8 HU
    from medvae.restore import restore_scan

    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", d / "ct.dcm")
    restore_batch(d, tmp_path / "batch", ensemble=1)
    restore_scan(d / "ct.dcm", tmp_path / "single", ensemble=1)
    np.testing.assert_array_equal(load_scan(tmp_path / "batch" / "ct").array, load_scan(tmp_path / "single").array)


def test_a_wrong_model_is_one_line_and_leaves_the_output_folder_as_it_was(archive, tmp_path, capsys):
    from medvae.cli import main as cli

    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a model")
    out = tmp_path / "restored"
    assert cli(["restore", str(archive), str(out), "--batch", "--model", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and not out.exists()
    # a rerun of a batch with a failed series: its summary is kept, not cut to a header
    assert cli(["restore", str(archive), str(out), "--batch", "--device", "cpu"]) == 1
    summary = (out / "medvae-summary.csv").read_bytes()
    assert cli(["restore", str(archive), str(out), "--batch", "--model", str(bad)]) == 2
    assert (out / "medvae-summary.csv").read_bytes() == summary
    capsys.readouterr()
    # so are bad option values: each series failed alone with them, into a summary of failures and exit 1
    for option, said in ((["--samples", "-1"], "samples must be a whole number >= 0, not -1"),
                         (["--batch-size", "0"], "batch_size must be a whole number >= 1, not 0")):
        assert cli(["restore", str(archive), str(tmp_path / "new"), "--batch", *option]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0] and not (tmp_path / "new").exists()
    from medvae.batch import restore_batch  # the API's modality too (argparse checks the command's)

    with pytest.raises(MedvaeError, match="modality must be CT or MR, not 'PET'"):
        restore_batch(archive, tmp_path / "new", modality="PET")
    assert not (tmp_path / "new").exists()


# -- privacy: no tag text or inner file names in the summary, on stderr or in the log ----------------

def _doe_jane(dev_data: Path, dst: Path, src: str, series_uid: str) -> None:
    """A dev DICOM file with a patient's name in its free-text tags (as some sites' files have)."""
    import pydicom

    ds = pydicom.dcmread(dev_data / "dicom" / "pydicom" / src)
    ds.PatientName, ds.PatientID, ds.SeriesDescription = "DOE^JANE", "JD0042", "DOE^JANE head"
    ds.StudyDescription = ds.InstitutionName = "Jane Doe Clinic"
    ds.SeriesInstanceUID = series_uid
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst)


def test_a_failed_series_reports_no_tag_text_nor_file_names(dev_data, tmp_path, capsys, caplog):
    from medvae.cli import main as cli

    archive = tmp_path / "archive"
    # a folder mixing two series: the reader's error lists each with its SeriesDescription
    _doe_jane(dev_data, archive / "mixed" / "a.dcm", "CT_small.dcm", "1.2.826.0.1.7.1")
    _doe_jane(dev_data, archive / "mixed" / "b.dcm", "MR_small.dcm", "1.2.826.0.1.7.2")
    # one series whose slices differ in size, files named after the patient: the error names both
    _doe_jane(dev_data, archive / "sizes" / "DOE_JANE_1.dcm", "CT_small.dcm", "1.2.826.0.1.7.3")
    _doe_jane(dev_data, archive / "sizes" / "DOE_JANE_2.dcm", "MR_small.dcm", "1.2.826.0.1.7.3")
    out = tmp_path / "restored"
    with caplog.at_level(logging.DEBUG):
        assert cli(["restore", str(archive), str(out), "--batch", "--device", "cpu", "--ensemble", "1"]) == 1
    text = (out / "medvae-summary.csv").read_text() + capsys.readouterr().err + caplog.text
    assert not re.search(r"doe|jane|JD0042", text, re.IGNORECASE), text
    # what the user needs to act on it is there: the series (its row), the kind, the UIDs, which file
    rows = _rows(out / "medvae-summary.csv")
    assert rows["mixed"]["error"] == ("SeriesChoiceError: 2 series found: 1.2.826.0.1.7.1 (1 slice); "
                                      "1.2.826.0.1.7.2 (1 slice); give each a manifest row with its series_uid")
    assert rows["sizes"]["error"] == "MedvaeError: file #2 of 2: slices differ in size: 64x64 here, 128x128 in file #1"


def test_tag_values_and_unexpected_error_text_are_left_out(dev_data, tmp_path, monkeypatch, caplog):
    # a reader's error kept inside medvae's message, or an unexpected error, may quote a tag's value
    import medvae.restore

    for name in ("quoted", "unexpected"):
        _doe_jane(dev_data, tmp_path / "archive" / name / "im1.dcm", "CT_small.dcm", f"1.2.826.0.1.8.{len(name)}")

    def failing(src, *a, **k):
        if Path(src).name == "quoted":
            raise MedvaeError("not a readable DICOM file (ValueError: bad PN value 'Doe^Jane' in 'JANE DOE CLINIC')",
                              Path(src) / "im1.dcm")
        raise ValueError("could not convert string to float: 'DOE^JANE'")

    monkeypatch.setattr(medvae.restore, "restore_scan", failing)
    monkeypatch.setattr(medvae.restore, "_resolve_model", lambda *a, **k: None)  # no model is needed
    with caplog.at_level(logging.DEBUG, logger="medvae"):
        rep = restore_batch(tmp_path / "archive", tmp_path / "out", device="cpu")
    rows = {r["series"]: r["error"] for r in rep.rows}
    assert rows["quoted"] == ("MedvaeError: file #1 of 1: not a readable DICOM file (ValueError: bad PN value "
                              "'[redacted]' in '[redacted]')")
    assert rows["unexpected"].startswith("ValueError: unexpected error")
    assert "restore this series alone" in rows["unexpected"]
    assert "failing" in caplog.text and not re.search(r"doe|jane", caplog.text + str(rows), re.IGNORECASE)


def test_the_rows_own_paths_are_not_redacted_in_its_error(dev_data, tmp_path):
    """A series folder named after the patient: its output path in the error was '[redacted]_[redacted]_A',
    a path that does not exist, while the row itself showed the name."""
    _doe_jane(dev_data, tmp_path / "archive" / "DOE_JANE_A" / "im1.dcm", "CT_small.dcm", "1.2.826.0.1.8.9")
    theirs = tmp_path / "out" / "DOE_JANE_A"
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("the user's own")
    (row,) = restore_batch(tmp_path / "archive", tmp_path / "out", device="cpu").rows
    assert row["series"] == "DOE_JANE_A" and str(theirs) in row["error"] and "[redacted]" not in row["error"]
    assert (theirs / "notes.txt").read_text() == "the user's own"


def test_a_word_like_the_series_name_is_not_redacted(dev_data, tmp_path, monkeypatch):
    """A series named "ct": "unsupported CT compression" came out as "unsupported [redacted] compression"."""
    import medvae.restore

    _doe_jane(dev_data, tmp_path / "archive" / "ct" / "im1.dcm", "CT_small.dcm", "1.2.826.0.1.8.7")

    def failing(src, *a, **k):
        raise MedvaeError("unsupported CT compression", Path(src) / "im1.dcm")

    monkeypatch.setattr(medvae.restore, "restore_scan", failing)
    monkeypatch.setattr(medvae.restore, "_resolve_model", lambda *a, **k: None)
    (row,) = restore_batch(tmp_path / "archive", tmp_path / "out", device="cpu").rows
    assert row["error"] == "MedvaeError: file #1 of 1: unsupported CT compression"


def test_a_guessed_modality_is_said_per_series_as_a_single_restore_says_it(dev_data, tmp_path, caplog):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", d / "a.nii.gz")
    with caplog.at_level(logging.WARNING, logger="medvae.batch"):
        assert restore_batch(d, tmp_path / "out", ensemble=1).counts()["restored"] == 1
    assert re.search(r"a\.nii\.gz: restored as MR \(guessed from the values.*\); pass --modality to override",
                     caplog.text), caplog.text
    assert "manifest row" not in caplog.text  # a folder of series has none to give a modality in
    caplog.clear()
    (tmp_path / "guess.csv").write_text(f"path\n{d / 'a.nii.gz'}\n")
    with caplog.at_level(logging.WARNING, logger="medvae.batch"):
        restore_batch(tmp_path / "guess.csv", tmp_path / "out3", ensemble=1)
    assert "give its manifest row a modality, or pass --modality to override" in caplog.text
    caplog.clear()
    (tmp_path / "m.csv").write_text(f"path,modality\n{d / 'a.nii.gz'},MR\n")  # said: no guess to report
    with caplog.at_level(logging.WARNING, logger="medvae.batch"):
        assert restore_batch(tmp_path / "m.csv", tmp_path / "out2", ensemble=1).counts()["restored"] == 1
    assert "restored as" not in caplog.text


def test_a_skipped_series_keeps_its_figures_after_a_killed_rerun_cut_the_summary(archive, tmp_path):
    (archive / "b_broken.nii.gz").unlink()
    out = tmp_path / "restored"
    restore_batch(archive, out, ensemble=1)
    (out / "medvae-summary.csv").write_text(",".join(SUMMARY) + "\n")  # a rerun killed before its first row
    rows = {r["series"]: r for r in restore_batch(archive, out, ensemble=1).rows}
    assert rows["c_ct"]["status"] == "skipped" and rows["c_ct"]["slices"] == "1"  # empty before
    assert float(rows["c_ct"]["seconds"]) > 0


def test_a_readers_warning_in_a_batch_names_no_file_of_the_series(dev_data, tmp_path, capsys, caplog):
    """A series whose files carry the patient's name and lack a slice: the reader's warning named the file
    (``DOE_JANE_3.dcm: uneven slice spacing``) on the batch job's stderr, which the summary keeps out."""
    from medvae.cli import main as cli

    gap = tmp_path / "archive" / "gap"
    gap.mkdir(parents=True)
    for k in (1, 2, 3, 5, 6):  # slice 4 missing: uneven spacing
        shutil.copyfile(dev_data / "dicom" / "series_ct_head" / f"slice_{k:04d}.dcm", gap / f"DOE_JANE_{k}.dcm")
    out = tmp_path / "restored"
    with caplog.at_level(logging.INFO):
        assert cli(["restore", str(tmp_path / "archive"), str(out), "--batch", "--device", "cpu",
                    "--ensemble", "1"]) == 0
    err = capsys.readouterr().err + caplog.text
    assert "file #5: uneven slice spacing" in err  # the warning is still said, naming the file by number
    assert not re.search(r"doe|jane", err, re.IGNORECASE), err
    # after the batch, and in other threads during it, records are left as they are
    outside = logging.getLogger("medvae.test").makeRecord("t", logging.WARNING, "f", 1, f"{gap}/DOE_JANE_1.dcm",
                                                           None, None)
    assert outside.getMessage() == f"{gap}/DOE_JANE_1.dcm"


def test_an_input_added_or_removed_beside_one_of_the_same_name_keeps_the_written_names(dev_data, tmp_path):
    """``p1/CT`` restored alone is ``CT``; adding ``p2/CT`` gave both a digest, and ``p1/CT`` was restored a
    second time as ``CT-<digest>`` beside its first restoration (and back again when ``p2`` left)."""
    for p in ("p1", "p2", "p3"):
        (tmp_path / p / "CT").mkdir(parents=True)
        shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", tmp_path / p / "CT" / "ct.dcm")
    out = tmp_path / "out"
    (tmp_path / "m.csv").write_text("path\np1/CT\n")
    assert restore_batch(tmp_path / "m.csv", out, ensemble=1).counts()["restored"] == 1
    (tmp_path / "m.csv").write_text("path\np1/CT\np2/CT\n")
    rep = restore_batch(tmp_path / "m.csv", out, ensemble=1)
    assert rep.counts() == {"restored": 1, "skipped": 1, "failed": 0}
    by_status = {r["status"]: r["series"] for r in rep.rows}
    assert by_status["skipped"] == "CT" and by_status["restored"].startswith("CT-")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith((".", "medvae-"))) == sorted(
        ["CT", by_status["restored"]])
    # p1 leaves: p2 keeps its digest name rather than taking the plain one and being restored again
    (tmp_path / "m.csv").write_text("path\np2/CT\np3/CT\n")
    rep = restore_batch(tmp_path / "m.csv", out, ensemble=1)
    assert rep.counts() == {"restored": 1, "skipped": 1, "failed": 0}
    assert {r["series"] for r in rep.rows if r["status"] == "skipped"} == {by_status["restored"]}


def test_one_series_listed_through_a_link_or_by_its_uid_and_whole_is_refused(dev_data, tmp_path, caplog):
    """Rows were compared by their text: each of these became a second derived series of one input."""
    import os

    import pydicom

    d = tmp_path / "head"
    d.mkdir()
    for k in (1, 2):
        shutil.copyfile(dev_data / "dicom" / "series_ct_head" / f"slice_{k:04d}.dcm", d / f"{k}.dcm")
    os.symlink(tmp_path, tmp_path / "link")
    uid = pydicom.dcmread(d / "1.dcm", stop_before_pixels=True).SeriesInstanceUID
    m = tmp_path / "m.csv"
    for rows in ("head,\nlink/head,", f"head,\nhead,{uid}", f"head,{uid}\nhead,"):
        m.write_text(f"path,series_uid\n{rows}\n")
        with pytest.raises(MedvaeError, match="manifest rows 1 and 2 list the same scan"):
            find_jobs(m, tmp_path / "out")
    m.write_text("path,series_uid\nhead,\nhead,1.2.3\n")  # a UID the folder does not hold: each row its own
    assert len(find_jobs(m, tmp_path / "out")) == 2
    archive = tmp_path / "archive"  # a folder batch: a link beside its target was restored twice
    archive.mkdir()
    shutil.copytree(d, archive / "head")
    os.symlink("head", archive / "linkdir")
    with pytest.raises(MedvaeError, match=r"archive: head and linkdir are the same scan \(one through a link\)"):
        find_jobs(archive, tmp_path / "out")
    (archive / "linkdir").unlink()
    (archive / "head" / "sub").mkdir()  # a link into a sibling folder: said, from the paths alone
    os.symlink("head/sub", archive / "latest")
    with caplog.at_level("WARNING", logger="medvae"):
        find_jobs(archive, tmp_path / "out")
    assert "latest is a link into head, which this batch restores too" in caplog.text
    (archive / "latest").unlink()
    shutil.rmtree(archive / "head" / "sub")
    shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", archive / "n.nii.gz")
    os.symlink("n.nii.gz", archive / "alias.nii.gz")
    with pytest.raises(MedvaeError, match=r"alias.nii.gz and n.nii.gz are the same scan \(one through a link\): "
                                          r"each would be restored on its own"):
        find_jobs(archive, tmp_path / "out")
    (archive / "alias.nii.gz").unlink()
    assert len(find_jobs(archive, tmp_path / "out")) == 2
    shutil.copyfile(d / "1.dcm", archive / "x.dcm")  # a DICOM file and a link to it: the link named, not a split series
    os.symlink("x.dcm", archive / "y.dcm")
    with pytest.raises(MedvaeError, match=r"x.dcm and y.dcm are the same scan \(one through a link\)"):
        find_jobs(archive, tmp_path / "out")
    (archive / "y.dcm").unlink()
    (archive / "x.dcm").unlink()
    for name in ("b1.nii.gz", "b2.nii.gz"):  # broken links: each fails on its own, the batch goes on
        os.symlink("gone.nii.gz", archive / name)
    assert len(find_jobs(archive, tmp_path / "out")) == 4


def test_a_nifti_row_with_a_series_uid_and_an_output_that_is_a_file_are_refused(dev_data, tmp_path):
    m = tmp_path / "m.csv"
    m.write_text(f"path,series_uid\n{dev_data}/nifti/heudiconv_axasc35.nii.gz,1.2.3\n")
    with pytest.raises(MedvaeError, match="manifest row 1: series_uid 1.2.3 is given for a NIfTI file"):
        find_jobs(m, tmp_path / "out")
    (tmp_path / "out").write_text("")
    with pytest.raises(MedvaeError, match="out: is a file; give a folder"):
        find_jobs(dev_data / "nifti", tmp_path / "out")


def test_scrubbing_touches_the_batch_threads_records_only(tmp_path):
    """Two batches in two threads put back each other's swapped record factory out of order, and every
    later record of the process was rewritten."""
    import threading

    from medvae.batch import Job, _scrubbed_logs

    f = tmp_path / "series" / "DOE_JANE_1.dcm"
    f.parent.mkdir()
    f.write_bytes(b"not read as DICOM")
    job = Job(name="series", input=f.parent, output=tmp_path / "out" / "series", base=tmp_path)
    log = logging.getLogger("medvae.io.dicom")
    seen = {}

    def record(key):
        seen[key] = log.makeRecord(log.name, logging.WARNING, "f", 1, "%s: uneven", (str(f),), None).getMessage()

    with _scrubbed_logs(job):
        record("batch")
        other = threading.Thread(target=record, args=("other",))
        other.start()
        other.join()
    record("after")
    assert seen["batch"] == "file #1: uneven"
    assert seen["other"] == seen["after"] == f"{f}: uneven"


def test_kept_names_do_not_depend_on_the_row_order_nor_read_every_series(dev_data, tmp_path, monkeypatch):
    import medvae.batch as batch

    for p, name in (("q", "CT_uncertainty"), ("p1", "CT"), ("p2", "CT")):
        (tmp_path / p).mkdir()
        shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", tmp_path / p / f"{name}.dcm")
    out = tmp_path / "out"
    for rows in ("q", "q p1 p2"):
        (tmp_path / "m.csv").write_text("path\n" + "".join(
            f"{r}/{'CT_uncertainty' if r == 'q' else 'CT'}.dcm\n" for r in rows.split()))
        restore_batch(tmp_path / "m.csv", out, ensemble=1)
    names = {}
    for rows in ("q/CT_uncertainty.dcm p1/CT.dcm", "p1/CT.dcm q/CT_uncertainty.dcm"):  # p2 left
        (tmp_path / "m.csv").write_text("path\n" + "\n".join(rows.split()) + "\n")
        names[rows] = {j.input.parent.name: j.name for j in find_jobs(tmp_path / "m.csv", out)}
    first, second = names.values()
    assert first == second and first["q"] == "CT_uncertainty" and first["p1"].startswith("CT-")
    # many rows of one name beside one written output: no row's series is read to tell them apart
    many = tmp_path / "many"
    for k in range(30):
        (many / f"p{k:02d}" / "CT").mkdir(parents=True)
    (many / "m.csv").write_text("path\n" + "".join(f"p{k:02d}/CT\n" for k in range(30)))
    (many / "one.csv").write_text("path\np29/CT\n")
    written = find_jobs(many / "one.csv", many / "out")[0]
    (many / "out" / "CT").mkdir(parents=True)
    batch._mark_source(written, None)
    reads = []
    monkeypatch.setattr(batch, "_input_uid", lambda job: reads.append(job) or None)
    jobs = find_jobs(many / "m.csv", many / "out")
    assert {j.name for j in jobs if j.input.parent.name == "p29"} == {"CT"} and len(reads) == 1


def test_an_output_marked_by_an_older_medvae_keeps_its_name_and_its_marker_gains_the_path_hashes(dev_data,
                                                                                                  tmp_path):
    for p in ("p1", "p2"):
        (tmp_path / p).mkdir()
        shutil.copyfile(dev_data / "nifti" / "heudiconv_axasc35.nii.gz", tmp_path / p / "a.nii.gz")
    out = tmp_path / "out"
    (tmp_path / "m.csv").write_text("path\np1/a.nii.gz\n")
    restore_batch(tmp_path / "m.csv", out, ensemble=1)
    marker = out / ".a.nii.gz.medvae-source"
    old = [w for w in marker.read_text().split() if not w.startswith("path:")]  # as markers were written
    marker.write_text("\n".join(old) + "\n")
    # the upgrade is best effort: a marker that cannot be rewritten (a full disk) still skips its series
    import errno

    import medvae.batch as batch

    def full(job, uid, **figures):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batch, "_mark_source", full)
        assert restore_batch(tmp_path / "m.csv", out, ensemble=1).counts() == {"restored": 0, "skipped": 1,
                                                                                "failed": 0}
    (tmp_path / "m.csv").write_text("path\np1/a.nii.gz\np2/a.nii.gz\n")
    rep = restore_batch(tmp_path / "m.csv", out, ensemble=1)
    assert rep.counts() == {"restored": 1, "skipped": 1, "failed": 0}
    assert [r["series"] for r in rep.rows if r["status"] == "skipped"] == ["a.nii.gz"]
    assert any(w.startswith("path:") for w in marker.read_text().split())  # kept from then on without a read


def test_a_warning_while_the_scrubber_reads_the_series_tags_is_no_recursion(dev_data, tmp_path, caplog):
    """pydicom warns of a bad tag value while the scrubber reads the tags: that record asked for the scrubber
    again, without end (a RecursionError traceback stopped the shard)."""
    a = tmp_path / "a"
    a.mkdir()
    shutil.copyfile(dev_data / "dicom" / "pydicom-data" / "bad_sequence.dcm", a / "bad_sequence.dcm")
    shutil.copyfile(dev_data / "dicom" / "pydicom" / "CT_small.dcm", a / "CT_small.dcm")
    with caplog.at_level(logging.DEBUG):
        rep = restore_batch(a, tmp_path / "out", ensemble=1)
    assert {r["series"]: r["status"] for r in rep.rows}["CT_small"] == "restored"
    assert sum(rep.counts().values()) == 2


def test_a_record_made_while_the_scrubber_is_made_is_left_out_not_recursed(tmp_path, monkeypatch):
    import medvae.batch as batch

    nested = []

    class Keep(logging.Handler):
        def emit(self, record):
            nested.append(record.getMessage())

    def making(job):  # as pydicom does while the tags are read: a warning quoting a value
        logging.getLogger("pydicom").warning("invalid value for PatientName: DOE^JANE")
        return lambda text: text.replace("secret", "[redacted]")

    monkeypatch.setattr(batch, "_scrubber", making)
    handler = Keep()
    logging.getLogger("pydicom").addHandler(handler)
    try:
        job = batch.Job(name="s", input=tmp_path, output=tmp_path / "o", base=tmp_path)
        with batch._scrubbed_logs(job):
            record = logging.getLogger("medvae.io.dicom").makeRecord("m", logging.WARNING, "f", 1, "a secret", None,
                                                                    None)
    finally:
        logging.getLogger("pydicom").removeHandler(handler)
    assert record.getMessage() == "a [redacted]"
    assert nested and "DOE" not in nested[0] and "its text left out" in nested[0]
