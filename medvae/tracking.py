"""MLflow tracking at the edge of medvae: the only module that imports mlflow.

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
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit, urlunsplit

from medvae.errors import MedvaeError

log = logging.getLogger("medvae.tracking")

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"

#: exit status of a command whose local outputs were written but whose MLflow logging was skipped
#: because the tracking server could not be reached (bad input is 2)
EXIT_TRACKING_SKIPPED = 3

#: seconds the one reachability check of a remote server may take
CHECK_TIMEOUT_S = 3.0

#: MLflow's HTTP settings used unless the environment sets them: one retry, 10 s per request
#: (MLflow's own defaults, 7 retries with exponential backoff and 120 s, stall for minutes)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

#: experiment tag that makes MLflow 3's UI open an experiment in its model-training view
#: (the value the UI itself writes when a user picks "machine learning"); without it, MLflow 3
#: guesses and shows medvae's runs in the GenAI view (traces, "no data")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: records that could not be sent, one JSON object a line, beside the checkpoints
PENDING_FILE = "tracking_pending.jsonl"
#: files (figures) kept for those records
PENDING_DIR = "tracking_pending"
#: what ``medvae track sync`` has sent: the run and the number of records
SYNCED_FILE = "tracking_synced.json"
#: the MLflow run of a training output folder (used by --resume and by sync)
RUN_ID_FILE = "mlflow_run_id"

#: tracking-store URI schemes MLflow 3 opens, as registered by
#: ``mlflow.tracking._tracking_service.utils._register_tracking_stores`` (see also
#: https://mlflow.org/docs/latest/self-hosting/architecture/backend-store): SQLAlchemy databases
#: (a driver may follow, ``postgresql+psycopg2``), a tracking server, Databricks and Unity Catalog.
#: File stores (a plain folder, ``file:``) are refused by MLflow 3 unless ``MLFLOW_ALLOW_FILE_STORE``
#: is set; plugins add their schemes through the ``mlflow.tracking_store`` entry points.
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SERVER_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")
#: default ports of the database servers, for the reachability check
_DB_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
#: the first 16 bytes of every sqlite database file
_SQLITE_MAGIC = b"SQLite format 3\x00"


class TrackingUnavailable(Exception):
    """The tracking server could not be used; the work itself went on.

    Parameters
    ----------
    uri : the tracking URI (credentials removed).
    reason : why, in a few words (``connection refused``, ``no answer within 3 s``, ``HTTP 503``).
    """

    def __init__(self, uri: str, reason: str) -> None:
        self.uri, self.reason = redact(uri), " ".join(str(reason).split())
        super().__init__(f"tracking skipped: {self.uri} is unavailable ({self.reason})")


# -- URIs and the store -----------------------------------------------------------------------------

def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: the explicit one, else ``MLFLOW_TRACKING_URI``, else the embedded default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def redact(uri: str) -> str:
    """``uri`` without a user name or password, for messages and files."""
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _is_remote(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in ("http", "https")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _scheme(uri: str) -> str:
    """The store kind of ``uri`` as MLflow picks it: ``postgresql`` for ``postgresql+psycopg2://``,
    ``""`` for a plain path (a Windows drive letter included)."""
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow takes these bare words as URIs
        return uri
    try:
        scheme = urlsplit(uri).scheme.lower()
    except ValueError:
        return ""
    if len(scheme) == 1:
        return ""
    return scheme.split("+", 1)[0]


def _plugin_schemes() -> set[str]:
    """Schemes that installed MLflow plugins add (``mlflow.tracking_store`` entry points)."""
    from importlib.metadata import entry_points

    try:
        return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # a broken distribution's metadata must not stop the check
        return set()


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("true", "1")


def check_uri(uri: str) -> None:
    """Raise a one-line :class:`MedvaeError` unless ``uri`` names a tracking store MLflow 3 opens.

    Checked without contacting anything (and without mlflow), so a typo is refused at once rather
    than as MLflow's registry traceback; whether the store itself opens is checked when it is opened.

    Examples
    --------
    >>> check_uri("sqlite:///mlruns/mlflow.db")
    >>> check_uri("foo://bar")   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medvae.errors.MedvaeError: foo://bar: not an MLflow tracking URI: unknown scheme 'foo' (...)
    """
    scheme = _scheme(uri)
    where = redact(uri)
    if scheme in ("", "file"):
        if _env_true("MLFLOW_ALLOW_FILE_STORE"):  # MLflow's own opt-out of its refusal
            return
        raise MedvaeError("a folder (file store) is not a tracking store MLflow 3 opens; use a database "
                          "such as sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)", where)
    if scheme in ("http", "https"):
        try:
            parts = urlsplit(uri)
            ok = bool(parts.hostname) and (parts.port is None or parts.port > 0)
        except ValueError:  # a port out of range, a broken IPv6 address
            ok = False
        if not ok:
            raise MedvaeError(f"not a tracking server URL (expected {scheme}://HOST[:PORT])", where)
        return
    if scheme in DATABASE_SCHEMES or scheme in SERVER_SCHEMES or scheme in _plugin_schemes():
        return
    known = ", ".join((*DATABASE_SCHEMES, *SERVER_SCHEMES))
    raise MedvaeError(f"not an MLflow tracking URI: unknown scheme {scheme!r} (MLflow opens {known})", where)


def _os_reason(exc: OSError) -> str:
    return (exc.strerror or type(exc).__name__).strip()


def _prepare_sqlite(uri: str, db: Path) -> None:
    """Create the folder of a sqlite store and refuse what sqlite cannot open, before MLflow tries:
    its engine retries "unable to open database file" for about 100 s, then raises a SQLAlchemy
    traceback."""
    def fail(reason: str) -> None:
        raise MedvaeError(f"cannot open the MLflow store: {reason}", redact(uri))

    if db.is_dir():
        fail("it is a folder, not an sqlite database file")
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot create the folder {db.parent} ({_os_reason(exc)})")
    if db.exists():
        try:
            with open(db, "rb") as fh:
                head = fh.read(len(_SQLITE_MAGIC))
        except OSError as exc:
            fail(f"cannot read the database file ({_os_reason(exc)})")
        if head and head != _SQLITE_MAGIC:  # an empty file is an empty database to sqlite
            fail("the file is not an sqlite database")
        if not os.access(db, os.R_OK | os.W_OK):
            fail("no permission to write the database file")
    elif not os.access(db.parent, os.W_OK | os.X_OK):
        fail(f"no permission to create the database in {db.parent}")


def _store_reason(exc: BaseException) -> str:
    """A few words on why a store did not open, without SQL, links or credentials."""
    orig = getattr(exc, "orig", None)  # SQLAlchemy wraps the driver's error and adds SQL and a link
    if isinstance(orig, BaseException):
        exc = orig
    if isinstance(exc, ModuleNotFoundError):
        return f"its database driver is not installed ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror + (f": {exc.filename}" if exc.filename else "")
    else:
        text = str(getattr(exc, "message", None) or exc)  # MlflowException: the message without its code
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return re.sub(r"://[^/@\s]*@", "://", first)[:200]


def _is_db_outage(uri: str, exc: BaseException) -> bool:
    """Whether a database server (not a local sqlite file) could not be reached."""
    if _scheme(uri) not in _DB_PORTS:
        return False
    low = str(exc).lower()
    return any(s in low for s in ("connection refused", "could not connect", "can't connect", "timed out",
                                  "timeout expired", "could not translate host name", "server closed the connection"))


def _store_failure(uri: str, exc: BaseException) -> Exception:
    """What to raise for ``exc``, met while opening the store at ``uri``: :class:`TrackingUnavailable`
    for a server that cannot be reached (the soft exit-3 path), else a one-line :class:`MedvaeError`
    (not a database, a missing driver, a refused request)."""
    if isinstance(exc, (TrackingUnavailable, MedvaeError)):
        return exc
    if is_outage(exc) or _is_db_outage(uri, exc):
        return TrackingUnavailable(uri, outage_reason(exc))
    return MedvaeError(f"cannot open the MLflow store: {_store_reason(exc)}", redact(uri))


def _portable(uri: str) -> str:
    """``uri`` as it can be used from any folder: a relative sqlite path made absolute, no credentials."""
    db = _sqlite_path(uri)
    if db is not None and not db.is_absolute():
        return "sqlite:///" + str(db.resolve())
    return redact(uri)


def check_server(uri: str, *, timeout: float = CHECK_TIMEOUT_S) -> None:
    """Raise :class:`TrackingUnavailable` unless a remote tracking server answers within ``timeout``.

    ``http``/``https`` URIs get one ``GET /health``; any answer below HTTP 500, an authentication
    request included, counts as reachable, except a 404 (no MLflow server there). A database server
    (``postgresql``, ``mysql``, ``mssql``) gets one TCP connection to its port, since MLflow would
    retry its engine for minutes. Local stores are not checked.

    Examples
    --------
    >>> check_server("sqlite:///mlruns/mlflow.db")      # local: nothing to check
    >>> check_server("http://127.0.0.1:9", timeout=1)   # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    medvae.tracking.TrackingUnavailable: tracking skipped: http://127.0.0.1:9 is unavailable (connection refused)
    """
    if _scheme(uri) in _DB_PORTS:
        _check_database_server(uri, timeout)
        return
    if not _is_remote(uri):
        return
    import requests

    try:
        resp = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.exceptions.Timeout:
        raise TrackingUnavailable(uri, f"no answer within {timeout:g} s") from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema,
            requests.exceptions.MissingSchema) as exc:  # a typo in the URI, not an outage
        raise MedvaeError(f"not a tracking server URL ({outage_reason(exc)})", redact(uri)) from None
    except requests.exceptions.RequestException as exc:
        raise TrackingUnavailable(uri, outage_reason(exc)) from None
    if resp.status_code >= 500:
        raise TrackingUnavailable(uri, f"HTTP {resp.status_code} {resp.reason or ''}".strip())
    if resp.status_code == 404:  # something answers, but it is not an MLflow server
        raise TrackingUnavailable(uri, "HTTP 404 on /health: no MLflow server at this address")


def _check_database_server(uri: str, timeout: float) -> None:
    """Raise :class:`TrackingUnavailable` unless the database server of ``uri`` accepts a TCP connection."""
    import socket

    try:
        parts = urlsplit(uri)
        host, port = parts.hostname, parts.port or _DB_PORTS[_scheme(uri)]
    except ValueError:
        raise MedvaeError("not a database URL (bad host or port)", redact(uri)) from None
    if not host:  # a local socket (``postgresql:///db?host=/run/postgresql``): nothing to dial
        return
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except TimeoutError:
        raise TrackingUnavailable(uri, f"no answer within {timeout:g} s") from None
    except socket.gaierror:
        raise TrackingUnavailable(uri, "unknown host") from None
    except OSError as exc:
        raise TrackingUnavailable(uri, outage_reason(exc)) from None


def outage_reason(exc: BaseException) -> str:
    """A few words from a connection error (MLflow's or requests'), without its nested repr."""
    text = str(exc)
    low = text.lower()
    if "connection refused" in low:
        return "connection refused"
    if "timed out" in low or "timeout" in low:
        return "timed out"
    if "name or service not known" in low or "nodename nor servname" in low or "failed to resolve" in low:
        return "unknown host"
    code = re.search(r"failed with error code (\d+)", text)
    if code:
        return f"HTTP {code.group(1)}"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if m:
        return m.group(1).strip().lower()
    if "remote end closed" in low or "connection aborted" in low or "connection reset" in low:
        return "connection lost"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:160]


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` says the tracking server could not be reached (rather than a bad request)."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # mlflow is not installed (a bare GPU node): the records are kept, not sent
        return False
    if isinstance(exc, requests.exceptions.RequestException):
        return True

    if isinstance(exc, MlflowException):
        text = str(exc)
        return (text.startswith("API request to") or "Max retries exceeded" in text
                or exc.error_code in ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"))
    return False


def _http_defaults() -> None:
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


_LOCKED: set[str] = set()  # store folders this process holds the lock of


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on the folder of a sqlite store while it is created or migrated.

    MLflow creates and migrates the schema on first use; two processes doing it at once make one
    of them die in alembic ("Online migration expected to match one row").
    """
    db = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        fcntl = None  # type: ignore[assignment]
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    folder = str(db.parent.resolve()) if db is not None else ""
    if db is None or fcntl is None or folder in _LOCKED:  # re-entrant: flock would wait for itself
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _LOCKED.add(folder)
        yield
    finally:
        _LOCKED.discard(folder)
        os.close(fd)  # closing releases the lock


