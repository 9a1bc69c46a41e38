"""Review figures and the single-file ``index.html`` review page of an evaluation.

:func:`write_report` writes, into one folder:

* ``metrics.csv`` and ``summary.json`` (:class:`medvae.evaluate.Evaluation`);
* ``slice_KKK_worst.png``, ``slice_KKK_median.png``, ``slice_KKK_best.png``: review figures
  (:func:`review_figure`) of the slices with the lowest, median and highest restored PSNR over the
  whole slice, among the slices that show anatomy (foreground >= 10 % of the slice) when the
  evaluation has a foreground region;
* ``index.html``: one self-contained page (inline CSS/JS, images as base64 PNG data URIs, no
  network use at all) with a slice viewer (corrupted | restored | reference | error | uncertainty,
  slider ``#slice`` and arrow keys) above the summary metrics table and the definitions of what was
  measured. Large volumes are downsampled in-plane to at most 512 px and, if the page would still
  exceed about 18 MB, only every n-th slice is included (always with the worst, median and best).

Slices are ``array[:, :, k]`` with 0-based ``k``, as in ``metrics.csv``. When the scan's affine is given
they are displayed in radiological convention (patient right on the screen's left, anterior or
superior up); without it the array is assumed to be RAS-ordered. Nothing but the caller's ``title``,
the optional ``model_uri`` and the numbers identifies the data: no file names, no DICOM tags.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
from os import PathLike
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medvae.errors import MedvaeError

#: Order and captions of the viewer panels.
PANELS = {
    "corrupted": "Corrupted (input)",
    "restored": "Restored",
    "reference": "Reference",
    "error": "|Restored − reference|",
    "uncertainty": "Uncertainty",
}
ERROR_CMAP = "inferno"
UNCERTAINTY_CMAP = "viridis"
MASK_RGBA = (0, 220, 255, 255)  # contour of the damage mask
MAX_INPLANE = 512  # px, larger slices are block-averaged for the page
PAGE_BUDGET = 18_000_000  # bytes of base64 image data in index.html


# --------------------------------------------------------------------------------------------
# orientation and image helpers
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


def _reduce(a: np.ndarray, f: int, how: str = "mean") -> np.ndarray:
    """Block-reduce a 2-D array by an integer factor (edges cropped)."""
    if f <= 1:
        return a
    h, w = (a.shape[0] // f) * f, (a.shape[1] // f) * f
    b = a[:h, :w].reshape(h // f, f, w // f, f)
    return b.max(axis=(1, 3)) if how == "max" else b.mean(axis=(1, 3))


def _gray8(x: np.ndarray, window: Sequence[float]) -> np.ndarray:
    lo, hi = (float(v) for v in window)
    return np.round(np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _lut(cmap: str) -> np.ndarray:
    import matplotlib

    cm = matplotlib.colormaps[cmap]
    return np.round(cm(np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _png(arr: np.ndarray, palette: np.ndarray | None = None) -> bytes:
    from PIL import Image

    arr = np.ascontiguousarray(arr)
    if palette is not None:
        img = Image.fromarray(arr)  # mode "L"; putpalette turns it into "P" with the same indices
        img.putpalette(palette.reshape(-1).tolist())
    else:
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _contour(m: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    m = np.asarray(m, dtype=bool)
    return m & ~ndimage.binary_erosion(m, border_value=0)


def _fmt(v: Any, nd: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞" if v > 0 else "−∞"
    return f"{v:.{nd}f}"


# --------------------------------------------------------------------------------------------
# matplotlib figure
# --------------------------------------------------------------------------------------------
def review_figure(
    slices: Mapping[str, np.ndarray],
    *,
    title: str,
    window: Sequence[float],
    path: str | PathLike,
    error_range: float | None = None,
    uncertainty_range: float | None = None,
    affine: np.ndarray | None = None,
    units: str = "",
) -> Path:
    """Save one row ``corrupted | restored | reference | abs error (| uncertainty)`` as a PNG.

    ``slices`` holds 2-D slices ``array[:, :, k]`` under the keys ``restored`` and ``reference``
    (required), ``corrupted``, ``uncertainty``, ``mask`` (drawn as a cyan contour on the corrupted and
    restored panels) and ``error`` (default: ``|restored − reference|``), all optional. Images are
    grey in ``window = (lo, hi)``; the error uses the ``inferno`` colormap from 0 to ``error_range``
    (default: its 99.5th percentile) and the uncertainty ``viridis``, each with its colorbar.
    Rendered with matplotlib's Agg backend (no display needed).
    """
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if "restored" not in slices or "reference" not in slices:
        raise ValueError("review_figure needs at least 'restored' and 'reference' slices")
    lo, hi = (float(v) for v in window)
    tf = _display_transform(affine)
    ref = np.asarray(slices["reference"], dtype=np.float64)
    err = slices.get("error")
    if err is None:
        err = np.abs(np.asarray(slices["restored"], dtype=np.float64) - ref)
    err = np.asarray(err, dtype=np.float64)
    panels = [k for k in ("corrupted", "restored", "reference") if slices.get(k) is not None]
    panels.append("error")
    if slices.get("uncertainty") is not None:
        panels.append("uncertainty")
    mask = slices.get("mask")
    contour = _orient(_contour(mask), tf) if mask is not None and np.any(mask) else None

    n = len(panels)
    fig = Figure(figsize=(3.2 * n + 0.6, 3.9), dpi=110, facecolor="black")
    FigureCanvasAgg(fig)
    # a narrow empty column after the error panel holds its colorbar when another panel follows
    widths, cols = [], []
    for key in panels:
        cols.append(len(widths))
        widths.append(1.0)
        if key == "error" and key != panels[-1]:
            widths.append(0.32)
    gs = fig.add_gridspec(1, len(widths), width_ratios=widths, wspace=0.06)
    axes = [fig.add_subplot(gs[0, c]) for c in cols]
    unit = f" ({units})" if units else ""
    for ax, key in zip(axes, panels):
        ax.set_facecolor("black")
        if key == "error":
            vmax = error_range if error_range else float(np.percentile(err, 99.5)) or 1.0
            im = ax.imshow(_orient(err, tf), cmap=ERROR_CMAP, vmin=0, vmax=vmax, aspect=tf[3],
                           interpolation="nearest")
            cb = fig.colorbar(im, cax=ax.inset_axes([1.03, 0.0, 0.05, 1.0]))  # panels keep equal size
            cb.set_label(f"abs error{unit}", color="white")
            cb.ax.tick_params(colors="white")
            ax.set_title(PANELS["error"], color="white", fontsize=10)
        elif key == "uncertainty":
            u = np.asarray(slices["uncertainty"], dtype=np.float64)
            vmax = uncertainty_range if uncertainty_range else float(np.percentile(u, 99.5)) or 1.0
            im = ax.imshow(_orient(u, tf), cmap=UNCERTAINTY_CMAP, vmin=0, vmax=vmax, aspect=tf[3],
                           interpolation="nearest")
            cb = fig.colorbar(im, cax=ax.inset_axes([1.03, 0.0, 0.05, 1.0]))
            cb.set_label(f"uncertainty{unit}", color="white")
            cb.ax.tick_params(colors="white")
            ax.set_title(PANELS["uncertainty"], color="white", fontsize=10)
        else:
            ax.imshow(_orient(np.asarray(slices[key], dtype=np.float64), tf), cmap="gray", vmin=lo, vmax=hi,
                      aspect=tf[3], interpolation="nearest")
            if contour is not None and key in ("corrupted", "restored"):
                rgba = np.zeros(contour.shape + (4,))
                rgba[contour] = np.array(MASK_RGBA) / 255.0
                ax.imshow(rgba, aspect=tf[3], interpolation="nearest")
            ax.set_title(PANELS[key], color="white", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{title}   [window {lo:g}..{hi:g}{' ' + units if units else ''}]", color="white", fontsize=11)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="black", bbox_inches="tight", pad_inches=0.08)
    return path


# --------------------------------------------------------------------------------------------
# the review page
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


def _pick_slices(psnr: np.ndarray, candidates: np.ndarray | None = None) -> dict[str, int]:
    """Worst, median and best slice by restored PSNR (NaN slices ignored), among ``candidates``
    (a boolean per slice) when any of them is True."""
    ok = ~np.isnan(psnr)
    if candidates is not None and (ok & candidates).any():
        ok &= candidates
    valid = np.flatnonzero(ok)
    if valid.size == 0:
        valid = np.arange(psnr.size)
    order = valid[np.argsort(psnr[valid], kind="stable")]
    return {"worst": int(order[0]), "median": int(order[(order.size - 1) // 2]), "best": int(order[-1])}


def write_report(
    dir: str | PathLike,
    *,
    evaluation,
    restored: np.ndarray,
    reference: np.ndarray,
    corrupted: np.ndarray | None = None,
    uncertainty: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    window: Sequence[float],
    title: str,
    model_uri: str | None = None,
    affine: np.ndarray | None = None,
    units: str | None = None,
    max_bytes: int = PAGE_BUDGET,
) -> dict[str, Path]:
    """Write ``metrics.csv``, ``summary.json``, worst/median/best review figures and ``index.html``.

    Parameters
    ----------
    dir : path
        Output folder (created).
    evaluation : medvae.evaluate.Evaluation
        From :func:`medvae.evaluate.evaluate_volumes` on the same volumes.
    restored, reference, corrupted, uncertainty, mask : ndarray (X, Y, Z)
        The volumes, in their own units (mask: nonzero = damaged, drawn as a contour).
    window : (lo, hi)
        Display window for the grey panels.
    title : str
        Shown on the page and figures; the only free text the page carries, so it must not
        identify a patient.
    model_uri : str, optional
        Shown in the page footer.
    affine : 4x4 array, optional
        Voxel → RAS; used only to orient the display (radiological convention).
    units : str, optional
        Units of the values (default "HU" for CT evaluations, "" otherwise).
    max_bytes : int
        Budget for the embedded images; slices are subsampled to stay under it.

    Returns
    -------
    dict
        ``metrics_csv``, ``summary_json``, ``index_html``, ``figure_worst``, ``figure_median``,
        ``figure_best`` → paths.
    """
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    ref = np.asarray(reference)
    if ref.ndim == 2:
        ref = ref[:, :, None]
    shape = ref.shape
    rest = _check_same("restored", restored, shape)
    corr = _check_same("corrupted", corrupted, shape)
    unc = _check_same("uncertainty", uncertainty, shape)
    msk = _check_same("mask", mask, shape)
    msk = None if msk is None else (msk != 0)
    summary = evaluation.summary
    if summary.get("n_slices") != shape[2]:
        raise MedvaeError(f"the evaluation has {summary.get('n_slices')} slices but the volumes have {shape[2]}")
    lo, hi = (float(v) for v in window)
    if not hi > lo:
        raise ValueError(f"bad display window {window!r}: need lo < hi")
    if units is None:
        units = "HU" if (summary.get("modality") or "").upper() == "CT" else ""

    paths: dict[str, Path] = {}
    paths["metrics_csv"] = evaluation.write_csv(out / "metrics.csv")
    paths["summary_json"] = evaluation.write_json(out / "summary.json")

    # error as scored: after clipping to the evaluation window when there is one
    ev_win = (summary.get("scaling") or {}).get("window")

    def error_slice(k: int) -> np.ndarray:
        a = rest[:, :, k].astype(np.float64)
        b = ref[:, :, k].astype(np.float64)
        if ev_win:
            a, b = np.clip(a, *ev_win), np.clip(b, *ev_win)
        return np.abs(a - b)

    sample = np.unique(np.linspace(0, shape[2] - 1, min(shape[2], 16)).round().astype(int))
    err_max = float(np.percentile(np.stack([error_slice(k) for k in sample]), 99.5)) or 1.0
    unc_max = None
    if unc is not None:
        unc_max = float(np.percentile(unc[:, :, sample], 99.5)) or 1.0

    psnr_r = evaluation.per_slice("restored", "image", "psnr")
    # slices that show anatomy (>= 10 % foreground) compete for worst/median/best; an empty slice
    # above the head would otherwise be the "best" one
    candidates = None
    if "foreground" in summary.get("regions", {}):
        n_fg = np.zeros(shape[2])
        for row in evaluation.rows:
            if row["source"] == "restored" and row["region"] == "foreground":
                n_fg[row["slice"]] = row["n_pixels"]
        candidates = n_fg >= 0.10 * shape[0] * shape[1]
    picks = _pick_slices(psnr_r, candidates)
    tf = _display_transform(affine)
    for which, k in picks.items():
        sl = {"restored": rest[:, :, k], "reference": ref[:, :, k], "error": error_slice(k)}
        if corr is not None:
            sl["corrupted"] = corr[:, :, k]
        if unc is not None:
            sl["uncertainty"] = unc[:, :, k]
        if msk is not None:
            sl["mask"] = msk[:, :, k]
        ssim_k = evaluation.per_slice("restored", "image", "ssim")[k]
        paths[f"figure_{which}"] = review_figure(
            sl, title=f"{title} — slice {k} ({which}): PSNR {_fmt(psnr_r[k])} dB, SSIM {_fmt(ssim_k, 3)}",
            window=(lo, hi), path=out / f"slice_{k:03d}_{which}.png", error_range=err_max,
            uncertainty_range=unc_max, affine=affine, units=units,
        )

    # ---- images for the page
    f = max(1, math.ceil(max(shape[0], shape[1]) / MAX_INPLANE))
    err_lut, unc_lut = _lut(ERROR_CMAP), _lut(UNCERTAINTY_CMAP)
    panels = [p for p in PANELS if p not in ("corrupted", "uncertainty")
              or (p == "corrupted" and corr is not None) or (p == "uncertainty" and unc is not None)]

    def encode(k: int) -> dict[str, str]:
        imgs: dict[str, bytes] = {}
        for p in panels:
            if p in ("corrupted", "restored", "reference"):
                src = {"corrupted": corr, "restored": rest, "reference": ref}[p]
                imgs[p] = _png(_gray8(_orient(_reduce(src[:, :, k].astype(np.float64), f), tf), (lo, hi)))
            elif p == "error":
                idx = _gray8(_orient(_reduce(error_slice(k), f), tf), (0.0, err_max))
                imgs[p] = _png(idx, err_lut)
            else:
                idx = _gray8(_orient(_reduce(unc[:, :, k].astype(np.float64), f), tf), (0.0, unc_max))
                imgs[p] = _png(idx, unc_lut)
        if msk is not None and msk[:, :, k].any():
            c = _orient(_contour(_reduce(msk[:, :, k].astype(np.uint8), f, "max") > 0), tf)
            rgba = np.zeros(c.shape + (4,), dtype=np.uint8)
            rgba[c] = MASK_RGBA
            imgs["mask"] = _png(rgba)
        return {p: _data_uri(b) for p, b in imgs.items()}

    cache: dict[int, dict[str, str]] = {}
    probe = [int(k) for k in np.unique(np.linspace(0, shape[2] - 1, min(shape[2], 5)).round().astype(int))]
    for k in probe:
        cache[k] = encode(k)
    per_slice = np.mean([sum(len(v) for v in cache[k].values()) for k in probe])
    stride = max(1, math.ceil(per_slice * shape[2] / max_bytes))
    included = sorted(set(range(0, shape[2], stride)) | set(picks.values()))
    slices_js = []
    metric_rows = {}
    for src in summary.get("sources", ["restored"]):
        metric_rows[src] = {m: evaluation.per_slice(src, "image", m) for m in ("psnr", "ssim")}
    mask_rows = None
    if "mask" in summary["metrics"].get("restored", {}):
        mask_rows = {src: {m: evaluation.per_slice(src, "mask", m) for m in ("psnr", "ssim")}
                     for src in summary.get("sources", ["restored"])}
    for k in included:
        imgs = cache.pop(k) if k in cache else encode(k)
        entry: dict[str, Any] = {"k": k, "img": imgs}
        for src, ms in metric_rows.items():
            entry[src] = {m: _num(ms[m][k]) for m in ms}
        if mask_rows is not None:
            entry["mask_metrics"] = {src: {m: _num(v[m][k]) for m in v} for src, v in mask_rows.items()}
        slices_js.append(entry)

    if tf[0]:  # rows on screen index the array's second axis
        h_px, w_px = shape[1] // f, shape[0] // f
    else:
        h_px, w_px = shape[0] // f, shape[1] // f
    page = _render_html(
        title=title, summary=summary, panels=panels, slices=slices_js, picks=picks,
        window=(lo, hi), units=units, err_max=err_max, unc_max=unc_max, model_uri=model_uri,
        aspect=(w_px, h_px * tf[3]), stride=stride, downsample=f, n_total=shape[2],
        psnr_curve=[_num(v) for v in psnr_r], has_mask=msk is not None,
    )
    paths["index_html"] = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(paths["index_html"])
    return paths


def _num(v: float) -> float | str | None:
    v = float(v)
    if math.isnan(v):
        return None
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return round(v, 6)


def _gradient(cmap: str) -> str:
    lut = _lut(cmap)
    stops = [f"rgb({r},{g},{b}) {100 * i / 10:.0f}%" for i, (r, g, b) in
             enumerate(lut[np.linspace(0, 255, 11).round().astype(int)])]
    return "linear-gradient(to right, " + ", ".join(stops) + ")"


_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#111;color:#e8e8e8;font:15px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
header{padding:10px 18px 4px}
h1{font-size:20px;margin:0 0 2px;font-weight:600}
h2{font-size:16px;margin:18px 0 8px}
.sub{color:#aaa;font-size:13px;margin:0}
#viewer{padding:6px 18px 10px}
.controls{display:flex;flex-wrap:wrap;align-items:center;gap:10px 16px;margin:6px 0 10px}
#slice{flex:1 1 320px;min-width:240px;accent-color:#4db8ff;height:22px}
#slice:focus{outline:1px solid #4db8ff66;outline-offset:2px}
#slice-label{font-variant-numeric:tabular-nums;font-size:15px;min-width:32em}
button{background:#2a2a2a;color:#e8e8e8;border:1px solid #555;border-radius:4px;padding:3px 10px;font:inherit;font-size:13px;cursor:pointer}
button:hover{background:#3a3a3a}
label.toggle{font-size:13px;color:#ccc}
.panels{display:flex;gap:8px;align-items:flex-start;justify-content:flex-start}
figure{margin:0;flex:1 1 0;min-width:0;max-width:560px}
figcaption{font-size:13px;color:#ccc;text-align:center;padding:3px 0 0}
.frame{position:relative;width:100%;background:#000}
.frame img{position:absolute;inset:0;width:100%;height:100%;display:block}
.frame img.overlay{pointer-events:none}
.cbar{height:10px;margin:4px 4px 0;border:1px solid #444}
.cbl{display:flex;justify-content:space-between;font-size:11px;color:#aaa;padding:0 4px}
#curve{display:block;width:100%;height:56px;background:#181818;border:1px solid #333;margin:8px 0 0;cursor:pointer}
#summary{padding:4px 18px 18px;max-width:1200px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px}
th,td{border:1px solid #3a3a3a;padding:3px 9px;text-align:right}
th{background:#222;font-weight:600}
td.l,th.l{text-align:left}
dl{font-size:13px;color:#ccc;margin:8px 0}
dt{font-weight:600;color:#e8e8e8;margin-top:6px}
dd{margin:0 0 0 14px}
footer{padding:8px 18px 16px;color:#888;font-size:12px}
"""

