"""Training on real slices: loss falls, exact resume, NaN stop, DDP, MLflow contents and server."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from tiny_training import TINY
from medvae.errors import MedvaeError
from medvae.models.checkpoint import DEFAULT_WEIGHTS
from medvae.training import loop
from medvae.training.config import load_config
from medvae.training.data import PatchDataset
from medvae.training.loop import TrainingStopped, train


@pytest.fixture(autouse=True)
def _work_in_tmp_path(tmp_path, monkeypatch):
    """MLflow puts run artifacts under ./mlruns: run in tmp_path so the repository stays clean."""
    monkeypatch.chdir(tmp_path)


def tiny(dev: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.paths=['{dev}/nifti/heudiconv_axasc35.nii.gz', '{dev}/dicom/pydicom/CT_small.dcm']",
        f"data.val_paths=['{dev}/dicom/pydicom/MR_small.dcm']", *TINY,
        "data.samples_per_epoch=120", "optim.epochs=1", "tracking.enabled=false", "tracking.review_slices=1",
        f"output_dir={out}", *extra,
    ]


def test_tiny_model_trains_30_steps_and_loss_falls(dev_data, tmp_path):
    res = train(load_config(None, tiny(dev_data, tmp_path / "run")))
    losses = [h["loss"] for h in res.history]
    assert len(losses) == 30
    # boxes of random coverage make single steps noisy: compare the first and last 10 steps
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])
    assert np.polyfit(np.arange(30), losses, 1)[0] < 0
    assert {"rec", "rec_mask", "kl", "beta"} <= set(res.history[-1])
    # checkpoints: atomic last/best and the slim inference model, all weights_only-loadable
    for name in ("last.pt", "best.pt", "model.pt"):
        torch.load(tmp_path / "run" / name, weights_only=True)
    assert res.val and np.isfinite(res.val[0]["val_psnr"])


@pytest.mark.parametrize("workers", [0, 1])
def test_resume_continues_exactly(dev_data, tmp_path, monkeypatch, workers):
    # a loader worker must not move the latent noise: its iterator draws from its own generator
    args = ["optim.epochs=2", "data.samples_per_epoch=40", f"data.num_workers={workers}"]
    full = train(load_config(None, tiny(dev_data, tmp_path / "full", *args)))
    per_epoch = 10

    real_set_epoch = PatchDataset.set_epoch

    def crash_in_epoch_2(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt  # the machine went away after epoch 1
        real_set_epoch(self, epoch)

    monkeypatch.setattr(PatchDataset, "set_epoch", crash_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, tiny(dev_data, tmp_path / "cut", *args)))
    monkeypatch.setattr(PatchDataset, "set_epoch", real_set_epoch)
    resumed = train(load_config(None, tiny(dev_data, tmp_path / "cut", *args)), resume=True)
    assert resumed.history[0]["step"] == per_epoch + 1
    assert resumed.history[0]["loss"] == full.history[per_epoch]["loss"]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[per_epoch:]]


def _fake_clock(monkeypatch, seconds_per_step):
    """Training time that passes only with steps: ``seconds_per_step(step)`` each."""
    now = {"t": 0.0, "step": 0}
    real = loop.masked_vae_loss

    def timed(*a, step, **k):
        now["t"] += seconds_per_step(step)
        return real(*a, step=step, **k)

    monkeypatch.setattr(loop, "masked_vae_loss", timed)
    monkeypatch.setattr(loop, "_clock", lambda: now["t"])


def test_time_budget_fits_the_cosine_schedule_to_the_epochs_that_fit(dev_data, tmp_path, monkeypatch):
    args = ["data.samples_per_epoch=40", "optim.lr=0.01"]  # 10 steps per epoch
    two = train(load_config(None, tiny(dev_data, tmp_path / "two", "optim.epochs=2", *args)))
    _fake_clock(monkeypatch, lambda step: 10.0)  # 100 s per epoch; 4.5 min leave room for 2 epochs
    cut = train(load_config(None, tiny(dev_data, tmp_path / "cut", "optim.epochs=6", "optim.max_minutes=4.5",
                                       *args)))
    assert (cut.epochs_run, cut.epochs_planned) == (2, 2)
    # after epoch 1: the schedule of a 2-epoch run, not the first third of a 6-epoch one; it decays to ~0
    assert [h["lr"] for h in cut.history[10:]] == pytest.approx([h["lr"] for h in two.history[10:]], rel=1e-9)
    assert cut.history[-1]["lr"] < 0.02 * 0.01
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["planned_epochs"] == 2


def test_a_budget_that_fits_one_epoch_says_the_schedule_did_not_end(dev_data, tmp_path, monkeypatch, caplog):
    # 1 of 50 epochs fit: "the schedule ends with them", though the run stopped at a high learning rate
    _fake_clock(monkeypatch, lambda step: 10.0)  # 100 s per epoch, a budget of 2.5 min
    with caplog.at_level("INFO", logger="medvae.training.loop"):
        res = train(load_config(None, tiny(dev_data, tmp_path / "one", "optim.epochs=50", "optim.max_minutes=2.5",
                                           "data.samples_per_epoch=40")))
    assert (res.epochs_run, res.epochs_planned) == (1, 1)
    said = [r.getMessage() for r in caplog.records if "time budget" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("time budget 2.5 min: only 1 of 50 epochs fit, so the run ends at "
                                                 "learning rate ") and "lower data.samples_per_epoch" in said[0]


def test_time_budget_stops_when_training_slows_down(dev_data, tmp_path, monkeypatch):
    # epoch 1 promises all 6 epochs within 10 min; epoch 2 takes 300 s, so a third would not fit
    _fake_clock(monkeypatch, lambda step: 10.0 if step < 10 else 30.0)
    res = train(load_config(None, tiny(dev_data, tmp_path / "slow", "optim.epochs=6", "optim.max_minutes=10",
                                       "data.samples_per_epoch=40")))
    assert (res.epochs_run, res.epochs_planned) == (2, 6)
    ck = torch.load(tmp_path / "slow" / "last.pt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 20)
    assert (tmp_path / "slow" / "model.pt").is_file()


def test_resume_refuses_a_changed_config_and_a_finished_run_trains_nothing(dev_data, tmp_path, capsys):
    from medvae.cli import main

    out = tmp_path / "run"
    args = tiny(dev_data, out, "data.samples_per_epoch=40")
    first = train(load_config(None, args))
    for change, shown in (("model.channels=[8,16]", "model.channels [4, 8] -> [8, 16]"),
                          ("optim.lr=0.5", "optim.lr 0.003 -> 0.5"),
                          ("optim.epochs=3", "optim.epochs 1 -> 3")):
        with pytest.raises(MedvaeError, match=r"last\.pt: cannot resume with a changed config \(") as exc:
            train(load_config(None, [*args, change]), resume=True)
        assert shown in str(exc.value) and "\n" not in str(exc.value)
    # where it runs may change; a finished run has nothing left: no export, no second logged model
    model_time = (out / "model.pt").stat().st_mtime_ns
    again = train(load_config(None, [*args, "threads=2", "data.num_workers=1"]), resume=True)
    assert (again.epochs_run, again.epochs_done_before) == (0, 1)
    assert (out / "model.pt").stat().st_mtime_ns == model_time and first.epochs_run == 1
    assert main(["train", *args, "--resume"]) == 0
    assert f"nothing left to train: {out} already trained 1 of 1 epoch(s)" in capsys.readouterr().out
    # stopped while exporting (after the last checkpoint, before model.pt): resume writes the model
    (out / "model.pt").unlink()
    assert main(["train", *args, "--resume"]) == 0
    assert f"wrote the model its stopped run had not: {out} already trained 1 of 1" in capsys.readouterr().out
    assert torch.load(out / "model.pt", weights_only=True)["state_dict"].keys() == first.model.state_dict().keys()


def test_a_second_training_into_a_busy_output_dir_is_refused(dev_data, tmp_path):
    """Two trainings into one output_dir both ran; one's model.pt replaced the other's without a word."""
    import subprocess
    import sys

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom medvae.io.atomic import exclusive\n"
                               f"with exclusive({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another process is training into it
        with pytest.raises(MedvaeError, match="another medvae process is writing this output now"):
            train(load_config(None, tiny(dev_data, out, "data.samples_per_epoch=40")))
    finally:
        holder.kill()
        holder.wait()
    res = train(load_config(None, tiny(dev_data, out, "data.samples_per_epoch=40")))  # free again (a kill frees it)
    assert res.epochs_run == 1 and not list(tmp_path.glob(".*medvae-lock"))


def test_resume_from_another_working_folder_is_not_a_changed_config(tmp_path, monkeypatch):
    """A config's relative data path is read from the working folder or the config's own: the same scans
    named from another folder were refused as a changed config."""
    from medvae.training.loop import config_changes

    (tmp_path / "sub" / "scans").mkdir(parents=True)
    (tmp_path / "sub" / "scans" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "sub" / "rel.yaml").write_text("data:\n  paths: [scans/a.nii.gz]\n")
    monkeypatch.chdir(tmp_path / "sub")
    first = load_config("rel.yaml")
    assert first.data.paths == ["scans/a.nii.gz"]
    monkeypatch.chdir(tmp_path)
    again = load_config("sub/rel.yaml")
    assert again.data.paths == [str(tmp_path / "sub" / "scans/a.nii.gz")]
    assert config_changes(first.to_dict(), again) == []
    (tmp_path / "sub" / "scans" / "b.nii.gz").write_bytes(b"")  # other scans are still a change
    assert config_changes(first.to_dict(), load_config("sub/rel.yaml", ["data.paths=[sub/scans/b.nii.gz]"])) == [
        f"data.paths [scans/a.nii.gz] -> [sub/scans/b.nii.gz]"]


def test_best_is_written_before_last_and_broken_weights_never(dev_data, tmp_path, monkeypatch):
    written = []
    real_save = loop.atomic_torch_save
    monkeypatch.setattr(loop, "atomic_torch_save", lambda obj, path: written.append(Path(path).name)
                        or real_save(obj, path))
    train(load_config(None, tiny(dev_data, tmp_path / "order", "data.samples_per_epoch=40")))
    # a kill between the two leaves last.pt an epoch behind, which a resume trains again
    assert written[:2] == ["best.pt", "last.pt"]

    real_epoch = loop._train_epoch

    def diverged(cfg, rt, o, *a, **kw):  # the last step of epoch 1 left NaN weights behind a finite loss
        out = real_epoch(cfg, rt, o, *a, **kw)
        with torch.no_grad():
            next(o.model.parameters()).fill_(float("nan"))
        return out

    monkeypatch.setattr(loop, "_train_epoch", diverged)
    out = tmp_path / "nan_weights"
    with pytest.raises(TrainingStopped, match=r"1 weight tensor\(s\) became NaN/Inf in epoch 1; no checkpoint "
                                              r"was written"):
        train(load_config(None, tiny(dev_data, out, "data.samples_per_epoch=40")))
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_the_logged_learning_rate_is_the_one_each_step_used(dev_data, tmp_path):
    res = train(load_config(None, tiny(dev_data, tmp_path / "lr", "data.samples_per_epoch=80")))  # 20 steps
    # cosine: a 1-step warm-up from lr / 1, then the decay; step 1 uses the full rate, the last one almost 0
    assert res.history[0]["lr"] == pytest.approx(0.003)
    assert 0 < res.history[-1]["lr"] < 0.003 * 0.01


def test_ddp_batch_must_split_evenly(dev_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MedvaeError, match=r"^<defaults>: config key 'optim.batch_size' 5 is not a multiple of the 2 processes"):
        train(load_config(None, tiny(dev_data, tmp_path / "ddp", "optim.batch_size=5")))  # the config is named


def test_a_lost_torchrun_peer_is_told_apart_from_other_errors():
    from medvae.training.loop import _peer_lost

    gloo = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:19887: Connection reset by peer. This is typically caused by a remote worker")
    assert _peer_lost(gloo) and _peer_lost(RuntimeError("NCCL communicator was aborted on rank 0"))
    assert not _peer_lost(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))


def test_resume_without_checkpoint_is_a_clear_error(dev_data, tmp_path):
    with pytest.raises(MedvaeError, match="nothing to resume"):
        train(load_config(None, tiny(dev_data, tmp_path / "none")), resume=True)
    slim = tmp_path / "slim"  # the shipped inference model copied to last.pt
    slim.mkdir()
    (slim / "last.pt").write_bytes(DEFAULT_WEIGHTS.read_bytes())
    with pytest.raises(MedvaeError, match=r"last\.pt: not a training checkpoint \(no optimizer, scheduler, "
                                          r"epoch, step, best\): it cannot be resumed; start a new output_dir"):
        train(load_config(None, tiny(dev_data, slim)), resume=True)
    ck = torch.load(DEFAULT_WEIGHTS, weights_only=True)  # a damaged counter: a traceback at int(), exit 1
    ck.update(optimizer={}, scheduler={}, epoch="x", step=3, best=20.0)
    torch.save(ck, slim / "last.pt")
    with pytest.raises(MedvaeError, match=r"last\.pt: a damaged training checkpoint: its 'epoch' is 'x', not a whole"):
        train(load_config(None, tiny(dev_data, slim)), resume=True)


def test_what_needs_no_scan_is_checked_before_any_is_read(dev_data, tmp_path, monkeypatch, capsys):
    from medvae.cli import main
    from medvae.training import data

    out = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("optim:\n  epochs: 1\n")
    # one training scan and no validation set: the summary says so (it said "; ;")
    args = ["--config", str(cfg_file), *tiny(dev_data, out, "data.samples_per_epoch=8", "data.val_paths=[]",
                                             f"data.paths=['{dev_data}/dicom/pydicom/CT_small.dcm']")]
    assert main(["train", *args]) == 0
    assert "trained 1 epoch(s), 2 steps; no validation set; model:" in capsys.readouterr().out
    monkeypatch.setattr(data, "build_training_data", lambda *a, **k: pytest.fail("data read before the check"))
    (tmp_path / "broken.yaml").write_text("steps: [\n")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "last.pt").write_bytes((out / "last.pt").read_bytes()[:5000])  # SIGKILLed copy
    for extra, message in (
            # the config file is named with the key (were tracebacks, or errors after every scan was read)
            ([f"init_from={tmp_path / 'none.pt'}"], f"override 'init_from={tmp_path / 'none.pt'}': config key 'init_from': no file "),
            ([f"init_from={cfg_file}"], f"override 'init_from={cfg_file}': config key 'init_from' ({cfg_file}): not a medvae model"),
            ([f"init_from={out / 'model.pt'}", "model.channels=[8,16]"],
             f"override 'init_from={out / 'model.pt'}': config key 'init_from' ({out / 'model.pt'}): cannot warm-start: "
             "model.channels is [8, 16]"),
            ([f"corruption.recipe={tmp_path / 'none.yaml'}"], f"override 'corruption.recipe={tmp_path / 'none.yaml'}': "
                                                              "config key 'corruption.recipe': recipe "
                                                              "file"),
            ([f"corruption.val_recipe={tmp_path / 'broken.yaml'}"], "override 'corruption.val_recipe="),
            (["model.act=PRELUU"], f"{cfg_file}: config key 'model': By 'PRELUU', did you mean 'PRELU'?"),
            ([f"data.paths=['{tmp_path}/none/*.nii.gz']"], f"override \"data.paths=['{tmp_path}/none/*.nii.gz']\": config key "
                                                    "'data.paths': no scan matches"),
            ([f"data.store={tmp_path / 'none'}", "data.paths=[]", "data.val_paths=[]"],
             f"override 'data.store={tmp_path / 'none'}': config key 'data.store': no folder"),
            # its own paths beside a store: the store would replace them (a validation scan was trained on)
            ([f"data.store={tmp_path}"], f"{cfg_file}: config keys 'data.paths' and 'data.store' are both given"),
            # a forgotten --resume overwrote the run's checkpoints at the end of its first epoch
            ([], f"{out}: holds the checkpoints of an earlier run (last.pt): continue it with --resume"),
            (["model.channels=[8,16]", "--resume"], f"{out / 'last.pt'}: cannot resume with a changed config "
                                                    "(model.channels [4, 8] -> [8, 16])"),
            ([f"--output-dir={tmp_path / 'cut'}", "--resume"], f"{tmp_path / 'cut' / 'last.pt'}: not a medvae model"),
            ([f"--output-dir={tmp_path / 'new'}", "--resume"], f"{tmp_path / 'new'}: nothing to resume")):
        assert main(["train", *args, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith(f"medvae train: error: {message}") and err.count("\n") == 1, (extra, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.yaml", "cfg.yaml", "cut", "run"]


_KILLED_IN_A_WRITE = """
import io, os, signal, sys
import torch
from medvae.training.config import load_config
from medvae.training.loop import train

