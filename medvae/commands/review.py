"""``medvae review import VERDICTS.json``: log a clinician's sign-off to the evaluation's MLflow run.

The review page (``index.html`` of ``medvae evaluate --report`` or ``medvae demo``) exports the
reviewer's verdicts as JSON, without any server. This command checks that file and records it in
the MLflow run the page came from (its id is in the file, the page's footer and ``summary.json``):

* tags ``medvae.review.verdict`` (accept / reject), ``medvae.review.slices_accepted``,
  ``medvae.review.slices_rejected``, ``medvae.review.reviewed_at`` and, only when the reviewer gave
  them, ``medvae.review.reviewer`` (initials);
* the table artifact ``review/verdicts.json`` (one row for the case and one per marked slice, with
  the notes); a later import appends to it.

Before anything is logged, every file is checked against its run: the run must hold the review
report the page came from (its ``report/metrics.csv`` must match the export's ``report_id`` and
slice count), ``--run-id`` may not name another run than the export's, and an export that is
already imported, or older than the sign-off the run holds, is refused. A newer export replaces
the run's review tags; the table keeps every import's rows.

The run is not reopened, so its status and duration stay those of the evaluation.

exit status: 0 imported; 2 bad input (one-line error naming the file, nothing logged: a bad or
             incomplete export, an unknown run, a run of another evaluation, an export already
             imported, a tracking URI that is not an MLflow store or a store that does not open);
             3 the tracking server is unavailable (one line names the files not imported; run it again later)
"""
from __future__ import annotations

import argparse
import contextlib
import re
from datetime import timedelta

HELP = "clinical sign-off: import the verdicts exported by a review page into its MLflow run"

FORMAT = "medvae-review"
VERDICTS = ("accept", "reject")
# initials in capitals, 1-4 letters with optional dots or hyphens (JD, J.D., JKD, J-P): "Jane" or
# "J. Doe" is a name, and names are identifiers that must not reach MLflow tags (same rule as the page)
_INITIALS = re.compile(r"^[A-Z](?:[.\-]?[A-Z]){0,3}\.?$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_REPORT_ID = re.compile(r"^[0-9a-f]{64}$")
# what the page's Date.toISOString() writes (and other ISO 8601 UTC times): never free text in a tag
_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?(Z|[+-]\d{2}:\d{2})$")
# an export dated later than now by more than this is refused: a later real sign-off could never replace it
_CLOCK_SKEW = timedelta(minutes=10)
TABLE = "review/verdicts.json"
REPORT_METRICS = "report/metrics.csv"  # the evaluation's report, logged to its run by medvae evaluate


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="log exported verdicts (JSON from a review page) to the evaluation's run",
                         description=__doc__.split("\n\n", 1)[1])
    imp.formatter_class = argparse.RawDescriptionHelpFormatter
    imp.add_argument("verdicts", nargs="+", metavar="VERDICTS.json", help="file(s) exported by review pages")
    imp.add_argument("--run-id", default=None,
                     help="the MLflow run to log to, when the page names none (evaluated with --no-mlflow): a run "
                          "holding the same report, such as one from running the same evaluate again with MLflow")
    imp.add_argument("--tracking-uri", default=None,
                     help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlruns/mlflow.db)")


