"""``medvae evaluate`` end to end on real dev NIfTI scans (or their pip stand-ins), with MLflow in tmp_path."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio as sk_psnr

from medvae.cli import main

CT = "nifti/invesalius_cranium_ct.nii.gz"   # dev: 256x256x108 head; stand-in: 256x256x4
MR = "nifti/heudiconv_axasc35.nii.gz"


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


@pytest.fixture(scope="module")
def ct(dev_data):
    img = nib.load(dev_data / CT)
    return img.get_fdata(dtype=np.float32), img.affine


def _four_slices(vol: np.ndarray) -> np.ndarray:
    k0 = min(50, vol.shape[2] - 4)  # dev: slices 50..53 through the brain; stand-in: all 4
    return vol[:, :, k0:k0 + 4]


@pytest.fixture
def small_ct(ct, tmp_path):
    """A 4-slice copy of the CT as reference and a noisy 'restored' copy, both in tmp_path."""
    ref, affine = _four_slices(ct[0]), ct[1]
    rest = ref + np.random.RandomState(0).normal(0, 30, ref.shape)
    return _save(tmp_path / "ref.nii", ref, affine), _save(tmp_path / "rest.nii", rest, affine), ref, rest, affine


def _register(uri: str, tmp_path: Path, name: str, versions: int) -> None:
    """``versions`` versions of a tiny medvae model logged to ``uri`` and registered as ``name``."""
    import mlflow

    from medvae import tracking
    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    ckpt = atomic_torch_save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)),
                                             IntensityPolicy()), tmp_path / f"{name}.pt")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("models")
    run_id = client.create_run(exp.experiment_id if exp else client.create_experiment("models")).info.run_id
    mlflow.set_tracking_uri(uri)
    tracking.log_medvae_model(ckpt, run_id=run_id)
    for _ in range(versions):
        mlflow.register_model(f"runs:/{run_id}/model", name)


def test_command_module_is_cheap_to_import():
    code = ("import sys, medvae.commands.evaluate as m; assert m.HELP and m.add_arguments and m.run; "
            "heavy = [x for x in ('numpy', 'mlflow', 'matplotlib', 'skimage', 'torch', 'monai') if x in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_end_to_end_ct_report_and_mlflow(ct, dev_data, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    ref, affine = ct
    nx, ny, nz = ref.shape  # dev: 256 x 256 x 108
    rng = np.random.RandomState(1)
    restored = _save(tmp_path / "restored.nii", ref + rng.normal(0, 25, ref.shape), affine)
    corrupted = _save(tmp_path / "corrupted.nii", ref + rng.normal(0, 100, ref.shape), affine)
    mask = np.zeros(ref.shape, np.uint8)
    mask[100:140, 150:190, 40 * nz // 108:60 * nz // 108] = 1  # dev: slices 40..59
    mask_path = _save(tmp_path / "mask.nii", mask, affine)
    monkeypatch.chdir(tmp_path)  # MLflow artifacts of sqlite stores go to ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _register(uri, tmp_path, "medvae-ct", 3)
    rep = tmp_path / "rep"
    rc = main(["evaluate", str(restored), str(dev_data / CT), "--mask", str(mask_path), "--corrupted", str(corrupted),
               "--report", str(rep), "--tracking-uri", uri, "--model-uri", "models:/medvae-ct/3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"{nz} slices ({nx}x{ny}x{nz}), modality CT" in out
    assert "window -1000..1000 HU, clipped and scaled to [0, 1], data range 1 (CT default" in out
    assert "7x7 uniform window" in out and "restored   image" in out and "corrupted  mask" in out

    # report
    names = sorted(p.name for p in rep.iterdir() if p.name != ".medvae-output.json")  # the marker: not logged
    assert {"metrics.csv", "summary.json", "index.html"} <= set(names)
    assert len([n for n in names if n.endswith((".png"))]) == 3
    rows = list(csv.DictReader(open(rep / "metrics.csv")))
    assert len(rows) == nz * 2 * 3
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["scaling"]["window"] == [-1000.0, 1000.0] and summary["scaling"]["source"].startswith("CT default")
    # the numbers are scikit-image's on the windowed slices
    k = 70 * nz // 108  # dev: 70
    w = lambda a: (np.clip(a.astype(np.float64), -1000, 1000) + 1000) / 2000  # noqa: E731
    rest_arr = nib.load(restored).get_fdata(dtype=np.float32)
    row = next(r for r in rows if r["slice"] == str(k) and r["source"] == "restored" and r["region"] == "image")
    assert float(row["psnr"]) == pytest.approx(sk_psnr(w(ref[:, :, k]), w(rest_arr[:, :, k]), data_range=1.0), rel=1e-9)
    html = (rep / "index.html").read_text()
    assert "invesalius" not in html and str(tmp_path) not in html and len(html) < 46_000_000

    # MLflow run read back
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("evaluation")
    (run,) = client.search_runs([exp.experiment_id])
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    assert p["window_lo"] == "-1000.0" and p["window_hi"] == "1000.0" and p["scaling"] == "window"
    assert p["scaling_source"].startswith("CT default") and "7x7 uniform window" in p["ssim_definition"]
    assert p["n_slices"] == str(nz) and p["modality"] == "CT" and p["has_mask"] == "True"
    assert t["medvae.model_uri"] == "models:/medvae-ct/3"
    mean = summary["metrics"]["restored"]["image"]["psnr"]["mean"]
    assert m["restored.image.psnr_mean"] == pytest.approx(mean) == m["psnr_image"]
    assert m["psnr_mask"] == pytest.approx(summary["metrics"]["restored"]["mask"]["psnr"]["mean"])
    assert p["headline_metric"] == "psnr_mask" and "headline: restored PSNR in the mask region" in out
    assert summary["mlflow_run_id"] == run.info.run_id and run.info.run_id in html  # for the sign-off
    # the run spans the evaluation, not only the logging: opened before the report was written, closed
    # after (file times, not a duration, which a fast machine undercuts)
    assert run.info.start_time <= (rep / "metrics.csv").stat().st_mtime * 1000 + 1
    assert run.info.end_time >= (rep / "index.html").stat().st_mtime * 1000 - 1
    assert {"restored.mask.ssim_mean", "corrupted.foreground.psnr_mean"} <= set(m)
    arts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "report"))
    assert arts == sorted(f"report/{n}" for n in names)
    # no file names, folders or identifiers in params, tags or run name
    for value in [*p.values(), *[v for k_, v in t.items() if not k_.startswith("mlflow.source")], run.info.run_name]:
        for bad in ("invesalius", ".nii", str(tmp_path), "/work/shared"):
            assert bad not in str(value), (bad, value)


def test_mr_default_scaling_is_the_reference_percentiles(dev_data, tmp_path, capsys):
    img = nib.load(dev_data / MR)
    ref = img.get_fdata(dtype=np.float32)
    rest = _save(tmp_path / "rest.nii", ref * 0.97 + np.random.RandomState(2).normal(0, 20, ref.shape), img.affine)
    rc = main(["evaluate", str(rest), str(dev_data / MR), "--no-mlflow", "--report", str(tmp_path / "rep")])
    out = capsys.readouterr().out
    assert rc == 0
    lo, hi = np.percentile(ref, (0.5, 99.5))
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["modality"] == "MR" and summary["scaling"]["window"] == pytest.approx([lo, hi])
    assert f"window {lo:g}..{hi:g}, clipped and scaled to [0, 1]" in out
    assert "0.5-99.5 percentiles; set --window or --data-range to change" in out
    assert "foreground" in summary["regions"] and not (tmp_path / "mlruns").exists()
    html = (tmp_path / "rep" / "index.html").read_text()  # the page says where the MR window comes from
    assert '"percentiles":true' in html and "Metric window (reference p0.5\\u2013p99.5)" in html
    assert "0.5th and 99.5th percentiles of the reference volume" in html
    rc = main(["evaluate", str(rest), str(dev_data / MR), "--no-mlflow", "--window", "300,600", "--report",
               str(tmp_path / "rep2")])
    assert rc == 0 and '"percentiles":false' in (tmp_path / "rep2" / "index.html").read_text()


def test_data_range_and_window_options(small_ct, capsys):
    ref_p, rest_p, ref, rest, _ = small_ct
    assert main(["evaluate", str(rest_p), str(ref_p), "--data-range", "4000", "--no-mlflow"]) == 0
    out = capsys.readouterr().out
    assert "raw values, data range 4000 HU (--data-range)" in out
    mean = np.mean([sk_psnr(ref[:, :, k].astype(np.float64), rest[:, :, k].astype(np.float32).astype(np.float64),
                            data_range=4000.0) for k in range(4)])
    line = next(ln for ln in out.splitlines() if ln.startswith("restored   image"))
    assert float(line.split()[2]) == pytest.approx(mean, abs=0.006)
    assert main(["evaluate", str(rest_p), str(ref_p), "--window", "brain", "--no-mlflow"]) == 0
    assert "window 0..80 HU" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--window", "-600,1500"], ["--window=-600,1500"], ["--window", "lung"]])
def test_a_negative_window_may_follow_its_option_after_a_space(small_ct, capsys, argv):
    """argparse takes '-600,1500' for an option unless it is joined to --window: medvae.cli joins it."""
    ref_p, rest_p = small_ct[:2]
    assert main(["evaluate", str(rest_p), str(ref_p), *argv, "--no-mlflow"]) == 0
    assert "window -1350..150 HU" in capsys.readouterr().out  # lung: C -600 / W 1500
    with pytest.raises(SystemExit):  # a bad negative value is named as a bad window, not a missing one
        main(["evaluate", str(rest_p), str(ref_p), "--window", "-600,x"])
    assert "bad window '-600,x'" in capsys.readouterr().err


def test_window_and_data_range_are_exclusive_and_checked(small_ct, capsys):
    ref_p, rest_p = small_ct[:2]
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(rest_p), str(ref_p), "--window", "brain", "--data-range", "100"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", str(rest_p), str(ref_p), "--window", "brian"])
    assert e.value.code == 2 and "bad window 'brian'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", str(rest_p), str(ref_p), "--data-range", "-3"])


def test_shape_and_geometry_mismatch_exit_2(small_ct, tmp_path, capsys):
    ref_p, rest_p, ref, rest, affine = small_ct
    short = _save(tmp_path / "short.nii", rest[:, :, :3], affine)
    assert main(["evaluate", str(short), str(ref_p), "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"medvae evaluate: error: {short}: ")
    assert "(256, 256, 3)" in err and "(256, 256, 4)" in err

    moved = affine.copy()
    moved[0, 3] += 5.0
    shifted = _save(tmp_path / "shifted.nii", rest, moved)
    assert main(["evaluate", str(shifted), str(ref_p), "--no-mlflow"]) == 2
    assert "not in the reference's geometry" in capsys.readouterr().err

    bad_mask = _save(tmp_path / "mask.nii", np.ones((256, 256, 2)), affine)
    assert main(["evaluate", str(rest_p), str(ref_p), "--mask", str(bad_mask), "--no-mlflow"]) == 2
    assert f"{bad_mask}: mask has shape" in capsys.readouterr().err

    assert main(["evaluate", str(tmp_path / "missing.nii"), str(ref_p), "--no-mlflow"]) == 2


def test_baseline_is_scored_and_identical_slices_are_counted(ct, tmp_path, capsys):
    """The README example with a brain window: air-only differences vanish in 0..80 HU; the printed
    and written means stay finite and say how many slices were identical."""
    ref, affine = _four_slices(ct[0]), ct[1]
    rng = np.random.RandomState(4)
    rest = ref.copy()
    rest[:, :, :2] += rng.normal(0, 10, (256, 256, 2)).astype(np.float32)  # slices 2, 3 untouched
    base = ref + rng.normal(0, 30, ref.shape).astype(np.float32)
    paths = {n: _save(tmp_path / f"{n}.nii", a, affine) for n, a in (("ref", ref), ("rest", rest), ("base", base))}
    rc = main(["evaluate", str(paths["rest"]), str(paths["ref"]), "--window", "brain", "--baseline", str(paths["base"]),
               "--baseline-name", "NL-means", "--report", str(tmp_path / "rep"), "--no-mlflow"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "∞" not in out and not re.search(r"\binf\b", out)
    line = next(ln for ln in out.splitlines() if ln.startswith("restored   image"))
    assert line.split()[-4:] == ["2", "2", "/", "0"]  # 2 slices scored; 2 left out as identical, 0 as empty
    assert "2 slice(s) where a source is identical to the reference (infinite PSNR): left out of every" in out
    base_line = next(ln for ln in out.splitlines() if ln.startswith("baseline   image"))
    assert base_line.split()[-4:] == ["2", "2", "/", "0"]  # the baseline is scored on the same 2 slices
    assert any(ln.startswith("baseline   image") for ln in out.splitlines())
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    st = summary["metrics"]["restored"]["image"]["psnr"]
    assert st["n_identical"] == 2 and isinstance(st["mean"], float) and "mlflow_run_id" not in summary
    assert summary["metrics"]["baseline"]["image"]["psnr"]["n_identical"] == 0
    html = (tmp_path / "rep" / "index.html").read_text()
    assert '"caption":"Baseline (NL-means)"' in html and '"run_id":null' in html


# ------------------------------------------------------------------ the report folder is an output
def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes: to prove nothing changed."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _ct_series(dev_data: Path, dst: Path, n: int = 3, *, changed: bool = False) -> Path:
    """The first ``n`` slices of the dev head CT series, copied into ``dst`` (``changed``: one pixel of
    each one step up, as a restoration that is not the reference itself)."""
    import shutil

    import pydicom

    dst.mkdir()
    for f in sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[:n]:
        shutil.copy(f, dst / f.name)
        if changed:
            ds = pydicom.dcmread(dst / f.name)
            arr = ds.pixel_array.copy()
            arr[0, 0] += 1
            ds.PixelData = arr.tobytes()
            ds.save_as(dst / f.name)
    return dst


def _one_line_error(capsys) -> str:
    """The one error line on stderr (the progress line of a scoring that ran is not an error)."""
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if not ln.startswith("evaluate: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_report_into_an_input_is_refused_and_nothing_written(dev_data, tmp_path, capsys):
    ref = _ct_series(dev_data, tmp_path / "ref3")
    rest = _ct_series(dev_data, tmp_path / "rest3", changed=True)
    before = {p: _tree(p) for p in (ref, rest)}
    cases = [(ref, "the report folder is the reference input"),
             (ref / "review", "the report folder lies inside the reference input"),
             (rest, "the report folder is the restored input"),
             (tmp_path, "the report folder holds the restored input")]
    for report, words in cases:
        assert main(["evaluate", str(rest), str(ref), "--no-mlflow", "--report", str(report), "--overwrite"]) == 2
        err = _one_line_error(capsys)
        assert err.startswith(f"medvae evaluate: error: {report}: ") and words in err, err
    assert {p: _tree(p) for p in (ref, rest)} == before  # the series folders hold only their slices
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref3", "rest3"]  # no lock, no staging left


def test_report_never_replaces_a_user_folder_or_file(small_ct, tmp_path, capsys):
    ref_p, rest_p = small_ct[:2]
    user = tmp_path / "notes"
    user.mkdir()
    (user / "summary.json").write_text('{"mine": true}\n')
    (tmp_path / "report.txt").write_text("not a folder\n")
    for extra in ([], ["--overwrite"]):
        assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(user), *extra]) == 2
        err = _one_line_error(capsys)
        assert err.startswith(f"medvae evaluate: error: {user}: ")
        assert "refusing to replace a folder medvae did not write" in err  # without --overwrite too: no remedy
    assert _tree(user) == {"summary.json": b'{"mine": true}\n'}
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(tmp_path / "report.txt")]) == 2
    assert "is a file; give a folder path" in _one_line_error(capsys)
    assert (tmp_path / "report.txt").read_text() == "not a folder\n"


def test_report_is_replaced_only_with_overwrite(small_ct, tmp_path, capsys):
    ref_p, rest_p = small_ct[:2]
    rep = tmp_path / "rep"
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep)]) == 0
    first = _tree(rep)
    assert {"index.html", "metrics.csv", "summary.json", ".medvae-output.json"} <= set(first)
    capsys.readouterr()
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep), "--window", "brain"]) == 2
    assert "already exists; pass --overwrite" in _one_line_error(capsys)
    assert _tree(rep) == first
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep), "--window", "brain",
                 "--overwrite"]) == 0
    summary = json.loads((rep / "summary.json").read_text())
    assert summary["scaling"]["window"] == [0.0, 80.0]  # the new report, complete
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii", "rep", "rest.nii"]


def test_report_failing_part_way_leaves_nothing(small_ct, tmp_path, capsys, monkeypatch):
    import errno
    import tempfile

    import medvae.report

    ref_p, rest_p = small_ct[:2]

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(medvae.report, "_render_html", disk_full)  # after the CSV, JSON and PNGs
    rep = tmp_path / "new" / "rep"
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep)]) == 2
    assert "No space left on device" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.nii", "rest.nii"]  # not even new/
    assert not list(Path(tempfile.gettempdir()).glob("medvae-staging-*"))
    # an earlier report survives a failed --overwrite untouched
    monkeypatch.undo()
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep)]) == 0
    first = _tree(rep)
    monkeypatch.setattr(medvae.report, "_render_html", disk_full)
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep), "--overwrite"]) == 2
    assert _tree(rep) == first and sorted(p.name for p in rep.parent.iterdir()) == ["rep"]


# ------------------------------------------------------------------ --series for every DICOM input
def test_series_applies_to_the_restored_folder_too(dev_data, tmp_path, capsys):
    import shutil

    import pydicom

    ref = _ct_series(dev_data, tmp_path / "ref3")
    rest = _ct_series(dev_data, tmp_path / "rest3", changed=True)
    other_ds = pydicom.dcmread(dev_data / "dicom/pydicom/CT_small.dcm")  # a second series, described by name
    other_ds.SeriesDescription = "CT head DOE^JANE"
    other_ds.save_as(rest / "other_series.dcm")
    uid = str(pydicom.dcmread(next(ref.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    other = str(pydicom.dcmread(rest / "other_series.dcm", stop_before_pixels=True).SeriesInstanceUID)
    same = shutil.copytree(ref, tmp_path / "ref3_copy")
    before = _tree(tmp_path)

    assert main(["evaluate", str(rest), str(ref), "--no-mlflow"]) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"medvae evaluate: error: {rest}: the restored input holds 2 series; choose one with "
                          "--series UID (it applies to every DICOM input that holds it)"), err
    assert main(["evaluate", str(rest), str(ref), "--no-mlflow", "--series", "1.2.3.4"]) == 2
    err = _one_line_error(capsys)
    assert "the restored input holds 2 series and --series 1.2.3.4 is not one of them" in err and uid in err
    assert "DOE" not in err and "(medvae info lists their descriptions)" in err  # stderr is a batch job's log
    assert main(["evaluate", str(same), str(ref), "--no-mlflow", "--series", other]) == 2
    assert f"--series {other}: no input holds this series" in _one_line_error(capsys)

    assert main(["evaluate", str(rest), str(ref), "--no-mlflow", "--series", uid]) == 0
    assert "medvae evaluate: 3 slices (" in capsys.readouterr().out
    assert _tree(tmp_path) == before


# ------------------------------------------------------------------ no local model path in MLflow or the page
def test_local_model_path_is_logged_as_its_digest(dev_data, small_ct, tmp_path, monkeypatch, capsys):
    import hashlib
    import shutil

    from mlflow import MlflowClient

    ref_p, rest_p = small_ct[:2]
    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    model = tmp_path / "DOE^JANE_PID123456" / "DOE_JANE_PID123456_0.pt"  # a path that names the patient
    model.parent.mkdir()
    atomic_torch_save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)), IntensityPolicy()),
                      model)
    digest = f"sha256:{hashlib.sha256(model.read_bytes()).hexdigest()[:12]}"
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["evaluate", str(rest_p), str(ref_p), "--report", str(tmp_path / "rep"), "--tracking-uri", uri,
               "--model-uri", str(model)])
    assert rc == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.data.tags["medvae.model_uri"] == digest
    logged = [*run.data.params.values(), *run.data.tags.values(), run.info.run_name]
    for bad in ("PID123456", "DOE^JANE", "DOE_JANE", str(tmp_path)):  # none of them can occur in base64/PNG by chance
        assert not any(bad in str(v) for v in logged), bad
        for f in (tmp_path / "rep").iterdir():
            assert bad.encode() not in f.read_bytes(), (bad, f.name)
    assert f'"model_uri":"{digest}"' in (tmp_path / "rep" / "index.html").read_text()


@pytest.mark.parametrize("config, needle", [
    ({"spatial_dims": 3}, "this model restores 3-D patches"),
    ({"in_channels": 2, "out_channels": 2}, "the model maps 2-channel images to 2-channel ones"),
])
def test_a_model_restore_refuses_is_not_recorded_as_the_maker(small_ct, tmp_path, capsys, config, needle):
    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    ref_p, rest_p = small_ct[:2]
    model = atomic_torch_save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2, **config)),
                                              IntensityPolicy()), tmp_path / "other.pt")
    rc = main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(tmp_path / "rep"),
               "--model-uri", str(model)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--model-uri {model}: {needle}" in err, err
    assert not (tmp_path / "rep").exists()


def test_a_moving_model_name_is_recorded_as_the_version_it_names(small_ct, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    ref_p, rest_p = small_ct[:2]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    _register(uri, tmp_path, "medvae-ct", 2)  # versions 1 and 2; "latest" is 2, the alias names 1
    client.set_registered_model_alias("medvae-ct", "champion", "1")
    with pytest.warns(FutureWarning):  # stages are deprecated in MLflow 3, and still resolve to a version
        client.transition_model_version_stage("medvae-ct", "1", "Production")
    for given, pinned in (("models:/medvae-ct/latest", "models:/medvae-ct/2"),
                          ("models:/medvae-ct@champion", "models:/medvae-ct/1"),
                          ("models:/medvae-ct/Production", "models:/medvae-ct/1"),
                          ("models:/medvae-ct/1", "models:/medvae-ct/1")):
        assert main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--model-uri", given]) == 0
        err = capsys.readouterr().err
        assert (f"--model-uri {given} names {pinned} now" in err) == (given != pinned)
        run = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id],
                                 order_by=["attributes.start_time DESC"], max_results=1)[0]
        assert run.data.tags["medvae.model_uri"] == pinned
    # a model that does not exist was recorded as if it had made the restoration
    for missing in ("models:/medvae-ct/9", f"runs:/{'f' * 32}/model"):
        assert main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--model-uri", missing]) == 2
        err = capsys.readouterr().err
        assert err.startswith("medvae evaluate: error: ") and "--model-uri" in err and err.count("\n") == 1, err
    # a version whose run was deleted restored (and was recorded) without a word, as a deleted run's did not
    client.delete_run(client.get_model_version("medvae-ct", "2").run_id)
    assert main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--model-uri", "models:/medvae-ct/2"]) == 2
    assert "model version medvae-ct/2 was logged by MLflow run" in capsys.readouterr().err
    client.restore_run(client.get_model_version("medvae-ct", "2").run_id)
    # --no-mlflow: the page recorded the alias as given
    assert main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--no-mlflow", "--report",
                 str(tmp_path / "rep"), "--model-uri", "models:/medvae-ct@champion"]) == 0
    assert '"model_uri":"models:/medvae-ct/1"' in (tmp_path / "rep" / "index.html").read_text()


def test_a_full_disk_names_the_report_folder(small_ct, tmp_path, capsys, monkeypatch):
    import medvae.report

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(medvae.report, "_render_html", full_disk)
    ref_p, rest_p = small_ct[:2]
    rep = tmp_path / "rep"
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medvae evaluate: error: {rep}: cannot write the output, No space left on device; nothing was written")
    assert not rep.exists()


def test_a_report_whose_mlflow_logging_fails_is_not_kept(small_ct, tmp_path, capsys, monkeypatch):
    # the report was written inside the run, then a full store failed the logging: a complete page stayed
    # (named "nothing was written"), its run FAILED without metrics.csv, and a rerun was refused
    import medvae.tracking

    ref_p, rest_p = small_ct[:2]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rep = tmp_path / "rep"

    def store_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(medvae.tracking, "log_metrics", store_full)
    assert main(["evaluate", str(rest_p), str(ref_p), "--report", str(rep), "--tracking-uri", uri]) == 2
    out = capsys.readouterr()
    assert out.err.strip().splitlines()[-1] == (
        f"medvae evaluate: error: {uri}: the MLflow store could not record the run (No space left on device); "
        "the report was not kept")
    assert not rep.exists() and "report:" not in out.out  # it said "report: rep/index.html", then removed it

    def artifacts_read_only(*a, **k):  # it named the database, not the folder it could not write
        raise PermissionError(13, "Permission denied", "/srv/mlruns/1/artifacts")

    monkeypatch.setattr(medvae.tracking, "log_metrics", artifacts_read_only)
    assert main(["evaluate", str(rest_p), str(ref_p), "--report", str(rep), "--tracking-uri", uri]) == 2
    assert "could not record the run (cannot write /srv/mlruns/1/artifacts: Permission denied)" in (
        capsys.readouterr().err)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    real_log_metrics = medvae.tracking.log_metrics
    assert main(["evaluate", str(rest_p), str(ref_p), "--report", str(rep), "--tracking-uri", uri]) == 0
    first = _tree(rep)
    # an interrupt while logging an --overwrite puts the earlier report back

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    # the report's own disk full: named as the report, not the store (which had room)
    import medvae.report

    monkeypatch.setattr(medvae.tracking, "log_metrics", real_log_metrics)
    real_render = medvae.report._render_html
    monkeypatch.setattr(medvae.report, "_render_html", store_full)
    assert main(["evaluate", str(rest_p), str(ref_p), "--report", str(tmp_path / "rep2"), "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medvae evaluate: error: {tmp_path / 'rep2'}: cannot write the output, No space left on device; nothing was written")
    monkeypatch.setattr(medvae.report, "_render_html", real_render)
    monkeypatch.setattr(medvae.tracking, "log_metrics", interrupted)
    assert main(["evaluate", str(rest_p), str(ref_p), "--report", str(rep), "--tracking-uri", uri,
                 "--overwrite", "--window", "brain"]) == 130
    assert _tree(rep) == first


def test_report_when_a_region_has_no_slice_to_summarize(small_ct, tmp_path, capsys):
    ref_p, rest_p, ref, rest, affine = small_ct
    # restored == reference (a copy): every slice identical, nothing to score (once a summary of dashes)
    same = tmp_path / "copy.nii"
    same.write_bytes(ref_p.read_bytes())
    rc = main(["evaluate", str(same), str(ref_p), "--data-range", "4000", "--no-mlflow",
               "--report", str(tmp_path / "same")])
    assert rc == 2 and "identical to the reference in every voxel" in capsys.readouterr().err
    assert not (tmp_path / "same").exists()
    # an all-zero mask: the headline region is empty; said on stderr, and the report is still written
    empty = _save(tmp_path / "empty_mask.nii", np.zeros(ref.shape), affine)
    capsys.readouterr()
    rc = main(["evaluate", str(rest_p), str(ref_p), "--mask", str(empty), "--data-range", "4000", "--no-mlflow",
               "--report", str(tmp_path / "empty")])
    assert rc == 0 and (tmp_path / "empty/index.html").is_file()
    assert "the mask region has no slice to summarize" in capsys.readouterr().err
    # no slice is named worst, median or best by a region that scored none (they were slices 1, 2, 4)
    assert not list((tmp_path / "empty").glob("slice_*.png"))
    assert '"picks":{}' in (tmp_path / "empty/index.html").read_text()


@pytest.fixture(scope="module")
def uncalibrated_model(tmp_path_factory) -> Path:
    """A tiny untrained checkpoint: its metadata holds no calibration."""
    import torch

    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    torch.manual_seed(0)
    model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
    return atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path_factory.mktemp("m") / "tiny.pt")


def test_a_map_with_negative_values_is_not_taken_for_an_uncertainty_map(small_ct, tmp_path, capsys):
    # the reference given as --uncertainty (CT: down to -1000 HU) was accepted: "0 % within ± 2 std" on the page
    ref_p, rest_p, *_ = small_ct
    copy = tmp_path / "other_scan.nii"  # another CT scan (here the restored one) given as the map
    copy.write_bytes(rest_p.read_bytes())
    rc = main(["evaluate", str(rest_p), str(ref_p), "--uncertainty", str(copy), "--no-mlflow",
               "--report", str(tmp_path / "rep")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "rep").exists()
    assert f"{copy}: not an uncertainty map: it holds negative values (down to -" in err


def test_uncertainty_calibration_is_unknown_unless_the_model_is_named(small_ct, uncalibrated_model, tmp_path,
                                                                       capsys):
    """Without --model-uri the page cannot know which model made the map (it may be the calibrated
    default): calibration unknown, never "not calibrated"; a named model's metadata decides."""
    ref_p, rest_p, ref, rest, affine = small_ct
    unc = _save(tmp_path / "unc.nii", np.abs(rest - ref), affine)

    def page_says(name, *model):
        rc = main(["evaluate", str(rest_p), str(ref_p), "--uncertainty", str(unc), "--no-mlflow",
                   "--report", str(tmp_path / name), *model])
        assert rc == 0, capsys.readouterr().err
        html = (tmp_path / name / "index.html").read_text()
        data = re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1)
        return json.loads(data)["uncertainty"]["calibration"]

    unnamed = page_says("unnamed")
    assert unnamed.startswith("model calibration unknown: no --model-uri given") and "not calibrated" not in unnamed
    default = page_says("default", "--model-uri", "default")  # the shipped model is calibrated
    assert re.match(r"model calibration \(noise\): \d+ % of pixels within ± 2 std on held-out scans", default)
    assert page_says("tiny", "--model-uri", str(uncalibrated_model)).startswith("model not calibrated")


