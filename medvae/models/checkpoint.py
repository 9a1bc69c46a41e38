"""Saving and loading medvae models, safely.

A checkpoint is a plain dict of tensors and primitives, written atomically and read with
``torch.load(weights_only=True)``: loading never unpickles code.

``load_model`` accepts

* ``"default"``: the model shipped inside the package (``medvae/weights/default.pt``);
* a path to a ``.pt`` checkpoint written by medvae (a training ``last.pt``/``best.pt`` works too);
* a local MLflow model folder logged by medvae, or ``runs:/<id>/model`` / ``models:/<name>/<version>``
  (the medvae checkpoint inside the model is read; the pickled MLflow flavor is never unpickled).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
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
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a medvae checkpoint with ``weights_only=True``; ``MedvaeError`` for anything else."""
    path = Path(path)
    if not path.is_file():
        raise MedvaeError("model file not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refused, truncated file, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MedvaeError(f"not a medvae model: torch.load(weights_only=True) refused it ({first[:160]})",
                          path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MedvaeError("not a medvae model (no medvae checkpoint header)", path)
    if int(ckpt.get("format_version", 0)) > FORMAT_VERSION:
        raise MedvaeError(f"checkpoint format {ckpt['format_version']} is newer than this medvae "
                          f"supports ({FORMAT_VERSION}); upgrade medvae", path)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], *, source: str) -> LoadedModel:
    """Build the model described by ``ckpt`` and load its weights, with clear errors on mismatch."""
    try:
        config = VAEConfig.from_dict(ckpt["model_config"])
        intensity = IntensityPolicy.from_dict(ckpt.get("intensity"))
    except (KeyError, TypeError, ValueError) as exc:
        raise MedvaeError(f"invalid model configuration in checkpoint: {exc}", source) from None
    model = MaskedVAE(config)
    _check_shapes(model, ckpt["state_dict"], source)
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    if missing or unexpected:
        raise MedvaeError(f"weights do not match the model configuration "
                          f"({len(missing)} missing, {len(unexpected)} unexpected tensors)", source)
    model.eval()
    return LoadedModel(model=model, intensity=intensity, source=source, meta=dict(ckpt.get("meta") or {}))


def _check_shapes(model: MaskedVAE, state: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    for k, v in state.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise MedvaeError(f"weights do not match the model configuration: tensor {k} has shape "
                              f"{tuple(v.shape)}, the model needs {tuple(own[k].shape)}", source)


def load_model(spec: str | os.PathLike = "default", *, device: str | torch.device = "cpu",
               tracking_uri: str | None = None) -> LoadedModel:
    """Load a medvae model for inference.

    Parameters
    ----------
    spec : "default", a checkpoint path, an MLflow model folder, ``runs:/ID/model`` or
        ``models:/NAME/VERSION``.
    device : where to put the model.
    tracking_uri : MLflow tracking URI for ``runs:/`` and ``models:/`` (default: see
        :func:`medvae.tracking.resolve_tracking_uri`).

    Examples
    --------
    >>> lm = load_model("default")            # doctest: +SKIP
    >>> lm.model.config.spatial_dims          # doctest: +SKIP
    2
    """
    spec_s = str(spec)
    if spec_s == "default":
        if not DEFAULT_WEIGHTS.is_file():
            raise MedvaeError("the default model weights are missing from this installation", DEFAULT_WEIGHTS)
        path = DEFAULT_WEIGHTS
    elif spec_s.startswith(("runs:/", "models:/")):
        path = _download_mlflow_checkpoint(spec_s, tracking_uri)
    else:
        p = Path(spec_s)
        if p.is_dir():
            candidates = [p / "extra_files" / MLFLOW_CHECKPOINT, p / MLFLOW_CHECKPOINT]
            path = next((c for c in candidates if c.is_file()), None)
            if path is None:
                raise MedvaeError("folder is not a medvae MLflow model (no medvae.pt inside)", p)
        else:
            path = p
    lm = model_from_checkpoint(read_checkpoint(path), source=spec_s)
    lm.model.to(device)
    return lm


def _download_mlflow_checkpoint(uri: str, tracking_uri: str | None) -> Path:
    import mlflow

    from medvae.tracking import configure

    configure(tracking_uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as exc:
        raise MedvaeError(f"cannot fetch the MLflow model ({str(exc).splitlines()[0][:160]})", uri) from None
    for cand in (local / "extra_files" / MLFLOW_CHECKPOINT, local / MLFLOW_CHECKPOINT):
        if cand.is_file():
            return cand
    found = list(local.rglob(MLFLOW_CHECKPOINT))
    if found:
        return found[0]
    raise MedvaeError("the MLflow model was not logged by medvae (no medvae.pt inside)", uri)