def read_verdicts(path) -> dict:
    """Read and check one exported verdicts file; raise ``MedvaeError`` naming the problem and file.

    Examples
    --------
    >>> read_verdicts("verdicts_0123abcd.json")["verdict"]   # doctest: +SKIP
    'accept'
    """
    import json
    from pathlib import Path

    from medvae.errors import MedvaeError

    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedvaeError("no such file", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MedvaeError(f"not a JSON file exported by a review page ({exc.__class__.__name__})", path) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise MedvaeError(f"not a medvae review export (expected \"format\": \"{FORMAT}\")", path)
    if doc.get("version") != 1:
        raise MedvaeError(f"unsupported review export version {doc.get('version')!r} (this medvae reads 1)", path)
    if doc.get("verdict") not in VERDICTS:
        raise MedvaeError(f"the case verdict must be accept or reject, got {doc.get('verdict')!r}", path)
    reviewer = doc.get("reviewer")
    if reviewer is not None and (not isinstance(reviewer, str) or not _INITIALS.match(reviewer.strip())):
        raise MedvaeError("reviewer must be initials (1-4 capital letters, e.g. JD or J.D.), not a name", path)
    run_id = doc.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and _RUN_ID.match(run_id)):
        raise MedvaeError(f"{str(run_id)[:40]!r} is not an MLflow run id", path)
    report_id = doc.get("report_id")
    if report_id is None:  # without it, an export edited to name another run of as many slices was taken
        raise MedvaeError("incomplete export: no \"report_id\" ties it to its evaluation's report; export it "
                          "again from the page", path)
    if not (isinstance(report_id, str) and _REPORT_ID.match(report_id)):
        raise MedvaeError("\"report_id\" is not a report digest (64 hex digits); export it again from the page",
                          path)
    n = doc.get("n_slices")
    if not _is_int(n) or n < 1:
        raise MedvaeError(f"incomplete export: \"n_slices\" must be the page's slice count, got {n!r}"[:200], path)
    exported = doc.get("exported_at")
    if not isinstance(exported, str) or not _TIME.match(exported) or _when(exported) is None:
        raise MedvaeError("incomplete export: \"exported_at\" must be the page's export time (ISO 8601, UTC), "
                          f"got {str(exported)[:40]!r}", path)
    from datetime import datetime, timezone

    if _when(exported) > datetime.now(timezone.utc) + _CLOCK_SKEW:  # it would outrank every real sign-off
        raise MedvaeError(f"\"exported_at\" {exported} lies in the future: the file was edited, or the "
                          "reviewing computer's clock is wrong", path)
    if not isinstance(doc.get("note"), (str, type(None))):
        raise MedvaeError("the case note must be text", path)
    slices = doc.get("slices", [])
    if not isinstance(slices, list):
        raise MedvaeError("\"slices\" must be a list", path)
    seen = set()
    for item in slices:
        if not isinstance(item, dict) or item.get("verdict") not in VERDICTS:
            raise MedvaeError(f"every slice needs a verdict accept or reject, got {item!r}"[:200], path)
        s = item.get("slice")
        if not _is_int(s) or s < 1 or s > n:
            raise MedvaeError(f"slice number {s!r} is not in 1..{n}", path)
        if "k" in item and item["k"] != s - 1:
            raise MedvaeError(f"slice {s} has k = {item['k']!r}, not {s - 1}: the file was edited", path)
        if s in seen:
            raise MedvaeError(f"slice {s} has two verdicts: the file was edited", path)
        if not isinstance(item.get("note"), (str, type(None))):
            raise MedvaeError(f"the note on slice {s} must be text", path)
        seen.add(s)
    return doc


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _when(text: str):
    """An export time as an aware ``datetime`` (None when it is not one)."""
    from datetime import datetime

    try:
        t = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith("Z") else text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _rows(doc: dict) -> dict[str, list]:
    """The table artifact's columns: one row for the case, one per marked slice."""
    cols: dict[str, list] = {k: [] for k in ("scope", "slice", "verdict", "note", "reviewer", "reviewed_at")}

    def add(scope, slice_, verdict, note):
        for k, v in zip(cols, (scope, slice_, verdict, str(note or ""), doc.get("reviewer") or "",
                               str(doc.get("exported_at") or ""))):
            cols[k].append(v)

    add("case", None, doc["verdict"], doc.get("note"))
    for item in doc.get("slices") or []:
        add("slice", int(item["slice"]), item["verdict"], item.get("note"))
    return cols


def _open_store(tracking_uri: str | None, run_id: str, path):
    """The MLflow client of the evaluation's store (``(client, uri)``); no empty store is created."""
    from medvae import tracking
    from medvae.errors import MedvaeError

    uri = tracking.resolve_tracking_uri(tracking_uri)
    db = tracking._sqlite_path(uri)
    if db is not None and (not db.exists() or (db.is_file() and db.stat().st_size == 0)):
        # do not create an empty store (nor fill an empty file with MLflow's tables) to find no run in it
        raise MedvaeError(f"no MLflow store at {db} to find run {run_id} in; set --tracking-uri or "
                          "MLFLOW_TRACKING_URI to the evaluation's store", path)
    uri = tracking.configure(uri)
    tracking.check_server(uri)
    return tracking.client_for(uri), uri


def _failed(uri: str, exc: Exception, what: str, path) -> Exception:
    """A server that stopped answering is the soft exit-3 path, not "no such run"."""
    from medvae import tracking
    from medvae.errors import MedvaeError

    if tracking.is_outage(exc):
        return tracking.TrackingUnavailable(uri, tracking.outage_reason(exc))
    return MedvaeError(what, path)


