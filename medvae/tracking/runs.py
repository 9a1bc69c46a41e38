"""MLflow runs: :func:`start_run` around a short command, and :class:`RunLogger`, the run of a long
job that keeps its records locally whenever the server cannot take them; the tags every run gets
and the safe names of runs and artifacts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from medvae.errors import MedvaeError, os_reason
from medvae.tracking.models import log_medvae_model
from medvae.tracking.outage import CHECK_TIMEOUT_S, TrackingUnavailable, check_server, is_outage, outage_reason
from medvae.tracking.pending import (
    _MAX_PARAM_VALUE,
    PENDING_DIR,
    PENDING_FILE,
    RUN_ID_FILE,
    logged_steps,
    read_pending,
)
from medvae.tracking.store import client_for, configure, ensure_experiment, scoped_env
from medvae.tracking.uri import _portable, check_uri, redact, resolve_tracking_uri

#: one logger for the whole package, as before the split: users (and tests) filter on "medvae.tracking"
log = logging.getLogger("medvae.tracking")


def _now_ms() -> int:
    return int(time.time() * 1000)


def _run_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    from medvae import __version__

    all_tags = {"medvae.git_commit": git_commit() or "unknown", "medvae.version": __version__}
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

    from medvae.runtime import STOP_SIGNALS, signals_recorded

    uri = configure(tracking_uri)
    check_server(uri)
    opened = created_here = ended = False
    left_running = None
    try:
        if not run_id:
            exp_id = ensure_experiment(experiment, uri)
            # a signal after the store made the run and before its id came back left it RUNNING for good:
            # the first is held to the id, a second acts (a hung store must not hold every Ctrl-C)
            with signals_recorded(*STOP_SIGNALS, second_acts=True) as (caught, _):
                created = client_for(uri).create_run(
                    exp_id, start_time=int(start_time * 1000) if start_time else None,
                    tags=_run_tags(tags), run_name=run_name)
                run_id, created_here = created.info.run_id, True
            if caught:
                signal.raise_signal(caught[0])
        run = mlflow.start_run(run_id=run_id)
        opened = True
        yield run
        mlflow.end_run("FINISHED")
        ended = True
    except BaseException as exc:
        # never left RUNNING: a signal between creating the run and opening it, or while it was ended,
        # did that; ended here instead of holding signals (a hung store then held every Ctrl-C)
        if (opened or created_here) and not ended:
            status = "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"  # as a training's run ends
            # after an outage, one short try: a server that stopped answering doubled the documented ~20 s
            quick = ({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(CHECK_TIMEOUT_S))}
                     if isinstance(exc, Exception) and is_outage(exc) else {})
            try:
                with scoped_env(**quick):
                    active = mlflow.active_run()
                    if active is not None and active.info.run_id == run_id:
                        mlflow.end_run(status)
                    else:  # created but not opened, or its ending was cut short
                        client_for(uri).set_terminated(run_id, status)
            except BaseException:  # the store went away, or a second Ctrl-C: the first exception goes on
                left_running = run_id
        if isinstance(exc, Exception) and is_outage(exc):
            raise TrackingUnavailable(uri, outage_reason(exc), left_running=left_running) from None
        raise


def log_params(params: Mapping[str, Any]) -> None:
    """Log params to the run opened by :func:`start_run` (commands never import mlflow themselves)."""
    import mlflow

    mlflow.log_params(dict(params))


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log metrics to the run opened by :func:`start_run`."""
    import mlflow

    mlflow.log_metrics(dict(metrics), step=step)


