"""Derived DICOM series: the restored values written back as a new series of the source's study.

Every source dataset is deep-copied and only its pixels replaced: same study and frame of reference,
one new SeriesInstanceUID for the whole series, a new SOPInstanceUID per file, geometry kept,
ImageType DERIVED. The source's stored type and rescale are kept (``rescale="keep"``), or one
slope/intercept is refitted to the value range of the whole series (``rescale="fit"``, and sources
whose stored values no integer type holds or that use a Modality LUT).

:class:`DerivedSeriesWriter` writes a derived series file by file, so a series can be restored a
batch of files at a time (:func:`medvae.restore.restore_scan`); :func:`write_dicom_series` writes
a whole volume with it. Files are staged until :func:`arm_series` makes the complete series valid;
:func:`check_derived_series` refuses to replace a folder holding anything but the series medvae wrote.
Reading (:mod:`medvae.io.dicom`) lies below: importing this module imports pydicom, not MONAI.
"""
from __future__ import annotations

import copy
import datetime
import logging
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pydicom

from medvae.errors import MedvaeError
from medvae.io.dicom import (
    ENHANCED_SOP_CLASSES,
    PIXEL_TAGS,
    NotRestorableError,
    _n_frames,
    _quiet,
    _read,
    _sop_class,
    object_problem,
    rescale_of,
)
from medvae.io.scan import Scan, printable

log = logging.getLogger(__name__)

_INT_TYPES = {(8, 0): np.uint8, (8, 1): np.int8, (16, 0): np.uint16, (16, 1): np.int16}
_DROP_ALWAYS = ("LargestImagePixelValue", "SmallestImagePixelValue",
                "LargestPixelValueInSeries", "SmallestPixelValueInSeries",
                # the source instance's thumbnail (it showed the clean image in a corrupted copy) and creator
                "IconImageSequence", "InstanceCreatorUID")
#: the VOI (display window) tags: a map of other values than the source's gets a window of its own
_VOI_TAGS = ("WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction", "VOILUTSequence")
#: SeriesNumber offset of each kind of derived series: a viewer lists series by number, so no two of
#: one source's derived series share one (a series derived from a medvae series: :func:`derived_series_number`)
_SERIES_OFFSET = {"restored": 1000, "uncertainty": 2000, "corrupted": 3000, "mask": 4000}


#: DerivationCodeSequence of each kind (DICOM CID 7203 "Image Derivation", extensible): a denoised or
#: inpainted image is closest to "Smoothing"; a posterior std map is a "Standard Deviation"; a damage
#: mask is a "Segmentation"; a corrupted copy has synthetic noise or fill added, "Pixel by pixel addition"
_DERIVATION_CODE = {"restored": "Smoothing", "uncertainty": "StandardDeviation", "corrupted": "PixelByPixelAddition",
                    "mask": "Segmentation"}


def derived_series_number(number: int, role: str, *, from_medvae: bool) -> int:
    """The SeriesNumber of a derived series of kind ``role`` from a source numbered ``number``.

    From a scanner's series: ``number`` + 1000 (restored), 2000 (uncertainty), 3000 (corrupted) or
    4000 (mask). From a medvae series (``from_medvae``), the kind's digit goes one place above the
    source's number, so each step of a chain adds a leading digit and no two chains of one source
    meet (a corrupted copy's restoration was N + 3000 + 1000, its mask's number; with ten times the
    offset, a restoration of that restoration met its uncertainty map). Past the IS range (2**31 - 1)
    the plain offset is added.

    >>> derived_series_number(1, "corrupted", from_medvae=False), derived_series_number(3001, "restored", from_medvae=True)
    (3001, 13001)
    >>> derived_series_number(13001, "restored", from_medvae=True), derived_series_number(13001, "uncertainty", from_medvae=True)
    (113001, 213001)
    """
    offset = _SERIES_OFFSET[role]
    if from_medvae and number >= 0:
        stepped = number + offset // 1000 * 10 ** len(str(number))
        if stepped <= 2**31 - 1:
            return stepped
    return number + offset


def series_role(description: str) -> str:
    """What a derived series holds, from medvae's description of it: ``restored``, ``uncertainty``,
    ``corrupted`` or ``mask`` (a map in other units than the source's gets a display window of its own).

    >>> series_role("medvae uncertainty (std)"), series_role("medvae corrupt mask boxes (1 = corrupted)")
    ('uncertainty', 'mask')
    """
    text = description.lower()
    if "uncertainty" in text:
        return "uncertainty"
    if text.startswith("medvae corrupt mask"):
        return "mask"
    if text.startswith("medvae corrupt"):
        return "corrupted"
    return "restored"

#: meaningless once stored values are re-fitted: a real-world value mapping of the old stored
#: values would give wrong physical values (dropped at the top level and in functional groups)
_DROP_ON_FIT = ("PixelPaddingValue", "PixelPaddingRangeLimit", "ModalityLUTSequence",
                "RealWorldValueMappingSequence")