def check_run(doc: dict, *, run_id: str, client, uri: str, path=None, held: dict | None = None) -> dict | None:
    """Check that ``doc`` (from :func:`read_verdicts`) belongs to MLflow run ``run_id`` and is new there.

    The run must hold the review report of an evaluation (``report/metrics.csv``, logged by ``medvae
    evaluate``) with the export's slice count and the export's ``report_id``
    (:func:`medvae.report.report_digest`). An export already imported into the run, or older than
    the sign-off it holds (``held``: the sign-off of an earlier file of the same command), is refused.
    Returns the sign-off the run held (``{"verdict", "exported_at"}``) or None.
    """
    import csv
    import hashlib
    import tempfile
    from pathlib import Path

    from medvae import tracking
    from medvae.errors import MedvaeError

    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise _failed(uri, exc, f"no MLflow run {run_id} in {tracking.redact(uri)}", path) from None
    if run.info.lifecycle_stage != "active":  # MLflow takes the table, then refuses the tags
        raise MedvaeError(f"MLflow run {run_id} is {run.info.lifecycle_stage}: restore it first "
                          f"(mlflow runs restore --run-id {run_id}); nothing logged", path)
    with tempfile.TemporaryDirectory(prefix="medvae-review-") as tmp:
        try:
            local = Path(client.download_artifacts(run.info.run_id, REPORT_METRICS, tmp))
            data = local.read_bytes()
        except Exception as exc:
            raise _failed(uri, exc, f"MLflow run {run_id} holds no review report ({REPORT_METRICS}): it is not "
                                    "the evaluation this page came from", path) from None
    if hashlib.sha256(data).hexdigest() != doc["report_id"]:
        raise MedvaeError(f"these verdicts are for another evaluation: the report of MLflow run {run_id} is not "
                          "the page they were exported from (report_id differs)", path)
    try:
        n = 1 + max(int(r["slice"]) for r in csv.DictReader(data.decode("utf-8").splitlines()))
    except (ValueError, KeyError, UnicodeDecodeError):
        n = None
    if n != doc["n_slices"]:
        raise MedvaeError(f"these verdicts are for a page of {doc['n_slices']} slices, but the evaluation of MLflow "
                          f"run {run_id} has {n}: not the page they were exported from", path)
    prev = held or ({"verdict": run.data.tags["medvae.review.verdict"],
                     "exported_at": run.data.tags.get("medvae.review.reviewed_at", "")}
                    if "medvae.review.verdict" in run.data.tags else None)
    if prev:
        before, now = _when(prev["exported_at"]), _when(doc["exported_at"])
        if prev["exported_at"] == doc["exported_at"] or (before and now and before == now):
            raise MedvaeError(f"already imported: MLflow run {run_id} holds this sign-off (exported "
                              f"{doc['exported_at']}); nothing logged", path)
        if before and now and now < before:
            raise MedvaeError(f"MLflow run {run_id} holds a later sign-off ({prev['verdict']}, exported "
                              f"{prev['exported_at']}) than this one (exported {doc['exported_at']}); "
                              "nothing logged", path)
    return prev


def import_verdicts(doc: dict, *, run_id: str, tracking_uri: str | None = None, path=None) -> dict[str, str]:
    """Check (:func:`check_run`) and log one verdicts document to MLflow run ``run_id``; returns the tags set."""
    client, uri = _open_store(tracking_uri, run_id, path)
    check_run(doc, run_id=run_id, client=client, uri=uri, path=path)
    return _log(doc, run_id=run_id, client=client, uri=uri, path=path)


def _logged_table(client, run_id: str) -> dict | None:
    """The run's verdict table as logged (``{"columns", "data"}``), or None when there is none; any other
    failure to read it is raised."""
    import json
    import tempfile
    from pathlib import Path

    names = {f.path for f in client.list_artifacts(run_id, str(Path(TABLE).parent))}
    if TABLE not in names:
        return None
    with tempfile.TemporaryDirectory(prefix="medvae-review-") as tmp:
        return json.loads(Path(client.download_artifacts(run_id, TABLE, tmp)).read_text(encoding="utf-8"))


def _holds(table: dict | None, doc: dict) -> bool:
    """Whether ``table`` already holds this export's case row (an attempt that logged the table and then
    lost the server before its tags)."""
    cols = (table or {}).get("columns") or []
    if "scope" not in cols or "reviewed_at" not in cols:
        return False
    i, j = cols.index("scope"), cols.index("reviewed_at")
    return any(row[i] == "case" and row[j] == str(doc.get("exported_at") or "") for row in table.get("data") or [])


