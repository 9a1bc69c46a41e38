"""Noise / artefact corruptions: statistics, determinism, replay, input safety, parameter checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvae.corruption import (
    REGISTRY, BiasField, GaussianNoise, GibbsRinging, LowDoseCT, MotionGhosting, RandGaussianNoise,
    RandLowDoseCT, RandRicianNoise, RicianNoise, replay, sigma_from_hu,
)
from medvae.corruption.ranges import parse_range

NOISE_NAMES = ["gaussian", "rician", "lowdose_ct", "kspace_spikes", "gibbs", "bias_field", "motion"]
RAND_KW = {"lowdose_ct": {"hu_window": (-1000, 1000)}}


@pytest.fixture(scope="module")
def ct_slice_norm(ct_slice_hu) -> np.ndarray:
    """The real head-CT slice (conftest) normalized by the -1000..1000 HU window."""
    return ((ct_slice_hu + 1000.0) / 2000.0).astype(np.float32)


def water_disk(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """A 0 HU disk in air (HU) and a central region of interest."""
    yy, xx = np.mgrid[:n, :n]
    r = np.hypot(yy - n / 2 + 0.5, xx - n / 2 + 0.5)
    return np.where(r < 0.4 * n, 0.0, -1000.0).astype(np.float32)[None], r < 0.25 * n


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma", [0.02, 0.1])
def test_gaussian_std_on_constant_image(sigma):
    img = np.full((1, 256, 256), 0.5, np.float32)
    out, mask = GaussianNoise(sigma, seed=1)(img)
    assert abs(out.std() / sigma - 1) < 0.03
    assert abs(out.mean() - 0.5) < 3 * sigma / 256
    assert mask.shape == (1, 256, 256) and mask.dtype == bool and mask.all()


def test_gaussian_sigma_in_window_units_and_hu_helper():
    img = np.zeros((1, 256, 256), np.float32)  # HU
    out, _ = GaussianNoise(0.05, seed=2, window=(-1000, 1000))(img)
    assert abs(out.std() / 100.0 - 1) < 0.03  # 5 % of a 2000 HU window
    assert sigma_from_hu(50, window=(-1000, 1000)) == pytest.approx(0.025)


def test_rician_bias_on_zero_background():
    sigma = 0.1
    out, _ = RicianNoise(sigma, seed=3)(np.zeros((1, 256, 256), np.float32))
    assert out.min() >= 0
    assert out.mean() == pytest.approx(sigma * np.sqrt(np.pi / 2), rel=0.02)  # Rayleigh mean
    # on a bright region the noise is nearly Gaussian and unbiased
    out, _ = RicianNoise(sigma, seed=4)(np.full((1, 256, 256), 2.0, np.float32))
    assert out.mean() == pytest.approx(2.0 + sigma**2 / 4, abs=0.003)
    assert out.std() == pytest.approx(sigma, rel=0.03)


def test_lowdose_std_grows_as_dose_falls_and_mean_is_unbiased():
    phantom, roi = water_disk(128)
    stds = []
    for dose in (1.0, 0.25, 0.05):
        out, mask = LowDoseCT(dose, photons=1e5, seed=5, pixel_size_mm=2.0)(phantom)
        d = out[0] - phantom[0]
        stds.append(float(d[roi].std()))
        assert abs(float(d[roi].mean())) < max(2.0, 0.1 * stds[-1])  # HU, unbiased on water
        assert mask.all()
    assert stds[0] < stds[1] < stds[2]
    # quantum noise: std ~ 1 / sqrt(dose)
    assert stds[1] / stds[0] == pytest.approx(2.0, rel=0.15)
    assert stds[2] / stds[1] == pytest.approx(np.sqrt(5.0), rel=0.15)
    assert 5 < stds[0] < 20  # ~10 HU at full dose for 2 mm pixels (documented)


def test_lowdose_on_real_ct_normalized_brain_region(ct_slice_hu, ct_slice_norm):
    hu, norm = ct_slice_hu, ct_slice_norm
    out, _ = LowDoseCT(0.1, photons=1e5, seed=6, hu_window=(-1000, 1000))(norm)
    d_hu = (out[0] - norm[0]) * 2000.0
    brain = (hu[0] > 0) & (hu[0] < 80)  # soft tissue inside the skull
    assert brain.sum() > 5000
    assert abs(float(d_hu[brain].mean())) < 5.0
    assert 10 < float(d_hu[brain].std()) < 200
    # detail is kept: the clean image is not blurred by the reconstruction
    out_hu, _ = LowDoseCT(1.0, photons=1e9, seed=6)(hu)
    assert np.abs(out_hu - hu).max() < 5.0


def test_lowdose_3d_and_non_square():
    vol = np.full((1, 40, 30, 3), 0.5, np.float32)  # water, normalized
    out, mask = LowDoseCT(0.1, photons=1e5, seed=0, hu_window=(-1000, 1000))(vol)
    assert out.shape == vol.shape and mask.shape == (1, 40, 30, 3) and mask.all()
    d = out - vol
    assert all(d[..., k].std() > 0 for k in range(3))
    assert not np.array_equal(d[..., 0], d[..., 1])  # every slice its own noise


@pytest.mark.parametrize("size,n_angles", [(64, 64), (63, 64), (37, 31), (9, 5)])
def test_lowdose_projection_equals_skimage_radon(size, n_angles):
    from skimage.transform import radon

    from medvae.corruption.noise import _project

    img = np.random.default_rng(size).random((size, size))
    ref = radon(img, np.linspace(0, 180, n_angles, endpoint=False), circle=False, preserve_range=True)
    got = _project(img, n_angles)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() < 1e-12 * np.abs(ref).max()


# (detector bins, views, output size): the sizes LowDoseCT uses (ceil(sqrt(2) m) bins), odd sizes,
# and detectors longer or shorter than the image's diagonal (part of the image outside them)
@pytest.mark.parametrize("n_det,n_angles,size", [(182, 64, 128), (109, 31, 77), (200, 12, 41), (40, 16, 60), (7, 3, 5)])
def test_lowdose_backprojection_equals_skimage_iradon(n_det, n_angles, size):
    from skimage.transform import iradon

    from medvae.corruption.noise import _filtered_backprojection

    sino = np.random.default_rng(n_det).standard_normal((n_det, n_angles))
    ref = iradon(sino, np.linspace(0, 180, n_angles, endpoint=False), output_size=size, circle=False,
                 filter_name="ramp", preserve_range=True)
    got = _filtered_backprojection(sino, size)
    assert got.shape == (size, size)
    assert np.abs(got - ref).max() < 1e-12 * np.abs(ref).max()


def test_lowdose_operators_give_the_skimage_result_on_real_ct(ct_slice_hu, monkeypatch):
    """The cached operators and skimage's radon/iradon (used beyond the size cap) give the same image."""
    import medvae.corruption.noise as noise

    hu = ct_slice_hu[:, 64:192, 60:180]  # 128 x 120: resized to the 64² projection grid
    fast = [LowDoseCT(0.25, photons=1e5, seed=3)(hu)[0],
            LowDoseCT(0.5, photons=1e5, seed=4, projection_size=None, n_angles=31)(hu[:, :50, :44])[0]]
    monkeypatch.setattr(noise, "_MAX_OPERATOR_NNZ", 0)
    slow = [LowDoseCT(0.25, photons=1e5, seed=3)(hu)[0],
            LowDoseCT(0.5, photons=1e5, seed=4, projection_size=None, n_angles=31)(hu[:, :50, :44])[0]]
    for a, b, img in zip(fast, slow, (hu, hu[:, :50, :44])):
        assert np.abs(a - img).max() > 10  # HU: there is noise
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def test_identity_at_zero_strength():
    img = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    assert np.array_equal(GaussianNoise(0.0, seed=1)(img)[0], img)
    np.testing.assert_allclose(GibbsRinging(0.0)(img)[0], img, atol=1e-5)
    np.testing.assert_allclose(BiasField([0.0] * 10, degree=3)(img)[0], img, atol=1e-6)
    np.testing.assert_allclose(MotionGhosting([0.0, 5.0], [], axis=0)(img)[0], img, atol=1e-5)


