"""medvae.evaluate: PSNR/SSIM equal scikit-image's, regions, windows, refusals (real dev scans)."""
from __future__ import annotations

import csv
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from medvae.errors import MedvaeError
from medvae.evaluate import (
    SSIM_DEFINITION, WINDOWS, Window, apply_window, default_scaling, evaluate_scans, evaluate_volumes,
    foreground_mask, foreground_threshold, headline_region, parse_window, psnr, ssim, window_range,
)


@pytest.fixture(scope="module")
def ct(dev_ct_head):
    """A real head CT (HU), 6 slices through the brain, with a noisy + blurred 'restoration'."""
    ref = nib.load(dev_ct_head).get_fdata(dtype=np.float32)[:, :, 50:56]
    rng = np.random.RandomState(0)
    restored = (ref + rng.normal(0, 40, ref.shape)).astype(np.float32)
    corrupted = (ref + rng.normal(0, 120, ref.shape)).astype(np.float32)
    mask = np.zeros(ref.shape, bool)
    mask[90:150, 100:170, 1:4] = True  # damage only on slices 1..3
    return ref, restored, corrupted, mask


@pytest.fixture(scope="module")
def mr(dev_data):
    return nib.load(dev_data / "nifti/heudiconv_axasc35.nii.gz").get_fdata(dtype=np.float32)


# ------------------------------------------------------------------ windows
def test_parse_window_presets_and_numbers():
    assert parse_window("brain") == (0.0, 80.0)
    assert parse_window("BONE") == (-500.0, 1300.0)
    assert parse_window("ct") == (-1000.0, 1000.0)
    assert parse_window("lung") == (-1350.0, 150.0)
    assert parse_window("-600,1500") == (-1350.0, 150.0)
    assert parse_window(" 40 , 80 ") == (0.0, 80.0)
    assert parse_window((50, 400)) == (-150.0, 250.0)
    assert set(WINDOWS) >= {"brain", "subdural", "lung", "abdomen", "bone", "ct"}


@pytest.mark.parametrize("bad", ["bogus", "40", "40,80,3", "a,b", "40,0", "40,-5", "40,nan"])
def test_parse_window_rejects_and_names_the_value(bad):
    with pytest.raises(ValueError, match="bad window") as exc:
        parse_window(bad)
    assert repr(bad) in str(exc.value)


def test_window_presets_are_center_width_and_every_window_argument_takes_them(ct, dev_ct_head, tmp_path):
    # WINDOWS["brain"] is C 40 / W 80, i.e. 0..80 HU; it used to be the tuple (40, 80), which every
    # window= argument read as (lo, hi) and silently scored 40..80 HU
    brain = WINDOWS["brain"]
    assert isinstance(brain, Window) and (brain.center, brain.width) == (40.0, 80.0)
    assert brain.bounds == (0.0, 80.0)
    assert {k: w.bounds for k, w in WINDOWS.items()} == {k: parse_window(k) for k in WINDOWS}
    with pytest.raises(TypeError):
        lo, hi = brain  # noqa: F841  (a Window is never mistaken for a (lo, hi) pair)
    ref, restored, _, mask = ct
    a, b = ref[:, :, 3], restored[:, :, 3]
    expected_psnr, expected_ssim = psnr(a, b, window=(0.0, 80.0)), ssim(a, b, window=(0.0, 80.0))
    for w in (brain, "brain", "40,80", [0, 80], parse_window("brain")):
        assert window_range(w) == (0.0, 80.0)
        assert psnr(a, b, window=w) == expected_psnr and ssim(a, b, window=w) == expected_ssim
        np.testing.assert_array_equal(apply_window(a, w), apply_window(a, (0, 80)))
    assert psnr(a, b, window=(40, 80)) != expected_psnr  # a plain pair stays (lo, hi)
    ev = evaluate_volumes(restored, ref, window=brain, mask=mask, modality="CT")
    assert ev.summary["scaling"]["window"] == [0.0, 80.0]
    assert ev.summary["metrics"] == evaluate_volumes(restored, ref, window=(0, 80), mask=mask,
                                                     modality="CT").summary["metrics"]
    aff = nib.load(dev_ct_head).affine
    for name, v in (("ref", ref[:, :, :2]), ("rest", restored[:, :, :2])):
        nib.save(nib.Nifti1Image(v.astype(np.float32), aff), str(tmp_path / f"{name}.nii.gz"))
    for w in (brain, "brain"):
        res = evaluate_scans(tmp_path / "rest.nii.gz", tmp_path / "ref.nii.gz", window=w)
        assert res.window == (0.0, 80.0) and res.evaluation.summary["scaling"]["window"] == [0.0, 80.0]
        assert res.scaling_text == "window 0..80 HU, clipped and scaled to [0, 1], data range 1"


@pytest.mark.parametrize("bad", [(80, 40), (0, float("nan")), "bogus", (1, 2, 3), object()])
def test_bad_windows_are_refused_and_named(ct, bad):
    a = ct[0][:, :, 0]
    with pytest.raises(ValueError, match="bad window"):
        psnr(a, a, window=bad)
    with pytest.raises(ValueError, match="window width must be a positive number"):
        Window(40, 0)
    with pytest.raises(ValueError, match="too small .or large. for center 1e.20"):  # lo == hi after rounding
        Window(1e20, 1)


