"""The wheel a user installs: its contents, and medvae run from it in an empty folder (no checkout).

The wheel is built offline from a copy of the package (``pip wheel --no-deps --no-build-isolation
--no-index``), so the build writes nothing into the repository. The installed dependencies of this
environment serve the unpacked wheel; ``medvae`` itself must come from the wheel.
"""
from __future__ import annotations

import email
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "medvae"


def _package_files(sub: str) -> set[str]:
    return {f"medvae/{sub}/{p.name}" for p in (PKG / sub).iterdir() if p.is_file() and p.name != "__init__.py"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(PKG, src / "medvae", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-q", "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (whl,) = out.glob("*.whl")
    return whl


@pytest.fixture(scope="module")
def unpacked(wheel, tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "MLFLOW_TRACKING_URI": f"sqlite:///{cwd}/mlflow.db"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_the_package_data_and_nothing_of_the_checkout(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        meta = email.message_from_bytes(zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))))
        entry = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert wheel.name.startswith("medvae_restore-")
    recipes = _package_files("recipes")
    assert len(recipes) >= 14 and "medvae/recipes/gaussian.yaml" in recipes
    assert recipes <= names
    assert "medvae/configs/default.yaml" in names
    assert "medvae/weights/default.pt" in names and "medvae/weights/default.ts" in names
    if (PKG / "templates").is_dir():  # the review page's template
        assert _package_files("templates") <= names
    assert not any(n.startswith(("benchmarks/", "scripts/", "tests/", "configs/")) for n in names)
    assert meta["Name"] == "medvae-restore"
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("pydantic") for r in requires)
    assert all("extra ==" in r for r in requires if r.lower().startswith("simpleitk"))  # tests only
    assert "medvae = medvae.cli:main" in entry


def test_recipe_loader_and_config_read_the_packaged_files(unpacked, tmp_path):
    code = (
        "import numpy as np, medvae\n"
        "from pathlib import Path\n"
        "from medvae.corruption import list_recipes, load_recipe, replay\n"
        "from medvae.corruption.recipes import RECIPE_DIR\n"
        "from medvae.training.config import load_config\n"
        "print(Path(medvae.__file__).parent)\n"
        "print(Path(str(RECIPE_DIR)))\n"
        "print(','.join(list_recipes()))\n"
        "r = load_recipe('gaussian')\n"
        "res = r(np.full((1, 32, 32), 0.5, np.float32), seed=1, modality='MR')\n"
        "again, _ = replay(np.full((1, 32, 32), 0.5, np.float32), res.record)\n"
        "print(bool((again == res.image).all()), r.path)\n"
        "print(load_config('default').corruption.recipe)\n"
    )
    proc = _run(unpacked, tmp_path, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg, recipe_dir, names, replayed, recipe = proc.stdout.splitlines()
    assert Path(pkg) == unpacked / "medvae"  # the wheel's copy, not the checkout
    assert Path(recipe_dir) == unpacked / "medvae" / "recipes"
    assert set(names.split(",")) == {Path(n).stem for n in _package_files("recipes")}
    assert replayed == f"True {unpacked / 'medvae' / 'recipes' / 'gaussian.yaml'}"
    assert recipe == "train"


def test_commands_from_the_wheel_in_an_empty_folder(unpacked, tmp_path):
    import nibabel as nib
    import numpy as np

    work = tmp_path / "empty"
    work.mkdir()
    vol = np.random.default_rng(0).normal(100, 20, (32, 32, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.diag([1.5, 1.5, 3.0, 1.0])), work / "mr.nii.gz")

    proc = _run(unpacked, work, "-m", "medvae", "corrupt", "mr.nii.gz", "out.nii.gz", "--recipe", "gaussian",
                "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name for p in work.iterdir()} == {"mr.nii.gz", "out.nii.gz", "out_mask.nii.gz", "out.json"}
    out = nib.load(str(work / "out.nii.gz"))
    np.testing.assert_array_equal(out.affine, np.diag([1.5, 1.5, 3.0, 1.0]))
    assert not np.allclose(np.asarray(out.dataobj), vol)

    # the default config is found by name; its training scans (../shared) are not here: one line
    # that names the data path, and nothing written
    before = {p.name for p in work.iterdir()}
    proc = _run(unpacked, work, "-m", "medvae", "train", "--config", "default")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "data.paths" in proc.stderr and "../shared/data/dev" in proc.stderr
    assert {p.name for p in work.iterdir()} == before


def test_a_wheel_inside_another_projects_repository_records_no_commit_of_it(wheel, tmp_path):
    """Runs record ``medvae.git_commit``: the checkout's HEAD, never the HEAD of a repository that
    happens to hold the installed package (a project's ``.venv``), which would name the wrong code."""
    project = tmp_path / "project"
    site = project / ".venv" / "site"
    site.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "theirs"], cwd=project, check=True)
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    code = ("from medvae.tracking.runs import _run_tags; t = _run_tags(None); "
            "print(t['medvae.git_commit'], t['medvae.version'])")
    proc = _run(site, project, "-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import medvae

    assert proc.stdout.split() == ["unknown", medvae.__version__]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:  # the checkout itself records its own commit
        from medvae.tracking.runs import git_commit

        assert git_commit() == head.stdout.strip()