def _set_window(ds, lo: float, hi: float) -> None:
    """Give ``ds`` (and its frames' VOI items) the display window ``lo..hi`` of its own values: the
    source's window (e.g. C 40 / W 100 HU) showed an uncertainty map of 0..141 HU saturated."""
    center, _ = _ds_number((lo + hi) / 2)
    width, _ = _ds_number(max(hi - lo, 1e-3))
    frame_voi = [v for g in _group_items(ds) for v in (g.get("FrameVOILUTSequence") or [])]
    # an enhanced image keeps its window in the frames' VOI items (not an attribute of its top level)
    for item in frame_voi if _is_enhanced(ds) else [ds, *frame_voi]:
        for tag in _VOI_TAGS:
            if tag in item:
                delattr(item, tag)
        item.WindowCenter, item.WindowWidth = center, width


def _ds_number(value: float) -> tuple[str, float]:
    """A DS string for ``value`` (at most 16 characters) and the float it stands for."""
    from pydicom.valuerep import format_number_as_ds

    text = format_number_as_ds(float(value))
    return text, float(text)


def fit_rescale(lo: float, hi: float) -> tuple[float, float]:
    """Slope/intercept mapping [lo, hi] onto signed 16-bit stored values (DS-representable).

    Examples
    --------
    >>> s, b = fit_rescale(0.0, 0.02)
    >>> round((32767 * s + b) - 0.02, 6) >= 0, b
    (True, 0.0)
    """
    if not hi > lo:
        return 1.0, _ds_number(lo)[1]
    if lo >= 0:  # an uncertainty map: intercept 0, so a zero std is stored as exactly 0, not -1e-4
        slope = hi / 32767.0
        for _ in range(8):
            s = _ds_number(slope)[1]
            if s * 32767.0 >= hi:
                return s, 0.0
            slope *= 1.0 + 1e-6
        return _ds_number(slope * 1.001)[1], 0.0
    mid = _ds_number((hi + lo) / 2.0)[1]
    half = max(hi - mid, mid - lo)
    slope = half / 32767.0
    for _ in range(8):
        s = _ds_number(slope)[1]
        if s * 32767.0 >= half:
            return s, mid
        slope *= 1.0 + 1e-6
    return _ds_number(slope * 1.001)[1], mid


def _is_enhanced(ds) -> bool:
    return _sop_class(ds) in ENHANCED_SOP_CLASSES


def _group_items(ds) -> list:
    """All items of the Shared and Per-frame Functional Groups Sequences."""
    return [item for groups in ("SharedFunctionalGroupsSequence",
                                "PerFrameFunctionalGroupsSequence")
            for item in (ds.get(groups) or [])]


def _has_groups(ds) -> bool:
    return bool(ds.get("SharedFunctionalGroupsSequence") or ds.get("PerFrameFunctionalGroupsSequence"))


