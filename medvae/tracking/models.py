"""medvae models in MLflow: logging an inference checkpoint as an MLflow model, and loading one back
from a ``runs:/`` or ``models:/`` URI (only its ``medvae.pt`` weights are read).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from medvae.errors import MedvaeError
from medvae.tracking.outage import TrackingUnavailable, check_server, is_outage, outage_reason
from medvae.tracking.store import _http_defaults, scoped_env, sqlite_store_problem
from medvae.tracking.uri import _is_remote, _sqlite_path, resolve_tracking_uri


def log_medvae_model(checkpoint: str | os.PathLike, *, name: str = "model", run_id: str | None = None) -> None:
    """Log an inference checkpoint as an MLflow model in run ``run_id`` (default: the active run).

    The model is logged with the ``pytorch`` flavor (``serialization_format="pickle"``; MLflow 3's
    default ``pt2`` format needs fixed input shapes and rejects tuple outputs), so
    ``mlflow.pytorch.load_model`` works for users who trust the artifact. medvae itself reads only the
    ``medvae.pt`` weights file stored beside it, with ``torch.load(weights_only=True)``.
    """
    import hashlib
    import shutil
    import tempfile

    import mlflow

    from medvae.models.checkpoint import MLFLOW_CHECKPOINT, load_model

    lm = load_model(checkpoint)
    digest = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / MLFLOW_CHECKPOINT
        shutil.copyfile(checkpoint, extra)
        active = mlflow.active_run()
        # MLflow 3 files a logged model under the active run's experiment; runs:/ID/model finds it
        # only there, so the run is made active for the call
        reopen = bool(run_id) and (active is None or active.info.run_id != run_id)
        before = mlflow.MlflowClient().get_run(run_id).info if reopen else None
        with mlflow.start_run(run_id=run_id) if reopen else contextlib.nullcontext():
            # this checkpoint may be logged already: a run stopped after its log, then resumed
            run = mlflow.active_run()
            if run is None or not _settle_earlier_logs(run.info, name, digest):
                mlflow.pytorch.log_model(
                    lm.model, name=name, serialization_format="pickle", extra_files=[str(extra)],
                    # the recorded requirements would otherwise pin torch==X without +cpu, which pip
                    # resolves to a multi-GB CUDA build; let the user's own torch stand
                    pip_requirements=["torch", "monai", "medvae"],
                    tags={CHECKPOINT_TAG: digest},
                )
        if before is not None:  # leaving start_run ended it FINISHED now: a synced KILLED run said FINISHED
            client = mlflow.MlflowClient()
            if before.status == "RUNNING" or before.end_time is None:
                client.update_run(run_id, status=before.status)
            else:
                client.set_terminated(run_id, before.status, end_time=before.end_time)


#: tag of a logged model: the SHA-256 of the checkpoint file it was logged from
CHECKPOINT_TAG = "medvae.checkpoint_sha256"


def _settle_earlier_logs(run: Any, name: str, digest: str) -> bool:
    """Settle the logged models ``name`` of ``run`` that an earlier, stopped log left; True when one of
    them is this checkpoint (``digest``), READY: logging it again would list the model twice.

    A log stopped part-way (SIGTERM during the upload) left one PENDING, which the MLflow UI listed
    beside the one logged again: it is marked FAILED."""
    import mlflow

    client = mlflow.MlflowClient()
    done = False
    for m in client.search_logged_models(
            [run.experiment_id], filter_string=f"source_run_id = '{run.run_id}' AND name = '{name}'"):
        status = str(m.status).rsplit(".", 1)[-1]
        if status == "PENDING":
            client.finalize_logged_model(m.model_id, "FAILED")
        elif status == "READY" and (m.tags or {}).get(CHECKPOINT_TAG) == digest:
            done = True
    return done


def _reach(store: str) -> None:
    """Check the server in one short try (an unreachable one raises TrackingUnavailable at once, not after
    MLflow's retries, which take minutes), and shorten those retries for what follows."""
    check_server(store)
    if _is_remote(store):
        _http_defaults()


class ModelUnavailable(MedvaeError):
    """An MLflow model that may well exist could not be fetched: the store cannot be reached, or it failed
    or broke off the transfer (not a wrong URI). ``evaluate --model-uri`` then skips its check."""


def model_checkpoint(uri: str, *, tracking_uri: str | None = None, dst_path: str | os.PathLike | None = None) -> Path:
    """The local ``medvae.pt`` of an MLflow model URI (``runs:/ID/model``, ``models:/NAME/VERSION``).

    Nothing is created on the way: a sqlite store that does not exist is an error (not a new empty
    ``mlruns/mlflow.db``), and an unreachable server is reported within :data:`CHECK_TIMEOUT_S`.
    ``dst_path``: the folder the model is downloaded into (default: a new temporary folder of MLflow's,
    which is left behind; :func:`load_model` passes one that it removes). No progress bar is printed.

    Raises
    ------
    MedvaeError
        One line that names the URI and the reason.
    """
    import mlflow

    from medvae.models.checkpoint import MLFLOW_CHECKPOINT

    store = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(store)
    if db is not None and (not db.is_file() or db.stat().st_size == 0):  # nor an empty file filled by asking
        raise MedvaeError(f"no MLflow store at {db} to resolve it from; set --tracking-uri or "
                          f"MLFLOW_TRACKING_URI to the store that holds this model", uri)
    problem = None if db is None else sqlite_store_problem(store, db)
    if problem:  # asked anyway, MLflow filled another program's database with its tables
        raise MedvaeError(f"cannot fetch the MLflow model from {db}: {problem}", uri)
    try:
        _reach(store)
    except TrackingUnavailable as exc:
        raise ModelUnavailable(f"cannot fetch the MLflow model: {exc.uri} is unavailable ({exc.reason})", uri) from None
    mlflow.set_tracking_uri(store)  # models:/ resolves through the registry, which follows it
    if uri.startswith("runs:/"):  # a deleted run's artifacts stay until garbage collection: not a model to use
        run_id = uri[len("runs:/"):].split("/", 1)[0]
        try:
            stage = mlflow.MlflowClient(tracking_uri=store).get_run(run_id).info.lifecycle_stage
        except Exception:  # an unknown run: download_artifacts below names the reason
            stage = None
        if stage == "deleted":
            raise MedvaeError(f"the MLflow run {run_id} is deleted; restore it (mlflow runs restore) to use "
                              "its model", uri)
    elif uri.startswith("models:/"):  # a registered version of a deleted run restored without a word
        name, _, version = pin_model_uri(uri, tracking_uri=store)[len("models:/"):].rpartition("/")
        run_id = stage = None
        if version.isdigit():
            client = mlflow.MlflowClient(tracking_uri=store)
            try:
                run_id = client.get_model_version(name, version).run_id
                stage = client.get_run(run_id).info.lifecycle_stage if run_id else None
            except Exception:  # no such version, or no run behind it: download_artifacts names the reason
                stage = None
        if stage == "deleted":
            raise MedvaeError(f"model version {name}/{version} was logged by MLflow run {run_id}, which is deleted; "
                              "restore the run (mlflow runs restore) to use it", uri)
    try:
        with scoped_env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # a bar on stderr, even before an error
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, tracking_uri=store, dst_path=None if dst_path is None else str(dst_path)))
    except Exception as exc:
        failed = outage_reason(exc) if is_outage(exc) else None
        if failed is None and uri.startswith("runs:/"):
            # MLflow words every failed run download "please ensure that the path is correct", a server
            # error or a broken transfer too: the run's listing tells a wrong path from a failed fetch
            failed = _failed_run_download(uri, store)
        if failed is not None:
            raise ModelUnavailable(f"cannot fetch the MLflow model ({failed})", uri) from None
        reason = (str(exc).strip().splitlines() or [""])[0][:160]
        raise MedvaeError(f"cannot fetch the MLflow model ({reason})", uri) from None
    for cand in (local / "extra_files" / MLFLOW_CHECKPOINT, local / MLFLOW_CHECKPOINT):
        if cand.is_file():
            return cand
    found = sorted(local.rglob(MLFLOW_CHECKPOINT))
    if found:
        return found[0]
    unfinished = _unfinished_log(uri, store)
    if unfinished:  # medvae's own log cut off by an outage: not "another program's model"
        raise MedvaeError(f"the MLflow model's upload did not finish (status {unfinished}; no medvae.pt inside): "
                          "send the training's kept records with medvae track sync OUTPUT_DIR, then use the "
                          "model it logs", uri)
    raise MedvaeError("the MLflow model was not logged by medvae (no medvae.pt inside)", uri)


