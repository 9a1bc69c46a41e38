"""Slices wholly inside the mask are filled from their neighbouring slices (medvae.slice_gaps)."""
from __future__ import annotations

import numpy as np

from medvae.corruption import MissingSlices
from medvae.evaluate import psnr
from medvae.io import load_scan
from medvae.restore import restore_volume
from medvae.intensity import IntensityPolicy
from medvae.models.checkpoint import LoadedModel, checkpoint_dict
from medvae.slice_gaps import fill_missing_slices, missing_slices, slice_batches


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


def test_a_filled_slice_without_known_triples_is_never_certain(dev_data):
    # 3 slices, the 1st and 3rd missing: no known triple, one known neighbour; the map was exactly 0
    # where the error reached 1200 HU
    ct = np.asarray(load_scan(dev_data / "dicom/series_ct_head").array[:, :, 50:53], np.float32)
    mask = np.zeros(ct.shape, bool)
    mask[:, :, [0, 2]] = True
    restored, std = restore_volume(ct, modality="CT", mask=mask, samples=2, ensemble=1)
    for k in (0, 2):
        err = np.abs(restored[:, :, k] - ct[:, :, k])
        s = std[:, :, k].astype(np.float32)
        assert s.max() > 0 and np.mean(err <= 2 * s) > 0.5, (k, float(s.max()), float(np.mean(err <= 2 * s)))
        assert s.min() > 0, k  # 0 at each pixel equal to the known slice's median (integer HU: hundreds)
    # two slices, one missing; and a missing slice whose known neighbours agree exactly at some pixels
    two = ct[:, :, :2].copy()
    gap = np.zeros(two.shape, bool)
    gap[:, :, 0] = True
    _, std2 = restore_volume(two, modality="CT", mask=gap, samples=2, ensemble=1)
    assert std2[:, :, 0].min() > 0
    v = np.stack([np.full((4, 4), 5.0, np.float32)] * 5, axis=2)
    v[0, 0, :] = [1, 2, 3, 4, 5]  # the only pixel that changes from slice to slice
    sd = np.zeros(v.shape, np.float32)
    fill_missing_slices(v, np.array([False, False, True, False, False]), sd)
    assert sd[:, :, 2].min() > 0 and sd[0, 0, 2] > sd[1, 1, 2]
    # two known neighbours and no triple: their change is the evidence
    v = np.stack([np.full((3, 3), 10.0 * k, np.float32) for k in range(4)], axis=2)
    sd = np.zeros(v.shape, np.float32)
    fill_missing_slices(v, np.array([True, False, False, True]), sd)
    assert sd[:, :, 0].min() > 0 and sd[:, :, 3].min() > 0


def test_missing_slices_never_reach_the_network_and_the_other_slices_restore_as_before(dev_data, tmp_path):
    """Each missing slice used to cost a forward pass whose result the gap fill then overwrote."""
    import torch

    from medvae.models.vae import MaskedVAE, VAEConfig
    from medvae.tracking import load_model

    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)), IntensityPolicy()), path)
    lm = load_model(path)
    assert isinstance(lm, LoadedModel)
    seen = []
    forward = lm.model.posterior_mean
    lm.model.posterior_mean = lambda x, m: seen.append(x.shape[0]) or forward(x, m)

    vol = np.asarray(load_scan(dev_data / "nifti/nibabel_example4d.nii.gz").array, np.float32)[:, :, 8:16]
    mask = np.zeros(vol.shape, bool)
    mask[40:60, 30:50, :] = True                   # a hole in every slice of the real MR volume
    gappy = mask.copy()
    gappy[:, :, [2, 3, 6]] = True                  # and three missing slices
    # one window for both: the missing slices' voxels are left out of a window taken from the scan
    kw = dict(model=lm, modality="MR", ensemble=1, coarse_holes=False, blend=False, batch_size=3,
              window=IntensityPolicy().window_for(vol, "MR"))
    full, _ = restore_volume(vol, mask=mask, **kw)
    assert sum(seen) == 8
    seen.clear()
    out, _ = restore_volume(vol, mask=gappy, **kw)
    assert sum(seen) == 5 and seen == [2, 2, 1]     # batches (0, 2), (4, 6), (7, 8)
    known = ~np.isin(np.arange(8), [2, 3, 6])
    np.testing.assert_array_equal(out[:, :, known], full[:, :, known])
    np.testing.assert_allclose(out[:, :, 6], (out[:, :, 5] + out[:, :, 7]) / 2, rtol=1e-6)
    assert out.shape == vol.shape and np.isfinite(out).all()


def test_slice_batches_split_runs_of_known_slices():
    skip = np.array([True, False, False, False, True, True, False])
    assert slice_batches(skip, 2) == [(1, 3), (3, 4), (6, 7)]
    assert slice_batches(np.zeros(5, bool), 8) == [(0, 5)]
    assert slice_batches(np.ones(3, bool), 2) == []


