"""Outputs are claimed, only medvae's own are replaced, and no partial output is ever visible.

Real subprocesses of ``python -m medvae`` on real scans: concurrent writers, ``--overwrite`` over
foreign files, ``kill -9`` in the middle of writing a series, then a rerun.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.io import load_scan
from medvae.io.atomic import OUTPUT_MARKER, atomic_output, claim_output
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict, load_model
from medvae.models.vae import MaskedVAE, VAEConfig

SERIES = "dicom/series_ct_head"        # 108 CT slices of 256² (stand-in: 4 of 512²)
NIFTI = "nifti/heudiconv_axasc35.nii.gz"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
    return atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path_factory.mktemp("m") / "tiny.pt")


def _medvae(*argv, env=None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medvae", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}, **kw)


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def _main(capsys, *argv) -> tuple[int, str, str]:
    from medvae.cli import main

    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


def test_two_restores_to_one_path_one_wins_whole(dev_data, tmp_path, tiny_model):
    a = dev_data / NIFTI                                    # 64 x 64 x 35-ish MR
    b = dev_data / "nifti/invesalius_cranium_ct.nii.gz"     # 256 x 256 x 108 CT
    out = tmp_path / "same.nii.gz"
    procs = [_medvae("restore", src, out, "--model", tiny_model) for src in (b, a)]
    results = [_finish(p) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    winner = next(i for i, r in enumerate(results) if r[0] == 0)
    loser_err = results[1 - winner][2]
    assert loser_err.count("\n") == 1 and "same.nii.gz" in loser_err
    assert "another medvae process is writing" in loser_err or "already exists" in loser_err
    assert nib.load(out).shape == nib.load((b, a)[winner]).shape  # whole, and the winner's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.nii.gz"]  # no lock, no staging


def test_a_held_claim_refuses_a_second_writer_at_once(tmp_path):
    out = tmp_path / "restored"
    with claim_output(out, kind="dir"):
        t0 = time.monotonic()
        p = _medvae("samples", out)
        code, _, err = _finish(p)
        assert code == 2 and "another medvae process is writing this output" in err, err
        assert err.count("\n") == 1
    assert time.monotonic() - t0 < 60 and not out.exists()


def test_overwrite_names_why_a_file_at_a_nifti_output_is_not_replaced(dev_data, tmp_path, tiny_model, copy_into,
                                                                        capsys):
    # a text file there was said to have a NIfTI description that "does not start with 'medvae'"
    src = copy_into(dev_data / "nifti/heudiconv_axasc35.nii.gz")
    (tmp_path / "out.nii.gz").write_text("my notes")
    code, _, err = _main(capsys, "restore", src, tmp_path / "out.nii.gz", "--model", tiny_model, "--overwrite")
    assert code == 2 and "refusing to replace a file medvae did not write (it is not a NIfTI file)" in err, err
    assert (tmp_path / "out.nii.gz").read_text() == "my notes"


def test_overwrite_refuses_a_folder_with_foreign_files(dev_data, tmp_path, tiny_model, copy_into, capsys):
    src = copy_into(dev_data / "dicom/pydicom/CT_small.dcm")
    patient = tmp_path / "patient_folder"
    (patient / "other_series").mkdir(parents=True)
    (patient / "other_series/MR_small.dcm").write_bytes((dev_data / "dicom/pydicom/MR_small.dcm").read_bytes())
    (patient / "notes.txt").write_text("clinical notes")
    code, _, err = _main(capsys, "restore", src, patient, "--model", tiny_model, "--overwrite")
    assert code == 2 and "did not write" in err and err.count("\n") == 1, err
    assert (patient / "notes.txt").read_text() == "clinical notes"
    assert (patient / "other_series/MR_small.dcm").is_file()
    # medvae's own output is replaced; a file slipped into it afterwards makes it foreign again
    out = tmp_path / "restored"
    assert _main(capsys, "restore", src, out, "--model", tiny_model)[0] == 0
    assert _main(capsys, "restore", src, out, "--model", tiny_model, "--overwrite")[0] == 0
    (out / "mine.txt").write_text("x")
    code, _, err = _main(capsys, "restore", src, out, "--model", tiny_model, "--overwrite")
    assert code == 2 and "mine.txt" in err
    assert (out / "mine.txt").exists() and len(list(out.glob("*.dcm"))) == 1


def test_overwrite_checks_the_series_uid_of_every_file(dev_data, tmp_path):
    scan = load_scan(dev_data / "dicom/pydicom/CT_small.dcm")
    from medvae.io import save_scan

    out = save_scan(scan, scan.array, tmp_path / "restored")
    # another series' file under a name the marker lists
    (out / "IM0001.dcm").write_bytes((dev_data / "dicom/pydicom/CT_small.dcm").read_bytes())
    with pytest.raises(MedvaeError, match="not part of the series medvae wrote"):
        save_scan(scan, scan.array, out, overwrite=True)
    assert pydicom.dcmread(out / "IM0001.dcm").SeriesInstanceUID == scan.series_uid  # untouched


def _staged_files(root: Path) -> list[Path]:
    return sorted(root.rglob("IM*.dcm"))


def _long_series(dev_data: Path, tmp_path: Path, n_min: int = 48) -> Path:
    """The CT series, or, where it has fewer than ``n_min`` slices (the 4-slice stand-in), its
    slices repeated at new positions as one series: writing must last long enough to be killed."""
    files = sorted((dev_data / SERIES).glob("*.dcm"))
    if len(files) >= n_min:
        return dev_data / SERIES
    dss = [pydicom.dcmread(f) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    p0 = np.array(dss[0].ImagePositionPatient, dtype=float)
    gap = float(np.dot(np.array(dss[1].ImagePositionPatient, dtype=float) - p0, normal))
    folder = tmp_path / "long_series"
    folder.mkdir()
    for k in range(n_min):
        ds = dss[k % len(dss)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in p0 + k * gap * normal]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"slice_{k + 1:04d}.dcm")
    return folder


@pytest.mark.parametrize("staging", ["tmpdir", "sibling"])
def test_kill_during_write_leaves_no_usable_partial_series(dev_data, tmp_path, tiny_model, staging):
    if staging == "sibling":
        shm = Path("/dev/shm")
        if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("no second filesystem to put TMPDIR on")
        tmpdir = shm / f"medvae-test-{os.getpid()}"
    else:
        tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(parents=True, exist_ok=True)
    out_parent = tmp_path / "pacs_outbox"
    out_parent.mkdir()
    out = out_parent / "restored"
    env = {"TMPDIR": str(tmpdir)}
    src = _long_series(dev_data, tmp_path)
    n = len(list(src.glob("*.dcm")))  # dev: 108
    try:
        p = _medvae("restore", src, out, "--model", tiny_model, env=env, start_new_session=True)
        look = tmpdir if staging == "tmpdir" else out_parent
        deadline = time.monotonic() + 240
        while len(_staged_files(look)) < 10 and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        staged = _staged_files(look)
        assert 10 <= len(staged) < n, "the write was not interrupted mid-series"
        assert not out.exists()
        for f in staged[:-1]:  # every staged file is refused by DICOM readers
            with pytest.raises(pydicom.errors.InvalidDicomError):
                pydicom.dcmread(f)
        if staging == "sibling":
            partial = [d.name for d in out_parent.iterdir() if d.is_dir()]
            assert len(partial) == 1 and partial[0].startswith(".restored.medvae-partial-")
        # the rerun removes the stale staging and writes the whole series
        code, _, err = _finish(_medvae("restore", src, out, "--model", tiny_model, env=env))
        assert code == 0, err
        assert sorted(x.name for x in out_parent.iterdir()) == ["restored"]
        assert [d for d in tmpdir.iterdir() if d.name.startswith("medvae-staging-")] == []
        assert len(list(out.glob("*.dcm"))) == n and (out / OUTPUT_MARKER).is_file()
        assert load_scan(out).array.shape == (*load_scan(src).array.shape[:2], n)
    finally:
        if staging == "sibling":
            import shutil

            shutil.rmtree(tmpdir, ignore_errors=True)


def test_stale_staging_of_medvae_01_is_removed_but_nothing_else(tmp_path):
    legacy = tmp_path / ".restored.medvae-tmp-m_lvoxa1"
    legacy.mkdir()
    (legacy / "IM0001.dcm").write_bytes(b"partial")
    unrelated = tmp_path / ".restored.backup"
    unrelated.mkdir()
    with atomic_output(tmp_path / "restored", kind="dir") as tmp:
        (tmp / "IM0001.dcm").write_bytes(b"x")
    assert not legacy.exists() and unrelated.is_dir()


def _ct_without_air(dev_data: Path, tmp_path: Path) -> tuple[Path, float]:
    """A real CT NIfTI holding no air, and its minimum: TotalSegmentator's CT brain atlas from
    ../shared/data/extra, or else the centre of the first slice of the dev CT head (or its
    stand-in) whose centre holds no air."""
    atlas = Path(__file__).resolve().parents[2] / "shared/data/extra/nifti/totalseg_ct_brain_atlas.nii.gz"
    if atlas.is_file():  # four of its 179 slices: restored twice, the whole atlas took half a minute
        img = nib.load(atlas)
        k = img.shape[2] // 2
        crop = img.slicer[:, :, k:k + 4]
        nib.save(crop, tmp_path / "atlas4.nii.gz")
        return tmp_path / "atlas4.nii.gz", float(np.asanyarray(crop.dataobj).min())
    img = nib.load(dev_data / "nifti/invesalius_cranium_ct.nii.gz")
    vol = np.asanyarray(img.dataobj)
    x, y, r = vol.shape[0] // 2, vol.shape[1] // 2, vol.shape[0] // 8
    k = next(k for k in range(vol.shape[2]) if vol[x - r:x + r, y - r:y + r, k].min() > -500)
    crop = img.slicer[x - r:x + r, y - r:y + r, k:k + 1]
    nib.save(crop, tmp_path / "ct_no_air.nii.gz")
    return tmp_path / "ct_no_air.nii.gz", float(np.asanyarray(crop.dataobj).min())


def test_nifti_modality_guess_is_reported_and_can_be_overridden(dev_data, tmp_path, tiny_model, capsys):
    atlas, low = _ct_without_air(dev_data, tmp_path)
    code, out, err = _main(capsys, "restore", atlas, tmp_path / "a.nii.gz", "--model", tiny_model)
    assert code == 0, err
    assert f"as MR (guessed from the values: minimum {low:g} is above -500" in out and "--modality" in out
    code, out, err = _main(capsys, "restore", atlas, tmp_path / "b.nii.gz", "--model", tiny_model,
                           "--modality", "ct")
    assert code == 0 and "as CT in" in out and "guessed" not in out, out + err
    a, b = nib.load(tmp_path / "a.nii.gz").get_fdata(), nib.load(tmp_path / "b.nii.gz").get_fdata()
    assert not np.allclose(a, b)  # the HU window, not MR percentiles, scaled the second one


def _bad_checkpoint(tmp_path, name, mutate) -> Path:
    ckpt = checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)), IntensityPolicy())
    mutate(ckpt)
    path = tmp_path / name
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("name, mutate, needle", [
    ("nostate.pt", lambda c: c.pop("state_dict"), "has no 'state_dict'"),
    ("version.pt", lambda c: c.update(format_version="2b"), "version '2b' is not a whole number"),
    ("negative.pt", lambda c: c.update(format_version=-1), "version -1 is not a whole number"),
    ("nan.pt", lambda c: next(iter(c["state_dict"].values())).fill_(float("nan")), "hold NaN/Inf"),
    ("window.pt", lambda c: c.update(intensity={"ct_window": [1000, -1000]}), "low < high"),
    ("wide.pt", lambda c: c.update(intensity={"ct_window": [-1e30, 1e30]}), "ct_window must lie within ±1e+06 HU"),
    ("int.pt", lambda c: c.update(state_dict={k: v.long() for k, v in c["state_dict"].items()}), "holds torch.int64"),
])
def test_broken_models_get_one_line_naming_the_model(tmp_path, dev_data, name, mutate, needle, capsys):
    model = _bad_checkpoint(tmp_path, name, mutate)
    out = tmp_path / "r.nii.gz"
    code, _, err = _main(capsys, "restore", dev_data / NIFTI, out, "--model", model)
    assert code == 2 and err.count("\n") == 1 and needle in err and name in err, err
    assert not out.exists()


def test_pickled_model_error_is_one_plain_line(tmp_path, dev_data):
    pickled = tmp_path / "pickled.pt"
    torch.save(MaskedVAE(VAEConfig(channels=(4, 8))), pickled)
    with pytest.raises(MedvaeError) as err:
        load_model(pickled)
    msg = str(err.value)
    assert "\x1b" not in msg and "\n" not in msg and "never unpickles" in msg and "PyTorch 2.6" not in msg


def test_checkpoints_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_torch_save({"x": torch.zeros(1)}, tmp_path / "c.pt")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_corrupt_and_evaluate_report_the_guess_and_take_modality(tmp_path, capsys):
    atlas = Path(__file__).resolve().parents[2] / "shared/data/extra/nifti/totalseg_ct_brain_atlas.nii.gz"
    if not atlas.is_file():
        pytest.skip("../shared/data/extra not present")
    img = nib.load(atlas)  # a CT brain atlas, -30..385 HU: no air, so guessed MR
    crop = tmp_path / "atlas.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj[:, :, 85:88], np.float32), img.affine), crop)
    code, out, err = _main(capsys, "corrupt", crop, tmp_path / "n.nii.gz", "--recipe", "gaussian")
    assert code == 0 and "as MR (guessed from the values" in out, out + err
    code, out, err = _main(capsys, "corrupt", crop, tmp_path / "c.nii.gz", "--recipe", "gaussian",
                           "--modality", "CT")
    assert code == 0 and "as CT," in out and "guessed" not in out, out + err
    import json

    assert json.loads((tmp_path / "c.json").read_text())["intensity_window"] == [-1000.0, 1000.0]
    code, out, err = _main(capsys, "evaluate", tmp_path / "c.nii.gz", crop, "--no-mlflow")
    assert code == 0 and "modality MR (guessed" in out, out + err
    code, out, err = _main(capsys, "evaluate", tmp_path / "c.nii.gz", crop, "--no-mlflow", "--modality", "CT")
    assert code == 0 and "modality CT\n" in out and "HU" in out, out + err


def test_a_series_restored_from_one_of_its_files_is_not_written_inside_its_folder(dev_data, tmp_path, tiny_model,
                                                                                 copy_into, capsys):
    series = copy_into(dev_data / "dicom" / "series_ct_head", "series")
    one = sorted(series.glob("*.dcm"))[0]
    code, _, err = _main(capsys, "restore", one, series / "sub", "--model", tiny_model)
    assert code == 2 and err.strip().endswith(f"output lies inside the series folder of the input file {one.name}; a "
                                              "derived series there would be read as part of that folder; "
                                              "choose another place")
    assert not (series / "sub").exists()
    code, _, _ = _main(capsys, "restore", one, tmp_path / "beside", "--model", tiny_model)  # elsewhere: fine
    assert code == 0 and len(list((tmp_path / "beside").glob("*.dcm"))) == 1


def test_sigterm_ends_like_ctrl_c_one_line_no_leftovers(dev_data, tmp_path):
    """Slurm pre-emption: SIGTERM releases the claims and staging as Ctrl-C does; status 143."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    out = tmp_path / "out" / "noisy.nii.gz"
    child = ("import sys, time, medvae.io as io\n"
             "def slow(*a, **k):\n    print('claimed', flush=True); time.sleep(60)\n"
             "io.load_scan = slow\n"
             "from medvae.cli import main\n"
             f"sys.exit(main(['corrupt', {str(dev_data / NIFTI)!r}, {str(out)!r}, '--recipe', 'boxes']))\n")
    p = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "TMPDIR": str(tmpdir)})
    assert p.stdout.readline().strip() == "claimed"  # all three outputs claimed, the work under way
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert err == "medvae corrupt: terminated (SIGTERM)\n"
    assert not out.parent.exists() and list(tmpdir.iterdir()) == []  # no lock, no staging, no folder


def test_streamed_series_and_its_map_appear_together(dev_data, tmp_path, tiny_model, monkeypatch):
    """The map is renamed in first; when the restoration then fails (or Ctrl-C), the map goes too."""
    import medvae.io.derived_series as derived_series
    from medvae.restore import restore_scan

    src = tmp_path / "in"
    src.mkdir()
    for f in sorted((dev_data / SERIES).glob("*.dcm"))[:3]:
        (src / f.name).write_bytes(f.read_bytes())
    real, calls = derived_series.arm_series, []

    def arm(folder):
        calls.append(folder)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(folder)

    monkeypatch.setattr(derived_series, "arm_series", arm)
    with pytest.raises(KeyboardInterrupt):
        restore_scan(src, tmp_path / "out", model=tiny_model, samples=2, uncertainty_path=tmp_path / "unc",
                     device="cpu", ensemble=1)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]
