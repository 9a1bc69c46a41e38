"""medvae.report: review figures, report files, geometry, and the review page in a real headless Chromium."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medvae.evaluate import evaluate_volumes, parse_window
from medvae.models.label import model_label
from medvae.report import (
    _display_transform, _orient, _pick_slices, decode_q12, encode_q12, review_figure, slice_geometry,
    write_report,
)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _case_arrays(ct_file: Path):
    """A real head CT, 8 slices, with noise + a dropped box ('corrupted'), a smoothed 'restoration',
    a more smoothed 'baseline', an uncertainty map and the box as damage mask."""
    from scipy.ndimage import gaussian_filter

    img = nib.load(ct_file)
    ref = img.get_fdata(dtype=np.float32)[:, :, 48:56]
    rng = np.random.RandomState(0)
    mask = np.zeros(ref.shape, bool)
    mask[100:140, 150:190, 2:6] = True
    corrupted = (ref + rng.normal(0, 80, ref.shape)).astype(np.float32)
    corrupted[mask] = -1000.0
    restored = gaussian_filter(corrupted, (1, 1, 0)).astype(np.float32)
    restored[mask] = gaussian_filter(ref, 2)[mask]
    baseline = gaussian_filter(corrupted, (2, 2, 0)).astype(np.float32)
    unc = (np.abs(gaussian_filter(rng.normal(0, 1, ref.shape), 2)) * 20 + mask * 60).astype(np.float32)
    return dict(ref=ref, restored=restored, corrupted=corrupted, baseline=baseline, mask=mask, unc=unc,
                affine=img.affine)


@pytest.fixture(scope="module")
def case(dev_ct_head):
    c = _case_arrays(dev_ct_head)
    c["win"] = parse_window("ct")
    c["ev"] = evaluate_volumes(c["restored"], c["ref"], window=c["win"], mask=c["mask"], corrupted=c["corrupted"],
                               baseline=c["baseline"], modality="CT")
    return c


@pytest.fixture(scope="module")
def report(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(
        out, evaluation=case["ev"], restored=case["restored"], reference=case["ref"], corrupted=case["corrupted"],
        baseline=case["baseline"], uncertainty=case["unc"], mask=case["mask"], window=case["win"],
        title="Head CT <test> & co", baseline_name="Gaussian", model_uri="runs:/abc/model",
        model_meta={"calibration": {"coverage_2std_holes": 0.83, "measured_on": "held-out test slices"}},
        run_id="0123456789abcdef0123456789abcdef", affine=case["affine"],
    )
    return out, paths


def _data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def _panel(d: dict, key: str) -> dict:
    return next(p for p in d["panels"] if p["key"] == key)


# ------------------------------------------------------------------ geometry and encoding
def test_display_orientation_is_radiological():
    s = np.arange(12.0).reshape(3, 4)  # (X, Y)
    # RAS array: rows = Y (anterior up), columns = X with patient right on the left
    np.testing.assert_array_equal(_orient(s, _display_transform(np.eye(4))), s.T[::-1, ::-1])
    las = np.diag([-1.0, 1.0, 1.0, 1.0])  # X runs to the patient's left: no horizontal flip
    np.testing.assert_array_equal(_orient(s, _display_transform(las)), s.T[::-1, :])
    tf = _display_transform(np.diag([1.0, 2.0, 3.0, 1.0]))
    assert tf[3] == pytest.approx(2.0)  # row spacing / column spacing


def test_slice_geometry_from_a_real_affine(case):
    aff = case["affine"]
    g = slice_geometry(aff, case["ref"].shape)
    tf = _display_transform(aff)
    # the letters agree with what the display shows: the voxel shown top-left is the most
    # anterior and most right-ward of the slice (radiological convention, axial slice)
    ijk = np.stack(np.meshgrid(np.arange(256), np.arange(256), indexing="ij"), -1).astype(float)
    world = ijk @ aff[:3, :2].T + aff[:3, 3]
    shown = {ax: _orient(world[..., ax], tf) for ax in (0, 1)}
    assert g["letters"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert shown[1][0, 0] > shown[1][-1, 0]  # anterior (+y) at the top
    assert shown[0][0, 0] > shown[0][0, -1]  # patient right (+x) on the screen's left
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(0))
    assert g["spacing_mm"] == pytest.approx([spacing[0], spacing[1]], rel=1e-5)
    assert g["normal"] == "S"
    steps = np.diff(g["positions_mm"])
    assert steps == pytest.approx(np.full(7, abs(aff[2, 2])), abs=1e-3)  # one slice gap apart
    # sagittal slices: superior up, anterior on the left
    sag = np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1]])  # i->A, j->S, k->R
    gs = slice_geometry(sag, (10, 12, 3))
    assert gs["letters"]["top"] == "S" and gs["letters"]["left"] == "A" and gs["normal"] == "R"


def test_encode_q12_round_trip(case):
    a = case["ref"][:, :, 3].astype(np.float64)
    step = (a.max() - a.min()) / 4095
    back = decode_q12(encode_q12(a, float(a.min()), step), a.shape, float(a.min()), step)
    assert np.abs(back - a).max() <= step / 2 + 1e-9  # 12-bit: within half a step (here < 1 HU)


def test_pick_slices_prefers_slices_with_anatomy():
    psnr = np.array([20.0, 30.0, np.nan, 25.0, 60.0])
    assert _pick_slices(psnr) == {"worst": 0, "median": 3, "best": 4}
    anatomy = np.array([True, True, True, True, False])  # slice 4: empty air above the head
    assert _pick_slices(psnr, anatomy) == {"worst": 0, "median": 3, "best": 1}
    assert _pick_slices(psnr, np.zeros(5, bool))["best"] == 4  # no candidates: all slices
    # a slice the summary leaves out (a source identical to the reference: infinite PSNR) is never shown
    summarized = np.array([True, True, True, True, False])
    assert _pick_slices(np.array([20.0, 30.0, np.nan, 25.0, np.inf]), None, summarized) == {
        "worst": 0, "median": 3, "best": 1}
    # a summary that leaves out every slice (a headline region empty or identical on all): no picks
    assert _pick_slices(np.array([20.0, 30.0]), None, np.zeros(2, bool)) == {}


def test_review_figure(case, tmp_path):
    k = 3
    sl = {p: case[p][:, :, k] for p in ("corrupted", "restored")}
    sl["reference"] = case["ref"][:, :, k]
    p = review_figure(sl, title="t", window=case["win"], path=tmp_path / "a.png")
    im4 = Image.open(p)
    sl["uncertainty"], sl["mask"], sl["baseline"] = case["unc"][:, :, k], case["mask"][:, :, k], case["baseline"][:, :, k]
    p6 = review_figure(sl, title="t", window=case["win"], path=tmp_path / "b.png", affine=case["affine"])
    im6 = Image.open(p6)
    assert im6.width > im4.width > 2.5 * im4.height  # one row of 4 and of 6 panels
    assert np.asarray(im6.convert("L")).std() > 20
    fig = review_figure(sl, title="t", window=case["win"])  # no path: the Figure, e.g. for mlflow.log_figure
    assert len([ax for ax in fig.axes if ax.get_title()]) == 6


# ------------------------------------------------------------------ report files
def test_write_report_files(report, case):
    out, paths = report
    ev, nz = case["ev"], case["ref"].shape[2]
    assert set(paths) == {"metrics_csv", "summary_json", "index_html", "figure_worst", "figure_median", "figure_best"}
    assert all(p.is_file() and p.parent == out for p in paths.values())
    rows = list(csv.DictReader(open(paths["metrics_csv"])))
    assert len(rows) == nz * 3 * 3  # slices x (restored, baseline, corrupted) x (image, mask, foreground)
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["n_slices"] == nz and "7x7 uniform window" in summary["ssim_definition"]
    assert summary["mlflow_run_id"] == "0123456789abcdef0123456789abcdef"
    assert summary["headline"] == {"metric": "psnr", "region": "mask"}
    # worst/median/best follow the headline metric: PSNR inside the mask (slices 2..5 have damage)
    psnr_mask = ev.per_slice("restored", "mask", "psnr")
    assert paths["figure_worst"].name == f"slice_{int(np.nanargmin(psnr_mask)):03d}_worst.png"
    assert paths["figure_best"].name == f"slice_{int(np.nanargmax(psnr_mask)):03d}_best.png"
    # and nothing else but the marker that lets a later --overwrite recognise medvae's own report
    assert sorted(p.name for p in out.iterdir()) == sorted([*(p.name for p in paths.values()), ".medvae-output.json"])


def test_index_html_is_self_contained(report, case):
    out, paths = report
    html = paths["index_html"].read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and len(html) < 20_000_000
    # no network: no external URLs, stylesheets, fonts or scripts
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]", html.replace("http-equiv", "").replace(
        "http://www.w3.org/2000/svg", ""), re.I)
    assert "<link" not in html and "@import" not in html and "url(" not in html and "<script src" not in html
    assert "default-src 'none'" in html  # CSP: the page cannot fetch anything even if it tried
    assert "Head CT &lt;test&gt; &amp; co" in html and "<test>" not in html  # title escaped
    d = _data(html)
    assert [p["key"] for p in d["panels"]] == ["restored", "reference", "baseline", "corrupted", "error", "uncertainty"]
    assert _panel(d, "baseline")["caption"] == "Baseline (Gaussian)"
    assert [s["k"] for s in d["slices"]] == list(range(case["ref"].shape[2]))
    assert d["geometry"]["letters"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert [p["name"] for p in d["windows"]["presets"]] == ["metric", "brain", "subdural", "soft", "lung", "bone"]
    assert "83 % of pixels within ± 2 std" in d["uncertainty"]["calibration"]
    assert "of damaged (mask) pixels have |restored − reference| ≤ 2 std" in d["uncertainty"]["measured"]
    # the embedded slice is the restored slice, oriented, at 12-bit precision
    s3 = d["slices"][3]
    p = _panel(d, "restored")
    shown = decode_q12(s3["img"]["restored"], (d["dims"]["h"], d["dims"]["w"]), p["offset"], p["step"])
    expected = _orient(case["restored"][:, :, 3].astype(np.float64), _display_transform(case["affine"]))
    inside = (expected > p["offset"]) & (expected < p["offset"] + 4095 * p["step"])
    assert np.abs(shown - expected)[inside].max() <= p["step"] / 2 + 1e-6
    assert s3["m"]["restored"]["image"]["psnr"] == pytest.approx(case["ev"].per_slice("restored", "image", "psnr")[3],
                                                                 abs=1e-5)
    assert s3["mask"] and d["slices"][0]["mask"] is None  # no damage on slice 0: no outline
    # one grey scale, wide enough for the noisy input's air (below the reference's -1024 HU): stored over the
    # reference's range, it was drawn as -1024, too bright in the lung preset
    c = _panel(d, "corrupted")
    assert (c["offset"], c["step"]) == (p["offset"], p["step"])
    assert c["offset"] < np.percentile(case["corrupted"], 0.1) < case["ref"].min()


def test_page_budget_subsamples_slices(case, tmp_path):
    paths = write_report(tmp_path, evaluation=case["ev"], restored=case["restored"], reference=case["ref"],
                         window=case["win"], title="t", max_bytes=400_000)
    d = _data(paths["index_html"].read_text())
    ks = [s["k"] for s in d["slices"]]
    psnr = case["ev"].per_slice("restored", "mask", "psnr")
    assert len(ks) < case["ref"].shape[2]
    assert {int(np.nanargmin(psnr)), int(np.nanargmax(psnr))} <= set(ks)
    assert sum(len(v) for s in d["slices"] for v in s["img"].values()) <= 400_000
    assert any("slice shown" in n for n in d["notes"])



# ------------------------------------------------------------------ the report folder is a claimed, atomic output
@pytest.fixture(scope="module")
def small_case(case):
    """Three slices of the case, so that a report takes a second."""
    vols = {k: case[k][:, :, 2:5] for k in ("ref", "restored", "corrupted", "mask")}
    ev = evaluate_volumes(vols["restored"], vols["ref"], window=case["win"], mask=vols["mask"],
                          corrupted=vols["corrupted"], modality="CT")
    return dict(vols, ev=ev, win=case["win"], affine=case["affine"])


def _write_small(c, out, **kw):
    return write_report(out, evaluation=c["ev"], restored=c["restored"], reference=c["ref"], corrupted=c["corrupted"],
                        mask=c["mask"], window=c["win"], title="t", affine=c["affine"], **kw)


def test_calibration_is_unknown_without_a_named_model_and_not_calibrated_without_its_metadata(small_case,
                                                                                              tmp_path):
    """The page cannot tell which model made the map: with none named it must not claim "not calibrated"
    (the map may come from the calibrated default model); a named model without meta["calibration"] is."""
    unc = np.ones(small_case["ref"].shape, np.float32)

    def said(name, **kw):
        d = _data(_write_small(small_case, tmp_path / name, uncertainty=unc, **kw)["index_html"].read_text())
        return d["uncertainty"]["calibration"]

    nobody = said("none")
    assert nobody.startswith("model calibration unknown: no --model-uri given") and "not calibrated" not in nobody
    assert "--model-uri default" in nobody
    unreadable = said("unreadable", model_uri="runs:/abc/model")  # named, but its metadata could not be read
    assert unreadable.startswith("model calibration unknown") and "could not be read" in unreadable
    assert said("uncalibrated", model_uri="runs:/abc/model", model_meta={"other": 1}).startswith("model not calibrated")
    assert said("calibrated", model_uri="default", model_meta={"calibration": {"coverage_2std_holes": 0.9}}) \
        .startswith("model calibration (holes): 90 % of pixels within ± 2 std")
    # the all-ones mask `corrupt` writes for noise: restore denoised, so the noise figures hold (the holes'
    # Spearman 0.63 was quoted for a map whose noise Spearman is 0.39)
    meta = {"calibration": {"coverage_2std_holes": 0.9, "coverage_2std_noise": 0.8}}
    everywhere = dict(small_case, mask=np.ones(small_case["ref"].shape, bool))
    d = _data(_write_small(everywhere, tmp_path / "noise", uncertainty=unc, model_uri="default", model_meta=meta)
              ["index_html"].read_text())
    assert d["uncertainty"]["calibration"].startswith("model calibration (noise): 80 % of pixels")


def test_page_says_which_metrics_csv_column_its_slice_numbers_are(small_case, tmp_path):
    """Slice N on the page is row slice = N − 1 of metrics.csv (0-based), whatever its 1-based label."""
    paths = _write_small(small_case, tmp_path / "r")
    d = _data(paths["index_html"].read_text())
    slices = dict(d["definitions"])["Slices"]
    assert "numbered 1..3 on this page; slice N is k = N − 1" in slices
    assert "the 0-based 'slice' column of metrics.csv (0..2)" in slices
    assert {int(r["slice"]) for r in csv.DictReader(open(paths["metrics_csv"]))} == {0, 1, 2}
    html = paths["index_html"].read_text()
    assert "' (0-based: the slice column of metrics.csv)'" in html and "' in metrics.csv'" not in html


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_write_report_replaces_only_its_own_report(small_case, tmp_path):
    from medvae.errors import MedvaeError

    out = tmp_path / "rep"
    paths = _write_small(small_case, out)
    assert all(p.parent == out and p.is_file() for p in paths.values())
    assert json.loads((out / ".medvae-output.json").read_text())["content"] == "medvae review report"
    first = _files(out)
    with pytest.raises(MedvaeError, match="already exists; pass --overwrite"):
        _write_small(small_case, out)
    assert _files(out) == first
    _write_small(small_case, out, overwrite=True, run_id="feedc0de")
    assert json.loads((out / "summary.json").read_text())["mlflow_run_id"] == "feedc0de"
    # another medvae output (a marker that is not a report's) is never taken for a report
    other = tmp_path / "series"
    other.mkdir()
    (other / "IM0001.dcm").write_bytes(b"not really")
    (other / ".medvae-output.json").write_text(json.dumps({"medvae": "0.1.0", "files": ["IM0001.dcm"]}))
    with pytest.raises(MedvaeError, match="not a review report"):
        _write_small(small_case, other, overwrite=True)
    assert sorted(p.name for p in other.iterdir()) == [".medvae-output.json", "IM0001.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep", "series"]  # no lock or staging left


def test_write_report_failing_part_way_leaves_the_old_report(small_case, tmp_path, monkeypatch):
    import tempfile

    import medvae.report

    out = tmp_path / "rep"
    _write_small(small_case, out)
    first = _files(out)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated failure after the CSV, JSON and figures")

    monkeypatch.setattr(medvae.report, "_render_html", broken)
    with pytest.raises(RuntimeError, match="simulated failure"):
        _write_small(small_case, out, overwrite=True)
    assert _files(out) == first
    with pytest.raises(RuntimeError, match="simulated failure"):
        _write_small(small_case, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]
    assert not list(Path(tempfile.gettempdir()).glob("medvae-staging-*"))


def test_check_report_dir_refuses_inputs(tmp_path):
    from medvae.errors import MedvaeError
    from medvae.report import check_report_dir

    series = tmp_path / "series"
    series.mkdir()
    inputs = {"restored": tmp_path / "rest.nii.gz", "reference": series, "mask": None}
    for out, words in ((series, "is the reference input"), (series / "r", "lies inside the reference input"),
                       (tmp_path, "holds the restored input"), (tmp_path / "rest.nii.gz", "is the restored input")):
        with pytest.raises(MedvaeError, match=words):
            check_report_dir(out, inputs)
    assert check_report_dir(tmp_path / "review", inputs) == tmp_path / "review"


def test_model_label_never_keeps_a_local_path(tmp_path):
    import hashlib

    ckpt = tmp_path / "DOE^JANE_PID123456" / "model.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    want = f"sha256:{hashlib.sha256(b'weights').hexdigest()[:12]}"
    assert model_label(ckpt) == want == model_label(str(ckpt)) == model_label(want)
    mlflow_folder = tmp_path / "DOE^JANE_PID123456" / "mlflow_model"
    (mlflow_folder / "extra_files").mkdir(parents=True)
    (mlflow_folder / "extra_files" / "medvae.pt").write_bytes(b"weights")
    assert model_label(mlflow_folder) == want  # a local MLflow model folder: its checkpoint's content
    for kept in ("default", "runs:/0123abcd/model", "models:/medvae-ct/3"):
        assert model_label(kept) == kept
    missing = model_label(tmp_path / "DOE^JANE_PID123456" / "gone.pt")
    assert re.fullmatch(r"path-sha1:[0-9a-f]{12}", missing) and model_label(missing) == missing
    assert model_label(None) is None


# ------------------------------------------------------------------ real browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                 "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(),
                                    reason="chromium is not installed (apt-get install chromium chromium-driver)")


def _png_std(path: Path) -> float:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return float(np.asarray(im.convert("L"), dtype=np.float64).std())


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if not CHROMIUM.is_file():
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")
    assert CHROMEDRIVER.is_file(), "chromium is installed but chromedriver is not: apt-get install chromium-driver"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:  # pragma: no cover
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    profile = tmp_path_factory.mktemp("chromium")
    downloads = tmp_path_factory.mktemp("downloads")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in [*CHROMIUM_ARGS, f"--user-data-dir={profile / 'profile'}", "--window-size=1500,1100"]:
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    # explicit driver path: Selenium Manager is never run (it would try to download a driver)
    drv = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    drv.downloads = downloads
    yield drv
    drv.quit()


def _wait(driver, script: str, timeout: float = 20.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = driver.execute_script(script)
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def _drawn(driver, i: int, lo: float, hi: float) -> None:
    _wait(driver, f"return document.body.dataset.drawn && document.body.dataset.drawn.startsWith('{i}:{lo:g}:{hi:g}:')")


def _red(driver, panel: str) -> np.ndarray:
    """The displayed pixels of a panel's canvas (red channel), as the browser drew them."""
    w, h, data = driver.execute_script(
        "const c = document.getElementById('img-' + arguments[0]);"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "const r = new Array(c.width * c.height); for (let i = 0; i < r.length; i++) r[i] = d[4 * i];"
        "return [c.width, c.height, r];", panel)
    return np.asarray(data, dtype=np.float64).reshape(h, w)


