"""Tracking-store problems are one line, never a traceback: a bad URI or a store that does not open is
bad input (exit 2), an unreachable server stays the soft exit-3 path, and damaged kept records stop
``medvae track sync`` before anything is sent, naming the file and the line."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medvae import tracking
from medvae.cli import main
from medvae.errors import MedvaeError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there
RUN_ID = "0123456789abcdef0123456789abcdef"
SCHEMES = "sqlite, postgresql, mysql, mssql, http, https, databricks, databricks-uc, uc"


@pytest.fixture(autouse=True)
def _no_global_uri(monkeypatch):
    # mlflow.set_tracking_uri (called by tracking.configure) exports MLFLOW_TRACKING_URI: keep it per test
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _medvae(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvae", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env=_env())


def _one_line(err: str) -> str:
    """The single stderr line (progress lines of the scoring aside); fails on a traceback."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("evaluate: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


# -- review import: an unreachable server is exit 3, like evaluate and track sync -------------------

def _verdicts(path: Path) -> Path:
    path.write_text(json.dumps({"format": "medvae-review", "version": 1, "run_id": RUN_ID, "verdict": "accept",
                                "report_id": "a" * 64,
                                "n_slices": 3, "exported_at": "2026-12-06T10:00:00.000Z",
                                "slices": [{"slice": 1, "verdict": "reject", "note": "x"}]}))
    return path


def test_review_import_with_an_unreachable_server_is_one_line_and_exit_3(tmp_path):
    first, second = _verdicts(tmp_path / "a.json"), _verdicts(tmp_path / "b.json")
    t0 = time.perf_counter()
    proc = _medvae("review", "import", str(first), str(second), "--tracking-uri", UNREACHABLE, cwd=tmp_path)
    assert proc.returncode == tracking.EXIT_TRACKING_SKIPPED, proc.stderr[-3000:]
    assert time.perf_counter() - t0 < 60
    assert _one_line(proc.stderr) == (
        f"medvae review: tracking skipped: {UNREACHABLE} is unavailable (connection refused); "
        f"not imported: {first}, {second} (nothing lost; run it again later)")
    assert proc.stdout == ""


def test_review_import_does_not_create_a_store_to_look_for_the_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    f = _verdicts(tmp_path / "v.json")
    assert main(["review", "import", str(f)]) == 2
    assert capsys.readouterr().err == (
        f"medvae review: error: {f}: no MLflow store at mlruns/mlflow.db to find run {RUN_ID} in; "
        "set --tracking-uri or MLFLOW_TRACKING_URI to the evaluation's store\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json"]


def test_review_import_into_a_folder_as_store_is_one_line(tmp_path, capsys):
    f = _verdicts(tmp_path / "v.json")
    assert main(["review", "import", str(f), "--tracking-uri", f"sqlite:///{tmp_path}"]) == 2
    assert capsys.readouterr().err == (f"medvae review: error: sqlite:///{tmp_path}: cannot open the MLflow store: "
                                       "it is a folder, not an sqlite database file\n")


# -- store URIs: checked up front, opening errors in one line ----------------------------------------

@pytest.fixture
def stores(tmp_path) -> dict[str, str]:
    (tmp_path / "folder").mkdir()
    (tmp_path / "garbage.dcm").write_bytes(b"DICM" + bytes(range(256)) * 4)
    (tmp_path / "corrupt.db").write_bytes(b"SQLite format 3\x00" + b"\x01" * 2000)  # right header, no database
    import sqlite3

    con = sqlite3.connect(tmp_path / "other.db")  # another program's database: MLflow added ~70 tables to it
    con.execute("CREATE TABLE patients (name TEXT)")
    con.commit()
    con.close()
    return {"folder": f"sqlite:///{tmp_path}/folder", "garbage": f"sqlite:///{tmp_path}/garbage.dcm",
            "corrupt": f"sqlite:///{tmp_path}/corrupt.db", "other": f"sqlite:///{tmp_path}/other.db"}


