"""Tracking outages: a server killed during training, an unreachable URI, concurrent first use of the
default store. Real subprocesses (``mlflow server``, ``medvae``), tiny trainings."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tiny_training import TINY
from medvae import tracking
from medvae.errors import MedvaeError

UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens there


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _medvae(*args: str, cwd: Path, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medvae", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env(**env))


class Server:
    """A real ``mlflow server`` (sqlite, 127.0.0.1, one worker) in its own process group."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self) -> str:
        port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.folder}/server.db",
             "--artifacts-destination", str(self.folder / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            env=_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.uri = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return self.uri
            except OSError:
                pass
            assert self.proc.poll() is None, self.proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "mlflow server did not become healthy in 90 s"
            time.sleep(0.3)

    def kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: the server forks workers
        self.proc.wait(timeout=20)


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path / "server")
    s.folder.mkdir()
    yield s
    s.kill()


def tiny_overrides(dev: Path) -> list[str]:
    return [
        f"data.paths=['{dev}/nifti/heudiconv_axasc35.nii.gz', '{dev}/dicom/pydicom/CT_small.dcm']",
        f"data.val_paths=['{dev}/dicom/pydicom/MR_small.dcm']", *TINY,
        "data.samples_per_epoch=40", "optim.epochs=3", "tracking.review_slices=1", "tracking.log_every=2",
    ]


