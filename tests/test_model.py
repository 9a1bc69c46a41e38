"""The masked VAE: shapes, posterior mean vs samples, known pixels, checkpoint safety."""
import dataclasses
import re

import numpy as np
import pytest
import torch

from medvae.errors import MedvaeError
from medvae.intensity import IntensityPolicy
from medvae.losses import LossConfig, beta_at, kl_divergence, masked_vae_loss
from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict, load_model, read_checkpoint
from medvae.models.vae import MaskedVAE, VAEConfig

SMALL = VAEConfig(channels=(8, 16, 16), latent_channels=4)


def _trained_like(seed=0):
    torch.manual_seed(seed)
    model = MaskedVAE(SMALL)
    with torch.no_grad():  # the zero-initialised head would make the output ignore z
        model.head.conv.weight.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("shape", [(2, 1, 64, 64), (1, 1, 130, 97), (3, 1, 7, 5)])
def test_any_size_comes_back_the_same_size(shape):
    model = _trained_like()
    x = torch.rand(shape)
    assert model.posterior_mean(x, torch.ones_like(x)).shape == shape


def test_3d_model_runs_on_patches():
    model = MaskedVAE(VAEConfig(spatial_dims=3, channels=(4, 8), latent_channels=2))
    x = torch.rand(1, 1, 12, 10, 9)
    recon, mu, logvar = model(x, torch.ones_like(x))
    assert recon.shape == x.shape and mu.shape == logvar.shape and mu.shape[1] == 2


def test_encode_returns_mean_and_logvar_and_eval_uses_the_mean():
    model = _trained_like()
    x = torch.rand(2, 1, 32, 32)
    m = torch.ones_like(x)
    mu, logvar = model.encode(x, m)
    assert mu.shape == logvar.shape == (2, 4, 8, 8)
    a, b = model.posterior_mean(x, m), model.posterior_mean(x, m)
    assert torch.equal(a, b)  # the mean is deterministic (not mean + sigma, MONAI #8413)


