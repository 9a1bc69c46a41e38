"""MLflow tracking at the edge of medvae: the only package that imports mlflow.

Default store: ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/``, both relative to
the working directory. ``MLFLOW_TRACKING_URI`` or an explicit ``--tracking-uri`` (for example a
remote ``mlflow server``) overrides it.

Tracking fails soft and fast:

* a remote (``http``/``https``) server is checked once with a short timeout
  (:data:`CHECK_TIMEOUT_S`) before it is used; an unreachable one raises :class:`TrackingUnavailable`
  (URI and reason) instead of MLflow's minutes of retries and its traceback;
* unless the user set them, MLflow's own HTTP settings are shortened (:data:`HTTP_DEFAULTS`), so a
  server that dies later costs seconds, not minutes;
* :class:`RunLogger` (training) never lets a tracking failure stop the work: on the first failure it
  keeps every unsent record in ``tracking_pending.jsonl`` beside the checkpoints, and
  :func:`sync_pending` (``medvae track sync RUN_DIR``) sends them later, each record once;
* the first creation of the default sqlite store is serialized by a file lock, so two commands
  started at once both succeed.

Nothing that identifies a patient is logged: params come from configs and metrics, artifact
names are built by medvae (never from DICOM file names or tags), see :func:`safe_name`.

This package is the public face: import from ``medvae.tracking``. Its modules, each one concept
(mlflow is imported only inside their functions, so importing this package does not load it):

* :mod:`~medvae.tracking.uri`: which store a URI names, the default, :func:`redact`, :func:`check_uri`;
* :mod:`~medvae.tracking.outage`: reaching the server, :func:`check_server`, :func:`is_outage`,
  :class:`TrackingUnavailable`;
* :mod:`~medvae.tracking.store`: opening the store, :func:`configure`, :func:`client_for`,
  :func:`ensure_experiment`, the sqlite preparation and lock;
* :mod:`~medvae.tracking.runs`: :func:`start_run`, ``log_*``, :class:`RunLogger`, :func:`safe_name`;
* :mod:`~medvae.tracking.params`: :func:`config_params`, :func:`redacted_config` (paths digested);
* :mod:`~medvae.tracking.models`: :func:`log_medvae_model`, :func:`load_model` of ``runs:/`` and
  ``models:/`` URIs;
* :mod:`~medvae.tracking.pending`: the records kept offline, :func:`read_pending`, :func:`sync_pending`.
"""
from __future__ import annotations

from medvae.tracking.models import (ModelUnavailable, is_model_uri, load_model, log_medvae_model, model_checkpoint,
                                    pin_model_uri)
from medvae.tracking.outage import (
    CHECK_TIMEOUT_S,
    EXIT_TRACKING_SKIPPED,
    TrackingUnavailable,
    check_server,
    is_outage,
    outage_reason,
)
from medvae.tracking.params import PATH_KEYS, config_params, flatten, redacted_config
from medvae.tracking.pending import (
    PENDING_DIR,
    PENDING_FILE,
    RUN_ID_FILE,
    SYNCED_FILE,
    SyncResult,
    read_pending,
    sync_pending,
)
from medvae.tracking.runs import (
    RunLogger,
    git_commit,
    log_artifact,
    log_metrics,
    log_params,
    safe_name,
    start_run,
)
from medvae.tracking.store import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    HTTP_DEFAULTS,
    client_for,
    configure,
    ensure_experiment,
    mark_as_table,
)
from medvae.tracking.uri import (
    DATABASE_SCHEMES,
    DEFAULT_TRACKING_URI,
    SERVER_SCHEMES,
    _sqlite_path,  # noqa: F401  (medvae.commands.review uses tracking._sqlite_path)
    check_uri,
    redact,
    resolve_tracking_uri,
)

__all__ = [
    # uri
    "DEFAULT_TRACKING_URI", "DATABASE_SCHEMES", "SERVER_SCHEMES", "resolve_tracking_uri", "redact", "check_uri",
    # outage
    "EXIT_TRACKING_SKIPPED", "CHECK_TIMEOUT_S", "TrackingUnavailable", "check_server", "outage_reason", "is_outage",
    # store
    "HTTP_DEFAULTS", "EXPERIMENT_KIND_TAG", "EXPERIMENT_KIND", "configure", "client_for", "ensure_experiment",
    "mark_as_table",
    # runs
    "start_run", "log_params", "log_metrics", "log_artifact", "RunLogger", "git_commit", "safe_name",
    # params
    "PATH_KEYS", "flatten", "config_params", "redacted_config",
    # models
    "log_medvae_model", "model_checkpoint", "ModelUnavailable", "is_model_uri", "load_model", "pin_model_uri",
    # pending
    "PENDING_FILE", "PENDING_DIR", "SYNCED_FILE", "RUN_ID_FILE", "SyncResult", "read_pending", "sync_pending",
]
