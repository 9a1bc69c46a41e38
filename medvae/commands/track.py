"""``medvae track sync RUN_DIR``: send what a training kept locally while MLflow was unreachable."""
from __future__ import annotations

import argparse

HELP = "MLflow tracking: send records kept while the server was unreachable (track sync RUN_DIR)"

_EPILOG = """\
When the tracking server is unreachable or dies, training goes on and keeps what it could not send
in RUN_DIR/tracking_pending.jsonl (figures under RUN_DIR/tracking_pending/). `medvae track sync
RUN_DIR` sends those records to the training's run when the server has it, and records in
RUN_DIR/tracking_synced.json what was sent: running it again sends nothing twice. A training that
was offline from its start has no run: a new one is created in the same experiment, with the
original start time. A training that lost the server midway sent its first records to its run; when
that run is not in the store, the sync is refused unless --new-run (the new run lacks what was sent
before the outage). A deleted run is refused: restore it first.

Every record is checked before the first is sent: a damaged one (or a damaged
tracking_synced.json) is a one-line error naming the file and line, and nothing is sent. A line
that is not JSON at all, as a kill mid-write leaves it (a resumed run appends after it), is skipped
with a warning naming its line: what it held is not sent.

exit status: 0 sent (or nothing left to send); 2 bad input (one-line error: no kept records, a
             damaged record, a tracking URI that is not an MLflow store or a store that does not open);
             3 the tracking server is still unavailable (nothing lost; run it again later)
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = _EPILOG
    sub = p.add_subparsers(dest="track_command", metavar="ACTION", required=True)
    s = sub.add_parser("sync", help="send RUN_DIR's kept records to MLflow", description=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("run_dir", metavar="RUN_DIR", help="a training output folder (holds tracking_pending.jsonl)")
    s.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the URI the training used, kept with the records)")
    s.add_argument("--new-run", action="store_true",
                   help="when the training's run is not in this store, send the kept records alone to a new "
                        "run (it lacks what was sent before the outage)")


def run(args: argparse.Namespace) -> int:
    import sys

    from medvae import tracking

    try:
        res = tracking.sync_pending(args.run_dir, tracking_uri=args.tracking_uri, new_run=args.new_run)
    except tracking.TrackingUnavailable as exc:
        print(f"medvae track: {exc}; nothing was lost, run it again later", file=sys.stderr)
        return tracking.EXIT_TRACKING_SKIPPED
    where = "new run" if res.new_run else "run"
    if res.sent:
        print(f"sent {res.sent} record(s) ({res.metric_values} metric values) to {where} {res.run_id} at {res.uri}"
              + (f"; {res.already} sent earlier" if res.already else ""))
    else:
        print(f"nothing to send: all {res.already} record(s) were sent earlier to run {res.run_id} at {res.uri}")
    return 0
