"""Review figures and the single-file ``index.html`` review page of an evaluation.

:func:`write_report` writes, into one folder:

* ``metrics.csv`` and ``summary.json`` (:class:`medvae.evaluate.Evaluation`; the summary also holds
  the MLflow run id of the evaluation when there is one, under ``mlflow_run_id``);
* ``slice_KKK_worst.png``, ``slice_KKK_median.png``, ``slice_KKK_best.png``: full-resolution review
  figures (:func:`review_figure`) of the slices with the lowest, median and highest restored PSNR in
  the case's headline region (inside the damage mask for mask cases, else the whole slice), among
  the slices that show anatomy (foreground >= 10 % of the slice) when that is known;
* ``index.html``: one self-contained page (no network use at all) rendered from the template
  ``medvae/templates/review.html``. Its slice viewer shows restored | reference | baseline over
  corrupted | error | uncertainty; the grey panels are embedded as 12-bit data and windowed in the
  browser (CT presets, a window/level control, the metric window), with the slice position in mm,
  orientation letters, pixel spacing and a scale bar, and a sign-off form that exports the
  reviewer's verdicts as JSON for ``medvae review import``.

**Page size.** Every panel of every shown slice costs about 1-1.5 bytes per pixel (12-bit values,
delta-coded, deflated, base64). The page keeps the embedded data under ``max_bytes`` (default
:data:`PAGE_BUDGET`, 45 MB): first by block-averaging in-plane (up to 2x, so 512² becomes 256²),
then by showing only every n-th slice (always with the worst, median and best). The full-resolution
figures are unaffected. Measured with ``scripts/bench_report_size.py``: a 300-slice 512² CT series
with six noisy panels gives a 44.7 MB page (256² in-plane, 78 of the 300 slices).

Slices are ``array[:, :, k]``; the page numbers them 1-based (``slice 3 of 4``) and also gives the
0-based ``k``, the ``slice`` column of ``metrics.csv`` (slice N is k = N − 1). With the scan's affine
they are displayed in radiological convention (patient right on the screen's left, anterior or
superior up); without it the array is assumed to be RAS-ordered with 1 mm voxels. Nothing but the
caller's ``title``, the optional model (an MLflow URI, ``default``, or a local model as a digest:
:func:`~medvae.models.label.model_label`), the run id and the numbers identifies the data: no file names, no DICOM tags.

**The folder is an output like any other** (:mod:`medvae.io.atomic`): it is claimed before the
work (:func:`claim_report`), written in a staging folder and renamed into place only when every
file is complete, and it replaces only a report medvae wrote (with ``overwrite``). A folder that
is, holds or lies inside one of the evaluation's inputs is refused (:func:`check_report_dir`).
"""
from __future__ import annotations

import base64
import dataclasses
import contextlib
import hashlib
import html
import io
import json
import math
import re
import zlib
from importlib import resources
from os import PathLike
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from medvae.errors import MedvaeError
from medvae.io.formats import as_mask
from medvae.jsonsafe import json_safe
from medvae.models.label import model_label

#: Order and captions of the viewer panels.
PANELS = {
    "corrupted": "Corrupted (input)",
    "baseline": "Baseline",
    "restored": "Restored (medvae)",
    "reference": "Reference",
    "error": "|Restored − reference|",
    "uncertainty": "Uncertainty (std)",
}
GREY_PANELS = ("corrupted", "baseline", "restored", "reference")
#: Panel order on the page (a grid of 3 columns): restored beside its reference and the baseline,
#: then the input and the error and uncertainty maps below them.
PAGE_ORDER = ("restored", "reference", "baseline", "corrupted", "error", "uncertainty")
ERROR_CMAP = "inferno"
UNCERTAINTY_CMAP = "viridis"
MASK_RGBA = (0, 220, 255, 170)  # outline of the damage mask, drawn just outside it, see-through
#: CT display presets of the page as ``(name, label, center, width)`` in HU.
CT_PRESETS = (
    ("brain", "Brain", 40.0, 80.0),
    ("subdural", "Subdural", 75.0, 215.0),
    ("soft", "Soft tissue / abdomen", 50.0, 400.0),
    ("lung", "Lung", -600.0, 1500.0),
    ("bone", "Bone", 400.0, 1800.0),
)
PAGE_BUDGET = 45_000_000  # bytes of embedded image data in index.html
MAX_DOWNSAMPLE = 2  # in-plane block averaging allowed before slices are skipped
Q_LEVELS = 4095  # 12-bit display data
TEMPLATE = "review.html"


# --------------------------------------------------------------------------------------------
# orientation and geometry
# --------------------------------------------------------------------------------------------
def _display_transform(affine: np.ndarray | None) -> tuple[bool, bool, bool, float]:
    """How to turn ``array[:, :, k]`` into screen rows/columns.

    Returns ``(transpose, flip_rows, flip_cols, aspect)``: the 2-D slice ``s`` is shown as
    ``t = s.T if transpose else s`` then flipped; ``aspect`` is row spacing / column spacing.
    Radiological convention: the vertical screen axis is S/I if in-plane, else A/P, with S or A on top;
    the horizontal axis shows patient right (or anterior, for sagittal slices) on the left.
    """
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    try:
        import nibabel as nib

        codes = nib.aff2axcodes(aff)
    except Exception:  # a degenerate affine: fall back to RAS
        codes = ("R", "A", "S")
    names = {"R": "LR", "L": "LR", "A": "AP", "P": "AP", "S": "SI", "I": "SI"}
    c0, c1 = codes[0] or "R", codes[1] or "A"
    # vertical axis: SI if present in-plane, else AP (axial: AP vertical, LR horizontal)
    if names[c1] == "SI" or (names[c1] == "AP" and names[c0] == "LR"):
        vertical, horizontal = 1, 0
    else:
        vertical, horizontal = 0, 1
    vcode, hcode = (c0, c1)[vertical], (c0, c1)[horizontal]
    transpose = vertical == 1  # rows must index the vertical axis
    flip_rows = vcode in ("S", "A")  # increasing index goes up the screen
    flip_cols = hcode in ("R", "A")  # patient right / anterior on the screen's left
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    sv, sh = spacing[vertical], spacing[horizontal]
    aspect = float(sv / sh) if sh > 0 and sv > 0 else 1.0
    return transpose, flip_rows, flip_cols, aspect


