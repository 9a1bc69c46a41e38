"""Helpers shared by ``scripts/bench_quality.py`` and ``scripts/bench_speed.py`` (not part of the package).

The protocol (docs/benchmarks.md) in one place:

* **Data.** By default the validation volumes of the shipped ``default`` config (``data.val_paths``), which
  training never sees. Slices ``array[:, :, k]`` with an in-plane size of at least :data:`MIN_SIZE`
  and at least :data:`MIN_FOREGROUND` foreground (the training rule: CT > −500 HU, MR > 10 % of the
  window), at most ``max_slices`` per volume, evenly spread over the usable slices.
* **Window.** CT: −1000..1000 HU; MR: the volume's 0.5–99.5 percentiles; both mapped linearly to
  [0, 1] (:data:`PROTOCOL`). Corruptions, restorations and metrics all work in these window units.
* **Metrics.** PSNR and SSIM (:func:`medvae.evaluate.psnr` / :func:`~medvae.evaluate.ssim`, equal to
  scikit-image's) on the slice clipped to the window [0, 1], data range 1, over the whole slice; for
  mask corruptions also PSNR over the mask pixels only (``psnr_mask``).
* **Corruptions** (:data:`CORRUPTIONS`): medvae's deterministic / random transforms with fixed
  parameters (not the training recipes), each seeded per slice by :func:`case_seed`, so every
  method sees the same corrupted slices.
* **Targets** (:data:`TARGETS`): what "medvae beats the classical baselines" means per corruption;
  :func:`gap_table` turns a summary into PASS / MISS rows.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import resource
import subprocess
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from medvae.evaluate import json_safe
from medvae.intensity import DEFAULT_CT_WINDOW, IntensityPolicy, normalize
from medvae.io.atomic import atomic_output
from medvae.training.data import foreground_fraction

ROOT = Path(__file__).resolve().parents[1]
#: the shipped training config (medvae/configs/default.yaml), by name
DEFAULT_CONFIG = "default"
#: the development scans beside the checkout (benchmarks run from the checkout)
DEV_DATA = ROOT.parent / "shared" / "data" / "dev"

#: The benchmark's intensity windows (CT −1000..1000 HU, MR 0.5–99.5 volume percentiles).
PROTOCOL = IntensityPolicy()
#: Metrics are computed on images clipped to this window (window units), data range 1.
METRIC_WINDOW = (0.0, 1.0)
MIN_FOREGROUND = 0.10
MIN_SIZE = 64
DEFAULT_MAX_SLICES = 12


# --------------------------------------------------------------------------------------------
# data selection and windows
# --------------------------------------------------------------------------------------------
def protocol_window(volume: np.ndarray, modality: str) -> tuple[float, float]:
    """``(lo, hi)`` of the protocol window: CT −1000..1000 HU, MR the volume's 0.5–99.5 percentiles.

    >>> protocol_window(np.zeros((4, 4, 2)), "CT")
    (-1000.0, 1000.0)
    """
    return PROTOCOL.window_for(volume, modality)


def to_window_units(volume: np.ndarray, modality: str) -> tuple[np.ndarray, tuple[float, float]]:
    """The volume mapped linearly to [0, 1] by :func:`protocol_window` (not clipped), and the window."""
    win = protocol_window(volume, modality)
    return normalize(volume, win), win


def select_slices(volume: np.ndarray, modality: str, *, max_slices: int | None = DEFAULT_MAX_SLICES,
                  min_foreground: float = MIN_FOREGROUND, min_size: int = MIN_SIZE) -> list[int]:
    """Indices ``k`` of the usable slices ``volume[:, :, k]`` (window units), capped evenly.

    A slice is usable when both in-plane sizes are ``>= min_size`` and its foreground fraction is
    ``>= min_foreground``. When more than ``max_slices`` are usable, the slice at the centre of
    each of ``max_slices`` equal strata of the usable list is taken (one slice: the middle one).

    >>> v = np.zeros((64, 64, 5), np.float32); v[:, :32, :] = 1.0   # 50 % foreground everywhere
    >>> select_slices(v, "MR", max_slices=2)
    [1, 3]
    """
    vol = np.asarray(volume)
    if vol.ndim == 2:
        vol = vol[:, :, None]
    if min(vol.shape[:2]) < min_size:
        return []
    usable = [k for k in range(vol.shape[2]) if foreground_fraction(vol[:, :, k], modality) >= min_foreground]
    return cap_evenly(usable, max_slices)


def cap_evenly(items: Sequence[int], n: int | None) -> list[int]:
    """At most ``n`` items, one from the centre of each of ``n`` equal strata (all when ``n`` is None)."""
    items = list(items)
    if n is None or len(items) <= n:
        return items
    if n < 1:
        return []
    pos = ((np.arange(n) + 0.5) * len(items) / n).astype(int)
    return [items[i] for i in pos]


@dataclass
class BenchVolume:
    """One benchmark volume: where it came from and which slices are used."""

    name: str                      # file or folder name (no identifiers from the header)
    path: str
    modality: str
    shape: tuple[int, ...]
    window: tuple[float, float]    # protocol window, scan units
    usable: int                    # slices passing the size and foreground rules
    slices: list[int]              # the ones used (after the cap)


@dataclass
class BenchSlice:
    """One clean slice in window units."""

    volume: str
    modality: str
    index: int                     # k of array[:, :, k]
    clean: np.ndarray = field(repr=False)   # float32 (X, Y), window units (not clipped)

    @property
    def key(self) -> str:
        return f"{self.volume}:{self.index}"


def default_data_paths(config: str | os.PathLike = DEFAULT_CONFIG) -> list[Path]:
    """The validation volumes of a training config (``data.val_paths``), resolved like training does."""
    from medvae.training.config import expand_paths, load_config

    cfg = load_config(config)
    return expand_paths(cfg.data.val_paths, "data.val_paths", exclude=cfg.data.exclude)


#: the shared data sets beside the checkout (``dev`` and ``extra``, each with a manifest.json)
SHARED_DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class SplitEntry:
    """One scan of a benchmark split, with the facts that decide where it may go."""

    path: str          # relative to SHARED_DATA
    modality: str      # from the data set's manifest (NIfTI has none; a CT template can look like MR)
    kind: str          # "real" or "template" (manifest's ``kind``)
    source: str        # the package it comes from
    subject: str = ""  # who was scanned, as far as the manifests tell: the DICOM PatientID (the manifest's
                       # ``subject``; a file's codec variants and crops share it), else the package for a
                       # package's own data set (all of dipy's files are "dipy", trained-on b0 included)

    @property
    def file(self) -> Path:
        return SHARED_DATA / self.path


#: Validation volumes of the benchmark (issue 10): none is in the shipped model's training data
#: (``data.paths`` of medvae/configs/default.yaml minus its ``val_paths``), checked by
#: :func:`check_unseen`. Four MR subjects from four packages, five CT scans from four sources.
VALIDATION_SPLIT: tuple[SplitEntry, ...] = (
    SplitEntry("dev/nifti/nibabel_example4d.nii.gz", "MR", "real", "nibabel", "nibabel"),
    SplitEntry("extra/nifti/totalseg_abdomen_mr.nii.gz", "MR", "real", "totalsegmentator", "totalsegmentator"),
    SplitEntry("extra/nifti/sdcflows_epi.nii.gz", "MR", "real", "sdcflows", "sdcflows"),
    SplitEntry("extra/nifti/nireports_ds000114_dwi.nii.gz", "MR", "real", "nireports", "nireports ds000114"),
    SplitEntry("extra/nifti/totalseg_abdomen_ct.nii.gz", "CT", "real", "totalsegmentator", "totalsegmentator"),
    SplitEntry("extra/nifti/totalseg_chest_cta.nii.gz", "CT", "real", "totalsegmentator", "totalsegmentator"),
    SplitEntry("dev/dicom/pydicom-data/693_UNCR.dcm", "CT", "real", "pydicom-data", "CQ500-CT-310"),
    SplitEntry("dev/dicom/pydicom-data/explicit_VR-UN.dcm", "CT", "real", "pydicom-data", "PANCREAS_0001"),
    SplitEntry("dev/dicom/pydicom/CT_small.dcm", "CT", "real", "pydicom", "1CT1"),
)

#: Calibration volumes of the uncertainty map (scripts/calibrate_uncertainty.py): disjoint from
#: :data:`VALIDATION_SPLIT` by subject (no dipy scan is validated on), never trained on: dipy's PIESNO
#: diffusion slice (8-coil noise) and T1 slice, and two dev scans that no config uses (pydicom's MR_small,
#: the enhanced CT eCT_Supplemental, whose frames are a CT perfusion (rCBF) map, not anatomy: the only
#: CT no config trains or validates on; docs/model_card.md says what that costs the CT fit). The v3 model
#: trains on the scans that calibrated v2 (dipy's b0 volume, the two T1 templates and the CT brain
#: template).
CALIBRATION_SPLIT: tuple[SplitEntry, ...] = (
    SplitEntry("extra/nifti/dipy_piesno.nii.gz", "MR", "real", "dipy", "dipy"),
    SplitEntry("extra/nifti/dipy_t1_coronal_slice.nii.gz", "MR", "real", "dipy", "dipy"),
    SplitEntry("dev/dicom/pydicom/MR_small.dcm", "MR", "real", "pydicom", "4MR1"),
    SplitEntry("dev/dicom/pydicom-data/eCT_Supplemental.dcm", "CT", "real", "pydicom-data", "0010"),
)
SPLITS = {"validation": VALIDATION_SPLIT, "calibration": CALIBRATION_SPLIT}


def training_paths(config: str | os.PathLike = DEFAULT_CONFIG) -> set[Path]:
    """Resolved scans a training config trains on: its ``data.paths`` or ``data.manifest`` training
    scans, as training splits them (a manifest's training rows were not read: a calibration scan
    trained on passed as held out). A ``data.store`` lists no scan paths: said, and nothing returned."""
    import contextlib

    from medvae.training.config import load_config
    from medvae.training.data import _split_paths

    cfg = load_config(config)
    if cfg.data.store and not cfg.data.manifest:
        print(f"note: {config} trains on a slice store, whose scans cannot be listed here: give its manifest "
              "(data.manifest) for the held-out check", file=sys.stderr)
        return set()
    # the shipped config's data paths are relative to the repository's root: from any other working
    # folder "no scan matches" blamed the config
    with contextlib.chdir(ROOT) if config == DEFAULT_CONFIG else contextlib.nullcontext():
        train, val, _, _ = _split_paths(cfg)
        return {p.resolve() for p in train} - {p.resolve() for p in val}


def check_unseen(entries: Iterable[SplitEntry], config: str | os.PathLike = DEFAULT_CONFIG, *,
                 pixels: bool = True) -> None:
    """``MedvaeError`` when a split scan is missing or in the training data of ``config``.

    A path is not a subject: the same pixels can sit under another name (a codec variant such as
    pydicom's ``MR_small_RLE``, a DICOM series and its NIfTI conversion, a resampled copy). With
    ``pixels`` (the default) every split scan is also compared with every training scan by
    :func:`training_overlaps`: identical pixels, near-identical downsampled slices or volumes, and
    shared DICOM PatientID / StudyInstanceUID / SeriesInstanceUID or manifest subject.
    """
    from medvae.errors import MedvaeError

    entries = list(entries)
    seen = training_paths(config)
    for e in entries:
        if not e.file.exists():
            raise MedvaeError("benchmark scan not found (see ../shared/data/*/manifest.json)", e.file)
        if e.file.resolve() in seen:
            raise MedvaeError(f"scan is in the training data of config {config!r}: it cannot validate", e.file)
    if pixels:
        leaks = training_overlaps([e.file for e in entries], seen)
        if leaks:
            raise MedvaeError(f"split scan shares a subject or pixels with the training data of config "
                              f"{config!r}: " + "; ".join(leaks), leaks[0].split(" ", 1)[0])


# --------------------------------------------------------------------------------------------
# subject / pixel identity of scans (for check_unseen)
# --------------------------------------------------------------------------------------------
#: cosine similarity of slice thumbnails (32x32 averages of the pixel ranks, z-scored) or volume
#: thumbnails (16^3 averages of the values, z-scored) at or above which two images are called the same
#: image (resampled, rescaled, clipped or re-encoded). Measured 2026-12-06 on ../shared/data: different
#: subjects reach at most 0.92 (sdcflows' EPI vs a heudiconv b0; the MNI152 vs pydeface templates), a
#: 2x-downsampled copy 0.993, the same subject's b0 EPI runs 0.995, a copy or codec variant 1.
NEAR_DUPLICATE = 0.97
_THUMB = 32
_VTHUMB = 16
#: PatientIDs that identify no one (placeholders written by converters)
_PLACEHOLDER_IDS = {"", "anonymous", "anon", "sample-0001", "medvae-sample-ct", "none", "0"}


@dataclass
class ScanPrint:
    """What identifies a scan's content: exact slice hashes, slice and volume thumbnails, DICOM ids."""

    path: Path
    exact: set[str]                  # sha1 of every 2-D slice (float64 values), as stored
    thumbs: np.ndarray               # (n_slices, 1024) z-scored 32x32 thumbnails, unit norm
    volumes: np.ndarray              # (n_volumes, 4096) z-scored 16^3 thumbnails, unit norm
    ids: dict[str, set[str]]         # PatientID / StudyInstanceUID / SeriesInstanceUID
    variants: set[str] = field(default_factory=set)   # sha1 of the 8 rotations/flips of every slice
    cubes: list[np.ndarray] = field(default_factory=list, repr=False)   # the 16^3 thumbnails, unnormalised


def _dihedral(a: np.ndarray) -> list[np.ndarray]:
    """The 8 rotations/flips of a 2-D array (NIfTI and DICOM store the same slice transposed/flipped)."""
    out = []
    for t in (a, a.T):
        out += [t, t[::-1], t[:, ::-1], t[::-1, ::-1]]
    return out


def _hash(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha1(np.ascontiguousarray(a, np.float64).tobytes() + str(a.shape).encode()).hexdigest()


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, np.float64).ravel()
    v = v - v.mean()
    n = np.linalg.norm(v)
    return (v / n if n > 0 else v).astype(np.float32)


def _read_pixels(path: Path) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, set[str]]]:
    """(2-D slices, 3-D volumes, DICOM ids) of a NIfTI file, a DICOM file or a folder of DICOM files."""
    import warnings

    ids: dict[str, set[str]] = {"PatientID": set(), "StudyInstanceUID": set(), "SeriesInstanceUID": set()}
    path = Path(path)
    name = path.name.lower()
    if path.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        import nibabel as nib

        a = np.asarray(nib.load(str(path)).dataobj, dtype=np.float64)
        a = a.reshape(a.shape[:2] + (1,)) if a.ndim == 2 else a.reshape(a.shape[:3] + (-1,))
        vols = [a[..., t] for t in range(a.shape[3])]
        return [v[:, :, k] for v in vols for k in range(v.shape[2])], vols, ids
    import pydicom

    files = sorted(q for q in path.rglob("*") if q.is_file()) if path.is_dir() else [path]
    frames: list[tuple[float, np.ndarray]] = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(str(f))
                arr = np.asarray(ds.pixel_array, dtype=np.float64)
                for k in ids:
                    v = str(ds.get(k, "") or "").strip()
                    if v and v.lower() not in _PLACEHOLDER_IDS:
                        ids[k].add(v)
                pos = ds.get("ImagePositionPatient")
                z = float(pos[2]) if pos is not None and len(pos) == 3 else float(ds.get("InstanceNumber", 0) or 0)
        except Exception:  # noqa: BLE001 - not a DICOM image (DICOMDIR, text...): no pixels to compare
            continue
        arr = arr[None] if arr.ndim == 2 else arr.reshape((-1,) + arr.shape[-2:]) if arr.ndim == 3 else arr[..., 0][None]
        frames += [(z + 1e-6 * i, fr) for i, fr in enumerate(arr)]
    slices = [fr for _, fr in frames]
    vols: list[np.ndarray] = []
    if len(frames) > 1 and len({fr.shape for _, fr in frames}) == 1:
        vols = [np.stack([fr for _, fr in sorted(frames, key=lambda t: t[0])], axis=-1)]
    return slices, vols, ids


