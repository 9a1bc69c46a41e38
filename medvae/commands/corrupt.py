"""``medvae corrupt INPUT OUTPUT --recipe NAME --seed N``: corrupt a scan with a recipe.

Argument parsing and printing only; the work is :func:`medvae.corruption.corrupt_scan` (read with
:func:`medvae.io.load_scan`, normalized with medvae's intensity policy, corrupted slice by slice with
seeds derived from ``--seed``, or as a volume for 3-D recipes, written in the input's format with
the mask and a JSON record that :func:`medvae.corruption.replay` reproduces exactly).
"""
from __future__ import annotations

import argparse

from medvae import resources

HELP = "corrupt a scan with a corruption recipe (noise, artefacts, masks), with mask and JSON record"


def _epilog() -> str:
    names = ", ".join(resources.names("recipes")) or "(none found)"
    return f"""\
recipes (shipped with medvae): {names}
  or the path of a recipe YAML file.

outputs:
  OUTPUT                  corrupted scan, same format as INPUT (NIfTI file, or a new DICOM series
                          folder for DICOM input; OUTPUT may also end in .nii.gz for any input)
  --mask-output           default: OUTPUT without .nii/.nii.gz + '_mask.nii.gz' (NIfTI output),
                          or OUTPUT + '_mask.nii.gz' (DICOM folder): float32 NIfTI with the
                          scan's affine, 1 = corrupted voxel (whole image for global noise).
                          For DICOM input a folder gives a derived DICOM series instead, which
                          keeps every slice's position (needed when a slice is missing).
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
    p.add_argument("--volume", metavar="N", type=int, default=None,
                   help="volume of a 4-D NIfTI file, from 0 (default: 0); the output is that 3-D volume")
    p.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None,
                   help="intensity scaling the recipe works in (default: the DICOM Modality; guessed "
                        "from the values for NIfTI, and the guess is reported)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that an earlier medvae run wrote (anything else is refused)")


def run(args: argparse.Namespace) -> int:
    from medvae.corruption import corrupt_scan
    from medvae.runtime import commit_ends_the_command

    with commit_ends_the_command():  # a signal after the commit keeps the outputs (medvae.runtime.LateSignal)
        res = corrupt_scan(args.input, args.output, recipe=args.recipe, seed=args.seed, mask_path=args.mask_output,
                           series=args.series, volume=args.volume, modality=args.modality, overwrite=args.overwrite)
        how = f" ({res.modality_guess}; pass --modality to override)" if res.modality_guess else ""
        print(f"wrote {res.output} ({res.recipe}, seed {res.seed}, {res.mode}, {100 * res.mask_fraction:.1f} % of "
              f"voxels masked) as {res.modality}{how}, mask {res.mask}, record {res.sidecar}")
    return 0