def _bad_uris(stores: dict[str, str], tmp_path: Path) -> list[tuple[str, str]]:
    return [
        ("foo://bar", f"foo://bar: not an MLflow tracking URI: unknown scheme 'foo' (MLflow opens {SCHEMES})"),
        (stores["folder"], f"{stores['folder']}: cannot open the MLflow store: it is a folder, not an sqlite database file"),
        (stores["garbage"], f"{stores['garbage']}: cannot open the MLflow store: the file is not an sqlite database"),
        (stores["corrupt"], f"{stores['corrupt']}: cannot open the MLflow store: file is not a database"),
        (stores["other"], f"{stores['other']}: cannot open the MLflow store: the file is an sqlite database of "
                          "something else, not an MLflow store; name the store's own file, or a new one"),
        (f"sqlite:///{tmp_path}/garbage.dcm/x.db",
         f"sqlite:///{tmp_path}/garbage.dcm/x.db: cannot open the MLflow store: cannot create the folder "
         f"{tmp_path}/garbage.dcm (File exists)"),
        (f"file://{tmp_path}/mlruns", f"file://{tmp_path}/mlruns: a folder (file store) is not a tracking store MLflow 3 "
         "opens; use a database such as sqlite:///PATH/mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)"),
        ("https://alice:s3cret@:443/", "https://:443/: not a tracking server URL (expected https://HOST[:PORT])"),
        # a broken IPv6 address was taken for a folder ("a folder (file store) is not a tracking store")
        ("http://[::1", "http://[::1: not a tracking server URL (expected http://HOST[:PORT])"),
        # an in-memory database was accepted and its run id printed, then gone with the process
        *((uri, f"{uri}: an in-memory database: its runs would be gone when the command ends; give a file, such "
                "as sqlite:///mlruns/mlflow.db") for uri in ("sqlite://", "sqlite:///:memory:")),
    ]


def test_bad_store_uris_are_one_line_errors_at_the_choke_point(stores, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    for uri, message in _bad_uris(stores, tmp_path):
        t0 = time.perf_counter()
        with pytest.raises(MedvaeError) as err:
            with tracking.start_run("evaluation", tracking_uri=uri):
                pytest.fail(f"a run was opened in {uri}")
        assert str(err.value) == message
        assert time.perf_counter() - t0 < 30, uri  # not MLflow's minutes of engine retries
    # the same from a bare client and from the experiment lookup
    with pytest.raises(MedvaeError, match=r"corrupt\.db: cannot open the MLflow store: file is not a database$"):
        tracking.client_for(stores["corrupt"])
    with pytest.raises(MedvaeError, match=r"corrupt\.db: cannot open the MLflow store: file is not a database$"):
        tracking.ensure_experiment("evaluation", stores["corrupt"])
    with pytest.raises(MedvaeError, match=r"other\.db: cannot open the MLflow store: the file is an sqlite database of"):
        tracking.client_for(stores["other"])
    # nor by loading a model from it, or pinning a models:/ name in it
    with pytest.raises(MedvaeError, match=r"runs:/0123/model: cannot fetch the MLflow model from .*other\.db: the "
                                          "file is an sqlite database of something else"):
        tracking.model_checkpoint("runs:/0123/model", tracking_uri=stores["other"])
    assert tracking.pin_model_uri("models:/m/latest", tracking_uri=stores["other"]) == "models:/m/latest"
    (tmp_path / "empty.db").write_bytes(b"")
    with pytest.raises(MedvaeError, match="no MLflow store at"):
        tracking.model_checkpoint("runs:/0123/model", tracking_uri=f"sqlite:///{tmp_path}/empty.db")
    assert (tmp_path / "empty.db").stat().st_size == 0
    (tmp_path / "empty.db").unlink()
    # nothing was written over, nothing created
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_an_unreachable_database_server_stays_the_soft_path_and_a_missing_driver_is_bad_input():
    t0 = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailable) as err:
        tracking.check_server("postgresql://alice:s3cret@127.0.0.1:9/mlflow")
    assert str(err.value) == "tracking skipped: postgresql://127.0.0.1:9/mlflow is unavailable (connection refused)"
    assert time.perf_counter() - t0 < 5
    if any(importlib.util.find_spec(m) for m in ("psycopg", "psycopg2")):
        pytest.skip("a PostgreSQL driver is installed")
    with socket.socket() as listener:  # something answers on the port: the store itself fails to open
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"postgresql://alice:s3cret@127.0.0.1:{listener.getsockname()[1]}/mlflow"
        tracking.check_server(uri)
        with pytest.raises(MedvaeError) as bad:
            tracking.client_for(uri)
    assert str(bad.value).startswith(f"{tracking.redact(uri)}: cannot open the MLflow store: its database driver "
                                     "is not installed (No module named 'psycopg")
    assert "s3cret" not in str(bad.value)