@pytest.mark.parametrize("window, why", [((-5e59, 5e59), "span under a millionth"), ((5000, 5100), "lie outside it"),
                                         ((0, 2e200), "span under a millionth")])
def test_a_window_that_leaves_the_reference_one_value_is_refused(ct, window, why):
    ref, restored, _, _ = ct
    # every slice then scored as identical to its reference (infinite PSNR), whatever the restoration
    with pytest.raises(MedvaeError, match=f"leaves the reference no contrast to score: its values .* {why}"):
        evaluate_volumes(restored, ref, window=window)
    assert evaluate_volumes(restored, ref, window=(-5e3, 5e3)).summary["metrics"]["restored"]["image"]["psnr"]["mean"] > 30


@pytest.mark.parametrize("spec, needle", [("nan,80", "the center must be a finite number"),
                                          ("40,nan", "the width must be a positive number"),
                                          ("40,-80", "the width must be a positive number")])
def test_a_bad_center_width_names_the_part_that_is_wrong(spec, needle):
    from medvae.intensity import parse_window

    with pytest.raises(ValueError, match=needle):  # "nan,80" once blamed the width
        parse_window(spec)
    with pytest.raises(ValueError, match=needle.replace("the ", "window ")):
        Window(*map(float, spec.split(",")))


# ------------------------------------------------------------------ 2-D metrics vs scikit-image
def test_psnr_ssim_equal_skimage_raw(ct):
    ref, restored, _, _ = ct
    for k in range(ref.shape[2]):
        a, b = ref[:, :, k].astype(np.float64), restored[:, :, k].astype(np.float64)
        assert np.isclose(psnr(a, b, data_range=4000.0), sk_psnr(a, b, data_range=4000.0), rtol=1e-12, atol=0)
        assert np.isclose(ssim(a, b, data_range=4000.0), sk_ssim(a, b, data_range=4000.0), rtol=1e-12, atol=0)
    # float32 inputs: skimage computes SSIM in float32, medvae in float64
    a, b = ref[:, :, 2], restored[:, :, 2]
    assert np.isclose(psnr(a, b, data_range=4000.0), sk_psnr(a, b, data_range=4000.0), rtol=1e-6)
    assert np.isclose(ssim(a, b, data_range=4000.0), sk_ssim(a, b, data_range=4000.0), rtol=0, atol=1e-5)


def test_window_clips_and_scales(ct):
    ref, restored, _, _ = ct
    lo, hi = parse_window("brain")
    a, b = ref[:, :, 3], restored[:, :, 3]
    wa = (np.clip(a.astype(np.float64), lo, hi) - lo) / (hi - lo)
    wb = (np.clip(b.astype(np.float64), lo, hi) - lo) / (hi - lo)
    assert wa.min() == 0 and wa.max() == 1
    np.testing.assert_array_equal(apply_window(a, (lo, hi)), wa)
    assert np.isclose(psnr(a, b, window=(lo, hi)), sk_psnr(wa, wb, data_range=1.0), rtol=1e-12)
    assert np.isclose(ssim(a, b, window=(lo, hi)), sk_ssim(wa, wb, data_range=1.0), rtol=1e-12)
    # values outside the window (bone > 80 HU in both images) do not count
    b2 = b.copy()
    both_above = (a > hi + 1) & (b > hi + 1)
    assert both_above.sum() > 100
    b2[both_above] += 700.0
    assert psnr(a, b2, window=(lo, hi)) == psnr(a, b, window=(lo, hi))
    assert psnr(a, b2, data_range=4000.0) < psnr(a, b, data_range=4000.0)


def test_region_psnr_is_mse_over_mask_pixels(ct):
    ref, restored, _, mask = ct
    a, b, m = ref[:, :, 2].astype(np.float64), restored[:, :, 2].astype(np.float64), mask[:, :, 2]
    by_hand = 10 * np.log10(4000.0 ** 2 / np.mean((a[m] - b[m]) ** 2))
    assert np.isclose(psnr(a, b, data_range=4000.0, mask=m), by_hand, rtol=1e-12)
    assert np.isclose(psnr(a, b, data_range=4000.0, mask=m), sk_psnr(a[m], b[m], data_range=4000.0), rtol=1e-12)
    # SSIM: skimage's full map averaged over the mask (inside the 3-px border)
    _, smap = sk_ssim(a, b, data_range=4000.0, full=True)
    assert np.isclose(ssim(a, b, data_range=4000.0, mask=m), smap[m].mean(), rtol=1e-12)
    border = np.zeros_like(m)
    border[:3, :] = True
    assert math.isnan(ssim(a, b, data_range=4000.0, mask=border))  # only border pixels: nothing to average
    assert math.isnan(psnr(a, b, data_range=4000.0, mask=np.zeros_like(m)))


