"""medvae.report: review figures, report files, and the review page in a real headless Chromium."""
from __future__ import annotations

import base64
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medvae.evaluate import evaluate_volumes, parse_window
from medvae.report import _display_transform, _orient, _pick_slices, review_figure, write_report

ROOT = Path(__file__).resolve().parents[1]
CT_FILE = Path("/work/shared/data/dev/nifti/invesalius_cranium_ct.nii.gz")
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not CT_FILE.is_file(), reason=f"dev data missing: {CT_FILE}")


@pytest.fixture(scope="module")
def case():
    """A real head CT, 8 slices, with noise + a dropped box ('corrupted'), a smoothed 'restoration',
    an uncertainty map and the box as damage mask."""
    from scipy.ndimage import gaussian_filter

    img = nib.load(CT_FILE)
    ref = img.get_fdata(dtype=np.float32)[:, :, 48:56]
    rng = np.random.RandomState(0)
    mask = np.zeros(ref.shape, bool)
    mask[100:140, 150:190, 2:6] = True
    corrupted = (ref + rng.normal(0, 80, ref.shape)).astype(np.float32)
    corrupted[mask] = -1000.0
    restored = gaussian_filter(corrupted, (1, 1, 0)).astype(np.float32)
    restored[mask] = gaussian_filter(ref, 2)[mask]
    unc = (np.abs(gaussian_filter(rng.normal(0, 1, ref.shape), 2)) * 20 + mask * 60).astype(np.float32)
    win = parse_window("ct")
    ev = evaluate_volumes(restored, ref, window=win, mask=mask, corrupted=corrupted, modality="CT")
    return dict(ref=ref, restored=restored, corrupted=corrupted, mask=mask, unc=unc, win=win, ev=ev, affine=img.affine)


@pytest.fixture(scope="module")
def report(case, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    paths = write_report(
        out, evaluation=case["ev"], restored=case["restored"], reference=case["ref"], corrupted=case["corrupted"],
        uncertainty=case["unc"], mask=case["mask"], window=case["win"], title="Head CT <test> & co",
        model_uri="runs:/abc/model", affine=case["affine"],
    )
    return out, paths


def _data(html: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', html, re.S).group(1))


def test_display_orientation_is_radiological():
    s = np.arange(12.0).reshape(3, 4)  # (X, Y)
    # RAS array: rows = Y (anterior up), columns = X with patient right on the left
    np.testing.assert_array_equal(_orient(s, _display_transform(np.eye(4))), s.T[::-1, ::-1])
    las = np.diag([-1.0, 1.0, 1.0, 1.0])  # X runs to the patient's left: no horizontal flip
    np.testing.assert_array_equal(_orient(s, _display_transform(las)), s.T[::-1, :])
    tf = _display_transform(np.diag([1.0, 2.0, 3.0, 1.0]))
    assert tf[3] == pytest.approx(2.0)  # row spacing / column spacing


def test_pick_slices_prefers_slices_with_anatomy():
    psnr = np.array([20.0, 30.0, np.nan, 25.0, 60.0])
    assert _pick_slices(psnr) == {"worst": 0, "median": 3, "best": 4}
    anatomy = np.array([True, True, True, True, False])  # slice 4: empty air above the head
    assert _pick_slices(psnr, anatomy) == {"worst": 0, "median": 3, "best": 1}
    assert _pick_slices(psnr, np.zeros(5, bool))["best"] == 4  # no candidates: all slices


def test_review_figure(case, tmp_path):
    k = 3
    sl = {p: case[p][:, :, k] for p in ("corrupted", "restored")}
    sl["reference"] = case["ref"][:, :, k]
    p = review_figure(sl, title="t", window=case["win"], path=tmp_path / "a.png")
    im4 = Image.open(p)
    sl["uncertainty"], sl["mask"] = case["unc"][:, :, k], case["mask"][:, :, k]
    p5 = review_figure(sl, title="t", window=case["win"], path=tmp_path / "b.png", affine=case["affine"])
    im5 = Image.open(p5)
    assert im5.width > im4.width > 2.5 * im4.height  # one row of 4 and of 5 panels
    assert np.asarray(im5.convert("L")).std() > 20


def test_write_report_files(report, case):
    out, paths = report
    ev, nz = case["ev"], case["ref"].shape[2]
    assert set(paths) == {"metrics_csv", "summary_json", "index_html", "figure_worst", "figure_median", "figure_best"}
    assert all(p.is_file() and p.parent == out for p in paths.values())
    rows = list(csv.DictReader(open(paths["metrics_csv"])))
    assert len(rows) == nz * 2 * 3  # slices x (restored, corrupted) x (image, mask, foreground)
    summary = json.loads(paths["summary_json"].read_text())
    assert summary["n_slices"] == nz and "7x7 uniform window" in summary["ssim_definition"]
    psnr = ev.per_slice("restored", "image", "psnr")
    assert paths["figure_worst"].name == f"slice_{int(np.argmin(psnr)):03d}_worst.png"
    assert paths["figure_best"].name == f"slice_{int(np.argmax(psnr)):03d}_best.png"
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())


def test_index_html_is_self_contained(report, case):
    out, paths = report
    html = paths["index_html"].read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and len(html) < 20_000_000
    # no network: no external URLs, stylesheets, fonts or scripts
    assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]", html.replace("http-equiv", ""), re.I)
    assert "<link" not in html and "@import" not in html and "url(" not in html and "<script src" not in html
    assert "default-src 'none'" in html  # CSP: the page cannot fetch anything even if it tried
    # viewer elements and the summary table
    assert '<input type="range" id="slice"' in html and 'id="slice-label"' in html and 'id="metrics"' in html
    for p in ("corrupted", "restored", "reference", "error", "uncertainty"):
        assert f'id="img-{p}"' in html
    assert "Head CT &lt;test&gt; &amp; co" in html and "<test>" not in html  # title escaped
    assert "7x7 uniform window" in html and "window -1000..1000" in html and "runs:/abc/model" in html
    d = _data(html)
    assert [s["k"] for s in d["slices"]] == list(range(case["ref"].shape[2]))
    s0 = d["slices"][3]
    assert set(s0["img"]) == {"corrupted", "restored", "reference", "error", "uncertainty", "mask"}
    png = base64.b64decode(s0["img"]["restored"].split(",", 1)[1])
    im = Image.open(io.BytesIO(png))
    assert im.format == "PNG" and im.size == (256, 256)
    assert s0["restored"]["psnr"] == pytest.approx(case["ev"].per_slice("restored", "image", "psnr")[3], abs=1e-5)
    assert "mask" not in d["slices"][0]["img"]  # no damage on slice 0: no contour image


