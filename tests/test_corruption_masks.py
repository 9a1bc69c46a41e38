"""Mask corruptions: coverage in range, fill, replay, 3-D, mask files, parameter checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medvae.corruption import (
    REGISTRY, BoxMask, FileMask, MissingSlices, RandBoxMask, RandMissingSlices, RandStripeMask,
    RandStrokeMask, StripeMask, replay,
)

def _mid(vol: np.ndarray) -> np.ndarray:
    return vol[..., vol.shape[-1] // 2].copy()


@pytest.mark.parametrize("cls, kw", [
    (RandBoxMask, {"coverage": (0.1, 0.2)}),
    (RandBoxMask, {"coverage": (0.3, 0.35), "size": (0.1, 0.4)}),
    (RandStrokeMask, {"coverage": (0.05, 0.1)}),
    (RandStrokeMask, {"coverage": (0.15, 0.2), "width": (0.02, 0.06)}),
    (RandStripeMask, {"coverage": (0.05, 0.1)}),
    (RandStripeMask, {"coverage": (0.1, 0.12), "width": (1, 6)}),
])
def test_coverage_lands_in_range_on_real_slice(cls, kw, mr_volume):
    img = _mid(mr_volume)
    t = cls(**kw).set_random_state(0)
    lo, hi = kw["coverage"]
    for _ in range(15):
        out, mask = t(img)
        assert lo <= mask.mean() <= hi, (t.last_params, mask.mean())
        assert mask.shape == (1, *img.shape[1:]) and mask.dtype == bool
        assert np.all(out[0][mask[0]] == 0.0)  # default fill 0 = bottom of the window
        assert np.array_equal(out[0][~mask[0]], img[0][~mask[0]])


def test_missing_slices_coverage_on_real_volume(mr_volume):
    vol = mr_volume
    t = RandMissingSlices(coverage=(0.1, 0.2), run_length=(1, 3)).set_random_state(1)
    for _ in range(8):
        out, mask = t(vol)
        per_slice = mask[0].reshape(-1, vol.shape[-1]).all(0)
        frac = per_slice.mean()
        assert 0.1 <= frac <= 0.2
        assert np.array_equal(mask[0], np.broadcast_to(per_slice, mask.shape[1:]))  # whole slices
        assert np.all(out[0][..., per_slice] == 0)


def test_missing_slices_needs_3d():
    with pytest.raises(ValueError, match="3-D"):
        RandMissingSlices()(np.zeros((1, 16, 16), np.float32))
    # 4 slices: one is 25 %, above the 20 % the default allows (it said "could not reach a coverage")
    with pytest.raises(ValueError, match=r"a volume of 4 slices cannot lose a share in \[0.05, 0.2\] of them"):
        RandMissingSlices().set_random_state(0)(np.zeros((1, 8, 8, 4), np.float32))


@pytest.mark.parametrize("name", ["boxes", "strokes", "stripes", "missing_slices"])
def test_mask_seed_replay_and_input_safety(name, mr_volume):
    img = mr_volume[:, ::4, ::4, :].copy() if name == "missing_slices" else _mid(mr_volume)
    ref = img.copy()
    t = REGISTRY[name]().set_random_state(3)
    out, mask = t(img)
    assert np.array_equal(img, ref)
    rec = json.loads(json.dumps(t.record))
    r_out, r_mask = replay(img, rec)
    assert np.array_equal(r_out, out) and np.array_equal(r_mask, mask)
    o2, m2 = REGISTRY[name]().set_random_state(3)(img)
    o3, m3 = REGISTRY[name]().set_random_state(4)(img)
    assert np.array_equal(m2, mask) and not np.array_equal(m3, mask)
    # torch in, torch out, input untouched
    timg = torch.from_numpy(img.copy())
    tout, tmask = t(timg, randomize=False)
    assert torch.equal(timg, torch.from_numpy(ref))
    assert tmask.dtype == torch.bool and np.array_equal(tout.numpy(), out)


def test_boxes_and_strokes_in_3d():
    vol = np.ones((1, 32, 32, 16), np.float32)
    for cls in (RandBoxMask, RandStrokeMask):
        out, mask = cls(coverage=(0.05, 0.15)).set_random_state(0)(vol)
        assert 0.05 <= mask.mean() <= 0.15 and mask.shape == (1, 32, 32, 16)


def test_deterministic_masks_and_fill_min():
    img = np.arange(2 * 10 * 10, dtype=np.float32).reshape(2, 10, 10) + 5
    out, mask = BoxMask([[[0, 0], [2, 3]]], fill="min")(img)
    assert mask.sum() == 6
    assert out[0, 0, 0] == img[0].min() and out[1, 0, 0] == img[1].min()  # per channel
    out, mask = StripeMask([[4, 6]], axis=1)(img)
    assert mask[0, :, 4:6].all() and mask.sum() == 20
    out, mask = MissingSlices([0, 3], axis=2)(np.ones((1, 4, 4, 5)))
    assert mask[0, :, :, [0, 3]].all() and mask.sum() == 32


@pytest.mark.parametrize("cls", [RandBoxMask, RandStrokeMask])
def test_a_single_coverage_is_at_least_that_fraction(cls, mr_volume):
    # a single number used to need an exact pixel count and raised "could not reach ... (reached 0.100)"
    img = _mid(mr_volume)
    t = cls(coverage=0.1).set_random_state(0)
    for _ in range(10):
        out, mask = t(img)
        assert 0.1 <= mask.mean() <= 0.11, (t.last_params, mask.mean())  # 5 % over, or the closest shape
        again, again_mask = replay(img, t.record)
        assert np.array_equal(again_mask, mask) and np.array_equal(again, out)


def test_unreachable_coverage_raises():
    with pytest.raises(ValueError, match="coverage"):
        RandBoxMask(coverage=(0.001, 0.002), size=(0.5, 0.6), max_tries=50).set_random_state(0)(
            np.ones((1, 32, 32), np.float32))


@pytest.mark.parametrize("make, word", [
    (lambda: RandBoxMask(coverage=(0.1, 1.5)), "coverage"),
    (lambda: RandBoxMask(coverage=-0.1), "coverage"),
    (lambda: RandBoxMask(size=(0.0, 0.2)), "size"),
    (lambda: RandStrokeMask(width=(0.2, 0.1)), "width"),
    (lambda: RandStripeMask(width=0), "width"),
    (lambda: RandMissingSlices(run_length=(0, 2)), "run_length"),
    (lambda: RandBoxMask(fill="max"), "fill"),
])
def test_bad_mask_parameters(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_file_mask_roundtrip_and_shape_check(tmp_path):
    import nibabel as nib

    m = np.zeros((16, 12, 1), np.uint8)
    m[2:5, 3:9, 0] = 1
    path = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(m, np.eye(4)), str(path))
    img = np.ones((1, 16, 12), np.float32)
    out, mask = FileMask(path)(img)
    assert mask.sum() == 18 and np.all(out[mask] == 0)
    t = REGISTRY["file_mask"](path=str(path)).set_random_state(0)
    t(img)
    assert np.array_equal(replay(img, t.record)[1], mask)
    with pytest.raises(ValueError, match="shape"):
        FileMask(path)(np.ones((1, 16, 13), np.float32))
    # each call's mask is its own: an edit of one emptied every later mask of the file (a shared cache)
    first = FileMask(path)(torch.ones((1, 16, 12)))[1]
    first.zero_()
    assert FileMask(path)(torch.ones((1, 16, 12)))[1].sum() == 18
    with pytest.raises(ValueError, match="does not exist"):
        FileMask(tmp_path / "nope.nii.gz")(img)


def test_rand_file_mask_record_replays_from_another_directory(tmp_path, monkeypatch):
    import nibabel as nib

    m = np.zeros((16, 12), np.uint8)
    m[2:5, 3:9] = 1
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    nib.save(nib.Nifti1Image(m, np.eye(4)), str(tmp_path / "a" / "mask.nii.gz"))
    img = np.ones((1, 16, 12), np.float32)
    monkeypatch.chdir(tmp_path / "a")
    t = REGISTRY["file_mask"](path="mask.nii.gz").set_random_state(0)
    out, mask = t(img)
    assert t.record["params"]["path"] == str((tmp_path / "a" / "mask.nii.gz").resolve())
    monkeypatch.chdir(tmp_path / "b")  # the relative path named no file from here
    again, mask2 = replay(img, json.loads(json.dumps(t.record)))
    assert np.array_equal(again, out) and np.array_equal(mask2, mask) and mask.sum() == 18


def test_given_boxes_and_strokes_that_draw_nothing_are_refused_by_name():
    from medvae.corruption import BoxMask, StripeMask, StrokeMask

    with pytest.raises(ValueError, match="each stop must lie past its start"):  # once an empty mask
        BoxMask([[[10, 10], [5, 20]]])
    with pytest.raises(ValueError, match=r"stripes: each stop must lie past its start, got \[\[5, 3\]\]"):
        StripeMask([[5, 3]])
    with pytest.raises(ValueError, match=r"stroke \[\[40.0, 40.0\], \[50.0, 50.0\]\] \(width 3.0\) lies outside the "
                                         r"image of spatial shape \(32, 28\)"):  # once "negative dimensions"
        StrokeMask([{"points": [[40, 40], [50, 50]], "width": 3}])(np.ones((1, 32, 28), np.float32))
    img = np.ones((1, 16, 16), np.float32)  # boxes and stripes beyond the image erased nothing, silently
    with pytest.raises(ValueError, match=r"box \[\[20, 20\], \[30, 30\]\] lies outside the image of spatial shape \(16, 16\)"):
        BoxMask([[[20, 20], [30, 30]]])(img)
    with pytest.raises(ValueError, match=r"stripe \[20, 25\] lies outside the image: axis 0 has 16 pixels"):
        StripeMask([[20, 25]], axis=0)(img)
    out, mask = BoxMask([[[10, 10], [30, 30]]])(img)  # a box partly inside is cut to the image
    assert mask.sum() == 36 and out[mask].max() == 0
