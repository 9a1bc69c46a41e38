"""``medvae corrupt INPUT OUTPUT --recipe NAME --seed N``: corrupt a scan with a recipe.

The scan is read with :func:`medvae.io.load_scan`, normalized with medvae's intensity policy (CT:
-1000..1000 HU, MR: 0.5-99.5 percentiles of the volume), corrupted slice by slice (each 2-D slice
``array[:, :, k]`` gets its own seed derived from ``--seed`` and ``k``), or as a whole volume when
the recipe holds a 3-D-only step (missing slices), mapped back to the scan's units and written in
the input's format with :func:`medvae.io.save_scan`. Next to it go the mask (NIfTI, same affine,
1 = corrupted voxel) and a JSON sidecar holding the recipe and every sampled parameter, so the
corruption can be replayed exactly (:func:`medvae.corruption.replay`).
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "corrupt a scan with a corruption recipe (noise, artefacts, masks), with mask and JSON record"

_RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "corruptions"


def _epilog() -> str:
    names = ", ".join(sorted(p.stem for p in _RECIPE_DIR.glob("*.yaml"))) or "(none found)"
    return f"""\
recipes (configs/corruptions): {names}
  or the path of a recipe YAML file.

outputs:
  OUTPUT                  corrupted scan, same format as INPUT (NIfTI file, or a new DICOM series
                          folder for DICOM input; OUTPUT may also end in .nii.gz for any input)
  --mask-output           default: OUTPUT without .nii/.nii.gz + '_mask.nii.gz' (NIfTI output),
                          or OUTPUT + '_mask.nii.gz' (DICOM folder): float32 NIfTI with the
                          scan's affine, 1 = corrupted voxel (whole image for global noise)
  sidecar                 OUTPUT without .nii/.nii.gz + '.json' (NIfTI) or OUTPUT + '.json'
                          (folder): recipe, seed, intensity window and the sampled parameters
                          of every slice; medvae.corruption.replay reproduces them bit for bit.
the same INPUT, recipe and --seed always give the same output.
"""


def _seed(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _epilog()
    p.add_argument("input", help="scan to corrupt (NIfTI file, DICOM file or folder)")
    p.add_argument("output", help="corrupted scan (.nii/.nii.gz file, or a folder for a DICOM series)")
    p.add_argument("--recipe", required=True, metavar="NAME_OR_YAML",
                   help="recipe name (see below) or path of a recipe YAML file")
    p.add_argument("--seed", type=_seed, default=0, help="random seed (default 0); same seed, same output")
    p.add_argument("--mask-output", default=None, metavar="PATH", help="where to write the mask (see below)")
    p.add_argument("--series", default=None, metavar="UID",
                   help="SeriesInstanceUID to read when the INPUT folder holds several series")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _strip_nifti(path: Path) -> str:
    name = str(path)
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_paths(output: str | Path, mask_output: str | Path | None = None) -> tuple[Path, Path, Path]:
    """``(output, mask, sidecar)`` paths for ``medvae corrupt`` (see the command's help)."""
    out = Path(output)
    stem = _strip_nifti(out)
    mask = Path(mask_output) if mask_output else Path(stem + "_mask.nii.gz")
    return out, mask, Path(stem + ".json")


def _write_json_atomic(path: Path, data: dict) -> None:
    import json
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from medvae import __version__
    from medvae.errors import MedvaeError
    from medvae.io import load_scan, save_scan
    from medvae.io.scan import is_nifti_path

    out, mask_path, sidecar = output_paths(args.output, args.mask_output)
    if not is_nifti_path(mask_path):
        raise MedvaeError("the mask is written as NIfTI: give a path ending in .nii or .nii.gz", mask_path)
    paths = [out.resolve(), mask_path.resolve(), sidecar.resolve()]
    if len(set(paths)) != 3:
        raise MedvaeError("OUTPUT, --mask-output and the JSON sidecar must be different paths", mask_path)
    if not args.overwrite:
        for p in (out, mask_path, sidecar):
            if p.exists():
                raise MedvaeError("already exists (use --overwrite to replace it)", p)

    # the recipe first: a typo in its name should not cost a scan read
    from medvae.corruption import corrupt_volume, load_recipe

    try:
        recipe = load_recipe(args.recipe)
    except ValueError as exc:
        raise MedvaeError(str(exc), args.recipe) from None

    scan = load_scan(args.input, series=args.series) if args.series else load_scan(args.input)
    modality = scan.modality
    vc = corrupt_volume(scan.array, recipe, seed=int(args.seed), modality=modality, source=args.input)
    corrupted, mask, window, mode, records = vc.image, vc.mask, vc.window, vc.mode, vc.records
    desc = f"medvae corrupt {recipe.name} seed {args.seed}"
    save_scan(scan, corrupted, out, overwrite=args.overwrite, description=desc, rescale="fit")
    save_scan(scan, mask.astype(np.float32), mask_path, overwrite=args.overwrite,
              description=f"medvae corrupt mask {recipe.name} (1 = corrupted)")
    sidecar_data = {
        "medvae_version": __version__,
        "command": "corrupt",
        "input": str(args.input),
        "series": scan.series_uid,
        "output": str(out),
        "mask": str(mask_path),
        "modality": modality,
        "intensity_window": [float(window[0]), float(window[1])],
        "recipe": {"name": recipe.name, "path": str(recipe.path), "description": recipe.description,
                   "config": recipe.config},
        "seed": int(args.seed),
        "mode": mode,
        "slice_seeds": "numpy SeedSequence([seed, k]).generate_state(1)[0]" if mode == "slices" else None,
        "mask_fraction": float(mask.mean()),
        "records": records,
    }
    _write_json_atomic(sidecar, sidecar_data)
    print(f"wrote {out} ({recipe.name}, seed {args.seed}, {mode}, {100 * mask.mean():.1f} % of voxels masked), "
          f"mask {mask_path}, record {sidecar}")
    return 0