def configure(uri: str | None = None) -> str:
    """Point mlflow at ``uri`` (see :func:`resolve_tracking_uri`) and return it.

    For the embedded sqlite default the ``mlruns/`` folder is created first, since sqlite will
    not create the parent directory of its database file; for remote URIs MLflow's HTTP retries
    and timeout are shortened unless set in the environment (:data:`HTTP_DEFAULTS`).

    Raises
    ------
    MedvaeError
        ``uri`` is not a store MLflow opens (:func:`check_uri`), or names a sqlite database that
        cannot be opened (a folder, another kind of file, a folder that cannot be created).
    """
    uri = resolve_tracking_uri(uri)
    check_uri(uri)
    import mlflow

    db = _sqlite_path(uri)
    if db is not None:
        _prepare_sqlite(uri, db)
    if _is_remote(uri):
        _http_defaults()
    mlflow.set_tracking_uri(uri)
    return uri


def client_for(uri: str):
    """An ``MlflowClient`` for ``uri``; a new sqlite store is created and migrated under :func:`_store_lock`.

    Raises
    ------
    MedvaeError
        The store does not open (not a database, a missing driver): one line naming the URI.
    TrackingUnavailable
        Its server cannot be reached.
    """
    import mlflow

    try:
        with _store_lock(uri):
            return mlflow.MlflowClient(tracking_uri=uri)
    except Exception as exc:  # sqlite and database stores are opened (and migrated) right here
        raise _store_failure(uri, exc) from None