def _shared_group(ds):
    """The item of SharedFunctionalGroupsSequence, created when the source has none."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    if not ds.get("SharedFunctionalGroupsSequence"):
        ds.SharedFunctionalGroupsSequence = DicomSequence([Dataset()])
    return ds.SharedFunctionalGroupsSequence[0]


def _set_rescale(ds, slope: float, inter: float) -> None:
    """Write the rescale where the IOD keeps it.

    Enhanced CT/MR: only in the Pixel Value Transformation functional group (the source's items,
    else a new Shared one with RescaleType HU for CT, US otherwise); never at the top level,
    which those IODs do not have. An enhanced source without any functional groups (already
    invalid, e.g. pydicom's ``emri_small``) keeps its own top-level convention: adding one group
    would make every other mandatory group "missing". Single-frame CT: the top level (Modality
    LUT module). MR Image
    has no Modality LUT module; scanners write the top-level rescale there as a standard
    extension, and so does medvae (dciodvfy warns, no error).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    s_txt, _ = _ds_number(slope)
    i_txt, _ = _ds_number(inter)
    items = [item.PixelValueTransformationSequence[0] for item in _group_items(ds)
             if item.get("PixelValueTransformationSequence")]
    enhanced = _is_enhanced(ds) and _has_groups(ds)
    if enhanced and not items:
        pvt = Dataset()
        pvt.RescaleType = "HU" if ds.get("Modality") == "CT" else "US"
        _shared_group(ds).PixelValueTransformationSequence = DicomSequence([pvt])
        items = [pvt]
    for pvt in items:
        pvt.RescaleSlope = s_txt
        pvt.RescaleIntercept = i_txt
    if enhanced:
        for tag in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if tag in ds:
                delattr(ds, tag)
    elif not items or "RescaleSlope" in ds:
        ds.RescaleSlope = s_txt
        ds.RescaleIntercept = i_txt
        if "RescaleType" not in ds and ds.get("Modality") == "CT":
            ds.RescaleType = "HU"


def _int_range(dtype, bits: int | None = None) -> tuple[int, int]:
    """The integers ``dtype`` holds, or its low ``bits`` (BitsStored), signed as ``dtype`` is."""
    info = np.iinfo(dtype)
    if bits is None or bits >= info.bits:
        return int(info.min), int(info.max)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if info.min < 0 else (0, (1 << bits) - 1)


def _quantize(values: np.ndarray, slope: float, inter: float, dtype, bits: int | None = None) -> np.ndarray:
    lo, hi = _int_range(dtype, bits)
    stored = np.rint((values.astype(np.float64) - inter) / slope)
    return np.clip(stored, lo, hi).astype(dtype)


def _stored_range(slope: float, inter: float, dtype, bits: int | None = None) -> tuple[float, float]:
    """The values (in the scan's units) that the integer ``dtype`` (its low ``bits``) holds through
    slope/intercept."""
    a, b = _int_range(dtype, bits)
    lo, hi = sorted((a * slope + inter, b * slope + inter))
    return float(lo), float(hi)


def _n_clipped(values: np.ndarray, slope: float, inter: float, dtype, bits: int | None = None) -> int:
    """How many ``values`` :func:`_quantize` clips (beyond half a step outside the stored range)."""
    lo, hi = _stored_range(slope, inter, dtype, bits)
    half = abs(slope) / 2
    return int(np.count_nonzero((values < lo - half) | (values > hi + half)))


def _source_reference(sop_class: str, sop_uid: str, frame: int | None = None):
    """An item of SourceImageSequence: the source instance (and frame), purpose of reference."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes

    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = sop_uid
    if frame is not None:
        ref.ReferencedFrameNumber = frame
    purpose = Dataset()
    code = codes.DCM.SourceImageForImageProcessingOperation
    purpose.CodeValue, purpose.CodingSchemeDesignator = code.value, code.scheme_designator
    purpose.CodeMeaning = code.meaning
    ref.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
    return ref


def _evidence(ds, sop_class: str, sop_uid: str, series_uid: str | None):
    """A Hierarchical SOP Instance Reference (study / series / instance) to the source image."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence

    sop = Dataset()
    sop.ReferencedSOPClassUID = sop_class
    sop.ReferencedSOPInstanceUID = sop_uid
    series = Dataset()
    series.SeriesInstanceUID = series_uid or ""
    series.ReferencedSOPSequence = DicomSequence([sop])
    study = Dataset()
    study.StudyInstanceUID = ds.get("StudyInstanceUID", "")
    study.ReferencedSeriesSequence = DicomSequence([series])
    return study


#: Type 1C attributes "required if Image Type value 1 is ORIGINAL or MIXED, may be present
#: otherwise" (PS3.3 C.8.13.4 MR Pulse Sequence, C.7.6.18.3 Bulk Motion Synchronization).
#: dciodvfy reports them as errors in DERIVED images, so derived enhanced images leave them out.
_ORIGINAL_ONLY = (
    "BulkMotionCompensationTechnique", "CoverageOfKSpace", "EchoPlanarPulseSequence",
    "EchoPulseSequence", "GeometryOfKSpaceTraversal", "MRAcquisitionType",
    "MultiPlanarExcitation", "MultipleSpinEcho", "NumberOfKSpaceTrajectories",
    "OversamplingPhase", "PhaseContrast", "PulseSequenceName",
    "RectilinearPhaseEncodeReordering", "SaturationRecovery", "SegmentedKSpaceTraversal",
    "SpectrallySelectedSuppression", "SteadyStatePulseSequence", "TimeOfFlightContrast",
)


def _derive_enhanced(ds, *, old_sop: str | None, sop_class: str | None, old_series: str | None,
                     text: str, role: str = "restored") -> None:
    """Derived-image attributes of Enhanced CT/MR (PS3.3 C.8.13.1.1.1, C.8.15.2.1.1, C.7.6.16.2.6).

    ImageType value 1 DERIVED, value 2 PRIMARY (SECONDARY is not allowed), values 3-4 kept
    (the pixel contrast is the source's); every FrameType (MR/CT Image Frame Type functional
    group) value 1 DERIVED; the derivation is recorded in the Derivation Image functional group:
    per frame (frame k from source frame k) when the source has per-frame groups, else shared,
    with a derivation code for the series' ``role`` (:data:`_DERIVATION_CODE`), and the source
    instance in SourceImageEvidenceSequence. A source without functional groups
    keeps the top-level DerivationDescription / SourceImageSequence (see :func:`_set_rescale`).
    """
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.sr.codedict import codes

    image_type = [str(v) for v in (ds.get("ImageType") or [])][2:4]
    ds.ImageType = ["DERIVED", "PRIMARY"] + image_type + ["NONE"] * (2 - len(image_type))
    for name in _ORIGINAL_ONLY:  # "may be present otherwise", but validators flag them: the
        if name in ds:           # source series, referenced below, keeps them
            delattr(ds, name)
    for item in _group_items(ds):
        for name in ("MRImageFrameTypeSequence", "CTImageFrameTypeSequence"):
            for ft in item.get(name) or []:
                values = [str(v) for v in (ft.get("FrameType") or [])]
                if values:
                    ft.FrameType = ["DERIVED"] + values[1:]
    if not _has_groups(ds):
        ds.DerivationDescription = text
        if old_sop and sop_class:
            ds.SourceImageSequence = DicomSequence([_source_reference(sop_class, old_sop)])
        return
    if old_sop and sop_class:  # required once a Derivation Image group references the source
        ds.SourceImageEvidenceSequence = DicomSequence([_evidence(ds, sop_class, old_sop,
                                                                  old_series)])
    for tag in ("SourceImageSequence", "DerivationDescription", "DerivationCodeSequence"):
        if tag in ds:  # top-level forms belong to single-frame IODs
            delattr(ds, tag)

    def derivation(frame: int | None):
        item = Dataset()
        item.DerivationDescription = text
        code = getattr(codes.DCM, _DERIVATION_CODE[role])
        c = Dataset()
        c.CodeValue, c.CodingSchemeDesignator = code.value, code.scheme_designator
        c.CodeMeaning = code.meaning
        item.DerivationCodeSequence = DicomSequence([c])
        item.SourceImageSequence = DicomSequence(
            [_source_reference(sop_class, old_sop, frame)] if old_sop and sop_class else [])
        return DicomSequence([item])

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) == _n_frames(ds):
        for k, item in enumerate(per_frame):
            item.DerivationImageSequence = derivation(k + 1)
        shared = ds.get("SharedFunctionalGroupsSequence")
        if shared and "DerivationImageSequence" in shared[0]:
            del shared[0].DerivationImageSequence  # a macro is either shared or per frame
    else:
        _shared_group(ds).DerivationImageSequence = derivation(None)


