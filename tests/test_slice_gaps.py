"""Slices wholly inside the mask are filled from their neighbouring slices (medvae.slice_gaps)."""
from __future__ import annotations

import numpy as np

from medvae.corruption import MissingSlices
from medvae.evaluate import psnr
from medvae.io import load_scan
from medvae.restore import restore_volume
from medvae.slice_gaps import fill_missing_slices, missing_slices


def test_missing_slices_of_a_real_mr_volume_are_interpolated_with_an_uncertainty_that_covers_the_error(dev_data):
    """Before, the network got a blank slice and returned a blank one (7.5 dB) with a small std."""
    vol = np.asarray(load_scan(dev_data / "nifti/nibabel_example4d.nii.gz").array, np.float32)
    image, mask = (np.asarray(a[0]) for a in MissingSlices([10, 11, 15], axis=2)(vol[None]))
    image, mask = image.astype(np.float32), mask.astype(bool)
    before = image.copy()
    restored, std = restore_volume(image, modality="MR", mask=mask, samples=2)
    np.testing.assert_array_equal(image, before)
    window = tuple(np.percentile(vol, [0.5, 99.5]))
    for k, (lo, hi, t) in {10: (9, 12, 1 / 3), 11: (9, 12, 2 / 3), 15: (14, 16, 0.5)}.items():
        np.testing.assert_allclose(restored[:, :, k], (1 - t) * restored[:, :, lo] + t * restored[:, :, hi],
                                   rtol=1e-6, atol=1e-3)
        assert psnr(vol[:, :, k], restored[:, :, k], window=window) > 20.0
        err = np.abs(restored[:, :, k] - vol[:, :, k])
        assert 0.85 < np.mean(err <= 2 * std[:, :, k].astype(np.float32)) < 0.995
    np.testing.assert_array_equal(restored[:, :, 12][~mask[:, :, 12]], vol[:, :, 12][~mask[:, :, 12]])


def test_the_gap_rule_holds_ends_and_leaves_scans_without_missing_slices_alone():
    v = np.stack([np.full((3, 3), 10.0 * k, np.float32) for k in range(6)], axis=2)
    m = np.zeros(v.shape, bool)
    m[:, :, [0, 4, 5]] = True
    m[0, 0, 2] = True                                   # a hole, not a missing slice
    assert missing_slices(m).tolist() == [True, False, False, False, True, True]
    assert not missing_slices(np.ones((3, 3, 4), bool)).any()     # everything masked: global noise
    std = np.zeros(v.shape, np.float16)
    fill_missing_slices(v, missing_slices(m), std)
    assert v[0, 0].tolist() == [10.0, 10.0, 20.0, 30.0, 30.0, 30.0]   # held beyond the known slices
    # the std grows with the distance to the last known slice (no linear continuation is trusted)
    assert 0 < std[0, 0, 4] < std[0, 0, 5] and std[0, 0, 0] > 0