def test_refuses_missing_or_double_scaling(ct):
    ref, restored, _, _ = ct
    a, b = ref[:, :, 0], restored[:, :, 0]
    with pytest.raises(ValueError, match="exactly one of data_range"):
        psnr(a, b)
    with pytest.raises(ValueError, match="exactly one of data_range"):
        ssim(a, b, data_range=1.0, window=(0, 80))
    with pytest.raises(ValueError, match="exactly one of data_range"):
        evaluate_volumes(restored, ref)
    with pytest.raises(ValueError, match="data_range"):
        psnr(a, b, data_range=0)
    with pytest.raises(ValueError, match="^bad data_range 'abc': must be a positive number$"):  # named no argument
        ssim(a, b, data_range="abc")
    with pytest.raises(ValueError, match="^bad data_range True: must be a positive number, not a bool$"):
        psnr(a, b, data_range=True)  # scored with a range of 1
    # R² out of float64's range scored every slice as identical (PSNR inf) and the summary was empty
    with pytest.raises(ValueError, match="bad data_range 1e-300: too small to score"):
        evaluate_volumes(restored, ref, data_range=1e-300)
    with pytest.raises(ValueError, match="bad data_range 1e.200: too large to score"):
        psnr(a, b, data_range=1e200)
    with pytest.raises(ValueError, match="bad data_range 1e.80: too large"):  # SSIM's R⁴ overflowed: no slice scored
        evaluate_volumes(restored, ref, data_range=1e80)


def test_identical_images():
    a = np.random.RandomState(1).rand(32, 32)
    assert psnr(a, a, data_range=1.0) == math.inf
    assert ssim(a, a, data_range=1.0) == pytest.approx(1.0)


# ------------------------------------------------------------------ volumes
def test_shape_mismatch_names_both_shapes(ct):
    ref, restored, _, mask = ct
    with pytest.raises(MedvaeError, match=r"restored has shape \(256, 256, 5\) but reference has shape \(256, 256, 6\)"):
        evaluate_volumes(restored[:, :, :5], ref, data_range=4000.0)
    with pytest.raises(MedvaeError, match=r"mask has shape"):
        evaluate_volumes(restored, ref, data_range=4000.0, mask=mask[:, :128])


def test_nan_input_is_refused(ct):
    ref, restored, _, _ = ct
    bad = restored.copy()
    bad[10, 10, 1] = np.nan
    with pytest.raises(MedvaeError, match="1 of .* voxels are NaN or infinite in restored"):
        evaluate_volumes(bad, ref, data_range=4000.0)
    with pytest.raises(MedvaeError, match="NaN or infinite in reference"):
        evaluate_volumes(ref, bad, data_range=4000.0)


def test_evaluate_volumes_rows_summary_and_regions(ct, tmp_path):
    ref, restored, corrupted, mask = ct
    win = parse_window("ct")
    ev = evaluate_volumes(restored, ref, window=win, mask=mask, corrupted=corrupted, modality="CT")
    nz = ref.shape[2]
    assert len(ev.rows) == nz * 2 * 3  # slices x sources x regions
    s = ev.summary
    assert s["n_slices"] == nz and s["scaling"]["window"] == [-1000.0, 1000.0] and s["scaling"]["range_used"] == 1.0
    assert s["ssim_definition"] == SSIM_DEFINITION and "7x7 uniform window" in SSIM_DEFINITION
    assert set(s["regions"]) == {"image", "mask", "foreground"} and s["sources"] == ["restored", "corrupted"]
    assert s["metrics"]["restored"]["image"]["psnr"]["n_identical"] == 0

    # per-slice numbers are the 2-D functions' (and so skimage's)
    for k in (0, 2):
        a, b = ref[:, :, k], restored[:, :, k]
        assert np.isclose(ev.per_slice("restored", "image", "psnr")[k],
                          sk_psnr(apply_window(a, win), apply_window(b, win), data_range=1.0), rtol=1e-12)
        assert np.isclose(ev.per_slice("restored", "image", "ssim")[k],
                          sk_ssim(apply_window(a, win), apply_window(b, win), data_range=1.0), rtol=1e-12)
        assert np.isclose(ev.per_slice("corrupted", "image", "ssim")[k],
                          ssim(a, corrupted[:, :, k], window=win), rtol=1e-12)
    # the mask region is empty on slices 0, 4, 5: NaN there, and left out of the summary
    mp = ev.per_slice("restored", "mask", "psnr")
    assert np.isnan(mp[[0, 4, 5]]).all() and np.isfinite(mp[1:4]).all()
    assert np.isclose(mp[2], psnr(ref[:, :, 2], restored[:, :, 2], window=win, mask=mask[:, :, 2]), rtol=1e-12)
    st = s["metrics"]["restored"]["mask"]["psnr"]
    assert st["n_slices"] == 3 and np.isclose(st["mean"], np.mean(mp[1:4])) and np.isclose(st["min"], np.min(mp[1:4]))
    assert s["metrics"]["restored"]["image"]["ssim"]["n_slices"] == nz
    # restoration (sigma 40) beats the corrupted input (sigma 120)
    assert s["metrics"]["restored"]["image"]["psnr"]["mean"] > s["metrics"]["corrupted"]["image"]["psnr"]["mean"] + 5
    fg = [r for r in ev.rows if r["region"] == "foreground"]
    assert all(0 < r["n_pixels"] < ref.shape[0] * ref.shape[1] for r in fg)

    # files
    ev.write_csv(tmp_path / "m.csv")
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert len(rows) == nz * 2 * 3 and set(rows[0]) == {"slice", "source", "region", "n_pixels", "psnr", "ssim"}
    assert rows[0]["slice"] == "0" and rows[0]["source"] == "restored" and rows[0]["region"] == "image"
    assert float(rows[0]["psnr"]) == ev.rows[0]["psnr"]
    assert any(r["psnr"] == "" for r in rows if r["region"] == "mask")  # empty region -> empty cell
    ev.write_json(tmp_path / "s.json")
    text = (tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text)
    assert back["metrics"]["restored"]["image"]["psnr"]["mean"] == pytest.approx(s["metrics"]["restored"]["image"]["psnr"]["mean"])