def ensure_experiment(name: str, uri: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``, created (model-training view) if new.

    Creating the store, its schema and the experiment happens under :func:`_store_lock`, so
    concurrent first uses of one sqlite store all succeed.

    Raises
    ------
    MedvaeError, TrackingUnavailable
        As :func:`client_for`; a remote server is first asked here, so its refusals (permissions,
        a bad experiment name) are one-line errors too.
    """
    try:
        with _store_lock(uri):
            client = client_for(uri)
            exp = client.get_experiment_by_name(name)
            if exp is None:
                kwargs: dict[str, Any] = {}
                db = _sqlite_path(uri)
                if db is not None:
                    # artifacts in the database's folder (mlruns/ for the default store), whatever the working
                    # folder: a run started elsewhere must not scatter them, nor lose them with that folder
                    kwargs["artifact_location"] = db.resolve().parent.as_uri()
                try:
                    return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}, **kwargs)
                except Exception:  # created concurrently (another host on a shared server)
                    exp = client.get_experiment_by_name(name)
                    if exp is None:
                        raise
            if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older medvae
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
    except Exception as exc:
        raise _store_failure(uri, exc) from None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _run_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    all_tags = {"medvae.git_commit": git_commit() or "unknown"}
    all_tags.update(tags or {})
    return all_tags


@contextlib.contextmanager
def start_run(
    experiment: str,
    *,
    tracking_uri: str | None = None,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    start_time: float | None = None,
) -> Iterator[Any]:
    """Open an MLflow run in ``experiment`` (or continue ``run_id``) and always close it.

    Parameters
    ----------
    start_time : when the work began (``time.time()``); the run starts then, so its duration in
        the MLflow UI is the duration of the work, not of the logging at its end.

    Raises
    ------
    TrackingUnavailable
        The server is unreachable (checked first, within :data:`CHECK_TIMEOUT_S`), or stopped
        answering while the run was logged.
    MedvaeError
        The URI is not an MLflow store, or the store does not open (one line naming the URI).

    Examples
    --------
    >>> with start_run("evaluation", run_name="evaluate_ct") as run:   # doctest: +SKIP
    ...     mlflow.log_metric("psnr_image", 31.2)
    """
    import mlflow

    uri = configure(tracking_uri)
    check_server(uri)
    try:
        if not run_id:
            exp_id = ensure_experiment(experiment, uri)
            created = client_for(uri).create_run(
                exp_id, start_time=int(start_time * 1000) if start_time else None,
                tags=_run_tags(tags), run_name=run_name)
            run_id = created.info.run_id
        with mlflow.start_run(run_id=run_id) as run:
            yield run
    except Exception as exc:
        if is_outage(exc):
            raise TrackingUnavailable(uri, outage_reason(exc)) from None
        raise


def log_params(params: Mapping[str, Any]) -> None:
    """Log params to the run opened by :func:`start_run` (commands never import mlflow themselves)."""
    import mlflow

    mlflow.log_params(dict(params))


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log metrics to the run opened by :func:`start_run`."""
    import mlflow

    mlflow.log_metrics(dict(metrics), step=step)


def log_artifact(path: str | os.PathLike, artifact_path: str | None = None) -> None:
    """Log a file that medvae wrote (never a user's file name) to the run opened by :func:`start_run`."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


# -- params -----------------------------------------------------------------------------------------

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
PATH_KEYS = ("data.paths", "data.val_paths", "data.exclude", "data.manifest", "data.store", "init_from",
             "output_dir", "tracking.uri")


def _digest(value: Any) -> str:
    import hashlib

    return hashlib.sha1(repr(value).encode()).hexdigest()[:12]


def config_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened config for ``mlflow.log_params``; path-valued keys become a short digest."""
    params = flatten(config)
    for key in PATH_KEYS:
        if key in params:
            params[f"{key}_sha1"] = _digest(params.pop(key))
    return {k: (str(v)[:500] if isinstance(v, (list, tuple, dict)) else v) for k, v in params.items()}


def redacted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A nested config with the values of :data:`PATH_KEYS` replaced by ``"sha1:<digest>"``: what a
    checkpoint sent to MLflow may carry (its paths can hold patient names).

    Examples
    --------
    >>> redacted_config({"data": {"paths": ["DOE^JANE/ct"], "patch_size": 128}})["data"]
    {'paths': 'sha1:0e7c34d80029', 'patch_size': 128}
    """
    def walk(d: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            key = f"{prefix}{k}"
            if isinstance(v, Mapping):
                out[k] = walk(v, key + ".")
            else:
                out[k] = f"sha1:{_digest(v)}" if key in PATH_KEYS and v not in (None, [], "") else v
        return out

    return walk(config, "")


# -- models -----------------------------------------------------------------------------------------

def log_medvae_model(checkpoint: str | os.PathLike, *, name: str = "model", run_id: str | None = None) -> None:
    """Log an inference checkpoint as an MLflow model in run ``run_id`` (default: the active run).

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
        active = mlflow.active_run()
        # MLflow 3 files a logged model under the active run's experiment; runs:/ID/model finds it
        # only there, so the run is made active for the call (its status is set again at its end)
        ctx = (mlflow.start_run(run_id=run_id) if run_id and (active is None or active.info.run_id != run_id)
               else contextlib.nullcontext())
        with ctx:
            mlflow.pytorch.log_model(
                lm.model, name=name, serialization_format="pickle", extra_files=[str(extra)],
                # the recorded requirements would otherwise pin torch==X without +cpu, which pip resolves
                # to a multi-GB CUDA build; let the user's own torch stand
                pip_requirements=["torch", "monai", "medvae"],
            )


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
    if db is not None and not db.is_file():
        raise MedvaeError(f"no MLflow store at {db} to resolve it from; set --tracking-uri or "
                          f"MLFLOW_TRACKING_URI to the store that holds this model", uri)
    try:
        check_server(store)
    except TrackingUnavailable as exc:
        raise MedvaeError(f"cannot fetch the MLflow model: {exc.uri} is unavailable ({exc.reason})", uri) from None
    if _is_remote(store):
        _http_defaults()
    mlflow.set_tracking_uri(store)  # models:/ resolves through the registry, which follows it
    try:
        with _env(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # a bar on stderr, even before an error
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=uri, tracking_uri=store, dst_path=None if dst_path is None else str(dst_path)))
    except Exception as exc:
        reason = outage_reason(exc) if is_outage(exc) else (str(exc).strip().splitlines() or [""])[0][:160]
        raise MedvaeError(f"cannot fetch the MLflow model ({reason})", uri) from None
    for cand in (local / "extra_files" / MLFLOW_CHECKPOINT, local / MLFLOW_CHECKPOINT):
        if cand.is_file():
            return cand
    found = sorted(local.rglob(MLFLOW_CHECKPOINT))
    if found:
        return found[0]
    raise MedvaeError("the MLflow model was not logged by medvae (no medvae.pt inside)", uri)


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
    lm.source = str(spec)
    return lm


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a block, then put back what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- training runs that never stop the work -----------------------------------------------------------

