"""Saving and loading medvae models, safely.

A checkpoint is a plain dict of tensors and primitives, written atomically and read with
``torch.load(weights_only=True)``: loading never unpickles code.

``load_model`` accepts

* ``"default"``: the model shipped inside the package (``medvae/weights/default.pt``);
* a path to a ``.pt`` checkpoint written by medvae (a training ``last.pt``/``best.pt`` works too);
* a local MLflow model folder logged by medvae (the medvae checkpoint inside the model is read; the
  pickled MLflow flavor is never unpickled).

MLflow URIs (``runs:/<id>/model``, ``models:/<name>/<version>``) are resolved to a local file by
:func:`medvae.tracking.load_model`: checkpoints read local files only.
"""
from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.models.calibration import CALIBRATION_KEY, calibration_problem
from medvae.models.vae import MaskedVAE, VAEConfig

FORMAT = "medvae-checkpoint"
FORMAT_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "default.pt"
#: file name of the medvae checkpoint inside a logged MLflow model
MLFLOW_CHECKPOINT = "medvae.pt"


@dataclass
class LoadedModel:
    """A model ready for inference with everything needed to use it correctly."""

    model: MaskedVAE
    intensity: IntensityPolicy
    source: str
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> VAEConfig:
        return self.model.config


def checkpoint_dict(model: MaskedVAE, intensity: IntensityPolicy, *, meta: dict[str, Any] | None = None,
                    **training_state: Any) -> dict[str, Any]:
    """The dict written to disk: model config, weights (fp32, on the CPU), intensity policy, meta."""
    model = getattr(model, "module", model)  # unwrap DDP
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_config": model.config.to_dict(),
        "intensity": intensity.to_dict(),
        "state_dict": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
        **training_state,
    }


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`medvae.io.atomic.atomic_output`: readers never see a partial
    file, and the file gets the usual permissions (the umask's), not a temporary file's 0600."""
    from medvae.io.atomic import atomic_output

    import errno

    path = Path(path)
    with atomic_output(path, kind="file", overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            try:
                torch.save(obj, fh)
            except RuntimeError as exc:
                # torch's zip writer turns a failed write (a full disk) into "[enforce fail at
                # inline_container.cc] unexpected pos": an OSError naming the file, as other writes give
                text = str(exc)
                if not any(s in text for s in ("unexpected pos", "file write failed", "PytorchStreamWriter")):
                    raise  # not a write that failed: torch's own error
                st = os.statvfs(tmp)
                full = st.f_bavail * st.f_frsize < 64 * 2**20
                first = " ".join(str(exc).split())[:120]
                raise OSError(errno.ENOSPC if full else errno.EIO,
                              "No space left on device" if full else f"torch could not write the file ({first})",
                              str(path)) from None
            fh.flush()
            os.fsync(fh.fileno())
    return path


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PICKLE_PROTOCOL = re.compile(r"Detected pickle protocol (\d+)")


def _torch_load_problem(exc: BaseException, warned: Sequence[warnings.WarningMessage] = ()) -> str:
    """One line on why ``torch.load(weights_only=True)`` refused a file (PyTorch's own message is
    many lines long, with colour codes and advice to unpickle, which medvae never does); ``warned``
    are the warnings torch gave while trying, which name a pickle protocol it cannot read."""
    text = _ANSI.sub("", str(exc)).strip()
    protocol = next((m.group(1) for w in warned if (m := _PICKLE_PROTOCOL.search(str(w.message)))), None)
    if protocol and "Unsupported operand" in text:
        return (f"it was written with pickle protocol {protocol}, which torch.load(weights_only=True) cannot "
                "read: save it with torch.save's default protocol (2)")
    if "TorchScript" in text:
        return ("it is a TorchScript archive (e.g. a medvae export, .ts), not a checkpoint: give the .pt "
                "checkpoint it was exported from")
    if ("central directory" in text or "failed reading zip archive" in text or isinstance(exc, EOFError)
            or (isinstance(exc, OSError) and exc.errno == 22)):  # a zip cut short: "[Errno 22] Invalid argument"
        return "the file is truncated or damaged (not a complete torch archive)"
    if "Weights only load failed" in text or "weights_only" in text:
        return ("torch.load(weights_only=True) refused it: it holds pickled Python objects, not only "
                "tensors, and medvae never unpickles code")
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"torch.load(weights_only=True) could not read it ({first[:160]})"


def _damaged_member(path: Path) -> str | None:
    """The first member of a torch zip archive whose bytes no longer match their CRC-32 (a file damaged
    on disk or in transfer), else None. ``torch.load`` does not check the CRCs: flipped bytes inside a
    tensor load as finite but wrong weights, and the model restores nonsense without a word."""
    import zipfile

    try:
        if not zipfile.is_zipfile(path):
            return None  # not a zip (a legacy torch file, junk): torch.load says what it is
        with zipfile.ZipFile(path) as zf:
            return zf.testzip()
    except Exception:  # BadZipFile, zlib.error, an unsupported compression...
        return None  # torch.load, next, says what is wrong with it


#: first bytes of files often given as a model by mistake (offset, bytes, what the file is)
_OTHER_FORMATS = ((344, b"n+1\0", "a NIfTI image"), (344, b"ni1\0", "a NIfTI image (.hdr/.img pair)"),
                  (4, b"n+2\0", "a NIfTI-2 image"), (128, b"DICM", "a DICOM file"),
                  (0, b"\x89PNG", "a PNG image"), (0, b"\xff\xd8\xff", "a JPEG image"),
                  (0, b"\x89HDF", "an HDF5 file"), (0, b"\x93NUMPY", "a NumPy array (.npy)"))


def _not_a_torch_file(path: Path) -> str | None:
    """Why ``path`` is no torch checkpoint when its first bytes say so (naming what it looks like), else None.

    ``torch.save`` writes a zip archive, or (legacy format) a pickle of protocol 2 or later, which
    starts with byte 0x80: anything else is refused without ``torch.load``, whose weights-only
    unpickler called a NIfTI image "pickled Python objects". Those two go on to ``torch.load``,
    so a pickle holding code is still refused by ``weights_only=True``.
    """
    import gzip

    try:
        with open(path, "rb") as fh:
            head = fh.read(540)  # a NIfTI-2 header
    except OSError:
        return None  # torch.load names it
    # a pickle starts 0x80 then its protocol (2..5): junk starting 0x80 was "pickle protocol 242"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5):
        return None
    packed = head.startswith(b"\x1f\x8b")
    if packed:  # a .nii.gz: what is inside
        try:
            with gzip.open(path, "rb") as fh:
                head = fh.read(540)
        except (OSError, EOFError):
            head = b""
    for offset, magic, kind in _OTHER_FORMATS:
        if head[offset:offset + len(magic)] == magic:
            return f"this looks like {kind}{' (gzip-compressed)' if packed else ''}, not a medvae checkpoint (.pt)"
    if packed:
        return "this is a gzip-compressed file, not a medvae checkpoint (.pt)"
    return "not a torch checkpoint (it starts with no zip archive or protocol-2+ pickle header)"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a medvae checkpoint with ``weights_only=True``; ``MedvaeError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MedvaeError("model file not found", path)
    other = _not_a_torch_file(path)
    if other:
        raise MedvaeError(f"not a medvae model: {other}", path)
    damaged = _damaged_member(path)
    if damaged:
        raise MedvaeError("the model file is damaged (part of it "
                          "fails its CRC-32 check): copy it again from its source", path)
    try:
        # torch warns before it refuses some files (a pickle protocol other than 2, a TorchScript
        # archive): kept from the user, who gets one line saying what is wrong
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refused, truncated file, not a torch file
        raise MedvaeError(f"not a medvae model: {_torch_load_problem(exc, warned)}", path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MedvaeError("not a medvae model (no medvae checkpoint header)", path)
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise MedvaeError(f"not a medvae model: checkpoint format version {version!r} is not a whole "
                          "number", path)
    if version > FORMAT_VERSION:
        raise MedvaeError(f"checkpoint format {version} is newer than this medvae supports "
                          f"({FORMAT_VERSION}); upgrade medvae", path)
    for key in ("model_config", "state_dict"):
        if not isinstance(ckpt.get(key), dict):
            raise MedvaeError(f"not a usable medvae model: the checkpoint has no {key!r}", path)
    meta = ckpt.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise MedvaeError(f"not a usable medvae model: its 'meta' is a {type(meta).__name__}, not a mapping", path)
    for key, value in (meta or {}).items():  # what restore reads from it: blend weights, calibration
        if key in ("blend", "calibration") and not isinstance(value, dict):
            raise MedvaeError(f"not a usable medvae model: its meta[{key!r}] is a {type(value).__name__}, "
                              "not a mapping", path)
    problem = calibration_problem((meta or {}).get(CALIBRATION_KEY))
    if problem:  # read as the raw std, while the review page quoted the calibrated map's coverage
        raise MedvaeError(f"the model's uncertainty calibration is broken: {problem}", path)
    bad = [k for k, v in ckpt["state_dict"].items()
           if not isinstance(v, torch.Tensor) or (v.is_floating_point() and not torch.isfinite(v).all())]
    if bad:
        raise MedvaeError(f"the model's weights are broken: {len(bad)} tensor(s) hold NaN/Inf or are not "
                          f"tensors (first: {bad[0]})", path)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, source: str) -> LoadedModel:
    """Build the model described by ``ckpt`` and load its weights, with clear errors on mismatch."""
    try:
        config = VAEConfig.from_dict(ckpt["model_config"])
        intensity = IntensityPolicy.from_dict(ckpt.get("intensity"))
    except (KeyError, TypeError, ValueError) as exc:
        raise MedvaeError(f"invalid model configuration in checkpoint: {exc}", source) from None
    try:
        model = MaskedVAE(config)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:  # an activation MONAI does not know, a
        # size torch cannot build (negative latent_channels: RuntimeError from torch.empty)
        raise MedvaeError("invalid model configuration in checkpoint: " + " ".join(str(exc).split()),
                          source) from None
    _check_shapes(model, ckpt["state_dict"], source)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise MedvaeError(f"weights do not match the model configuration "
                          f"({len(missing)} missing, {len(unexpected)} unexpected tensors)", source)
    model.eval()
    return LoadedModel(model=model, intensity=intensity, source=source, meta=dict(ckpt.get("meta") or {}))


def update_checkpoint(path: str | os.PathLike, *, meta: dict[str, Any] | None = None,
                      model_config: dict[str, Any] | None = None) -> None:
    """Merge ``meta`` into a checkpoint's ``meta`` and ``model_config`` into its model configuration,
    in place and atomically, for what is fitted after training (uncertainty calibration, blend weights,
    the noise-map gain). Refuses (``RuntimeError``) when any weight tensor would change or the new
    configuration no longer fits the weights.
    """
    from medvae.io.atomic import atomic_output

    before = read_checkpoint(path)
    ckpt = dict(before)
    ckpt["meta"] = {**dict(before.get("meta") or {}), **dict(meta or {})}
    ckpt["model_config"] = {**before["model_config"], **dict(model_config or {})}
    with atomic_output(path, kind="file", overwrite=True) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(ckpt, fh)
            fh.flush()
            os.fsync(fh.fileno())  # as atomic_torch_save: the renamed file is on disk, not in a cache
        after = read_checkpoint(tmp)  # weights_only=True, as every reader does
        model_from_checkpoint(after, source=str(path))  # the configuration still fits the weights
        sb, sa = before["state_dict"], after["state_dict"]
        same = sb.keys() == sa.keys() and all(
            sb[k].dtype == sa[k].dtype and sb[k].shape == sa[k].shape and torch.equal(sb[k], sa[k]) for k in sb)
        if not same:
            raise RuntimeError(f"refusing to write {path}: the weights would change")


def _check_shapes(model: MaskedVAE, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise MedvaeError(f"weights do not match the model configuration: tensor {k} has shape "
                              f"{tuple(v.shape)}, the model needs {tuple(own[k].shape)}", source)
        # integer weights were cast on load, most of them to 0: a model that changed nothing, exit 0
        if k in own and own[k].is_floating_point() and not v.is_floating_point():
            raise MedvaeError(f"weights do not match the model configuration: tensor {k} holds {v.dtype} "
                              "values, the model needs floating-point weights", source)


def require_slice_restorer(lm: "LoadedModel") -> "LoadedModel":
    """``lm`` if it restores single-channel 2-D slices, as every restore path does; else one line.

    Checked where a model is loaded for restoring (restore, batch, demo, the benchmarks), before any
    output is written: a 3-D model was refused only inside restoration, after the demo had written half
    its outputs and the benchmarks had read their data.
    """
    cfg = lm.model.config
    if cfg.in_channels != 1 or cfg.out_channels != 1:
        raise MedvaeError(f"the model maps {cfg.in_channels}-channel images to {cfg.out_channels}-channel "
                          "ones; medvae restores single-channel scans", lm.source)
    if cfg.spatial_dims != 2:
        raise MedvaeError("this model restores 3-D patches; slice restoration needs spatial_dims 2", lm.source)
    return lm


def checkpoint_in_folder(folder: str | os.PathLike) -> Path | None:
    """The medvae checkpoint inside a local MLflow model folder logged by medvae, or None."""
    folder = Path(folder)
    return next((c for c in (folder / "extra_files" / MLFLOW_CHECKPOINT, folder / MLFLOW_CHECKPOINT)
                 if c.is_file()), None)


def weights_path(spec: str | os.PathLike) -> Path:
    """The file a checkpoint spec names: ``"default"`` is the model shipped inside the package (wherever
    it is installed), anything else a path."""
    if str(spec) != "default":
        return Path(spec)
    if not DEFAULT_WEIGHTS.is_file():
        raise MedvaeError("the default model weights are missing from this installation", DEFAULT_WEIGHTS)
    return DEFAULT_WEIGHTS


def load_model(spec: str | os.PathLike = "default", *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a medvae model for inference from a local file.

    Parameters
    ----------
    spec : "default", a checkpoint path or a local MLflow model folder logged by medvae (for
        ``runs:/ID/model`` and ``models:/NAME/VERSION`` use :func:`medvae.tracking.load_model`).
    device : where to put the model.

    Examples
    --------
    >>> lm = load_model("default")            # doctest: +SKIP
    >>> lm.model.config.spatial_dims          # doctest: +SKIP
    2
    """
    spec_s = str(spec)
    if not spec_s.strip():  # an unset "$MODEL": Path("") is the working folder, whose medvae.pt was loaded
        raise MedvaeError("the model name is empty: give default, a checkpoint file, a local MLflow model "
                          "folder or an MLflow model URI")
    if spec_s == "default":
        path = weights_path(spec_s)
    elif spec_s.startswith(("runs:/", "models:/")):
        raise MedvaeError("an MLflow model URI: load it with medvae.tracking.load_model, which resolves it "
                          "to a local file", spec_s)
    else:
        p = Path(spec_s)
        if p.is_dir():
            path = checkpoint_in_folder(p)
            if path is None:
                raise MedvaeError("folder is not a medvae MLflow model (no medvae.pt inside)", p)
        else:
            path = p
    lm = model_from_checkpoint(read_checkpoint(path), source=spec_s)
    lm.model.to(device)
    return lm


def _plain(value) -> str:
    """A config value as a YAML user writes it: ``[8, 16]``, not ``(8, 16)``."""
    return str(list(value)) if isinstance(value, (list, tuple)) else str(value)


def warm_start(model: MaskedVAE, path: str | os.PathLike) -> dict[str, int]:
    """Initialise ``model`` from the weights of the checkpoint at ``path`` (a fine-tune, or a model that
    grew: an extra input channel, a scale head, context units).

    A tensor of the same shape is copied. A tensor that grew along some dimensions gets the old values
    in its leading block and zeros elsewhere, so an added input channel or output channel starts
    switched off; tensors the checkpoint lacks keep their initialisation (the context units start as
    identities). Shrunk tensors are an error, and so are checkpoint tensors the model has no place for
    (fewer residual units, names with another prefix): the run started mostly untrained. So are other
    ``channels`` or ``latent_channels``: a widened layer's zeros would get no gradient. Returns the
    counts of copied, grown and new tensors.

    So build the model from the checkpoint's own configuration, grown: the shipped model, for one, has a
    noise-map input channel (image, mask and noise map: 3 channels into its first convolution), which a
    plain ``VAEConfig()`` lacks (an error), and two residual units a level. Here the shipped model grows
    a third context unit (built as an identity, so it restores as before):

    Examples
    --------
    >>> from dataclasses import replace
    >>> config = VAEConfig.from_dict(read_checkpoint(DEFAULT_WEIGHTS)["model_config"])
    >>> grown = MaskedVAE(replace(config, context_dilations=config.context_dilations + (8,)))
    >>> warm_start(grown, DEFAULT_WEIGHTS)
    {'copied': 142, 'grown': 0, 'new': 6}

    ``path`` may be ``"default"``, the shipped model (as in ``init_from: default``).
    """
    ckpt = read_checkpoint(weights_path(path))
    old = ckpt["state_dict"]
    dropped = sorted(set(old) - set(model.state_dict()))
    if dropped:  # a model smaller than the checkpoint (or with other names) started mostly untrained, exit 0
        raise MedvaeError(f"cannot warm-start: the model has no place for {len(dropped)} of the checkpoint's "
                          f"{len(old)} tensors (first: {dropped[0]}); build it from the checkpoint's own "
                          "model configuration, grown", path)
    saved = ckpt.get("model_config") or {}
    for key in ("channels", "latent_channels"):
        # zeros in a widened layer's new rows and columns get no gradient: the added width stayed 0.0
        # through training, exit 0, and the bigger model had the old one's capacity
        have, was = getattr(model.config, key, None), saved.get(key)
        if was is not None and have is not None and _plain(have) != _plain(was):
            raise MedvaeError(f"cannot warm-start: model.{key} is {_plain(have)}, the checkpoint's is {_plain(was)}; "
                              "a warm start does not widen layers (the added width would start at zero and never "
                              f"train): keep model.{key} {_plain(was)}, or train from scratch", path)
    counts = {"copied": 0, "grown": 0, "new": 0}
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name not in old:
                counts["new"] += 1
                continue
            if t.is_floating_point() and not old[name].is_floating_point():  # cast: most weights 0, exit 0
                raise MedvaeError(f"cannot warm-start: tensor {name} holds {old[name].dtype} values, the model "
                                  "needs floating-point weights", path)
            src = old[name].to(t.dtype)
            if src.shape == t.shape:
                t.copy_(src)
                counts["copied"] += 1
                continue
            if src.dim() != t.dim() or any(a > b for a, b in zip(src.shape, t.shape)):
                raise MedvaeError(f"cannot warm-start: tensor {name} has shape {tuple(src.shape)} in the "
                                  f"checkpoint, which does not fit the model's {tuple(t.shape)}", path)
            t.zero_()
            t[tuple(slice(0, n) for n in src.shape)].copy_(src)
            counts["grown"] += 1
    return counts