#: an earlier medvae step's SeriesDescription suffix, whole or cut off by the LO limit ("[medvae cor")
_MEDVAE_SUFFIX = re.compile(r"\s*\[medvae\b[^\[\]]*\]?\s*$")
#: a whole description that is a medvae step (a NIfTI descrip): the steps medvae writes, not any text
#: that starts with "medvae" (the sample series' "medvae sample: ..." is source data)
_MEDVAE_STEP = re.compile(r"medvae (restored|uncertainty|corrupt|demo baseline)\b")
_LO_MAX, _ST_MAX = 64, 1024  # characters of SeriesDescription (LO) and DerivationDescription (ST)


def medvae_step(description: str | None) -> str | None:
    """The medvae step that made a scan, from its description (a NIfTI descrip ``"medvae ..."``, or the
    ``" [medvae ...]"`` suffix of a derived SeriesDescription, :func:`derived_description`); None for a
    scan medvae did not make.

    >>> medvae_step("CT head [medvae uncertainty (std)]"), medvae_step("medvae restored"), medvae_step("CT head")
    ('medvae uncertainty (std)', 'medvae restored', None)
    >>> medvae_step("medvae sample: 2 CT slices [medvae corrupt mask boxes (1 = corrupted)]")  # the suffix first
    'medvae corrupt mask boxes (1 = corrupted)'
    >>> medvae_step("medvae sample: 2 CT slices") is None   # `medvae samples` writes source data, not a step
    True
    """
    text = str(description or "").strip()
    suffix = _MEDVAE_SUFFIX.search(text)
    if suffix:
        return suffix.group(0).strip().strip("[]").strip()
    return text if _MEDVAE_STEP.match(text) else None


def derived_description(base: str | None, description: str) -> str:
    r"""The SeriesDescription of a derived series: ``base`` (the source's) with ``" [description]"``
    appended, within the 64 characters of LO.

    An earlier medvae step's suffix (a restoration of a corrupted series) is replaced, not kept,
    and when the text is too long the source's text is cut, at a word where it can be, never the
    suffix: the LO limit used to cut a chain into "... [medvae cor [medvae restored]".

    >>> derived_description("CT head [medvae corrupt gaussian seed 0]", "medvae restored")
    'CT head [medvae restored]'
    >>> derived_description("HEAD\x1b[2J\x07 axial", "medvae restored")  # no control character (LO)
    'HEAD [2J axial [medvae restored]'
    >>> derived_description("Head 1.0 H30s axial brain window iterative reconstruction level 3",
    ...                     "medvae restored")
    'Head 1.0 H30s axial brain window iterative [medvae restored]'
    """
    text = printable(base or "")  # LO allows no control characters; a terminal would obey them
    while True:  # every earlier suffix: a chain of medvae steps
        stripped = _MEDVAE_SUFFIX.sub("", text)
        if stripped == text:
            break
        text = stripped
    suffix = f"[{description}]"
    if len(suffix) >= _LO_MAX:
        return suffix[:_LO_MAX - 1] + "]"
    room = _LO_MAX - len(suffix) - 1  # one space between
    text = text.strip()
    if len(text) > room:
        cut = text[:room + 1].rsplit(" ", 1)[0] if " " in text[:room + 1] else ""
        text = (cut if cut.strip() else text[:room]).rstrip(" ,;:-_/")
    return f"{text} {suffix}" if text else suffix