real = torch.save

def save(obj, fh, *a, **k):  # half of the first checkpoint of epoch 2 reaches the disk, then SIGKILL
    if isinstance(obj, dict) and obj.get("epoch") == 1:
        buf = io.BytesIO()
        real(obj, buf)
        fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        fh.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, fh, *a, **k)

torch.save = save
train(load_config(None, sys.argv[1:]))
"""


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one_exactly(dev_data, tmp_path):
    args = ["optim.epochs=2", "data.samples_per_epoch=40"]  # 10 steps per epoch
    full = train(load_config(None, tiny(dev_data, tmp_path / "full", *args)))
    out = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", _KILLED_IN_A_WRITE, *tiny(dev_data, out, *args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 0  # epoch 1's, whole
    resumed = train(load_config(None, tiny(dev_data, out, *args)), resume=True)
    assert resumed.history[0]["step"] == 11
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history[10:]]
    assert resumed.val[-1]["val_psnr"] == full.val[-1]["val_psnr"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(dev_data, tmp_path, monkeypatch):
    real = loop.masked_vae_loss

    def poisoned(*a, step, **k):
        total, parts = real(*a, step=step, **k)
        if step >= 12:  # epoch 2
            total = total * float("nan")
            parts["loss"] = float("nan")
        return total, parts

    monkeypatch.setattr(loop, "masked_vae_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingStopped, match=r"NaN/Inf at epoch 2, step 13.*last good checkpoint") as exc:
        train(load_config(None, tiny(dev_data, out, "optim.epochs=3", "data.samples_per_epoch=48")))
    assert "last.pt" in str(exc.value)
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["step"] == 12
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values())


def test_ddp_two_ranks_end_with_identical_weights(dev_data, tmp_path):
    port = _free_port()
    out = tmp_path / "ddp"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(Path(__file__).with_name("ddp_worker.py")), str(out),
           *tiny(dev_data, out / "run", "data.samples_per_epoch=32", "device=cpu")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    w0 = torch.load(out / "rank0.pt", weights_only=True)
    w1 = torch.load(out / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    # 32 samples split over 2 ranks, global batch 4 = 2 per rank: 8 steps, checkpointed by rank 0
    ck = torch.load(out / "run" / "last.pt", weights_only=True)
    assert ck["step"] == 8
    assert all(torch.equal(ck["state_dict"][k], w0[k].float()) for k in w0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _identifiers(dicom_file: Path) -> list[str]:
    ds = pydicom.dcmread(dicom_file, stop_before_pixels=True)
    vals = [str(ds.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate", "StudyDate")]
    return [v for v in vals if len(v) >= 4] + [dicom_file.stem]


def _check_run(client, run_id: str, forbidden: list[str]) -> None:
    import mlflow

    run = client.get_run(run_id)
    p, m, tags = run.data.params, run.data.metrics, run.data.tags
    assert p["model.channels"] == "[4, 8]" and p["loss.kind"] == "l1" and "data.paths_sha1" in p
    assert "data.paths" not in p
    assert tags.get("medvae.git_commit")
    assert {"train_loss", "train_rec", "train_rec_mask", "train_kl", "train_beta",
            "val_psnr", "val_ssim", "val_psnr_mask", "val_ssim_mask"} <= set(m)
    history = client.get_metric_history(run_id, "train_loss")
    assert len(history) >= 2

    def walk(path=""):
        for f in client.list_artifacts(run_id, path):
            yield f.path
            if f.is_dir:
                yield from walk(f.path)

    arts = set(walk())
    assert "review/epoch_001.png" in arts
    assert "checkpoints/best.pt" in arts
    # MLflow 3 keeps logged models beside the run's artifacts; runs:/ID/model resolves to it
    model_dir = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", tracking_uri=client.tracking_uri))
    assert (model_dir / "MLmodel").is_file() and (model_dir / "extra_files" / "medvae.pt").is_file()
    text = " ".join([*map(str, p.values()), *p, *map(str, tags.values()), *tags, *arts, run.info.run_name or ""])
    for ident in forbidden:
        assert ident not in text, ident


def test_mlflow_run_has_params_metrics_artifacts_and_no_identifiers(dev_data, tmp_path):
    import mlflow

    from medvae.tracking import load_model  # resolves runs:/ and models:/ URIs

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    res = train(load_config(None, tiny(dev_data, tmp_path / "run", "tracking.enabled=true", f"tracking.uri={uri}",
                                       "tracking.log_every=5")))
    client = mlflow.MlflowClient(tracking_uri=uri)
    _check_run(client, res.run_id, _identifiers(dev_data / "dicom/pydicom/CT_small.dcm"))
    # medvae reads the logged model back through weights_only; mlflow's own loader works too
    lm = load_model(f"runs:/{res.run_id}/model", tracking_uri=uri)
    x = torch.rand(1, 1, 40, 40)
    mlflow.set_tracking_uri(uri)
    pyt = mlflow.pytorch.load_model(f"runs:/{res.run_id}/model")
    assert torch.allclose(lm.model.posterior_mean(x, torch.ones_like(x)), pyt.posterior_mean(x, torch.ones_like(x)))
    # a registered model is addressed as models:/NAME/VERSION
    version = mlflow.register_model(f"runs:/{res.run_id}/model", "medvae-test")
    reg = load_model(f"models:/medvae-test/{version.version}", tracking_uri=uri)
    assert all(torch.equal(a, b) for a, b in zip(reg.model.state_dict().values(), lm.model.state_dict().values()))
    # a name that moves is recorded as the version it named when loaded (it was kept as "latest")
    client.set_registered_model_alias("medvae-test", "champion", version.version)
    for moving in ("models:/medvae-test/latest", "models:/medvae-test@champion"):
        assert load_model(moving, tracking_uri=uri).source == f"models:/medvae-test/{version.version}"
    client.delete_run(res.run_id)  # its artifacts stay until garbage collection: once used without a word
    with pytest.raises(MedvaeError, match=f"the MLflow run {res.run_id} is deleted"):
        load_model(f"runs:/{res.run_id}/model", tracking_uri=uri)


def test_a_run_stopped_between_its_export_and_its_logging_gets_its_model_on_resume(dev_data, tmp_path,
                                                                                   monkeypatch):
    # model.pt was on disk, so --resume said "nothing left to train" and the MLflow run never got its model
    import mlflow

    import medvae.training.loop as loop
    from medvae.tracking import load_model

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = tiny(dev_data, tmp_path / "run", "tracking.enabled=true", f"tracking.uri={uri}", "data.samples_per_epoch=40")
    real_export = loop.export_inference

    def export_then_stop(*a, **k):
        real_export(*a, **k)
        raise KeyboardInterrupt  # a SIGINT just after model.pt is written

    monkeypatch.setattr(loop, "export_inference", export_then_stop)
    with pytest.raises((KeyboardInterrupt, MedvaeError)):
        train(load_config(None, args))
    monkeypatch.setattr(loop, "export_inference", real_export)
    assert (tmp_path / "run" / "model.pt").is_file() and (tmp_path / "run" / loop.MODEL_PENDING).exists()
    client = mlflow.MlflowClient(tracking_uri=uri)
    [run] = client.search_runs([client.get_experiment_by_name("medvae-train").experiment_id])
    assert run.info.status == "KILLED"
    res = train(load_config(None, args), resume=True)
    assert res.exported and res.run_id == run.info.run_id and not (tmp_path / "run" / loop.MODEL_PENDING).exists()
    assert load_model(f"runs:/{run.info.run_id}/model", tracking_uri=uri).model is not None
    again = train(load_config(None, args), resume=True)  # now finished: nothing exported or logged again
    assert not again.exported
    # a run trained without MLflow, resumed with it: finished, nothing to log (it was logged as stopped)
    untracked = tiny(dev_data, tmp_path / "plain", "data.samples_per_epoch=40")
    train(load_config(None, untracked))
    assert not train(load_config(None, [*untracked, "tracking.enabled=true", f"tracking.uri={uri}"]),
                     resume=True).exported


def test_sigterm_ends_the_run_killed_and_resume_logs_each_step_once(dev_data, tmp_path, monkeypatch):
    import mlflow

    store = tmp_path / "store"  # not the working folder: artifacts go beside the database
    uri = f"sqlite:///{store}/mlflow.db"
    out = tmp_path / "run"
    warm = tmp_path / "patients" / "DOE^JANE" / "warm.pt"  # it must exist: train checks before reading data
    warm.parent.mkdir(parents=True)
    warm.touch()
    args = tiny(dev_data, out, "optim.epochs=2", "data.samples_per_epoch=40", "tracking.enabled=true",
                f"tracking.uri={uri}", "tracking.log_every=1", f"init_from={warm}")
    real_loss = loop.masked_vae_loss

    def preempted(*a, step, **k):  # Slurm pre-empts the job in epoch 2, at step 15 of 20
        if step == 14:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, step=step, **k)

    monkeypatch.setattr(loop, "masked_vae_loss", preempted)
    monkeypatch.setattr(loop, "warm_start", lambda model, path: {})  # the path above names a patient
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, args))
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = (out / "mlflow_run_id").read_text().strip()
    assert client.get_run(run_id).info.status == "KILLED"
    monkeypatch.setattr(loop, "masked_vae_loss", real_loss)
    res = train(load_config(None, args), resume=True)  # epoch 2 again, from last.pt
    assert res.run_id == run_id and client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train_loss")]
    assert sorted(steps) == list(range(1, 21))  # steps 11-14 were logged before the kill: once
    exp = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert Path(exp.artifact_location.removeprefix("file://")) == store
    assert "init_from" not in client.get_run(run_id).data.params
    ck = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/checkpoints/best.pt", tracking_uri=uri))
    config = torch.load(ck, weights_only=True)["config"]
    assert str(config["data"]["paths"]).startswith("sha1:") and str(config["init_from"]).startswith("sha1:")
    assert "DOE" not in ck.read_bytes().decode("latin-1")


def test_a_resumed_job_that_starts_a_new_mlflow_run_logs_its_params(dev_data, tmp_path, monkeypatch):
    # interrupted without tracking, resumed with it: the new run once got metrics and no params
    import mlflow

    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    out = tmp_path / "run"
    args = tiny(dev_data, out, "optim.epochs=2", "data.samples_per_epoch=40")
    real_loss = loop.masked_vae_loss

    def preempted(*a, step, **k):
        if step == 14:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*a, step=step, **k)

    monkeypatch.setattr(loop, "masked_vae_loss", preempted)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(None, [*args, "tracking.enabled=false"]))
    monkeypatch.setattr(loop, "masked_vae_loss", real_loss)
    res = train(load_config(None, [*args, "tracking.enabled=true", f"tracking.uri={uri}"]), resume=True)
    params = mlflow.MlflowClient(tracking_uri=uri).get_run(res.run_id).data.params
    assert params["optim.epochs"] == "2" and params["device"] == "cpu" and "model.n_parameters" in params


def test_training_against_a_real_mlflow_server(dev_data, tmp_path):
    import mlflow

    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "mlflow server did not become healthy in 90 s"
            time.sleep(0.5)
        res = train(load_config(None, tiny(dev_data, tmp_path / "run", "tracking.enabled=true",
                                           f"tracking.uri={uri}", "tracking.log_model=false")))
        run = mlflow.MlflowClient(tracking_uri=uri).get_run(res.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["model.channels"] == "[4, 8]"
        assert "val_psnr" in run.data.metrics
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the whole group: the server forks workers
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def test_scale_head_stage_moves_only_the_scale_and_keeps_the_restoration_bit_identical(dev_data, tmp_path):
    from medvae.models.checkpoint import load_model

    v3 = ("model.scale_head=true", "model.noise_map=true", "loss.kind=laplace")
    first = train(load_config(None, tiny(dev_data, tmp_path / "a", *v3)))
    res = train(load_config(None, tiny(dev_data, tmp_path / "b", *v3, f"init_from={tmp_path / 'a' / 'model.pt'}",
                                       "optim.train=scale_head", "optim.lr=0.01")))
    assert len(res.history) == 30 and first.model is not None
    before = load_model(tmp_path / "a" / "model.pt").model
    after = load_model(tmp_path / "b" / "model.pt").model
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before.state_dict()[k])}
    assert changed == {"head.conv.weight", "head.conv.bias"}
    assert torch.equal(after.head.conv.weight[:1], before.head.conv.weight[:1])   # the restoration row
    x = torch.rand(1, 1, 48, 40, generator=torch.Generator().manual_seed(0))
    holes = torch.zeros_like(x)
    holes[..., 10:30, 10:30] = 1
    for mask in (holes, torch.ones_like(x)):
        assert torch.equal(before.posterior_mean(x, mask), after.posterior_mean(x, mask))
        assert not torch.equal(before.predictive(x, mask, 1)[1], after.predictive(x, mask, 1)[1])
    with pytest.raises(MedvaeError, match="'scale_head', which needs model.scale_head: true"):  # before any data
        train(load_config(None, tiny(dev_data, tmp_path / "c", "optim.train=scale_head")))


def test_window_jitter_moves_input_and_target_by_one_window_and_never_ct(dev_data):
    """data.window_jitter: MR samples are the plain samples seen through one moved window (input and
    target alike, so the noise stays the same noise); CT samples and the rest of the draw are untouched."""
    from medvae.corruption.recipes import load_recipe
    from medvae.intensity import IntensityPolicy
    from medvae.training.data import load_volumes

    vols = load_volumes([dev_data / "nifti/heudiconv_axasc35.nii.gz", dev_data / "dicom/pydicom/CT_small.dcm"],
                        intensity=IntensityPolicy(), min_size=48, min_foreground=0.1)
    assert [v.modality for v in vols] == ["MR", "CT"]
    kw = dict(recipe=load_recipe("train"), patch_size=64, samples_per_epoch=24, seed=3)
    plain, moved = PatchDataset(vols, **kw), PatchDataset(vols, window_jitter=0.1, **kw)
    n_moved = 0
    for i in range(24):
        a, b = plain[i], moved[i]
        assert torch.equal(a["mask"], b["mask"])
        t0, t1 = a["target"].numpy().ravel(), b["target"].numpy().ravel()
        scale, offset = np.polyfit(t0, t1, 1)
        # the same affine map on the corrupted input as on the target
        np.testing.assert_allclose(b["image"].numpy(), a["image"].numpy() * scale + offset, atol=1e-5)
        if not np.allclose(t0, t1):
            n_moved += 1
            # window ends within +-0.1: scale 1/(hi - lo) in [1/1.2, 1/0.8], offset -lo/(hi - lo)
            assert 1 / 1.2 - 1e-4 <= scale <= 1 / 0.8 + 1e-4 and abs(offset) <= 0.1 / 0.8 + 1e-4
            assert not np.allclose(a["target"].numpy().mean(), 0)  # an MR patch with anatomy
    assert 4 <= n_moved <= 20  # about half of the MR samples
    ct = PatchDataset([vols[1]], window_jitter=0.1, **kw)
    ct_plain = PatchDataset([vols[1]], **kw)
    for i in range(6):
        assert torch.equal(ct[i]["image"], ct_plain[i]["image"])
    with pytest.raises(MedvaeError, match="window_jitter"):
        PatchDataset(vols, window_jitter=0.6, **kw)


def test_downsample_cuts_some_patches_from_a_coarser_slice_and_leaves_the_rest_of_the_draw(dev_data):
    """data.downsample: a share of the samples come from the slice shrunk 1.25-2x by area averaging (a
    ramp gets steeper by that factor); the other samples are exactly those drawn without it."""
    from medvae.corruption.recipes import load_recipe
    from medvae.training.data import Volume

    ramp = np.tile(np.arange(200, dtype=np.float32)[:, None] * 1e-3, (1, 200))[:, :, None].repeat(3, axis=2)
    vols = [Volume(name="ramp", modality="MR", array=ramp, slices=[0, 1, 2])]
    kw = dict(recipe=load_recipe("train"), patch_size=64, samples_per_epoch=40, seed=5, augment=True)
    plain, coarse = PatchDataset(vols, **kw), PatchDataset(vols, downsample=0.5, **kw)

    def slope(t):  # steepest step between neighbours: 1e-3 x the gain (0.9-1.1) x the shrink factor
        a = t["target"].numpy()[0]
        return max(np.abs(np.diff(a, axis=0)).max(), np.abs(np.diff(a, axis=1)).max())

    n_coarse = 0
    for i in range(40):
        a, b = plain[i], coarse[i]
        if torch.equal(a["target"], b["target"]):
            assert slope(a) <= 1.1e-3 + 1e-6
        else:
            n_coarse += 1
            assert 1.25 * 0.9e-3 - 1e-5 <= slope(b) <= 2.0 * 1.1e-3 + 1e-5
    assert 10 <= n_coarse <= 30  # about half
    with pytest.raises(MedvaeError, match="downsample"):
        PatchDataset(vols, downsample=1.5, **kw)


def test_texture_gives_some_targets_a_scans_own_noise_rician_on_mr_and_leaves_the_rest_of_the_draw():
    """data.texture: a share of the targets carry noise of their own (std within texture_sigma up to the
    gain), Rician on MR so a zero background stays positive, added on CT; the other samples are exactly
    those drawn without it, and the corrupted input is the textured target corrupted."""
    from medvae.corruption.recipes import load_recipe
    from medvae.training.data import Volume

    flat = np.full((96, 96, 2), 0.5, np.float32)
    flat[:, :48] = 0.0  # half background: Rician texture must keep it positive
    kw = dict(recipe=load_recipe("train"), patch_size=64, samples_per_epoch=40, seed=3, augment=True)
    for modality in ("MR", "CT"):
        vols = [Volume(name="flat", modality=modality, array=flat, slices=[0, 1])]
        plain, tex = PatchDataset(vols, **kw), PatchDataset(vols, texture=0.5, texture_sigma=[0.01, 0.02], **kw)
        n_tex = 0
        for i in range(40):
            a, b = plain[i], tex[i]
            if torch.equal(a["target"], b["target"]):
                assert torch.equal(a["image"], b["image"])
                continue
            n_tex += 1
            t = b["target"].numpy()[0]
            bright = t[a["target"].numpy()[0] > 0.3]
            assert 0.009 <= bright.std() <= 0.022, bright.std()   # sigma 0.01-0.02 (Rician ~ Gaussian at 0.5)
            assert torch.equal(b["mask"], a["mask"])
            known = b["mask"].numpy()[0] == 0   # holes: the input keeps the textured target's pixels
            np.testing.assert_array_equal(b["image"].numpy()[0][known], t[known])
            if modality == "MR":
                assert t.min() >= 0.0
            else:
                assert t.min() < -0.005   # added: the zero background goes below 0
        assert 10 <= n_tex <= 30, n_tex   # about half
    with pytest.raises(MedvaeError, match="texture_sigma"):
        PatchDataset(vols, texture=0.5, texture_sigma=[0.02, 0.01], **kw)
    with pytest.raises(MedvaeError, match="texture_sigma"):
        PatchDataset(vols, texture=0.5, texture_sigma=[0.02], **kw)

    def lag1(smooth):   # neighbour correlation of the texture added to the CT targets
        ds = PatchDataset(vols, texture=1.0, texture_smooth=smooth, **kw)
        r = [ds[i]["target"].numpy()[0] - plain[i]["target"].numpy()[0] for i in range(6)]
        return np.mean([np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1] for x in r])

    assert abs(lag1(0.0)) < 0.05 and lag1(1.0) > 0.5   # white, or smoothed as resampling leaves it
    mr_only = PatchDataset(vols, texture=1.0, texture_modalities=["mr"], **kw)   # vols: the CT volume
    assert all(torch.equal(mr_only[i]["target"], plain[i]["target"]) for i in range(6))
    ct_named = PatchDataset(vols, texture=1.0, texture_modalities=["CT"], **kw)
    assert not torch.equal(ct_named[0]["target"], plain[0]["target"])


def test_texture_on_real_scans_adds_noise_of_the_asked_size_and_keeps_mr_magnitudes_positive(dev_data):
    """data.texture on a real CT and a real MR: the CT target gains exactly an added field whose std is in
    texture_sigma; the MR target (Rician texture) stays non-negative and moves by about that much."""
    from medvae.corruption.recipes import load_recipe
    from medvae.intensity import IntensityPolicy
    from medvae.training.data import load_volumes

    vols = load_volumes([dev_data / "nifti/heudiconv_axasc35.nii.gz", dev_data / "dicom/pydicom/CT_small.dcm"],
                        intensity=IntensityPolicy(), min_size=48, min_foreground=0.1)
    kw = {"recipe": load_recipe("train"), "patch_size": 64, "samples_per_epoch": 8, "seed": 4}
    for vol in vols:
        plain = PatchDataset([vol], **kw)
        tex = PatchDataset([vol], texture=1.0, texture_sigma=[0.01, 0.02], texture_smooth=0.0, **kw)
        for i in range(8):
            a, b = plain[i]["target"].numpy()[0], tex[i]["target"].numpy()[0]
            if vol.modality == "CT":
                assert 0.009 <= (b - a).std() <= 0.021
            else:
                assert b.min() >= 0.0 and 0.005 <= np.abs(b - a).mean() <= 0.03


def test_large_patches_come_in_whole_batches_from_large_slices_only(dev_data):
    """data.large_patch_size: a share of the batches is cut at the larger size, only from volumes whose
    slices are that large (no padded small slices); the other batches are the plain draw."""
    from medvae.corruption.recipes import load_recipe
    from medvae.training.data import PatchBatchSampler, Volume

    # a 64 px volume at 0.2 and a 128 px one at 0.8: only the second holds a 96 px patch
    vols = [Volume("small", "MR", np.full((64, 64, 5), 0.2, np.float32), list(range(5))),
            Volume("large", "MR", np.full((128, 128, 1), 0.8, np.float32), [0])]
    kw = dict(recipe=load_recipe("train"), patch_size=48, samples_per_epoch=64, seed=3)
    plain, mixed = PatchDataset(vols, **kw), PatchDataset(vols, large_patch_size=96, **kw)
    batches = PatchBatchSampler(range(64), batch_size=4, patch_size=48, large_patch_size=96, large_share=0.5, seed=3)
    assert len(batches) == 16
    sizes = []
    for batch in batches:
        assert len({size for _, size, _ in batch}) == 1        # one size per batch: it stacks
        sizes.append(batch[0][1])
        for key in batch:
            s = mixed[key]
            assert s["target"].shape == (1, key[1], key[1])
            if key[1] == 48:
                assert torch.equal(s["image"], plain[key[0]]["image"])
            else:  # the large volume (0.8 x a gain of 0.9-1.1), never the small one padded
                assert 0.72 <= float(s["target"].min()) and float(s["target"].max()) <= 0.88
    assert 4 <= sizes.count(96) <= 12
    assert [b[0][1] for b in batches] == sizes                  # the draw of sizes is a function of (seed, epoch)
    with pytest.raises(MedvaeError, match="no training slice is 256 px"):
        PatchDataset(vols, large_patch_size=256, **kw)
    # real scans: the 64² MR volume is never drawn for 96 px patches, the 128² CT slice is
    from medvae.intensity import IntensityPolicy
    from medvae.training.data import load_volumes

    real = load_volumes([dev_data / "nifti/heudiconv_axasc35.nii.gz", dev_data / "dicom/pydicom/CT_small.dcm"],
                        intensity=IntensityPolicy(), min_size=48, min_foreground=0.1)
    ds = PatchDataset(real, large_patch_size=96, **kw)
    assert [(v.modality, v.in_plane) for v in ds.large_volumes] == [("CT", (128, 128))]
    assert ds[(0, 96, 0)]["target"].shape == (1, 96, 96) and ds[(0, 48, 0)]["target"].shape == (1, 48, 48)
    with pytest.raises(MedvaeError, match="larger than data.patch_size"):
        PatchDataset(vols, large_patch_size=32, **kw)


def test_dataloader_workers_draw_each_epoch_anew(dev_data):
    """Persistent DataLoader workers keep their own copy of the dataset: the epoch must reach them
    through the batch keys, so a worker draws epoch 1 differently from epoch 0, and exactly as the main
    process does (the number of workers never changes what is trained on)."""
    from medvae.corruption.recipes import load_recipe
    from medvae.intensity import IntensityPolicy
    from medvae.training.data import PatchBatchSampler, load_volumes

    vols = load_volumes([dev_data / "nifti/heudiconv_axasc35.nii.gz"], intensity=IntensityPolicy(),
                        min_size=48, min_foreground=0.1)
    ds = PatchDataset(vols, recipe=load_recipe("train"), patch_size=32, samples_per_epoch=8, seed=1)
    batches = PatchBatchSampler(range(8), batch_size=8, patch_size=32)

    def epochs(workers: int) -> list[torch.Tensor]:
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                             persistent_workers=workers > 0)
        out = []
        for epoch in range(2):
            batches.set_epoch(epoch)
            ds.set_epoch(epoch)
            out.append(next(iter(loader))["image"])
        return out

    (a0, a1), (b0, b1) = epochs(0), epochs(1)
    assert not torch.equal(a0, a1)
    assert torch.equal(a0, b0) and torch.equal(a1, b1)


@pytest.fixture
def root_logging():
    """``medvae train`` on a rank other than 0 quietens the root logger and warnings for the process:
    put them back for the tests after it."""
    import logging
    import warnings

    level, filters = logging.getLogger().level, list(warnings.filters)
    yield
    logging.getLogger().setLevel(level)
    warnings.filters[:] = filters


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_prints_the_summary(monkeypatch, capsys, tmp_path, root_logging, rank, printed):
    from medvae.cli import main

    result = loop.TrainResult(output_dir=tmp_path, epochs_run=1, steps=2)
    monkeypatch.setattr(loop, "train", lambda cfg, resume=False: result)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "default", "--no-mlflow", "optim.epochs=1"]) == 0
    out = capsys.readouterr().out
    assert ("trained 1 epoch(s), 2 steps; no validation set" in out) is printed


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_under_torchrun_only_rank_0_warns_about_the_scans_it_reads(monkeypatch, tmp_path, caplog, root_logging,
                                                                  rank, said):
    """Every rank read the same scans and logged each scan's warning once per process."""
    import logging

    from medvae.cli import main

    def fake_train(cfg, resume=False):
        logging.getLogger("medvae.io.dicom").warning("a.dcm: no PixelSpacing; assuming 1 mm pixels")
        logging.getLogger("medvae.training").error("rank %s failed", rank)
        return loop.TrainResult(output_dir=tmp_path, epochs_run=1, steps=2)

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "default", "--no-mlflow", "optim.epochs=1"]) == 0
    assert ("no PixelSpacing" in caplog.text) is said
    assert f"rank {rank} failed" in caplog.text  # errors: every rank


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False), ("", True)])
def test_under_torchrun_only_rank_0_says_what_is_wrong_with_the_config(monkeypatch, capsys, rank, said):
    """Every rank read the same bad key and printed the same error: once per GPU, on every machine."""
    from medvae.cli import main

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--config", "default", "--no-mlflow", "optim.epochz=1"]) == 2
    err = capsys.readouterr().err
    assert ("optim.epochz" in err) is said
    if said:
        assert err.count("\n") == 1 and err.startswith("medvae train: error:")
    monkeypatch.delenv("WORLD_SIZE")  # a stray RANK outside torchrun: said
    assert main(["train", "--config", "default", "--no-mlflow", "optim.epochz=1"]) == 2
    assert "optim.epochz" in capsys.readouterr().err