def test_evaluate_with_a_bad_tracking_uri_is_one_line_exit_2(stores, tmp_path):
    rng = np.random.default_rng(0)
    ref = rng.normal(40, 30, (24, 24, 3)).astype(np.float32)
    paths = []
    for name, vol in (("ref.nii.gz", ref), ("rest.nii.gz", ref + rng.normal(0, 3, ref.shape).astype(np.float32))):
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / name))
        paths.append(str(tmp_path / name))
    for uri, message in [("foo://bar", f"foo://bar: not an MLflow tracking URI: unknown scheme 'foo' (MLflow opens {SCHEMES})"),
                         (stores["folder"], f"{stores['folder']}: cannot open the MLflow store: it is a folder, "
                                            "not an sqlite database file")]:
        proc = _medvae("evaluate", paths[1], paths[0], "--modality", "CT", "--tracking-uri", uri, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert _one_line(proc.stderr) == f"medvae evaluate: error: {message}"
    assert not (tmp_path / "mlruns").exists()


# -- track sync: damaged kept records are named by file and line, and nothing is sent -----------------

HEADER = {"kind": "run", "experiment": "medvae-train", "run_name": "r", "tags": {}, "run_id": None,
          "start_time": 1700000000000}
METRICS = {"kind": "metrics", "metrics": {"train_loss": 0.5}, "step": 1, "timestamp": 1700000001000}


def _lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def test_a_line_cut_short_by_a_kill_is_skipped_and_said_once(tmp_path, capsys, caplog):
    # the check before the lock and the one under it both warned: the same line twice
    run = tmp_path / "run"
    run.mkdir()
    (run / tracking.PENDING_FILE).write_text(_lines(HEADER) + '{"kind": "metrics", "metr\n' + _lines(METRICS))
    assert main(["track", "sync", str(run), "--tracking-uri", f"sqlite:///{tmp_path}/store/mlflow.db"]) == 0
    skipped = [r.getMessage() for r in caplog.records if "skipping line(s)" in r.getMessage()]
    assert skipped == [f"{run / tracking.PENDING_FILE}: skipping line(s) 2: not JSON (a write cut short by a kill?)"]


@pytest.mark.parametrize("pending, synced, where, problem", [
    (_lines({"kind": "run"}, {"kind": "metrics", "metrics": {"x": 1}}), None,
     "tracking_pending.jsonl", "line 1: the run record has no experiment name; nothing was sent"),
    (_lines(HEADER, "garbage", METRICS, {**METRICS, "metrics": {"x": "abc"}}), None,
     "tracking_pending.jsonl", "line 4: metric 'x' has value 'abc', not a number; nothing was sent"),
    (_lines(HEADER, METRICS, {"kind": "metrics", "metrics": {"x": 1.0}, "timestamp": 1}), None,
     "tracking_pending.jsonl", "line 3: a metrics record needs an integer \"step\", got None; nothing was sent"),
    (_lines(HEADER, {"kind": "params", "params": {"../up": "1"}}), None,
     "tracking_pending.jsonl", "line 2: param name '../up' is not one MLflow accepts (it is a path); nothing was sent"),
    (_lines(HEADER, [1, 2]), None, "tracking_pending.jsonl", "line 2: not a record (a JSON object expected); nothing was sent"),
    (_lines(HEADER, {"kind": "tea"}), None, "tracking_pending.jsonl", "line 2: unknown record kind 'tea'; nothing was sent"),
    (_lines(HEADER, {"kind": "end", "status": "DONE", "end_time": 5}), None, "tracking_pending.jsonl",
     "line 2: an end record's status must be one of FINISHED, FAILED, KILLED, got 'DONE'; nothing was sent"),
    (_lines(METRICS, HEADER), None, "tracking_pending.jsonl",
     "line 1: the first record must be the run record (\"kind\": \"run\") that says which run the others belong to"),
    (_lines("{cut short", "%%"), None, "tracking_pending.jsonl",  # once a warning line before the error
     "holds no readable tracking record (line(s) 1, 2: not JSON)"),
    (_lines(HEADER, METRICS), "{broken", "tracking_synced.json",
     "damaged (line 1: not JSON (Expecting property name enclosed in double quotes)); it records which kept records "
     "were sent: delete it to send them all again (metrics sent before are then logged twice)"),
    (_lines(HEADER, METRICS), '{"run_id": null, "sent": 7}', "tracking_synced.json",
     "damaged (sent must be a count of records from 0 to 2, got 7); it records which kept records were sent: "
     "delete it to send them all again (metrics sent before are then logged twice)"),
], ids=["header-without-experiment", "metric-not-a-number", "metric-without-step", "param-name-a-path",
        "not-an-object", "unknown-kind", "bad-end-status", "no-header-first", "nothing-readable", "synced-not-json", "synced-count-too-big"])
def test_sync_of_damaged_records_names_file_and_line_and_sends_nothing(tmp_path, capsys, caplog, pending, synced,
                                                                        where, problem):
    run = tmp_path / "run"
    run.mkdir()
    (run / tracking.PENDING_FILE).write_text(pending)
    if synced is not None:
        (run / tracking.SYNCED_FILE).write_text(synced)
    store = tmp_path / "store"
    assert main(["track", "sync", str(run), "--tracking-uri", f"sqlite:///{store}/mlflow.db"]) == 2
    assert capsys.readouterr().err == f"medvae track: error: {run / where}: {problem}\n"
    # a line that is not JSON (a write cut short by a kill) is said to be skipped, not fatal
    skipped = [r.getMessage() for r in caplog.records if "skipping line(s)" in r.getMessage()]
    assert skipped == ([f"{run / tracking.PENDING_FILE}: skipping line(s) 2: not JSON (a write cut short by a kill?)"]
                       if "garbage" in pending else [])
    assert not store.exists()  # checked before the store was even opened: nothing half-sent
    if synced is None:
        assert not (run / tracking.SYNCED_FILE).exists()
    else:
        assert (run / tracking.SYNCED_FILE).read_text() == synced


def test_damaged_records_from_the_audit_give_one_line_in_the_cli(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / tracking.PENDING_FILE).write_text(_lines({"kind": "run", "experiment": "e"}))
    (run / tracking.SYNCED_FILE).write_text("{broken\n")
    proc = _medvae("track", "sync", str(run), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", cwd=tmp_path)
    assert proc.returncode == 2
    assert _one_line(proc.stderr).startswith(f"medvae track: error: {run / tracking.SYNCED_FILE}: damaged (line 1: ")


def test_a_training_given_a_bad_uri_keeps_its_records_and_sync_names_the_uri(tmp_path, capsys):
    logger = tracking.RunLogger(tmp_path / "run", experiment="medvae-train", tracking_uri="foo://bar")
    logger.start()
    logger.log_metrics({"train_loss": 0.5}, step=1)
    logger.end("FINISHED")
    assert not logger.online
    assert logger.unavailable.reason == f"not an MLflow tracking URI: unknown scheme 'foo' (MLflow opens {SCHEMES})"
    capsys.readouterr()
    assert main(["track", "sync", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (f"medvae track: error: foo://bar: not an MLflow tracking URI: unknown scheme "
                                       f"'foo' (MLflow opens {SCHEMES})\n")
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    assert main(["track", "sync", str(tmp_path / "run"), "--tracking-uri", store]) == 0
    assert "sent 3 record(s) (1 metric values) to new run" in capsys.readouterr().out


# -- MLflow model URIs: one line naming the URI, no download left behind ----------------------------

def _logged_tiny_model(tmp_path: Path, uri: str) -> tuple[str, str]:
    """A tiny medvae model logged to a new run of the store ``uri``: ``(uri, run_id)``."""
    import mlflow

    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    ckpt = atomic_torch_save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)),
                                             IntensityPolicy()), tmp_path / "model.pt")
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    mlflow.set_tracking_uri(uri)
    tracking.log_medvae_model(ckpt, run_id=run_id)
    return uri, run_id