def test_a_missing_slice_of_an_unevenly_spaced_dicom_series_is_interpolated_by_position(dev_data, tmp_path):
    # slices at 0, 1.5, 3, 4.5, 9 and 10.5 mm; the one at 4.5 lies a quarter of the way from 3 to 9 mm,
    # and was filled halfway between them (up to 466 HU off)
    import nibabel as nib
    import pydicom

    from medvae.restore import restore_scan

    folder = tmp_path / "uneven"
    folder.mkdir()
    for i, (f, z) in enumerate(zip(sorted((dev_data / "dicom/series_ct_head").glob("*.dcm"))[50:56],
                                   (0, 1.5, 3, 4.5, 9, 10.5))):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [0, 0, z]
        ds.save_as(folder / f"IM{i}.dcm")
    scan = load_scan(folder)
    z = [float(d.ImagePositionPatient[2]) for d in scan.datasets]
    k = z.index(4.5)
    lo, hi = k - 1, k + 1
    mask = np.zeros(scan.array.shape, np.uint8)
    mask[:, :, k] = 1
    nib.save(nib.Nifti1Image(mask, scan.affine), tmp_path / "mask.nii.gz")
    restore_scan(folder, tmp_path / "out", mask_path=tmp_path / "mask.nii.gz", ensemble=1)
    out = load_scan(tmp_path / "out").array
    t = (4.5 - z[lo]) / (z[hi] - z[lo])
    np.testing.assert_allclose(out[:, :, k], (1 - t) * out[:, :, lo] + t * out[:, :, hi], atol=1.0)
    assert np.abs(out[:, :, k] - (out[:, :, lo] + out[:, :, hi]) / 2).max() > 50


