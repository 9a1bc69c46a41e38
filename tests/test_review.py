"""Clinical sign-off: the review page exports verdicts (headless Chromium), `medvae review import`
logs them to the evaluation's MLflow run (tmp sqlite store, cwd = tmp_path)."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvae.cli import main

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


@pytest.fixture
def evaluated(dev_ct_head, tmp_path, monkeypatch, capsys):
    """`medvae evaluate` of a 6-slice head CT with a mask and a baseline, logged to a tmp sqlite store."""
    img = nib.load(dev_ct_head)
    ref = img.get_fdata(dtype=np.float32)[:, :, 50:56]
    rng = np.random.RandomState(3)
    mask = np.zeros(ref.shape, np.uint8)
    mask[100:140, 150:190, 1:5] = 1
    rest = ref + rng.normal(0, 20, ref.shape) * mask
    base = ref + rng.normal(0, 60, ref.shape) * mask
    files = {n: _save(tmp_path / f"{n}.nii.gz", a, img.affine)
             for n, a in (("ref", ref), ("rest", rest), ("base", base), ("mask", mask))}
    monkeypatch.chdir(tmp_path)  # MLflow artifacts of sqlite stores go to ./mlruns
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    rc = main(["evaluate", str(files["rest"]), str(files["ref"]), "--mask", str(files["mask"]),
               "--baseline", str(files["base"]), "--baseline-name", "NL-means", "--report", str(tmp_path / "rep"),
               "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out
    run_id = json.loads((tmp_path / "rep" / "summary.json").read_text())["mlflow_run_id"]
    assert f"mlflow: run {run_id} in experiment 'evaluation'" in out
    return {"dir": tmp_path / "rep", "uri": uri, "run_id": run_id, "report_id": _report_id(tmp_path / "rep")}


def _verdicts(rid: str, **kw) -> dict:
    doc = {"format": "medvae-review", "version": 1, "run_id": rid, "n_slices": 6, "verdict": "accept",
           "note": "", "reviewer": None, "slices": [], "exported_at": "2026-11-30T12:00:00Z"}
    doc.update(kw)
    return doc


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="chromium is not installed (apt-get install chromium chromium-driver)")
def test_sign_off_export_is_imported_into_the_evaluation_run(evaluated, tmp_path, capsys):
    from mlflow import MlflowClient
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
              "--disable-extensions", "--disable-sync", "--disable-component-update",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000"]:
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get((evaluated["dir"] / "index.html").resolve().as_uri())
        assert evaluated["run_id"] in driver.find_element(By.ID, "foot").text
        driver.find_element(By.ID, "export").click()  # no case verdict yet: refused
        assert "Choose accept or reject" in driver.find_element(By.ID, "export-status").text
        driver.find_element(By.ID, "case-reject").click()
        driver.find_element(By.ID, "case-note").send_keys("blotchy mottle in the brain window")
        driver.find_element(By.ID, "reviewer").send_keys("JD")
        driver.execute_script("const s = document.getElementById('slice'); s.value = 2; s.dispatchEvent(new Event('input'));")
        driver.find_element(By.ID, "slice-note").send_keys("grey-white contrast lost")
        driver.find_element(By.ID, "slice-reject").click()
        driver.execute_script("const s = document.getElementById('slice'); s.value = 4; s.dispatchEvent(new Event('input'));")
        driver.find_element(By.ID, "slice-accept").click()
        assert "slice 3: reject — grey-white contrast lost" in driver.find_element(By.ID, "slice-verdicts").text
        driver.find_element(By.ID, "case-note").click()  # leave the note field: its change is kept
        driver.refresh()  # the sign-off in progress survives a reload
        assert driver.find_element(By.ID, "case-reject").is_selected()
        assert driver.find_element(By.ID, "reviewer").get_attribute("value") == "JD"
        assert "slice 3: reject — grey-white contrast lost" in driver.find_element(By.ID, "slice-verdicts").text
        driver.find_element(By.ID, "export").click()
        shown = json.loads(driver.find_element(By.ID, "verdict-json").get_attribute("value"))
        t0 = time.time()
        while not list(downloads.glob("*.json")) and time.time() - t0 < 20:
            time.sleep(0.1)
        (exported,) = downloads.glob("*.json")
        assert exported.name == f"verdicts_{evaluated['run_id'][:8]}.json"
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()
    doc = json.loads(exported.read_text())
    assert doc == shown
    assert doc["run_id"] == evaluated["run_id"] and doc["verdict"] == "reject" and doc["reviewer"] == "JD"
    assert doc["slices"] == [{"slice": 3, "k": 2, "verdict": "reject", "note": "grey-white contrast lost"},
                             {"slice": 5, "k": 4, "verdict": "accept", "note": ""}]

    assert main(["review", "import", str(exported), "--tracking-uri", evaluated["uri"]]) == 0
    assert f"case rejected by JD, 2 slice verdict(s) -> MLflow run {evaluated['run_id']}" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=evaluated["uri"])
    run = client.get_run(evaluated["run_id"])
    tags = run.data.tags
    assert tags["medvae.review.verdict"] == "reject" and tags["medvae.review.reviewer"] == "JD"
    assert tags["medvae.review.slices_rejected"] == "1" and tags["medvae.review.slices_accepted"] == "1"
    assert run.info.status == "FINISHED"  # the evaluation's run is not reopened
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "review/verdicts.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [(r["scope"], r["slice"], r["verdict"]) for r in rows] == [("case", None, "reject"), ("slice", 3, "reject"),
                                                                     ("slice", 5, "accept")]
    assert rows[0]["note"] == "blotchy mottle in the brain window" and rows[1]["note"] == "grey-white contrast lost"
    # the evaluation's metrics say their region
    assert {"psnr_mask", "psnr_image", "restored.mask.psnr_mean"} <= set(run.data.metrics)
    assert run.data.params["headline_metric"] == "psnr_mask" and run.data.params["has_baseline"] == "True"


def test_review_import_without_initials_sets_no_reviewer_tag(evaluated, tmp_path, capsys):
    from mlflow import MlflowClient

    f = tmp_path / "v.json"
    f.write_text(json.dumps(_verdicts(evaluated["run_id"], verdict="accept", report_id=evaluated["report_id"])))
    assert main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]]) == 0
    tags = MlflowClient(tracking_uri=evaluated["uri"]).get_run(evaluated["run_id"]).data.tags
    assert tags["medvae.review.verdict"] == "accept" and "medvae.review.reviewer" not in tags


BAD = [
    ({"format": "something"}, "not a medvae review export"),
    ({"verdict": "maybe"}, "the case verdict must be accept or reject"),
    ({"reviewer": "Jane Q. Doe-Smith"}, "reviewer must be initials"),
    ({"reviewer": "Jane"}, "reviewer must be initials"),      # a short name is a name too (the old rule took it)
    ({"reviewer": "J. Doe"}, "reviewer must be initials"),
    ({"slices": [{"slice": 9, "verdict": "reject"}]}, "slice number 9 is not in 1..6"),
    ({"run_id": None}, "give --run-id"),
    ({"run_id": "ffffffffffffffffffffffffffffffff"}, "no MLflow run ffffffffffffffffffffffffffffffff"),
    # incomplete or edited by hand
    ({"n_slices": None}, "incomplete export: \"n_slices\""),
    ({"exported_at": "DOE^JANE 1234567"}, "incomplete export: \"exported_at\""),
    # dated 2099, it outranked every later real sign-off, a reject included
    ({"exported_at": "2099-12-08T00:50:00Z"}, "\"exported_at\" 2099-12-08T00:50:00Z lies in the future"),
    ({"slices": [{"slice": 2, "k": 4, "verdict": "reject"}]}, "slice 2 has k = 4"),
    ({"slices": [{"slice": 2, "verdict": "reject"}, {"slice": 2, "verdict": "accept"}]}, "slice 2 has two verdicts"),
    ({"slices": [{"slice": True, "verdict": "reject"}]}, "slice number True is not in 1..6"),
    ({"note": {"name": "x"}}, "the case note must be text"),
    ({"n_slices": 9}, "for a page of 9 slices, but the evaluation of MLflow run"),
    ({"report_id": "0" * 64}, "these verdicts are for another evaluation"),
    # edited to name another run of as many slices, its report_id removed: it was imported there
    ({"report_id": None}, "incomplete export: no \"report_id\" ties it to its evaluation's report"),
]


def test_review_import_refuses_bad_files_in_one_line(evaluated, tmp_path, capsys):
    from mlflow import MlflowClient

    for i, (change, message) in enumerate(BAD):
        f = tmp_path / f"bad{i}.json"
        f.write_text(json.dumps(_verdicts(evaluated["run_id"], **{"report_id": evaluated["report_id"], **change})))
        assert main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]]) == 2, change
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(f) in err and message in err, err
    assert main(["review", "import", str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
    # an empty file named as the store was filled with MLflow's tables to find no run in it
    good = tmp_path / "good.json"
    good.write_text(json.dumps(_verdicts(evaluated["run_id"], report_id=evaluated["report_id"])))
    (tmp_path / "empty.db").write_bytes(b"")
    assert main(["review", "import", str(good), "--tracking-uri", f"sqlite:///{tmp_path}/empty.db"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and (tmp_path / "empty.db").stat().st_size == 0
    tags = MlflowClient(tracking_uri=evaluated["uri"]).get_run(evaluated["run_id"]).data.tags
    assert "medvae.review.verdict" not in tags  # nothing logged


def _report_id(folder: Path) -> str:
    import hashlib

    return hashlib.sha256((folder / "metrics.csv").read_bytes()).hexdigest()


def test_review_import_refuses_verdicts_of_another_evaluation(evaluated, tmp_path, capsys):
    from mlflow import MlflowClient

    from medvae.report import report_digest

    rep = evaluated["dir"]
    page = json.loads(re.search(r'id="data">(.*?)</script>', (rep / "index.html").read_text(), re.S).group(1))
    assert page["report_id"] == report_digest(rep / "metrics.csv") == _report_id(rep)
    # a second evaluation (another restoration, the same slice count) in the same store
    assert main(["evaluate", str(tmp_path / "base.nii.gz"), str(tmp_path / "ref.nii.gz"), "--report",
                 str(tmp_path / "rep2"), "--tracking-uri", evaluated["uri"]]) == 0
    other = json.loads((tmp_path / "rep2" / "summary.json").read_text())["mlflow_run_id"]
    capsys.readouterr()
    cases = [  # (export, --run-id, message)
        (_verdicts(evaluated["run_id"], report_id=page["report_id"]), other, f"exported from the page of MLflow run "
                                                                            f"{evaluated['run_id']}, not {other}"),
        (_verdicts(None, report_id=page["report_id"]), other, "these verdicts are for another evaluation"),
        (_verdicts(None), other, "incomplete export: no \"report_id\""),
    ]
    for i, (doc, run_id, message) in enumerate(cases):
        f = tmp_path / f"v{i}.json"
        f.write_text(json.dumps(doc))
        assert main(["review", "import", str(f), "--run-id", run_id, "--tracking-uri", evaluated["uri"]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
    client = MlflowClient(tracking_uri=evaluated["uri"])
    assert not any(k.startswith("medvae.review.") for k in client.get_run(other).data.tags)  # nothing logged
    # the page of a run evaluated without MLflow imports into the run of the same evaluation
    f = tmp_path / "ok.json"
    f.write_text(json.dumps(_verdicts(None, report_id=page["report_id"])))
    assert main(["review", "import", str(f), "--run-id", evaluated["run_id"], "--tracking-uri", evaluated["uri"]]) == 0


def test_review_import_twice_is_refused_and_a_later_export_replaces_the_verdict(evaluated, tmp_path, capsys):
    from mlflow import MlflowClient

    def imp(name, **kw):
        f = tmp_path / name
        f.write_text(json.dumps(_verdicts(evaluated["run_id"], report_id=_report_id(evaluated["dir"]), **kw)))
        rc = main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]])
        return rc, capsys.readouterr()

    t1, t0, t2 = "2026-11-30T12:00:00.000Z", "2026-11-30T11:00:00.000Z", "2026-11-30T13:00:00.000Z"
    assert imp("a.json", verdict="accept", reviewer="JD", exported_at=t1)[0] == 0
    rc, out = imp("a.json", verdict="accept", reviewer="JD", exported_at=t1)
    assert rc == 2 and "already imported" in out.err and out.err.strip().count("\n") == 0, out
    rc, out = imp("old.json", verdict="reject", exported_at=t0)
    assert rc == 2 and "holds a later sign-off (accept, exported " + t1 in out.err, out
    rc, out = imp("new.json", verdict="reject", exported_at=t2)
    assert rc == 0 and "replaces its earlier sign-off (accept, exported " + t1 in out.out, out
    client = MlflowClient(tracking_uri=evaluated["uri"])
    tags = client.get_run(evaluated["run_id"]).data.tags
    assert tags["medvae.review.verdict"] == "reject" and tags["medvae.review.reviewed_at"] == t2
    assert "medvae.review.reviewer" not in tags  # JD reviewed the earlier export, not this one
    table = json.loads(Path(client.download_artifacts(evaluated["run_id"], "review/verdicts.json", str(tmp_path)))
                       .read_text())
    assert [r[table["columns"].index("reviewed_at")] for r in table["data"]] == [t1, t2]  # each import once


def test_a_retry_after_an_outage_between_the_table_and_the_tags_logs_the_rows_once(evaluated, tmp_path, capsys,
                                                                                    monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    f = tmp_path / "v.json"
    f.write_text(json.dumps(_verdicts(evaluated["run_id"], report_id=_report_id(evaluated["dir"]),
                                      slices=[{"slice": 2, "verdict": "reject", "note": "streak"}])))
    real = MlflowClient.set_tag

    def down(self, *a, **k):  # the server went away after the table was logged
        raise MlflowException("API request to http://h/api/2.0/mlflow/runs/set-tag failed with error code 503")

    monkeypatch.setattr(MlflowClient, "set_tag", down)
    assert main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]]) == 3
    monkeypatch.setattr(MlflowClient, "set_tag", real)
    assert main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]]) == 0, capsys.readouterr().err
    client = MlflowClient(tracking_uri=evaluated["uri"])
    table = json.loads(Path(client.download_artifacts(evaluated["run_id"], "review/verdicts.json", str(tmp_path)))
                       .read_text())
    assert [r[table["columns"].index("scope")] for r in table["data"]] == ["case", "slice"]  # was logged twice
    assert client.get_run(evaluated["run_id"]).data.tags["medvae.review.verdict"] == "accept"


def test_earlier_verdict_rows_stay_word_for_word_and_a_deleted_run_takes_nothing(evaluated, tmp_path, capsys):
    # a second import retyped the first's rows through pandas: note "0042" became 42, slice 2 became 2.0
    from mlflow import MlflowClient

    rid = evaluated["run_id"]
    client = MlflowClient(tracking_uri=evaluated["uri"])

    def imp(name, **kw):
        f = tmp_path / name
        f.write_text(json.dumps(_verdicts(rid, report_id=evaluated["report_id"], **kw)))
        return main(["review", "import", str(f), "--tracking-uri", evaluated["uri"]]), capsys.readouterr()

    t1, t2 = "2026-11-30T12:00:00Z", "2026-11-30T13:00:00Z"
    assert imp("a.json", note="0042", exported_at=t1,
               slices=[{"slice": 2, "verdict": "reject", "note": "1e3"}])[0] == 0
    assert imp("b.json", verdict="reject", note="12.50", exported_at=t2)[0] == 0
    table = json.loads(Path(client.download_artifacts(rid, "review/verdicts.json", str(tmp_path))).read_text())
    assert table["columns"] == ["scope", "slice", "verdict", "note", "reviewer", "reviewed_at"]
    assert table["data"] == [["case", None, "accept", "0042", "", t1], ["slice", 2, "reject", "1e3", "", t1],
                             ["case", None, "reject", "12.50", "", t2]]
    listed = json.loads(client.get_run(rid).data.tags["mlflow.loggedArtifacts"])
    assert {"path": "review/verdicts.json", "type": "table"} in listed  # the MLflow UI shows it as a table
    client.delete_run(rid)  # MLflow took the table, then refused the tags: exit 2 but logged
    rc, out = imp("c.json", exported_at="2026-11-30T14:00:00Z")
    assert rc == 2 and f"MLflow run {rid} is deleted: restore it first" in out.err, out
    again = json.loads(Path(client.download_artifacts(rid, "review/verdicts.json", str(tmp_path / "x")))
                       .read_text())
    assert again == table


def test_initials_in_every_usual_form_are_accepted():
    from medvae.commands.review import _INITIALS

    assert all(_INITIALS.match(s) for s in ("J", "JD", "J.D.", "JKD", "J-P", "ABCD"))
    assert not any(_INITIALS.match(s) for s in ("jd", "Jane", "J. Doe", "ABCDE", "J D", "DOE^JANE"))
