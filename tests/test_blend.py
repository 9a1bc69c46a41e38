"""The blend of the network's restoration with the classical one (medvae.blend, restore_volume)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from medvae import baselines
from medvae.blend import blend_weight, fit_weight
from medvae.errors import MedvaeError
from medvae.restore import restore_volume


def test_fit_weight_recovers_the_least_squares_mix_and_stays_in_0_1(ct_slice_hu):
    ref = np.clip((np.squeeze(ct_slice_hu) + 1000) / 2000, 0, 1)
    e = np.random.default_rng(0).normal(0, 0.05, ref.shape)
    # network ref + e, classical ref - 2e: (1 - w)(ref + e) + w(ref - 2e) = ref exactly at w = 1/3
    assert fit_weight(ref + e, ref - 2 * e, ref) == pytest.approx(1 / 3, abs=1e-9)
    assert fit_weight(ref + e, ref + 2 * e, ref) == 0.0       # the classical estimate only adds error
    assert fit_weight(ref + e, ref, ref) == pytest.approx(1.0)  # a perfect classical estimate
    assert fit_weight(ref, ref, ref) == 0.0                     # nothing to choose between


def test_blend_weight_prefers_the_modalitys_own_fit_and_refuses_a_weight_outside_0_1():
    meta = {"blend": {"weight_noise": 0.4, "weight_noise_ct": 0.5, "weight_holes": 0.3}}
    assert blend_weight(meta, holes=False, modality="CT") == 0.5
    assert blend_weight(meta, holes=False, modality="MR") == 0.4
    assert blend_weight(meta, holes=True, modality="CT") == 0.3
    assert blend_weight({}, holes=True) == 0.0
    with pytest.raises(MedvaeError, match="m.pt.*outside"):   # one line naming the model file
        blend_weight({"blend": {"weight_holes": 1.5}}, holes=True, source="m.pt")
    with pytest.raises(MedvaeError, match=r"m.pt: .*\['weight_holes'\] = 'abc' is not a number"):  # was a traceback
        blend_weight({"blend": {"weight_holes": "abc"}}, holes=True, source="m.pt")


def test_restore_volume_blends_by_the_models_weight_and_keeps_known_pixels(ct_slice_hu):
    from medvae.models.checkpoint import load_model

    clean = np.squeeze(ct_slice_hu)[64:192, 32:224].astype(np.float32)
    noisy = clean + np.random.default_rng(1).normal(0, 100, clean.shape).astype(np.float32)
    lm = load_model("default")
    lm = dataclasses.replace(lm, meta={**lm.meta, "blend": {"weight_noise": 0.25, "weight_holes": 0.5}})
    kw = dict(model=lm, modality="CT", precision="fp32", ensemble=1)
    net, _ = restore_volume(noisy, blend=False, **kw)
    out, _ = restore_volume(noisy, **kw)
    units = (noisy + 1000) / 2000                                 # the model's CT window
    expected = (0.75 * (net + 1000) / 2000 + 0.25 * baselines.nl_means(units)) * 2000 - 1000
    np.testing.assert_allclose(out, expected, atol=0.05)          # HU
    assert np.abs(out - net).mean() > 1.0                         # the blend did change the result

    holes = np.zeros(clean.shape, bool)
    holes[20:40, 30:60] = True
    net_h, _ = restore_volume(clean, mask=holes, blend=False, **kw)
    out_h, std = restore_volume(clean, mask=holes, samples=2, **kw)
    bih = baselines.biharmonic((clean + 1000) / 2000, holes) * 2000 - 1000
    np.testing.assert_allclose(out_h[holes], 0.5 * net_h[holes] + 0.5 * bih[holes], atol=0.05)
    np.testing.assert_array_equal(out_h[~holes], clean[~holes])   # known pixels bit-identical
    assert (std[holes] > 0).all() and (std[~holes] == 0).all()

    plain = dataclasses.replace(lm, meta={k: v for k, v in lm.meta.items() if k != "blend"})
    alone, _ = restore_volume(noisy, model=plain, modality="CT", precision="fp32", ensemble=1)
    np.testing.assert_array_equal(alone, net)                     # no weights stored: the network alone


def test_the_uncertainty_map_widens_where_network_and_classical_disagree(ct_slice_hu):
    from medvae.models.checkpoint import load_model

    clean = np.squeeze(ct_slice_hu)[64:192, 32:224].astype(np.float32)
    holes = np.zeros(clean.shape, bool)
    holes[20:40, 30:60] = True
    lm = load_model("default")
    cal = {"std_scale_holes": 1e-9, "std_floor_holes": 0.0, "std_edge_holes": 0.0, "std_blend_holes": 2.0}
    lm = dataclasses.replace(lm, meta={**lm.meta, "calibration": cal, "blend": {"weight_holes": 0.5}})
    kw = dict(model=lm, modality="CT", precision="fp32", ensemble=1, mask=holes)
    net, _ = restore_volume(clean, blend=False, **kw)
    _, std = restore_volume(clean, samples=2, **kw)
    bih = baselines.biharmonic((clean + 1000) / 2000, holes) * 2000 - 1000
    # std = blend term * |network - classical| (the sampled spread weighs 1e-9 here), in HU
    np.testing.assert_allclose(std[holes].astype(np.float64), 2.0 * np.abs(net - bih)[holes], rtol=2e-3, atol=0.5)
    # --no-blend restores with the network alone, but its map keeps the term it was calibrated with
    net_only, std_nb = restore_volume(clean, samples=2, blend=False, **kw)
    np.testing.assert_array_equal(net_only, net)
    np.testing.assert_array_equal(std_nb, std)


def test_the_blind_noise_estimate_equals_scikit_images(ct_slice_hu):
    from skimage.restoration import estimate_sigma

    clean = (np.squeeze(ct_slice_hu).astype(np.float64) + 1000) / 2000
    for sigma in (0.01, 0.05, 0.1):
        noisy = clean + np.random.default_rng(3).normal(0, sigma, clean.shape)
        assert baselines.estimated_sigma(noisy) == pytest.approx(estimate_sigma(noisy), rel=1e-12)
    assert baselines.estimated_sigma(np.zeros((32, 32))) == 0.0           # no detail at all
    np.testing.assert_array_equal(baselines.nl_means(np.zeros((32, 32))), np.zeros((32, 32)))
