"""Pack what a GPU training run needs into ``.device_kit/`` (git-ignored), for a machine that has
PyTorch but neither MONAI nor ``../shared``: a float16 slice store of the config's training volumes
and of the smallest validation volumes (xz-compressed), and the wheels of medvae's pure-Python
dependencies that such a machine lacks.

The kit, the tracked files of the checkout (about 22 MiB) and nothing else must fit the 64 MiB that a
lent device machine takes (`.library/device/README.md`); this script prints the total and fails when
it is over. Run it from the repository root with ``../shared`` beside it, then on the device
``bash scripts/device_train.sh`` (carry: ``.device_kit``)::

    python scripts/device_kit.py                      # wheels for the device's Python 3.12
    python scripts/device_kit.py --python 3.11        # wheels for this machine (a rehearsal here)
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medvae.intensity import IntensityPolicy  # noqa: E402
from medvae.store import prepare_store  # noqa: E402
from medvae.training.config import expand_paths, load_config  # noqa: E402

LIMIT_MIB = 64.0
# what medvae's training and restore_volume import that the device image lacks (KINDS.md's package
# list has torch, numpy, scipy, scikit-image, pyyaml, tqdm, matplotlib); pinned to this checkout's venv
WHEELS = ("monai", "pydantic", "pydantic-core", "annotated-types", "typing-inspection")
# validation volumes carried: the small ones (the chest CTA alone is 8.5 MiB compressed); the full
# validation is scored here, after the run, by scripts/bench_quality.py
VAL_MAX_VOXELS = 1_000_000


def _installed_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def download_wheels(dest: Path, python: str) -> list[Path]:
    """Download the wheels into a fresh folder beside ``dest`` and swap it in only when pip succeeded:
    the old kit's wheels were deleted first, and an offline run left a kit without any."""
    import shutil
    import tempfile

    dest.parent.mkdir(parents=True, exist_ok=True)
    pins = [f"{n}=={_installed_version(n)}" for n in WHEELS]
    tag = python.replace(".", "")
    fresh = Path(tempfile.mkdtemp(prefix=".wheels-", dir=dest.parent))
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                               "--python-version", python, "--implementation", "cp", "--abi", f"cp{tag}",
                               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64",
                               "--platform", "manylinux_2_28_x86_64", "-d", str(fresh), *pins],
                              capture_output=True, text=True)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SystemExit(f"device_kit.py: error: pip could not download the wheels ({last}); the kit in "
                             f"{dest.parent} is left as it was")
        if dest.exists():
            shutil.rmtree(dest)
        fresh.rename(dest)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return sorted(dest.glob("*.whl"))


def _voxels(path: Path) -> int:
    from medvae.io import load_scan

    return int(load_scan(path).array.size)


def build_store(config: str, out: Path) -> Path:
    """The float16 store of the config's volumes (the tarball ``out/store.tar.xz``)."""
    cfg = load_config(config)
    val = [p for p in expand_paths(cfg.data.val_paths, "data.val_paths") if _voxels(p) <= VAL_MAX_VOXELS]
    train = [p for p in expand_paths(cfg.data.paths, "data.paths", exclude=cfg.data.exclude) if p not in val]
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp) / "kit.csv"
        with open(manifest, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "subject", "split"])
            for i, p in enumerate(train):  # subjects are anonymous: only the split matters here
                w.writerow([p.resolve(), f"train{i:02d}", "train"])
            for i, p in enumerate(val):
                w.writerow([p.resolve(), f"val{i:02d}", "val"])
        intensity = IntensityPolicy(ct_window=tuple(cfg.intensity.ct_window),
                                    mr_percentiles=tuple(cfg.intensity.mr_percentiles))
        store = Path(tmp) / "store"
        rep = prepare_store(manifest, store, intensity=intensity, dtype="float16")
        if rep.failed:
            raise SystemExit(f"device_kit: {len(rep.failed)} volume(s) failed: {rep.failed}")
        tarball = out / "store.tar.xz"
        with tarfile.open(tarball, "w:xz", preset=6) as tar:
            tar.add(store, arcname="store")
    print(f"store: {len(train)} training and {len(val)} validation volumes, "
          f"{tarball.stat().st_size / 2**20:.1f} MiB compressed")
    return tarball


def tracked_mib() -> float:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True).stdout
    return sum((ROOT / f).stat().st_size for f in files.decode().split("\0") if f and (ROOT / f).is_file()) / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="default", help="training config whose volumes to pack (default: default)")
    ap.add_argument("--python", default="3.12", help="the device's Python version for binary wheels (3.12)")
    ap.add_argument("--out", default=str(ROOT / ".device_kit"), help="kit folder (default .device_kit)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wheels = download_wheels(out / "wheels", args.python)  # the old wheels stay until the new ones are here
    print("wheels:", ", ".join(w.name for w in wheels))
    build_store(args.config, out)
    kit = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20
    total = kit + tracked_mib()
    print(f"kit {kit:.1f} MiB + tracked files {tracked_mib():.1f} MiB = {total:.1f} MiB (limit {LIMIT_MIB:.0f})")
    return 0 if total < LIMIT_MIB else 1


if __name__ == "__main__":
    raise SystemExit(main())