_JS = """
(function(){
const D = JSON.parse(document.getElementById('data').textContent);
const S = D.slices;
const slider = document.getElementById('slice');
const label = document.getElementById('slice-label');
const maskBox = document.getElementById('show-mask');
function f(v, nd){ if (v === null || v === undefined) return '–'; if (v === 'inf') return '∞';
  if (v === '-inf') return '−∞'; return Number(v).toFixed(nd); }
function show(i){
  i = Math.max(0, Math.min(S.length - 1, i|0));
  if (String(slider.value) !== String(i)) slider.value = i;
  const s = S[i];
  for (const p of D.panels){
    const img = document.getElementById('img-' + p);
    if (img && img.src !== s.img[p]) img.src = s.img[p];
  }
  for (const p of ['corrupted','restored']){
    const ov = document.getElementById('mask-' + p);
    if (!ov) continue;
    if (s.img.mask && maskBox && maskBox.checked){ ov.src = s.img.mask; ov.style.display = 'block'; }
    else { ov.style.display = 'none'; }
  }
  let t = 'Slice k = ' + s.k + ' / ' + (D.n_total - 1) + ' \u00b7 restored: PSNR ' + f(s.restored.psnr, 2)
        + ' dB, SSIM ' + f(s.restored.ssim, 3);
  if (s.corrupted) t += ' \u00b7 corrupted: PSNR ' + f(s.corrupted.psnr, 2) + ' dB, SSIM ' + f(s.corrupted.ssim, 3);
  t += ' (whole slice)';
  if (s.mask_metrics && s.mask_metrics.restored.psnr !== null)
    t += ' \u00b7 in mask: PSNR ' + f(s.mask_metrics.restored.psnr, 2) + ' dB';
  label.textContent = t;
  const m = document.getElementById('curve-marker');
  if (m){ m.setAttribute('x1', s.k); m.setAttribute('x2', s.k); }
}
function indexOfK(k){ let best = 0; for (let i = 0; i < S.length; i++){ if (Math.abs(S[i].k - k) < Math.abs(S[best].k - k)) best = i; } return best; }
slider.addEventListener('input', function(){ show(+slider.value); });
slider.addEventListener('change', function(){ show(+slider.value); });
document.addEventListener('keydown', function(e){
  if (e.target === slider) return;  // the slider handles its own arrow keys
  if (e.key === 'ArrowRight' || e.key === 'ArrowUp'){ show(+slider.value + 1); e.preventDefault(); }
  else if (e.key === 'ArrowLeft' || e.key === 'ArrowDown'){ show(+slider.value - 1); e.preventDefault(); }
  else if (e.key === 'Home'){ show(0); e.preventDefault(); }
  else if (e.key === 'End'){ show(S.length - 1); e.preventDefault(); }
});
for (const b of document.querySelectorAll('button[data-k]')){
  b.addEventListener('click', function(){ show(indexOfK(+b.dataset.k)); slider.focus(); });
}
if (maskBox) maskBox.addEventListener('change', function(){ show(+slider.value); });
const curve = document.getElementById('curve');
if (curve) curve.addEventListener('click', function(e){
  const r = curve.getBoundingClientRect();
  show(indexOfK(Math.round((e.clientX - r.left) / r.width * (D.n_total - 1)))); slider.focus();
});
show(indexOfK(D.start));
slider.focus();
})();
"""