def test_samples_differ_and_their_mean_approaches_the_posterior_mean():
    model = _trained_like()
    x = torch.rand(1, 1, 32, 32)
    m = torch.ones_like(x)
    draws = model.sample(x, m, 400, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (400, 1, 1, 32, 32)
    assert not torch.equal(draws[0], draws[1])
    mean = model.posterior_mean(x, m)
    err = lambda n: float((draws[:n].mean(0) - mean).abs().mean())  # noqa: E731
    assert draws.std(0).mean() > 0
    # averaging more samples moves toward the posterior mean (up to the decoder's curvature)
    assert err(400) < 0.5 * err(1)


def test_known_pixels_are_kept_exactly():
    model = _trained_like()
    x = torch.rand(1, 1, 32, 32)
    m = torch.zeros_like(x)
    m[..., 8:16, 8:16] = 1
    out = model.posterior_mean(x, m)
    assert torch.equal(out[m == 0], x[m == 0])
    assert not torch.equal(out[m == 1], x[m == 1])
    s = model.sample(x, m, 3)
    assert torch.equal(s[:, m == 0], x[m == 0].expand(3, -1))


def test_bad_input_shapes_are_named():
    model = _trained_like()
    with pytest.raises(ValueError, match="expects input"):
        model.posterior_mean(torch.rand(1, 2, 16, 16), torch.ones(1, 1, 16, 16))
    with pytest.raises(ValueError, match="mask shape"):
        model.posterior_mean(torch.rand(1, 1, 16, 16), torch.ones(1, 1, 8, 16))


def test_loss_components_and_mask_weight():
    y = torch.zeros(2, 1, 8, 8)
    recon = torch.zeros_like(y)
    recon[..., :2, :2] = 1.0  # error only inside the mask
    mask = torch.zeros_like(y)
    mask[..., :2, :2] = 1
    mu, logvar = torch.zeros(2, 3, 2, 2), torch.zeros(2, 3, 2, 2)
    total, parts = masked_vae_loss(recon, y, mask, mu, logvar, step=0, cfg=LossConfig(mask_weight=4.0))
    assert parts["rec"] == pytest.approx(4 / 64)
    assert parts["rec_mask"] == pytest.approx(1.0)  # averaged over mask pixels only
    assert parts["kl"] == pytest.approx(0.0)
    assert float(total) == pytest.approx(4 / 64 + 4.0)


def test_kl_matches_closed_form_and_free_bits():
    mu = torch.full((1, 2, 3, 3), 1.0)
    logvar = torch.zeros_like(mu)
    assert float(kl_divergence(mu, logvar)) == pytest.approx(2 * 0.5)  # 0.5*mu^2 per channel
    assert float(kl_divergence(torch.zeros_like(mu), logvar, free_bits=0.25)) == pytest.approx(0.5)


def test_beta_warmup_schedules():
    lin = LossConfig(beta=2.0, warmup="linear", warmup_steps=10)
    assert [beta_at(s, lin) for s in (0, 5, 10, 50)] == [0.0, 1.0, 2.0, 2.0]
    cyc = LossConfig(beta=1.0, warmup="cyclic", warmup_steps=10)
    assert beta_at(2, cyc) == pytest.approx(0.4) and beta_at(7, cyc) == 1.0 and beta_at(10, cyc) == 0.0
    with pytest.raises(ValueError, match="warmup"):
        LossConfig(warmup="sometimes")
    with pytest.raises(ValueError, match="mask_weight"):
        LossConfig(mask_weight=-1)


def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    model = _trained_like()
    path = atomic_torch_save(checkpoint_dict(model, IntensityPolicy(), meta={"note": "x"}), tmp_path / "m.pt")
    torch.load(path, weights_only=True)  # must not need unpickling
    lm = load_model(path)
    x = torch.rand(1, 1, 24, 24)
    assert torch.equal(lm.model.posterior_mean(x, torch.ones_like(x)), model.posterior_mean(x, torch.ones_like(x)))
    assert lm.intensity == IntensityPolicy() and lm.meta["note"] == "x"
    assert not list(tmp_path.glob(".*tmp"))  # no temporary left behind
    # integer weights were cast on load (most to 0): a model that returned its input, exit 0
    ck = checkpoint_dict(model, IntensityPolicy())
    ck["state_dict"] = {k: v.to(torch.int64) for k, v in ck["state_dict"].items()}
    with pytest.raises(MedvaeError, match=r"int.pt: weights do not match the model configuration: tensor \S+ holds "
                                          r"torch.int64 values, the model needs floating-point weights"):
        load_model(atomic_torch_save(ck, tmp_path / "int.pt"))
    from medvae.models.checkpoint import warm_start  # init_from= started from all-zero weights, exit 0

    with pytest.raises(MedvaeError, match=r"cannot warm-start: tensor \S+ holds torch.int64 values"):
        warm_start(_trained_like(), tmp_path / "int.pt")


def test_pickled_model_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": MaskedVAE(SMALL)}, path)  # a whole pickled module
    with pytest.raises(MedvaeError, match="weights_only") as exc:
        load_model(path)
    assert "evil.pt" in str(exc.value) and "\n" not in str(exc.value)


def test_a_scan_given_as_the_model_is_named_as_such_not_as_pickled_objects(tmp_path, dev_data, capsys):
    """A NIfTI image as --model was "holds pickled Python objects": torch's weights-only unpickler
    read its first byte. A scan is named by its contents; a pickle with code is still refused unread."""
    import os
    import shutil

    from medvae.cli import main

    src = dev_data / "nifti/heudiconv_axasc35.nii.gz"
    dicom = shutil.copy(dev_data / "dicom/pydicom/CT_small.dcm", tmp_path / "model.pt")  # by name a .pt
    for model, kind in ((src, "a NIfTI image (gzip-compressed)"), (dicom, "a DICOM file")):
        assert main(["restore", str(src), str(tmp_path / "out.nii.gz"), "--model", str(model)]) == 2
        err = capsys.readouterr().err
        assert err == (f"medvae restore: error: {model}: not a medvae model: this looks like {kind}, "
                       "not a medvae checkpoint (.pt)\n")
        assert not (tmp_path / "out.nii.gz").exists()

    canary = tmp_path / "canary"
    canary.write_text("unpickling the payload would remove this file")

    class Payload:
        def __reduce__(self):
            return (os.remove, (str(canary),))

    for legacy in (False, True):  # zip archive and the old format: both go to weights_only=True
        path = tmp_path / f"payload_{legacy}.pt"
        torch.save({"x": Payload()}, path, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(MedvaeError, match="holds pickled Python objects"):
            read_checkpoint(path)
    assert canary.exists()


@pytest.mark.parametrize("kind", ["object_protocol4", "module_protocol5", "torchscript"])
def test_a_refused_checkpoint_is_one_line_on_stderr(kind, tmp_path, dev_data):
    # torch printed UserWarning lines (pickle protocol, TorchScript archive) before medvae's refusal
    import subprocess
    import sys
    import warnings

    path = tmp_path / f"{kind}.pt"
    if kind == "object_protocol4":
        torch.save({"x": object()}, path, pickle_protocol=4)
    elif kind == "module_protocol5":
        torch.save(torch.nn.Linear(2, 2), path, pickle_protocol=5)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's own
            torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    out = tmp_path / "out.nii.gz"
    proc = subprocess.run([sys.executable, "-m", "medvae", "restore", str(dev_data / "nifti/heudiconv_axasc35.nii.gz"),
                           str(out), "--model", str(path)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"medvae restore: error: {path}: not a medvae model: ")
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert ("TorchScript archive" in proc.stderr) == (kind == "torchscript")
    assert ("pickle protocol" in proc.stderr) == (kind != "torchscript")
    assert not out.exists()


def test_a_checkpoint_in_another_pickle_protocol_is_refused_in_one_line_without_warnings(tmp_path):
    import warnings

    path = tmp_path / "p4.pt"  # tensors only, but torch.load(weights_only=True) cannot read protocol 4
    torch.save(checkpoint_dict(_trained_like(), IntensityPolicy()), path, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MedvaeError) as exc:
            load_model(path)
    assert [str(w.message) for w in caught] == []
    assert str(exc.value) == (f"{path}: not a medvae model: it was written with pickle protocol 4, which "
                              "torch.load(weights_only=True) cannot read: save it with torch.save's default "
                              "protocol (2)")


def test_non_medvae_files_are_refused(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file at all")
    with pytest.raises(MedvaeError, match="not a medvae model"):
        load_model(junk)
    noise = tmp_path / "noise.pt"  # 0x80 then no pickle protocol: it was "written with pickle protocol 242"
    noise.write_bytes(b"\x80\xf2" + bytes(range(200)))
    with pytest.raises(MedvaeError, match="starts with no zip archive or protocol-2\\+ pickle header"):
        load_model(noise)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(MedvaeError, match="no medvae checkpoint header"):
        load_model(other)
    with pytest.raises(MedvaeError, match="not found"):
        load_model(tmp_path / "missing.pt")


def test_mismatched_weights_are_named(tmp_path):
    ck = checkpoint_dict(_trained_like(), IntensityPolicy())
    ck["model_config"]["channels"] = [8, 32, 16]
    path = atomic_torch_save(ck, tmp_path / "bad.pt")
    with pytest.raises(MedvaeError, match="do not match the model configuration"):
        load_model(path)
    ck = checkpoint_dict(_trained_like(), IntensityPolicy())
    ck["model_config"]["in_channels"] = 3
    with pytest.raises(MedvaeError, match="shape"):
        load_model(atomic_torch_save(ck, tmp_path / "chan.pt"))



def test_a_flipped_bit_in_the_weights_is_refused_not_restored_with(tmp_path):
    # torch.load does not check the archive's CRC-32s: the damaged weight loaded finite but wrong
    ck = checkpoint_dict(_trained_like(), IntensityPolicy())
    path = atomic_torch_save(ck, tmp_path / "m.pt")
    weight = ck["state_dict"]["enc.0.0.conv.weight"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = bytes(data).find(weight)
    assert at > 0
    data[at + 5] ^= 0x01  # one bit of one float32's mantissa
    path.write_bytes(bytes(data))
    with pytest.raises(MedvaeError, match="damaged") as exc:
        load_model(path)
    assert str(exc.value).startswith(f"{path}: ") and "\n" not in str(exc.value)


def test_truncated_files_and_unbuildable_configurations_are_named(tmp_path):
    ck = checkpoint_dict(_trained_like(), IntensityPolicy())
    whole = atomic_torch_save(ck, tmp_path / "whole.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MedvaeError, match="cut.pt: not a medvae model: the file is truncated or damaged"):
        load_model(cut)
    ck["model_config"]["latent_channels"] = -1  # torch refuses the size with a RuntimeError
    with pytest.raises(MedvaeError, match="neg.pt: invalid model configuration in checkpoint"):
        load_model(atomic_torch_save(ck, tmp_path / "neg.pt"))


def test_harmonic_prefill_fills_holes_smoothly_and_leaves_noise_only_inputs_alone():
    from medvae.models.vae import harmonic_fill

    yy, xx = torch.meshgrid(torch.linspace(0, 1, 48), torch.linspace(0, 1, 48), indexing="ij")
    ramp = (0.3 + 0.5 * xx + 0.2 * yy)[None, None].repeat(2, 1, 1, 1)  # harmonic: filled exactly
    known = torch.ones_like(ramp)
    known[0, :, 10:30, 12:36] = 0
    known[1] = 0  # no known pixel (global noise): unchanged
    holed = torch.where(known > 0, ramp, torch.zeros_like(ramp))
    filled = harmonic_fill(holed, known)
    assert torch.equal(filled[0][known[0] > 0], ramp[0][known[0] > 0])
    assert (filled[0] - ramp[0]).abs().max() < 0.02
    assert torch.equal(filled[1], holed[1])
    model = MaskedVAE(VAEConfig(channels=(4, 8), prefill="harmonic")).eval()  # zero head: output = prefill
    out = model.posterior_mean(holed[:1], 1 - known[:1])
    assert (out - ramp[:1]).abs().max() < 0.02
    with pytest.raises(ValueError, match="prefill"):
        VAEConfig(prefill="magic")
    with pytest.raises(ValueError, match="prefill 'harmonic' is for 2-D models"):  # a 3-D model ignored it
        VAEConfig(spatial_dims=3, prefill="harmonic")


def test_torchscript_export_restores_bit_identically_and_stale_exports_are_refused(tmp_path, ct_slice_hu):
    from medvae.intensity import normalize
    from medvae.models.export import export_model, load_exported, weights_sha256

    lm = load_model("default")
    sha = weights_sha256(lm.model.state_dict())
    path = export_model(lm.model, tmp_path / "m.ts", weights_sha256=sha)
    scripted = load_exported(path, weights_sha256=sha)
    x = torch.from_numpy(normalize(ct_slice_hu[:, :100, :90], (-1000.0, 1000.0)).copy())[None]  # 100x90: padded
    holes = torch.zeros_like(x)
    holes[..., 20:50, 30:60] = 1
    with torch.no_grad():
        for mask in (holes, torch.ones_like(x)):
            assert torch.equal(lm.model.posterior_mean(x, mask), scripted.posterior_mean(x, mask))
            assert torch.equal(lm.model.sample(x, mask, 2, generator=torch.Generator().manual_seed(5)),
                               scripted.sample(x, mask, 2, generator=torch.Generator().manual_seed(5)))
    assert load_exported(path, weights_sha256="0" * 64) is None       # exported from other weights
    assert load_exported(tmp_path / "none.ts", weights_sha256=sha) is None
    # the same weights under another config (a prefill or an activation without weights) are another network
    from dataclasses import replace

    assert load_exported(path, weights_sha256=sha, config=lm.model.config) is not None
    for change in ({"prefill": "none"}, {"act": "RELU"}):
        assert load_exported(path, weights_sha256=sha, config=replace(lm.model.config, **change)) is None, change
    assert load_exported(path, weights_sha256=sha, config=replace(lm.model.config, noise_map_gain=0.3)) is not None


def test_the_shipped_export_is_refused_when_the_checkpoint_config_changes(tmp_path, monkeypatch):
    # prefill "none" in the checkpoint ran the archive with the harmonic prefill built in
    import shutil

    import medvae.models.checkpoint as checkpoint
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, update_checkpoint
    from medvae.models.export import exported_path, load_inference_model

    path = tmp_path / "default.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, path)
    shutil.copyfile(exported_path(DEFAULT_WEIGHTS), exported_path(path))
    monkeypatch.setattr(checkpoint, "DEFAULT_WEIGHTS", path)
    assert isinstance(load_inference_model("default").model, torch.jit.ScriptModule)
    update_checkpoint(path, model_config={"prefill": "none"})
    eager = load_inference_model("default").model
    assert not isinstance(eager, torch.jit.ScriptModule) and eager.config.prefill == "none"


def test_the_noise_map_works_on_3d_batches_and_names_too_small_images():
    from medvae.models.vae import noise_level

    model = MaskedVAE(VAEConfig(spatial_dims=3, channels=(4, 8), latent_channels=2, noise_map=True)).eval()
    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    out = model.posterior_mean(x, torch.ones_like(x))  # batches of 2 failed: the estimate was (B, 1, 1, 1)
    assert out.shape == x.shape
    assert noise_level(x).shape == (2, 1, 1, 1, 1)
    assert torch.allclose(model.posterior_mean(x[1:], torch.ones_like(x[1:])), out[1:], atol=1e-6)
    with pytest.raises(ValueError, match="at least 2x2 pixels"):
        noise_level(torch.rand(1, 1, 1, 17))


def test_export_cli_checks_a_3d_model_and_leaves_no_unchecked_archive(tmp_path, capsys):
    from medvae.intensity import IntensityPolicy
    from medvae.models.checkpoint import atomic_torch_save, checkpoint_dict
    from medvae.models.export import exported_path
    from medvae.models.export import main as export_main

    model = MaskedVAE(VAEConfig(spatial_dims=3, channels=(4, 8), latent_channels=2, noise_map=True)).eval()
    ckpt = atomic_torch_save(checkpoint_dict(model, IntensityPolicy()), tmp_path / "m3d.pt")
    assert export_main([str(ckpt)]) == 0, capsys.readouterr().err
    assert exported_path(ckpt).is_file() and "equal to the eager model" in capsys.readouterr().out


def test_the_shipped_export_is_in_sync_and_restoring_with_it_does_not_import_monai():
    import subprocess
    import sys

    from medvae.models.checkpoint import DEFAULT_WEIGHTS
    from medvae.models.export import exported_path, load_exported, weights_sha256

    sha = weights_sha256(read_checkpoint(DEFAULT_WEIGHTS)["state_dict"])
    assert load_exported(exported_path(DEFAULT_WEIGHTS), weights_sha256=sha) is not None
    code = ("import sys, numpy as np; from medvae.restore import restore_volume; "
            "v = np.random.default_rng(0).normal(0, 30, (64, 64, 2)).astype('float32') - 500; "
            "m, s = restore_volume(v, modality='CT', samples=2); "
            "print(m.shape == v.shape, float(s.min()) > 0, 'monai' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ["True", "True", "False"], out.stderr[-2000:]


# -- v3: noise map, Laplace scale head, context units, warm start ------------------------------------

V3 = VAEConfig(channels=(8, 16, 16), latent_channels=4, prefill="harmonic", noise_map=True, scale_head=True,
               context_dilations=(2, 4))


def test_noise_level_agrees_with_skimage_on_a_real_slice(ct_slice_hu):
    from skimage.restoration import estimate_sigma

    from medvae.models.vae import noise_level

    clean = np.clip((np.squeeze(ct_slice_hu) + 1000.0) / 2000.0, 0, 1)
    assert clean.ndim == 2
    for sigma in (0.02, 0.08):
        noisy = clean + np.random.default_rng(0).normal(0, sigma, clean.shape)
        ours = float(noise_level(torch.from_numpy(noisy)[None, None]))
        ref = float(estimate_sigma(noisy))
        assert abs(ours - ref) < 0.1 * ref and abs(ours - sigma) < 0.15 * sigma


def test_laplace_loss_gives_the_mean_the_l1_gradient_and_fits_the_scale_to_the_error():
    target = torch.zeros(1, 1, 8, 8)
    mean = torch.full((1, 1, 8, 8), 0.3, requires_grad=True)
    log_b = torch.full((1, 1, 8, 8), float(np.log(0.1)), requires_grad=True)
    mu, logvar = torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    cfg = LossConfig(kind="laplace", mask_weight=0.0, beta=0.0)
    loss, parts = masked_vae_loss(torch.cat([mean, log_b], 1), target, torch.ones_like(target), mu, logvar,
                                  step=0, cfg=cfg)
    loss.backward()
    l1_mean = mean.detach().clone().requires_grad_(True)
    masked_vae_loss(l1_mean, target, torch.ones_like(target), mu, logvar, step=0,
                    cfg=LossConfig(kind="l1", mask_weight=0.0, beta=0.0))[0].backward()
    assert torch.allclose(mean.grad, l1_mean.grad)          # beta-NLL with weight b: the L1 gradient
    assert bool((log_b.grad < 0).all())                     # b = 0.1 < |error| = 0.3: b grows
    assert parts["l1"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="scale head"):
        masked_vae_loss(mean, target, torch.ones_like(target), mu, logvar, step=0, cfg=cfg)


def test_warm_start_grows_a_trained_model_without_changing_its_restoration(tmp_path):
    from medvae.models.checkpoint import warm_start

    old_cfg = VAEConfig(channels=(8, 16, 16), latent_channels=4, prefill="harmonic")
    old = MaskedVAE(old_cfg)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(0.05 * torch.randn_like(p))
    atomic_torch_save(checkpoint_dict(old, IntensityPolicy()), tmp_path / "old.pt")
    x = torch.rand(2, 1, 40, 36, generator=torch.Generator().manual_seed(0))
    holes = torch.zeros_like(x)
    holes[..., 10:25, 5:30] = 1
    # V3 adds 2 context units; a second residual unit per level adds 6 more (3 + 2 levels + latent)
    for cfg, n_new in ((V3, 12), (dataclasses.replace(V3, num_res_units=2), 12 + 36)):
        new = MaskedVAE(cfg)
        counts = warm_start(new, tmp_path / "old.pt")
        assert counts["grown"] == 3 and counts["new"] == n_new  # first conv (+noise map), head weight and bias
        for mask in (holes, torch.ones_like(x)):
            assert torch.allclose(old.eval().posterior_mean(x, mask), new.eval().posterior_mean(x, mask), atol=1e-6)
    with pytest.raises(MedvaeError, match="cannot warm-start"):
        warm_start(MaskedVAE(VAEConfig(channels=(4, 8, 8), latent_channels=4)), tmp_path / "old.pt")
    # wider: the zeros of the added width got no gradient and stayed 0.0 through training, exit 0
    for wider, key, have, was in ((dataclasses.replace(old_cfg, channels=(8, 32, 16)), "channels", "[8, 32, 16]",
                                   "[8, 16, 16]"), (dataclasses.replace(old_cfg, latent_channels=8), "latent_channels",
                                                    "8", "4")):
        with pytest.raises(MedvaeError) as exc:
            warm_start(MaskedVAE(wider), tmp_path / "old.pt")
        assert str(exc.value) == (f"{tmp_path / 'old.pt'}: cannot warm-start: model.{key} is {have}, the checkpoint's "
                                  f"is {was}; a warm start does not widen layers (the added width would start at zero "
                                  f"and never train): keep model.{key} {was}, or train from scratch")
    # the other way round: the smaller model has no place for the grown one's units (it trained, exit 0,
    # from a start that dropped 60 of the shipped model's 142 tensors)
    atomic_torch_save(checkpoint_dict(new, IntensityPolicy()), tmp_path / "grown.pt")
    with pytest.raises(MedvaeError, match=r"cannot warm-start: the model has no place for 48 of the checkpoint's "
                                          r"\d+ tensors \(first: "):
        warm_start(MaskedVAE(old_cfg), tmp_path / "grown.pt")


def test_predictive_std_is_the_decoder_scale_plus_the_sample_spread_and_zero_on_known_pixels():
    torch.manual_seed(0)
    model = MaskedVAE(V3).eval()
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.1)
    x = torch.rand(1, 1, 32, 32)
    holes = torch.zeros_like(x)
    holes[..., 8:20, 8:20] = 1
    mean, std = model.predictive(x, holes, 1)
    recon, _, _ = model(x, holes, sample=False)
    b = torch.exp(recon[:, 1:])
    assert torch.equal(mean, model.posterior_mean(x, holes))
    assert torch.allclose(std[holes > 0], (np.sqrt(2) * b)[holes > 0], rtol=1e-5)   # n = 1: aleatoric only
    assert bool((std[holes == 0] == 0).all())
    _, std8 = model.predictive(x, holes, 8, generator=torch.Generator().manual_seed(0))
    assert bool((std8[holes > 0] >= std[holes > 0] - 1e-7).all())                   # + the latent spread


def test_torchscript_export_of_a_v3_model_matches_the_eager_model(tmp_path):
    from medvae.models.export import export_model, load_exported

    torch.manual_seed(0)
    model = MaskedVAE(V3).eval()
    with torch.no_grad():
        model.head.conv.weight.normal_(0, 0.1)
        for unit in model.context:
            unit.conv[-1].conv.weight.normal_(0, 0.05)
    scripted = load_exported(export_model(model, tmp_path / "v3.ts", weights_sha256="x"), weights_sha256="x")
    x = torch.rand(2, 1, 45, 38, generator=torch.Generator().manual_seed(2))
    holes = (torch.rand(x.shape, generator=torch.Generator().manual_seed(3)) > 0.8).float()
    for mask in (holes, torch.ones_like(x)):
        assert torch.equal(model.posterior_mean(x, mask), scripted.posterior_mean(x, mask))
        a = model.posterior_terms(x, mask, 3, generator=torch.Generator().manual_seed(4))
        b = scripted.posterior_terms(x, mask, 3, generator=torch.Generator().manual_seed(4))
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_the_noise_map_gain_comes_from_the_checkpoint_for_the_eager_and_the_exported_model(tmp_path, monkeypatch,
                                                                                            ct_slice_hu):
    import shutil

    import medvae.models.checkpoint as checkpoint
    from medvae.intensity import normalize
    from medvae.models.checkpoint import DEFAULT_WEIGHTS, update_checkpoint
    from medvae.models.export import exported_path, load_inference_model
    from medvae.models.vae import encoder_input

    path = tmp_path / "default.pt"
    shutil.copyfile(DEFAULT_WEIGHTS, path)
    shutil.copyfile(exported_path(DEFAULT_WEIGHTS), exported_path(path))
    update_checkpoint(path, model_config={"noise_map_gain": 0.5})
    eager = load_model(path).model
    assert eager.config.noise_map_gain == 0.5 and load_model(DEFAULT_WEIGHTS).config.noise_map_gain > 0.5
    monkeypatch.setattr(checkpoint, "DEFAULT_WEIGHTS", path)
    scripted = load_inference_model("default").model
    assert isinstance(scripted, torch.jit.ScriptModule) and scripted.noise_map_gain == 0.5

    clean = torch.from_numpy(normalize(ct_slice_hu[:, :96, :96], (-1000.0, 1000.0)).copy())[None]
    x = clean + 0.05 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))
    ones = torch.ones_like(x)
    channel = encoder_input(x, ones, True, 0.5)[:, 2]
    assert torch.allclose(channel, 0.5 * encoder_input(x, ones, True)[:, 2])
    with torch.no_grad():
        assert torch.equal(eager.posterior_mean(x, ones), scripted.posterior_mean(x, ones))
        assert not torch.equal(eager.posterior_mean(x, ones), load_model(DEFAULT_WEIGHTS).model.posterior_mean(x, ones))
    # a configuration that no longer fits the weights is refused and the file is left as it was
    before = path.read_bytes()
    with pytest.raises(MedvaeError, match="weights do not match|shape"):
        update_checkpoint(path, model_config={"channels": [8, 16, 32, 64]})
    assert path.read_bytes() == before
    with pytest.raises(ValueError, match="noise_map_gain must be positive"):
        VAEConfig(noise_map_gain=0.0)
    # checkpoints written before the gain existed load with the trained gain, 1.0
    assert VAEConfig.from_dict({k: v for k, v in VAEConfig().to_dict().items() if k != "noise_map_gain"}
                               ).noise_map_gain == 1.0


def test_a_checkpoint_write_that_torch_fails_is_an_oserror_naming_the_file(tmp_path, monkeypatch):
    # a full disk came out of torch's zip writer as a RuntimeError traceback ("unexpected pos")
    import errno
    import os
    from types import SimpleNamespace

    from medvae.models.checkpoint import atomic_torch_save

    def failing_save(obj, fh):
        fh.write(b"PK\x03\x04partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 9344 vs 9242")

    monkeypatch.setattr(torch, "save", failing_save)
    out = tmp_path / "last.pt"
    with pytest.raises(OSError) as exc:
        atomic_torch_save({"x": 1}, out)
    assert exc.value.filename == str(out) and "unexpected pos" in exc.value.strerror
    assert exc.value.errno == errno.EIO and not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(os, "statvfs", lambda p: SimpleNamespace(f_bavail=10, f_frsize=4096))
    with pytest.raises(OSError) as exc:
        atomic_torch_save({"x": 1}, out)
    assert (exc.value.errno, exc.value.strerror) == (errno.ENOSPC, "No space left on device")


    def pickling_fails(obj, fh):  # torch's own error, not a write that failed: kept as it is
        raise RuntimeError("dictionary changed size during iteration")

    monkeypatch.setattr(torch, "save", pickling_fails)
    with pytest.raises(RuntimeError, match="dictionary changed size"):
        atomic_torch_save({"x": 1}, out)


@pytest.mark.parametrize("kwargs, said", [
    ({"spatial_dims": "2"}, "spatial_dims must be 2 or 3, got '2'"),  # read "must be 2 or 3, got 2"
    ({"spatial_dims": 2.0}, "spatial_dims must be 2 or 3, got 2.0"),  # failed later: "tuple indices must be"
    ({"latent_channels": 0}, "latent_channels must be a whole number >= 1, got 0"),  # after torch's warning
    ({"num_res_units": -1}, "num_res_units must be a whole number >= 0, got -1"),
    ({"in_channels": None}, "in_channels must be a whole number >= 1, got None"),  # "NoneType and int" later
])
def test_a_bad_model_configuration_says_what_it_got(kwargs, said):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=re.escape(said)):
            VAEConfig(**kwargs)