def _slice_thumb(a: np.ndarray) -> np.ndarray | None:
    import torch

    if min(a.shape) < 16 or not np.isfinite(a).all() or a.std() == 0:
        return None
    # ranks, not values: invariant to any monotone remapping (rescale slope/intercept, clipping of
    # the padding outside a CT's field of view, windowing, another bit depth)
    r = np.argsort(np.argsort(a, axis=None, kind="stable"), kind="stable").reshape(a.shape)
    t = torch.from_numpy(np.ascontiguousarray(r, np.float32))[None, None]
    return _unit(torch.nn.functional.adaptive_avg_pool2d(t, _THUMB)[0, 0].numpy())


def _volume_thumb(v: np.ndarray) -> np.ndarray | None:
    import torch

    if min(v.shape) < 8 or not np.isfinite(v).all() or v.std() == 0:
        return None
    t = torch.from_numpy(np.ascontiguousarray(v, np.float32))[None, None]
    return torch.nn.functional.adaptive_avg_pool3d(t, _VTHUMB)[0, 0].numpy()


def _cube_variants(c: np.ndarray) -> np.ndarray:
    """The 48 axis permutations and flips of a cube, each as a unit vector."""
    import itertools

    out = []
    for perm in itertools.permutations(range(3)):
        p = np.transpose(c, perm)
        for flips in itertools.product((False, True), repeat=3):
            q = p
            for ax, fl in enumerate(flips):
                if fl:
                    q = np.flip(q, ax)
            out.append(_unit(q))
    return np.stack(out)