def test_server_killed_during_training_then_sync_sends_everything_once(dev_data, tmp_path, server):
    import mlflow

    uri = server.start()
    out = tmp_path / "run"
    train = subprocess.Popen(
        [sys.executable, "-m", "medvae", "train", *tiny_overrides(dev_data), f"output_dir={out}",
         "--tracking-uri", uri, "--device", "cpu"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        deadline = time.time() + 240
        while not (out / "last.pt").is_file():  # epoch 1 is done and logged: the server goes down
            assert train.poll() is None, train.communicate()[1][-3000:]
            assert time.time() < deadline, "epoch 1 did not finish in 240 s"
            time.sleep(0.05)
        server.kill()
        killed = time.time()
        stdout, stderr = train.communicate(timeout=240)
        after_kill = time.time() - killed
    finally:
        if train.poll() is None:
            train.kill()
    # the run completed, with its checkpoints, and said once that tracking was skipped
    assert train.returncode == tracking.EXIT_TRACKING_SKIPPED, stderr[-3000:]
    assert "Traceback" not in stderr
    print(f"training ended {after_kill:.1f} s after the server was killed")
    assert after_kill < 60, f"training stalled {after_kill:.0f} s after the server died"
    for name in ("last.pt", "best.pt", "model.pt"):
        assert (out / name).is_file()
    assert "trained 3 epoch(s), 30 steps" in stdout
    skipped = [line for line in stderr.splitlines() if "tracking skipped" in line]
    assert skipped and all(uri in line for line in skipped)
    kept = tracking.read_pending(out)
    assert kept[0]["kind"] == "run" and kept[0]["run_id"] == (out / tracking.RUN_ID_FILE).read_text()
    assert {"metrics", "end"} <= {r["kind"] for r in kept}

    # the server comes back (same store); sync sends what was kept to the same run
    uri = server.start()
    first = _medvae("track", "sync", str(out), "--tracking-uri", uri, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    run_id = (out / tracking.RUN_ID_FILE).read_text()
    assert run_id == kept[0]["run_id"] and f"to run {run_id}" in first.stdout
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    # every metric of the training is on the server: losses at step 1 and every 2nd step, one
    # validation per epoch
    loss_steps = sorted(m.step for m in client.get_metric_history(run_id, "train_loss"))
    assert loss_steps == [1, *range(2, 31, 2)]
    assert sorted(m.step for m in client.get_metric_history(run_id, "val_psnr")) == [10, 20, 30]
    assert run.data.params["model.channels"] == "[4, 8]"
    arts = {a.path for a in client.list_artifacts(run_id, "review")}
    assert {"review/epoch_001.png", "review/epoch_002.png", "review/epoch_003.png"} <= arts
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt"}
    # the run lasted as long as the training, from its start (not from the first log call)
    assert run.info.end_time - run.info.start_time >= 1000
    assert run.info.start_time <= min(m.timestamp for m in client.get_metric_history(run_id, "train_loss"))
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND

    # a second sync sends nothing twice
    second = _medvae("track", "sync", str(out), "--tracking-uri", uri, cwd=tmp_path)
    assert second.returncode == 0 and "nothing to send" in second.stdout, second.stderr[-2000:]
    assert len(client.get_metric_history(run_id, "train_loss")) == len(loss_steps)
    assert len(client.get_metric_history(run_id, "val_psnr")) == 3


def _scan_pair(dev: Path, folder: Path) -> tuple[Path, Path]:
    import nibabel as nib

    img = nib.load(dev / "nifti" / "heudiconv_axasc35.nii.gz")
    ref = np.asarray(img.dataobj, dtype=np.float32)
    noisy = ref + np.random.default_rng(0).normal(0, 0.05 * float(ref.std()), ref.shape).astype(np.float32)
    folder.mkdir()
    paths = folder / "ref.nii.gz", folder / "restored.nii.gz"
    nib.save(nib.Nifti1Image(ref, img.affine), paths[0])
    nib.save(nib.Nifti1Image(noisy, img.affine), paths[1])
    return paths


def test_unreachable_server_is_answered_in_seconds_with_local_outputs(dev_data, tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(tracking.TrackingUnavailable, match=r"127\.0\.0\.1:9 is unavailable \(connection refused\)"):
        tracking.check_server(UNREACHABLE)
    assert time.perf_counter() - t0 < 5

    ref, restored = _scan_pair(dev_data, tmp_path / "scans")
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.perf_counter()
    proc = _medvae("evaluate", str(restored), str(ref), "--report", "review",
                   "--model-uri", "models:/medvae/latest",  # pinned only where the server answers
                   cwd=work, MLFLOW_TRACKING_URI=UNREACHABLE)
    took = time.perf_counter() - t0
    assert proc.returncode == tracking.EXIT_TRACKING_SKIPPED, proc.stderr[-3000:]
    assert took < 90  # imports and the scoring included; MLflow's own retries alone took 254 s
    # one line says so (progress lines aside), no traceback
    assert [line for line in proc.stderr.splitlines() if "tracking" in line.lower() or "mlflow" in line.lower()] == [
        "medvae evaluate: tracking skipped: http://127.0.0.1:9 is unavailable (connection refused)"]
    assert "Traceback" not in proc.stderr
    for name in ("index.html", "summary.json", "metrics.csv"):
        assert (work / "review" / name).is_file()
    assert json.loads((work / "review" / "summary.json").read_text())["n_slices"] > 0
    assert not (work / "mlruns").exists()


def test_training_logger_goes_local_at_once_when_the_server_is_unreachable(tmp_path):
    logger = tracking.RunLogger(tmp_path / "run", experiment="x", tracking_uri=UNREACHABLE)
    t0 = time.perf_counter()
    logger.start()
    logger.log_params({"a": 1})
    logger.log_metrics({"loss": 0.5, "nan": float("nan")}, step=3)
    logger.end("FINISHED")
    assert time.perf_counter() - t0 < 5
    assert not logger.online and logger.unavailable.reason == "connection refused"
    kept = tracking.read_pending(tmp_path / "run")
    assert [r["kind"] for r in kept] == ["run", "params", "metrics", "end"]
    assert kept[0]["uri"] == UNREACHABLE and kept[0]["run_id"] is None
    assert kept[2]["metrics"] == {"loss": 0.5} and kept[2]["step"] == 3
    # still unreachable: sync says so and keeps everything
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.sync_pending(tmp_path / "run")
    assert not (tmp_path / "run" / tracking.SYNCED_FILE).exists()


def _unreachable_line(folder: Path) -> str:
    return (f"tracking skipped: {UNREACHABLE} is unavailable (connection refused); the work goes on and keeps its "
            f"MLflow records in {folder / tracking.PENDING_FILE}; send them later with: medvae track sync {folder}")


def test_the_logger_checks_the_server_before_the_work_and_warns_once(tmp_path, caplog):
    folder = tmp_path / "run"
    logger = tracking.RunLogger(folder, experiment="x", tracking_uri=UNREACHABLE)
    t0 = time.perf_counter()
    with caplog.at_level("WARNING", logger="medvae.tracking"):
        assert logger.check() is False
        assert [r.getMessage() for r in caplog.records] == [_unreachable_line(folder)]
        assert not folder.exists()  # checking writes nothing
        logger.start()
        logger.log_metrics({"loss": 0.5}, step=1)
        logger.end("FINISHED")
    assert time.perf_counter() - t0 < 5
    assert len(caplog.records) == 1  # start() does not try (and warn) again
    assert [r["kind"] for r in tracking.read_pending(folder)] == ["run", "metrics", "end"]


def test_training_says_the_server_is_unreachable_before_reading_any_data(dev_data, tmp_path, monkeypatch, caplog):
    from medvae.training import data
    from medvae.training.config import load_config
    from medvae.training.loop import train

    def no_data(*args, **kwargs):
        assert [r.getMessage() for r in caplog.records if r.name == "medvae.tracking"] == [_unreachable_line(out)]
        raise MedvaeError("stop here: the data would be read now")

    out = tmp_path / "run"
    monkeypatch.setattr(data, "build_training_data", no_data)
    cfg = load_config(None, [*tiny_overrides(dev_data), f"output_dir={out}", f"tracking.uri={UNREACHABLE}",
                             "device=cpu"])
    with caplog.at_level("WARNING"), pytest.raises(MedvaeError, match="stop here"):
        train(cfg)
    assert not out.exists()  # bad data after the check: still nothing written


def test_training_with_an_unreachable_server_says_so_first_and_exits_3(dev_data, tmp_path):
    out = tmp_path / "run"
    proc = _medvae("train", *tiny_overrides(dev_data), "optim.epochs=1", "data.samples_per_epoch=8",
                   f"output_dir={out}", "--tracking-uri", UNREACHABLE, "--device", "cpu", cwd=tmp_path)
    assert proc.returncode == tracking.EXIT_TRACKING_SKIPPED, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    # the first line of the run, before any training step, says where the records go and how to send them
    assert lines[0].endswith(" " + _unreachable_line(out)), lines[:3]
    assert any("epoch 1/1 done" in line for line in lines[1:])
    assert sum(str(tracking.PENDING_FILE) in line for line in lines) == 1 and "Traceback" not in proc.stderr
    assert lines[-1] == (f"medvae train: tracking skipped: {UNREACHABLE} is unavailable (connection refused); "
                         f"send the kept records with: medvae track sync {out}")
    assert "trained 1 epoch(s)" in proc.stdout and (out / "model.pt").is_file()
    assert {"run", "params", "metrics", "end"} <= {r["kind"] for r in tracking.read_pending(out)}


def test_a_machine_without_mlflow_keeps_the_records_for_a_later_sync(tmp_path, monkeypatch):
    # a bare GPU node has torch but not mlflow (nor requests): training must log locally, not crash
    for name in ("mlflow", "requests"):
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow` raises ImportError
    logger = tracking.RunLogger(tmp_path / "run", experiment="medvae-train", run_name="gpu")
    logger.start()
    logger.log_metrics({"train_loss": 0.25}, step=1)
    logger.end("FINISHED")
    assert not logger.online and logger.unavailable.reason.startswith("ModuleNotFoundError")
    assert "mlflow" in logger.unavailable.reason
    monkeypatch.undo()
    res = tracking.sync_pending(tmp_path / "run", tracking_uri=f"sqlite:///{tmp_path}/store/mlflow.db")
    assert res.new_run and res.metric_values == 1


_FIRST_USE = """
import sys, time
from medvae import tracking
while time.time() < float(sys.argv[1]):
    time.sleep(0.001)
with tracking.start_run("evaluation", run_name="concurrent") as run:
    import mlflow
    mlflow.log_metric("x", 1.0)
print(run.info.run_id)
"""


def test_concurrent_first_use_of_the_default_store_both_succeed(tmp_path):
    go = time.time() + 4  # all start together, after their imports
    procs = [subprocess.Popen([sys.executable, "-c", _FIRST_USE, str(go)], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    exp = client.get_experiment_by_name("evaluation")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(out.strip() for _, out, _ in results)
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.EXPERIMENT_KIND


def test_model_uri_without_a_store_creates_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(MedvaeError, match=r"models:/medvae/1: no MLflow store at mlruns/mlflow.db"):
        tracking.load_model("models:/medvae/1")
    with pytest.raises(MedvaeError, match=r"cannot fetch the MLflow model: http://127.0.0.1:9 is unavailable"):
        tracking.model_checkpoint("runs:/abc/model", tracking_uri=UNREACHABLE)
    # a name that moves is kept as given where no store answers: none created, no retries waited out
    assert tracking.pin_model_uri("models:/medvae/latest") == "models:/medvae/latest"
    assert tracking.pin_model_uri("models:/medvae@prod", tracking_uri=UNREACHABLE) == "models:/medvae@prod"
    assert list(tmp_path.iterdir()) == []


def test_sync_of_a_run_the_server_never_saw_makes_one_run_once(tmp_path, monkeypatch):
    import mlflow
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)  # artifacts of a sqlite store go to ./mlruns
    folder = tmp_path / "run"
    logger = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=UNREACHABLE, run_name="r1")
    logger.start()
    logger.log_params({"model.channels": "[4, 8]"})
    for step in (1, 2, 3):
        logger.log_metrics({"train_loss": 1.0 / step}, step=step)
    logger.log_figure(plt.figure(), "review/epoch_001.png")
    logger.end("FINISHED")
    assert (folder / "tracking_pending" / "review" / "epoch_001.png").is_file()

    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    res = tracking.sync_pending(folder, tracking_uri=store)
    assert res.new_run and res.sent == 7 and res.metric_values == 3
    assert (folder / tracking.RUN_ID_FILE).read_text() == res.run_id
    client = mlflow.MlflowClient(tracking_uri=store)
    run = client.get_run(res.run_id)
    assert run.info.run_name == "r1" and run.info.status == "FINISHED"
    assert run.info.start_time == logger.start_time  # the training's own start, not the sync's
    assert [(m.step, m.value) for m in client.get_metric_history(res.run_id, "train_loss")] == [
        (1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert run.data.params == {"model.channels": "[4, 8]"}
    assert [a.path for a in client.list_artifacts(res.run_id, "review")] == ["review/epoch_001.png"]

    again = tracking.sync_pending(folder, tracking_uri=store)
    assert (again.run_id, again.sent, again.already, again.new_run) == (res.run_id, 0, 7, False)
    assert len(client.get_metric_history(res.run_id, "train_loss")) == 3
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_sync_of_a_job_that_lost_its_run_midway_is_refused_unless_a_new_run_is_asked(tmp_path, monkeypatch):
    # the kept records alone went to a new run in another store: params and the first steps missing,
    # marked FINISHED, without a word; a deleted run took records until the model; two syncs sent all twice
    import mlflow
    from mlflow.exceptions import MlflowException

    from medvae.io.atomic import exclusive

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run"
    first = f"sqlite:///{tmp_path}/a/mlflow.db"
    logger = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=first)
    logger.start()
    logger.log_params({"optim.lr": "0.001"})
    logger.log_metrics({"train_loss": 1.0}, step=1)

    def down(self, *a, **k):
        raise MlflowException("API request to http://h/api/2.0/mlflow/runs/log-batch failed with error code 503")

    with monkeypatch.context() as m:
        m.setattr(mlflow.MlflowClient, "log_batch", down)
        logger.log_metrics({"train_loss": 0.5}, step=2)
    logger.end("FINISHED")
    other = f"sqlite:///{tmp_path}/b/mlflow.db"
    with pytest.raises(MedvaeError, match=f"MLflow run {logger.run_id}, which holds what this job sent before it "
                                          "lost the server, is not in sqlite:///.*/b/mlflow.db: .*--new-run"):
        tracking.sync_pending(folder, tracking_uri=other)
    assert (folder / tracking.RUN_ID_FILE).read_text() == logger.run_id  # the link to the run is kept
    with exclusive(folder / tracking.PENDING_FILE):  # a sync going on
        with pytest.raises(MedvaeError, match="another `medvae track sync` is sending these records now"):
            tracking.sync_pending(folder, tracking_uri=first)
    client = mlflow.MlflowClient(tracking_uri=first)
    client.delete_run(logger.run_id)
    with pytest.raises(MedvaeError, match=f"MLflow run {logger.run_id} is deleted in .*restore it"):
        tracking.sync_pending(folder, tracking_uri=first)
    client.restore_run(logger.run_id)
    shutil.copytree(folder, tmp_path / "copy")
    res = tracking.sync_pending(folder, tracking_uri=first)
    assert res.run_id == logger.run_id and not res.new_run
    assert [m.step for m in client.get_metric_history(res.run_id, "train_loss")] == [1, 2]
    alone = tracking.sync_pending(tmp_path / "copy", tracking_uri=other, new_run=True)  # asked for
    steps = [m.step for m in mlflow.MlflowClient(tracking_uri=other).get_metric_history(alone.run_id, "train_loss")]
    assert alone.new_run and steps == [2]


def test_sync_into_the_run_a_resumed_job_made_sends_no_step_twice(tmp_path, monkeypatch):
    # kept offline up to step 4, killed; resumed online from its checkpoint at step 2 (steps 3-6 logged
    # again into a new run); the sync once added steps 3 and 4 a second time
    import mlflow

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run"
    offline = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=UNREACHABLE)
    offline.start()
    for step in (1, 2, 3, 4):
        offline.log_metrics({"train_loss": 1.0 / step}, step=step)
    store = f"sqlite:///{tmp_path}/store/mlflow.db"
    online = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=store, resume=True)
    online.start()
    for step in (3, 4, 5, 6):
        online.log_metrics({"train_loss": 1.0 / step}, step=step)
    online.end("FINISHED")
    res = tracking.sync_pending(folder, tracking_uri=store)
    assert res.run_id == online.run_id and not res.new_run
    history = mlflow.MlflowClient(tracking_uri=store).get_metric_history(res.run_id, "train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]


def test_sync_keeps_the_kept_status_and_end_time_after_sending_the_model(tmp_path, monkeypatch):
    # logging the model reopened the run and ended it FINISHED at the sync's time: a killed training
    # was shown as finished; then a sync to a second store made the first one get everything again
    import mlflow

    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.vae import MaskedVAE, VAEConfig

    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "run"
    folder.mkdir()
    model = atomic_torch_save(checkpoint_dict(MaskedVAE(VAEConfig(channels=(4, 8), latent_channels=2)),
                                              IntensityPolicy()), folder / "model.pt")
    logger = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=UNREACHABLE)
    logger.start()
    logger.log_metrics({"train_loss": 1.0}, step=1)
    logger.log_model(model)
    logger.end("KILLED")
    end_time = tracking.read_pending(folder)[-1]["end_time"]
    store = f"sqlite:///{tmp_path}/a/mlflow.db"
    res = tracking.sync_pending(folder, tracking_uri=store)
    info = mlflow.MlflowClient(tracking_uri=store).get_run(res.run_id).info
    assert (info.status, info.end_time) == ("KILLED", end_time)
    with pytest.raises(MedvaeError, match="4 of these records were sent to sqlite:///.*/a/mlflow.db already"):
        tracking.sync_pending(folder, tracking_uri=f"sqlite:///{tmp_path}/b/mlflow.db")
    assert not (tmp_path / "b").exists()  # refused before the other store's folder was made
    assert tracking.sync_pending(folder, tracking_uri=store).sent == 0


def test_a_record_kept_after_a_write_cut_short_starts_a_line_of_its_own(tmp_path):
    folder = tmp_path / "run"
    logger = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=UNREACHABLE)
    logger.start()
    with open(folder / "tracking_pending.jsonl", "a") as fh:
        fh.write('{"kind": "metrics", "metr')  # the job was killed mid-write
    resumed = tracking.RunLogger(folder, experiment="medvae-train", tracking_uri=UNREACHABLE, resume=True)
    resumed.start()
    resumed.log_metrics({"train_loss": 0.5}, step=7)  # once joined to the fragment and skipped with it
    kept = [r for r in tracking.read_pending(folder) if r.get("kind") == "metrics"]
    assert kept and kept[-1]["step"] == 7 and kept[-1]["metrics"] == {"train_loss": 0.5}


def test_outage_messages_never_show_a_password_and_name_server_errors():
    from mlflow.exceptions import MlflowException

    from medvae.tracking.outage import is_outage, outage_reason

    wrapped = MlflowException("The following failures occurred while downloading one or more artifacts from "
                              "http://user:secret@h:5000/api: {'report/metrics.csv': \"HTTPError('500 Server "
                              "Error: INTERNAL SERVER ERROR for url: http://user:secret@h:5000/x')\"}")
    assert is_outage(wrapped) and outage_reason(wrapped) == "HTTP 500"  # was "holds no review report"
    retries = MlflowException("API request to http://user:secret@h:5000/api/2.0/mlflow/runs/log-batch failed with "
                              "exception HTTPConnectionPool(host='h', port=5000): Max retries exceeded with url: x "
                              "(Caused by ResponseError('too many 500 error responses'))")
    assert outage_reason(retries) == "HTTP 500"
    odd = MlflowException("API request to http://user:secret@h:5000/api/2.0/x failed: the proxy said " + "no " * 80)
    message = str(tracking.TrackingUnavailable("http://user:secret@h:5000", outage_reason(odd)))
    assert "secret" not in message and "user" not in message and message.endswith("...)")


def test_a_report_written_without_its_run_names_no_run_in_summary_json(dev_data, tmp_path, monkeypatch, capsys):
    # the server went away after the run was opened: the page had no run id, summary.json still named the run
    import medvae.tracking
    from medvae.cli import main

    ref, restored = _scan_pair(dev_data, tmp_path / "scans")
    monkeypatch.chdir(tmp_path)

    def gone(*a, **k):
        raise tracking.TrackingUnavailable("http://h:5000", "connection lost")

    monkeypatch.setattr(medvae.tracking, "log_params", gone)
    rc = main(["evaluate", str(restored), str(ref), "--report", "rep", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert rc == tracking.EXIT_TRACKING_SKIPPED, capsys.readouterr().err
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert "mlflow_run_id" not in summary and '"run_id":null' in (tmp_path / "rep" / "index.html").read_text()


def test_a_run_cut_by_an_outage_is_ended_with_one_short_try(tmp_path, monkeypatch):
    """After the logging met a server that stopped answering, ending the run FAILED waited a second full
    cycle of retries: 46 s where the README says about 20."""
    import mlflow
    import requests

    from medvae.tracking.runs import start_run

    seen = []
    real_end = mlflow.end_run
    monkeypatch.setattr(mlflow, "end_run", lambda status="FINISHED": (
        seen.append((status, os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES"),
                     os.environ.get("MLFLOW_HTTP_REQUEST_TIMEOUT"))), real_end(status)))
    before = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    with pytest.raises(tracking.TrackingUnavailable):
        with start_run(experiment="t", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"):
            raise requests.exceptions.ConnectionError("the server stopped answering")
    assert seen == [("FAILED", "0", "3")]
    assert os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES") == before  # put back
    with pytest.raises(ValueError):  # any other failure: the usual retries
        with start_run(experiment="t", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db"):
            raise ValueError("a bug")
    assert seen[-1][0] == "FAILED" and seen[-1][1] == before


def test_a_run_the_outage_left_running_is_named_so_it_can_be_deleted(tmp_path, monkeypatch):
    """A connection lost mid-evaluate left a RUNNING run holding real scores and nothing named it."""
    import mlflow
    import requests

    from medvae.tracking.runs import start_run

    def gone(status="FINISHED"):
        raise requests.exceptions.ConnectionError("the server stopped answering")

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(tracking.TrackingUnavailable) as err:
        with start_run(experiment="t", tracking_uri=uri) as run:
            run_id = run.info.run_id
            mlflow.log_metric("psnr_image", 31.2)
            monkeypatch.setattr(mlflow, "end_run", gone)
            raise requests.exceptions.ConnectionError("the server stopped answering")
    monkeypatch.undo()
    mlflow.end_run()  # the test's own process still holds it as active
    assert err.value.left_running == run_id
    assert str(err.value).endswith(f"its run {run_id} holds part of this record and is still marked RUNNING "
                                   f"there: delete it once the server answers (mlflow runs delete --run-id "
                                   f"{run_id})") and "\n" not in str(err.value)
    with pytest.raises(tracking.TrackingUnavailable) as err:  # ended as FAILED: nothing to name
        with start_run(experiment="t", tracking_uri=uri):
            raise requests.exceptions.ConnectionError("the server stopped answering")
    assert err.value.left_running is None and "RUNNING" not in str(err.value)


def test_a_model_whose_upload_was_cut_off_is_named_as_such(tmp_path, monkeypatch):
    """A PENDING half-upload of medvae's own was called "not logged by medvae"."""
    from mlflow import MlflowClient

    from medvae.errors import MedvaeError
    from medvae.tracking.models import model_checkpoint

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/m.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "art"))
    run = client.create_run(exp).info.run_id
    model = client.create_logged_model(exp, name="model", source_run_id=run)
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    client.log_model_artifact(model.model_id, str(tmp_path / "MLmodel"))  # the upload stopped there
    with pytest.raises(MedvaeError, match=rf"^runs:/{run}/model: the MLflow model's upload did not finish "
                                          r"\(status PENDING; no medvae.pt inside\): send the training's kept "
                                          r"records with medvae track sync"):
        model_checkpoint(f"runs:/{run}/model", tracking_uri=uri)
    client.finalize_logged_model(model.model_id, "READY")  # another program's finished model
    with pytest.raises(MedvaeError, match=r"model: the MLflow model was not logged by medvae \(no medvae.pt"):
        model_checkpoint(f"runs:/{run}/model", tracking_uri=uri)