def log_artifact(path: str | os.PathLike, *, artifact_path: str | None = None) -> None:
    """Log a file that medvae wrote (never a user's file name) to the run opened by :func:`start_run`."""
    import mlflow

    mlflow.log_artifact(str(path), artifact_path=artifact_path)


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
        self.continued = False   # after start(): True when this continues an earlier run (it has its params)

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
            self.continued = previous is not None
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
                if not self.resume and run_file.is_file():
                    self._end_stale(run_file.read_text().strip())
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
        self.continued = previous is not None and self.run_id == previous

    def _end_stale(self, run_id: str) -> None:
        """End KILLED the run an earlier job in this folder left RUNNING (killed before its first
        checkpoint, so it cannot be resumed): a new run starts instead, and the old one said RUNNING for
        good. The folder is this job's alone (training holds its lock), so no live job owns that run."""
        try:
            info = self._client.get_run(run_id).info
        except Exception as exc:
            if is_outage(exc):
                raise
            return  # gone, or of another store
        if info.status == "RUNNING":
            self._client.set_terminated(run_id, "KILLED")
            log.info("MLflow run %s, which an earlier job in %s left running, ended KILLED", run_id, self.folder)

    def _last_steps(self) -> dict[str, int]:
        """The last logged step of each metric of the continued run: a resumed job replays the steps
        after its last checkpoint, which the interrupted one may have logged already."""
        try:
            return {k: max(steps, default=-1) for k, steps in logged_steps(self._client, self.run_id).items()}
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
        elif isinstance(exc, OSError) and exc.filename:  # e.g. an artifact folder it may not write: name it
            self.unavailable = TrackingUnavailable(self.uri, f"cannot write {exc.filename}: {os_reason(exc)}")
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
        with open(self.pending, "a+b") as fh:
            # a job killed mid-write left a line without its end: this record starts a line of its own,
            # or it would be joined to that fragment and skipped with it by `medvae track sync`
            fh.seek(0, os.SEEK_END)
            start = b""
            if fh.tell():
                fh.seek(-1, os.SEEK_END)
                start = b"" if fh.read(1) == b"\n" else b"\n"
            fh.write(start + (json.dumps(record) + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    def _send(self, record: dict[str, Any], send) -> None:
        if self.online:
            from medvae.runtime import STOP_SIGNALS, signals_recorded

            caught: list[int] = []
            # a signal raised inside an sqlite write left its lock held (MLflow's session rolls back on
            # Exception only): ending the run then waited 20 s for the lock, failed with a traceback and
            # left it RUNNING. There the first is held to the write's end, and a second acts; a request to
            # a server is cut at once (a hung one would hold a Ctrl-C for its whole timeout)
            signals = STOP_SIGNALS if str(self.uri).startswith("sqlite:") else ()
            try:
                with signals_recorded(*signals, second_acts=True) as (caught, _):
                    send()
            except Exception as exc:  # never let tracking stop the work
                self._go_offline(exc)
                self._keep(record)
            if caught:  # after the write, sent or kept: a held Ctrl-C or SIGTERM is never lost
                signal.raise_signal(caught[0])
            return
        self._keep(record)

    # the logging API ---------------------------------------------------------------------------------
    # mlflow is imported only to send: a machine without it keeps the records (a bare GPU node)
    def log_params(self, params: Mapping[str, Any]) -> None:
        params = {k: str(v)[:_MAX_PARAM_VALUE] for k, v in params.items()}

        def send() -> None:
            from mlflow.entities import Param

            self._client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

        self._send({"kind": "params", "params": params}, send)

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
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

    def log_artifact(self, path: str | os.PathLike, *, artifact_path: str | None = None) -> None:
        """Log a file of the output folder (a checkpoint) as an artifact."""
        path = Path(path)
        rel = os.path.relpath(path, self.folder)
        self._send({"kind": "artifact", "path": rel, "artifact_path": artifact_path},
                   lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_model(self, model_pt: str | os.PathLike, *, name: str = "model") -> None:
        """Log an inference checkpoint as an MLflow model (see :func:`log_medvae_model`)."""
        rel = os.path.relpath(model_pt, self.folder)
        self._send({"kind": "model", "path": rel, "name": name},
                   lambda: log_medvae_model(model_pt, name=name, run_id=self.run_id))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED``, ``FAILED`` or ``KILLED`` with the real end time."""
        end = _now_ms()
        self._send({"kind": "end", "status": status, "end_time": end},
                   lambda: self._client.set_terminated(self.run_id, status, end_time=end))


def git_commit() -> str | None:
    """The commit of the medvae checkout, or None when medvae is not run from its own checkout (an
    installed wheel inside another project's repository would otherwise report that project's HEAD)."""
    root = Path(__file__).resolve().parents[2]  # medvae/tracking/runs.py -> the checkout's root
    try:
        top, head = subprocess.run(
            ["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.splitlines()  # a line each: the checkout's path may hold spaces
    except Exception:
        return None
    return head if Path(top).resolve() == root and (root / "pyproject.toml").is_file() else None


_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """An artifact or run name made only of safe characters. Callers must pass names that medvae
    built (``ct_series``, ``slice_012``), never file names or DICOM values."""
    return _SAFE.sub("_", name).strip("_") or "item"