_PRINTS: dict[tuple[str, int, int], ScanPrint] = {}


def scan_print(path: str | os.PathLike) -> ScanPrint:
    """The :class:`ScanPrint` of a scan (cached per path, size and modification time)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _PRINTS:
        return _PRINTS[key]
    slices, vols, ids = _read_pixels(path)
    exact = {_hash(a) for a in slices}
    variants = {_hash(v) for a in slices for v in _dihedral(a)}
    thumbs = [t for t in (_slice_thumb(a) for a in slices) if t is not None]
    cubes = [c for c in (_volume_thumb(v) for v in vols) if c is not None]
    sp = ScanPrint(path, exact,
                   np.stack(thumbs) if thumbs else np.zeros((0, _THUMB * _THUMB), np.float32),
                   np.stack([_unit(c) for c in cubes]) if cubes else np.zeros((0, _VTHUMB ** 3), np.float32),
                   ids, variants, cubes)
    _PRINTS[key] = sp
    return sp


def _manifest_subjects() -> dict[Path, dict[str, str]]:
    """Per shared-data file: its manifest ``subject``, ``duplicate_of`` and ``derived_from`` (resolved ids)."""
    import json

    out: dict[Path, dict[str, str]] = {}
    for m in sorted(SHARED_DATA.glob("*/manifest.json")):
        try:
            entries = json.loads(m.read_text()).get("entries", [])
        except (OSError, ValueError):
            continue
        by_id = {e.get("id"): e for e in entries if e.get("id")}
        for e in entries:
            if not e.get("file"):
                continue
            info = {}
            if e.get("subject"):
                info["subject"] = str(e["subject"])
            for link in ("duplicate_of", "derived_from"):
                if e.get(link):
                    info[link] = str(e[link])
                    src = by_id.get(e[link], {})
                    if src.get("subject") and "subject" not in info:
                        info["subject"] = str(src["subject"])
            if e.get("id"):
                info["id"] = str(e["id"])
            out[(m.parent / e["file"]).resolve()] = info
    return out


def training_overlaps(split_files: Iterable[str | os.PathLike], train_files: Iterable[str | os.PathLike], *,
                      threshold: float = NEAR_DUPLICATE) -> list[str]:
    """Split scans that are the same subject or image as a training scan, one line each (empty: none).

    Compared: identical 2-D slices under any rotation/flip (codec variants, a DICOM series and its
    NIfTI conversion, slices saved as files); z-scored 32x32 slice thumbnails and 16^3 volume
    thumbnails with cosine similarity >= ``threshold`` (resampled, rescaled or lossily re-encoded
    copies); DICOM PatientID, StudyInstanceUID and SeriesInstanceUID; and the shared-data manifests'
    ``subject`` / ``duplicate_of`` / ``derived_from``. Reads each scan once (cached).
    """
    split_files = [Path(f).resolve() for f in split_files]
    train_files = sorted({Path(f).resolve() for f in train_files} - set(split_files))
    if not train_files:
        return []
    man = _manifest_subjects()
    tprints = [scan_print(f) for f in train_files]
    t_exact: dict[str, list[Path]] = {}
    for tp in tprints:
        for h in tp.exact:
            t_exact.setdefault(h, []).append(tp.path)
    t_thumbs = np.concatenate([tp.thumbs for tp in tprints]) if tprints else np.zeros((0, _THUMB ** 2))
    t_owner = [tp.path for tp in tprints for _ in range(len(tp.thumbs))]
    t_vols = np.concatenate([tp.volumes for tp in tprints])
    v_owner = [tp.path for tp in tprints for _ in range(len(tp.volumes))]
    leaks: list[str] = []
    for f in split_files:
        sp = scan_print(f)
        why: dict[Path, str] = {}
        # exact pixels (any rotation / flip of each slice)
        for h in sp.variants:
            for tf in t_exact.get(h, ()):
                why.setdefault(tf, "identical pixels in a slice")
        # near-identical slices
        if len(sp.thumbs) and len(t_thumbs):
            T = sp.thumbs.reshape(-1, _THUMB, _THUMB)
            for k in range(8):
                var = np.stack([_unit(_dihedral(t)[k]) for t in T])
                sim = var @ t_thumbs.T
                for jj in np.unique(np.nonzero(sim >= threshold)[1]):
                    why.setdefault(t_owner[jj], f"near-identical slice (thumbnail cosine {sim[:, jj].max():.4f})")
        # near-identical volumes (any axis order / flip: a re-sliced or resampled copy)
        if sp.cubes and len(t_vols):
            for c in sp.cubes:
                sim = _cube_variants(c) @ t_vols.T
                for jj in np.unique(np.nonzero(sim >= threshold)[1]):
                    why.setdefault(v_owner[jj], f"near-identical volume (thumbnail cosine {sim[:, jj].max():.4f})")
        # DICOM identifiers
        for tp in tprints:
            for k, vals in sp.ids.items():
                common = vals & tp.ids[k]
                if common:
                    why.setdefault(tp.path, f"same DICOM {k} {sorted(common)[0]}")
        # manifest subject
        ms = man.get(f, {}).get("subject")
        if ms:
            for tf in train_files:
                if man.get(tf, {}).get("subject") == ms:
                    why.setdefault(tf, f"same manifest subject {ms!r}")
        leaks += [f"{_rel(f)} ~ {_rel(t)}: {w}" for t, w in sorted(why.items())]
    return leaks


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(SHARED_DATA.resolve()))
    except ValueError:
        return str(p)


def split_disjoint(a: Iterable[SplitEntry], b: Iterable[SplitEntry]) -> list[str]:
    """Files and subjects that two splits share: empty when they are disjoint by subject.

    >>> split_disjoint(VALIDATION_SPLIT, CALIBRATION_SPLIT)
    []
    """
    a, b = list(a), list(b)
    shared = sorted({e.path for e in a} & {e.path for e in b})
    return shared + sorted({e.subject or e.path for e in a} & {e.subject or e.path for e in b})


def split_items(entries: Iterable[SplitEntry]) -> list[tuple[Path, str]]:
    """``(path, modality)`` pairs for :func:`load_bench_data`."""
    return [(e.file, e.modality) for e in entries]


def scans_in_dir(folder: str | os.PathLike) -> list[Path]:
    """Every scan directly inside ``folder``: NIfTI files, DICOM files, and sub-folders (a DICOM series each)."""
    from medvae.errors import MedvaeError
    from medvae.io.dicom import is_dicom_file
    from medvae.io.scan import is_nifti_path

    folder = Path(folder)
    if not folder.is_dir():
        raise MedvaeError("--data must be a folder of scans", folder)
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or is_nifti_path(p) or (p.is_file() and is_dicom_file(p)):
            out.append(p)
    if not out:
        raise MedvaeError("no NIfTI file, DICOM file or DICOM folder found", folder)
    return out


def load_bench_data(paths: Iterable[str | os.PathLike | tuple[str | os.PathLike, str]], *,
                    max_slices: int | None = DEFAULT_MAX_SLICES,
                    min_foreground: float = MIN_FOREGROUND, min_size: int = MIN_SIZE
                    ) -> tuple[list[BenchVolume], list[BenchSlice]]:
    """Read scans through :func:`medvae.io.load_scan`, window them and select their slices.

    An item is a path, or ``(path, modality)`` to set the modality (a NIfTI file has none).
    """
    from medvae.io import load_scan

    volumes: list[BenchVolume] = []
    slices: list[BenchSlice] = []
    names: set[str] = set()
    for item in paths:
        p, modality = (item if isinstance(item, tuple) else (item, None))
        p = Path(p)
        scan = load_scan(p, modality=modality)
        norm, win = to_window_units(scan.array, scan.modality)
        ks = select_slices(norm, scan.modality, max_slices=max_slices, min_foreground=min_foreground,
                           min_size=min_size)
        usable = len(select_slices(norm, scan.modality, max_slices=None, min_foreground=min_foreground,
                                   min_size=min_size))
        name = p.name
        while name in names:  # two files of the same name in different folders
            name = f"{p.parent.name}/{name}"
        names.add(name)
        volumes.append(BenchVolume(name=name, path=str(p), modality=scan.modality.upper(),
                                   shape=tuple(int(s) for s in scan.array.shape), window=win,
                                   usable=usable, slices=ks))
        for k in ks:
            slices.append(BenchSlice(name, scan.modality.upper(), k, np.ascontiguousarray(norm[:, :, k])))
    return volumes, slices


def selection_table(volumes: Sequence[BenchVolume]) -> str:
    """Markdown table of the slices used per volume, and the totals per modality."""
    rows = [[v.name, v.modality, "x".join(map(str, v.shape)), f"{v.window[0]:g}..{v.window[1]:g}",
             v.usable, len(v.slices)] for v in volumes]
    for mod in sorted({v.modality for v in volumes}):
        vs = [v for v in volumes if v.modality == mod]
        rows.append([f"**all {mod}**", mod, f"{len(vs)} volume(s)", "",
                     sum(v.usable for v in vs), sum(len(v.slices) for v in vs)])
    return markdown_table(["volume", "modality", "shape", "window", "usable slices", "slices used"], rows)


# --------------------------------------------------------------------------------------------
# corruptions
# --------------------------------------------------------------------------------------------
def _stable_int(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def case_seed(seed: int, corruption: str, volume: str, index: int) -> int:
    """Seed of one benchmark case (slice × corruption): a function of the run seed, the corruption's
    and the volume's names and the slice index, so adding a volume or a corruption changes no other
    case's noise. (:func:`medvae.corruption.slice_seed` keys a slice by its index only.)

    >>> case_seed(0, "gaussian_0.05", "a.nii.gz", 3) == case_seed(0, "gaussian_0.05", "a.nii.gz", 3)
    True
    >>> case_seed(0, "gaussian_0.05", "a.nii.gz", 3) != case_seed(0, "gaussian_0.05", "a.nii.gz", 4)
    True
    """
    ss = np.random.SeedSequence([int(seed), _stable_int(corruption), _stable_int(volume), int(index)])
    return int(ss.generate_state(1)[0] & 0x7FFFFFFF)


#: low-dose CT: the recipe's (medvae/recipes/lowdose_ct.yaml) settings except the dose
LOWDOSE_SETTINGS = {"photons": 1.0e5, "hu_window": list(DEFAULT_CT_WINDOW), "fov_mm": 250.0,
                    "n_angles": 64, "projection_size": 64}


@dataclass(frozen=True)
class CorruptionSpec:
    """One benchmark corruption: a transform factory of the per-slice seed."""

    name: str
    label: str
    kind: str                                  # "noise" (whole image restored) or "mask"
    modalities: tuple[str, ...] | None         # None: every slice
    params: Mapping[str, Any]
    factory: Callable[[int], Any] = field(repr=False, compare=False)

    def applies_to(self, modality: str) -> bool:
        return self.modalities is None or modality.upper() in self.modalities

    def transform(self, seed: int):
        return self.factory(seed)


def _gaussian(sigma: float):
    def make(seed: int):
        from medvae.corruption import GaussianNoise

        return GaussianNoise(sigma, seed=seed)
    return make


def _rician(sigma: float):
    def make(seed: int):
        from medvae.corruption import RicianNoise

        return RicianNoise(sigma, seed=seed)
    return make


def _lowdose(dose: float):
    def make(seed: int):
        from medvae.corruption import LowDoseCT

        return LowDoseCT(dose, seed=seed, **LOWDOSE_SETTINGS)
    return make


def _boxes(coverage: tuple[float, float]):
    def make(seed: int):
        from medvae.corruption import RandBoxMask

        return RandBoxMask(coverage=coverage, size=(0.05, 0.3), fill=0.0).set_random_state(seed)
    return make


def _strokes(coverage: tuple[float, float]):
    def make(seed: int):
        from medvae.corruption import RandStrokeMask

        return RandStrokeMask(coverage=coverage, width=(0.01, 0.05), length=(0.1, 0.3), vertices=(3, 7),
                              fill=0.0).set_random_state(seed)
    return make


CORRUPTIONS: tuple[CorruptionSpec, ...] = (
    CorruptionSpec("gaussian_0.05", "Gaussian noise, sigma 0.05 of the window", "noise", None,
                   {"transform": "GaussianNoise", "sigma": 0.05}, _gaussian(0.05)),
    CorruptionSpec("gaussian_0.10", "Gaussian noise, sigma 0.10 of the window", "noise", None,
                   {"transform": "GaussianNoise", "sigma": 0.10}, _gaussian(0.10)),
    CorruptionSpec("rician_0.05", "Rician noise, sigma 0.05 of the window (MR)", "noise", ("MR",),
                   {"transform": "RicianNoise", "sigma": 0.05}, _rician(0.05)),
    CorruptionSpec("lowdose_0.25", "Low-dose CT, quarter dose (CT)", "noise", ("CT",),
                   {"transform": "LowDoseCT", "dose": 0.25, **LOWDOSE_SETTINGS}, _lowdose(0.25)),
    CorruptionSpec("boxes_15", "Random boxes, ~15 % of the slice", "mask", None,
                   {"transform": "RandBoxMask", "coverage": [0.13, 0.17], "size": [0.05, 0.3], "fill": 0.0},
                   _boxes((0.13, 0.17))),
    CorruptionSpec("strokes_10", "Strokes, ~10 % of the slice", "mask", None,
                   {"transform": "RandStrokeMask", "coverage": [0.08, 0.12], "width": [0.01, 0.05],
                    "length": [0.1, 0.3], "vertices": [3, 7], "fill": 0.0}, _strokes((0.08, 0.12))),
)
CORRUPTION_BY_NAME = {c.name: c for c in CORRUPTIONS}
#: the corruptions restored as a whole (``kind == "noise"``), in the benchmark's order
NOISE_CORRUPTIONS: tuple[str, ...] = tuple(c.name for c in CORRUPTIONS if c.kind == "noise")


def corrupt_slice(spec: CorruptionSpec, clean: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Corrupt one 2-D window-unit slice; returns ``(image float32 (X, Y), mask bool (X, Y))``.

    Noise corruptions return an all-True mask (every pixel is restored). The input is not modified.
    """
    x = np.asarray(clean, dtype=np.float32)[None]
    img, mask = spec.transform(seed)(x)
    return np.asarray(img, dtype=np.float32)[0], np.asarray(mask, dtype=bool)[0]


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------
def score(reference: np.ndarray, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR and SSIM (whole slice) and, when ``mask`` marks a proper subset, PSNR over the mask.

    Both images are in window units, clipped to :data:`METRIC_WINDOW` ([0, 1]), data range 1.
    """
    from medvae.evaluate import psnr, ssim

    out = {"psnr": psnr(reference, image, window=METRIC_WINDOW),
           "ssim": ssim(reference, image, window=METRIC_WINDOW)}
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.any() and not m.all():
            out["psnr_mask"] = psnr(reference, image, window=METRIC_WINDOW, mask=m)
    return out


#: CT reading windows ``(center, width)`` in HU, scored besides the protocol window: noise texture
#: and mottle show in them (issue 10; the ldct-benchmark's abdomen/neuro windows)
CT_READING_WINDOWS: dict[str, tuple[float, float]] = {"soft": (40.0, 400.0), "brain": (40.0, 80.0)}


def ct_window_units(center: float, width: float) -> tuple[float, float]:
    """A CT window in HU expressed in protocol window units (CT −1000..1000 HU → [0, 1]).

    >>> ct_window_units(40, 80)
    (0.5, 0.54)
    """
    from medvae.evaluate import window_bounds

    lo, hi = window_bounds(center, width)
    plo, phi = (float(v) for v in PROTOCOL.ct_window)
    return (round((lo - plo) / (phi - plo), 12), round((hi - plo) / (phi - plo), 12))


def score_ct_windows(reference: np.ndarray, image: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """PSNR and SSIM in each of :data:`CT_READING_WINDOWS` (``psnr_soft``, ``ssim_brain``...), and
    PSNR over the mask (``psnr_mask_soft``...) when ``mask`` marks a proper subset. Window units in;
    each window is clipped and scaled to [0, 1], data range 1."""
    from medvae.evaluate import psnr, ssim

    out: dict[str, float] = {}
    m = None if mask is None else np.asarray(mask, dtype=bool)
    for name, (c, w) in CT_READING_WINDOWS.items():
        win = ct_window_units(c, w)
        out[f"psnr_{name}"] = psnr(reference, image, window=win)
        out[f"ssim_{name}"] = ssim(reference, image, window=win)
        if m is not None and m.any() and not m.all():
            out[f"psnr_mask_{name}"] = psnr(reference, image, window=win, mask=m)
    return out


def uncertainty_scores(clean: np.ndarray, restored: np.ndarray, std: np.ndarray, calibrated: np.ndarray, *,
                       mask: np.ndarray | None = None) -> dict[str, float]:
    """How well an uncertainty map predicts the error (window units).

    ``std`` is the raw sampled std, ``calibrated`` the map after the checkpoint's calibration. Over the
    mask's pixels for holes (a proper subset), every pixel otherwise: ``unc_spearman`` (Spearman of
    the calibrated map and |error|), ``unc_cover_raw`` and ``unc_cover`` (share of pixels with
    |error| <= 2 std, raw and calibrated) and ``unc_err_over_std`` (mean |error| / mean raw std).
    """
    from medvae.models.calibration import coverage_within, spearman

    err = np.asarray(restored, np.float64) - np.asarray(clean, np.float64)
    s = np.asarray(std, np.float64)
    c = np.asarray(calibrated, np.float64)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.any() and not m.all():
            err, s, c = err[m], s[m], c[m]
    mean_std = float(np.mean(s))
    return {"unc_spearman": spearman(c, err), "unc_cover_raw": coverage_within(err, s),
            "unc_cover": coverage_within(err, c),
            "unc_err_over_std": float(np.mean(np.abs(err))) / mean_std if mean_std > 0 else float("inf")}


# --------------------------------------------------------------------------------------------
# medvae on window-unit slices
# --------------------------------------------------------------------------------------------
class WindowUnits(IntensityPolicy):
    """An intensity policy for images already in window units: every window is (0, 1).

    The benchmark hands medvae the very slices the baselines get (protocol window units); with this
    policy :func:`medvae.restore.restore_volume` leaves them as they are instead of re-windowing.
    For CT it is the model's own window; for MR it uses the clean volume's percentiles (the
    protocol) rather than those of the corrupted slices handed over.
    """

    def window_for(self, volume: np.ndarray, modality: str | None, *, noisy: bool = False,  # noqa: ARG002
                   slices: np.ndarray | None = None) -> tuple[float, float]:  # noqa: ARG002
        return METRIC_WINDOW


def in_window_units(loaded: Any):
    """A copy of a :class:`~medvae.models.checkpoint.LoadedModel` that restores window-unit input."""
    return dataclasses.replace(loaded, intensity=WindowUnits())


def _require_window_units(loaded: Any) -> None:
    """The slices handed over are already in window units: a model that re-windows them (a CT window
    of -1000..1000 HU squeezes 0..1 into 0.0005 of its range) restores garbage without an error."""
    if not isinstance(getattr(loaded, "intensity", None), WindowUnits):
        raise ValueError("pass a model from in_window_units(): the slices are already in window units")


def scaling_mismatch(loaded: Any) -> str | None:
    """A warning when the model was trained with another scaling than the benchmark's protocol."""
    pol = loaded.intensity
    if tuple(pol.ct_window) != tuple(PROTOCOL.ct_window) or tuple(pol.mr_percentiles) != tuple(PROTOCOL.mr_percentiles):
        return (f"the model's intensity policy (CT {pol.ct_window}, MR percentiles {pol.mr_percentiles}) "
                f"differs from the benchmark's protocol; it is fed protocol window units anyway")
    return None


