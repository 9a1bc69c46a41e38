"""Records kept offline and sent later: the files a run keeps beside its checkpoints while the
server is unreachable, their checks, and :func:`sync_pending` (``medvae track sync``), which sends
each record once.
"""
from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from medvae.errors import MedvaeError, os_reason
from medvae.tracking.models import log_medvae_model
from medvae.tracking.outage import TrackingUnavailable, check_server, is_outage, outage_reason
from medvae.tracking.store import _store_reason, client_for, configure, ensure_experiment
from medvae.tracking.uri import redact, resolve_tracking_uri

#: one logger for the whole package, as before the split: users (and tests) filter on "medvae.tracking"
log = logging.getLogger("medvae.tracking")

#: records that could not be sent, one JSON object a line, beside the checkpoints
PENDING_FILE = "tracking_pending.jsonl"
#: files (figures) kept for those records
PENDING_DIR = "tracking_pending"
#: what ``medvae track sync`` has sent: the run and the number of records
SYNCED_FILE = "tracking_synced.json"
#: the MLflow run of a training output folder (used by --resume and by sync)
RUN_ID_FILE = "mlflow_run_id"


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
        raise MedvaeError(f"cannot read the kept tracking records ({os_reason(exc)})", path) from None
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


def _check_pending(folder: Path, *, warn: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """The kept records of ``folder``, each checked: a damaged one is a one-line error naming the
    file and its line, raised before anything is sent; ``warn``: say which lines are skipped."""
    path = folder / PENDING_FILE
    if not path.is_file():
        raise MedvaeError(f"no kept tracking records here (no {PENDING_FILE})", folder)
    records, bad = _pending_lines(folder)
    lines = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    if not records:  # one line: the skipped lines are part of the error, not a warning before it
        raise MedvaeError("holds no readable tracking record" + (f" (line(s) {lines}: not JSON)" if bad else ""), path)
    if bad and warn:  # dropped, as a write cut short by a kill leaves them; say so, since they are not sent
        log.warning("%s: skipping line(s) %s: not JSON (a write cut short by a kill?)", path, lines)
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
        problem = f"cannot be read ({os_reason(exc) if isinstance(exc, OSError) else 'not UTF-8 text'})"
    else:
        if not isinstance(state, dict):
            problem = "not a JSON object"
        elif state.get("uri") is not None and not isinstance(state["uri"], str):
            problem = f"uri must be a string, got {state['uri']!r}"[:120]
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


def logged_steps(client, run_id: str) -> dict[str, set[int]]:
    """The steps of every metric a run holds: a job resumed from a checkpoint re-logs the steps after it,
    which the run (or the kept records) may hold already."""
    return {key: {m.step for m in client.get_metric_history(run_id, key)}
            for key in client.get_run(run_id).data.metrics}


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def sync_pending(folder: str | os.PathLike, *, tracking_uri: str | None = None,
                 new_run: bool = False) -> SyncResult:
    """Send the records a :class:`RunLogger` kept in ``folder`` to their MLflow run, each once.

    The run is the one this folder's job logged to (``mlflow_run_id``) if the server has it. A job
    that was offline from its start has no run: a new one is created in the same experiment, with the
    original start time. A job that lost the server midway sent its first records to its run; when
    that run is not in this store, the kept records alone would make an incomplete run, so this is
    refused unless ``new_run=True``. A deleted run is refused (restore it first). What was sent is
    recorded in ``folder/tracking_synced.json`` after every record, so a second sync (or one after an
    interruption) sends nothing twice; two syncs of one folder at once are refused. Every record is
    checked before the first is sent.

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
    import contextlib

    from medvae.io.atomic import exclusive

    folder = Path(folder)
    _check_pending(folder)  # a folder without records is named before a lock is taken in it
    with contextlib.ExitStack() as held:
        try:  # a second sync at once sent every record (the model) twice
            held.enter_context(exclusive(folder / PENDING_FILE))
        except MedvaeError as exc:
            if not exc.message.startswith("another"):
                raise
            raise MedvaeError("another `medvae track sync` is sending these records now; nothing sent",
                              folder) from None
        return _sync(folder, tracking_uri=tracking_uri, allow_new_run=new_run)


def _sync(folder: Path, *, tracking_uri: str | None, allow_new_run: bool) -> SyncResult:
    lines = _check_pending(folder, warn=False)  # checked again under the lock; its skipped lines were said
    records = [rec for _, rec in lines]
    header = records[0]
    state = _read_synced(folder, len(records))
    done = int(state.get("sent", 0))
    pending = folder / PENDING_FILE

    from mlflow.entities import Metric, Param

    uri = resolve_tracking_uri(tracking_uri or header.get("uri") or None)
    sent_to = state.get("uri")
    if sent_to and sent_to != redact(uri) and done:  # its run id and count would move to the other store
        raise MedvaeError(f"{done} of these records were sent to {sent_to} already; sync to that store, or "
                          f"delete {SYNCED_FILE} to send them all to {redact(uri)} as a new run", folder)
    uri = configure(uri)  # after the check: a refused sync created the default store's mlruns/ folder
    check_server(uri)
    client = client_for(uri)

    def exists(run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            stage = client.get_run(run_id).info.lifecycle_stage
        except Exception as exc:
            if is_outage(exc):
                raise TrackingUnavailable(uri, outage_reason(exc)) from None
            return False
        if stage != "active":  # MLflow took records into it until the model, then refused
            raise MedvaeError(f"MLflow run {run_id} is {stage} in {redact(uri)}: restore it (mlflow runs restore "
                              f"--run-id {run_id}) and sync again; nothing sent", folder)
        return True

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
    if new_run and header.get("run_id") and not allow_new_run:
        raise MedvaeError(f"MLflow run {header['run_id']}, which holds what this job sent before it lost the "
                          f"server, is not in {redact(uri)}: sync to the store it was logged to, or give "
                          "--new-run to send the kept records alone to a new (incomplete) run; nothing sent",
                          folder)
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
    _write_json_atomic(folder / SYNCED_FILE, {"run_id": run_id, "sent": done, "uri": redact(uri)})
    # a job resumed online re-logs the steps after its last checkpoint, which the kept records may hold
    # too (and an offline job resumed offline keeps them twice)
    try:
        held = {} if new_run else logged_steps(client, run_id)
    except Exception as exc:
        raise refused(lines[0][0], "run", exc, done) from None
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
                ms = [Metric(k, float(v), rec["timestamp"], rec["step"]) for k, v in rec["metrics"].items()
                      if rec["step"] not in held.setdefault(k, set())]
                for m in ms:
                    held[m.key].add(m.step)
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
        _write_json_atomic(folder / SYNCED_FILE, {"run_id": run_id, "sent": i + 1, "uri": redact(uri)})
    return SyncResult(run_id=run_id, uri=redact(uri), sent=sent, already=done if not new_run else 0,
                      metric_values=values, new_run=new_run)