#: the forms of :func:`medvae.models.label.model_label`: a DICOM header never names a local path
_MODEL_LABEL = re.compile(r"^(default|(sha256|path-sha1):[0-9a-f]{12}|(runs|models):/.+)$")


def check_model_label(model: str | None) -> str | None:
    """``model`` if it is a model label (or None); a path, which can name a patient, is refused.

    >>> check_model_label("sha256:0123456789ab")
    'sha256:0123456789ab'
    """
    if model is not None and not _MODEL_LABEL.match(str(model)):
        raise MedvaeError(f"model {model!r} is no model label: give 'default', an MLflow URI, or "
                          "medvae.models.label.model_label(path) (a file path can name a patient)")
    return model


def derivation_text(description: str, model: str | None = None) -> str:
    """The DerivationDescription (ST, at most 1024 characters): what made the pixels, by which medvae
    version and, when given, which model (a label, never a local path: see :func:`medvae.models.label.model_label`)."""
    from medvae import __version__

    made_by = f"medvae {__version__}" + (f", model {model}" if model else "")
    text = f"{description} ({made_by}); pixel data replaced, geometry unchanged"
    return text if len(text) <= _ST_MAX else text[:_ST_MAX - 3] + "..."


def _derive(ds, *, series_uid: str, description: str, model: str | None = None,
            created: datetime.datetime | None = None) -> None:
    """Mark a deep-copied dataset as a derived image of a new series (in place).

    Single-frame CT/MR: ImageType DERIVED\\SECONDARY, DerivationDescription and a
    SourceImageSequence at the top level. Enhanced CT/MR follow their own rules
    (:func:`_derive_enhanced`). ``model``: the label of the model that made the pixels, for
    DerivationDescription (:func:`derivation_text`).
    """
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import generate_uid

    old_sop, sop_class = ds.get("SOPInstanceUID"), ds.get("SOPClassUID")
    old_series = ds.get("SeriesInstanceUID")
    # a series derived from a medvae series (a corrupted copy's restoration) steps ten times as far:
    # N + 3000 + 1000 was the number of the corrupted copy's own mask
    from_medvae = medvae_step(ds.get("SeriesDescription")) is not None
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if sop_class:
        ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SeriesDescription = derived_description(ds.get("SeriesDescription"), description)
    text = derivation_text(description, model)
    try:
        if "SeriesNumber" in ds and ds.SeriesNumber is not None and str(ds.SeriesNumber) != "":
            ds.SeriesNumber = derived_series_number(int(ds.SeriesNumber), series_role(description),
                                                    from_medvae=from_medvae)
    except (TypeError, ValueError):
        pass
    # the file is medvae's now: its writer, and when its pixels were made
    from medvae import __version__

    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = f"MEDVAE_{__version__}"[:16]
    if "SourceApplicationEntityTitle" in ds.file_meta:
        del ds.file_meta.SourceApplicationEntityTitle
    now = created or datetime.datetime.now()  # the series' one time (its writer's), so every file agrees
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    for date, time in (("InstanceCreationDate", "InstanceCreationTime"), ("SeriesDate", "SeriesTime")):
        if date in ds or time in ds:  # a new instance of a new series: not the source's times
            setattr(ds, date, now.strftime("%Y%m%d"))
            setattr(ds, time, now.strftime("%H%M%S"))
    if _is_enhanced(ds):
        _derive_enhanced(ds, old_sop=old_sop, sop_class=sop_class, old_series=old_series,
                         text=text, role=series_role(description))
    else:
        image_type = [str(v) for v in (ds.get("ImageType") or [])]
        ds.ImageType = ["DERIVED", "SECONDARY"] + image_type[2:]
        ds.DerivationDescription = text
        if old_sop and sop_class:
            ds.SourceImageSequence = DicomSequence([_source_reference(sop_class, old_sop)])
    for tag in _DROP_ALWAYS:
        if tag in ds:
            delattr(ds, tag)


#: binary VRs of words, whose bytes a big-endian file stores swapped
_WORD_VRS = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _as_little_endian(ds) -> None:
    """Make a big-endian source's copy little endian, in place: derived files are written Explicit VR
    Little Endian and pydicom does not convert (it refused, a traceback). Reading every element gives
    its value from the big-endian bytes; binary words are byte-swapped."""
    def convert(dataset) -> None:
        for elem in dataset:  # iterating converts each raw element with the dataset's own encoding
            if elem.VR == "SQ":
                for item in elem.value:
                    convert(item)
            elif elem.VR in _WORD_VRS and isinstance(elem.value, (bytes, bytearray)):
                size = _WORD_VRS[elem.VR]
                elem.value = np.frombuffer(elem.value, dtype=f">u{size}").astype(f"<u{size}").tobytes()
        dataset.set_original_encoding(False, True, dataset.original_character_set)

    if ds.original_encoding[1] is False:  # (implicit VR, little endian) as read
        convert(ds)


