"""Training config errors name the key; overrides and defaults parse."""
import re
from pathlib import Path

import pytest

from medvae.errors import MedvaeError
from medvae.training.config import expand_paths, load_config

REPO = Path(__file__).resolve().parents[1]


def test_default_config_parses_and_names_real_data():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert cfg == load_config("default")  # the checkout path links to the shipped file
    assert cfg.model.spatial_dims == 2 and cfg.loss_config.kind == "laplace" and cfg.model.scale_head
    if (REPO.parent / "shared" / "data" / "dev").is_dir():
        train = expand_paths(cfg.data.paths, "data.paths")
        val = expand_paths(cfg.data.val_paths, "data.val_paths")
        assert len(train) >= 8 and len(val) >= 3


def test_exponent_floats_are_floats_in_overrides_and_files(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string, which the strict schema refused
    p = tmp_path / "cfg.yaml"
    p.write_text("optim:\n  lr: 3e-4\n  weight_decay: 1E-5\n")
    cfg = load_config(p, ["optim.grad_clip=5e-1", "optim.epochs=2"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.grad_clip, cfg.optim.epochs) == (3e-4, 1e-5, 0.5, 2)


def test_yaml_1_1_words_are_text_not_booleans(tmp_path):
    # `amp: off` was read as False and refused as "should be 'auto', 'off', ..., got False"
    p = tmp_path / "cfg.yaml"
    p.write_text("amp: off\ntracking:\n  run_name: no\ndata:\n  augment: false\n")
    cfg = load_config(p)
    assert (cfg.amp, cfg.tracking.run_name, cfg.data.augment) == ("off", "no", False)
    assert load_config(None, ["amp=off", "data.augment=True"]).amp == "off"


def test_the_checked_loss_values_are_the_ones_trained_with():
    cfg = load_config(None, ["loss.mask_weight=3", "loss.kind=mse"])
    assert cfg.loss == {"mask_weight": 3.0, "kind": "mse"} and isinstance(cfg.loss["mask_weight"], float)
    assert (cfg.loss_config.mask_weight, cfg.loss_config.beta) == (3.0, 1e-4)
    assert cfg.to_dict()["loss"]["warmup_steps"] == 1000


def test_overrides_are_typed():
    cfg = load_config(None, ["optim.epochs=3", "optim.lr=0.01", "model.channels=[4,8]", "tracking.uri=null"])
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.model.channels, cfg.tracking.uri) == (3, 0.01, [4, 8], None)


@pytest.mark.parametrize("override, message", [
    ("optim.epoch=3", "unknown config key 'optim.epoch'"),
    ("optim.epochs=three", "config key 'optim.epochs' must be int"),
    ("model.channels=5x", "config key 'model.channels' must be list"),
    ("loss.betta=1", "unknown config key 'loss.betta'"),
    ("loss.kind=huber", "loss.kind must be 'l1', 'mse' or 'laplace'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("optim.train=encoder", "config key 'optim.train' input should be 'all' or 'scale_head', got 'encoder'"),
    ("optim.max_minutes=-1", "config key 'optim.max_minutes' input should be greater than or equal to 0, got -1"),
    # values that trained nonsense or failed later with a traceback (the training audit)
    ("optim.scheduler=cosin", "config key 'optim.scheduler' input should be 'cosine' or 'none', got 'cosin'"),
    ("optim.batch_size=0", "config key 'optim.batch_size' input should be greater than or equal to 1, got 0"),
    ("optim.epochs=-3", "config key 'optim.epochs' input should be greater than or equal to 1, got -3"),
    ("optim.lr=-0.1", "config key 'optim.lr' input should be greater than 0, got -0.1"),
    ("optim.lr=.inf", "config key 'optim.lr' input should be a finite number, got inf"),
    ("optim.grad_clip=.nan", "config key 'optim.grad_clip' input should be a finite number"),
    ("data.patch_size=-32", "config key 'data.patch_size' input should be greater than or equal to 16, got -32"),
    ("data.patch_size=100000", "config key 'data.patch_size' input should be less than or equal to 1024, got 100000"),
    ("data.large_patch_size=4096", "config key 'data.large_patch_size' input should be less than or equal to 1024"),
    # a trial build raised torch's allocator error (a traceback); a huge latent passed it and took 23 GB
    ("model.channels=[4,200000]", "config key 'model.channels' input should be less than or equal to 2048, got 200000"),
    ("model.latent_channels=1000000",
     "config key 'model.latent_channels' input should be less than or equal to 2048, got 1000000"),
    ("data.val_slices=-1", "config key 'data.val_slices' input should be greater than or equal to 0, got -1"),
    ("tracking.log_every=0", "config key 'tracking.log_every' input should be greater than or equal to 1, got 0"),
    ("amp=fp61", "config key 'amp' input should be 'auto', 'off', 'bf16' or 'fp16', got 'fp61'"),
    ("model.prefill=harmonc", "config key 'model.prefill' input should be 'none' or 'harmonic', got 'harmonc'"),
    ("model.latent_channels=0", "config key 'model.latent_channels' input should be greater than or equal to 1"),
    ("model.channels=[4]", "config key 'model.channels' must list at least 2 values, got .4."),
    ("model.spatial_dims=3", "config key 'model.spatial_dims' is 3: medvae train cuts 2-D patches"),
    ("corruption.recipe=boxs", "config key 'corruption.recipe': unknown recipe 'boxs'; shipped: "),
    ("data.samples_per_epoch=3", "config key 'data.samples_per_epoch' 3 is smaller than optim.batch_size 16"),
    # accepted, then a traceback after the first epoch (inf) or an error once all scans were read
    ("optim.max_minutes=.inf", "config key 'optim.max_minutes' input should be a finite number, got inf"),
    ("data.texture_sigma=[0.01]",
     "config key 'data.texture_sigma' must be .low, high. with 0 < low <= high <= 1 .window units., got .0.01."),
    # passed the checks, then a traceback when training started or mid-epoch
    ("data.texture_sigma=[0.01,.inf]", "config key 'data.texture_sigma' must be .low, high. with 0 < low <= high <= 1"),
    ("intensity.ct_window=[-.inf,1000]", "config key 'intensity.ct_window' must be two increasing numbers within"),
    ("optim.lr=1e300", "config key 'optim.lr' input should be less than or equal to 10, got 1e.300"),
    ("data.augment=yes", "config key 'data.augment' must be bool, got 'yes'"),
    ("data.large_patch_size=64", "config key 'data.large_patch_size' must be 0 (off) or larger than data.patch_size"),
    ("data.window_jitter=0.5", "config key 'data.window_jitter' must be in .0, 0.5), got 0.5"),
    ("intensity.ct_window=[1000,-1000]", "config key 'intensity.ct_window' must be two increasing numbers"),
    # a traceback after the scans were read and the MLflow run opened; a name that matched no volume
    ("seed=-1", "config key 'seed' input should be greater than or equal to 0, got -1"),
    ("seed=1000000000000000", "config key 'seed' input should be less than 4294967296, got 1000000000000000"),
    ("loss.kind=laplace", "config key 'loss.kind' is 'laplace', which needs model.scale_head: true"),
    ("optim.train=scale_head", "config key 'optim.train' is 'scale_head', which needs model.scale_head: true"),
    ("optim.weight_decay=0.01 model.scale_head=true optim.train=scale_head",
     "config key 'optim.train' is 'scale_head', which needs optim.weight_decay 0"),
    ("data.texture_modalities=[XR]", "config key 'data.texture_modalities' lists CT and/or MR only, got .'XR'."),
])
def test_bad_keys_and_types_are_named(override, message):
    with pytest.raises(MedvaeError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        load_config(None, override.split())
    assert "\n" not in str(exc.value)


def test_bad_key_in_a_file_names_the_file(tmp_path):
    p = tmp_path / "loss.yaml"
    p.write_text("loss:\n  1: 2\n")
    with pytest.raises(MedvaeError, match=r"loss\.yaml: config key 'loss' keys should be strings, got 1$"):
        load_config(p)  # was "config key 'loss.[key]' must be str"
    p = tmp_path / "cfg.yaml"
    p.write_text("optim:\n  lr: 0.1\n  momentum: 0.9\n")
    with pytest.raises(MedvaeError, match=r"cfg\.yaml: unknown config key 'optim.momentum'"):
        load_config(p)
    # an override below a value named no file; an empty key was "unknown config key ''"
    with pytest.raises(MedvaeError, match=r"^override 'optim.lr.x=1': config key 'optim.lr.x': 'lr' is not a "
                                          r"section$"):
        load_config(p, ["optim.lr.x=1"])
    # a mistyped section on the command line was blamed on the file: "cfg.yaml: unknown config key 'optm'"
    good = tmp_path / "good.yaml"
    good.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(MedvaeError, match=r"^override 'optm.epochs=2': unknown config key 'optm'$"):
        load_config(good, ["optm.epochs=2", "optim.lr=0.5"])
    with pytest.raises(MedvaeError, match=r"cfg\.yaml: unknown config key 'optim.momentum'$"):
        load_config(p, ["optim.lr=0.5"])  # the file's own bad key, beside an unrelated override
    (tmp_path / "empty.yaml").write_text("optim:\n")  # an empty section holds the defaults, overrides too
    assert load_config(tmp_path / "empty.yaml", ["optim.epochs=1"]).optim.epochs == 1
    (tmp_path / "five.yaml").write_text("optim: 5\n")  # the file's fault, not the override's
    with pytest.raises(MedvaeError, match=r"five\.yaml: config key 'optim.epochs': 'optim' is not a section$"):
        load_config(tmp_path / "five.yaml", ["optim.epochs=1"])
    # a check of a whole section: the overrides that set it, and the file where it holds the section too
    with pytest.raises(MedvaeError, match=r"^override 'model.context_dilations=\[0\]': config key 'model': "):
        load_config(good, ["model.context_dilations=[0]"])
    with pytest.raises(MedvaeError, match=r"default\.yaml: config key 'model': context_dilations must be positive, "
                                          r"got \(0,\) \(with 'model.context_dilations=\[0\]' from the command line\)$"):
        load_config("default", ["model.context_dilations=[0]"])
    for item in ("=5", "optim..lr=5", ".x=1"):
        with pytest.raises(MedvaeError, match=rf"^override '{re.escape(item)}' names no config key: give "
                                              r"section.key=value"):
            load_config(p, [item])


def test_a_key_given_twice_and_a_file_that_is_not_text_are_one_line_errors(tmp_path):
    p = tmp_path / "cfg.yaml"  # PyYAML kept the second optim section: epochs 2, and lr silently the default
    p.write_text("optim:\n  lr: 0.1\ndata:\n  patch_size: 64\noptim:\n  epochs: 2\n")
    with pytest.raises(MedvaeError) as exc:
        load_config(p)
    assert str(exc.value) == f"{p}: invalid YAML (line 5): duplicate key 'optim'"
    p.write_text("optim: {lr: 0.1, lr: 0.2}\n")
    with pytest.raises(MedvaeError, match=r"cfg\.yaml: invalid YAML \(line 1\): duplicate key 'lr'"):
        load_config(p)
    p.write_bytes("optim:\n  lr: 0.1\n".encode("utf-16"))  # saved as UTF-16 by an editor
    with pytest.raises(MedvaeError, match=r"cfg\.yaml: not a YAML text file \(it is not UTF-8 text\)"):
        load_config(p)
    p.write_text("base: &b {lr: 0.1}\noptim:\n  <<: *b\n  epochs: 2\n")  # a merge key is no duplicate
    with pytest.raises(MedvaeError, match="unknown config key 'base'"):
        load_config(p)


def test_overrides_may_come_before_between_and_after_the_options():
    from medvae.cli import build_parser, parse

    args = parse(build_parser(), ["train", "optim.epochs=1", "--no-mlflow", "optim.lr=0.1", "--device", "cpu",
                                  "seed=3", "--resume"])
    assert args.overrides == ["optim.epochs=1", "optim.lr=0.1", "seed=3"]
    assert (args.no_mlflow, args.device, args.resume, args.config) == (True, "cpu", True, None)
    with pytest.raises(SystemExit):  # anything else unknown is still argparse's error
        parse(build_parser(), ["train", "optim.epochs=1", "--no-such-option"])


def test_missing_data_path_is_named(tmp_path):
    with pytest.raises(MedvaeError, match=r"config key 'data.paths': no scan matches .*nowhere"):
        expand_paths([str(tmp_path / "nowhere" / "*.nii.gz")], "data.paths")


@pytest.mark.parametrize("override, message", [
    ("data.augment=1", "config key 'data.augment' must be bool, got 1"),
    ("optim.lr=true", "config key 'optim.lr' must be float, got True"),
    ("optim.epochs=2.5", "config key 'optim.epochs' must be int, got 2.5"),
    ("model.channels=[8,x]", "config key 'model.channels' must be int, got 'x'"),
    ("optim=5", "config key 'optim' must be a mapping, got 5"),
    ("loss.beta=-1", "loss.beta must be >= 0, got -1.0"),
    # the loss section as strict as the others: "4" once crashed after the scans were read, and
    # true trained with beta 1, 10,000 times the default (the training audit)
    ('loss.mask_weight="4"', "config key 'loss.mask_weight' must be float, got '4'"),
    ("loss.beta=true", "config key 'loss.beta' must be float, got True"),
    ("loss.free_bits=.inf", "config key 'loss.free_bits' input should be a finite number, got inf"),
    ("loss.warmup_steps=10.5", "config key 'loss.warmup_steps' must be int, got 10.5"),
])
def test_types_are_strict_and_errors_name_the_key(override, message):
    with pytest.raises(MedvaeError) as exc:
        load_config(None, [override])
    assert str(exc.value) == f"override {override!r}: {message}"  # the command line's, not a file's


def test_config_by_name_and_relative_paths(tmp_path, monkeypatch):
    shipped = load_config("default")
    assert shipped.data.paths[0] == "../shared/data/dev/nifti/*.nii.gz"  # relative to the working directory
    with pytest.raises(MedvaeError, match=r"nodefault: config file not found \(or give a shipped config by name: default"):
        load_config("nodefault")
    # a config file's relative data paths fall back to its own folder; an empty section means defaults
    (tmp_path / "scans").mkdir()
    (tmp_path / "scans" / "a.nii.gz").write_bytes(b"")
    (tmp_path / "cfg.yaml").write_text("data:\n  paths: scans/*.nii.gz\noptim:\nloss:\n")
    monkeypatch.chdir(tmp_path.parent)
    cfg = load_config(tmp_path / "cfg.yaml")
    assert cfg.data.paths == [str(tmp_path / "scans/*.nii.gz")] and cfg.optim.epochs == 10
    assert cfg.to_dict()["loss"]["kind"] == "l1"


def test_default_config_builds_the_architecture_of_the_shipped_model():
    from dataclasses import asdict

    from medvae.models.checkpoint import DEFAULT_WEIGHTS, read_checkpoint

    shipped = read_checkpoint(DEFAULT_WEIGHTS)["model_config"]
    model = asdict(load_config("default").model)
    assert model == {k: shipped[k] for k in model}  # noise_map_gain is fitted later


def test_an_unknown_device_names_the_config_file_before_any_data_is_read(tmp_path, monkeypatch, capsys):
    from medvae.cli import main
    from medvae.training import data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(data, "build_training_data", lambda *a, **k: pytest.fail("data read before the check"))
    p = tmp_path / "cfg.yaml"
    p.write_text("device: foo\noptim:\n  epochs: 1\n")
    with pytest.raises(MedvaeError) as exc:
        load_config(p)
    assert str(exc.value) == f"{p}: config key 'device': unknown device 'foo' (use auto, cpu, cuda or cuda:N)"
    with pytest.raises(MedvaeError, match=r"^override 'device=mps': config key 'device': device 'mps' is not "):
        load_config(p, ["device=mps"])  # a typo on the command line was blamed on the file
    # only the name is checked when loading: a config for a GPU machine loads on a CPU one
    from medvae.training.config import config_source

    cfg = load_config(p, ["device=cuda:1"])
    assert cfg.device == "cuda:1" and config_source(cfg) == str(p) and "_source" not in cfg.to_dict()
    # the command line: in the file, as an override, or as --device, one line naming the file
    for args, where in ((["--config", str(p)], str(p)), (["--config", str(p), "device=cpu", "device=foo"],
                                                         "override 'device=foo'"),
                        (["--config", str(p), "device=cpu", "--device", "foo"], "override 'device=foo'")):
        assert main(["train", "--output-dir", "out", *args]) == 2
        err = capsys.readouterr().err
        assert err == f"medvae train: error: {where}: config key 'device': unknown device 'foo' " \
                      "(use auto, cpu, cuda or cuda:N)\n"
    assert list(tmp_path.iterdir()) == [p]  # nothing written


def test_a_device_this_machine_lacks_names_the_config_file_before_any_data_is_read(tmp_path, monkeypatch):
    from medvae.training import data
    from medvae.training.loop import train

    monkeypatch.setattr(data, "build_training_data", lambda *a, **k: pytest.fail("data read before the check"))
    p = tmp_path / "cfg.yaml"
    p.write_text("device: cuda:99\n")  # no machine has 100 GPUs (or CUDA at all here)
    cfg = load_config(p, [f"output_dir={tmp_path / 'out'}", "tracking.enabled=false"])
    with pytest.raises(MedvaeError, match=r"cfg\.yaml: config key 'device': device 'cuda:99' requested but") as exc:
        train(cfg)
    assert "\n" not in str(exc.value) and not (tmp_path / "out").exists()


def _alias_bomb(key: str) -> str:
    """A few hundred bytes of YAML whose aliases expand to 10**9 values ("billion laughs")."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join([*lines, f"{key}: *a8"]) + "\n"


def test_yaml_whose_aliases_expand_without_bound_is_refused_in_one_line(tmp_path):
    """A 600-byte config took 2.5 GB and ended in a MemoryError traceback; so did a recipe and a manifest.
    A large manifest without aliases is no bomb: 500,000 rows were refused by a fixed bound."""
    from medvae.corruption.recipes import load_recipe
    from medvae.store import read_manifest

    cfg, recipe, manifest = tmp_path / "c.yaml", tmp_path / "r.yaml", tmp_path / "m.yaml"
    cfg.write_text(_alias_bomb("seed"))
    recipe.write_text(_alias_bomb("description") + "steps: [{transform: gaussian}]\n")
    manifest.write_text(_alias_bomb("volumes"))
    for path, read in ((cfg, lambda p: load_config(p)), (recipe, load_recipe), (manifest, read_manifest)):
        with pytest.raises(MedvaeError) as exc:
            read(path)
        assert str(exc.value) == f"{path}: the YAML's aliases expand it to more than 100,000 values"
    big = tmp_path / "big.yaml"
    big.write_text("volumes:\n" + "".join(f"  - {{path: s{i}.nii.gz, subject: p{i}}}\n" for i in range(30_000)))
    assert len(read_manifest(big)) == 30_000  # 270,000 values: past the floor, within twice its text


def test_data_keys_a_store_or_manifest_replaces_are_refused_when_given(tmp_path):
    # data.val_paths beside a store was ignored: the scan meant for validation was trained on, exit 0
    store = tmp_path / "store"
    store.mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,subject\n")
    with pytest.raises(MedvaeError, match=r"config keys 'data.val_paths' and 'data.store' are both given, and "
                                          r"data.store replaces data.val_paths"):
        load_config("default", [f"data.store={store}", "data.val_paths=[a.nii.gz]"])
    with pytest.raises(MedvaeError, match=r"'data.paths' and 'data.manifest' are both given"):
        load_config(None, [f"data.manifest={manifest}", "data.paths=[a.nii.gz]"])
    own = tmp_path / "own.yaml"  # the user's own file counts as given; the shipped default's paths do not
    own.write_text(f"data:\n  store: {store}\n  val_fraction: 0.5\n")
    with pytest.raises(MedvaeError, match=r"'data.val_fraction' and 'data.store' are both given"):
        load_config(own)
    own.write_text("data:\n  paths: [mine/*.nii.gz]\n")  # the file's own paths, cleared on the command line
    assert load_config(own, ["data.paths=[]", f"data.store={store}"]).data.paths == []
    assert load_config(own, [f"data={{store: {store}}}"]).data.paths == []  # the whole section replaced
    assert load_config("default", [f"data.store={store}"]).data.store == str(store)
    assert load_config("default", [f"data.store={store}", "data.paths=[]"]).data.store == str(store)
    # the README's way: a copy of the default config with a store added (its paths are the default's)
    copy = tmp_path / "copy.yaml"
    text = (Path(__file__).resolve().parents[1] / "medvae/configs/default.yaml").read_text()
    copy.write_text(text.replace("\ndata:\n", f"\ndata:\n  store: {store}\n", 1))
    assert load_config(copy).data.store == str(store)
    copy.write_text(text.replace("\ndata:\n", f"\ndata:\n  store: {store}\n", 1).replace(
        "  val_paths:\n", "  val_paths:\n    - mine.nii.gz\n", 1))
    with pytest.raises(MedvaeError, match=r"'data.val_paths' and 'data.store' are both given"):
        load_config(copy)
    assert load_config(None, [f"data.manifest={manifest}", "data.val_fraction=0.5"]).data.val_fraction == 0.5
