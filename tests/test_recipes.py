"""Corruption recipes: shipped set, replay, seeds, modality filters, one_of, errors."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medvae.corruption import list_recipes, load_recipe, replay
from medvae.corruption.recipes import RECIPE_DIR

SHIPPED = ["gaussian", "rician", "lowdose_ct", "kspace_spikes", "gibbs", "bias_field", "motion", "boxes",
           "strokes", "stripes", "missing_slices", "noise", "inpaint", "mixed"]


@pytest.fixture(scope="module")
def real_slices(ct_slice_hu, mr_volume) -> dict[str, np.ndarray]:
    """128x128 normalized real CT and MR slices (conftest: dev data or the pip-built samples), (1, 128, 128)."""
    from skimage.transform import resize

    from medvae.intensity import IntensityPolicy, normalize

    ct = normalize(ct_slice_hu[0], IntensityPolicy().window_for(ct_slice_hu, "CT"))
    mr = mr_volume[0, :, :, mr_volume.shape[-1] // 2]
    return {mod: resize(sl, (128, 128), anti_aliasing=True)[None].astype(np.float32)
            for mod, sl in (("CT", ct), ("MR", mr))}


def test_shipped_recipes_present_and_all_load():
    names = list_recipes()
    assert set(SHIPPED) <= set(names)
    for name in names:  # every recipe in the folder, including ones other modules ship
        r = load_recipe(name)
        assert r.description, name
        if name in SHIPPED:
            assert r.requires_3d == (name == "missing_slices")


@pytest.mark.parametrize("name", [n for n in SHIPPED if n != "missing_slices"])
@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_recipe_replay_seed_and_input_safety(name, modality, real_slices):
    if name == "lowdose_ct" and modality == "MR":  # a CT scanner's noise: MR is left as it is
        assert not load_recipe(name)(real_slices["MR"], seed=11, modality="MR").mask.any()
        modality = None  # no modality filter: the recipe runs
    img = real_slices[modality or "MR"]
    ref = img.copy()
    r = load_recipe(name)
    res = r(img, seed=11, modality=modality)
    assert np.array_equal(img, ref)
    assert res.image.shape == img.shape and res.image.dtype == np.float32
    assert res.mask.shape == (1, 128, 128) and res.mask.dtype == bool and res.mask.any()
    record = json.loads(json.dumps(res.record))
    assert record["recipe"] == name and record["seed"] == 11
    again, mask = replay(img, record)
    assert np.array_equal(again, res.image) and np.array_equal(mask, res.mask)
    same = r(img, seed=11, modality=modality)
    other = r(img, seed=12, modality=modality)
    assert np.array_equal(same.image, res.image)
    assert not np.array_equal(other.image, res.image)


def test_missing_slices_recipe_on_volume_and_refuses_2d():
    vol = np.random.default_rng(0).random((1, 16, 16, 40)).astype(np.float32)
    r = load_recipe("missing_slices")
    res = r(vol, seed=0)
    assert 0.05 <= res.mask.mean() <= 0.2
    assert np.array_equal(replay(vol, res.record)[0], res.image)
    with pytest.raises(ValueError, match="3-D"):
        r(vol[..., 0], seed=0)


def test_torch_input(real_slices):
    img = torch.from_numpy(real_slices["MR"].copy())
    res = load_recipe("mixed")(img, seed=3, modality="MR")
    assert isinstance(res.image, torch.Tensor) and res.mask.dtype == torch.bool
    again, _ = replay(img, res.record)
    assert torch.equal(again, res.image)


def test_noise_recipe_is_modality_aware():
    img = np.full((1, 32, 32), 0.5, np.float32)
    r = load_recipe("noise")
    seen = {m: Counter(r(img, seed=s, modality=m).record["steps"][0]["transform"] for s in range(40))
            for m in ("CT", "MR")}
    assert set(seen["MR"]) == {"rician", "gaussian"} and seen["MR"]["rician"] > seen["MR"]["gaussian"]
    assert set(seen["CT"]) == {"lowdose_ct", "gaussian"}


def test_mixed_recipe_is_about_half_noise_half_mask():
    img = np.full((1, 32, 32), 0.5, np.float32)
    r = load_recipe("mixed")
    chosen = Counter(r(img, seed=s, modality="MR").record["choices"][0]["chosen"] for s in range(200))
    assert set(chosen) == {"noise", "mask"}
    assert 70 <= chosen["noise"] <= 130


def test_step_modality_filter_skips(tmp_path):
    p = tmp_path / "ct_only.yaml"
    p.write_text("description: t\nsteps:\n  - transform: gaussian\n    sigma: 0.1\n    modalities: [CT]\n")
    img = np.zeros((1, 8, 8), np.float32)
    res = load_recipe(p)(img, seed=0, modality="MR")
    assert np.array_equal(res.image, img) and not res.mask.any()
    assert res.record["steps"][0]["skipped"] == "modality"
    assert load_recipe(p)(img, seed=0, modality="ct").mask.all()


def test_unknown_recipe_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'.*gaussian"):
        load_recipe("nope")
    with pytest.raises(ValueError, match="does not exist"):
        load_recipe("/no/such/recipe.yaml")


@pytest.mark.parametrize("text, words", [
    ("description: x\nstep:\n  - transform: gaussian\n", ["step", "bad.yaml"]),
    ("steps:\n  - transform: gaussian\n    sigma: 0.1\n    sigmaa: 0.2\n", ["sigmaa", "bad.yaml"]),
    ("steps:\n  - transform: blur\n", ["blur", "bad.yaml"]),
    ("steps:\n  - transform: gaussian\n    sigma: -0.1\n", ["sigma", "bad.yaml"]),
    ("steps:\n  - transform: boxes\n    coverage: [0.1, 1.2]\n", ["coverage", "bad.yaml"]),
    ("one_of:\n  - [{transform: gaussian}]\nweights: [1, 2]\n", ["weights"]),
    ("steps:\n  - include: bad.yaml\n", ["includes itself"]),
    ("steps: [unclosed\n", ["YAML"]),
    # a transform name that is not a string was "TypeError: unhashable type: 'list'", a traceback
    ("steps:\n  - transform: [gaussian]\n", ["unknown transform ['gaussian']", "bad.yaml"]),
    # PyYAML keeps the last of two equal keys: the recipe drew sigma 0.1 where 0.02 was written first
    ("steps:\n  - transform: gaussian\n    sigma: 0.02\n    sigma: 0.1\n",
     ["bad.yaml: invalid YAML (line 4): duplicate key 'sigma'"]),
    # no chain could be drawn: an unchanged copy for every scan
    ("one_of:\n  - [{transform: gaussian}]\nweights: [0]\n", ["bad.yaml: one_of: weights are all zero"]),
])
def test_bad_recipe_files_raise_clear_errors(tmp_path, text, words):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ValueError) as exc:
        load_recipe(p)
    for w in words:
        assert w in str(exc.value)


def test_a_relative_include_is_read_beside_the_recipe_not_in_the_working_folder(tmp_path, monkeypatch):
    # run from a folder holding another my_noise.yaml, the recipe took that one's boxes for its noise
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "study.yaml").write_text("steps:\n  - include: my_noise.yaml\n")
    (tmp_path / "recipes" / "my_noise.yaml").write_text("steps:\n  - transform: gaussian\n")
    (tmp_path / "my_noise.yaml").write_text("steps:\n  - transform: boxes\n")
    monkeypatch.chdir(tmp_path)
    img = np.full((1, 32, 32), 0.5, np.float32)
    res = load_recipe(tmp_path / "recipes" / "study.yaml")(img, seed=0)
    assert [st["transform"] for st in res.record["steps"]] == ["gaussian"] and res.mask.all()
    # '../base.yaml' in a/b/ and in a/ are two files: no loop (it was "includes itself")
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "base.yaml").write_text("steps:\n  - include: ../base.yaml\n")
    (tmp_path / "a" / "base.yaml").write_text("steps:\n  - include: ../base.yaml\n")
    (tmp_path / "base.yaml").write_text("steps:\n  - transform: gaussian\n")
    assert load_recipe(tmp_path / "a" / "b" / "base.yaml").transforms[0].__class__.__name__ == "RandGaussianNoise"
    (tmp_path / "base.yaml").write_text("steps:\n  - include: a/b/base.yaml\n")  # now a loop
    with pytest.raises(ValueError, match=r"includes itself \(base -> ../base.yaml -> ../base.yaml -> a/b/base.yaml\)"):
        load_recipe(tmp_path / "a" / "b" / "base.yaml")
    with pytest.raises(ValueError, match="unknown transform \\['gaussian'\\]"):
        replay(img, {"transform": ["gaussian"], "params": {}})


def test_a_relative_mask_file_is_read_beside_the_recipe(tmp_path, monkeypatch):
    # read from the working folder, one recipe masked another file (or none) depending on where it ran
    import nibabel as nib

    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "lesion.yaml").write_text("steps:\n  - {transform: file_mask, path: m.nii.gz}\n")
    beside, elsewhere = np.zeros((16, 16), np.float32), np.zeros((16, 16), np.float32)
    beside[2:5, 2:5] = 1
    elsewhere[10:14, 10:14] = 1
    nib.save(nib.Nifti1Image(beside, np.eye(4)), tmp_path / "recipes" / "m.nii.gz")
    nib.save(nib.Nifti1Image(elsewhere, np.eye(4)), tmp_path / "m.nii.gz")
    monkeypatch.chdir(tmp_path)
    res = load_recipe(tmp_path / "recipes" / "lesion.yaml")(np.full((1, 16, 16), 0.5, np.float32), seed=0)
    assert np.array_equal(res.mask[0], beside > 0)
    assert res.record["steps"][0]["params"]["path"] == str(tmp_path / "recipes" / "m.nii.gz")


def test_a_step_failing_on_an_image_names_its_recipe_file_and_step(tmp_path):
    p = tmp_path / "study.yaml"
    p.write_text("steps:\n  - transform: gaussian\n  - {transform: stripes, axes: [2]}\n")
    with pytest.raises(ValueError) as exc:
        load_recipe(p)(np.zeros((1, 16, 16), np.float32), seed=0)
    assert str(exc.value) == f"{p}: steps[1] (stripes): axes [2] do not exist in a 2-D image"


def test_recipes_are_package_data():
    import medvae

    # the recipes live inside the package (so a wheel has them), not in the checkout around it
    assert Path(str(RECIPE_DIR)) == Path(medvae.__file__).resolve().parent / "recipes"
    assert set(SHIPPED) <= {p.name[:-len(".yaml")] for p in RECIPE_DIR.iterdir() if p.name.endswith(".yaml")}
    assert load_recipe("gaussian").path.name == "gaussian.yaml"
    with pytest.raises(ValueError, match="seed"):
        load_recipe("gaussian")(np.zeros((1, 4, 4), np.float32), seed=-1)


def test_pixel_size_reaches_lowdose_steps_unless_the_recipe_fixes_it(tmp_path):
    img = np.full((1, 64, 64), 0.5, np.float32)  # water in the CT window
    r = load_recipe("lowdose_ct")
    unknown = r(img, seed=5, modality="CT")  # training: no geometry, the fov_mm rule as before
    assert unknown.record["pixel_size_mm"] is None and unknown.record["steps"][0]["params"]["pixel_size_mm"] is None
    known = r(img, seed=5, modality="CT", pixel_size_mm=0.5)
    p_unknown, p_known = unknown.record["steps"][0]["params"], known.record["steps"][0]["params"]
    assert p_known["pixel_size_mm"] == 0.5 and known.record["pixel_size_mm"] == 0.5
    # the geometry changes no random draw: same dose, same noise seed, only the physics
    assert {k: v for k, v in p_known.items() if k != "pixel_size_mm"} == \
        {k: v for k, v in p_unknown.items() if k != "pixel_size_mm"}
    assert not np.array_equal(known.image, unknown.image)
    assert np.array_equal(replay(img, json.loads(json.dumps(known.record)))[0], known.image)
    # a recipe that fixes the pixel size keeps it; other transforms ignore the geometry
    p = tmp_path / "fixed.yaml"
    p.write_text("description: t\nsteps:\n  - transform: lowdose_ct\n    hu_window: [-1000, 1000]\n"
                 "    pixel_size_mm: 2.0\n  - transform: gaussian\n    sigma: 0.01\n")
    fixed = load_recipe(p)(img, seed=5, modality="CT", pixel_size_mm=0.5)
    assert fixed.record["steps"][0]["params"]["pixel_size_mm"] == 2.0
    assert "pixel_size_mm" not in fixed.record["steps"][1]["params"]
    assert np.array_equal(fixed.image, load_recipe(p)(img, seed=5, modality="CT").image)
    for bad in (0, -1.0, float("nan"), "1mm"):
        with pytest.raises(ValueError, match="pixel_size_mm"):
            r(img, seed=5, pixel_size_mm=bad)