#: first 132 bytes of a staged file: no preamble + "DICM", so no DICOM tool (pydicom, dcmtk's
#: storescu) accepts a file of a series that is still being written
_STAGED_HEAD = b"\xff" * 128 + b"PART"
_ARMED_HEAD = b"\x00" * 128 + b"DICM"


def _write_dataset(ds, path: Path) -> None:
    """Write one file, staged (a seam for tests that simulate a failure mid-series)."""
    import io

    ds.preamble = b"\x00" * 128  # never carry a source's TIFF preamble onto new pixels
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getbuffer()
    data[:len(_STAGED_HEAD)] = _STAGED_HEAD  # invalid from its first byte on disk: a kill never leaves a valid file
    with open(path, "wb") as fh:
        fh.write(data)


def arm_series(folder: Path) -> dict[str, str]:
    """Make the staged files of a complete series valid DICOM; return the series' marker record.

    The ``finalize`` step of :func:`medvae.io.atomic.atomic_output` for a derived series.
    """
    uid = None
    for path in sorted(folder.glob("IM*.dcm")):
        with open(path, "r+b") as fh:
            if fh.read(len(_STAGED_HEAD)) == _STAGED_HEAD:
                fh.seek(0)
                fh.write(_ARMED_HEAD)
        if uid is None:
            uid = str(_read(path, headers_only=True).SeriesInstanceUID)
    return {"kind": "dicom-series", "series_uid": uid or ""}


def check_derived_series(folder: Path, marker: dict | None) -> None:
    """Raise MedvaeError unless every file of ``folder`` belongs to the series medvae wrote there.

    The ``owned`` check of :func:`medvae.io.atomic.claim_output` for DICOM outputs.
    """
    uid = (marker or {}).get("series_uid")
    for name in (marker or {}).get("files", []):
        if not name.endswith(".dcm"):
            continue
        try:
            found = str(_read(folder / name, headers_only=True).get("SeriesInstanceUID", ""))
        except Exception:
            found = ""
        if not uid or found != uid:
            raise MedvaeError(f"refusing to replace: {name} is not part of the series medvae wrote "
                              "here", folder)


def needs_value_range(datasets: Sequence, rescale: str = "keep") -> bool:
    """True when writing a derived series from ``datasets`` needs the value range of the whole series.

    ``rescale="fit"`` fits one slope/intercept to the range; so does ``"keep"`` for a source whose
    stored values have no integer type medvae writes or that maps them through a Modality LUT
    (a rescale cannot reproduce the LUT). Headers suffice (``stop_before_pixels`` datasets).
    """
    if rescale == "fit":
        return True
    if rescale == "unit":
        return False
    return any(_INT_TYPES.get((int(ds.get("BitsAllocated", 16) or 16),
                               int(ds.get("PixelRepresentation", 0) or 0))) is None
               or "ModalityLUTSequence" in ds for ds in datasets)


def fits_stored_type(datasets: Sequence, low: float, high: float) -> bool:
    """True when values within ``[low, high]`` fit every dataset's own stored type through its own
    rescale, so ``rescale="keep"`` loses nothing but the rounding to the slope's steps (and values
    taken from the source come back exactly). Headers suffice.
    """
    if needs_value_range(datasets, "keep"):
        return False
    for ds in datasets:
        dtype = _INT_TYPES[(int(ds.get("BitsAllocated", 16) or 16), int(ds.get("PixelRepresentation", 0) or 0))]
        for k in range(_n_frames(ds)):
            slope, inter = rescale_of(ds, k)
            lo, hi = _stored_range(slope, inter, dtype)
            half = abs(slope) / 2  # what _quantize rounds to the end step anyway: a fill of 0 just
            if low < lo - half or high > hi + half:  # below a 6e-5 intercept refitted a whole MR
                return False
    return True


