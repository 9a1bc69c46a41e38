"""``medvae restore INPUT OUTPUT``: restore a scan series (DICOM or NIfTI), or many, with a medvae model."""
from __future__ import annotations

import argparse

HELP = "restore (denoise / inpaint) a DICOM series or NIfTI volume, or many; writes the same format"


def _threads(text: str) -> int:
    from medvae.runtime import MAX_THREADS

    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= v <= MAX_THREADS:  # -3 was taken as 1, 100000 segfaulted
        raise argparse.ArgumentTypeError(f"must be from 1 to {MAX_THREADS}, got {v}")
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="DICOM file, DICOM series folder, or NIfTI file; for many series, a manifest "
                                 "(.csv/.yaml with a path column) or a folder of series with --batch")
    p.add_argument("output", help="output: a folder for DICOM (a new derived series), a .nii.gz for NIfTI; "
                                  "for many series, the folder that receives one output per series")
    p.add_argument("--model", default="default",
                   help="default | PATH.pt | MLflow model folder | runs:/ID/model | models:/NAME/VERSION")
    p.add_argument("--mask", default=None,
                   help="mask scan in the same geometry (0 = keep, 1 or one positive value = restore); without it the whole image is denoised")
    p.add_argument("--samples", type=int, default=None, metavar="N",
                   help="posterior samples for the uncertainty map (8 when only --uncertainty is given)")
    p.add_argument("--uncertainty", default=None,
                   help="where to write the uncertainty map (default: beside OUTPUT, with --samples)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per forward pass")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1")
    p.add_argument("--series", default=None, help="SeriesInstanceUID when the folder holds several series")
    p.add_argument("--volume", metavar="N", type=int, default=None,
                   help="volume of a 4-D NIfTI file, from 0 (default: 0); the output is that 3-D volume")
    p.add_argument("--modality", type=str.upper, choices=("CT", "MR"), default=None,
                   help="intensity scaling to use (default: the DICOM Modality; guessed from the values "
                        "for NIfTI, and the guess is reported)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace outputs that an earlier medvae run wrote (anything else is refused)")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI for runs:/ and models:/ models")
    p.add_argument("--ensemble", type=int, choices=(1, 2, 4), default=2,
                   help="mirrored copies of each slice restored and averaged (default 2: twice the compute, "
                        "+0.03 to +0.35 dB on the benchmark; 1: fastest)")
    p.add_argument("--no-blend", dest="blend", action="store_false",
                   help="the network's restoration alone, not averaged with the classical one by the weight "
                        "the model was calibrated with (the default model blends holes with biharmonic "
                        "inpainting; its denoising is the network's alone)")
    p.add_argument("--threads", type=_threads, default=None, metavar="N",
                   help="torch CPU threads per process (default: every core; with many series, cores / "
                        "processes on this machine); 1 is faster when other work keeps the cores busy")
    b = p.add_argument_group("many series (INPUT a manifest .csv/.yaml, or a folder with --batch); "
                             "resumable, one summary CSV per shard, exit 1 if any series failed")
    b.add_argument("--batch", action="store_true",
                   help="INPUT is a folder of series: each NIfTI file, DICOM file and sub-folder in it is one")
    b.add_argument("--shard", default=None, metavar="I/N",
                   help="restore shard I of N (0-based); default from torchrun (RANK/WORLD_SIZE) or a Slurm "
                        "array (SLURM_ARRAY_TASK_ID/COUNT)")


MANIFEST_SUFFIXES = (".csv", ".yaml", ".yml")


def run(args: argparse.Namespace) -> int:
    from medvae.restore import restore_scan
    from medvae.runtime import tune_allocator

    tune_allocator()
    if args.batch or args.shard or str(args.input).lower().endswith(MANIFEST_SUFFIXES):
        return _run_batch(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.samples == 0 and args.uncertainty:  # it was read as "the default 8"
        from medvae.errors import MedvaeError

        raise MedvaeError("--samples 0 makes no uncertainty map: leave out --uncertainty, or give --samples N "
                          "of at least 1 (8 when --uncertainty is given alone)", args.uncertainty)
    from medvae.runtime import commit_ends_the_command

    with commit_ends_the_command():  # a signal after the commit keeps the outputs (medvae.runtime.LateSignal)
        s = restore_scan(args.input, args.output, model=args.model, mask_path=args.mask, samples=args.samples or 0,
                         uncertainty_path=args.uncertainty, batch_size=args.batch_size, device=args.device,
                         series=args.series, volume=args.volume, modality=args.modality, overwrite=args.overwrite,
                         progress=True, tracking_uri=args.tracking_uri, ensemble=args.ensemble,
                         blend=args.blend)
        extra = f", uncertainty {s.uncertainty}" if s.uncertainty else ""
        how = f" ({s.modality_guess}; pass --modality to override)" if s.modality_guess else ""
        slices = f"{s.slices} slice{'' if s.slices == 1 else 's'}"
        print(f"restored {slices} as {s.modality}{how} in {s.seconds:.1f} s -> {s.output}{extra}")
    return 0


def _run_batch(args: argparse.Namespace) -> int:
    """Many series: the work is :func:`medvae.batch.restore_batch`; this prints and sets the exit status."""
    import sys

    from medvae.batch import restore_batch
    from medvae.errors import MedvaeError

    for flag, value in (("--mask", args.mask), ("--uncertainty", args.uncertainty), ("--series", args.series),
                        ("--volume", args.volume)):
        if value:
            raise MedvaeError(f"{flag} applies to one series, not to a batch (a manifest row can give series_uid)")
    r = restore_batch(args.input, args.output, model=args.model, shard=args.shard, samples=args.samples or 0,
                      batch_size=args.batch_size, device=args.device, modality=args.modality,
                      overwrite=args.overwrite, threads=args.threads, tracking_uri=args.tracking_uri,
                      progress=True, ensemble=args.ensemble, blend=args.blend)
    for row in r.failed:
        print(f"medvae restore: {row['series']} failed: {row['error']}", file=sys.stderr)
    c, (i, n) = r.counts(), r.shard
    print(f"shard {i}/{n}: {c['restored']} restored, {c['skipped']} already done, {c['failed']} failed "
          f"in {r.seconds:.0f} s; summary: {r.summary}")
    return 1 if c["failed"] else 0
