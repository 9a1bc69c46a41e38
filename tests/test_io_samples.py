"""`build_samples`: pip-package-only sample set, loadable, deterministic, documented."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from medvae.errors import MedvaeError
from medvae.io import list_series, load_scan
from medvae.io.samples import build_samples


def test_samples_are_loadable_scans(sample_paths):
    assert set(sample_paths) == {"ct_series", "mr", "mr_multiframe"}
    ct = load_scan(sample_paths["ct_series"])
    assert ct.format == "dicom" and ct.modality == "CT"
    assert ct.array.shape == (512, 512, 2)
    assert -1024.0 <= ct.array.min() < -900 and 1000 < ct.array.max() <= 3071.0  # HU
    np.testing.assert_allclose(ct.spacing, (0.478516, 0.478516, 5.0), atol=1e-6)
    assert len(list_series(sample_paths["ct_series"])) == 1
    slices = [ct.array[:, :, k] for k in range(2)]
    assert all(not np.array_equal(a, b) for i, a in enumerate(slices) for b in slices[i + 1:])
    mr = load_scan(sample_paths["mr"])
    assert mr.format == "nifti" and mr.modality == "MR"
    assert mr.array.shape == (128, 96, 24) and mr.orientation == "LAS"
    source = nib.load(f"{data_path}/example4d.nii.gz").header
    assert mr.header["pixdim"][4] == source["pixdim"][4] == 2000  # "header kept": its TR too
    mf = load_scan(sample_paths["mr_multiframe"])
    assert mf.array.shape == (64, 64, 10) and mf.modality == "MR"


def test_sample_ct_slices_keep_their_anatomy_in_patient_space(sample_paths, dev_data):
    # the abdomen slice is stored 1\\0\\0\\0\\-1\\0: written with 1\\0\\0\\0\\1\\0 and its pixels as
    # they were, the spine came out anterior
    from nibabel.orientations import apply_orientation, io_orientation

    def canonical(array, affine):
        return apply_orientation(array, io_orientation(affine))

    ct = load_scan(sample_paths["ct_series"])
    sample = canonical(ct.array, ct.affine)
    for k, name in enumerate(("693_UNCR.dcm", "explicit_VR-UN.dcm")):
        src = load_scan(dev_data / "dicom/pydicom-data" / name)
        expected = np.clip(canonical(src.array, src.affine)[:, :, 0], -1024, 3071)
        np.testing.assert_allclose(sample[:, :, k], expected, atol=0.5, err_msg=name)


def test_samples_manifest_and_readme(sample_paths):
    root = sample_paths["mr"].parent
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["network"] is False
    ct = manifest["samples"]["ct_series"]
    assert "not an anatomical volume" in ct["nature"] and len(ct["files"]) == 2
    assert "held out" in ct["training"]
    assert all(f["license"] and f["source_package"] for f in ct["files"])
    readme = (root / "README.txt").read_text()
    assert "NOT an anatomical volume" in readme and "License" in readme


def test_samples_are_deterministic_and_refuse_existing(sample_paths, tmp_path):
    again = build_samples(tmp_path / "again")
    for key in ("mr", "mr_multiframe"):
        assert again[key].read_bytes() == sample_paths[key].read_bytes()
    for a, b in zip(sorted(again["ct_series"].iterdir()), sorted(sample_paths["ct_series"].iterdir())):
        assert a.read_bytes() == b.read_bytes()
    with pytest.raises(MedvaeError, match="already exists"):
        build_samples(tmp_path / "again")
    build_samples(tmp_path / "again", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["again"]


def test_demo_ct_is_not_training_data_of_the_default_config():
    """The CT sample slices are validation volumes of configs/default.yaml, never training slices."""
    from pathlib import Path

    import yaml

    from medvae.io.samples import CT_SOURCES

    from importlib import resources

    cfg = yaml.safe_load(resources.files("medvae").joinpath("configs", "default.yaml").read_text())
    val = {Path(p).name for p in cfg["data"]["val_paths"]}
    train = {Path(p).name for p in cfg["data"]["paths"]} - val  # training leaves validation volumes out
    names = {Path(inner).name for _, inner, _, _ in CT_SOURCES}
    assert names <= val and not names & train, (names, train)
    assert {"J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm"} <= train  # the slices the demo used to show