def test_regions_that_would_score_nothing_and_inputs_that_are_not_real_are_refused(ct):
    ref, restored, _, _ = ct
    # no mask but region "mask" by name, or no region: once an evaluation of no rows, headline "image"
    with pytest.raises(ValueError, match="region 'mask' needs a mask"):
        evaluate_volumes(restored, ref, data_range=4000.0, regions=["mask"])
    with pytest.raises(ValueError, match="regions is empty"):
        evaluate_volumes(restored, ref, data_range=4000.0, regions=[])
    with pytest.raises(MedvaeError, match="reference has data type complex64; medvae works on real numbers"):
        psnr(ref[:, :, 0] + 1j, ref[:, :, 0] + 0j, data_range=4000.0)  # once inf: the imaginary part dropped
    with pytest.raises(MedvaeError, match="object; a mask is numbers or booleans"):
        evaluate_volumes(restored, ref, data_range=4000.0, mask=np.zeros(ref.shape, object))
    with pytest.raises(MedvaeError, match="modality must be CT, MR or None, not 'PET'"):
        foreground_mask(ref, "PET")
    # foreground_mask once gave an IndexError for 1-D, a mask for 4-D, and thresholded around a NaN
    for bad, needle in ((ref[:, 0, 0], "2-D slice or a 3-D volume, not shape"),
                        (ref[..., None], "2-D slice or a 3-D volume, not shape"),
                        (np.where(ref == ref.max(), np.nan, ref), "are NaN or infinite in reference")):
        with pytest.raises(MedvaeError, match=needle):
            foreground_mask(bad, "CT")
    # one region by name is that region (it was read letter by letter: "unknown region(s) ['a', 'e', ...")
    assert {r["region"] for r in evaluate_volumes(restored, ref, data_range=4000.0, regions="image").rows} == {"image"}


def test_the_default_mr_window_is_the_exact_percentiles_of_every_voxel():
    # above 4 M voxels it came from a strided sample: 8058 for a true 99.5th percentile of 8052
    vol = np.random.default_rng(0).gamma(2.0, 1000.0, (182, 218, 110)).astype(np.float32)
    assert vol.size > 4_000_000
    lo, hi = default_scaling(vol, "MR")["window"]
    assert (lo, hi) == tuple(float(v) for v in np.percentile(vol, (0.5, 99.5)))


def test_evaluate_raw_data_range_and_region_subset(ct):
    ref, restored, _, _ = ct
    ev = evaluate_volumes(restored, ref, data_range=4000.0, regions=["image"])
    assert len(ev.rows) == ref.shape[2]
    assert ev.summary["scaling"] == {"window": None, "data_range": 4000.0, "range_used": 4000.0,
                                     "description": "raw values, data_range 4000"}
    k = 4
    assert np.isclose(ev.rows[k]["ssim"], sk_ssim(ref[:, :, k].astype(np.float64), restored[:, :, k].astype(np.float64),
                                                 data_range=4000.0), rtol=1e-12)
    assert set(ev.flat_metrics()) == {"restored.image.psnr_mean", "restored.image.ssim_mean", "psnr_image",
                                      "ssim_image", "restored.image.psnr_n_identical", "image.n_slices_used",
                                      "image.n_slices_left_out"}
    assert ev.summary["restored_minus"] == {}  # no other source to pair with