# --------------------------------------------------------------------------------------------
# every random transform: determinism, replay, types, input safety
# --------------------------------------------------------------------------------------------
def _rand(name: str, **kw):
    return REGISTRY[name](**{**RAND_KW.get(name, {}), **kw})


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_seed_determinism_and_replay(name, ct_slice_norm):
    img = ct_slice_norm[:, ::2, ::2].copy()  # real 128x128 slice
    t = _rand(name).set_random_state(7)
    out1, m1 = t(img)
    rec = json.loads(json.dumps(t.record))  # records survive JSON
    out2, m2 = _rand(name).set_random_state(7)(img)
    out3, _ = _rand(name).set_random_state(8)(img)
    assert np.array_equal(out1, out2) and np.array_equal(m1, m2)
    assert not np.array_equal(out1, out3)
    r_out, r_mask = replay(img, rec)
    assert np.array_equal(r_out, out1) and np.array_equal(r_mask, m1)
    det = REGISTRY[name].deterministic.from_params(**t.last_params)
    assert np.array_equal(det(img)[0], out1)
    assert "seed" in t.last_params or name in ("kspace_spikes", "gibbs", "bias_field", "motion")


@pytest.mark.parametrize("name", NOISE_NAMES)
def test_numpy_and_torch_inputs_unchanged_and_types_kept(name):
    rng = np.random.default_rng(1)
    img = rng.random((1, 24, 20, 6)).astype(np.float32) if name != "lowdose_ct" else rng.random((1, 24, 20)).astype(np.float32)
    ref = img.copy()
    t = _rand(name).set_random_state(0)
    out, mask = t(img)
    assert np.array_equal(img, ref)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == img.shape
    assert mask.shape == (1, *img.shape[1:]) and mask.dtype == bool

    timg = torch.from_numpy(img.copy())
    tref = timg.clone()
    tout, tmask = t(timg, randomize=False)
    assert torch.equal(timg, tref)
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32 and tmask.dtype == torch.bool
    assert np.array_equal(tout.numpy(), out)

    out64, _ = t(img.astype(np.float64), randomize=False)
    assert out64.dtype == np.float64