def test_page_budget_subsamples_slices(case, tmp_path):
    paths = write_report(tmp_path, evaluation=case["ev"], restored=case["restored"], reference=case["ref"],
                         window=case["win"], title="t", max_bytes=200_000)
    html = paths["index_html"].read_text()
    ks = [s["k"] for s in _data(html)["slices"]]
    psnr = case["ev"].per_slice("restored", "image", "psnr")
    assert len(ks) < case["ref"].shape[2]
    assert {int(np.argmin(psnr)), int(np.argmax(psnr))} <= set(ks)
    assert "slice shown" in html


# ------------------------------------------------------------------ real browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                 "--hide-scrollbars"]
needs_chromium = pytest.mark.skipif(not CHROMIUM.is_file(), reason="chromium is not installed (apt-get install chromium chromium-driver)")


def _png_std(path: Path) -> float:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return float(np.asarray(im.convert("L"), dtype=np.float64).std())


@needs_chromium
def test_review_page_in_headless_chromium(report, tmp_path):
    assert CHROMEDRIVER.is_file(), "chromium is installed but chromedriver is not: apt-get install chromium-driver"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys
    except ImportError:  # pragma: no cover
        pytest.fail("selenium is missing: pip install -e '.[test]'")
    out, paths = report
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in [*CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1500,1000"]:
        opts.add_argument(a)
    # explicit driver path: Selenium Manager is never run (it would try to download a driver)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        driver.get(paths["index_html"].resolve().as_uri())
        label = driver.find_element(By.ID, "slice-label")
        slider = driver.find_element(By.ID, "slice")
        img = driver.find_element(By.ID, "img-restored")
        n = len(_data(paths["index_html"].read_text())["slices"])
        assert slider.get_attribute("max") == str(n - 1)
        # images decoded and shown at a readable size
        assert driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 256
        assert img.size["width"] >= 200 and img.size["height"] >= 200
        assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # no requests

        shot = tmp_path / "page.png"  # kept under tmp_path for inspection
        assert driver.save_screenshot(str(shot))
        assert _png_std(shot) > 25  # a rendered page with scans, not a blank one

        start = int(slider.get_attribute("value"))
        label0, src0 = label.text, img.get_attribute("src")
        assert f"Slice k = {start} /" in label0 and "PSNR" in label0 and "SSIM" in label0
        slider.send_keys(Keys.ARROW_RIGHT)  # keyboard on the focused slider
        assert int(slider.get_attribute("value")) == start + 1
        assert f"Slice k = {start + 1} /" in label.text and label.text != label0
        assert img.get_attribute("src") != src0

        driver.execute_script("document.activeElement.blur()")  # arrows also work page-wide
        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)
        assert int(slider.get_attribute("value")) == start
        assert f"Slice k = {start} /" in label.text and img.get_attribute("src") == src0

        driver.execute_script(  # set value + input event, as a mouse drag does
            "const s = document.getElementById('slice'); s.value = 0; s.dispatchEvent(new Event('input'));")
        assert label.text.startswith("Slice k = 0 /")
        assert img.get_attribute("src") == _data(paths["index_html"].read_text())["slices"][0]["img"]["restored"]
        assert not driver.find_element(By.ID, "mask-restored").is_displayed()  # slice 0 has no damage
        driver.execute_script(
            "const s = document.getElementById('slice'); s.value = 3; s.dispatchEvent(new Event('input'));")
        assert driver.find_element(By.ID, "mask-restored").is_displayed()
        errors = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert not errors, errors
    finally:
        driver.quit()


@needs_chromium
def test_screenshot_script(report, tmp_path):
    out, _ = report
    png = tmp_path / "shot.png"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "screenshot_report.py"), str(out), str(png),
                           "--width", "1200", "--height", "800"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(png) as im:
        assert im.size == (1200, 800)
    assert _png_std(png) > 25