def test_identical_slices_are_counted_and_left_out_of_psnr_and_ssim_means(ct, tmp_path):
    """The README's brain-window case: noise only in the air (< 0 HU) makes slices identical after
    clipping to 0..80 HU; they are counted and left out of both metrics' statistics (their infinite
    PSNR is never averaged or written, their SSIM of 1 never inflates the SSIM mean)."""
    ref = ct[0][:, :, :4]
    rng = np.random.RandomState(5)
    restored = ref.copy()
    air = ref < -900
    restored[air] += rng.normal(0, 20, ref.shape)[air].astype(np.float32)  # stays far below 0 HU
    restored[:, :, :2] += rng.normal(0, 5, (ref.shape[0], ref.shape[1], 2)).astype(np.float32) * (ref[:, :, :2] > 0)
    win = parse_window("brain")
    ev = evaluate_volumes(restored, ref, window=win, regions=["image"])
    per = ev.per_slice("restored", "image", "psnr")
    assert np.isfinite(per[:2]).all() and np.isinf(per[2:]).all()  # slices 2, 3 identical in the window
    st = ev.summary["metrics"]["restored"]["image"]["psnr"]
    assert st["n_identical"] == 2 and st["n_slices"] == 2
    assert st["mean"] == pytest.approx(np.mean(per[:2])) and st["max"] == pytest.approx(np.max(per[:2]))
    sst = ev.summary["metrics"]["restored"]["image"]["ssim"]
    assert sst["n_slices"] == 2 and sst["n_left_out_identical"] == 2
    assert sst["mean"] == pytest.approx(np.mean(ev.per_slice("restored", "image", "ssim")[:2])) and sst["mean"] < 1
    assert ev.summary["slice_sets"]["image"]["left_out_identical"] == [2, 3]
    assert ev.flat_metrics()["restored.image.psnr_n_identical"] == 2.0
    assert ev.flat_metrics()["psnr_image"] == pytest.approx(np.mean(per[:2]))
    text = ev.write_json(tmp_path / "s.json").read_text()
    assert not re.search(r'"inf"|Infinity|NaN', text)
    back = json.loads(text)["metrics"]["restored"]["image"]["psnr"]
    assert back["n_identical"] == 2 and back["mean"] == pytest.approx(st["mean"])
    # every slice identical: no mean at all (null in JSON), all counted
    ev = evaluate_volumes(ref, ref, window=win, regions=["image"])
    st = ev.summary["metrics"]["restored"]["image"]["psnr"]
    assert st["n_identical"] == 4 and st["n_slices"] == 0 and math.isnan(st["mean"])
    assert "psnr_image" not in ev.flat_metrics()  # MLflow gets finite values only
    assert json.loads(ev.write_json(tmp_path / "t.json").read_text())["metrics"]["restored"]["image"]["psnr"]["mean"] is None
    sst = ev.summary["metrics"]["restored"]["image"]["ssim"]
    assert sst["n_slices"] == 0 and sst["n_left_out"] == 4 and math.isnan(sst["mean"])
    assert len(ev.rows) == 4 and ev.rows[0]["ssim"] == pytest.approx(1.0)  # the per-slice table keeps them


def test_summary_uses_one_common_slice_set_for_all_sources():
    """The audit's case: restored is identical on slice 0 and better on slice 1. Every source and both
    metrics are summarized over slice 1 only, so the summary ranks them as the slices do."""
    rng = np.random.default_rng(0)
    ref = rng.random((64, 64, 2))
    res, cor = ref.copy(), ref.copy()
    res[:, :, 1] += rng.normal(0, 10 ** (-26 / 20), (64, 64))
    cor[:, :, 0] += rng.normal(0, 10 ** (-45 / 20), (64, 64))
    cor[:, :, 1] += rng.normal(0, 10 ** (-25 / 20), (64, 64))
    ev = evaluate_volumes(res, ref, data_range=1.0, corrupted=cor, regions=["image"])
    rp, cp = ev.per_slice("restored", "image", "psnr"), ev.per_slice("corrupted", "image", "psnr")
    rs, cs = ev.per_slice("restored", "image", "ssim"), ev.per_slice("corrupted", "image", "ssim")
    assert rp[0] == math.inf and np.all(rp >= cp) and np.all(rs >= cs)  # restored at least as good everywhere
    assert len(ev.rows) == 4  # the table keeps every slice
    m = ev.summary["metrics"]
    # the summary ranks the sources as every slice does
    assert m["restored"]["image"]["psnr"]["mean"] > m["corrupted"]["image"]["psnr"]["mean"]
    assert m["restored"]["image"]["ssim"]["mean"] > m["corrupted"]["image"]["ssim"]["mean"]
    for src, per in (("restored", {"psnr": rp, "ssim": rs}), ("corrupted", {"psnr": cp, "ssim": cs})):
        for metric in ("psnr", "ssim"):
            st = m[src]["image"][metric]
            assert st["n_slices"] == 1 and st["mean"] == pytest.approx(per[metric][1])
            assert (st["n_left_out"], st["n_left_out_identical"], st["n_left_out_empty"]) == (1, 1, 0)
    assert m["restored"]["image"]["psnr"]["n_identical"] == 1 and m["corrupted"]["image"]["psnr"]["n_identical"] == 0
    sets = ev.summary["slice_sets"]["image"]
    assert sets["left_out_identical"] == [0] and sets["left_out_empty"] == [] and sets["n_slices"] == 1
    assert sets["identical_by_source"] == {"restored": [0], "corrupted": []}
    diff = ev.summary["restored_minus"]["corrupted"]["image"]
    assert diff["psnr"]["n_slices"] == 1 and diff["psnr"]["mean"] == pytest.approx(rp[1] - cp[1]) and diff["psnr"]["mean"] > 0
    assert diff["ssim"]["mean"] == pytest.approx(rs[1] - cs[1])
    flat = ev.flat_metrics()
    assert flat["image.n_slices_used"] == 1.0 and flat["image.n_slices_left_out"] == 1.0
    assert flat["restored_minus_corrupted.image.psnr_mean"] == pytest.approx(rp[1] - cp[1])
    assert flat["psnr_image"] > flat["corrupted.image.psnr_mean"]

    # a third source identical on another slice: that slice goes for everyone too
    base = ref + rng.normal(0, 0.05, ref.shape)
    ref3, res3, cor3 = (np.concatenate([a, a[:, :, 1:]], axis=2) for a in (ref, res, cor))
    base3 = np.concatenate([base, ref[:, :, 1:]], axis=2)  # baseline identical on slice 2
    ev3 = evaluate_volumes(res3, ref3, data_range=1.0, corrupted=cor3, baseline=base3, regions=["image"])
    assert ev3.summary["slice_sets"]["image"]["left_out_identical"] == [0, 2]
    for src in ("restored", "baseline", "corrupted"):
        for metric in ("psnr", "ssim"):
            st = ev3.summary["metrics"][src]["image"][metric]
            assert st["n_slices"] == 1 and st["mean"] == pytest.approx(ev3.per_slice(src, "image", metric)[1])
    assert [ev3.summary["metrics"][s]["image"]["psnr"]["n_identical"] for s in ("restored", "baseline", "corrupted")] == [1, 1, 0]