def test_a_recipe_file_reaches_mlflow_and_the_model_only_as_a_digest(dev_data, tmp_path):
    """A recipe path (it can name a patient) was logged word for word: params, checkpoint, model meta."""
    from medvae import resources
    from medvae.tracking import config_params, redacted_config
    from medvae.training.config import load_config
    from medvae.training.loop import _meta

    recipe = tmp_path / "DOE^JANE" / "boxes.yaml"
    recipe.parent.mkdir()
    with resources.folder("recipes").joinpath("boxes.yaml").open("rb") as fh:
        recipe.write_bytes(fh.read())
    cfg = load_config("default", tiny(dev_data, tmp_path / "run", f"corruption.recipe={recipe}"))
    params = config_params(cfg.to_dict())
    assert "corruption.recipe" not in params and len(params["corruption.recipe_sha1"]) == 12
    assert params["corruption.val_recipe"] == cfg.corruption.val_recipe  # a shipped name stays readable
    redacted = redacted_config(cfg.to_dict())["corruption"]
    assert redacted["recipe"] == f"sha1:{params['corruption.recipe_sha1']}"
    meta = _meta(cfg, 0, 1, {})
    assert meta["recipe"] == redacted["recipe"] and "DOE" not in repr(meta)
    # the model names its data as the run's params do: digests (it held nothing of its data or split)
    named = load_config("default", tiny(dev_data, tmp_path / "r3", f"data.val_paths=['{recipe.parent}/*.nii.gz']"))
    data = _meta(named, 0, 1, {})["data"]
    assert data["val_paths"] == f"sha1:{config_params(named.to_dict())['data.val_paths_sha1']}"
    assert data["paths"].startswith("sha1:") and "DOE" not in repr(data)
    shipped = load_config("default", tiny(dev_data, tmp_path / "r2"))  # a shipped recipe keeps its name
    assert _meta(shipped, 0, 1, {})["recipe"] == shipped.corruption.recipe == "boxes"