def _append_rows(client, run_id: str, table: dict | None, doc: dict) -> None:
    """Append this export's rows to the run's verdict table, the earlier rows byte for byte.

    Not ``log_table``: it reads the table back through pandas, which retypes earlier rows (a note
    "0042" became 42, a slice 2.0, a time lost its exact text)."""
    import json

    from medvae.errors import MedvaeError

    rows = _rows(doc)
    cols = list(rows)
    if table is None:
        table = {"columns": cols, "data": []}
    elif table.get("columns") != cols or not isinstance(table.get("data"), list):  # not rewritten: rows lost
        raise MedvaeError(f"the run's {TABLE} is not a medvae verdict table (columns {table.get('columns')}); "
                          "nothing logged", None)
    table["data"].extend([list(r) for r in zip(*rows.values())])
    client.log_text(run_id, json.dumps(table, ensure_ascii=False), TABLE)


def _log(doc: dict, *, run_id: str, client, uri: str, path=None) -> dict[str, str]:
    from medvae import tracking
    from medvae.errors import MedvaeError

    slices = doc.get("slices") or []
    tags = {
        "medvae.review.verdict": doc["verdict"],
        "medvae.review.slices_accepted": str(sum(s["verdict"] == "accept" for s in slices)),
        "medvae.review.slices_rejected": str(sum(s["verdict"] == "reject" for s in slices)),
        "medvae.review.reviewed_at": str(doc["exported_at"]),
    }
    if doc.get("reviewer"):
        tags["medvae.review.reviewer"] = doc["reviewer"].strip()
    try:  # the table first: a retry after an outage finds no tags and logs the sign-off again
        table = _logged_table(client, run_id)
        if not _holds(table, doc):  # ... but not its rows twice
            _append_rows(client, run_id, table, doc)
        tracking.mark_as_table(client, run_id, TABLE)
        if "medvae.review.reviewer" not in tags:  # no initials this time: no earlier reviewer's stays
            with contextlib.suppress(Exception):
                client.delete_tag(run_id, "medvae.review.reviewer")
        for k, v in tags.items():
            client.set_tag(run_id, k, v)
    except MedvaeError as exc:
        raise MedvaeError(exc.message, path) from None
    except Exception as exc:
        reason = tracking.outage_reason(exc)
        raise _failed(uri, exc, f"MLflow refused the sign-off for run {run_id} ({reason})", path) from None
    return tags


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from medvae import tracking
    from medvae.errors import MedvaeError

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line per file, no bars
    docs = [(p, read_verdicts(p)) for p in args.verdicts]  # all checked before anything is logged
    targets = []
    for path, doc in docs:
        run_id = args.run_id or doc.get("run_id")
        if not run_id:
            raise MedvaeError("the page that exported this had no MLflow run (evaluated with --no-mlflow); "
                              "give --run-id", path)
        if not _RUN_ID.match(str(run_id)):
            raise MedvaeError(f"{run_id!r} is not an MLflow run id", path)
        if doc.get("run_id") and run_id != doc["run_id"]:
            raise MedvaeError(f"these verdicts were exported from the page of MLflow run {doc['run_id']}, not "
                              f"{run_id}; import them without --run-id", path)
        targets.append(run_id)
    held: dict[str, dict] = {}
    previous = []
    try:
        client, uri = _open_store(args.tracking_uri, targets[0], docs[0][0])
        for (path, doc), run_id in zip(docs, targets):  # every file against its run, before logging any
            previous.append(check_run(doc, run_id=run_id, client=client, uri=uri, path=path,
                                      held=held.get(run_id)))
            held[run_id] = {"verdict": doc["verdict"], "exported_at": doc["exported_at"]}
    except tracking.TrackingUnavailable as exc:
        print(f"medvae review: {exc}; not imported: {', '.join(str(p) for p, _ in docs)} "
              "(nothing lost; run it again later)", file=sys.stderr)
        return tracking.EXIT_TRACKING_SKIPPED
    for i, ((path, doc), run_id, prev) in enumerate(zip(docs, targets, previous)):
        try:
            tags = _log(doc, run_id=run_id, client=client, uri=uri, path=path)
        except tracking.TrackingUnavailable as exc:  # as evaluate and track sync: one line, exit 3
            left = ", ".join(str(p) for p, _ in docs[i:])
            print(f"medvae review: {exc}; not imported: {left} (nothing lost; run it again later)", file=sys.stderr)
            return tracking.EXIT_TRACKING_SKIPPED
        n = len(doc.get("slices") or [])
        who = f" by {tags['medvae.review.reviewer']}" if "medvae.review.reviewer" in tags else ""
        was = (f"; replaces its earlier sign-off ({prev['verdict']}, exported {prev['exported_at']}), "
               f"whose rows stay in {TABLE}" if prev else "")
        print(f"{path}: case {doc['verdict']}ed{who}, {n} slice verdict(s) -> MLflow run {run_id} "
              f"({tracking.redact(tracking.resolve_tracking_uri(args.tracking_uri))}){was}")
    return 0