def test_mask_region_empty_on_some_slices_is_left_out_for_every_source_and_metric(tmp_path):
    """Slice 0 has no mask pixel, slice 3 only border pixels (PSNR defined, SSIM not): both are left
    out of the mask summary for PSNR and SSIM alike; restored equals the reference inside the mask on
    slice 2, which leaves that slice out of the mask summary only, not out of the image summary."""
    rng = np.random.default_rng(3)
    ref = rng.random((32, 32, 4))
    res = ref + rng.normal(0, 0.01, ref.shape)
    cor = ref + rng.normal(0, 0.1, ref.shape)
    mask = np.zeros(ref.shape, bool)
    mask[10:20, 10:20, 1:3] = True
    mask[0:2, :, 3] = True  # within 3 px of the border only
    res[:, :, 2][mask[:, :, 2]] = ref[:, :, 2][mask[:, :, 2]]
    ev = evaluate_volumes(res, ref, data_range=1.0, mask=mask, corrupted=cor, regions=["image", "mask"])
    assert np.isnan(ev.per_slice("restored", "mask", "psnr")[0]) and np.isfinite(ev.per_slice("corrupted", "mask", "psnr")[3])
    assert np.isnan(ev.per_slice("corrupted", "mask", "ssim")[3])
    for src in ("restored", "corrupted"):
        for metric in ("psnr", "ssim"):
            st = ev.summary["metrics"][src]["mask"][metric]
            assert st["n_slices"] == 1 and st["mean"] == pytest.approx(ev.per_slice(src, "mask", metric)[1])
            assert (st["n_left_out_empty"], st["n_left_out_identical"], st["n_left_out"]) == (2, 1, 3)
            img = ev.summary["metrics"][src]["image"][metric]
            assert img["n_slices"] == 4 and img["mean"] == pytest.approx(np.mean(ev.per_slice(src, "image", metric)))
    sets = ev.summary["slice_sets"]
    assert sets["mask"]["left_out_empty"] == [0, 3] and sets["mask"]["left_out_identical"] == [2]
    assert sets["mask"]["n_slices"] == 1 and sets["image"]["n_slices"] == 4 and sets["image"]["n_left_out"] == 0
    back = json.loads(ev.write_json(tmp_path / "s.json").read_text())
    assert back["slice_sets"]["mask"]["left_out_empty"] == [0, 3]
    assert back["restored_minus"]["corrupted"]["mask"]["psnr"]["n_slices"] == 1


def test_baseline_source_and_headline_region(ct):
    ref, restored, corrupted, mask = ct
    base = (ref + np.random.RandomState(7).normal(0, 80, ref.shape)).astype(np.float32)
    win = parse_window("ct")
    ev = evaluate_volumes(restored, ref, window=win, mask=mask, baseline=base, corrupted=corrupted, modality="CT")
    assert ev.summary["sources"] == ["restored", "baseline", "corrupted"]
    assert ev.summary["headline"] == {"metric": "psnr", "region": "mask"} and headline_region(ev.summary) == "mask"
    assert np.isclose(ev.per_slice("baseline", "mask", "psnr")[2],
                      psnr(ref[:, :, 2], base[:, :, 2], window=win, mask=mask[:, :, 2]), rtol=1e-12)
    b = ev.summary["metrics"]["baseline"]["image"]["psnr"]["mean"]
    assert ev.summary["metrics"]["restored"]["image"]["psnr"]["mean"] > b > ev.summary["metrics"]["corrupted"]["image"]["psnr"]["mean"]
    assert ev.flat_metrics()["psnr_mask"] == ev.summary["metrics"]["restored"]["mask"]["psnr"]["mean"]
    assert "baseline.mask.psnr_mean" in ev.flat_metrics()
    assert evaluate_volumes(restored, ref, window=win).summary["headline"]["region"] == "image"
    # the noise mask `medvae corrupt` writes (all ones; for a padded CT all but the padding): every pixel
    # was restored, so the headline is the image (it was "mask", and the page picked slices by it)
    noise = np.ones(ref.shape, bool)
    ev = evaluate_volumes(restored, ref, window=win, mask=noise, modality="MR")
    assert ev.summary["headline"]["region"] == "image" == headline_region(ev.summary)
    padded = ref.copy()
    padded[:8] = -3024.0  # padding outside the field of view, left out of a CT noise mask
    ev = evaluate_volumes(restored, padded, window=win, mask=padded > -2000, modality="CT")
    assert ev.summary["headline"]["region"] == "image" and "mask" in ev.summary["regions"]
    assert evaluate_volumes(restored, padded, window=win, mask=padded > -2000,
                            modality="MR").summary["headline"]["region"] == "mask"  # only CT has such padding
    for regions, region in ((["mask"], "mask"), (["foreground"], "foreground")):  # the headline is one computed
        ev = evaluate_volumes(restored, ref, window=win, mask=noise, modality="MR", regions=regions)
        assert ev.summary["headline"]["region"] == region and len(ev.per_slice("restored", region, "psnr")) == 6