def test_init_from_default_is_the_shipped_model_from_any_folder(dev_data, tmp_path, monkeypatch):
    """``init_from: default`` names the weights inside the installed package, as ``restore --model default``
    does (a wheel user has no ``medvae/weights/default.pt`` beside the working folder)."""
    from medvae.models.checkpoint import read_checkpoint, warm_start
    from medvae.models.vae import MaskedVAE, VAEConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, tiny(dev_data, tmp_path / "run", "init_from=default"))
    assert cfg.init_from == "default"
    # found (no "config key 'init_from': no file 'default'"), and tried on the model: a tiny one cannot take it
    with pytest.raises(MedvaeError, match=r"^override 'init_from=default': config key 'init_from' \(default\): cannot "
                                          r"warm-start: "
                                          r"the model has no place for"):
        loop._preflight(cfg, resume=False)
    shipped = read_checkpoint(DEFAULT_WEIGHTS)
    model = MaskedVAE(VAEConfig.from_dict(shipped["model_config"]))
    assert warm_start(model, "default") == {"copied": len(shipped["state_dict"]), "grown": 0, "new": 0}
    assert all(torch.equal(v, shipped["state_dict"][k]) for k, v in model.state_dict().items())


def test_a_stray_or_malformed_rank_is_no_traceback(monkeypatch):
    """RANK=1 without WORLD_SIZE made DistributedSampler raise "Invalid rank 1"; RANK=x an int() error."""
    from medvae.errors import MedvaeError

    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert loop.dist_info() == (0, 0, 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert loop.dist_info() == (1, 1, 2)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MedvaeError, match=r"environment variable RANK='x' is not an integer .*start the training "
                                          "with torchrun"):
        loop.dist_info()