def _unfinished_log(uri: str, store: str) -> str | None:
    """The status (PENDING, FAILED) of the logged model ``runs:/ID/NAME`` names when no log of it
    finished, else None (finished, another kind of URI, or the store cannot say)."""
    import mlflow

    if not uri.startswith("runs:/"):
        return None
    run_id, _, name = uri[len("runs:/"):].strip("/").partition("/")
    try:
        client = mlflow.MlflowClient(tracking_uri=store)
        exp = client.get_run(run_id).info.experiment_id
        statuses = {str(m.status).rsplit(".", 1)[-1] for m in client.search_logged_models(
            [exp], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'")}
    except Exception:  # an old server without logged models, or gone again: the plain message
        return None
    if not statuses or "READY" in statuses:
        return None
    return "PENDING" if "PENDING" in statuses else sorted(statuses)[0]


def _failed_run_download(uri: str, store: str) -> str | None:
    """Why a ``runs:/ID/PATH`` download failed when the run lists ``PATH`` (the transfer, not the path),
    or the outage that listing it meets; None when the run does not list it (the path is wrong)."""
    import mlflow

    try:  # a logged model's files, or a run artifact folder's: none where the path is wrong
        listed = mlflow.artifacts.list_artifacts(artifact_uri=uri, tracking_uri=store)
    except Exception as exc:
        return outage_reason(exc) if is_outage(exc) else None
    if listed:
        return ("the run holds it, but its files could not be downloaded: the server failed or the transfer "
                "broke off; try again")
    return None


def is_model_uri(spec: Any) -> bool:
    """Whether ``spec`` is an MLflow model URI that :func:`model_checkpoint` resolves."""
    return isinstance(spec, str) and spec.startswith(("runs:/", "models:/"))


def load_model(spec: str | os.PathLike = "default", *, device: Any = "cpu", tracking_uri: str | None = None):
    """:func:`medvae.models.checkpoint.load_model`, plus MLflow model URIs (``runs:/``, ``models:/``).

    Examples
    --------
    >>> lm = load_model("models:/medvae-ct/3", tracking_uri="http://mlflow:5000")   # doctest: +SKIP
    """
    import tempfile

    from medvae.models import checkpoint

    if not is_model_uri(spec):
        return checkpoint.load_model(spec, device=device)
    # the download goes to a folder removed after loading (MLflow's own temporary folder stays behind:
    # a copy of the model per call); errors name the URI, not that folder
    with tempfile.TemporaryDirectory(prefix="medvae-model-") as tmp:
        path = model_checkpoint(str(spec), tracking_uri=tracking_uri, dst_path=tmp)
        try:
            lm = checkpoint.load_model(path, device=device)
        except MedvaeError as exc:
            raise MedvaeError(f"its {checkpoint.MLFLOW_CHECKPOINT}: {exc.message}", spec) from None
    lm.source = pin_model_uri(str(spec), tracking_uri=tracking_uri)
    return lm


def pin_model_uri(uri: str, *, tracking_uri: str | None = None) -> str:
    """``models:/NAME/latest``, ``models:/NAME/STAGE`` and ``models:/NAME@ALIAS`` as the
    ``models:/NAME/VERSION`` they name now, so that an output records which model made it; any other URI
    (or one the store cannot resolve) as given."""
    import warnings

    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    body = uri[len("models:/"):] if uri.startswith("models:/") else None
    if body is None or (body.rpartition("/")[2].isdigit() and "@" not in body):
        return uri
    store = resolve_tracking_uri(tracking_uri)
    db = _sqlite_path(store)
    if db is not None and (not db.is_file() or db.stat().st_size == 0 or sqlite_store_problem(store, db)):
        return uri  # no store to ask (and none to create, nor another program's database to fill, by asking)
    try:
        _reach(store)
    except TrackingUnavailable:
        return uri
    try:
        with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still name a version
            warnings.simplefilter("ignore")
            named = get_model_name_and_version(mlflow.MlflowClient(tracking_uri=store), uri)
    except Exception:  # an older server, a logged model's id: the URI as given, which still loaded
        return uri
    return f"models:/{named[0]}/{named[1]}" if len(named) == 2 else uri