def test_evaluate_scans_reads_checks_and_scores_files(ct, dev_ct_head, tmp_path):
    ref, restored, corrupted, mask = ct
    aff = nib.load(dev_ct_head).affine
    for name, a in (("ref", ref), ("rest", restored), ("base", corrupted), ("mask", mask.astype(np.float32))):
        nib.save(nib.Nifti1Image(a.astype(np.float32), aff), str(tmp_path / f"{name}.nii.gz"))
    res = evaluate_scans(tmp_path / "rest.nii.gz", tmp_path / "ref.nii.gz", mask=tmp_path / "mask.nii.gz",
                         baseline=tmp_path / "base.nii.gz", window=parse_window("brain"))
    assert res.modality == "CT" and res.units == "HU" and res.scaling_source == "--window"
    assert res.scaling_text == "window 0..80 HU, clipped and scaled to [0, 1], data range 1"
    assert res.evaluation.summary["sources"] == ["restored", "baseline"] and res.array("corrupted") is None
    direct = evaluate_volumes(restored, ref, window=(0, 80), mask=mask, baseline=corrupted, modality="CT")
    assert res.evaluation.summary["metrics"] == direct.summary["metrics"]
    moved = aff.copy()
    moved[0, 3] += 3.0
    nib.save(nib.Nifti1Image(corrupted, moved), str(tmp_path / "moved.nii.gz"))
    with pytest.raises(MedvaeError, match="baseline is not in the reference's geometry") as exc:
        evaluate_scans(tmp_path / "rest.nii.gz", tmp_path / "ref.nii.gz", baseline=tmp_path / "moved.nii.gz")
    assert str(tmp_path / "moved.nii.gz") in str(exc.value)
    default = evaluate_scans(tmp_path / "rest.nii.gz", tmp_path / "ref.nii.gz")
    assert default.window == (-1000.0, 1000.0) and default.scaling_source.startswith("CT default")


def test_small_slices_are_refused():
    a = np.zeros((5, 40, 2), np.float32)
    with pytest.raises(MedvaeError, match="smaller than the 7x7 SSIM window"):
        evaluate_volumes(a, a, data_range=1.0)


def test_empty_slices_and_volumes_are_refused_not_scored_nan():
    with pytest.raises(MedvaeError, match=r"the slices are empty \(shape \(0, 5\)\)"):
        psnr(np.zeros((0, 5)), np.zeros((0, 5)), data_range=1.0)
    e = np.zeros((16, 16, 0), np.float32)
    with pytest.raises(MedvaeError, match=r"the reference is empty \(shape \(16, 16, 0\)\)"):
        evaluate_volumes(e, e, data_range=1.0)


# ------------------------------------------------------------------ foreground and defaults
def test_foreground_rules(ct, mr):
    ref = ct[0]
    assert foreground_threshold(ref, "CT") == -500.0
    fg = foreground_mask(ref, "CT")
    assert fg.shape == ref.shape and fg.dtype == bool
    frac = fg.mean()
    assert 0.2 < frac < 0.8  # a head in a 256x256 field of view
    assert not fg[0, 0, :].any()  # corner air
    assert fg[128, 128, :].all()  # the brain
    t = foreground_threshold(mr, "MR")
    assert t == pytest.approx(0.1 * np.percentile(mr, 99.5))
    fgm = foreground_mask(mr, "MR")
    assert 0.05 < fgm.mean() < 0.9
    assert fgm[(mr > 2 * t)].mean() > 0.99  # bright tissue is foreground (only specks are removed)
    speck = np.zeros((64, 64), np.float32)
    speck[10, 10] = speck[40:50, 40:50] = 1000.0
    fgs = foreground_mask(speck, "MR")
    assert not fgs[10, 10] and fgs[40:50, 40:50].all() and fgs.sum() == 100


def test_default_scaling(ct, mr):
    d = default_scaling(ct[0], "CT")
    assert d["window"] == (-1000.0, 1000.0) and d["data_range"] is None and "CT default" in d["source"]
    d = default_scaling(mr, "MR")
    lo, hi = np.percentile(mr, (0.5, 99.5))
    assert d["window"] == pytest.approx((lo, hi)) and "0.5-99.5 percentiles" in d["source"]
    ev = evaluate_volumes(mr * 1.01, mr, window=d["window"], modality="MR")
    assert ev.summary["scaling"]["range_used"] == 1.0