def test_resume_refuses_a_checkpoint_whose_data_was_split_otherwise_between_processes(dev_data, tmp_path):
    """Resumed under another number of processes (or a store dealt otherwise), a run took other steps than
    an uninterrupted one, without a word."""
    out = tmp_path / "run"
    args = tiny(dev_data, out, "data.samples_per_epoch=40")
    train(load_config(None, args))
    state = torch.load(out / "last.pt", weights_only=True)
    assert len(state["ranks_digest"]) == 16
    state["ranks_digest"] = "0" * 16  # as a 2-process run of it would record
    torch.save(state, out / "last.pt")
    with pytest.raises(MedvaeError, match=r"last\.pt: this run's last checkpoint was trained with its data split "
                                          "otherwise between processes"):
        train(load_config(None, args), resume=True)


def test_an_output_dir_inside_a_dicom_input_folder_is_refused(dev_data, tmp_path):
    """Checkpoints were written into the series folder (prepare refuses its store there)."""
    import shutil

    ser = tmp_path / "ser"
    shutil.copytree(dev_data / "dicom" / "series_ct_head", ser)
    args = tiny(dev_data, ser / "tout", f"data.paths=['{ser}']")
    with pytest.raises(MedvaeError, match=r"tout: config key 'output_dir' lies inside the training input .*ser"):
        train(load_config(None, args))
    assert not (ser / "tout").exists()


def test_no_usable_training_slice_names_the_config_file(dev_data, tmp_path, capsys):
    from medvae.cli import main

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("optim:\n  epochs: 1\n")
    args = ["--config", str(cfg_file), *tiny(dev_data, tmp_path / "run", "data.min_size=2000")]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medvae train: error: {cfg_file}: no usable training slices in the 2 training scan(s)")
    assert "data.min_size 2000" in err and err.count("\n") == 1


def test_augmentations_set_while_augment_is_false_are_said_to_do_nothing(dev_data, tmp_path, caplog):
    from medvae.intensity import IntensityPolicy
    from medvae.training.data import build_training_data

    cfg = load_config(None, tiny(dev_data, tmp_path / "run", "data.augment=false", "data.texture=0.5",
                                 "data.downsample=0.3"))
    with caplog.at_level("WARNING", logger="medvae.training.data"):
        build_training_data(cfg, intensity=IntensityPolicy(), with_val=False)
    assert "data.augment is false, so data.downsample 0.3 and data.texture 0.5 (augmentations) do nothing" in caplog.text
