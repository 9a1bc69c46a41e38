"""MLflow tracking at the edge of medvae.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/``, both relative to
the working directory. ``MLFLOW_TRACKING_URI`` or an explicit ``--tracking-uri`` (for example a
remote ``mlflow server``) overrides it.

Nothing that identifies a patient is logged: params come from configs and metrics, artifact
names are built by medvae (never from DICOM file names or tags), see :func:`safe_name`.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator, Mapping

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the explicit one, else ``MLFLOW_TRACKING_URI``, else the embedded default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def configure(uri: str | None = None) -> str:
    """Point mlflow at ``uri`` (see :func:`resolve_tracking_uri`) and return it.

    For the embedded sqlite default the ``mlruns/`` folder is created first, since sqlite will
    not create the parent directory of its database file.
    """
    import mlflow

    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def _experiment_id(name: str, uri: str) -> str:
    import mlflow

    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    kwargs = {}
    if uri.startswith("sqlite:///"):
        # artifacts beside the database, under mlruns/, whatever the server's default would be
        kwargs["artifact_location"] = Path("mlruns").resolve().as_uri()
    try:
        return mlflow.create_experiment(name, **kwargs)
    except Exception:  # created concurrently by another process
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


@contextlib.contextmanager
def start_run(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
) -> Iterator[Any]:
    """Open an MLflow run in ``experiment`` (or continue ``run_id``) and always close it."""
    import mlflow

    uri = configure(tracking_uri)
    if run_id:
        with mlflow.start_run(run_id=run_id) as run:
            yield run
        return
    exp_id = _experiment_id(experiment, uri)
    all_tags = {"medvae.git_commit": git_commit() or "unknown"}
    all_tags.update(tags or {})
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name, tags=all_tags) as run:
        yield run


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested config dicts to ``a.b.c`` keys, for ``mlflow.log_params``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


#: config keys whose values are user paths: logged as a digest, because file names can carry
#: patient names or IDs.
PATH_KEYS = ("data.paths", "data.val_paths", "data.exclude", "output_dir", "tracking.uri")


def config_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened config for ``mlflow.log_params``; path-valued keys become a short digest."""
    import hashlib

    params = flatten(config)
    for key in PATH_KEYS:
        if key in params:
            raw = repr(params.pop(key)).encode()
            params[f"{key}_sha1"] = hashlib.sha1(raw).hexdigest()[:12]
    return {k: (str(v)[:500] if isinstance(v, (list, tuple, dict)) else v) for k, v in params.items()}


def log_medvae_model(checkpoint: str | os.PathLike, *, name: str = "model") -> None:
    """Log an inference checkpoint as an MLflow model in the active run.

    The model is logged with the ``pytorch`` flavor (``serialization_format="pickle"``; MLflow 3's
    default ``pt2`` format needs fixed input shapes and rejects tuple outputs), so
    ``mlflow.pytorch.load_model`` works for users who trust the artifact. medvae itself reads only the
    ``medvae.pt`` weights file stored beside it, with ``torch.load(weights_only=True)``.
    """
    import shutil
    import tempfile

    import mlflow

    from medvae.models.checkpoint import MLFLOW_CHECKPOINT, load_model

    lm = load_model(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / MLFLOW_CHECKPOINT
        shutil.copyfile(checkpoint, extra)

        mlflow.pytorch.log_model(
            lm.model, name=name, serialization_format="pickle", extra_files=[str(extra)],
            # the recorded requirements would otherwise pin torch==X without +cpu, which pip resolves
            # to a multi-GB CUDA build; let the user's own torch stand
            pip_requirements=["torch", "monai", "medvae"],
        )


def git_commit() -> str | None:
    """The commit of the medvae checkout, or None outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip() or None
    except Exception:
        return None


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """An artifact or run name made only of safe characters. Callers must pass names that medvae
    built (``ct_series``, ``slice_012``), never file names or DICOM values."""
    return _SAFE.sub("_", name).strip("_") or "item"