def test_prob_zero_returns_copy_and_empty_mask():
    img = np.ones((1, 8, 8), np.float32)
    t = RandGaussianNoise(sigma=0.1, prob=0.0)
    out, mask = t(img)
    assert np.array_equal(out, img) and out is not img
    assert not mask.any() and t.last_params is None
    assert np.array_equal(replay(img, t.record)[0], img)


def test_rand_sigma_within_range():
    t = RandRicianNoise(sigma=(0.02, 0.05)).set_random_state(0)
    for _ in range(20):
        t(np.zeros((1, 8, 8), np.float32))
        assert 0.02 <= t.last_params["sigma"] <= 0.05


def test_rand_lowdose_records_everything():
    t = RandLowDoseCT(dose=(0.1, 0.2), photons=(5e4, 2e5), hu_window=(-1000, 1000)).set_random_state(0)
    t(np.full((1, 32, 32), 0.5, np.float32))
    p = t.last_params
    assert 0.1 <= p["dose"] <= 0.2 and 5e4 <= p["photons"] <= 2e5
    assert set(p) >= {"seed", "hu_window", "n_angles", "projection_size", "fov_mm"}


# --------------------------------------------------------------------------------------------
# parameter validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, word", [
    (lambda: RandGaussianNoise(sigma=-0.1), "sigma"),
    (lambda: RandGaussianNoise(sigma=(0.2, 0.1)), "sigma"),
    (lambda: GaussianNoise(-1.0, seed=0), "sigma"),
    (lambda: RicianNoise(float("nan"), seed=0), "sigma"),
    (lambda: LowDoseCT(0.0, photons=1e5, seed=0), "dose"),
    (lambda: RandLowDoseCT(dose=(0.1, 1.5)), "dose"),
    (lambda: LowDoseCT(0.5, photons=-1, seed=0), "photons"),
    (lambda: REGISTRY["gibbs"](alpha=(0.2, 1.2)), "alpha"),
    (lambda: REGISTRY["kspace_spikes"](n_spikes=0), "n_spikes"),
    (lambda: REGISTRY["motion"](fraction=2), "fraction"),
    (lambda: RandGaussianNoise(sigma=0.1, prob=1.5), "prob"),
    (lambda: GaussianNoise(0.1, seed=-3), "seed"),
])
def test_bad_parameters_raise_value_error_naming_them(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_parse_range_rules():
    assert parse_range(0.1, "sigma") == (0.1, 0.1)
    assert parse_range([1, 3], "n", integer=True) == (1, 3)
    with pytest.raises(ValueError, match="coverage must be <= 1"):
        parse_range([0.1, 1.2], "coverage", low=0, high=1)
    with pytest.raises(ValueError, match="dose must be > 0"):
        parse_range(0, "dose", low=0, low_open=True)
    with pytest.raises(ValueError, match="width"):
        parse_range("wide", "width")
    with pytest.raises(ValueError, match="n must be an integer"):
        parse_range(1.5, "n", integer=True)


def test_bad_image_shape():
    with pytest.raises(ValueError, match="channel-first"):
        GaussianNoise(0.1, seed=0)(np.zeros((8, 8), np.float32))


@pytest.mark.parametrize("shape, degree", [((17, 12, 9), 2), ((9, 8, 7), 3)])
def test_3d_bias_field_is_monais_field_bit_for_bit(shape, degree):
    # medvae builds the field from NumPy's public Legendre functions; MONAI's own (private) builder
    # is the independent reference, with MONAI's coefficient order
    from monai.transforms import RandBiasField as MonaiRandBiasField

    from medvae.corruption.noise import _n_bias_coeffs, legendre_field

    coeff = np.random.default_rng(3).uniform(-0.3, 0.3, _n_bias_coeffs(degree, len(shape))).tolist()
    ours = legendre_field(shape, degree=degree, coefficients=coeff)
    ref = MonaiRandBiasField(degree=degree)._generate_random_field(spatial_shape=shape, degree=degree, coeff=coeff)
    assert ours.dtype == ref.dtype and ours.shape == shape
    np.testing.assert_array_equal(ours, ref)
    assert np.ptp(ours) > 0.1  # a real field, not zeros


@pytest.mark.parametrize("shape, degree", [((37, 29), 3), ((8, 8), 1)])
def test_2d_bias_field_has_the_total_degree_along_both_axes(shape, degree):
    """MONAI's 2-D order (P_i(x) P_j(y), j <= i) reached degree 6 along x and had no P_j(y) term alone:
    over 2000 fields the mean squared gradient along the first axis was 6x that along the second."""
    from scipy.special import eval_legendre

    from medvae.corruption.noise import legendre_field

    x, y = (np.linspace(-1, 1, n) for n in shape)
    terms = [(i, j) for i in range(degree + 1) for j in range(degree + 1 - i)]
    coeff = np.random.default_rng(3).uniform(-0.3, 0.3, len(terms))
    ref = sum(c * np.outer(eval_legendre(i, x), eval_legendre(j, y)) for c, (i, j) in zip(coeff, terms))
    np.testing.assert_allclose(legendre_field(shape, degree=degree, coefficients=coeff.tolist()), ref, atol=1e-6)
    rng = np.random.default_rng(0)
    grads = np.zeros(2)
    for _ in range(300):
        f = legendre_field(shape, degree=degree, coefficients=rng.uniform(-0.25, 0.25, len(terms)).tolist())
        grads += [np.mean(np.diff(f, axis=0) ** 2) * shape[0] ** 2, np.mean(np.diff(f, axis=1) ** 2) * shape[1] ** 2]
    assert 0.7 < grads[0] / grads[1] < 1.4


def test_rand_lowdose_uses_the_callers_pixel_size_unless_fixed():
    img = np.full((1, 32, 32), 0.5, np.float32)
    t = RandLowDoseCT(dose=0.5, hu_window=(-1000, 1000))
    out, _ = t.set_random_state(0)(img, pixel_size_mm=0.8)
    assert t.last_params["pixel_size_mm"] == 0.8
    assert np.array_equal(replay(img, t.record)[0], out)
    expected, _ = LowDoseCT(**t.last_params)(img)
    assert np.array_equal(out, expected)
    t.set_random_state(0)(img)  # no geometry: None, LowDoseCT's fov_mm rule
    assert t.last_params["pixel_size_mm"] is None
    fixed = RandLowDoseCT(dose=0.5, hu_window=(-1000, 1000), pixel_size_mm=2.0).set_random_state(0)
    fixed(img, pixel_size_mm=0.8)
    assert fixed.last_params["pixel_size_mm"] == 2.0
    # transforms without a pixel size take the keyword and ignore it
    g = RandGaussianNoise(sigma=0.1).set_random_state(0)
    assert np.array_equal(g(img, pixel_size_mm=0.8)[0], RandGaussianNoise(sigma=0.1).set_random_state(0)(img)[0])


# --------------------------------------------------------------------------------------------
# input the corruptions refuse: non-finite, empty, low-dose CT in the wrong units
# --------------------------------------------------------------------------------------------
ALL_NAMES = NOISE_NAMES + ["boxes", "strokes", "stripes"]


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_non_finite_or_empty_input_is_refused(name, kind):
    # one NaN pixel came back as an all-NaN image from k-space spikes, Gibbs ringing and motion
    conv = torch.from_numpy if kind == "torch" else (lambda a: a)
    img = np.full((1, 32, 32), 0.5, np.float32)
    img[0, 3, 4] = np.nan
    t = REGISTRY[name](**RAND_KW.get(name, {})).set_random_state(0)
    with pytest.raises(ValueError, match=r"1 of 1024 values are NaN or infinite") as exc:
        t(conv(img))
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="empty"):  # was ZeroDivisionError, or numpy's FFT errors
        t(conv(np.zeros((1, 0, 0), np.float32)))