def test_a_model_log_stopped_part_way_is_marked_failed_when_the_model_is_logged_again(tmp_path, monkeypatch):
    import mlflow
    import torch

    monkeypatch.chdir(tmp_path)
    uri, run_id = _logged_tiny_model(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_run(run_id).info.experiment_id
    # what a SIGTERM during the upload leaves: a logged model of the run that stays PENDING
    left = client.create_logged_model(exp, name="model", source_run_id=run_id)
    assert str(client.get_logged_model(left.model_id).status).endswith("PENDING")
    tracking.log_medvae_model(tmp_path / "model.pt", run_id=run_id)  # what --resume does
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    status = {m.model_id: str(m.status).rsplit(".", 1)[-1] for m in models}
    assert status.pop(left.model_id) == "FAILED"
    assert list(status.values()) == ["READY"]  # the first log, which the same checkpoint does not repeat
    ckpt = tmp_path / "model.pt"
    data = torch.load(ckpt, weights_only=True)
    data["meta"] = {**data.get("meta", {}), "note": "another checkpoint"}
    torch.save(data, tmp_path / "other.pt")
    tracking.log_medvae_model(tmp_path / "other.pt", run_id=run_id)  # another checkpoint is logged
    models = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(str(m.status).rsplit(".", 1)[-1] for m in models) == ["FAILED", "READY", "READY"]
    assert client.get_run(run_id).info.status == "RUNNING"  # left as it was


def test_a_damaged_logged_model_names_the_uri_and_leaves_no_download_behind(tmp_path, monkeypatch, capsys):
    import tempfile

    import torch

    (tmp_path / "store").mkdir()
    monkeypatch.chdir(tmp_path)
    uri, run_id = _logged_tiny_model(tmp_path, f"sqlite:///{tmp_path}/store/mlflow.db")
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    model = f"runs:/{run_id}/model"
    assert tracking.load_model(model, tracking_uri=uri).source == model
    assert list(downloads.iterdir()) == []  # each restore used to leave a copy of the model in /tmp
    for logged in tmp_path.rglob("medvae.pt"):  # the logged model's copy, damaged in store or transfer
        data = bytearray(logged.read_bytes())
        at = bytes(data).find(torch.load(logged, weights_only=True)["state_dict"]["enc.0.0.conv.weight"]
                              .numpy().tobytes())
        assert at > 0
        data[at + 2] ^= 0x01
        logged.write_bytes(bytes(data))
    capsys.readouterr()
    out = tmp_path / "out.nii.gz"
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 2), np.float32), np.eye(4)), scan)
    assert main(["restore", str(scan), str(out), "--model", model, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err == f"medvae restore: error: {model}: its medvae.pt: the model file is damaged (part of it fails " \
                  "its CRC-32 check): copy it again from its source\n"  # no progress bar, no temporary path
    assert not out.exists() and list(downloads.iterdir()) == []


def test_a_run_model_that_fails_to_download_is_not_called_a_wrong_path(tmp_path, monkeypatch, capsys):
    """MLflow words a server error during a runs:/ download as "please ensure that the path is correct",
    which medvae passed on: a typo and an outage read alike."""
    import mlflow
    from mlflow.exceptions import MlflowException

    monkeypatch.chdir(tmp_path)
    uri, run_id = _logged_tiny_model(tmp_path, f"sqlite:///{tmp_path}/mlflow.db")

    def broken(**kw):  # what MLflow raises after a 500 on the file's GET
        raise MlflowException(f"Failed to download artifacts from path {kw['artifact_uri'].split('/')[-1]!r}, "
                              "please ensure that the path is correct.")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    with pytest.raises(MedvaeError, match="the run holds it, but its files could not be downloaded"):
        tracking.model_checkpoint(f"runs:/{run_id}/model", tracking_uri=uri)
    with pytest.raises(MedvaeError, match="please ensure that the path is correct"):  # a typo stays one
        tracking.model_checkpoint(f"runs:/{run_id}/modl", tracking_uri=uri)
    # a store folder that cannot be opened to lock it (mode 0711, another owner): the store check reads on
    import contextlib

    from medvae.tracking import store

    @contextlib.contextmanager
    def denied(uri):
        raise PermissionError(13, "Permission denied")
        yield

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(store, "_store_lock", denied)
        assert store.sqlite_store_problem(uri, tmp_path / "mlflow.db") is None
    # evaluate skips its model check then, as for a store it cannot reach (it refused the run, exit 2)
    from argparse import Namespace

    from medvae.commands.evaluate import _check_model

    capsys.readouterr()
    _check_model(Namespace(model_uri=f"runs:/{run_id}/model", tracking_uri=uri, uncertainty=None))
    assert "note: cannot check --model-uri: " in capsys.readouterr().err
    with pytest.raises(MedvaeError, match="please ensure that the path is correct"):
        _check_model(Namespace(model_uri=f"runs:/{run_id}/modl", tracking_uri=uri, uncertainty=None))


def test_path_digests_in_mlflow_are_keyed_and_the_key_is_kept_owner_only(tmp_path, monkeypatch, caplog):
    """An unkeyed sha1 of a logged path gave a six-digit patient ID back in 1.5 s of guessing."""
    import hashlib
    import stat

    from medvae import identifiers
    from medvae.models.label import model_label
    from medvae.tracking.params import config_params

    paths = ["/data/DOE^JANE_PID123456/ct.nii.gz"]
    digest = config_params({"data": {"paths": paths}})["data.paths_sha1"]
    assert digest != hashlib.sha1(repr(paths).encode()).hexdigest()[:12]  # what a guess would be checked against
    monkeypatch.setenv("MEDVAE_DIGEST_KEY", "another installation")
    assert config_params({"data": {"paths": paths}})["data.paths_sha1"] != digest
    # no key given: one is made on first use, owner-only, and kept (the same digest in the next run)
    monkeypatch.delenv("MEDVAE_DIGEST_KEY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    first = model_label("DOE^JANE/no_such_model.pt")
    key = tmp_path / "config" / "medvae" / "digest.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(key.read_bytes().strip()) == 64
    assert model_label("DOE^JANE/no_such_model.pt") == first
    # nowhere to keep one: a key for this process, said once
    monkeypatch.setenv("XDG_CONFIG_HOME", str(key))  # a file, not a folder
    monkeypatch.setattr(identifiers, "_session_key", None)
    with caplog.at_level("WARNING", logger="medvae"):
        a, b = identifiers.keyed_digest("x"), identifiers.keyed_digest("x")
    assert a == b and sum("cannot keep a digest key" in r.message for r in caplog.records) == 1
    # an empty key file (a crash): an HMAC under b"" is public, so it is not used
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "crashed"))
    (tmp_path / "crashed" / "medvae").mkdir(parents=True)
    (tmp_path / "crashed" / "medvae" / "digest.key").write_bytes(b"")
    monkeypatch.setattr(identifiers, "_session_key", None)
    with caplog.at_level("WARNING", logger="medvae"):
        assert identifiers.digest_key() not in (b"", key.read_bytes().strip())
    assert "digest.key is 0 bytes long; remove the file to make a new one" in caplog.text
    # a relative XDG_CONFIG_HOME is ignored (the XDG rule: the key moved with the working folder); a short
    # key given in the environment is used, and said to be guessable
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert identifiers.key_file() == tmp_path / "home" / ".config" / "medvae" / "digest.key"
    monkeypatch.setenv("MEDVAE_DIGEST_KEY", "x")
    monkeypatch.setattr(identifiers, "_short_said", False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="medvae"):
        assert identifiers.digest_key() == b"x" and identifiers.digest_key() == b"x"
    assert caplog.text.count("MEDVAE_DIGEST_KEY is 1 bytes long: a short key can be guessed") == 1


def test_processes_making_the_digest_key_at_once_all_get_the_one_kept(tmp_path):
    """The process that lost the race to create the key file read it before the winner had written it,
    and hashed under an empty key (82 of 1600 processes)."""
    import multiprocessing

    from medvae import identifiers

    ctx = multiprocessing.get_context("fork")
    for trial in range(8):
        folder = tmp_path / str(trial)
        with ctx.Pool(4) as pool:
            keys = pool.map(_key_in, [str(folder)] * 4)
        kept = (folder / "medvae" / "digest.key").read_bytes().strip()
        assert set(keys) == {kept} and len(kept) >= identifiers.MIN_KEY_BYTES
        assert [p.name for p in (folder / "medvae").iterdir()] == ["digest.key"]  # no staging file left


def _key_in(config_home: str) -> bytes:
    os.environ.pop("MEDVAE_DIGEST_KEY", None)
    os.environ["XDG_CONFIG_HOME"] = config_home
    from medvae import identifiers

    return identifiers.digest_key()


def test_a_new_job_in_a_folder_ends_the_run_an_earlier_killed_job_left_running(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    first = tracking.RunLogger(tmp_path / "run", experiment="t", tracking_uri=uri)
    first.start()  # then killed before its first checkpoint: nothing to resume, the run left RUNNING
    second = tracking.RunLogger(tmp_path / "run", experiment="t", tracking_uri=uri)
    second.start()
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert second.run_id != first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"  # it said RUNNING for good
    assert client.get_run(second.run_id).info.status == "RUNNING"
    second.end("FINISHED")
    third = tracking.RunLogger(tmp_path / "run", experiment="t", tracking_uri=uri)
    third.start()  # a finished run is left as it is
    assert client.get_run(second.run_id).info.status == "FINISHED"


def test_a_signal_inside_a_tracking_write_is_held_to_the_write_s_end(tmp_path, monkeypatch):
    """SIGTERM raised inside MLflow's sqlite INSERT left its write lock held: ending the run waited 20 s,
    failed with three tracebacks and left it RUNNING. The write now ends first, then the signal acts."""
    import os
    import signal

    import mlflow
    import sqlalchemy.engine.default as sa_default

    from medvae.runtime import Terminated, termination_as_interrupt

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = tracking.RunLogger(tmp_path / "run", experiment="t", tracking_uri=uri)
    logger.start()
    original = sa_default.DefaultDialect.do_executemany

    def insert_then_signal(self, cursor, statement, parameters, context=None):
        original(self, cursor, statement, parameters, context)
        if "INSERT INTO metrics" in statement:  # the row written, its transaction not yet committed
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(sa_default.DefaultDialect, "do_executemany", insert_then_signal)
    with termination_as_interrupt(), pytest.raises(Terminated):
        logger.log_metrics({"loss": 0.5, "kl": 0.1}, step=1)
    monkeypatch.setattr(sa_default.DefaultDialect, "do_executemany", original)
    start = time.monotonic()
    logger.end("KILLED")
    assert time.monotonic() - start < 5  # no lock left behind
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(logger.run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"loss": 0.5, "kl": 0.1}

    def signal_then_fail():  # a write that fails after the signal came: kept offline, and the signal still acts
        os.kill(os.getpid(), signal.SIGTERM)
        raise OSError("disk I/O error")

    logger = tracking.RunLogger(tmp_path / "run2", experiment="t", tracking_uri=uri)
    logger.start()
    with termination_as_interrupt(), pytest.raises(Terminated):
        logger._send({"kind": "metrics", "metrics": {"loss": 1.0}, "step": 2}, signal_then_fail)
    assert not logger.online and '"loss": 1.0' in logger.pending.read_text()