def _render_html(*, title, summary, panels, slices, picks, window, units, err_max, unc_max, model_uri,
                 aspect, stride, downsample, n_total, psnr_curve, has_mask) -> str:
    from medvae import __version__

    e = html.escape
    lo, hi = window
    usfx = f" {units}" if units else ""
    scaling = summary.get("scaling", {})
    start = int(n_total // 2)  # open at the middle of the volume

    # viewer panels
    figs = []
    for p in panels:
        overlay = (f'<img class="overlay" id="mask-{p}" alt="" style="display:none">'
                   if has_mask and p in ("corrupted", "restored") else "")
        bar = ""
        if p == "error":
            bar = (f'<div class="cbar" style="background:{_gradient(ERROR_CMAP)}"></div>'
                   f'<div class="cbl"><span>0</span><span>{e(_fmt(err_max / 2, 1))}</span>'
                   f'<span>≥ {e(_fmt(err_max, 1))}{e(usfx)}</span></div>')
        elif p == "uncertainty":
            bar = (f'<div class="cbar" style="background:{_gradient(UNCERTAINTY_CMAP)}"></div>'
                   f'<div class="cbl"><span>0</span><span>{e(_fmt(unc_max / 2, 1))}</span>'
                   f'<span>≥ {e(_fmt(unc_max, 1))}{e(usfx)}</span></div>')
        else:
            bar = f'<div class="cbl"><span>window {lo:g}..{hi:g}{e(usfx)}</span></div>'
        cap = PANELS[p]
        figs.append(
            f'<figure><div class="frame" style="aspect-ratio:{aspect[0]:.3f}/{aspect[1]:.3f}">'
            f'<img id="img-{p}" alt="{e(cap)}">{overlay}</div>'
            f'<figcaption>{e(cap)}</figcaption>{bar}</figure>'
        )

    # PSNR-per-slice curve (inline SVG, x = slice index)
    finite = [v for v in psnr_curve if isinstance(v, float)]
    curve = ""
    if len(psnr_curve) > 1 and finite:
        ymin, ymax = min(finite), max(finite)
        if ymax - ymin < 1e-9:
            ymin, ymax = ymin - 1, ymax + 1
        cap = ymax + (ymax - ymin) * 0.05
        pts = []
        for k, v in enumerate(psnr_curve):
            y = cap if v == "inf" else v
            if y is None:
                continue
            pts.append(f"{k},{(cap - y) / (cap - ymin + 1e-12) * 100:.2f}")
        curve = (
            f'<svg id="curve" viewBox="0 -4 {max(1, n_total - 1)} 108" preserveAspectRatio="none" '
            f'aria-label="restored PSNR per slice"><polyline points="{" ".join(pts)}" fill="none" '
            f'stroke="#4db8ff" stroke-width="1.5" vector-effect="non-scaling-stroke"/>'
            f'<line id="curve-marker" x1="0" x2="0" y1="-4" y2="104" stroke="#ffcc33" stroke-width="2" '
            f'vector-effect="non-scaling-stroke"/></svg>'
            f'<div class="cbl"><span>restored PSNR per slice (whole slice): {ymin:.1f}..{ymax:.1f} dB — click to jump</span></div>'
        )

    buttons = " ".join(f'<button type="button" data-k="{k}">{w} (k = {k})</button>' for w, k in picks.items())
    mask_toggle = ('<label class="toggle"><input type="checkbox" id="show-mask" checked> damage mask contour</label>'
                   if has_mask else "")
    notes = []
    if downsample > 1:
        notes.append(f"images downsampled {downsample}× in-plane for this page")
    if stride > 1:
        nth = {2: "2nd", 3: "3rd"}.get(stride, f"{stride}th")
        notes.append(f"every {nth} slice shown (plus worst/median/best) to keep the page small")

    # summary table
    rows = []
    metrics = summary.get("metrics", {})
    for src, regions in metrics.items():
        for reg, ms in regions.items():
            cells = [f'<td class="l">{e(src)}</td><td class="l">{e(reg)}</td>']
            for m, nd in (("psnr", 2), ("ssim", 4)):
                st = ms[m]
                cells += [f"<td>{_fmt(st[s], nd)}</td>" for s in ("mean", "median", "min")]
            cells.append(f"<td>{ms['psnr']['n_slices']}</td>")
            rows.append("<tr>" + "".join(cells) + "</tr>")
    table = (
        '<table id="metrics"><thead><tr><th class="l" rowspan="2">source</th><th class="l" rowspan="2">region</th>'
        '<th colspan="3">PSNR (dB)</th><th colspan="3">SSIM</th><th rowspan="2">slices</th></tr>'
        "<tr><th>mean</th><th>median</th><th>min</th><th>mean</th><th>median</th><th>min</th></tr></thead>"
        "<tbody>" + "".join(rows) + "</tbody></table>"
    )
    defs = [
        ("Intensity scaling (what the metrics see)", scaling.get("description", "")),
        ("PSNR", summary.get("psnr_definition", "")),
        ("SSIM", summary.get("ssim_definition", "")),
    ]
    for reg, d in summary.get("regions", {}).items():
        defs.append((f"Region “{reg}”", d))
    defs.append(("Slices", f"{n_total} slices k = 0..{n_total - 1} of array[:, :, k] (0-based, as in metrics.csv); "
                 "summary statistics are over slices where the region is not empty"))
    defs.append(("Display", f"grey panels: window {lo:g}..{hi:g}{usfx}; error: |restored − reference|"
                 + (" after clipping to the evaluation window" if scaling.get("window") else "")
                 + f", colour scale 0..{_fmt(err_max, 1)}{usfx} (99.5th percentile)"))
    dl = "".join(f"<dt>{e(t)}</dt><dd>{e(str(d))}</dd>" for t, d in defs)

    data = {"slices": slices, "panels": panels, "n_total": n_total, "start": start}
    data_json = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    modality = summary.get("modality") or "unknown modality"
    sub = (f"{e(str(modality))} · {n_total} slices · metrics: {e(scaling.get('description', ''))}"
           + (" · " + e("; ".join(notes)) if notes else ""))
    foot = f"medvae {e(__version__)} review page — self-contained, no network access."
    if model_uri:
        foot += f" Model: {e(str(model_uri))}"

    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{e(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{e(title)}</h1><p class="sub">{sub}</p></header>
<section id="viewer">
<div class="controls">
<input type="range" id="slice" min="0" max="{len(slices) - 1}" step="1" value="0" aria-label="slice">
<span id="slice-label">Slice</span>
</div>
<div class="controls">{buttons} {mask_toggle} <span class="sub">← → keys step through slices</span></div>
<div class="panels">{''.join(figs)}</div>
{curve}
</section>
<section id="summary">
<h2>Summary over slices</h2>
{table}
<dl>{dl}</dl>
</section>
<footer>{foot}</footer>
<script type="application/json" id="data">{data_json}</script>
<script>{_JS}</script>
</body></html>
"""