class DerivedSeriesWriter:
    """Write a new derived series file by file: one source dataset and its slices at a time.

    Every source dataset is deep-copied and only its pixels replaced (see :func:`medvae.io.save_scan`
    for the rules): same study and frame of reference, one new SeriesInstanceUID for the whole series,
    a new SOPInstanceUID per file, geometry kept, ImageType DERIVED. Files are named ``IM0001.dcm``,
    ... in the order :meth:`write` is called (Z order), staged (:func:`_write_dataset`) until
    :func:`arm_series` makes the complete series valid. Values clipped to the source's stored type
    are warned once for the whole series by :meth:`finish`, which leaving a ``with`` block calls.

    Parameters
    ----------
    out_dir : pathlib.Path
        The (existing, empty) folder that receives the files: a staging folder of
        :meth:`medvae.io.atomic.OutputClaim.writing`.
    description : str
        Appended to SeriesDescription and written to DerivationDescription.
    rescale : {"keep", "fit", "unit"}
        As for :func:`medvae.io.save_scan`.
    value_range : (low, high), optional
        Minimum and maximum of the values of the *whole* series; required when
        :func:`needs_value_range` says so (one slope/intercept for every file).
    model : str, optional
        The label of the model that made the pixels (``"default"``, ``"sha256:<12 hex>"``, an
        MLflow URI: :func:`medvae.models.label.model_label`, never a path), written with the medvae
        version into DerivationDescription.

    Examples
    --------
    >>> series = open_series("dev/dicom/series_ct_head")                          # doctest: +SKIP
    >>> with DerivedSeriesWriter(staging_folder) as writer:                        # doctest: +SKIP
    ...     for i in range(0, len(series.files), 8):
    ...         slab, datasets = series.read(i, i + 8)
    ...         for k, (ds, f) in enumerate(zip(datasets, series.files[i:i + 8])):
    ...             writer.write(ds, slab[:, :, k:k + 1], source=f)
    """

    def __enter__(self) -> "DerivedSeriesWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()

    def __init__(self, out_dir: Path, *, description: str = "medvae restored", rescale: str = "keep",
                 value_range: tuple[float, float] | None = None, model: str | None = None) -> None:
        from pydicom.uid import generate_uid

        if rescale not in ("keep", "fit", "unit"):
            raise ValueError(f"rescale must be 'keep', 'fit' or 'unit', not {rescale!r}")
        self.out_dir = Path(out_dir)
        self.description = description
        self.model = check_model_label(model)
        self.rescale = rescale
        self.value_range = None if value_range is None else (float(value_range[0]), float(value_range[1]))
        self.series_uid = generate_uid()
        self.created = datetime.datetime.now()
        self.written: list[Path] = []
        self._clipped: list[tuple] = []  # (file, pixels, type, slope, intercept, lo, hi) of files that clipped

    def finish(self) -> None:
        """Warn once for the whole series when values were clipped to the source's stored type,
        counting every file's pixels (call after the last :meth:`write`)."""
        if not self._clipped:
            return
        where, _, dtype, slope, inter, lo, hi = self._clipped[0]
        total = sum(c[1] for c in self._clipped)
        more = f" (and {len(self._clipped) - 1} more file(s))" if len(self._clipped) > 1 else ""
        log.warning("%s%s: %d pixel(s) lie outside the range of the source's stored type "
                    "(%s, slope %g, intercept %g: %g..%g) and are clipped to it, as the "
                    "scanner's own values are; write NIfTI to keep them", where, more, total,
                    dtype, slope, inter, lo, hi)
        self._clipped = []

    def _range_fit(self) -> tuple[float, float]:
        if self.value_range is None:
            raise ValueError("this series needs value_range (the whole series' minimum and maximum) to "
                             "fit its rescale; see needs_value_range")
        return fit_rescale(*self.value_range)

    @_quiet
    def write(self, src, slices: np.ndarray, *, source: Path | None = None) -> Path:
        """Write the derived copy of the source dataset ``src`` holding ``slices``.

        Parameters
        ----------
        src : pydicom.Dataset
            The source file's dataset (pixel data may be absent); not modified.
        slices : (X, Y, frames) array
            The new values of the file's frames, in the scan's units (HU for CT).
        source : pathlib.Path, optional
            The source file, named in errors.

        Returns
        -------
        pathlib.Path
            The file written (staged).
        """
        from pydicom.uid import ExplicitVRLittleEndian

        where = source if source is not None else self.out_dir
        problem = object_problem(src)  # a scan read with check=False is not written back
        if problem:
            raise NotRestorableError(problem, where)
        nf = _n_frames(src)
        if slices.ndim != 3 or slices.shape[2] != nf:
            raise MedvaeError(f"{slices.shape[2] if slices.ndim == 3 else 0} slices given for a DICOM file "
                              f"of {nf} frame(s)", where)
        frames = np.asarray(slices, dtype=np.float64).transpose(2, 1, 0)
        rows, cols = int(src.get("Rows", 0)), int(src.get("Columns", 0))
        if frames.shape[1:] != (rows, cols):
            raise MedvaeError(f"array slices are {frames.shape[2]}x{frames.shape[1]}, the DICOM "
                              f"images {cols}x{rows}", where)
        ds = copy.deepcopy(src)
        for tag in PIXEL_TAGS:
            if tag in ds:
                delattr(ds, tag)
        _as_little_endian(ds)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        bits = int(ds.get("BitsAllocated", 16) or 16)
        signed = int(ds.get("PixelRepresentation", 0) or 0)
        dtype = _INT_TYPES.get((bits, signed))
        narrow = None  # the source's BitsStored where it is kept
        if self.rescale == "unit" or self.rescale == "fit" or dtype is None or "ModalityLUTSequence" in ds:
            if self.rescale == "unit":  # a mask: exact 0 and 1 (the source's rescale rounded 1 / 2.44 to 0)
                lo, hi = np.iinfo(np.int16).min, np.iinfo(np.int16).max
                if not (np.array_equal(frames, np.round(frames)) and frames.min() >= lo and frames.max() <= hi):
                    raise ValueError("rescale='unit' stores whole numbers from -32768 to 32767 only")
                slope, inter = 1.0, 0.0
            else:
                slope, inter = self._range_fit()
            stored = _quantize(frames, slope, inter, np.int16)
            for item in [ds, *_group_items(ds)]:
                for tag in _DROP_ON_FIT:
                    if tag in item:
                        delattr(item, tag)
            _set_rescale(ds, slope, inter)
        else:
            # MONOCHROME1 is inverted over the range of the bits stored: written with 16 where the source
            # said 12, ITK read the restoration 61,000 higher than the source. Its stored bits are kept,
            # in every file alike, and bound the values as the type does (MONOCHROME2: the type alone)
            b = int(src.get("BitsStored", bits) or bits)
            narrow = b if str(ds.PhotometricInterpretation) == "MONOCHROME1" and 0 < b < bits else None
            stored = np.empty(frames.shape, dtype=dtype)
            clipped = 0
            for k in range(nf):
                slope, inter = rescale_of(src, k)
                stored[k] = _quantize(frames[k], slope, inter, dtype, narrow)
                clipped += _n_clipped(frames[k], slope, inter, dtype, narrow)
            if clipped:
                # the source's integer type bounds what its scanner writes (uint16 with intercept
                # -1024 stops at -1024 HU): restored values beyond are clipped, as the scanner's are
                kind = np.dtype(dtype).name + (f", {narrow} bits stored" if narrow else "")
                self._clipped.append((where, clipped, kind, slope, inter, *_stored_range(slope, inter, dtype, narrow)))
        role = series_role(self.description)
        # MONOCHROME1/2 (object_problem); a map is shown in its own window, 0 (no std, no damage) as black:
        # a MONOCHROME1 source's maps showed high uncertainty and the damaged pixels as black
        photometric = "MONOCHROME2" if role in ("mask", "uncertainty") else str(ds.PhotometricInterpretation)
        if photometric == "MONOCHROME2" and "PresentationLUTShape" in ds:
            ds.PresentationLUTShape = "IDENTITY"
        had_frames = "NumberOfFrames" in src
        ds.set_pixel_data(stored if nf > 1 else stored[0], photometric,
                          stored.dtype.itemsize * 8, generate_instance_uid=False)
        if had_frames and "NumberOfFrames" not in ds:
            ds.NumberOfFrames = nf
        if narrow is not None and photometric == "MONOCHROME1":
            ds.BitsStored, ds.HighBit = narrow, narrow - 1
        _derive(ds, series_uid=self.series_uid, description=self.description, model=self.model,
                created=self.created)
        if role == "mask":  # 0 and 1, whatever the source's window
            _set_window(ds, 0.0, 1.0)
        elif role == "uncertainty":  # 0 to the whole series' largest std (one window for every file)
            top = self.value_range[1] if self.value_range is not None else float(frames.max())
            _set_window(ds, 0.0, top)
        name = self.out_dir / f"IM{len(self.written) + 1:04d}.dcm"
        _write_dataset(ds, name)
        self.written.append(name)
        return name