def _orient(s: np.ndarray, tf: tuple[bool, bool, bool, float]) -> np.ndarray:
    t = s.T if tf[0] else s
    if tf[1]:
        t = t[::-1, :]
    if tf[2]:
        t = t[:, ::-1]
    return t


def _letter(v: np.ndarray) -> str:
    """RAS letter of the direction ``v`` (its largest component)."""
    i = int(np.argmax(np.abs(v)))
    return (("L", "R"), ("P", "A"), ("I", "S"))[i][int(v[i] > 0)]


def slice_geometry(affine: np.ndarray | None, shape: Sequence[int],
                   positions: Sequence[float] | None = None) -> dict[str, Any]:
    """Screen geometry of the slices ``array[:, :, k]`` of a volume with this voxel → RAS affine.

    Returns ``letters`` (the patient direction at the ``top``, ``bottom``, ``left`` and ``right``
    edge of the displayed slice), ``spacing_mm`` (``[column, row]`` spacing on screen, mm per
    pixel), ``size_mm`` (``[width, height]`` of the displayed slice), ``normal`` (the RAS letter
    the slice normal points to) and ``positions_mm`` (each slice's position along that normal:
    ``positions`` when given, such as a series' stored ones
    (:func:`medvae.io.formats.scan_slice_positions`); else the affine's, which steps by the mean gap).

    >>> g = slice_geometry(np.diag([0.5, 0.5, 2.0, 1.0]), (4, 6, 3))
    >>> g["letters"], g["spacing_mm"], g["normal"], g["positions_mm"]
    ({'top': 'A', 'bottom': 'P', 'left': 'R', 'right': 'L'}, [0.5, 0.5], 'S', [0.0, 2.0, 4.0])
    """
    aff = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    tf = _display_transform(aff)
    rows_axis, cols_axis = (1, 0) if tf[0] else (0, 1)
    down = aff[:3, rows_axis] * (-1.0 if tf[1] else 1.0)  # world step of one screen row down
    right = aff[:3, cols_axis] * (-1.0 if tf[2] else 1.0)
    normal = np.cross(aff[:3, 0], aff[:3, 1])
    norm = np.linalg.norm(normal)
    normal = normal / norm if norm > 0 else np.array([0.0, 0.0, 1.0])
    if normal[int(np.argmax(np.abs(normal)))] < 0:  # point to R, A or S
        normal = -normal
    sp = [float(np.linalg.norm(right)), float(np.linalg.norm(down))]
    n_cols, n_rows = int(shape[cols_axis]), int(shape[rows_axis])
    if positions is not None and len(positions) == int(shape[2]):
        pos = [float(p) for p in positions]
    else:
        pos = [float(np.dot(aff[:3, :3] @ np.array([0.0, 0.0, k]) + aff[:3, 3], normal))
               for k in range(int(shape[2]))]
    return {
        "letters": {"top": _letter(-down), "bottom": _letter(down), "left": _letter(-right), "right": _letter(right)},
        "spacing_mm": [round(v, 6) for v in sp],
        "size_mm": [round(sp[0] * n_cols, 3), round(sp[1] * n_rows, 3)],
        "normal": _letter(normal),
        "positions_mm": [round(p, 3) for p in pos],
    }


# --------------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------------
def _reduce(a: np.ndarray, f: int) -> np.ndarray:
    """Block-average a 2-D array by an integer factor (edges cropped to whole blocks)."""
    if f <= 1:
        return a
    from skimage.measure import block_reduce

    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    return block_reduce(a[:h, :w], block_size=(f, f), func=np.mean)


def _outline(m: np.ndarray) -> np.ndarray:
    """One-pixel outline just outside a mask, so the damaged pixels themselves stay visible."""
    from skimage.segmentation import find_boundaries

    m = np.asarray(m, dtype=bool)
    return find_boundaries(m, mode="outer") & ~m


def _lut(cmap: str, n: int = 256) -> np.ndarray:
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    return np.round(cm(np.linspace(0, 1, n))[:, :3] * 255).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def encode_q12(a: np.ndarray, offset: float, step: float) -> str:
    """A 2-D array as 12-bit integers ``round((a - offset) / step)`` for the page, base64 text.

    Rows are delta-coded (each value minus its left neighbour, modulo 2**16), the low and high
    bytes are stored as two planes, and the result is deflated (zlib). The page's script undoes
    this with the browser's ``DecompressionStream``. :func:`decode_q12` is the exact inverse.

    >>> a = np.array([[0.0, 1.5], [3.0, 2.0]])
    >>> decode_q12(encode_q12(a, 0.0, 0.5), (2, 2), 0.0, 0.5).tolist()
    [[0.0, 1.5], [3.0, 2.0]]
    """
    q = np.clip(np.round((np.asarray(a, dtype=np.float64) - offset) / step), 0, Q_LEVELS).astype(np.int32)
    d = np.diff(q, axis=1, prepend=0).astype(np.uint16)  # wraps modulo 2**16 for negative steps
    b = np.ascontiguousarray(d, dtype="<u2").view(np.uint8).reshape(-1, 2)
    return base64.b64encode(zlib.compress(b.T.tobytes(), 6)).decode("ascii")


def decode_q12(text: str, shape: tuple[int, int], offset: float, step: float) -> np.ndarray:
    """Inverse of :func:`encode_q12` (what the page's script does), for tests and tools."""
    raw = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8).reshape(2, -1)
    d = (raw[0].astype(np.uint16) | (raw[1].astype(np.uint16) << 8)).reshape(shape)
    q = np.cumsum(d, axis=1, dtype=np.uint16)
    return offset + q.astype(np.float64) * step