@pytest.mark.parametrize("argv, needle", [
    (["evaluate", "a", "b", "--window", "40,-80"], "the width must be a positive number"),
    (["evaluate", "a", "b", "--window", "40,80", "--data-range", "1"], "not allowed with argument"),
    (["evaluate", "a", "b", "--data-range", "1e-300"], "too small to score"),
    (["prepare", "m.csv", "store", "--seed", "-1"], "must be a whole number from 0 to 2**32 - 1"),
    (["restore", "a", "b", "--ensemble", "3"], "invalid choice: 3"),
    (["review", "import"], "the following arguments are required: VERDICTS.json"),
])
def test_usage_errors_are_one_line_as_other_bad_input(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:  # argparse printed its whole usage block first
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and needle in err and "--help)" in err, err


def test_a_signal_after_the_report_is_written_keeps_it_and_exits_0(small_ct, tmp_path, monkeypatch, capsys):
    # --no-mlflow: SIGTERM just after the report's commit exited 143 and the rerun was refused the report
    import builtins
    import signal

    ref_p, rest_p = small_ct[:2]
    rep = tmp_path / "rep"
    real_print, said = builtins.print, []

    def print_then_signal(*a, **k):  # the line that names the written report: the commit is behind it
        real_print(*a, **k)
        if a and str(a[0]).startswith("report:"):
            said.append(a[0])
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(builtins, "print", print_then_signal)
    assert main(["evaluate", str(rest_p), str(ref_p), "--no-mlflow", "--report", str(rep)]) == 0
    monkeypatch.undo()
    assert said and "SIGTERM came after the outputs were complete" in capsys.readouterr().err
    assert (rep / "index.html").is_file() and (rep / "summary.json").is_file()


@pytest.mark.parametrize("when", ["creating", "opening", "ending"])
def test_a_signal_as_the_run_opens_or_ends_never_leaves_it_running(small_ct, tmp_path, monkeypatch, capsys, when):
    """SIGTERM between creating the MLflow run and opening it left the run RUNNING for good (with a
    report's params, metrics and artifacts when it came later): the run ends KILLED, or stays FINISHED."""
    import signal

    import mlflow
    from mlflow import MlflowClient

    ref_p, rest_p = small_ct[:2]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    if when == "creating":  # the store has made the run; its id is on its way back
        real = MlflowClient.create_run

        def signal_after(*a, **k):
            created = real(*a, **k)
            signal.raise_signal(signal.SIGTERM)
            return created

        monkeypatch.setattr(MlflowClient, "create_run", signal_after)
    else:
        real = getattr(mlflow, "start_run" if when == "opening" else "end_run")

        def signal_first(*a, **k):
            signal.raise_signal(signal.SIGTERM)
            return real(*a, **k)

        monkeypatch.setattr(mlflow, real.__name__, signal_first)
    rc = main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--report", str(tmp_path / "rep")])
    monkeypatch.undo()
    err = capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    if when != "ending":  # interrupted before any work was logged: killed, and no report kept
        assert rc == 128 + signal.SIGTERM and "terminated (SIGTERM)" in err, err
        assert run.info.status == "KILLED" and run.info.end_time and not (tmp_path / "rep").exists()
    else:  # the run was ended (held back while it was), the report committed after it: both kept
        assert rc == 0 and "SIGTERM came after the outputs were complete; they are kept" in err, err
        assert run.info.status == "FINISHED" and (tmp_path / "rep" / "index.html").is_file()


def test_an_all_nan_mask_is_one_line_naming_the_mask(dev_data, tmp_path, capsys):
    """numpy's "All-NaN slice encountered" warning came first (three lines), and the mask was "the scan"."""
    import nibabel as nib
    import numpy as np

    from medvae.cli import main

    ref = dev_data / "nifti" / "heudiconv_axasc35.nii.gz"
    img = nib.load(ref)
    nib.save(nib.Nifti1Image(np.full(img.shape, np.nan, np.float32), img.affine), tmp_path / "nan.nii.gz")
    restored = tmp_path / "restored.nii.gz"
    restored.write_bytes(ref.read_bytes())
    assert main(["evaluate", str(restored), str(ref), "--mask", str(tmp_path / "nan.nii.gz"), "--no-mlflow",
                 "--report", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NaN or infinite in the mask" in err and "nan.nii.gz" in err, err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("values, needle", [
    ((-1.0, 1.0), "the mask holds negative values (down to -1): a mask is 0 for known voxels and 1"),
    ((0.0, 0.2, 7.5), "the mask holds several values above 0 (0.2 and 7.5), not one value for damaged voxels"),
])
def test_a_mask_that_is_no_mask_is_refused_naming_it(small_ct, tmp_path, capsys, values, needle):
    """A -1/1 mask, an image or an uncertainty map given as --mask made every voxel "damaged", silently."""
    ref, rest, ref_a, _, affine = small_ct
    m = np.resize(np.asarray(values, np.float32), ref_a.size).reshape(ref_a.shape)
    _save(tmp_path / "odd_mask.nii", m, affine)
    assert main(["evaluate", str(rest), str(ref), "--mask", str(tmp_path / "odd_mask.nii"), "--no-mlflow",
                 "--report", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"odd_mask.nii: {needle}" in err, err
    assert not (tmp_path / "rep").exists()


@pytest.mark.parametrize("option", [None, "--corrupted", "--baseline"])
def test_the_reference_given_as_another_input_is_refused(small_ct, tmp_path, capsys, option):
    """Every slice was identical and left out: a summary of dashes, and a page that could be signed off."""
    ref, rest, ref_a, _, affine = small_ct
    link = tmp_path / "also_ref.nii"
    link.symlink_to(ref)
    argv = ["evaluate", str(link), str(ref)] if option is None else ["evaluate", str(rest), str(ref), option, str(link)]
    assert main([*argv, "--no-mlflow", "--report", str(tmp_path / "rep")]) == 2
    name = "restored" if option is None else option[2:]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"also_ref.nii: the {name} input is identical to the reference in every voxel" in err, err
    assert not (tmp_path / "rep").exists()
    if option is None:  # a mask equal to a binary reference is a mask like any other: scored
        disk = (np.hypot(*np.mgrid[:ref_a.shape[0], :ref_a.shape[1]] - 20.0) < 12).astype(np.float32)
        binary = _save(tmp_path / "bin.nii", np.repeat(disk[..., None], ref_a.shape[2], 2), affine)
        noisy = _save(tmp_path / "bin_rest.nii", np.asarray(nib.load(binary).dataobj) + 0.1, affine)
        assert main(["evaluate", str(noisy), str(binary), "--mask", str(binary), "--data-range", "1",
                     "--no-mlflow"]) == 0


def test_the_baseline_name_is_not_an_mlflow_param(small_ct, tmp_path, monkeypatch, capsys):
    from mlflow import MlflowClient

    ref_p, rest_p = small_ct[:2]
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # free text, which can name a patient: it was logged as the param 'baseline', as typed
    assert main(["evaluate", str(rest_p), str(ref_p), "--tracking-uri", uri, "--baseline", str(rest_p),
                 "--baseline-name", "DOE^JANE PID123456"]) == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("evaluation").experiment_id])
    assert run.data.params["has_baseline"] == "True"
    logged = [*run.data.params.items(), *run.data.tags.items(), run.info.run_name]
    assert not any("PID123456" in str(v) for v in logged)


def test_the_reference_series_given_as_its_own_file_is_refused(dev_data, tmp_path, capsys):
    """A file and the folder holding it passed the same-path check: every slice left out, a summary of dashes."""
    import shutil

    folder = tmp_path / "ct693"
    folder.mkdir()
    shutil.copy(dev_data / "dicom/pydicom-data/693_UNCR.dcm", folder / "693_UNCR.dcm")
    copy = tmp_path / "copy.dcm"
    shutil.copy(folder / "693_UNCR.dcm", copy)  # a copy keeps its SOPInstanceUID: the same image
    for restored in (folder / "693_UNCR.dcm", copy):
        assert main(["evaluate", str(restored), str(folder), "--no-mlflow", "--report", str(tmp_path / "rep")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{restored}: the restored input is identical to the reference in every " \
                                         "voxel: nothing to score (the reference given twice" in err
    assert not (tmp_path / "rep").exists()
    import pydicom  # another tool's restoration that kept the UIDs but changed the pixels is scored

    ds = pydicom.dcmread(copy)
    arr = ds.pixel_array.copy()
    arr[arr > 100] -= 1
    ds.PixelData = arr.tobytes()
    ds.save_as(copy)
    assert main(["evaluate", str(copy), str(folder), "--no-mlflow"]) == 0


def test_dicom_series_with_a_missing_slice_in_different_places_are_not_paired(dev_data, tmp_path, capsys):
    """Two series of as many slices, with the same first and last slice, passed the affine check (it steps by
    the mean gap): slices of different anatomy were scored as pairs, 15 dB below the true ones."""
    import pydicom

    files = sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[50:56]
    ref, rest, same = tmp_path / "ref", tmp_path / "rest", tmp_path / "same"
    for folder in (ref, rest, same):
        folder.mkdir()
    positions = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        if i != 3:
            ds.save_as(ref / f.name)
        arr = ds.pixel_array.copy()
        arr[arr > 100] -= 1  # a "restoration" that is not the reference itself
        ds.PixelData = arr.tobytes()
        if i != 4:
            ds.save_as(rest / f.name)
        if i != 3:
            ds.save_as(same / f.name)
            positions.append(float(ds.ImagePositionPatient[2]))
    assert main(["evaluate", str(rest), str(ref), "--no-mlflow", "--report", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith(
        f"{rest}: restored is not in the reference's geometry ({ref}): its slice 1 lies at 79.500 mm along the "
        "slice normal, the reference's at 81.000 mm (a missing slice or uneven gaps in one of them)\n"), err
    assert not (tmp_path / "rep").exists()
    # the same gap in both: scored, and the page gives each slice the position it is stored at
    assert main(["evaluate", str(same), str(ref), "--no-mlflow", "--report", str(tmp_path / "rep")]) == 0
    page = (tmp_path / "rep" / "index.html").read_text()
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S).group(1))
    shown = data["geometry"]["positions_mm"]
    # in the series' order; the affine's would step by the mean gap, 1.875 mm
    assert sorted(shown) == pytest.approx(sorted(positions), abs=1e-3), (shown, positions)