def _expected_grey(case, k: int, panel_key: str, p: dict, lo: float, hi: float) -> np.ndarray:
    vol = {"restored": case["restored"], "reference": case["ref"], "baseline": case["baseline"]}[panel_key]
    a = _orient(vol[:, :, k].astype(np.float64), _display_transform(case["affine"]))
    q = np.clip(np.round((a - p["offset"]) / p["step"]), 0, 4095)
    return np.clip(255 * (p["offset"] + q * p["step"] - lo) / (hi - lo), 0, 255)


def _open(driver, paths) -> dict:
    driver.get(paths["index_html"].resolve().as_uri())
    d = _data(paths["index_html"].read_text())
    lo, hi = d["windows"]["initial"]
    _drawn(driver, d["start"], lo, hi)
    return d


@needs_chromium
def test_page_loads_and_navigates(driver, report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    out, paths = report
    d = _open(driver, paths)
    label, slider = driver.find_element(By.ID, "slice-label"), driver.find_element(By.ID, "slice")
    assert slider.get_attribute("max") == str(len(d["slices"]) - 1)
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # no requests
    shot = tmp_path / "page.png"
    assert driver.save_screenshot(str(shot)) and _png_std(shot) > 25  # a rendered page with scans
    start = int(slider.get_attribute("value"))
    assert label.text.startswith(f"Slice {start + 1} of 8 · ") and "mm along the slice normal (S)" in label.text
    assert label.text.endswith(f"k = {start} (0-based: the slice column of metrics.csv)")
    slider.send_keys(Keys.ARROW_RIGHT)  # keyboard on the focused slider
    assert label.text.startswith(f"Slice {start + 2} of 8")
    driver.execute_script("document.activeElement.blur()")  # arrows also work page-wide
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
    assert label.text.startswith(f"Slice {start + 1} of 8")
    driver.execute_script("const s = document.getElementById('slice'); s.value = 0; s.dispatchEvent(new Event('input'));")
    assert label.text.startswith("Slice 1 of 8")
    assert not driver.find_element(By.ID, "mask-restored").is_displayed()  # slice 1 has no damage
    driver.execute_script("const s = document.getElementById('slice'); s.value = 3; s.dispatchEvent(new Event('input'));")
    assert driver.find_element(By.ID, "mask-restored").is_displayed()
    # orientation letters, scale bar and the baseline panel with its caption
    fig = driver.find_element(By.ID, "fig-reference")
    assert [e.text for e in fig.find_elements(By.CSS_SELECTOR, ".ol")] == ["A", "P", "R", "L"]
    bar = fig.find_element(By.CSS_SELECTOR, ".scalebar .bar")
    frame = fig.find_element(By.CSS_SELECTOR, ".frame")
    mm = float(fig.find_element(By.CSS_SELECTOR, ".scalebar span").text.split()[0])
    assert bar.size["width"] == pytest.approx(frame.size["width"] * mm / d["geometry"]["size_mm"][0], abs=1.5)
    base = driver.find_element(By.ID, "fig-baseline")
    assert base.is_displayed() and "Baseline (Gaussian)" in base.text
    assert driver.find_element(By.ID, "img-baseline").size["width"] > 150
    assert "baseline (Gaussian)" in driver.find_element(By.ID, "metrics").text
    assert "83 % of pixels within ± 2 std" in driver.find_element(By.ID, "calibration").text
    assert "predictive standard deviation in the scan’s units" in driver.find_element(By.ID, "unc-meaning").text
    errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


@needs_chromium
def test_preset_and_window_level_change_the_displayed_pixels(driver, report, case):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    out, paths = report
    d = _open(driver, paths)
    i = d["start"]
    k = d["slices"][i]["k"]
    p = _panel(d, "restored")
    lo, hi = d["windows"]["initial"]
    before = _red(driver, "restored")
    assert np.abs(before - _expected_grey(case, k, "restored", p, lo, hi)).max() <= 1
    driver.find_element(By.ID, "preset-brain").click()
    _drawn(driver, i, 0, 80)
    after = _red(driver, "restored")
    assert np.abs(after - _expected_grey(case, k, "restored", p, 0, 80)).max() <= 1  # brain: C 40 / W 80
    assert np.mean(after != before) > 0.2
    ref = _red(driver, "reference")  # every grey panel follows
    assert np.abs(ref - _expected_grey(case, k, "reference", _panel(d, "reference"), 0, 80)).max() <= 1
    assert "C 40 / W 80 HU" in driver.find_element(By.ID, "window-state").text
    # window/level by its two inputs
    c, w = driver.find_element(By.ID, "wl-center"), driver.find_element(By.ID, "wl-width")
    c.clear(); c.send_keys("300")
    w.clear(); w.send_keys("1000\n")
    driver.execute_script("document.getElementById('wl-width').dispatchEvent(new Event('change'))")
    _drawn(driver, i, -200, 800)
    assert np.abs(_red(driver, "baseline") - _expected_grey(case, k, "baseline", _panel(d, "baseline"), -200, 800)).max() <= 1
    # and by dragging on an image: to the right widens the window
    ActionChains(driver).move_to_element(driver.find_element(By.ID, "img-reference")).click_and_hold() \
        .move_by_offset(60, 0).release().perform()
    width = float(driver.find_element(By.ID, "wl-width").get_attribute("value"))
    assert width > 1200
    # the uncertainty panel switches to the error panel's colour scale
    unc0 = _red(driver, "uncertainty")
    driver.find_element(By.ID, "unc-error-scale").click()
    _wait(driver, "return document.body.dataset.drawn.endsWith(':1')")
    assert np.mean(_red(driver, "uncertainty") != unc0) > 0.2
    scale = driver.find_element(By.ID, "cbl-uncertainty").text
    assert scale == driver.find_element(By.ID, "cbl-error").text


@needs_chromium
def test_no_layout_shift_between_slices(driver, report):
    out, paths = report
    d = _open(driver, paths)
    ids = ["slice", "slice-label", "slice-table", "img-corrupted", "img-restored", "img-reference", "img-error",
           "img-uncertainty", "preset-brain", "metrics"]
    rects = "return arguments[0].map(i => { const r = document.getElementById(i).getBoundingClientRect(); " \
            "return [i, r.x, r.y, r.width, r.height]; });"
    first = None
    for i in range(len(d["slices"])):
        driver.execute_script(f"const s = document.getElementById('slice'); s.value = {i}; s.dispatchEvent(new Event('input'));")
        now = driver.execute_script(rects, ids)
        if first is None:
            first = now
        assert now == first, (i, now, first)


@needs_chromium
def test_screenshot_script(report, tmp_path):
    out, _ = report
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(out), str(png),
                           "--width", "1200", "--height", "800"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (1200, 800)
    assert _png_std(png) > 25


@needs_chromium
def test_page_script_runs_whatever_the_baseline_name_and_title(driver, small_case, tmp_path):
    """Free text in the page data (the baseline name) cannot switch the HTML parser into its escaped
    script states (``<!--<script>``) and leave the page without its script; a title is text."""
    from selenium.webdriver.common.by import By

    c = small_case
    paths = write_report(tmp_path / "r", evaluation=c["ev"], restored=c["restored"], reference=c["ref"],
                         baseline=c["corrupted"], baseline_name="<!--<script>", window=c["win"],
                         title="{{DATA}} <script>x</script>", affine=c["affine"])
    html = paths["index_html"].read_text()
    assert "<!--<script>" not in html and "&lt;script&gt;x" in html
    d = _open(driver, paths)  # times out when the page's script never ran
    assert driver.find_element(By.ID, "slice-label").text.startswith(f"Slice {d['slices'][d['start']]['k'] + 1} of 3")
    assert "Baseline (<!--<script>)" in driver.find_element(By.ID, "fig-baseline").text
    assert driver.find_element(By.TAG_NAME, "h1").text == "{{DATA}} <script>x</script>"


@needs_chromium
def test_sign_off_draft_belongs_to_its_own_report(driver, small_case, tmp_path):
    """Two reports without an MLflow run, with the same title and slice count, keep separate drafts:
    the browser's storage is shared by every file:// page."""
    from selenium.webdriver.common.by import By

    c = small_case
    other = evaluate_volumes(c["corrupted"], c["ref"], window=c["win"], mask=c["mask"], modality="CT")
    a = _write_small(c, tmp_path / "a")
    b = write_report(tmp_path / "b", evaluation=other, restored=c["corrupted"], reference=c["ref"], mask=c["mask"],
                     window=c["win"], title="t", affine=c["affine"])
    da, db = _open(driver, a), _data(b["index_html"].read_text())
    assert da["report_id"] != db["report_id"]
    driver.find_element(By.ID, "case-reject").click()  # saved as a draft for page a
    driver.find_element(By.ID, "export").click()
    exported = json.loads(driver.find_element(By.ID, "verdict-json").get_attribute("value"))
    from medvae.report import report_digest
    assert exported["report_id"] == da["report_id"] == report_digest(tmp_path / "a" / "metrics.csv")
    _open(driver, b)
    assert not driver.find_element(By.ID, "case-reject").is_selected()  # page b starts without a verdict
    _open(driver, a)
    assert driver.find_element(By.ID, "case-reject").is_selected()  # page a's draft is still there


@needs_chromium
def test_psnr_curve_label_gives_the_data_range_not_the_widened_axis(driver, small_case, tmp_path):
    """With one finite slice (one identical: inf, one with an empty mask) the label said 9.7..11.7 dB,
    the axis widened by 1 dB either way, a range no slice has."""
    from selenium.webdriver.common.by import By

    c = small_case
    restored, mask = c["restored"].copy(), c["mask"].copy()
    restored[:, :, 1] = c["ref"][:, :, 1]
    mask[:, :, 2] = False
    ev = evaluate_volumes(restored, c["ref"], window=c["win"], mask=mask, corrupted=c["corrupted"], modality="CT")
    paths = write_report(tmp_path / "r", evaluation=ev, restored=restored, reference=c["ref"], corrupted=c["corrupted"],
                         mask=mask, window=c["win"], title="t", affine=c["affine"])
    d = _open(driver, paths)
    (only,) = [x for x in d["curve"] if isinstance(x, float)]
    label = driver.find_element(By.CSS_SELECTOR, "#curve-box .cbl").text
    assert f"mask region): {only:.1f} dB" in label, label
    # the summary says which source equals the reference on slice 1: the restoration, not the input
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in driver.find_elements(By.CSS_SELECTOR, "#metrics tr")[2:]]
    identical = {(r[0].split()[0].lower(), r[1]): r[-2] for r in rows}
    assert identical[("restored", "image")] == "1" and identical[("corrupted", "image")] == "0", rows