def test_a_constant_reference_has_no_default_window(tmp_path):
    """A uniform phantom (percentiles 500 and 500) was scored in a window 500..501 called the percentiles:
    3.5 dB for noise of 1 %, where scikit-image with the phantom's range gives 39.9 dB."""
    from medvae.evaluate import evaluate_scans

    ref = np.full((64, 64, 3), 500.0, np.float32)
    noisy = ref + np.random.default_rng(0).normal(0, 5, ref.shape).astype(np.float32)
    for name, vol in (("ref.nii.gz", ref), ("res.nii.gz", noisy)):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / name)
    with pytest.raises(MedvaeError, match=r"ref\.nii\.gz: no default window for this reference: its 0\.5 and 99\.5 "
                                          r"percentiles are both 500, .*give --window or --data-range"):
        evaluate_scans(tmp_path / "res.nii.gz", tmp_path / "ref.nii.gz", modality="MR")
    res = evaluate_scans(tmp_path / "res.nii.gz", tmp_path / "ref.nii.gz", modality="MR", data_range=500.0)
    psnr = res.evaluation.summary["metrics"]["restored"]["image"]["psnr"]["mean"]
    expected = np.mean([sk_psnr(ref[..., k], noisy[..., k], data_range=500.0) for k in range(3)])
    assert psnr == pytest.approx(expected, abs=1e-6) and psnr > 39
    assert res.display_window == (500.0, 501.0)  # the images are still shown


# ------------------------------------------------------------------ audit: bad inputs are refused
def test_2d_metrics_refuse_nonfinite_images_and_masks(ct):
    ref, restored = ct[0][:, :, 2], ct[1][:, :, 2]
    nan, inf = restored.copy(), restored.copy()
    nan[20, 20], inf[20, 20] = np.nan, np.inf
    mask = np.zeros(ref.shape, np.float32)
    mask[100:140, 100:140] = 1
    mask[0, 0] = np.nan  # NaN != 0 must not silently count as a region pixel
    for metric in (psnr, ssim):
        with pytest.raises(MedvaeError, match="NaN or infinite in image"):
            metric(ref, nan, data_range=4000.0)
        with pytest.raises(MedvaeError, match="NaN or infinite in reference"):
            metric(inf, restored, window="brain")
        with pytest.raises(MedvaeError, match="NaN or infinite in the mask"):
            metric(ref, restored, data_range=4000.0, mask=mask)


def test_evaluate_scans_refuses_4d_nifti_instead_of_scoring_volume_0(ct, dev_ct_head, tmp_path):
    ref, restored = ct[0], ct[1]
    aff = nib.load(dev_ct_head).affine
    nib.save(nib.Nifti1Image(ref, aff), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(np.stack([restored, ref], -1), aff), str(tmp_path / "rest4d.nii.gz"))
    with pytest.raises(MedvaeError, match="4-D NIfTI with 2 volumes") as exc:
        evaluate_scans(tmp_path / "rest4d.nii.gz", tmp_path / "ref.nii.gz", window="brain")
    assert str(tmp_path / "rest4d.nii.gz") in str(exc.value)


def test_evaluate_scans_small_slices_error_names_the_file(tmp_path):
    a = np.random.default_rng(0).random((5, 40, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(a, np.eye(4)), str(tmp_path / "thin.nii.gz"))
    nib.save(nib.Nifti1Image(a + 0.1, np.eye(4)), str(tmp_path / "thin_restored.nii.gz"))
    with pytest.raises(MedvaeError, match="smaller than the 7x7 SSIM window") as exc:
        evaluate_scans(tmp_path / "thin_restored.nii.gz", tmp_path / "thin.nii.gz", data_range=1.0)
    assert "thin.nii.gz" in str(exc.value)


def test_same_grid_in_another_voxel_order_is_refused_and_explained(ct, dev_ct_head, tmp_path):
    # what a DICOM series and a NIfTI file of the same scan look like: k reversed, world positions equal
    ref = ct[0]
    aff = nib.load(dev_ct_head).affine
    rev = aff @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, ref.shape[2] - 1], [0, 0, 0, 1]], float)
    nib.save(nib.Nifti1Image(ref, aff), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(ref[:, :, ::-1].copy(), rev), str(tmp_path / "rev.nii.gz"))
    with pytest.raises(MedvaeError, match=r"same voxel grid in another voxel order \(LAI vs the reference's LAS\)"):
        evaluate_scans(tmp_path / "rev.nii.gz", tmp_path / "ref.nii.gz", window="brain")


def test_slightly_different_spacing_is_refused_not_compared_voxel_to_voxel(ct, dev_ct_head, tmp_path):
    ref, restored = ct[0], ct[1]
    aff = nib.load(dev_ct_head).affine
    near = aff.copy()
    near[0, 0] += np.sign(aff[0, 0]) * 0.008  # every entry within 0.01, but 2 mm off at the far edge
    nib.save(nib.Nifti1Image(ref, aff), str(tmp_path / "ref.nii.gz"))
    nib.save(nib.Nifti1Image(restored, near), str(tmp_path / "near.nii.gz"))
    with pytest.raises(MedvaeError, match="not in the reference's geometry.*voxels lie up to 2.04 mm"):
        evaluate_scans(tmp_path / "near.nii.gz", tmp_path / "ref.nii.gz", window="brain")


def test_shape_errors_name_the_shapes_as_passed_and_are_medvae_errors(ct):
    ref = ct[0][:, :, :2]
    with pytest.raises(MedvaeError, match=r"mask has shape \(\d+, \d+\) but reference has shape \(\d+, \d+, 2\)"):
        evaluate_volumes(ref, ref, data_range=100, mask=np.ones(ref.shape[:2]))  # it said (X, Y, 1)
    with pytest.raises(MedvaeError, match="expected 2-D slices.*evaluate_volumes scores"):
        psnr(ref, ref + 1, data_range=100)