class RunLogger:
    """One MLflow run for a long job, kept locally whenever the server cannot take it.

    :meth:`check` (optional, before the work begins) reaches the server without creating anything, so
    that an unreachable one is reported at once rather than when the work is done. The run starts at
    :meth:`start`. Every call after that either reaches the server or is appended to
    ``folder/tracking_pending.jsonl`` (figures saved under ``folder/tracking_pending/``). The first
    failure (of :meth:`check` too) switches the logger to local-only for the rest of the job, with one
    warning: a server that died is not waited for again. :func:`sync_pending` sends the pending
    records later.

    Parameters
    ----------
    folder : the job's output folder (checkpoints); the run id is kept in ``folder/mlflow_run_id``.
    experiment, tracking_uri, run_name, tags : as for :func:`start_run`.
    resume : continue the run recorded in ``folder/mlflow_run_id``.

    Examples
    --------
    >>> run = RunLogger("runs/ct", experiment="medvae-train")     # doctest: +SKIP
    >>> run.check()                                               # doctest: +SKIP
    True
    >>> run.start(); run.log_metrics({"train_loss": 0.1}, step=1); run.end("FINISHED")  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, *, experiment: str, tracking_uri: str | None = None,
                 run_name: str | None = None, tags: Mapping[str, str] | None = None,
                 resume: bool = False) -> None:
        self.folder = Path(folder)
        self.experiment, self.run_name, self.tags = experiment, run_name, dict(tags or {})
        self.uri = resolve_tracking_uri(tracking_uri)
        self.resume = resume
        self.run_id: str | None = None
        self.online = False
        self.unavailable: TrackingUnavailable | None = None
        self.start_time = _now_ms()
        self._client = None
        self._header_kept = False
        self.started = False
        self._logged: dict[str, int] = {}   # a continued run: the last step of each metric it holds

    @property
    def pending(self) -> Path:
        return self.folder / PENDING_FILE

    # sending, or keeping ---------------------------------------------------------------------------
    def check(self) -> bool:
        """Check the URI and reach a remote server now (:func:`check_uri`, :func:`check_server`: at most
        3 s, nothing created or written), before the work begins. When that fails, go local-only at
        once with the one warning (unreachable; where the records are kept; how to send them later),
        so the user learns it at the start of a long job rather than at its end. Returns whether the
        server answered."""
        try:
            check_uri(self.uri)
            check_server(self.uri)
        except Exception as exc:  # as in start(): tracking never stops the work
            self._go_offline(exc)
            return False
        return True

    def start(self) -> None:
        """Create (or continue) the run, dated from when this logger was made (when the work began);
        go local-only if the server cannot be reached (or :meth:`check` found it unreachable)."""
        self.started = True
        self.folder.mkdir(parents=True, exist_ok=True)
        run_file = self.folder / RUN_ID_FILE
        previous = run_file.read_text().strip() if self.resume and run_file.is_file() else None
        if self.unavailable is not None:  # check() said so already: no second try, no second warning
            self.run_id = previous
            self._keep_header()
            self._header_kept = True
            return
        try:
            uri = configure(self.uri)
            check_server(uri)
            self._client = client_for(uri)
            if previous:
                try:
                    self._client.update_run(previous, status="RUNNING")
                    self.run_id = previous
                    self._logged = self._last_steps()
                except Exception as exc:
                    if is_outage(exc):
                        raise
                    log.warning("MLflow run %s of %s is gone from %s; logging to a new run",
                                previous, self.folder, redact(uri))
            if not self.run_id:
                exp_id = ensure_experiment(self.experiment, uri)
                self.run_id = self._client.create_run(exp_id, start_time=self.start_time, tags=_run_tags(self.tags),
                                                      run_name=self.run_name).info.run_id
                run_file.write_text(self.run_id)
            self.online = True
        except Exception as exc:
            self._go_offline(exc)
            self.run_id = previous
        if not self.online:
            self._keep_header()
            self._header_kept = True

    def _last_steps(self) -> dict[str, int]:
        """The last logged step of each metric of the continued run: a resumed job replays the steps
        after its last checkpoint, which the interrupted one may have logged already."""
        try:
            keys = self._client.get_run(self.run_id).data.metrics
            return {k: max((m.step for m in self._client.get_metric_history(self.run_id, k)), default=-1)
                    for k in keys}
        except Exception as exc:  # an older server, a hiccup: duplicates are better than a stop
            log.warning("could not read the logged steps of MLflow run %s (%s); replayed steps may be logged "
                        "twice", self.run_id, outage_reason(exc))
            return {}

    def _go_offline(self, exc: BaseException) -> None:
        self.online = False
        if isinstance(exc, TrackingUnavailable):
            self.unavailable = exc
        elif isinstance(exc, MedvaeError):  # a bad URI or store: its message already names the problem
            self.unavailable = TrackingUnavailable(self.uri, exc.message)
        else:
            self.unavailable = TrackingUnavailable(
                self.uri, outage_reason(exc) if is_outage(exc) else f"{type(exc).__name__}: {outage_reason(exc)}")
        log.warning("%s; the work goes on and keeps its MLflow records in %s; send them later with: "
                    "medvae track sync %s", self.unavailable, self.pending, self.folder)

    def _keep_header(self) -> None:
        """The first kept record says which run the others belong to (once per file)."""
        if self.pending.is_file() and any(isinstance(r, dict) and r.get("kind") == "run"
                                          for r in read_pending(self.folder)):
            return
        self._append({"kind": "run", "experiment": self.experiment, "uri": _portable(self.uri),
                      "run_name": self.run_name, "tags": _run_tags(self.tags), "run_id": self.run_id,
                      "start_time": self.start_time})

    def _keep(self, record: dict[str, Any]) -> None:
        if not self._header_kept:
            self._keep_header()
            self._header_kept = True
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.pending, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _send(self, record: dict[str, Any], send) -> None:
        if self.online:
            try:
                send()
                return
            except Exception as exc:  # never let tracking stop the work
                self._go_offline(exc)
        self._keep(record)

    # the logging API ---------------------------------------------------------------------------------
    # mlflow is imported only to send: a machine without it keeps the records (a bare GPU node)
    def log_params(self, params: Mapping[str, Any]) -> None:
        params = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in params.items()}

        def send() -> None:
            from mlflow.entities import Param

            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

        self._send({"kind": "params", "params": params}, send)

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        import math

        values = {k: float(v) for k, v in metrics.items()
                  if math.isfinite(float(v)) and int(step) > self._logged.get(k, -1)}
        if not values:
            return
        ts = _now_ms()

        def send() -> None:
            from mlflow.entities import Metric

            self._client.log_batch(self.run_id, metrics=[Metric(k, v, ts, int(step)) for k, v in values.items()])

        self._send({"kind": "metrics", "metrics": values, "step": int(step), "timestamp": ts}, send)

    def log_figure(self, fig, name: str) -> None:
        """Log a matplotlib figure as the artifact ``name`` (a relative ``.png`` path) and close it."""
        import matplotlib.pyplot as plt

        def keep_file() -> None:
            local = self.folder / PENDING_DIR / name
            local.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(local)
            parent = str(Path(name).parent)
            self._keep({"kind": "artifact", "path": str(local.relative_to(self.folder)),
                        "artifact_path": None if parent == "." else parent})

        try:
            if self.online:
                try:
                    self._client.log_figure(self.run_id, fig, name)
                    return
                except Exception as exc:
                    self._go_offline(exc)
            keep_file()
        finally:
            plt.close(fig)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file of the output folder (a checkpoint) as an artifact."""
        path = Path(path)
        rel = os.path.relpath(path, self.folder)
        self._send({"kind": "artifact", "path": rel, "artifact_path": artifact_path},
                   lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, model_pt: str | os.PathLike, name: str = "model") -> None:
        """Log an inference checkpoint as an MLflow model (see :func:`log_medvae_model`)."""
        rel = os.path.relpath(model_pt, self.folder)
        self._send({"kind": "model", "path": rel, "name": name},
                   lambda: log_medvae_model(model_pt, name=name, run_id=self.run_id))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` with the real end time."""
        end = _now_ms()
        self._send({"kind": "end", "status": status, "end_time": end},
                   lambda: self._client.set_terminated(self.run_id, status, end_time=end))


# -- sending kept records later -------------------------------------------------------------------------

@dataclass
class SyncResult:
    run_id: str
    uri: str
    sent: int              # records sent now
    already: int           # records sent by an earlier sync
    metric_values: int     # metric values among those sent now
    new_run: bool          # the run did not exist on the server and was created


def _pending_lines(folder: str | os.PathLike) -> tuple[list[tuple[int, Any]], list[int]]:
    """``(line number, record)`` of every JSON line of ``folder/tracking_pending.jsonl``, and the
    numbers of the lines that are not JSON (a write cut short by a kill)."""
    path = Path(folder) / PENDING_FILE
    if not path.is_file():
        return [], []
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MedvaeError(f"cannot read the kept tracking records ({_os_reason(exc)})", path) from None
    records: list[tuple[int, Any]] = []
    bad: list[int] = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((n, json.loads(line)))
        except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
            bad.append(n)
    return records, bad


def read_pending(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The records kept in ``folder/tracking_pending.jsonl`` (a line cut short by a kill is dropped)."""
    return [rec for _, rec in _pending_lines(folder)[0]]


def _write_json_atomic(path: Path, obj: Any) -> None:
    from medvae.io.atomic import atomic_output

    with atomic_output(path, kind="file", overwrite=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


# MLflow's rules for param, metric and tag names (mlflow.utils.validation), checked before anything is
# sent so that a damaged record stops the sync before the first record, not half-way
_MLFLOW_NAME = re.compile(r"^[/\w.\- :]+$")
_MAX_NAME = 250
_MAX_PARAM_VALUE = 6000
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _name_problem(what: str, name: Any) -> str | None:
    if not isinstance(name, str) or not name:
        return f"a {what} name must be a non-empty string, got {name!r}"[:160]
    if len(name) > _MAX_NAME or not _MLFLOW_NAME.match(name):
        return f"{what} name {name[:80]!r} is not one MLflow accepts (letters, digits, _ - . : / and spaces)"
    norm = posixpath.normpath(name)
    if norm != name or norm.startswith(("..", "/")):
        return f"{what} name {name[:80]!r} is not one MLflow accepts (it is a path)"
    return None


def _entries_problem(rec: dict, field: str, what: str, ok, bad) -> str | None:
    """The problem of a record's ``field`` (``params``/``metrics``): an object of valid names whose
    values pass ``ok``; ``bad(name, value)`` words a value that does not."""
    entries = rec.get(field)
    if not isinstance(entries, dict):
        return f"a {field} record needs \"{field}\": an object of names and {what}"
    for k, v in entries.items():
        problem = _name_problem(field[:-1], k)
        if problem:
            return problem
        if not ok(v):
            return bad(k, v)
    return None


def _record_problem(rec: Any) -> str | None:
    """What is wrong with one kept record, in a few words, or None."""
    if not isinstance(rec, dict):
        return "not a record (a JSON object expected)"
    kind = rec.get("kind")
    if kind == "run":
        if not isinstance(rec.get("experiment"), str) or not rec["experiment"].strip():
            return "the run record has no experiment name"
        for key in ("uri", "run_name", "run_id"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                return f"the run record's {key} must be a string, got {rec[key]!r}"[:160]
        if rec.get("start_time") is not None and not (_is_int(rec["start_time"]) and rec["start_time"] >= 0):
            return f"the run record's start_time must be milliseconds, got {rec['start_time']!r}"[:160]
        tags = rec.get("tags") or {}
        if not isinstance(tags, dict):
            return "the run record's tags must be an object"
        for k, v in tags.items():
            problem = _name_problem("tag", k)
            if problem or not isinstance(v, (str, int, float, bool)):
                return problem or f"tag {k!r} has no text value"
    elif kind == "params":
        return _entries_problem(
            rec, "params", "values",
            lambda v: isinstance(v, (str, int, float, bool)) and len(str(v)) <= _MAX_PARAM_VALUE,
            lambda k, v: f"param {k!r} must have a text or number value (at most {_MAX_PARAM_VALUE} characters)")
    elif kind == "metrics":
        problem = _entries_problem(rec, "metrics", "numbers",
                                   lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
                                   lambda k, v: f"metric {k!r} has value {v!r}, not a number"[:160])
        if problem:
            return problem
        if not (_is_int(rec.get("step"))):
            return f"a metrics record needs an integer \"step\", got {rec.get('step')!r}"[:160]
        if not (_is_int(rec.get("timestamp")) and rec["timestamp"] >= 0):
            return f"a metrics record needs \"timestamp\" in milliseconds, got {rec.get('timestamp')!r}"[:160]
    elif kind in ("artifact", "model"):
        if not isinstance(rec.get("path"), str) or not rec["path"]:
            return f"an {kind} record needs \"path\": the file, relative to the run folder"
        for key in ("artifact_path", "name"):
            if rec.get(key) is not None and not isinstance(rec[key], str):
                return f"the {kind} record's {key} must be a string, got {rec[key]!r}"[:160]
    elif kind == "end":
        if rec.get("status") not in _END_STATUSES:
            return f"an end record's status must be one of {', '.join(_END_STATUSES)}, got {rec.get('status')!r}"[:160]
        if not (_is_int(rec.get("end_time")) and rec["end_time"] >= 0):
            return f"an end record needs \"end_time\" in milliseconds, got {rec.get('end_time')!r}"[:160]
    else:
        return f"unknown record kind {kind!r}"[:160]
    return None


def _check_pending(folder: Path) -> list[tuple[int, dict[str, Any]]]:
    """The kept records of ``folder``, each checked: a damaged one is a one-line error naming the
    file and its line, raised before anything is sent."""
    path = folder / PENDING_FILE
    if not path.is_file():
        raise MedvaeError(f"no kept tracking records here (no {PENDING_FILE})", folder)
    records, bad = _pending_lines(folder)
    if bad:  # dropped, as a write cut short by a kill leaves them; say so, since they are not sent
        log.warning("%s: skipping line(s) %s: not JSON (a write cut short by a kill?)", path,
                    ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else ""))
    if not records:
        raise MedvaeError("holds no readable tracking record", path)
    first_line, first = records[0]
    if not (isinstance(first, dict) and first.get("kind") == "run"):
        raise MedvaeError(f"line {first_line}: the first record must be the run record (\"kind\": \"run\") "
                          "that says which run the others belong to", path)
    for n, rec in records:
        problem = _record_problem(rec)
        if problem:
            raise MedvaeError(f"line {n}: {problem}; nothing was sent", path)
    return records  # type: ignore[return-value]


def _read_synced(folder: Path, n_records: int) -> dict[str, Any]:
    """``tracking_synced.json`` (what an earlier sync sent), checked: guessing would send twice or never."""
    path = folder / SYNCED_FILE
    if not path.exists():
        return {}
    problem = None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        problem = f"line {exc.lineno}: not JSON ({exc.msg})"
    except (OSError, ValueError) as exc:  # a folder, unreadable, not UTF-8
        problem = f"cannot be read ({_os_reason(exc) if isinstance(exc, OSError) else 'not UTF-8 text'})"
    else:
        if not isinstance(state, dict):
            problem = "not a JSON object"
        elif state.get("run_id") is not None and not isinstance(state["run_id"], str):
            problem = f"run_id must be a string, got {state['run_id']!r}"[:120]
        elif not (_is_int(state.get("sent", 0)) and 0 <= state.get("sent", 0) <= n_records):
            problem = f"sent must be a count of records from 0 to {n_records}, got {state.get('sent')!r}"[:120]
    if problem:
        raise MedvaeError(f"damaged ({problem}); it records which kept records were sent: delete it to send "
                          "them all again (metrics sent before are then logged twice)", path)
    return state


def _read_run_id(path: Path) -> str | None:
    try:
        return (path.read_text(encoding="utf-8").strip() or None) if path.is_file() else None
    except (OSError, ValueError):  # unreadable: the run is found another way, or made anew
        return None


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def sync_pending(folder: str | os.PathLike, *, tracking_uri: str | None = None) -> SyncResult:
    """Send the records a :class:`RunLogger` kept in ``folder`` to their MLflow run, each once.

    The run is the one this folder's job logged to (``mlflow_run_id``) if the server has it, else a
    new run in the same experiment with the original start time. What was sent is recorded in
    ``folder/tracking_synced.json`` after every record, so a second sync (or one after an
    interruption) sends nothing twice. Every record is checked before the first is sent.

    Raises
    ------
    MedvaeError
        ``folder`` holds no kept records, a record or ``tracking_synced.json`` is damaged (the
        message names the file and line), the store does not open, or MLflow refused a record.
    TrackingUnavailable
        The server is still unreachable.

    Examples
    --------
    >>> sync_pending("runs/ct", tracking_uri="http://mlflow:5000")   # doctest: +SKIP
    SyncResult(run_id='3f2...', uri='http://mlflow:5000', sent=41, already=0, metric_values=230, new_run=False)
    """
    folder = Path(folder)
    lines = _check_pending(folder)
    records = [rec for _, rec in lines]
    header = records[0]
    state = _read_synced(folder, len(records))
    done = int(state.get("sent", 0))
    pending = folder / PENDING_FILE

    from mlflow.entities import Metric, Param

    uri = configure(tracking_uri or header.get("uri") or None)
    check_server(uri)
    client = client_for(uri)

    def exists(run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            client.get_run(run_id)
            return True
        except Exception as exc:
            if is_outage(exc):
                raise TrackingUnavailable(uri, outage_reason(exc)) from None
            return False

    def refused(n: int, kind: str, exc: Exception, sent_before: int) -> Exception:
        """An outage stays soft; anything else names the record MLflow would not take."""
        if isinstance(exc, (TrackingUnavailable, MedvaeError)):
            return exc
        if is_outage(exc):
            return TrackingUnavailable(uri, outage_reason(exc))
        return MedvaeError(f"line {n}: MLflow refused this {kind} record ({_store_reason(exc)}); "
                           f"{sent_before} record(s) before it are sent, run it again once fixed", pending)

    run_file = folder / RUN_ID_FILE
    candidates = [state.get("run_id"), _read_run_id(run_file), header.get("run_id")]
    run_id = next((c for c in candidates if exists(c)), None)
    new_run = run_id is None
    if new_run:
        exp_id = ensure_experiment(header["experiment"], uri)
        tags = {**{k: str(v) for k, v in (header.get("tags") or {}).items()}, "medvae.synced_from_pending": "true"}
        try:
            run_id = client.create_run(exp_id, start_time=header.get("start_time"), tags=tags,
                                       run_name=header.get("run_name")).info.run_id
        except Exception as exc:
            raise refused(lines[0][0], "run", exc, 0) from None
        run_file.write_text(run_id)
        done = 0  # a new run gets everything
    _write_json_atomic(folder / SYNCED_FILE, {"run_id": run_id, "sent": done})
    last_end = max((i for i, r in enumerate(records) if r.get("kind") == "end"), default=-1)
    sent = values = 0
    for i, (n, rec) in enumerate(lines):
        if i < done:
            continue
        kind = rec["kind"]
        try:
            if kind == "params":
                current = client.get_run(run_id).data.params
                new = [Param(k, str(v)) for k, v in rec["params"].items() if k not in current]
                for batch in _chunks(new, 100):  # MLflow takes at most 100 params a batch
                    client.log_batch(run_id, params=batch)
            elif kind == "metrics":
                ms = [Metric(k, float(v), rec["timestamp"], rec["step"]) for k, v in rec["metrics"].items()]
                for batch in _chunks(ms, 1000):  # and at most 1000 metric values
                    client.log_batch(run_id, metrics=batch)
                values += len(ms)
            elif kind == "artifact":
                path = folder / rec["path"]
                if path.is_file():
                    client.log_artifact(run_id, str(path), rec.get("artifact_path"))
            elif kind == "model":
                path = folder / rec["path"]
                if path.is_file():
                    log_medvae_model(path, name=rec.get("name") or "model", run_id=run_id)
            elif kind == "end" and i == last_end:
                info = client.get_run(run_id).info
                if info.end_time is None or info.end_time < rec["end_time"] or info.status == "RUNNING":
                    client.set_terminated(run_id, rec["status"], end_time=rec["end_time"])
        except Exception as exc:
            raise refused(n, kind, exc, i) from None
        sent += 1
        _write_json_atomic(folder / SYNCED_FILE, {"run_id": run_id, "sent": i + 1})
    return SyncResult(run_id=run_id, uri=redact(uri), sent=sent, already=done if not new_run else 0,
                      metric_values=values, new_run=new_run)


# -- small helpers --------------------------------------------------------------------------------------

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