def test_deterministic_transforms_refuse_inf():
    img = np.full((1, 16, 16), 0.5, np.float32)
    img[0, 0, 0] = np.inf
    for t in (GibbsRinging(0.5), LowDoseCT(0.5, photons=1e5, seed=0)):
        with pytest.raises(ValueError, match="NaN or infinite"):  # LowDoseCT said numpy's "lam value too large"
            t(img)


def test_lowdose_stays_finite_where_transmission_underflows():
    # exp(-p) underflowed to 0: log(0) made the whole image NaN (a full mask over NaN)
    x = np.full((1, 64, 64), 9e4, np.float32)
    out, mask = LowDoseCT(0.25, photons=1e5, seed=0, pixel_size_mm=10.0)(x)
    assert np.isfinite(out).all() and mask.all()


def test_lowdose_refuses_an_image_in_hu_where_window_units_are_expected(ct_slice_hu):
    from medvae.corruption import load_recipe

    with pytest.raises(ValueError, match=r"expects values scaled to \[0, 1\] of the intensity window "
                                         r"-1000\.\.1000 HU, \(HU \+ 1000\) / 2000") as exc:
        load_recipe("lowdose_ct")(ct_slice_hu, seed=0, modality="CT")  # was an all-NaN image
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match=r"expects HU \(hu_window=None\)"):
        LowDoseCT(0.5, photons=1e5, seed=0)(np.full((1, 16, 16), 2e5, np.float32))
    metal = np.full((1, 64, 64), 0.5, np.float32)
    metal[0, 30:34, 30:34] = 3.0  # 5000 HU in window units: accepted
    res = load_recipe("lowdose_ct")(metal, seed=0, modality="CT")
    assert np.isfinite(res.image).all()


