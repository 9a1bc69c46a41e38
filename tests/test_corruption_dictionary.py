"""Dictionary corruptions: one randomization for all keys, paired noise, mask key union."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from medvae.corruption import GaussianNoise
from medvae.corruption.dictionary import (
    RandBoxMaskd, RandGaussianNoised, RandLowDoseCTd, RandRicianNoised, RandStripeMaskd,
)


def _pair(shape=(1, 32, 32)):
    rng = np.random.default_rng(0)
    a = rng.random(shape).astype(np.float32)
    return {"a": a, "b": a.copy(), "other": 1}


def test_paired_keys_get_identical_noise():
    data = _pair()
    t = RandGaussianNoised(["a", "b"], sigma=(0.05, 0.1)).set_random_state(0)
    out = t(data)
    assert np.array_equal(out["a"], out["b"]) and not np.array_equal(out["a"], data["a"])
    assert out["mask"].shape == (1, 32, 32) and out["mask"].all()
    assert out["other"] == 1 and np.array_equal(data["a"], data["b"])  # inputs untouched
    p = t.last_params["a"]
    assert t.last_params["b"] == p
    assert np.array_equal(GaussianNoise.from_params(**p)(data["a"])[0], out["a"])
    # a float64 key gets the same field: numpy's float64 draw is another algorithm (correlation 0 before)
    mixed = RandGaussianNoised(["a", "b"], sigma=0.1).set_random_state(0)(
        {"a": data["a"], "b": data["a"].astype(np.float64)})
    assert mixed["b"].dtype == np.float64
    np.testing.assert_allclose(mixed["b"], mixed["a"], rtol=0, atol=1e-6)


def test_independent_noise_shares_the_level():
    data = _pair()
    t = RandRicianNoised(["a", "b"], same_noise=False, sigma=(0.02, 0.1)).set_random_state(0)
    out = t(data)
    assert not np.array_equal(out["a"], out["b"])
    pa, pb = t.last_params["a"], t.last_params["b"]
    assert pa["sigma"] == pb["sigma"] and pa["seed"] != pb["seed"]
    with pytest.raises(ValueError, match="same_noise must be True or False, not 'no'"):  # "no" was true
        RandRicianNoised(["a", "b"], same_noise="no", sigma=0.05)


def test_independent_noise_never_repeats_a_key_or_an_earlier_call():
    # the per-key seeds were drawn from a stream that started where the inner transform's did: the
    # 4th key got the 1st key's noise bit for bit
    t = RandGaussianNoised(list("abcdef"), sigma=0.05, same_noise=False).set_random_state(0)
    seeds = []
    for _ in range(3):
        t({k: np.zeros((1, 8, 8), np.float32) for k in "abcdef"})
        seeds += [t.last_params[k]["seed"] for k in "abcdef"]
    assert len(set(seeds)) == len(seeds)


def test_same_seed_same_output_and_mask_union():
    data = _pair((1, 48, 48))
    data["mask"] = np.zeros((1, 48, 48), bool)
    data["mask"][0, :2] = True
    o1 = RandBoxMaskd(["a", "b"], coverage=(0.1, 0.2)).set_random_state(5)(data)
    o2 = RandBoxMaskd(["a", "b"], coverage=(0.1, 0.2)).set_random_state(5)(data)
    o3 = RandBoxMaskd(["a", "b"], coverage=(0.1, 0.2)).set_random_state(6)(data)
    assert np.array_equal(o1["a"], o2["a"]) and np.array_equal(o1["mask"], o2["mask"])
    assert not np.array_equal(o1["mask"], o3["mask"])
    assert o1["mask"][0, :2].all()  # the existing mask is kept
    boxes = o1["mask"] & ~data["mask"]
    assert np.array_equal(o1["a"] == 0, o1["b"] == 0) and np.all(o1["a"][boxes] == 0)


def test_an_existing_mask_of_spatial_shape_is_united_and_one_of_several_channels_refused():
    data = _pair((1, 32, 32))
    data["mask"] = np.zeros((32, 32), bool)  # no channel axis: united as (1, 32, 32)
    data["mask"][0] = True
    out = RandBoxMaskd(["a"], coverage=(0.1, 0.2)).set_random_state(0)(data)
    assert out["mask"].shape == (1, 32, 32) and out["mask"][0, 0].all()
    data["mask"] = np.zeros((2, 32, 32), bool)  # it made the union two channels
    with pytest.raises(ValueError, match=r"existing mask shape \(2, 32, 32\) is neither \(1, \*spatial\)"):
        RandBoxMaskd(["a"], coverage=(0.1, 0.2)).set_random_state(0)(data)


def test_torch_values_and_custom_mask_key():
    data = {"img": torch.rand(1, 32, 32)}
    ref = data["img"].clone()
    out = RandStripeMaskd("img", mask_key="holes", coverage=(0.05, 0.1)).set_random_state(0)(data)
    assert torch.equal(data["img"], ref)
    assert isinstance(out["img"], torch.Tensor) and out["holes"].dtype == torch.bool
    assert 0.05 <= out["holes"].float().mean().item() <= 0.1


def test_skipped_call_writes_empty_mask():
    out = RandGaussianNoised("a", prob=0.0, sigma=0.1)(_pair())
    assert not out["mask"].any() and np.array_equal(out["a"], _pair()["a"])


def test_lowdose_dict_on_paired_ct():
    hu = np.full((1, 32, 32), 0.5, np.float32)
    out = RandLowDoseCTd(["a", "b"], dose=0.1, hu_window=(-1000, 1000)).set_random_state(0)({"a": hu, "b": hu})
    assert np.array_equal(out["a"], out["b"]) and out["a"].std() > 0


def test_wrapper_and_inner_streams_are_independent():
    # seeded alike, whether call 2 was applied was exactly "call 1's sigma < 0.5" (152/152 seeds)
    seen = set()
    for seed in range(120):
        t = RandGaussianNoised("img", sigma=(0.0, 1.0), prob=0.5).set_random_state(seed)
        t({"img": np.zeros((1, 8, 8), np.float32)})
        first = t.last_params["img"]
        if first is None:
            continue
        t({"img": np.zeros((1, 8, 8), np.float32)})
        seen.add((first["sigma"] < 0.5, t.last_params["img"] is not None))
    assert seen == {(True, True), (True, False), (False, True), (False, False)}


@pytest.mark.parametrize("how", ["seed", "state"])
def test_same_seed_same_sequence(how):
    def run():
        t = RandGaussianNoised("img", sigma=(0.0, 1.0), prob=0.5)
        t.set_random_state(7) if how == "seed" else t.set_random_state(state=np.random.RandomState(7))
        assert t.transform.R is not t.R
        out = []
        for _ in range(6):
            t({"img": np.zeros((1, 8, 8), np.float32)})
            out.append(t.last_params["img"])
        return out

    a = run()
    assert a == run() and any(p is None for p in a) and any(p is not None for p in a)


def test_mixed_numpy_and_torch_keys_share_one_mask():
    data = {"a": np.zeros((1, 32, 32), np.float32), "b": torch.zeros(1, 32, 32)}
    out = RandBoxMaskd(["a", "b"]).set_random_state(0)(data)
    assert isinstance(out["mask"], np.ndarray) and out["mask"].dtype == bool  # the first key's type
    assert isinstance(out["b"], torch.Tensor) and np.array_equal(out["b"].numpy(), out["a"])
    assert out["mask"].any()
    out = RandBoxMaskd(["b", "a"]).set_random_state(0)(data)
    assert isinstance(out["mask"], torch.Tensor) and out["mask"].dtype == torch.bool


def test_keys_of_different_spatial_shapes_are_refused_naming_them():
    data = {"a": np.zeros((1, 32, 32), np.float32), "b": np.zeros((1, 16, 16), np.float32)}
    with pytest.raises(ValueError, match=r"keys 'a' and 'b' have different spatial shapes \(32, 32\) and \(16, 16\)"):
        RandBoxMaskd(["a", "b"]).set_random_state(0)(data)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_a_bad_key_is_refused_on_every_call_and_named(prob):
    """NaN passed whenever prob skipped the call (an intermittent failure at prob 0.5), and the error named
    the inner GaussianNoise, not the key."""
    bad = np.zeros((1, 8, 8), np.float32)
    bad[0, 1, 1] = np.nan
    t = RandGaussianNoised(["t1", "t2"], prob=prob).set_random_state(0)
    with pytest.raises(ValueError, match=r"^RandGaussianNoised 't2': 1 of 64 values are NaN or infinite"):
        t({"t1": np.zeros((1, 8, 8), np.float32), "t2": bad})
    with pytest.raises(ValueError, match=r"RandGaussianNoised 't2': expected a channel-first image"):
        t({"t1": np.zeros((1, 8, 8), np.float32), "t2": np.zeros(8, np.float32)})  # was "different spatial shapes"


DICT_CLASSES = [
    "RandCorruptiond", "RandGaussianNoised", "RandRicianNoised", "RandLowDoseCTd", "RandKSpaceSpikesd",
    "RandGibbsRingingd", "RandBiasFieldd", "RandMotionGhostingd", "RandBoxMaskd", "RandStrokeMaskd",
    "RandStripeMaskd", "RandMissingSlicesd", "FileMaskd",
]


def test_dictionary_classes_import_from_the_package():
    from medvae.corruption import (
        FileMaskd, RandBiasFieldd, RandBoxMaskd, RandCorruptiond, RandGaussianNoised, RandGibbsRingingd,
        RandKSpaceSpikesd, RandLowDoseCTd, RandMissingSlicesd, RandMotionGhostingd, RandRicianNoised,
        RandStripeMaskd, RandStrokeMaskd, dictionary,
    )

    imported = [RandCorruptiond, RandGaussianNoised, RandRicianNoised, RandLowDoseCTd, RandKSpaceSpikesd,
                RandGibbsRingingd, RandBiasFieldd, RandMotionGhostingd, RandBoxMaskd, RandStrokeMaskd,
                RandStripeMaskd, RandMissingSlicesd, FileMaskd]
    assert [c.__name__ for c in imported] == DICT_CLASSES
    assert all(c is getattr(dictionary, c.__name__) and issubclass(c, RandCorruptiond) for c in imported)


@pytest.mark.parametrize("name", DICT_CLASSES)
def test_dictionary_class_is_in_the_package_all(name):
    import medvae.corruption

    assert name in medvae.corruption.__all__ and hasattr(medvae.corruption, name)


def test_package_exports_every_public_dictionary_class():
    import medvae.corruption
    from medvae.corruption import dictionary

    assert sorted(dictionary.__all__) == sorted(DICT_CLASSES)
    assert set(dictionary.__all__) <= set(medvae.corruption.__all__)


@pytest.mark.parametrize("same_noise", [True, False])
def test_dictionary_output_replays_exactly_from_its_record(same_noise):
    # a *d transform's per-key ``last_params`` is the ``params`` of an array record: replay() gives
    # each key's output and the mask back bit for bit, also after a trip through JSON
    import json

    from medvae.corruption import RandRicianNoised, replay

    data = _pair()
    t = RandRicianNoised(["a", "b"], sigma=(0.02, 0.1), same_noise=same_noise).set_random_state(3)
    out = t(data)
    for key in ("a", "b"):
        record = json.loads(json.dumps(t.records[key]))
        image, mask = replay(data[key], record)
        assert np.array_equal(image, out[key]) and np.array_equal(mask, out["mask"])
    assert np.array_equal(out["a"], out["b"]) == same_noise


def test_dictionary_mask_output_replays_exactly_from_its_record():
    from medvae.corruption import RandBoxMaskd, replay

    data = _pair((1, 48, 48))
    t = RandBoxMaskd(["a", "b"], coverage=(0.1, 0.2)).set_random_state(1)
    out = t(data)
    image, mask = replay(data["a"], t.records["a"])
    assert np.array_equal(image, out["a"]) and np.array_equal(mask, out["mask"]) and mask.any()


def test_low_dose_noise_follows_the_pixel_size_of_a_loaded_scan(dev_data):
    from monai.transforms import LoadImaged

    from medvae.corruption import LowDoseCT

    d = LoadImaged("image", ensure_channel_first=True, image_only=True)(
        {"image": str(dev_data / "dicom/pydicom-data/explicit_VR-UN.dcm")})
    t = RandLowDoseCTd(["image"], dose=0.25).set_random_state(0)
    out = t(d)
    params = t.last_params["image"]
    assert params["pixel_size_mm"] == pytest.approx(0.859375)  # the scan's, not fov_mm / 512
    # the same as the array transform told the scan's pixel size, and replayable from the record
    again, _ = LowDoseCT.from_params(**params)(d["image"].numpy())
    np.testing.assert_array_equal(np.asarray(out["image"]), again)


def test_a_mask_key_among_the_keys_is_refused():
    with pytest.raises(ValueError, match="mask_key 'image' is also one of the keys"):
        RandBoxMaskd(["image"], mask_key="image")  # the mask replaced the corrupted image


def test_a_slice_of_a_loaded_volume_keeps_its_pixel_size_and_a_bare_metatensor_has_none(dev_data):
    from monai.transforms import EnsureTyped, LoadImaged

    vol = LoadImaged("image", ensure_channel_first=True, image_only=True)(
        {"image": str(dev_data / "nifti/heudiconv_axasc35.nii.gz")})["image"]
    t = RandLowDoseCTd(["image"], dose=0.25).set_random_state(0)
    t({"image": vol[..., 3]})  # the 2-D slice the model trains on: it got no geometry
    assert t.last_params["image"]["pixel_size_mm"] == pytest.approx(3.25)
    bare = EnsureTyped("image")({"image": np.full((1, 32, 32), 0.5, np.float32)})["image"]
    t.set_random_state(0)({"image": bare})  # MONAI's identity affine is no measured 1 mm: as a plain array
    assert t.last_params["image"]["pixel_size_mm"] is None
