#!/usr/bin/env python
"""Render every corruption recipe on a real CT slice and a real MR slice.

    python scripts/corruption_gallery.py [--out docs/corruption_gallery.png] [--seed 3]

For each modality the first row shows the corrupted slice (mask outlines in red for the mask
corruptions) and the second row shows what changed: ``corrupted - clean`` for noise and artefacts
(symmetric gray scale, its std in the title, in HU for CT) or the mask for the mask corruptions.
Images are normalized with medvae's intensity policy (CT window -1000..1000 HU, MR 0.5-99.5
percentiles) before the recipe runs, exactly as in training; CT is *displayed* with a narrower
window (-160..240 HU) so that the noise is visible. ``missing_slices`` is a 3-D corruption and is
shown on a coronal reformat; ``lowdose_ct`` is shown for CT only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DATA = Path("/work/shared/data/dev/nifti")
CT_FILE = DATA / "invesalius_cranium_ct.nii.gz"
MR_FILE = DATA / "heudiconv_b0dwi_1.nii.gz"
COLUMNS = ["gaussian", "rician", "lowdose_ct", "kspace_spikes", "gibbs", "bias_field", "motion",
           "boxes", "strokes", "stripes", "missing_slices"]
MASK_RECIPES = {"boxes", "strokes", "stripes", "missing_slices"}
CT_DISPLAY_HU = (-160.0, 240.0)


def load(path: Path, modality: str):
    """(normalized volume (X, Y, Z), window, voxel sizes)."""
    try:
        from medvae.io import load_scan  # type: ignore[attr-defined]

        scan = load_scan(path)
        arr = np.asarray(scan.array, np.float32)
        zooms = np.sqrt((np.asarray(scan.affine)[:3, :3] ** 2).sum(0))
    except ImportError:
        import nibabel as nib

        img = nib.load(str(path))
        arr = np.asarray(img.get_fdata(dtype=np.float32))
        zooms = np.asarray(img.header.get_zooms()[:3], float)
    if arr.ndim == 4:
        arr = arr[..., 0]
    from medvae.intensity import IntensityPolicy, normalize

    window = IntensityPolicy().window_for(arr, modality)
    return normalize(arr, window), window, zooms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "corruption_gallery.png"))
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medvae.corruption import load_recipe

    rows = []
    for modality, path in (("CT", CT_FILE), ("MR", MR_FILE)):
        vol, window, zooms = load(path, modality)
        k = vol.shape[2] // 2
        if modality == "CT":
            dlo, dhi = ((np.array(CT_DISPLAY_HU) - window[0]) / (window[1] - window[0])).tolist()
        else:
            dlo, dhi = 0.0, 1.0
        rows.append((modality, vol, k, window, zooms, (dlo, dhi)))

    ncol = len(COLUMNS) + 1
    fig, axes = plt.subplots(4, ncol, figsize=(1.9 * ncol, 8.4), facecolor="white")
    for r, (modality, vol, k, window, zooms, (dlo, dhi)) in enumerate(rows):
        ax_img, ax_diff = axes[2 * r], axes[2 * r + 1]
        clean = vol[:, :, k][None]
        unit = (window[1] - window[0]) if modality == "CT" else 1.0
        unit_name = "HU" if modality == "CT" else "window"
        aspect_ax = zooms[1] / zooms[0]
        ax_img[0].imshow(clean[0].T, cmap="gray", vmin=dlo, vmax=dhi, origin="lower", aspect=aspect_ax)
        ax_img[0].set_title(f"{modality} clean", fontsize=9)
        ax_img[0].set_ylabel(f"{modality} corrupted", fontsize=9)
        ax_diff[0].set_ylabel(f"{modality} change / mask", fontsize=9)
        src = (CT_FILE if modality == "CT" else MR_FILE).name.replace(".nii.gz", "")
        ax_diff[0].text(0.5, 0.5, f"{src}\naxial slice {k}\n{vol.shape[0]}x{vol.shape[1]}",
                        ha="center", va="center", fontsize=7, transform=ax_diff[0].transAxes)
        ax_diff[0].axis("off")
        for c, name in enumerate(COLUMNS, start=1):
            recipe = load_recipe(name)
            if name == "lowdose_ct" and modality != "CT":
                for ax in (ax_img[c], ax_diff[c]):
                    ax.axis("off")
                ax_img[c].text(0.5, 0.5, "lowdose_ct:\nCT only", ha="center", va="center", fontsize=9,
                               transform=ax_img[c].transAxes)
                continue
            if recipe.requires_3d:  # coronal reformat of the corrupted volume
                sub = vol[None]
                res = recipe(sub, seed=args.seed, modality=modality)
                y = vol.shape[1] // 2
                img, ref, mask = res.image[0][:, y, :], vol[:, y, :], res.mask[0][:, y, :]
                aspect = zooms[2] / zooms[0]
                title = f"{name}\n(coronal)"
            else:
                res = recipe(clean, seed=args.seed, modality=modality)
                img, ref, mask = res.image[0], clean[0], res.mask[0]
                aspect = aspect_ax
                title = name
            ax_img[c].imshow(img.T, cmap="gray", vmin=dlo, vmax=dhi, origin="lower", aspect=aspect)
            if name in MASK_RECIPES:
                ax_img[c].contour(mask.T.astype(float), levels=[0.5], colors="red", linewidths=0.6,
                                  origin="lower")
                ax_diff[c].imshow(mask.T, cmap="gray", vmin=0, vmax=1, origin="lower", aspect=aspect)
                sub = f"mask {100 * mask.mean():.1f} %"
            else:
                d = img - ref
                lim = max(float(np.percentile(np.abs(d), 99.5)), 1e-6)
                ax_diff[c].imshow(d.T, cmap="gray", vmin=-lim, vmax=lim, origin="lower", aspect=aspect)
                sub = f"std {d.std() * unit:.3g} {unit_name}"
            step = next((s for s in res.record["steps"] if s["params"] is not None), None)
            ax_img[c].set_title(title if step else f"{name}\n(skipped)", fontsize=9)
            ax_diff[c].set_title(sub, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("medvae corruption recipes (medvae/recipes) on dev scans; "
                 f"seed {args.seed}; CT shown at {CT_DISPLAY_HU[0]:g}..{CT_DISPLAY_HU[1]:g} HU", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    out = Path(args.out)
    if not out.suffix:  # matplotlib adds .png: say the file it writes
        out = out.with_name(out.name + ".png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