def _fmt(v: Any, nd: int = 2) -> str:
    """A number for people: ``–`` for missing values, never ``inf``."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{nd}f}"


def _num(v: float) -> float | str | None:
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(v, 6)


# --------------------------------------------------------------------------------------------
# matplotlib figure
# --------------------------------------------------------------------------------------------
def _figure_panels(slices: Mapping[str, Any]) -> list[str]:
    panels = [k for k in GREY_PANELS if slices.get(k) is not None]
    panels.append("error")
    if slices.get("uncertainty") is not None:
        panels.append("uncertainty")
    return panels


def _colour_panel(fig, ax, img: np.ndarray, *, cmap: str, vmax: float, aspect: float, label: str) -> None:
    im = ax.imshow(img, cmap=cmap, vmin=0, vmax=vmax, aspect=aspect, interpolation="nearest")
    cb = fig.colorbar(im, cax=ax.inset_axes([1.03, 0.0, 0.05, 1.0]))  # panels keep equal size
    cb.set_label(label, color="white")
    cb.ax.tick_params(colors="white")


def review_figure(
    slices: Mapping[str, np.ndarray] | Sequence[Mapping[str, np.ndarray]],
    *,
    title: str,
    window: Sequence[float],
    path: str | PathLike | None = None,
    error_range: float | None = None,
    uncertainty_range: float | None = None,
    affine: np.ndarray | None = None,
    units: str = "",
    captions: Mapping[str, str] | None = None,
    row_labels: Sequence[str] | None = None,
):
    """Review figure: one row ``corrupted | baseline | restored | reference | abs error (| uncertainty)``
    per slice.

    ``slices`` holds 2-D slices ``array[:, :, k]`` under the keys ``restored`` and ``reference``
    (required), ``corrupted``, ``baseline``, ``uncertainty``, ``mask`` (outlined in cyan just outside
    the damaged pixels on the corrupted, baseline and restored panels) and ``error`` (default:
    ``|restored − reference|``), all optional; a sequence of such mappings gives one row each (e.g.
    a few validation slices per training epoch; ``row_labels`` names the rows). Grey panels use
    ``window = (lo, hi)``; the error uses ``inferno`` from 0 to ``error_range`` (default: its 99.5th
    percentile), the uncertainty ``viridis``, each with its colorbar. ``captions`` overrides panel
    captions (e.g. the baseline's name). Rendered with matplotlib's Agg backend (no display needed).

    Returns the saved ``Path`` when ``path`` is given, else the ``matplotlib.figure.Figure``
    (e.g. for ``mlflow.log_figure``).

    Examples
    --------
    >>> s = {"restored": np.zeros((16, 16)), "reference": np.ones((16, 16))}
    >>> fig = review_figure([s, s], title="epoch 3", window=(0, 1), row_labels=["a", "b"])
    >>> sum(bool(ax.images) for ax in fig.axes)  # 2 rows of restored | reference | error
    6
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [slices] if isinstance(slices, Mapping) else list(slices)
    for row in rows:
        if "restored" not in row or "reference" not in row:
            raise ValueError("review_figure needs at least 'restored' and 'reference' slices")
    lo, hi = (float(v) for v in window)
    panels = _figure_panels(rows[0])
    fig = Figure(figsize=(3.2 * len(panels) + 0.6, 3.6 * len(rows) + 0.3), dpi=110, facecolor="black")
    FigureCanvasAgg(fig)
    widths, cols = [], []  # a narrow empty column after the error panel holds its colorbar
    for key in panels:
        cols.append(len(widths))
        widths.append(1.0)
        if key == "error" and key != panels[-1]:
            widths.append(0.32)
    gs = fig.add_gridspec(len(rows), len(widths), width_ratios=widths, wspace=0.06, hspace=0.12)
    style = dict(window=(lo, hi), tf=_display_transform(affine), names={**PANELS, **(captions or {})},
                 unit=f" ({units})" if units else "", error_range=error_range, uncertainty_range=uncertainty_range)
    for r, row in enumerate(rows):
        axes = [fig.add_subplot(gs[r, c]) for c in cols]
        _figure_row(fig, axes, row, panels, titles=r == 0, **style)
        if row_labels is not None:
            axes[0].set_ylabel(row_labels[r], color="yellow", fontsize=8)
    fig.suptitle(f"{title}   [window {lo:g}..{hi:g}{' ' + units if units else ''}]", color="white", fontsize=11)
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="black", bbox_inches="tight", pad_inches=0.08)
    return path


def _figure_row(fig, axes, slices, panels, *, titles, window, tf, names, unit, error_range, uncertainty_range) -> None:
    """Draw one slice's panels into ``axes``."""
    ref = np.asarray(slices["reference"], dtype=np.float64)
    err = slices.get("error")
    err = np.abs(np.asarray(slices["restored"], dtype=np.float64) - ref) if err is None else np.asarray(err, float)
    mask = slices.get("mask")
    outline = _orient(_outline(mask), tf) if mask is not None and np.any(mask) else None
    for ax, key in zip(axes, panels):
        ax.set_facecolor("black")
        if key == "error":
            vmax = error_range or float(np.percentile(err, 99.5)) or 1.0
            _colour_panel(fig, ax, _orient(err, tf), cmap=ERROR_CMAP, vmax=vmax, aspect=tf[3],
                          label=f"abs error{unit}")
        elif key == "uncertainty":
            u = np.asarray(slices["uncertainty"], dtype=np.float64)
            vmax = uncertainty_range or float(np.percentile(u, 99.5)) or 1.0
            _colour_panel(fig, ax, _orient(u, tf), cmap=UNCERTAINTY_CMAP, vmax=vmax, aspect=tf[3],
                          label=f"std{unit}")
        else:
            ax.imshow(_orient(np.asarray(slices[key], dtype=np.float64), tf), cmap="gray", vmin=window[0],
                      vmax=window[1], aspect=tf[3], interpolation="nearest")
            if outline is not None and key in ("corrupted", "baseline", "restored"):
                rgba = np.zeros(outline.shape + (4,))
                rgba[outline] = np.array(MASK_RGBA) / 255.0
                ax.imshow(rgba, aspect=tf[3], interpolation="nearest")
        if titles:
            ax.set_title(names[key], color="white", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])