def restore_slices(loaded: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None,
                   *, modality: str = "MR", batch_size: int = 8, blend: bool = True,
                   coarse_holes: bool = True) -> list[np.ndarray]:
    """Restore window-unit slices of one shape with ``restore_volume`` (batched); window units out.

    ``loaded`` must come from :func:`in_window_units`. ``masks=None`` restores every pixel. ``blend``,
    ``coarse_holes``: as ``restore_volume`` (False: the network alone; every hole at full scale).
    """
    from medvae.restore import restore_volume

    _require_window_units(loaded)
    vol = np.stack([np.asarray(a, np.float32) for a in images], axis=2)
    m = None if masks is None else np.stack([np.asarray(a, bool) for a in masks], axis=2)
    mean, _ = restore_volume(vol, model=loaded, modality=modality, mask=m, batch_size=batch_size, blend=blend,
                             coarse_holes=coarse_holes)
    return [np.ascontiguousarray(mean[:, :, i]) for i in range(mean.shape[2])]


def uncalibrated(loaded: Any):
    """A copy of a LoadedModel without ``meta["calibration"]``: ``restore_volume`` then returns the
    raw sampled std (what calibration is fitted on and compared against)."""
    from medvae.models.calibration import CALIBRATION_KEY

    return dataclasses.replace(loaded, meta={k: v for k, v in loaded.meta.items() if k != CALIBRATION_KEY})


