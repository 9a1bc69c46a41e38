"""``medvae review import VERDICTS.json``: log a clinician's sign-off to the evaluation's MLflow run.

The review page (``index.html`` of ``medvae evaluate --report`` or ``medvae demo``) exports the
reviewer's verdicts as JSON, without any server. This command checks that file and records it in
the MLflow run the page came from (its id is in the file, the page's footer and ``summary.json``):

* tags ``medvae.review.verdict`` (accept / reject), ``medvae.review.slices_accepted``,
  ``medvae.review.slices_rejected``, ``medvae.review.reviewed_at`` and, only when the reviewer gave
  them, ``medvae.review.reviewer`` (initials);
* the table artifact ``review/verdicts.json`` (one row for the case and one per marked slice, with
  the notes); a later import appends to it.

The run is not reopened, so its status and duration stay those of the evaluation.

exit status: 0 imported; 2 bad input (one-line error naming the file: a bad export, an unknown run,
             a tracking URI that is not an MLflow store or a store that does not open);
             3 the tracking server is unavailable (one line names the files not imported; run it again later)
"""
from __future__ import annotations

import argparse
import re

HELP = "clinical sign-off: import the verdicts exported by a review page into its MLflow run"

FORMAT = "medvae-review"
VERDICTS = ("accept", "reject")
_INITIALS = re.compile(r"^[A-Za-z][A-Za-z.\- ]{0,7}$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
TABLE = "review/verdicts.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    imp = sub.add_parser("import", help="log exported verdicts (JSON from a review page) to the evaluation's run",
                         description=__doc__.split("\n\n", 1)[1])
    imp.formatter_class = argparse.RawDescriptionHelpFormatter
    imp.add_argument("verdicts", nargs="+", metavar="VERDICTS.json", help="file(s) exported by review pages")
    imp.add_argument("--run-id", default=None,
                     help="the MLflow run to log to, when the page had none (evaluated with --no-mlflow)")
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
        raise MedvaeError("reviewer must be initials (up to 8 letters), not a name", path)
    n = doc.get("n_slices")
    slices = doc.get("slices") or []
    if not isinstance(slices, list):
        raise MedvaeError("\"slices\" must be a list", path)
    for item in slices:
        if not isinstance(item, dict) or item.get("verdict") not in VERDICTS:
            raise MedvaeError(f"every slice needs a verdict accept or reject, got {item!r}"[:200], path)
        s = item.get("slice")
        if not isinstance(s, int) or s < 1 or (isinstance(n, int) and s > n):
            raise MedvaeError(f"slice number {s!r} is not in 1..{n}", path)
    return doc


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


def import_verdicts(doc: dict, *, run_id: str, tracking_uri: str | None = None, path=None) -> dict[str, str]:
    """Log one checked verdicts document to MLflow run ``run_id``; returns the tags set."""
    from medvae import tracking
    from medvae.errors import MedvaeError

    uri = tracking.resolve_tracking_uri(tracking_uri)
    db = tracking._sqlite_path(uri)
    if db is not None and not db.exists():  # do not create an empty store just to find no run in it
        raise MedvaeError(f"no MLflow store at {db} to find run {run_id} in; set --tracking-uri or "
                          "MLFLOW_TRACKING_URI to the evaluation's store", path)
    uri = tracking.configure(uri)
    tracking.check_server(uri)
    client = tracking.client_for(uri)

    def failed(exc: Exception, what: str) -> Exception:
        # a server that stopped answering is the soft exit-3 path, not "no such run"
        if tracking.is_outage(exc):
            return tracking.TrackingUnavailable(uri, tracking.outage_reason(exc))
        return MedvaeError(what, path)

    try:
        run = client.get_run(run_id)
    except Exception as exc:
        raise failed(exc, f"no MLflow run {run_id} in {tracking.redact(uri)}") from None
    slices = doc.get("slices") or []
    tags = {
        "medvae.review.verdict": doc["verdict"],
        "medvae.review.slices_accepted": str(sum(s["verdict"] == "accept" for s in slices)),
        "medvae.review.slices_rejected": str(sum(s["verdict"] == "reject" for s in slices)),
        "medvae.review.reviewed_at": str(doc.get("exported_at") or ""),
    }
    if doc.get("reviewer"):
        tags["medvae.review.reviewer"] = doc["reviewer"].strip()
    try:
        for k, v in tags.items():
            client.set_tag(run.info.run_id, k, v)
        client.log_table(run.info.run_id, data=_rows(doc), artifact_file=TABLE)
    except Exception as exc:
        reason = tracking.outage_reason(exc)
        raise failed(exc, f"MLflow refused the sign-off for run {run_id} ({reason})") from None
    return tags


def run(args: argparse.Namespace) -> int:
    import sys

    from medvae import tracking
    from medvae.errors import MedvaeError

    docs = [(p, read_verdicts(p)) for p in args.verdicts]  # all checked before anything is logged
    for path, doc in docs:
        run_id = args.run_id or doc.get("run_id")
        if not run_id:
            raise MedvaeError("the page that exported this had no MLflow run (evaluated with --no-mlflow); "
                              "give --run-id", path)
        if not _RUN_ID.match(str(run_id)):
            raise MedvaeError(f"{run_id!r} is not an MLflow run id", path)
    for i, (path, doc) in enumerate(docs):
        run_id = args.run_id or doc["run_id"]
        try:
            tags = import_verdicts(doc, run_id=run_id, tracking_uri=args.tracking_uri, path=path)
        except tracking.TrackingUnavailable as exc:  # as evaluate and track sync: one line, exit 3
            left = ", ".join(str(p) for p, _ in docs[i:])
            print(f"medvae review: {exc}; not imported: {left} (nothing lost; run it again later)", file=sys.stderr)
            return tracking.EXIT_TRACKING_SKIPPED
        n = len(doc.get("slices") or [])
        who = f" by {tags['medvae.review.reviewer']}" if "medvae.review.reviewer" in tags else ""
        print(f"{path}: case {doc['verdict']}ed{who}, {n} slice verdict(s) -> MLflow run {run_id} "
              f"({tracking.redact(tracking.resolve_tracking_uri(args.tracking_uri))})")
    return 0