def test_filling_a_part_of_a_scan_that_holds_its_fill_span_gives_the_whole_scans_fill(dev_ct_head):
    """The streamed DICOM restore fills each batch's missing slices from that batch's slices: a gap at the
    first or last slices then got another uncertainty than from the whole scan. A part holding
    fill_span, with the whole scan's step, gives the whole scan's filled slices exactly."""
    from medvae.slice_gaps import fill_span, typical_step

    ct = np.asarray(load_scan(dev_ct_head).array[:, :, 44:60], np.float32)  # 16 contiguous brain slices
    nz = ct.shape[2]
    missing = np.zeros(nz, bool)
    missing[[0, 1, nz // 2, nz - 1]] = True               # both ends and one inside
    positions = np.cumsum(np.r_[0.0, np.full(nz - 1, 1.5)])
    positions[nz // 2 + 1:] += 3.0                         # a dropped file: one step twice as long
    whole, whole_std = ct.copy(), np.zeros(ct.shape, np.float32)
    fill_missing_slices(whole, missing, whole_std, positions=positions)
    step = typical_step(positions)
    assert step == 1.5
    for k0 in range(0, nz, 2):
        k1 = min(k0 + 2, nz)
        a, b = fill_span(missing, k0, k1)
        assert a <= k0 and b >= k1
        part, part_std = ct[:, :, a:b].copy(), np.zeros((*ct.shape[:2], b - a), np.float32)
        fill_missing_slices(part, missing[a:b], part_std, positions=positions[a:b], step=step)
        np.testing.assert_array_equal(part[:, :, k0 - a:k1 - a], whole[:, :, k0:k1])
        np.testing.assert_array_equal(part_std[:, :, k0 - a:k1 - a], whole_std[:, :, k0:k1])
        # the mean alone reads only the nearest known slices
        a_mean, b_mean = fill_span(missing, k0, k1, uncertainty=False)
        part = ct[:, :, a_mean:b_mean].copy()
        fill_missing_slices(part, missing[a_mean:b_mean], positions=positions[a_mean:b_mean], step=step)
        np.testing.assert_array_equal(part[:, :, k0 - a_mean:k1 - a_mean], whole[:, :, k0:k1])
    # the batch's own slices alone (0 and 1 missing, 2 known) gave the first slices another std
    part, part_std = ct[:, :, :3].copy(), np.zeros((*ct.shape[:2], 3), np.float32)
    fill_missing_slices(part, missing[:3], part_std, positions=positions[:3], step=step)
    np.testing.assert_array_equal(part[:, :, :2], whole[:, :, :2])
    assert np.abs(part_std[:, :, :2] - whole_std[:, :, :2]).max() > 100


def test_a_wholly_masked_slice_that_holds_an_image_is_said_at_corrupt_and_restore(dev_data, tmp_path, caplog):
    """``train`` masks a noise slice whole beside slices with holes; ``restore --mask`` interpolates such a
    slice from its neighbours (a missing slice) and had thrown the noisy slice away without a word."""
    import nibabel as nib

    from medvae.corruption import corrupt_scan
    from medvae.restore import restore_scan

    src = dev_data / "nifti/heudiconv_axasc35.nii.gz"
    with caplog.at_level("WARNING"):
        res = corrupt_scan(src, tmp_path / "c.nii.gz", recipe="train", seed=3)
    whole = np.asarray(nib.load(res.mask).dataobj).astype(bool).all(axis=(0, 1))
    assert whole.any() and not whole.all()  # this seed's draw: noise slices beside holes
    at = np.flatnonzero(whole)
    shown = ", ".join(map(str, at[:8])) + (f" and {len(at) - 8} more" if len(at) > 8 else "")
    assert f"recipe 'train' masks slice(s) {shown} whole" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        restore_scan(res.output, tmp_path / "r.nii.gz", mask_path=res.mask, ensemble=1)
    assert f"c_mask.nii.gz: slice(s) {shown} lie wholly inside the mask but hold an image" in caplog.text
    # a missing slice as the missing_slices corruption writes it (one value): nothing to say
    caplog.clear()
    with caplog.at_level("WARNING"):
        gone = corrupt_scan(src, tmp_path / "g.nii.gz", recipe="missing_slices", seed=1)
        restore_scan(gone.output, tmp_path / "rg.nii.gz", mask_path=gone.mask, ensemble=1)
    assert "wholly" not in caplog.text


def test_a_padded_ct_slice_masked_but_for_its_padding_is_a_missing_slice(dev_data, tmp_path, caplog):
    """``corrupt`` leaves CT padding out of its masks: a missing slice (or a noise slice of a mix) was then no
    'wholly masked' slice, and the network restored it as one great hole, 1168 HU RMS off in the field of
    view. It is interpolated like any missing slice, and its padding comes back as it was."""
    from medvae.restore import restore_volume

    ct = load_scan(dev_data / "dicom/pydicom/CT_small.dcm").array[:, :, 0].astype(np.float32)
    vol = np.stack([ct + 10.0 * k for k in range(5)], axis=2)  # a scan that changes linearly along Z
    pad = np.zeros(vol.shape, bool)
    pad[:80] = True  # 62 % of the slice: a limit of half a slice missed a CT padded outside a circle
    vol[pad] = -3024.0
    mask = np.zeros(vol.shape, bool)
    mask[:, :, 2] = ~pad[:, :, 2]  # slice 2: everything but its padding, as corrupt writes it
    mask[90:110, 40:60, [1, 3]] = True  # holes elsewhere: inpainting
    mean, std = restore_volume(vol, mask=mask, modality="CT", samples=2, ensemble=1, blend=False)
    np.testing.assert_array_equal(mean[:, :, 2][pad[:, :, 2]], -3024.0)  # the padding as it came
    assert (std[:, :, 2][pad[:, :, 2]] == 0).all() and (std[:, :, 2][mask[:, :, 2]] > 0).all()
    np.testing.assert_allclose(mean[:, :, 2][mask[:, :, 2]],
                               ((mean[:, :, 1] + mean[:, :, 3]) / 2)[mask[:, :, 2]], rtol=1e-5, atol=1e-3)


def test_corrupt_says_nothing_of_wholly_masked_slices_when_every_slice_is(caplog):
    """Noise slices beside slices boxed whole: a mask over every voxel, which restore denoises as global
    noise; the warning that restore would interpolate them was wrong."""
    from medvae.corruption.volume import _warn_noise_slices

    image = np.random.default_rng(0).random((8, 8, 3))
    image[:, :, 1] = 0.0  # a box over the whole slice, filled with one value
    with caplog.at_level("WARNING"):
        _warn_noise_slices("allwhole", np.ones((8, 8, 3), bool), image, image, False)
        assert caplog.text == ""
        mask = np.ones((8, 8, 3), bool)
        mask[2:4, 2:4, 2] = False  # slice 2 has a hole now, not a whole mask
        _warn_noise_slices("mix", mask, image, image, False)
    assert "recipe 'mix' masks slice(s) 0 whole" in caplog.text
    caplog.clear()
    ct = np.where(image > 0.5, 40.0, -100.0)
    ct[0] = -3024.0  # padding, which corrupt leaves out of the mask
    mask = np.zeros(ct.shape, bool)
    mask[1:, :, 0] = True  # slice 0: all but its padding, noisy
    mask[3:5, 3:5, 2] = True
    noisy = np.where(mask, ct + image, ct)
    with caplog.at_level("WARNING"):
        _warn_noise_slices("ct", mask, noisy, ct, True)
    assert "recipe 'ct' masks slice(s) 0 whole" in caplog.text