def restore_slices_std(loaded: Any, images: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None,
                       *, modality: str = "MR", samples: int = 8, batch_size: int = 8, seed: int = 0,
                       blend: bool = True) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Like :func:`restore_slices`, with ``samples`` posterior samples: ``(means, stds)``, window units.

    ``loaded`` must come from :func:`in_window_units`. The std is what ``restore_volume`` returns for
    ``loaded`` (calibrated when its meta says so; pass :func:`uncalibrated` for the raw spread), as float32.
    """
    from medvae.restore import restore_volume

    _require_window_units(loaded)
    vol = np.stack([np.asarray(a, np.float32) for a in images], axis=2)
    m = None if masks is None else np.stack([np.asarray(a, bool) for a in masks], axis=2)
    mean, std = restore_volume(vol, model=loaded, modality=modality, mask=m, samples=samples,
                               batch_size=batch_size, seed=seed, blend=blend)
    return ([np.ascontiguousarray(mean[:, :, i]) for i in range(mean.shape[2])],
            [np.ascontiguousarray(std[:, :, i], dtype=np.float32) for i in range(std.shape[2])])


# --------------------------------------------------------------------------------------------
# summaries and targets
# --------------------------------------------------------------------------------------------
METRIC_KEYS = ("psnr", "ssim", "psnr_mask", "seconds",
               # CT reading windows (CT slices only)
               "psnr_soft", "ssim_soft", "psnr_mask_soft", "psnr_brain", "ssim_brain", "psnr_mask_brain",
               # uncertainty map (medvae only)
               "unc_spearman", "unc_cover_raw", "unc_cover", "unc_err_over_std")


def _mean(values: Iterable[float]) -> float:
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return float("nan")
    with np.errstate(invalid="ignore"):
        return float(np.mean(v))


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Means over slices: ``summary[corruption][method] = {psnr, ssim, psnr_mask, seconds, n, by_modality}``.

    PSNR is averaged in dB over slices (the usual convention); ``seconds`` is seconds per slice.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["corruption"], r["method"]), []).append(r)
    for (corr, method), rs in groups.items():
        entry: dict[str, Any] = {k: _mean(r.get(k, float("nan")) for r in rs) for k in METRIC_KEYS}
        entry["n"] = len(rs)
        by_mod = {}
        for mod in sorted({r["modality"] for r in rs}):
            sub = [r for r in rs if r["modality"] == mod]
            by_mod[mod] = {**{k: _mean(r.get(k, float("nan")) for r in sub) for k in METRIC_KEYS}, "n": len(sub)}
        entry["by_modality"] = by_mod
        by_vol = {}
        for vol in dict.fromkeys(r["volume"] for r in rs if "volume" in r):
            sub = [r for r in rs if r.get("volume") == vol]
            by_vol[vol] = {**{k: _mean(r.get(k, float("nan")) for r in sub) for k in METRIC_KEYS}, "n": len(sub),
                           "modality": sub[0].get("modality")}
        entry["by_volume"] = by_vol
        out.setdefault(corr, {})[method] = entry
    return out


#: per volume, medvae must never fall below this baseline (issue 10): NL-means for noise, biharmonic for holes
FLOOR_BASELINE = {"noise": "nl_means", "mask": "biharmonic"}


def volume_table(methods: Mapping[str, Mapping[str, Any]], *, metric: str, floor: str | None = None,
                 model: str = "medvae") -> tuple[str, list[dict[str, Any]]]:
    """Per-volume markdown table of one corruption's ``metric`` for every method, medvae minus the
    best baseline, and medvae minus ``floor`` (the per-volume floor); also returns the rows."""
    names = list(methods)
    baselines = [n for n in names if n not in NOT_BASELINES]
    vols = list(methods.get(model, methods[names[0]])["by_volume"])
    body, out = [], []
    for vol in vols:
        vals = {n: methods[n]["by_volume"].get(vol, {}).get(metric, float("nan")) for n in names}
        fin = {n: v for n, v in vals.items() if n in baselines and _fin(v)}
        best = max(fin, key=fin.get) if fin else None
        mine = vals.get(model, float("nan"))
        d_best = mine - fin[best] if best and _fin(mine) else float("nan")
        d_floor = mine - vals[floor] if floor and _fin(mine) and _fin(vals.get(floor)) else float("nan")
        entry = methods.get(model, methods[names[0]])["by_volume"][vol]
        out.append({"volume": vol, "modality": entry.get("modality"), "n": entry["n"], "values": vals,
                    "best": best, "delta_best": d_best, "floor": floor, "delta_floor": d_floor})
        verdict = "—" if not _fin(d_floor) else ("ok" if d_floor >= 0 else "**below**")
        body.append([vol, entry.get("modality"), entry["n"], *(_fmt(vals[n]) for n in names),
                     f"{best or '—'} {_fmt(d_best, '.2f', True)}", f"{_fmt(d_floor, '.2f', True)} {verdict}"])
    head = ["volume", "mod.", "slices", *names, "medvae − best", f"medvae − {floor}" if floor else "floor"]
    return markdown_table(head, body), out


def window_table(methods: Mapping[str, Mapping[str, Any]], *, mask_metric: bool, model: str = "medvae") -> str:
    """CT reading windows: per CT volume and on average, medvae and the best baseline's PSNR (mask
    PSNR for holes) and SSIM in the soft-tissue and brain windows."""
    key = "psnr_mask_{}" if mask_metric else "psnr_{}"
    mine = methods.get(model)
    if not mine:
        return ""
    vols = [v for v, e in mine["by_volume"].items() if e.get("modality") == "CT"]
    if not vols:
        return ""
    body = []
    for vol in [*vols, None]:
        cells = [vol or "**mean over CT slices**"]
        for win in CT_READING_WINDOWS:
            def get(n, k):
                e = methods[n]["by_volume"].get(vol, {}) if vol else methods[n]["by_modality"].get("CT", {})
                return e.get(k.format(win), float("nan"))
            fin = {n: get(n, key) for n in methods if n not in NOT_BASELINES and _fin(get(n, key))}
            best = max(fin, key=fin.get) if fin else None
            m = get(model, key)
            cells += [_fmt(get("input", key)), _fmt(m), f"{best} {_fmt(fin[best])}" if best else "—",
                      _fmt(m - fin[best], ".2f", True) if best and _fin(m) else "—",
                      f"{_fmt(get(model, 'ssim_' + win), '.4f')} / {_fmt(get(best, 'ssim_' + win), '.4f') if best else '—'}"]
        body.append(cells)
    head = ["volume"]
    for win, (c, w) in CT_READING_WINDOWS.items():
        head += [f"{win} (C {c:g}, W {w:g}): input", "medvae", "best baseline", "Δ", "SSIM medvae / best"]
    return markdown_table(head, body)


def uncertainty_table(methods: Mapping[str, Mapping[str, Any]], *, model: str = "medvae") -> str:
    """Per volume and on average: Spearman(std, |error|), the share within ± 2 std before and after
    calibration, and mean |error| / mean raw std."""
    mine = methods.get(model)
    if not mine or not _fin(mine.get("unc_cover_raw")):
        return ""
    rows = [(v, e) for v, e in mine["by_volume"].items()] + [("**mean over slices**", mine)]
    body = [[v, e["n"], _fmt(e["unc_spearman"], ".3f"), f"{_fmt(100 * e['unc_cover_raw'], '.1f')} %",
             f"{_fmt(100 * e['unc_cover'], '.1f')} %", _fmt(e["unc_err_over_std"], ".1f")] for v, e in rows]
    return markdown_table(["volume", "slices", "Spearman(std, abs. error)", "within ± 2 std, raw",
                           "within ± 2 std, calibrated", "mean abs. error / mean raw std"], body)


@dataclass(frozen=True)
class Target:
    """medvae[metric] >= reference[metric] + margin (and SSIM >= the reference's when ``ssim``)."""

    reference: str | None      # baseline method; None: report only
    metric: str = "psnr"
    margin: float = 0.0        # dB
    ssim: bool = False

    def describe(self) -> str:
        if self.reference is None:
            return "report only"
        name = {"psnr": "PSNR", "psnr_mask": "mask PSNR"}.get(self.metric, self.metric)
        text = f"{name} >= {self.reference} + {self.margin:g} dB"
        return text + f", SSIM >= {self.reference}" if self.ssim else text


TARGETS: dict[str, Target] = {
    "gaussian_0.05": Target("bm3d", "psnr", 0.5, ssim=True),
    "gaussian_0.10": Target("bm3d", "psnr", 0.5, ssim=True),
    "rician_0.05": Target("bm3d", "psnr", 2.0),
    "lowdose_0.25": Target(None, "psnr"),
    "boxes_15": Target("biharmonic", "psnr_mask", 2.0),
    "strokes_10": Target("biharmonic", "psnr_mask", 2.0),
}

#: rows that are not baselines: the input, medvae as it restores, and (a model with meta["blend"])
#: medvae's network alone, without the classical blend (medvae.blend)
NOT_BASELINES = ("input", "medvae", "medvae_net")


def _fin(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(float(x))


def gap_rows(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], targets: Mapping[str, Target] = TARGETS,
             *, model: str = "medvae") -> list[dict[str, Any]]:
    """"medvae minus the best baseline" and the target verdict, one row per corruption in ``summary``.

    Each row: ``corruption``, ``metric``, ``medvae``, ``best`` (baseline name), ``best_value``,
    ``delta_best`` (medvae − best, same metric), ``delta_ssim_best``, ``target`` (words),
    ``delta_target`` (medvae − reference − margin: >= 0 passes), ``delta_ssim_target``, and
    ``status``: ``PASS``, ``MISS``, ``report`` (no target) or ``n/a`` (reference or medvae not run).
    """
    out = []
    for corr, methods in summary.items():
        tgt = targets.get(corr, Target(None))
        metric = tgt.metric
        mine = methods.get(model, {})
        baselines = {k: v for k, v in methods.items() if k not in NOT_BASELINES and _fin(v.get(metric))}
        best = max(baselines, key=lambda k: baselines[k][metric]) if baselines else None
        row: dict[str, Any] = {"corruption": corr, "metric": metric, "medvae": mine.get(metric, float("nan")),
                               "best": best, "best_value": baselines[best][metric] if best else float("nan"),
                               "delta_best": float("nan"), "delta_ssim_best": float("nan"),
                               "target": tgt.describe(), "delta_target": float("nan"),
                               "delta_ssim_target": float("nan"), "status": "n/a"}
        if best and _fin(mine.get(metric)):
            row["delta_best"] = mine[metric] - baselines[best][metric]
            if _fin(mine.get("ssim")) and _fin(baselines[best].get("ssim")):
                row["delta_ssim_best"] = mine["ssim"] - baselines[best]["ssim"]
        if tgt.reference is None:
            row["status"] = "report"
        else:
            ref = methods.get(tgt.reference, {})
            if _fin(mine.get(metric)) and _fin(ref.get(metric)):
                d = mine[metric] - ref[metric] - tgt.margin
                row["delta_target"] = d
                ok = d >= 0
                if tgt.ssim:
                    if _fin(mine.get("ssim")) and _fin(ref.get("ssim")):
                        row["delta_ssim_target"] = mine["ssim"] - ref["ssim"]
                        ok = ok and row["delta_ssim_target"] >= 0
                    else:
                        ok = False
                row["status"] = "PASS" if ok else "MISS"
            else:
                why = tgt.reference if not _fin(ref.get(metric)) else model
                row["status"] = f"n/a ({why} not run)"
        out.append(row)
    return out


def _fmt(x: Any, spec: str = ".2f", signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if isinstance(x, (int, float)):
        return format(float(x), ("+" if signed else "") + spec)
    return str(x)


def gap_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of :func:`gap_rows`."""
    body = []
    for r in rows:
        status = r["status"]
        if status in ("PASS", "MISS"):
            gap = f"{_fmt(r['delta_target'], '.2f', True)} dB"
            if _fin(r["delta_ssim_target"]):
                gap += f", SSIM {_fmt(r['delta_ssim_target'], '.4f', True)}"
            status = f"**{status}** ({gap})"
        body.append([r["corruption"], r["metric"], _fmt(r["medvae"]), r["best"] or "—", _fmt(r["best_value"]),
                     _fmt(r["delta_best"], ".2f", True), _fmt(r["delta_ssim_best"], ".4f", True),
                     r["target"], status])
    return markdown_table(["corruption", "metric", "medvae", "best baseline", "its value",
                           "medvae − best (dB)", "SSIM − best", "target", "result (margin over target)"], body)


def method_table(methods: Mapping[str, Mapping[str, Any]], *, mask_metric: bool) -> str:
    """Markdown table for one corruption: rows = methods, columns = PSNR, SSIM, [mask PSNR], s/slice, n."""
    head = ["method", "PSNR (dB)", "SSIM"] + (["PSNR mask (dB)"] if mask_metric else []) + ["s/slice", "slices"]
    body = []
    for name, m in methods.items():
        row = [name, _fmt(m.get("psnr")), _fmt(m.get("ssim"), ".4f")]
        if mask_metric:
            row.append(_fmt(m.get("psnr_mask")))
        row += ["—" if name == "input" else _fmt(m.get("seconds"), ".3f"), m.get("n", "")]
        body.append(row)
    return markdown_table(head, body)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# run information, JSON, timing
# --------------------------------------------------------------------------------------------
def git_commit(root: Path = ROOT) -> str:
    """``HEAD``'s hash, with ``+dirty`` when tracked files differ from it (read-only git calls)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def run_info(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Date, commit, command line, machine and library versions."""
    import torch

    return {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "commit": git_commit(),
        "command": " ".join([Path(sys.executable).name, *(sys.argv if argv is None else argv)]),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(),
    }


def model_info(loaded: Any) -> dict[str, Any]:
    """What a LoadedModel says about itself: source, size, config, meta (epoch, validation...)."""
    n = sum(p.numel() for p in loaded.model.parameters())
    return {"source": str(loaded.source), "n_parameters": int(n), "config": loaded.config.to_dict(),
            "intensity": loaded.intensity.to_dict(), "meta": json_safe(dict(loaded.meta))}


def header_lines(info: Mapping[str, Any], model: Mapping[str, Any] | None = None) -> list[str]:
    lines = [f"date:     {info['date']}", f"commit:   {info['commit']}", f"command:  {info['command']}",
             f"machine:  {info['cpu_count']} CPUs, torch {info['torch']} with {info['torch_threads']} threads"
             + (f", CUDA {info['cuda']}" if info.get("cuda") else "") + f", Python {info['python']}"]
    if model is not None:
        meta = ", ".join(f"{k}={_fmt(v, '.4g') if isinstance(v, float) else v}" for k, v in model["meta"].items())
        lines.append(f"model:    {model['source']} ({model['n_parameters'] / 1e6:.2f} M parameters, "
                     f"channels {model['config'].get('channels')}, latent {model['config'].get('latent_channels')})")
        lines.append(f"meta:     {meta or '(none)'}")
    return lines


def open_bench(script: str, argv: Sequence[str] | None, model: str, title: str) -> tuple[dict[str, Any], Any, Any]:
    """The start of a benchmark script: its run info, the model, and the header printed under ``title``.

    Returns ``(info, loaded, unit_model)``: ``unit_model`` is ``loaded`` for window-unit slices
    (:func:`in_window_units`).
    """
    from medvae.errors import MedvaeError
    from medvae.models.checkpoint import load_model, require_slice_restorer

    info = run_info(None if argv is None else [f"scripts/{script}", *map(str, argv)])
    try:
        loaded = require_slice_restorer(load_model(model))
    except MedvaeError as exc:  # one line, as every command's: a missing model file printed a traceback
        raise SystemExit(f"{script}: error: {exc}") from None
    print(f"# {title}\n")
    print("\n".join(header_lines(info, model_info(loaded))))
    return info, loaded, in_window_units(loaded)


def check_json_output(path: str | os.PathLike, option: str = "--out") -> None:
    """Exit with one line unless ``path`` is new or a JSON file in a folder this process may write (call
    it before the work, as :func:`write_json` does again after it): ``--out`` naming the ``--model``
    checkpoint replaced it, and an unwritable one lost a half-hour run's numbers after the work."""
    path = Path(path)
    if path.is_dir():
        raise SystemExit(f"error: {path}: {option} is a folder; give a JSON file path")
    if path.is_file():
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
        if head and head[:1] not in (b"{", b"["):
            raise SystemExit(f"error: {path}: refusing to replace a file that is not JSON (a model?); give {option} "
                             "another path")
    import tempfile

    folder = next((d for d in Path(os.path.abspath(path)).parents if d.exists()), None)
    try:  # a probe, not os.access: root may "access" /proc and still write nothing there
        if folder is None or not folder.is_dir():
            raise NotADirectoryError(f"{folder} is not a folder")
        with tempfile.TemporaryFile(dir=folder, prefix=".medvae-probe-"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: {path}: {option} cannot be written in {folder} ({exc.strerror or exc})") from None


def at_least(minimum: int):
    """An argparse type: a whole number of at least ``minimum`` (0 slices ended in a traceback)."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def write_json(obj: Any, path: str | os.PathLike, option: str = "--out") -> Path:
    """Strict JSON (:func:`medvae.evaluate.json_safe`), written atomically; replaces an older JSON file,
    never another kind (``--out`` naming the ``--model`` checkpoint replaced the model with JSON)."""
    import json

    path = Path(path)
    check_json_output(path, option)
    with atomic_output(path, kind="file", overwrite=True) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")
    return Path(path)


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes, or None where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def max_rss_bytes() -> int:
    """Peak resident set size of this process so far: ``VmHWM`` where /proc has it.

    Not ``ru_maxrss`` there: Linux carries it across ``execve``, so a child started from a parent that
    held 1.2 GB reports at least 1.2 GB, whatever it did itself; ``VmHWM`` belongs to the new address
    space. Elsewhere ``ru_maxrss`` (KiB on Linux, bytes on macOS).
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def current_rss_bytes() -> int:
    """Current resident set size (``VmRSS``), or 0 where /proc is missing."""
    return _proc_status_bytes("VmRSS") or 0


# --------------------------------------------------------------------------------------------
# inputs for the speed benchmark
# --------------------------------------------------------------------------------------------
def resize_slice(a: np.ndarray, size: int) -> np.ndarray:
    """A 2-D slice resampled to ``size`` x ``size`` (bilinear, anti-aliased when shrinking)."""
    from skimage.transform import resize

    a = np.asarray(a, np.float32)
    shrink = size < max(a.shape)
    return resize(a, (size, size), order=1, mode="edge", anti_aliasing=shrink,
                  preserve_range=True).astype(np.float32)


def stretch_volume(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Tile a volume in-plane and repeat its slices (in order) to reach ``shape`` (X, Y, Z).

    In-plane the volume is tiled (``np.tile``) and cropped; along Z slice ``k`` of the output is
    slice ``k * Z_in // Z_out`` of the input, so each input slice appears about ``Z_out / Z_in`` times.

    >>> stretch_volume(np.zeros((4, 4, 3)), (8, 8, 7)).shape
    (8, 8, 7)
    """
    v = np.asarray(volume)
    X, Y, Z = (int(s) for s in shape)
    reps = (math.ceil(X / v.shape[0]), math.ceil(Y / v.shape[1]), 1)
    zi = (np.arange(Z) * v.shape[2]) // Z
    return np.ascontiguousarray(np.tile(v[:, :, zi], reps)[:X, :Y, :], dtype=np.float32)
