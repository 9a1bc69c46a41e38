"""Opening the tracking store: pointing mlflow at it, preparing a sqlite store (its folder, a file
sqlite can open, a lock while it is created), one-line errors for a store that does not open, and
the experiments medvae logs to.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from medvae.errors import MedvaeError, os_reason
from medvae.tracking.outage import TrackingUnavailable, _is_db_outage, is_outage, outage_reason
from medvae.tracking.uri import _is_remote, _sqlite_path, check_uri, redact, resolve_tracking_uri

#: MLflow's HTTP settings used unless the environment sets them: one retry, 10 s per request
#: (MLflow's own defaults, 7 retries with exponential backoff and 120 s, stall for minutes)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}

#: experiment tag that makes MLflow 3's UI open an experiment in its model-training view
#: (the value the UI itself writes when a user picks "machine learning"); without it, MLflow 3
#: guesses and shows medvae's runs in the GenAI view (traces, "no data")
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

#: the first 16 bytes of every sqlite database file
_SQLITE_MAGIC = b"SQLite format 3\x00"


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
        fail(f"cannot create the folder {db.parent} ({os_reason(exc)})")
    if db.exists():
        problem = sqlite_store_problem(uri, db)
        if problem:
            fail(problem)
        if not os.access(db, os.R_OK | os.W_OK):
            fail("no permission to write the database file")
    elif not os.access(db.parent, os.W_OK | os.X_OK):
        fail(f"no permission to create the database in {db.parent}")


def sqlite_store_problem(uri: str, db: Path) -> str | None:
    """Why the existing file ``db`` is no MLflow store that MLflow may open (None: it is one, or empty):
    MLflow adds its ~70 tables to any sqlite database it is pointed at, another program's too."""
    try:
        with open(db, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
    except OSError as exc:
        return f"cannot read the database file ({os_reason(exc)})"
    if not head:  # an empty file is an empty database to sqlite
        return None
    if head != _SQLITE_MAGIC:
        return "the file is not an sqlite database"
    import sqlite3

    try:
        try:
            with _store_lock(uri):  # not while another process creates MLflow's tables in it
                tables = _sqlite_tables(db)
        except OSError:  # a folder that cannot be opened to lock it (mode 0711): reading needs no lock
            tables = _sqlite_tables(db)
    except sqlite3.Error as exc:  # "file is not a database", "database is locked"
        return str(exc)
    if tables and not {"experiments", "runs"} <= tables:
        return ("the file is an sqlite database of something else, not an MLflow store; name the store's own "
                "file, or a new one")
    return None


def _sqlite_tables(db: Path) -> set[str]:
    """The tables of an sqlite database, opened read-only (raises sqlite3.Error)."""
    import sqlite3

    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    try:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    finally:
        con.close()


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


def _store_failure(uri: str, exc: BaseException) -> Exception:
    """What to raise for ``exc``, met while opening the store at ``uri``: :class:`TrackingUnavailable`
    for a server that cannot be reached (the soft exit-3 path), else a one-line :class:`MedvaeError`
    (not a database, a missing driver, a refused request)."""
    if isinstance(exc, (TrackingUnavailable, MedvaeError)):
        return exc
    if is_outage(exc) or _is_db_outage(uri, exc):
        return TrackingUnavailable(uri, outage_reason(exc))
    return MedvaeError(f"cannot open the MLflow store: {_store_reason(exc)}", redact(uri))


@contextlib.contextmanager
def scoped_env(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of a block, then put back what was there (MLflow reads
    its HTTP settings at each request)."""
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
        if redact(uri) != uri:  # MLflow prints "View run ... at <the URI>", password and all
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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

    db = _sqlite_path(uri)
    if db is not None:  # also without configure(): never MLflow's tables in another program's database
        _prepare_sqlite(uri, db)
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


def mark_as_table(client, run_id: str, artifact_file: str) -> None:
    """Tag ``artifact_file`` of run ``run_id`` as ``MlflowClient.log_table`` does, so that the MLflow UI
    shows it as a table (for a table written as a plain artifact, whose rows stay as written)."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS

    listed = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    if {"path": artifact_file, "type": "table"} not in listed:
        listed.append({"path": artifact_file, "type": "table"})
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps(listed))