# --------------------------------------------------------------------------------------------
# what the page needs
# --------------------------------------------------------------------------------------------
def _check_same(name: str, a: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    if a is None:
        return None
    a = np.asarray(a)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape != shape:
        raise MedvaeError(f"{name} has shape {a.shape} but reference has shape {shape}")
    return a


def _summarized(evaluation, region: str, n: int) -> np.ndarray:
    """The slices the summary of ``region`` is taken over (not left out as empty or identical)."""
    sets = (evaluation.summary.get("slice_sets") or {}).get(region) or {}
    used = np.ones(n, dtype=bool)
    used[[k for key in ("left_out_identical", "left_out_empty") for k in sets.get(key, [])]] = False
    return used


def _pick_slices(psnr: np.ndarray, candidates: np.ndarray | None = None,
                 summarized: np.ndarray | None = None) -> dict[str, int]:
    """Worst, median and best slice by restored PSNR (NaN slices ignored), among the ``summarized``
    slices (those the summary's statistics are over, when any) and of them ``candidates`` (a boolean
    per slice) when any of them is True: the page shows no slice its statistics leave out (an identical
    slice of infinite PSNR was shown as "best", a left-out slice as "median"). No picks (``{}``) when
    no slice has a value, or the summary leaves out every slice that has one: slices in index order were
    named worst, median and best, and slices the summary left out were ranked when it left out all."""
    ok = ~np.isnan(psnr)
    if summarized is not None:
        ok &= summarized
    if candidates is not None and (ok & candidates).any():
        ok &= candidates
    valid = np.flatnonzero(ok)
    if valid.size == 0:
        return {}
    order = valid[np.argsort(psnr[valid], kind="stable")]
    return {"worst": int(order[0]), "median": int(order[(order.size - 1) // 2]), "best": int(order[-1])}


#: the share of pixels within ± 2 std that counts as a calibrated map (the default model's target)
CALIBRATED_BAND = (0.85, 0.99)


def calibration_statement(meta: Mapping[str, Any] | None, *, holes: bool, model_named: bool = False) -> str:
    """What the model's metadata says about how far its uncertainty map can be trusted.

    Reads ``meta["calibration"]`` as written by ``scripts/calibrate_uncertainty.py``
    (:mod:`medvae.models.calibration`): the coverage ``coverage_2std_holes`` / ``_noise`` (share of
    held-out pixels whose error lay within ± 2 std after calibration), ``spearman_*`` and
    ``measured_on``. ``holes`` picks the regime (inpainting inside a mask, or global noise).
    A model's metadata without it: "not calibrated". No metadata (``meta`` None): the calibration
    is "unknown", since the map may well come from a calibrated model; ``model_named`` says whether
    a model was named (its metadata then could not be read) or not (no ``--model-uri``).

    >>> calibration_statement({"calibration": {"coverage_2std_holes": 0.85, "measured_on": "validation scans"}},
    ...                       holes=True)
    'model calibration (holes): 85 % of pixels within ± 2 std on held-out scans (aimed at 95 %; 85–99 % counts as calibrated); measured on validation scans'
    >>> calibration_statement({}, holes=False)
    'model not calibrated: its metadata holds no measured calibration, so read the std as relative only'
    >>> calibration_statement(None, holes=False)[:60]
    'model calibration unknown: no --model-uri given (pass --mode'
    """
    from medvae.models.calibration import CALIBRATION_KEY

    regime = "holes" if holes else "noise"
    if meta is None:  # which model made the map is not known here: never claim "not calibrated"
        if model_named:
            return ("model calibration unknown: the model's metadata could not be read, so its measured "
                    "coverage cannot be quoted")
        return ("model calibration unknown: no --model-uri given (pass --model-uri default, or the model that "
                "made the uncertainty map, to quote its measured coverage)")
    cal = meta.get(CALIBRATION_KEY)
    cov = cal.get(f"coverage_2std_{regime}") if isinstance(cal, Mapping) else None
    if not isinstance(cov, (int, float)) or not math.isfinite(cov):
        return "model not calibrated: its metadata holds no measured calibration, so read the std as relative only"
    text = f"model calibration ({regime}): {100 * float(cov):.0f} % of pixels within ± 2 std on held-out scans"
    target = cal.get("target_coverage")
    aim = 100 * float(target) if isinstance(target, (int, float)) else 95.0
    # the scale aims at a Gaussian's 95 %; a miss of it is not a miss of calibration (85-99 % counts)
    text += f" (aimed at {aim:.0f} %; {100 * CALIBRATED_BAND[0]:.0f}–{100 * CALIBRATED_BAND[1]:.0f} % counts as calibrated)"
    rho = cal.get(f"spearman_{regime}")
    if isinstance(rho, (int, float)):
        text += f", Spearman(std, |error|) {float(rho):.2f}"
    if cal.get("measured_on"):
        text += f"; measured on {cal['measured_on']}"
    return text


def measured_coverage(restored: np.ndarray, reference: np.ndarray, std: np.ndarray,
                      region: np.ndarray | None) -> float | None:
    """Fraction of pixels (in ``region``) with ``|restored − reference| <= 2 std`` on this scan."""
    err = np.abs(np.asarray(restored, np.float64) - np.asarray(reference, np.float64))
    inside = err <= 2.0 * np.asarray(std, np.float64)
    if region is not None:
        if not np.any(region):
            return None
        inside = inside[np.asarray(region, bool)]
    return float(np.mean(inside)) if inside.size else None


class _Volumes:
    """The volumes of one report, checked against the reference, and their display slices."""

    def __init__(self, evaluation, reference, arrays: Mapping[str, np.ndarray | None], affine):
        ref = np.asarray(reference)
        self.ref = ref[:, :, None] if ref.ndim == 2 else ref
        self.shape = self.ref.shape
        if evaluation.summary.get("n_slices") != self.shape[2]:
            raise MedvaeError(f"the evaluation has {evaluation.summary.get('n_slices')} slices but the volumes "
                              f"have {self.shape[2]}")
        self.vols = {"reference": self.ref}
        for name, a in arrays.items():
            a = _check_same(name, a, self.shape)
            if a is not None:
                self.vols[name] = a
        if "mask" in self.vols:
            self.vols["mask"] = as_mask(self.vols["mask"], what="the mask volume")
        self.tf = _display_transform(affine)
        self.ev_window = (evaluation.summary.get("scaling") or {}).get("window")

    def has(self, name: str) -> bool:
        return name in self.vols

    def error(self, k: int) -> np.ndarray:
        """|restored − reference| as scored: after clipping to the evaluation window."""
        a = self.vols["restored"][:, :, k].astype(np.float64)
        b = self.ref[:, :, k].astype(np.float64)
        if self.ev_window:
            a, b = np.clip(a, *self.ev_window), np.clip(b, *self.ev_window)
        return np.abs(a - b)

    def raw(self, name: str, k: int) -> np.ndarray:
        if name == "error":
            return self.error(k)
        return self.vols[name][:, :, k].astype(np.float64)

    def display(self, name: str, k: int, f: int) -> np.ndarray:
        return _orient(_reduce(self.raw(name, k), f), self.tf)

    def robust_max(self, name: str) -> float:
        n = self.shape[2]
        sample = np.unique(np.linspace(0, n - 1, min(n, 16)).round().astype(int))
        return float(np.percentile(np.stack([self.raw(name, k) for k in sample]), 99.5)) or 1.0


def _quantization(vols: _Volumes, panels: Sequence[str], window: tuple[float, float], err_max: float,
                  unc_max: float) -> dict[str, tuple[float, float]]:
    """``panel -> (offset, step)`` of the 12-bit display data. One grey scale for all grey panels:
    the reference's 0.01-99.99 percentile range widened to the display window (CT: about 1 HU per
    step); the error in steps of one colour of its map; the uncertainty from 0 to 4x the larger of
    its own and the error's colour scale (the page can show it on either).

    The grey range is the widest of every grey panel's 0.01-99.99 percentile range: a noisy input
    reaches far below the reference's air (a corrupted CT to -1650 HU), and stored over the
    reference's range alone it showed as -1024 HU, too bright in the lung preset."""
    q: dict[str, tuple[float, float]] = {}
    lo, hi = window
    for p in panels:
        if p in GREY_PANELS:
            sub = vols.vols[p][::2, ::2, :: max(1, vols.shape[2] // 32)]
            p_lo, p_hi = (float(v) for v in np.percentile(sub, (0.01, 99.99)))
            lo, hi = min(lo, p_lo), max(hi, p_hi)
    for p in panels:
        if p in GREY_PANELS:
            q[p] = (lo, (hi - lo) / Q_LEVELS)
        elif p == "error":
            q[p] = (0.0, err_max / 255.0)  # one step per colour of the map: no finer detail is shown
        else:
            q[p] = (0.0, 4.0 * max(unc_max, err_max) / Q_LEVELS)
    return q


def _encode_slice(vols: _Volumes, k: int, panels: Sequence[str], f: int,
                  quant: Mapping[str, tuple[float, float]]) -> dict[str, Any]:
    img = {p: encode_q12(vols.display(p, k, f), *quant[p]) for p in panels}
    out: dict[str, Any] = {"img": img, "mask": None}
    if vols.has("mask") and vols.vols["mask"][:, :, k].any():
        m = _orient(_reduce(vols.vols["mask"][:, :, k].astype(np.float64), f) > 0, vols.tf)
        rgba = np.zeros(m.shape + (4,), dtype=np.uint8)
        rgba[_outline(m)] = MASK_RGBA
        out["mask"] = _data_uri(_png(rgba))
    return out


def _entry_bytes(entry: Mapping[str, Any]) -> int:
    return sum(len(v) for v in entry["img"].values()) + len(entry["mask"] or "")


def _plan(vols: _Volumes, panels, quant, picks: Mapping[str, int], max_bytes: int) -> tuple[int, int, dict]:
    """Choose the in-plane factor and the slice stride so the embedded data stays under
    ``max_bytes``, from a probe of 5 slices. Returns ``(factor, stride, encoded_probe)``."""
    n = vols.shape[2]
    # probe inside the volume: the end slices are often mostly air and compress far better
    probe = [int(k) for k in np.unique(np.linspace(0, n - 1, 7)[1:-1].round().astype(int))] if n >= 7 else list(range(n))
    f, cache = 1, {}
    while True:
        cache = {k: _encode_slice(vols, k, panels, f, quant) for k in probe}
        per_slice = float(np.mean([_entry_bytes(e) for e in cache.values()]))
        if per_slice * n <= max_bytes or f >= MAX_DOWNSAMPLE or min(vols.shape[:2]) // (f + 1) < 64:
            break
        f += 1
    return f, max(1, math.ceil(per_slice * n / max_bytes)), cache


def _slice_metrics(evaluation, k: int) -> dict[str, Any]:
    s = evaluation.summary
    out: dict[str, Any] = {}
    for src in s.get("sources", ["restored"]):
        out[src] = {reg: {m: _num(evaluation.per_slice(src, reg, m)[k]) for m in ("psnr", "ssim")}
                    for reg in s["regions"]}
    return out


def _encode_slices(evaluation, vols: _Volumes, panels, quant, picks, max_bytes: int,
                   positions: Sequence[float]) -> tuple[list[dict], int, int]:
    """The page's slices (image data + per-slice metrics), within the byte budget.

    Returns ``(slices, factor, stride)``."""
    from medvae.progress import progress

    f, stride, cache = _plan(vols, panels, quant, picks, max_bytes)
    included = sorted(set(range(0, vols.shape[2], stride)) | set(picks.values()))
    encoded: dict[int, dict] = {}
    for k in progress(included, desc="review page", unit="slices", enabled=len(included) > 20):
        encoded[k] = cache.pop(k) if k in cache else _encode_slice(vols, k, panels, f, quant)
    regular = sorted(set(range(0, vols.shape[2], stride)))
    m = 1
    while sum(_entry_bytes(e) for e in encoded.values()) > max_bytes and m < len(regular):
        m += 1  # the estimate was low: keep every m-th of the encoded slices, and worst/median/best
        keep = set(regular[::m]) | set(picks.values())
        encoded = {k: e for k, e in encoded.items() if k in keep}
    stride *= m
    slices = []
    for k in sorted(encoded):
        e = encoded[k]
        slices.append({"k": k, "pos": positions[k], "img": e["img"], "mask": e["mask"],
                       "m": _slice_metrics(evaluation, k)})
    return slices, f, max(1, stride)


def _presets(modality: str | None, metric: tuple[float, float] | None, display: tuple[float, float], *,
             percentiles: bool) -> list[dict[str, Any]]:
    """The page's window buttons: the metric window (or the display window when raw values were
    scored), then the CT presets. ``percentiles``: the metric window is the reference's 0.5-99.5
    percentiles (medvae's MR default), which the label then says."""
    def item(name, label, lo, hi):
        return {"name": name, "label": label, "lo": float(lo), "hi": float(hi)}

    if metric is not None:
        out = [item("metric", "Metric window" + (" (reference p0.5–p99.5)" if percentiles else ""), *metric)]
    else:
        out = [item("metric", "Default display window", *display)]
    if (modality or "").upper() == "CT":
        out += [item(name, label, c - w / 2, c + w / 2) for name, label, c, w in CT_PRESETS]
    return out


def _definitions(summary: Mapping[str, Any], *, n_total: int, units: str, err_max: float,
                 window: tuple[float, float], modality: str | None) -> list[list[str]]:
    usfx = f" {units}" if units else ""
    scaling = summary.get("scaling", {})
    defs = [["Intensity scaling (what the metrics see)", scaling.get("description", "")],
            ["PSNR", summary.get("psnr_definition", "")],
            ["SSIM", summary.get("ssim_definition", "")]]
    defs += [[f"Region “{reg}”", d] for reg, d in summary.get("regions", {}).items()]
    defs.append(["Slices left out", summary.get("identical_slices") or
                 "slices where a source equals the reference (infinite PSNR) are left out of the statistics"])
    # metrics.csv's column is named 'slice' but is 0-based, the exported verdicts' 'slice' 1-based: say both
    defs.append(["Slices", f"{n_total} slices, numbered 1..{n_total} on this page; slice N is k = N − 1 "
                 f"(array[:, :, k]), the 0-based 'slice' column of metrics.csv (0..{n_total - 1}), which keeps "
                 "every slice; the exported verdicts give both, 'slice' (1-based, as on this page) and 'k'; "
                 "the summary uses each region's common slice set (the 'slices' and 'left out' columns)"])
    if "percentile" in str(scaling.get("source") or ""):
        defs.append(["Display window", f"{window[0]:g}..{window[1]:g}{usfx}: the 0.5th and 99.5th "
                     "percentiles of the reference volume's intensities (MR values have no absolute unit)"])
    defs.append(["Error panel", "|restored − reference|"
                 + (" after clipping to the evaluation window" if scaling.get("window") else "")
                 + f", colour scale 0..{_fmt(err_max, 1)}{usfx} (99.5th percentile)"])
    return defs


def _curve(evaluation, region: str) -> list[Any]:
    return [_num(v) for v in evaluation.per_slice("restored", region, "psnr")]


def report_digest(metrics_csv: str | PathLike) -> str:
    """The id of a report: SHA-256 (hex) of its ``metrics.csv``, the same for the same evaluation.

    The review page puts it into the exported verdicts (``report_id``), and ``medvae review import``
    compares it with the ``report/metrics.csv`` artifact of the run it logs to, so verdicts on one
    evaluation cannot be imported into another's run.
    """
    return hashlib.sha256(Path(metrics_csv).read_bytes()).hexdigest()


def _script_json(data: Any) -> str:
    """JSON safe inside ``<script>``: no ``<``, ``>`` or ``&`` at all (as ``\\u003c`` etc.), so no text
    in it (a baseline name such as ``<!--<script>``) can end the element or switch the HTML parser
    into its escaped script states, which would leave the page without its script. NaN and infinite
    statistics (a region with no slice left to summarize) are written as null, shown as "–"."""
    text = json.dumps(json_safe(data), separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _render_html(title: str, data: Mapping[str, Any]) -> str:
    """Fill the page template with the (escaped) title and the page data."""
    template = resources.files("medvae").joinpath("templates", TEMPLATE).read_text(encoding="utf-8")
    blob = _script_json(data)
    fill = {"TITLE": html.escape(title), "DATA": blob}  # one pass: a title holding "{{DATA}}" stays text
    return re.sub(r"\{\{(TITLE|DATA)\}\}", lambda m: fill[m.group(1)], template)


# --------------------------------------------------------------------------------------------
# the report folder: an output claimed and written atomically; the model named without a path
# --------------------------------------------------------------------------------------------
#: What the ``.medvae-output.json`` marker of a report folder says it holds; ``overwrite``
#: replaces only a folder whose marker says this (not a DICOM series or another medvae output).
REPORT_CONTENT = "medvae review report"


def _own_report(folder: Path, marker: Mapping[str, Any] | None) -> None:
    """The ``owned`` check of a report folder: only a report medvae wrote is replaced."""
    if (marker or {}).get("content") != REPORT_CONTENT:
        raise MedvaeError("refusing to replace: this folder is a medvae output but not a review report; "
                          "choose another --report folder", folder)


def check_report_dir(dir: str | PathLike, inputs: Mapping[str, str | PathLike | None]) -> Path:
    """Refuse a report folder that is, lies inside, or holds one of the evaluation's inputs.

    The report must never land in (or replace) a reference series folder or a restored scan's
    folder: files a PACS import or a later tool would pick up with the images.

    Parameters
    ----------
    dir : path
        The report folder.
    inputs : mapping of str to path or None
        The inputs by role (``restored``, ``reference``, ``mask``, ...); None entries are skipped.

    Returns
    -------
    Path
        ``dir``.

    Raises
    ------
    MedvaeError
        One line naming ``dir`` and the input it collides with.
    """
    out = Path(dir)
    here = out.resolve()
    for role, src in inputs.items():
        if src is None or str(src) == "":
            continue
        there = Path(src).resolve()
        if here == there:
            raise MedvaeError(f"the report folder is the {role} input; choose another --report folder", out)
        if there in here.parents:
            raise MedvaeError(f"the report folder lies inside the {role} input {src}; choose another "
                              "--report folder", out)
        if here in there.parents:
            raise MedvaeError(f"the report folder holds the {role} input {src}; choose another --report "
                              "folder", out)
    return out


@contextlib.contextmanager
def claim_report(dir: str | PathLike, *, overwrite: bool = False,
                 inputs: Mapping[str, str | PathLike | None] | None = None) -> Iterator[Any]:
    """Claim a report folder before the work (:func:`medvae.io.atomic.claim_output`).

    :func:`write_report` into the claimed folder re-uses the claim, so a command can claim the
    folder before it reads anything and write the report at the end.

    Parameters
    ----------
    dir : path
        The report folder.
    overwrite : bool, optional
        Replace a report that medvae wrote there earlier (anything else is refused).
    inputs : mapping of str to path or None, optional
        The evaluation's inputs by role, checked with :func:`check_report_dir`.

    Yields
    ------
    medvae.io.atomic.OutputClaim
    """
    from medvae.io.atomic import claim_output

    if inputs:
        check_report_dir(dir, inputs)
    with claim_output(dir, kind="dir", overwrite=overwrite, owned=_own_report) as claim:
        yield claim


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _write_figures(out: Path, vols: _Volumes, picks: Mapping[str, int], *, title: str, window, units: str,
                   err_max: float, unc_max: float, affine, captions, geometry) -> dict[str, Path]:
    paths = {}
    n = vols.shape[2]
    for which, k in picks.items():
        sl = {p: vols.vols[p][:, :, k] for p in (*GREY_PANELS, "uncertainty", "mask") if vols.has(p)}
        sl["error"] = vols.error(k)
        paths[f"figure_{which}"] = review_figure(
            sl, title=f"{title}: slice {k + 1} of {n} ({which}), {geometry['positions_mm'][k]:.1f} mm "
                      f"{geometry['normal']}", window=window, path=out / f"slice_{k:03d}_{which}.png",
            error_range=err_max, uncertainty_range=unc_max, affine=affine, units=units, captions=captions)
    return paths


def _candidates(evaluation, n: int) -> np.ndarray | None:
    """Slices showing anatomy: foreground >= 10 % of the slice (when the foreground is known)."""
    if "foreground" not in evaluation.summary.get("regions", {}):
        return None
    npx = np.zeros(n)
    for row in evaluation.rows:
        if row["source"] == "restored" and row["region"] == "foreground":
            npx[row["slice"]] = row["n_pixels"]
    total = next((r["n_pixels"] for r in evaluation.rows if r["region"] == "image"), 1)
    return npx >= 0.1 * total


def write_report(
    dir: str | PathLike,
    *,
    evaluation,
    restored: np.ndarray,
    reference: np.ndarray,
    corrupted: np.ndarray | None = None,
    baseline: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    window: Sequence[float],
    title: str,
    baseline_name: str | None = None,
    model_uri: str | None = None,
    model_meta: Mapping[str, Any] | None = None,
    run_id: str | None = None,
    affine: np.ndarray | None = None,
    slice_positions: Sequence[float] | None = None,
    units: str | None = None,
    max_bytes: int = PAGE_BUDGET,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write ``metrics.csv``, ``summary.json``, worst/median/best review figures and ``index.html``.

    The folder is claimed and written atomically (see the module docstring): all files appear
    together, or, on any error, none (an earlier report stays as it was).

    Parameters
    ----------
    dir : path
        Output folder: a new or empty folder, or (with ``overwrite``) a report medvae wrote.
    evaluation : medvae.evaluate.Evaluation
        From :func:`medvae.evaluate.evaluate_volumes` on the same volumes.
    restored, reference, corrupted, baseline, uncertainty, mask : ndarray (X, Y, Z)
        The volumes, in their own units (mask: nonzero = damaged, outlined).
    window : (lo, hi)
        Initial display window of the grey panels (the metric window; the page offers more).
    title : str
        Shown on the page and figures; the only free text the page carries, so it must not
        identify a patient.
    baseline_name : str, optional
        What the baseline is (e.g. ``"NL-means"``), for its caption.
    model_uri, model_meta : optional
        The model that restored the scan (footer; a local path is shown as its digest,
        :func:`~medvae.models.label.model_label`) and its checkpoint metadata (for the uncertainty's calibration, see
        :func:`calibration_statement`; without ``model_meta`` the page calls the calibration
        unknown, with metadata lacking ``"calibration"`` it says "not calibrated").
    run_id : str, optional
        The MLflow run of this evaluation: written into ``summary.json`` and the page, so the
        exported sign-off can be imported into it (``medvae review import``).
    affine : 4x4 array, optional
        Voxel → RAS; orients the display and gives slice positions, spacing and the scale bar.
    slice_positions : sequence of float, optional
        Each slice's position in mm (:func:`medvae.io.formats.scan_slice_positions` of the reference):
        a DICOM series' stored positions, so a missing slice does not shift the positions shown (the
        affine steps by the mean gap).
    units : str, optional
        Units of the values (default "HU" for CT evaluations, "" otherwise).
    max_bytes : int
        Budget for the embedded image data (see the module docstring).
    overwrite : bool, optional
        Replace a report medvae wrote in ``dir`` earlier; anything else there is refused.

    Returns
    -------
    dict
        ``metrics_csv``, ``summary_json``, ``index_html``, ``figure_worst``, ``figure_median``,
        ``figure_best`` → paths (in ``dir``).

    Raises
    ------
    MedvaeError
        ``dir`` is a file, is being written by another process, or exists and is not a report
        medvae wrote (or ``overwrite`` is not given).
    """
    out = Path(dir)
    vols = _Volumes(evaluation, reference, {"restored": restored, "corrupted": corrupted, "baseline": baseline,
                                            "uncertainty": uncertainty, "mask": mask}, affine)
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"bad display window {window!r}: need lo < hi")
    # the run id goes into this report's copy of the summary only: written into the caller's, it stayed
    # there, and a report rewritten without a run (a tracking outage) named the run in summary.json
    summary = {k: v for k, v in evaluation.summary.items() if k != "mlflow_run_id"}
    if run_id:
        summary["mlflow_run_id"] = run_id
    evaluation = dataclasses.replace(evaluation, summary=summary)
    units = ("HU" if (summary.get("modality") or "").upper() == "CT" else "") if units is None else units

    # claimed (re-used when the caller claimed it first) and staged: the folder appears complete,
    # or not at all, and only a report medvae wrote is ever replaced
    with claim_report(out, overwrite=overwrite) as claim, \
            claim.writing(record={"content": REPORT_CONTENT}) as stage:
        paths = {"metrics_csv": evaluation.write_csv(stage / "metrics.csv"),
                 "summary_json": evaluation.write_json(stage / "summary.json")}
        report_id = report_digest(paths["metrics_csv"])  # the exported sign-off names its evaluation

        region = summary.get("headline", {}).get("region", "image")
        picks = _pick_slices(evaluation.per_slice("restored", region, "psnr"),
                             _candidates(evaluation, vols.shape[2]), _summarized(evaluation, region, vols.shape[2]))
        err_max = vols.robust_max("error")
        unc_max = vols.robust_max("uncertainty") if vols.has("uncertainty") else 1.0
        geometry = slice_geometry(affine, vols.shape, slice_positions)
        captions = {"baseline": f"Baseline ({baseline_name})" if baseline_name else "Baseline"}
        paths.update(_write_figures(stage, vols, picks, title=title, window=(lo, hi), units=units, err_max=err_max,
                                    unc_max=unc_max, affine=affine, captions=captions, geometry=geometry))
        data = _page_data(evaluation, vols, picks=picks, region=region, window=(lo, hi), units=units,
                          err_max=err_max, unc_max=unc_max, geometry=geometry, captions=captions,
                          model_uri=model_label(model_uri), model_meta=model_meta, run_id=run_id, title=title,
                          max_bytes=max_bytes)
        data["report_id"] = report_id
        paths["index_html"] = stage / "index.html"
        paths["index_html"].write_text(_render_html(title, data), encoding="utf-8")
    return {key: out / p.name for key, p in paths.items()}


def _uncertainty_info(vols: _Volumes, evaluation, model_meta, unc_max: float, units: str,
                      *, model_named: bool) -> dict[str, Any] | None:
    if not vols.has("uncertainty"):
        return None
    if vols.has("mask"):
        region, where = vols.vols["mask"], "damaged (mask) pixels"
    elif "foreground" in evaluation.summary.get("regions", {}):
        region, where = _foreground(evaluation, vols), "foreground pixels"
    else:
        region, where = None, "pixels"
    cov = measured_coverage(vols.vols["restored"], vols.ref, vols.vols["uncertainty"], region)
    measured = ("" if cov is None else
                f"on this scan {100 * cov:.0f} % of {where} have |restored − reference| ≤ 2 std "
                "(95 % if calibrated and Gaussian)")
    # the regime restore used: an all-True mask, or for CT one that leaves out only padding (what `corrupt`
    # writes for noise), is global noise
    from medvae.slice_gaps import is_hole_mask

    holes = vols.has("mask") and is_hole_mask(np.asarray(vols.vols["mask"], bool), lambda a, b: vols.ref[:, :, a:b],
                                               str(evaluation.summary.get("modality") or ""))
    return {"max": unc_max, "calibration": calibration_statement(model_meta, holes=holes,
                                                                  model_named=model_named),
            "measured": measured,
            "units": units}


def _foreground(evaluation, vols: _Volumes) -> np.ndarray:
    from medvae.evaluate import foreground_mask

    return foreground_mask(vols.ref, evaluation.summary.get("modality"))


def _page_data(evaluation, vols: _Volumes, *, picks, region, window, units, err_max, unc_max, geometry,
               captions, model_uri, model_meta, run_id, title, max_bytes) -> dict[str, Any]:
    from medvae import __version__

    summary = evaluation.summary
    n = vols.shape[2]
    panels = [p for p in PAGE_ORDER if p == "error" or vols.has(p)]
    quant = _quantization(vols, panels, window, err_max, unc_max)
    slices, f, stride = _encode_slices(evaluation, vols, panels, quant, picks, max_bytes,
                                       geometry["positions_mm"])
    h, w = _reduced_shape(vols, f)
    notes = []
    if f > 1:
        notes.append(f"images block-averaged {f}× in-plane on this page (the PNG figures are full resolution)")
    if stride > 1:
        notes.append(f"every {stride}th slice shown (plus worst/median/best) to keep the page under "
                     f"{max_bytes / 1e6:g} MB")
    scaling = summary.get("scaling", {})
    pct = "percentile" in str(scaling.get("source") or "") and scaling.get("window") is not None
    return {
        "version": __version__, "modality": summary.get("modality"), "units": units,
        "n_total": n, "start": min(range(len(slices)), key=lambda i: abs(slices[i]["k"] - n // 2)),
        "panels": [{"key": p, "caption": captions.get(p, PANELS[p]),
                    "kind": p if p in ("error", "uncertainty") else "grey",
                    "offset": quant[p][0], "step": quant[p][1]} for p in panels],
        "dims": {"w": w, "h": h, "aspect": [w * geometry["spacing_mm"][0] * f, h * geometry["spacing_mm"][1] * f]},
        "geometry": geometry, "downsample": f, "stride": stride, "notes": notes,
        "windows": {"presets": _presets(summary.get("modality"), scaling.get("window") and tuple(scaling["window"]),
                                        window, percentiles=pct),
                    "percentiles": pct,
                    "initial": [window[0], window[1]],
                    "metric": scaling.get("description", "") + _default_source(scaling)},
        "lut": {"error": _lut(ERROR_CMAP).tolist(), "uncertainty": _lut(UNCERTAINTY_CMAP).tolist()},
        "error": {"max": err_max}, "uncertainty": _uncertainty_info(vols, evaluation, model_meta, unc_max, units,
                                                                    model_named=bool(model_uri)),
        "picks": picks, "headline": region, "slices": slices, "curve": _curve(evaluation, region),
        "summary": {"metrics": summary.get("metrics", {}), "sources": summary.get("sources", [])},
        "definitions": _definitions(summary, n_total=n, units=units, err_max=err_max, window=window,
                                    modality=summary.get("modality")),
        "run_id": run_id, "model_uri": model_uri,
    }


def _default_source(scaling: Mapping[str, Any]) -> str:
    """`` (MR default: reference volume 0.5-99.5 percentiles)`` when the scaling was medvae's default."""
    source = str(scaling.get("source") or "")
    return f" ({source})" if source and not source.startswith("--") else ""


def _reduced_shape(vols: _Volumes, f: int) -> tuple[int, int]:
    rows, cols = (vols.shape[1], vols.shape[0]) if vols.tf[0] else (vols.shape[0], vols.shape[1])
    return (rows // f, cols // f) if f > 1 else (rows, cols)