def write_dicom_series(scan: Scan, array: np.ndarray, out_dir: Path, *,
                       description: str = "medvae restored", rescale: str = "keep",
                       model: str | None = None) -> list[Path]:
    """Write ``array`` as a new derived series into the (existing, empty) folder ``out_dir``.

    :class:`DerivedSeriesWriter` over every source dataset, in Z order (``model``: its model
    label); see :func:`medvae.io.save_scan` for the rules. Use :func:`medvae.io.save_scan`, which
    adds the atomic write and the input checks.
    """
    if not scan.datasets:
        raise MedvaeError("this scan has no DICOM datasets to write back", scan.path)
    counts = [_n_frames(ds) for ds in scan.datasets]
    if sum(counts) != array.shape[2]:
        raise MedvaeError(f"array has {array.shape[2]} slices, the DICOM datasets "
                          f"{sum(counts)}", scan.path)
    for k, src in enumerate(scan.datasets):  # a scan read with check=False: refused before any file
        problem = object_problem(src)
        if problem:
            raise NotRestorableError(problem, scan.files[k] if scan.files else scan.path)
    value_range = None
    if needs_value_range(scan.datasets, rescale):
        value_range = (float(array.min()), float(array.max()))
    with DerivedSeriesWriter(out_dir, description=description, rescale=rescale, value_range=value_range,
                             model=model) as writer:
        z = 0
        for i, (src, nf) in enumerate(zip(scan.datasets, counts)):
            writer.write(src, array[:, :, z:z + nf], source=scan.files[i] if scan.files else scan.path)
            z += nf
    return writer.written
