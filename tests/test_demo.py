"""The README's main job, end to end on the pip-package sample scans (no ../shared needed)."""
import sys
from pathlib import Path

import mlflow
import pytest

from medvae.cli import main


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """MLflow puts run artifacts under ./mlruns: run in tmp_path so the repository stays clean."""
    monkeypatch.chdir(tmp_path)


def test_demo_runs_end_to_end_and_logs_every_case(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    for case in ("ct_lowdose", "ct_boxes", "mr_rician", "mr_strokes"):
        assert case in out
        page = tmp_path / "demo" / case / "report" / "index.html"
        assert page.is_file() and page.stat().st_size > 10_000
        assert (tmp_path / "demo" / case / "report" / "metrics.csv").is_file()
    assert "NL-means" in out and "biharmonic" in out and "mlflow ui --backend-store-uri" in out
    # the table's medvae column improves on the corrupted input for every case
    rows = [line for line in out.splitlines() if line.startswith(("ct_", "mr_")) and "/" in line]
    assert len(rows) == 4
    for row in rows:
        cells = row.split()
        numbers = [float(c) for c in cells if c.replace(".", "", 1).isdigit()]
        input_psnr, medvae_psnr = numbers[0], numbers[-2]
        assert medvae_psnr > input_psnr, row
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name("demo").experiment_id])
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    # metric names say their region: mask cases are scored inside the mask, noise cases over the image
    by_case = {r.data.params["case"]: r for r in runs}
    for case, region in (("ct_lowdose", "image"), ("ct_boxes", "mask"), ("mr_rician", "image"), ("mr_strokes", "mask")):
        r = by_case[case]
        assert f"medvae_psnr_{region}" in r.data.metrics and r.data.params["headline_metric"] == f"psnr_{region}"
        assert r.data.metrics[f"medvae_psnr_{region}"] == r.data.metrics[f"psnr_{region}"]
        # the run spans the case, not only its logging: it starts before the corruption is written
        # and ends after the report (file times, not a duration: a faster machine makes cases shorter)
        folder = tmp_path / "demo" / case
        assert r.info.start_time <= (folder / "corrupted.json").stat().st_mtime * 1000 + 1
        assert r.info.end_time >= (folder / "report" / "metrics.csv").stat().st_mtime * 1000 - 1
        page = (tmp_path / "demo" / case / "report" / "index.html").read_text()
        assert r.info.run_id in page and '"caption":"Baseline (' in page  # sign-off target, baseline panel
    # scripts/check_demo.py on the real demo scans: the figures docs/benchmarks.md quotes
    import importlib.util
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "check_demo.py"
    spec = importlib.util.spec_from_file_location("check_demo", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert check.main(["--demo", str(tmp_path / "demo")]) == 0
    text = capsys.readouterr().out
    air = [float(v) for v in re.findall(r"(\d+\.\d) %", text)]
    rms = [float(v) for v in re.findall(r"(\d+\.\d) HU", text)]
    assert len(air) == 2 and all(0.0 <= v <= 30.0 for v in air)     # medvae, biharmonic
    assert len(rms) == 2 and rms[1] < 0.5 * rms[0]                  # medvae well below the low-dose input


@pytest.mark.parametrize("argv, words", [
    (["--seed", "-1"], "argument --seed: must be >= 0, got -1"),
    (["--seed", "1.5"], "argument --seed: not an integer: '1.5'"),
])
def test_demo_refuses_a_bad_seed_before_writing(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--out", str(tmp_path / "demo"), "--no-mlflow", *argv])
    assert e.value.code == 2 and words in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_refuses_a_missing_model_before_writing(tmp_path, capsys):
    model = tmp_path / "ck" / "nope.pt"
    assert main(["demo", "--out", str(tmp_path / "demo"), "--model", str(model), "--no-mlflow"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"medvae demo: error: {model}: model file not found"
    assert captured.out == ""  # the banner came first: two lines for one error
    assert list(tmp_path.iterdir()) == []  # no samples/, no case folder


def test_run_demo_checks_the_seed_before_writing(tmp_path):
    from medvae.demo import run_demo
    from medvae.errors import MedvaeError

    with pytest.raises(MedvaeError, match="the seed must be an integer >= 0, got -3"):
        run_demo(tmp_path / "demo", seed=-3, log_mlflow=False)
    assert list(tmp_path.iterdir()) == []


def test_the_printed_mlflow_command_runs_without_an_activated_venv(monkeypatch):
    from medvae.commands.demo import _mlflow_command

    monkeypatch.setenv("PATH", "/nonexistent")  # `make demo` does not activate .venv
    cmd = _mlflow_command()
    assert Path(cmd).is_file() and Path(cmd).parent == Path(sys.executable).parent


def test_a_demo_whose_cases_were_not_logged_exits_3_as_evaluate_does(tmp_path, capsys, monkeypatch):
    # an unreachable server: every case done, nothing logged and nothing kept, yet exit 0 (the audit)
    import medvae.demo
    from medvae.demo import CaseResult

    def fake_run_demo(out, *, on_case=None, on_start=None, **kw):
        r = CaseResult("ct_boxes", "CT", "boxes", "mask", "biharmonic", "mask",
                       {k: (20.0, 0.9) for k in ("input", "baseline", "medvae")}, tmp_path / "report", None, 1.0,
                       "tracking skipped: http://127.0.0.1:9 is unavailable (connection refused)")
        on_case(r)
        return [r]

    monkeypatch.setattr(medvae.demo, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path / "d"), "--tracking-uri", "http://127.0.0.1:9"]) == 3
    captured = capsys.readouterr()
    assert "1 of 1 cases were not logged to MLflow" in captured.err and "open the UI" not in captured.out


def test_demo_refuses_a_folder_it_did_not_write_before_writing(dev_data, tmp_path, capsys):
    """`--out` naming a DICOM series wrote five case folders into it (the series then held eleven)."""
    import hashlib
    import shutil

    ser = tmp_path / "ser"
    ser.mkdir()
    shutil.copyfile(dev_data / "dicom" / "series_ct_head" / "slice_0001.dcm", ser / "slice_0001.dcm")
    digest = hashlib.sha256((ser / "slice_0001.dcm").read_bytes()).hexdigest()
    assert main(["demo", "--out", str(ser), "--no-mlflow"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"medvae demo: error: {ser}: holds files the demo did not write (slice_0001.dcm); " \
                          "give a new or empty folder"
    assert [p.name for p in ser.iterdir()] == ["slice_0001.dcm"]
    assert hashlib.sha256((ser / "slice_0001.dcm").read_bytes()).hexdigest() == digest
