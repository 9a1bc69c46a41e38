"""benchmarks/common.py and scripts/bench_quality.py: metric regions, windows, seeds, slice selection, the
"medvae minus the best baseline" verdicts, and an end-to-end run on tiny volumes with a tiny model."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from benchmarks import common as bench
from medvae.intensity import IntensityPolicy
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
from medvae.models.vae import MaskedVAE, VAEConfig

ROOT = Path(__file__).resolve().parents[1]


# -- metric regions ---------------------------------------------------------------------------------
def test_mask_psnr_is_the_mse_over_the_mask_only():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.2, 0.8, (32, 40))
    img = ref.copy()
    mask = np.zeros(ref.shape, bool)
    mask[4:12, 5:25] = True
    img[mask] += rng.normal(0, 0.05, int(mask.sum()))
    img[~mask] += 0.01                       # a small error outside the mask
    s = bench.score(ref, img, mask)
    mse_mask = np.mean((ref[mask] - img[mask]) ** 2)
    mse_all = np.mean((ref - img) ** 2)
    assert s["psnr_mask"] == pytest.approx(10 * math.log10(1.0 / mse_mask), abs=1e-9)
    assert s["psnr"] == pytest.approx(10 * math.log10(1.0 / mse_all), abs=1e-9)
    # noise corruptions (all-True mask) and no mask: no mask PSNR
    assert "psnr_mask" not in bench.score(ref, img, np.ones(ref.shape, bool))
    assert "psnr_mask" not in bench.score(ref, img)


def test_metrics_clip_to_the_window():
    ref = np.full((16, 16), 0.5)
    img = ref.copy()
    img[0, 0] = 3.0                        # out of the window: counts as 1.0
    expected = 10 * math.log10(1.0 / (0.5 ** 2 / ref.size))
    assert bench.score(ref, img)["psnr"] == pytest.approx(expected)


# -- windows --------------------------------------------------------------------------------------
def test_ct_window_maps_minus_1000_to_0_and_1000_to_1():
    vol = np.array([-1000.0, 0.0, 1000.0, 2000.0], np.float32).reshape(2, 2, 1)
    norm, win = bench.to_window_units(vol, "CT")
    assert win == (-1000.0, 1000.0)
    np.testing.assert_allclose(norm.ravel(), [0.0, 0.5, 1.0, 1.5])   # linear, not clipped


def test_mr_window_is_the_volume_percentiles():
    vol = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    lo, hi = np.percentile(vol, (0.5, 99.5))
    norm, win = bench.to_window_units(vol, "MR")
    assert win == pytest.approx((lo, hi))
    assert np.count_nonzero(norm < 0) == pytest.approx(0.005 * vol.size, abs=1)
    assert np.count_nonzero(norm > 1) == pytest.approx(0.005 * vol.size, abs=1)
    assert float(norm.min()) < 0 < 1 < float(norm.max())


# -- seeds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [c.name for c in bench.CORRUPTIONS])
def test_same_seed_same_slice_and_other_slices_differ(name):
    spec = bench.CORRUPTION_BY_NAME[name]
    clean = np.zeros((64, 64), np.float32)
    clean[16:48, 12:52] = 0.6
    s3 = bench.case_seed(0, name, "vol.nii.gz", 3)
    a, ma = bench.corrupt_slice(spec, clean, s3)
    b, mb = bench.corrupt_slice(spec, clean, bench.case_seed(0, name, "vol.nii.gz", 3))
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    c, mc = bench.corrupt_slice(spec, clean, bench.case_seed(0, name, "vol.nii.gz", 4))
    assert not np.array_equal(a, c)
    assert bench.case_seed(0, name, "other.nii.gz", 3) != s3
    assert bench.case_seed(1, name, "vol.nii.gz", 3) != s3
    assert clean.max() == np.float32(0.6)          # input untouched
    if spec.kind == "noise":
        assert ma.all()
    else:
        lo, hi = spec.params["coverage"]
        assert lo <= ma.mean() <= hi and np.all(a[ma] == 0)


def test_corruption_levels_are_in_window_units():
    clean = np.full((128, 128), 0.5, np.float32)
    g, _ = bench.corrupt_slice(bench.CORRUPTION_BY_NAME["gaussian_0.10"], clean, 1)
    assert np.std(g - clean) == pytest.approx(0.10, rel=0.03)
    water = np.full((128, 128), 0.5, np.float32)       # 0 HU in the -1000..1000 window
    ld, _ = bench.corrupt_slice(bench.CORRUPTION_BY_NAME["lowdose_0.25"], water, 1)
    assert 0.002 < float(np.std(ld - water)) < 0.1     # HU-scaled noise, not noise of 0.5 "HU"


def test_corruptions_apply_to_the_right_modalities():
    c = bench.CORRUPTION_BY_NAME
    assert c["rician_0.05"].applies_to("MR") and not c["rician_0.05"].applies_to("CT")
    assert c["lowdose_0.25"].applies_to("CT") and not c["lowdose_0.25"].applies_to("MR")
    assert all(c[n].applies_to(m) for n in ("gaussian_0.05", "boxes_15", "strokes_10") for m in ("CT", "MR"))


# -- slice selection ------------------------------------------------------------------------------
def test_foreground_rule_and_size_rule():
    vol = np.zeros((64, 64, 4), np.float32)
    vol[:, :6, 0] = 1.0     # 9.4 % foreground: out
    vol[:, :7, 1] = 1.0     # 10.9 %: in
    vol[:, :, 2] = 0.05     # MR: below 0.1 of the window everywhere: out
    vol[:, :, 3] = 0.3      # CT: 0.3 > 0.25 (-500 HU): in; MR: in
    assert bench.select_slices(vol, "MR", max_slices=None) == [1, 3]
    ct = vol.copy()
    ct[:, :, 1] = 0.2       # -600 HU: not foreground for CT
    assert bench.select_slices(ct, "CT", max_slices=None) == [3]
    assert bench.select_slices(np.ones((63, 80, 3), np.float32), "MR") == []
    assert bench.select_slices(np.ones((64, 80, 3), np.float32), "MR") == [0, 1, 2]


def test_cap_is_evenly_spread():
    vol = np.ones((64, 64, 100), np.float32)
    assert bench.select_slices(vol, "MR", max_slices=4) == [12, 37, 62, 87]
    assert bench.select_slices(vol, "MR", max_slices=1) == [50]
    assert bench.cap_evenly([5, 6, 7], 10) == [5, 6, 7]
    assert bench.cap_evenly(list(range(10)), None) == list(range(10))


# -- targets ---------------------------------------------------------------------------------------
def _entry(psnr, ssim=0.8, psnr_mask=float("nan")):
    return {"psnr": psnr, "ssim": ssim, "psnr_mask": psnr_mask, "seconds": 0.1, "n": 3}


def test_gap_rows_pass_miss_and_sign():
    summary = {
        "gaussian_0.05": {"input": _entry(26), "medvae": _entry(33.0, 0.91), "nl_means": _entry(31.9, 0.85),
                          "bm3d": _entry(32.0, 0.90)},
        "gaussian_0.10": {"input": _entry(20), "medvae": _entry(30.0, 0.80), "bm3d": _entry(29.8, 0.85)},
        "rician_0.05": {"input": _entry(24), "medvae": _entry(27.0), "nl_means": _entry(26.5), "bm3d": _entry(25.5)},
        "lowdose_0.25": {"input": _entry(34), "medvae": _entry(36), "tv_chambolle": _entry(38)},
        "boxes_15": {"input": _entry(12, psnr_mask=5), "medvae": _entry(22, psnr_mask=18.0),
                     "biharmonic": _entry(21, psnr_mask=15.0), "telea": _entry(21.5, psnr_mask=16.5)},
        "strokes_10": {"input": _entry(16, psnr_mask=6), "medvae": _entry(28, psnr_mask=18.0),
                       "biharmonic": _entry(30, psnr_mask=20.0)},
    }
    rows = {r["corruption"]: r for r in bench.gap_rows(summary)}
    g = rows["gaussian_0.05"]
    assert g["best"] == "bm3d" and g["delta_best"] == pytest.approx(1.0)
    assert g["delta_target"] == pytest.approx(0.5) and g["status"] == "PASS"
    # PSNR margin met but SSIM below BM3D's: MISS
    g2 = rows["gaussian_0.10"]
    assert g2["delta_target"] == pytest.approx(-0.3) and g2["delta_ssim_target"] < 0 and g2["status"] == "MISS"
    # best baseline differs from the target's reference
    r = rows["rician_0.05"]
    assert r["best"] == "nl_means" and r["delta_best"] == pytest.approx(0.5)
    assert r["delta_target"] == pytest.approx(-0.5) and r["status"] == "MISS"
    assert rows["lowdose_0.25"]["status"] == "report" and rows["lowdose_0.25"]["delta_best"] == pytest.approx(-2)
    b = rows["boxes_15"]
    assert b["metric"] == "psnr_mask" and b["best"] == "telea" and b["delta_best"] == pytest.approx(1.5)
    assert b["delta_target"] == pytest.approx(1.0) and b["status"] == "PASS"
    s = rows["strokes_10"]
    assert s["delta_best"] == pytest.approx(-2.0) and s["delta_target"] == pytest.approx(-4.0) and s["status"] == "MISS"
    table = bench.gap_table(list(rows.values()))
    assert "**PASS** (+0.50 dB, SSIM +0.0100)" in table and "**MISS** (-4.00 dB)" in table


def test_gap_rows_without_the_reference_baseline():
    summary = {"gaussian_0.05": {"input": _entry(26), "medvae": _entry(33), "nl_means": _entry(31)}}
    (row,) = bench.gap_rows(summary)
    assert row["best"] == "nl_means" and row["delta_best"] == pytest.approx(2)
    assert row["status"].startswith("n/a") and "bm3d" in row["status"]


def test_summarize_means_per_corruption_method_and_modality():
    rows = [{"corruption": "c", "method": "m", "modality": mod, "psnr": p, "ssim": 0.5, "psnr_mask": float("nan"),
             "seconds": 1.0} for mod, p in (("CT", 20.0), ("MR", 30.0), ("MR", 40.0))]
    s = bench.summarize(rows)["c"]["m"]
    assert s["psnr"] == pytest.approx(30.0) and s["n"] == 3 and math.isnan(s["psnr_mask"])
    assert s["by_modality"]["MR"]["psnr"] == pytest.approx(35.0) and s["by_modality"]["CT"]["n"] == 1


def test_stretch_volume_tiles_and_repeats_in_order():
    v = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    out = bench.stretch_volume(v, (4, 5, 8))
    assert out.shape == (4, 5, 8) and out.dtype == np.float32
    np.testing.assert_array_equal(out[2:4, 0:3, 0], v[:, :, 0])
    assert [int(out[0, 0, k]) for k in range(8)] == [int(v[0, 0, k // 2]) for k in range(8)]


# -- end to end -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    return atomic_torch_save(checkpoint_dict(model, IntensityPolicy(), meta={"epoch": 1, "note": "tiny"}), path)


def _head(shape, value_in, value_out):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disk = (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (0.35 * min(shape)) ** 2
    return np.where(disk, value_in, value_out).astype(np.float32)


def test_bench_quality_end_to_end(tmp_path, tiny_checkpoint, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    mr = np.stack([_head((64, 72), 400.0, 5.0) + rng.normal(0, 3, (64, 72)) for _ in range(3)], axis=2)
    ct = np.stack([_head((64, 64), 40.0, -1000.0) for _ in range(2)], axis=2)
    nib.save(nib.Nifti1Image(np.maximum(mr, 0).astype(np.float32), np.eye(4)), data / "mr.nii.gz")
    nib.save(nib.Nifti1Image(ct.astype(np.float32), np.eye(4)), data / "ct.nii.gz")
    mod = _script("bench_quality")
    out = tmp_path / "q.json"
    code = mod.main(["--data", str(data), "--model", str(tiny_checkpoint), "--max-slices", "1",
                     "--skip-bm3d", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "medvae minus the best baseline" in stdout and "n/a (bm3d not run)" in stdout
    assert "epoch=1" in stdout and "commit:" in stdout and "--max-slices 1" in stdout
    res = json.loads(out.read_text())
    assert [v["slices"] for v in res["volumes"]] == [[1], [1]]           # ct.nii.gz, mr.nii.gz: middle slice
    by = {}
    for r in res["rows"]:
        by.setdefault(r["corruption"], set()).add((r["method"], r["modality"]))
    assert set(by) == {c.name for c in bench.CORRUPTIONS}
    assert by["rician_0.05"] == {(m, "MR") for m in ("input", "medvae", "nl_means", "tv_chambolle", "wavelet")}
    assert by["lowdose_0.25"] == {(m, "CT") for m in ("input", "medvae", "nl_means", "tv_chambolle", "wavelet")}
    assert {m for m, _ in by["boxes_15"]} >= {"input", "medvae", "biharmonic"}
    # the same corrupted slice for every method: the input row's seed is every method's seed
    seeds = {(r["corruption"], r["volume"], r["slice"]): set() for r in res["rows"]}
    for r in res["rows"]:
        seeds[(r["corruption"], r["volume"], r["slice"])].add(r["seed"])
    assert all(len(v) == 1 for v in seeds.values())
    boxes = [r for r in res["rows"] if r["corruption"] == "boxes_15"]
    assert all(r["psnr_mask"] is not None and 0.13 <= r["mask_fraction"] <= 0.17 for r in boxes)
    assert res["model"]["meta"]["note"] == "tiny" and res["protocol"]["skipped"]["bm3d"] == "--skip-bm3d"
    assert {g["corruption"]: g["status"] for g in res["gaps"]}["lowdose_0.25"] == "report"


def test_window_unit_slices_need_a_window_unit_model(ct_slice_hu):
    """The calibration script once restored window-unit CT slices with the model's HU window: 0..1
    squeezed into 0.0005 of the window, a garbage restoration and a std 2000x too wide, silently."""
    from medvae.models.checkpoint import load_model

    lm = load_model("default")
    clean = np.clip((ct_slice_hu[0, 64:192, 64:192] + 1000.0) / 2000.0, 0, 1).astype(np.float32)
    noisy = (clean + np.random.default_rng(0).normal(0, 0.05, clean.shape)).astype(np.float32)
    with pytest.raises(ValueError, match="in_window_units"):
        bench.restore_slices_std(lm, [noisy], modality="CT", samples=2)
    with pytest.raises(ValueError, match="in_window_units"):
        bench.restore_slices(lm, [noisy], modality="CT")
    raw = bench.uncalibrated(bench.in_window_units(lm))
    (mean,), (std,) = bench.restore_slices_std(raw, [noisy], modality="CT", samples=2)
    err_in, err_out = np.abs(noisy - clean).mean(), np.abs(mean - clean).mean()
    assert err_out < 0.6 * err_in                      # restored in the units it was given
    assert 0.1 < err_out / std.mean() < 10             # a raw std of the error's size, in the same units


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_average_models_gives_the_mean_weights_without_the_first_models_calibration(tmp_path, capsys):
    avg = _script("average_models")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2))
        meta = {"epoch": 3, "val_psnr": 30.0, "hole_radius": 22.02, "calibration": {"std_scale_noise": 2.0}}
        paths.append(atomic_torch_save(checkpoint_dict(model, IntensityPolicy(), meta=meta), tmp_path / f"m{seed}.pt"))
    out = tmp_path / "soup.pt"
    assert avg.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    a, b, soup = (torch.load(p, weights_only=True) for p in (*paths, out))
    for k, v in soup["state_dict"].items():
        if v.is_floating_point():
            torch.testing.assert_close(v, (a["state_dict"][k] + b["state_dict"][k]) / 2)
    assert soup["meta"] == {"hole_radius": 22.02, "averaged_from": ["m0.pt", "m1.pt"]}
    assert soup["model_config"] == a["model_config"]

    other = MaskedVAE(VAEConfig(channels=(4, 16), latent_channels=2))
    odd = atomic_torch_save(checkpoint_dict(other, IntensityPolicy()), tmp_path / "odd.pt")
    assert avg.main([str(paths[0]), str(odd), "--out", str(tmp_path / "x.pt")]) == 2
    assert "not the architecture of m0.pt" in capsys.readouterr().err and not (tmp_path / "x.pt").exists()
    assert avg.main([str(paths[0]), str(paths[1]), "--out", str(paths[1])]) == 2
    assert "would overwrite an input model" in capsys.readouterr().err


def test_oracle_reinjection_gives_back_only_what_the_reference_keeps():
    diag = _script("diagnose_denoising")
    rng = np.random.default_rng(0)
    texture = rng.normal(0, 0.05, (64, 64))
    clean = np.clip(0.5 + texture, 0, 1)
    noise = rng.normal(0, 0.05, clean.shape)
    noisy = clean + noise
    # a restoration that removed exactly the noise: nothing to give back
    assert diag.oracle_reinjection(clean, noisy, clean)[0] == 0.0
    # one that also removed the reference's own texture: about half of the residual is texture
    alpha, best, plain = diag.oracle_reinjection(clean, noisy, np.full_like(clean, 0.5))
    assert 0.35 <= alpha <= 0.65 and best > plain + 2.0


def test_diagnose_denoising_names_a_missing_model_in_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.pt"
    assert _script("diagnose_denoising").main(["--model", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"diagnose_denoising: error: {missing}: model file not found"


def test_check_demo_measures_air_in_filled_body_pixels_and_brain_window_error(tmp_path, capsys):
    demo = _script("check_demo")
    ref = np.array([[-1000.0, 40.0], [20.0, 60.0]])
    filled = np.array([[-1000.0, -800.0], [30.0, 60.0]])      # one of three body pixels turned to air
    mask = np.ones_like(ref)
    assert demo.air_share(ref, filled, mask) == pytest.approx(100 / 3)
    assert demo.air_share(ref, filled, np.zeros_like(mask) + (ref == 20.0)) == 0.0   # outside the mask: not counted
    assert demo.brain_rms(ref, ref + np.array([[500.0, 3.0], [4.0, 0.0]])) == pytest.approx(np.sqrt(25 / 3))
    assert demo.main(["--demo", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().err.strip() == f"check_demo: error: {tmp_path / 'none' / 'samples' / 'ct_series'}: no such file or folder"


def test_compare_quality_gives_means_floors_and_per_volume_differences(tmp_path, capsys):
    cmp = _script("compare_quality")

    def run(name: str, medvae: dict[str, float], seed: int = 7) -> Path:
        rows = [{"corruption": "gaussian_0.05", "method": m, "volume": v, "modality": "MR", "slice": 0,
                 "seed": seed, "psnr": p, "psnr_mask": None}
                for v, mine in medvae.items() for m, p in (("medvae", mine), ("nl_means", 30.0))]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"rows": rows, "summary": bench.summarize(rows),
                                    "gaps": [{"corruption": "gaussian_0.05", "metric": "psnr"}]}))
        return path

    a = run("a", {"v1": 31.0, "v2": 29.0})
    b = run("b", {"v1": 30.5, "v2": 30.5})
    assert cmp.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| gaussian_0.05 | psnr | 30.00 | 30.50 | +0.50 |" in out        # means over slices
    assert "| gaussian_0.05 | nl_means | 1/2 | 2/2 |" in out                # floors
    assert "| v1 | -0.50 |" in out and "| v2 | +1.50 |" in out            # per volume
    # another protocol (other seeds) is refused in one line, naming the file
    c = run("c", {"v1": 31.0, "v2": 29.0}, seed=8)
    assert cmp.main([str(a), str(c)]) == 2
    assert capsys.readouterr().err.strip() == (f"compare_quality: error: {c}: scores other slices or seeds than "
                                               f"{a}: compare runs of one protocol")
    assert cmp.main([str(a), str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.strip() == f"compare_quality: error: {tmp_path / 'none.json'}: no such file"
    # a folder, and rows without their keys: tracebacks before
    assert cmp.main([str(a), str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"compare_quality: error: {tmp_path}: is a folder; give the JSON "
                                               "file of scripts/bench_quality.py --out")
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"summary": {}, "gaps": [], "rows": [{"method": "medvae"}]}))
    assert cmp.main([str(a), str(broken)]) == 2
    assert "not the JSON of scripts/bench_quality.py --out" in capsys.readouterr().err


def test_a_json_output_never_replaces_a_model(tmp_path):
    # fit_noise_gain.py --out e.pt --model e.pt replaced the checkpoint with JSON
    model = tmp_path / "e.pt"
    model.write_bytes(b"PK\x03\x04 a torch zip")
    with pytest.raises(SystemExit, match="refusing to replace a file that is not JSON"):
        bench.write_json({"a": 1}, model)
    assert model.read_bytes() == b"PK\x03\x04 a torch zip"
    bench.write_json({"a": 1}, tmp_path / "r.json")
    bench.write_json({"a": 2}, tmp_path / "r.json")  # an earlier JSON is replaced
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 2}


# -- benchmark splits: no training subject, not even under another file name ------------------------
needs_shared = pytest.mark.skipif(not (bench.SHARED_DATA / "dev" / "manifest.json").exists(),
                                  reason="needs ../shared/data beside the checkout")


def _smooth_volume(seed: int, shape=(48, 40, 12)) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(np.random.default_rng(seed).normal(0, 100, shape), 2.0).astype(np.float32) * 10


def _nifti(path: Path, a: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(a, np.float32), np.eye(4)), str(path))
    return path


def test_training_overlaps_finds_a_split_scans_pixels_under_another_name(tmp_path):
    vol = _smooth_volume(0)
    split = _nifti(tmp_path / "val.nii.gz", vol)
    other = _nifti(tmp_path / "other_subject.nii.gz", _smooth_volume(1))
    assert bench.training_overlaps([split], [other]) == []
    copies = {
        "renamed": vol,                                              # same pixels, another file name
        "flipped": np.ascontiguousarray(vol.transpose(1, 0, 2)[::-1]),  # the slices transposed and flipped
        "rescaled": vol * 2.5 - 300,                                 # another slope / intercept
        "resampled": vol.reshape(24, 2, 20, 2, 12).mean(axis=(1, 3)),    # half the in-plane resolution
        "resliced": np.ascontiguousarray(vol.transpose(2, 0, 1)),    # k is now another axis
        "clipped": np.maximum(vol, np.percentile(vol, 20)),          # e.g. CT padding clipped to -1024
    }
    for name, a in copies.items():
        train = _nifti(tmp_path / f"{name}.nii.gz", a)
        leaks = bench.training_overlaps([split], [other, train])
        assert len(leaks) == 1 and f"{name}.nii.gz" in leaks[0], (name, leaks)


@needs_shared
def test_check_unseen_rejects_a_training_file_holding_a_split_scans_pixels(tmp_path):
    """Paths alone miss a codec variant (pydicom's MR_small_RLE is MR_small's pixels) and a renamed copy."""
    import shutil

    from medvae.errors import MedvaeError

    d = bench.SHARED_DATA
    renamed = tmp_path / "some_ct.dcm"
    shutil.copy(d / "dev/dicom/pydicom/CT_small.dcm", renamed)
    cfg = tmp_path / "leaky.yaml"
    cfg.write_text("data:\n  paths:\n"
                   f"    - {d / 'dev/dicom/pydicom/MR_small_RLE.dcm'}\n"
                   f"    - {renamed}\n"
                   f"    - {d / 'dev/dicom/pydicom/J2K_pixelrep_mismatch.dcm'}\n")
    bench.check_unseen(bench.VALIDATION_SPLIT + bench.CALIBRATION_SPLIT, cfg, pixels=False)  # the old check
    with pytest.raises(MedvaeError, match="CT_small.dcm ~ .*some_ct.dcm: identical pixels"):
        bench.check_unseen(bench.VALIDATION_SPLIT, cfg)
    with pytest.raises(MedvaeError, match="MR_small.dcm ~ .*MR_small_RLE.dcm: identical pixels"):
        bench.check_unseen(bench.CALIBRATION_SPLIT, cfg)


@needs_shared
def test_shipped_splits_share_no_pixels_or_subject_with_training_or_each_other():
    """Every validation and calibration scan against every scan the shipped config trains on (~10 s)."""
    bench.check_unseen(bench.VALIDATION_SPLIT)
    bench.check_unseen(bench.CALIBRATION_SPLIT)
    assert bench.split_disjoint(bench.VALIDATION_SPLIT, bench.CALIBRATION_SPLIT) == []
    assert bench.training_overlaps([e.file for e in bench.VALIDATION_SPLIT],
                                   [e.file for e in bench.CALIBRATION_SPLIT]) == []


@needs_shared
def test_split_subjects_are_the_manifests_patient_ids():
    """A file name is not a subject: a DICOM split entry is labelled with its PatientID (manifest ``subject``)."""
    man = bench._manifest_subjects()
    for e in bench.VALIDATION_SPLIT + bench.CALIBRATION_SPLIT:
        known = man.get(e.file.resolve(), {}).get("subject")
        assert e.subject == (known or e.subject), (e.path, e.subject, known)


def test_a_modality_gets_a_calibration_of_its_own_only_from_two_subjects():
    cal = _script("calibrate_uncertainty")
    one_scan = [{"subject": "0010"}] * 6  # e.g. the one CT calibration scan: six (slice, corruption) cases
    assert not cal.own_fit(one_scan, min_cases=5, min_subjects=2)
    assert cal.own_fit(one_scan, min_cases=5, min_subjects=1)  # the rule before: cases alone
    assert cal.own_fit([{"subject": "dipy"}] * 3 + [{"subject": "4MR1"}] * 3, min_cases=5, min_subjects=2)
    assert not cal.own_fit([{"subject": "dipy"}, {"subject": "4MR1"}], min_cases=5, min_subjects=2)
    # every calibration case knows its subject (the split's PatientIDs), so the rule can apply
    assert {Path(e.path).name for e in bench.CALIBRATION_SPLIT} and all(e.subject for e in bench.CALIBRATION_SPLIT)


def test_outputs_and_counts_of_the_scripts_are_checked_before_the_work(tmp_path, monkeypatch):
    # an unwritable --out lost a half-hour run's numbers after it; 0 slices ended in a traceback; the shipped
    # config's training scans were looked up from the working folder ("no scan matches ../shared/...")
    import argparse

    from benchmarks.common import DEFAULT_CONFIG, at_least, check_json_output, training_paths

    with pytest.raises(SystemExit, match=r"x.json: --json cannot be written in /proc"):
        check_json_output("/proc/x.json", "--json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit, match="--out cannot be written in .*f"):
        check_json_output(tmp_path / "f" / "x.json")
    check_json_output(tmp_path / "new" / "x.json")  # a folder that a write creates is fine
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".medvae-probe-*"))
    with pytest.raises(argparse.ArgumentTypeError, match="must be at least 1, got 0"):
        at_least(1)("0")
    assert at_least(8)("24") == 24
    here = training_paths(DEFAULT_CONFIG)
    monkeypatch.chdir(tmp_path)
    assert training_paths(DEFAULT_CONFIG) == here and len(here) > 5


def test_the_held_out_check_reads_a_manifests_training_rows(dev_data, tmp_path):
    # training_paths read data.paths only: a calibration scan listed in a manifest's training rows passed
    from benchmarks.common import CALIBRATION_SPLIT, check_unseen, split_items
    from medvae.errors import MedvaeError

    calibration_scan = Path(next(iter(split_items(CALIBRATION_SPLIT)))[0])
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,subject,split\n{calibration_scan},s1,train\n")
    config = tmp_path / "mine.yaml"
    config.write_text(f"data:\n  manifest: {manifest}\n")
    assert bench.training_paths(config) == {calibration_scan.resolve()}
    with pytest.raises(MedvaeError):
        check_unseen(CALIBRATION_SPLIT, config, pixels=False)