def test_lowdose_without_hu_window_refuses_an_image_in_window_units(ct_slice_norm):
    # read as HU, a [0, 1] image got noise of std ~40, forty times its whole range, without a word
    from medvae.corruption import RandLowDoseCT

    with pytest.raises(ValueError, match=r"look scaled to \[0, 1\] of a window: give that window as hu_window"):
        RandLowDoseCT().set_random_state(0)(ct_slice_norm)
    out, _ = RandLowDoseCT(hu_window=(-1000, 1000)).set_random_state(0)(ct_slice_norm)
    assert float(np.abs(out - ct_slice_norm).std()) < 0.05


@pytest.mark.parametrize("kwargs, needle", [({"window": 5}, "window must be (low, high), got 5"),
                                            ({"window": (1, 0)}, "window range must be [min, max]")])
def test_a_bad_window_is_a_named_value_error(kwargs, needle):
    with pytest.raises(ValueError) as exc:  # a scalar once raised "'float' object is not iterable"
        RandGaussianNoise(**kwargs)
    assert needle in str(exc.value)


@pytest.mark.parametrize("img", [np.ones((1, 8, 8)) + 1j, torch.ones(1, 8, 8, dtype=torch.complex64),
                                 np.ones((1, 8, 8), bool)])
def test_an_image_that_is_not_real_numbers_is_refused_not_cast(img):
    with pytest.raises(ValueError, match="the corruptions work on real numbers"):
        RandGaussianNoise(sigma=0.1).set_random_state(0)(img)


@pytest.mark.parametrize("record, needle", [
    ({"transform": "gaussian", "params": {"sigma": 0.1}}, "'gaussian' params do not fit GaussianNoise: missing 1 "
                                                          "required keyword-only argument: 'seed'"),
    ({"params": {"sigma": 0.1}}, "a record needs 'transform' (a name) and 'params' (a mapping, or null"),
    ({"steps": [{"transform": "nope", "params": {}}]}, "replay: step 0: unknown transform 'nope'"),
    ([1, 2], "a record is a mapping"),
    ({}, "a record needs 'transform'"),  # these returned the image unchanged
    ({"transform": "gaussian", "param": {"sigma": 0.1, "seed": 1}}, "a record needs 'transform'"),
    ({"steps": None}, "'steps' is a list of records"),
])
def test_a_malformed_record_is_refused_naming_what_is_wrong(record, needle):
    """A record without its seed raised Python's TypeError from the constructor, one without 'transform' a
    KeyError."""
    with pytest.raises(ValueError) as err:
        replay(np.zeros((1, 8, 8), np.float32), record)
    assert needle in str(err.value) and "\n" not in str(err.value)
