"""End-to-end: the bundle's configs through `python -m monai.bundle run` and ConfigWorkflow, on tiny data."""

import json
import os
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.engine.config import check_hyperparameters, family_schema
from scripts.engine.handlers import latest_checkpoint
from scripts.engine.sampling import draw_samples
from scripts.vdvae.network import VDVAE
from scripts.vdvae.trainer import is_prior_parameter, trainable_parameters
from tests.conftest import ROOT, tiny_architecture


def tiny_overrides(nifti_dir: str, out: str, **extra) -> dict:
    opts = {
        "dataset_dir": nifti_dir,
        "output_dir": out,
        "model_path": os.path.join(out, "model.pt"),
        "resolution": 16,
        "batch_size": 4,
        "max_epochs": 2,
        "num_workers": 0,
        "train_frac": 0.75,
        "amp": "none",
        "images_to_plot": 1,
        **tiny_architecture(16),
    }
    opts.update(extra)
    return opts


def run_bundle(
    overrides: dict, config_file: str = "configs/train.json", check: bool = True, cwd: str = ROOT, command: str = "run"
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle <command> --config_file <config_file> --<key> <value>...`` in ``cwd``. From another
    working directory than the bundle's, pass absolute config paths and ``bundle_root``: the bundle folder is then
    put on PYTHONPATH, as MONAI's own bundle scripts do (configs import ``scripts`` before MONAI's ``run`` would)."""
    cmd = [sys.executable, "-m", "monai.bundle", command, "--config_file", config_file]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else str(v) if isinstance(v, bool) else json.dumps(v)]
    env = None
    if cwd != ROOT:
        path = [overrides["bundle_root"], os.environ.get("PYTHONPATH")]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"bundle run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def test_train_writes_model_and_resumable_checkpoint_then_resumes(tmp_path, nifti_dir):
    out = str(tmp_path / "run")
    opts = tiny_overrides(nifti_dir, out, max_epochs=1, visualise_training_pipeline_before_starting=True)
    run_bundle(opts)
    model_path = os.path.join(out, "model.pt")
    state = torch.load(model_path, weights_only=True)
    net = VDVAE(16, **tiny_architecture(16), shared_x_scale=True)
    net.load_state_dict(state)  # a plain state dict of network_def
    ckpt = latest_checkpoint(os.path.join(out, "checkpoints"))
    assert ckpt is not None
    full = torch.load(ckpt, weights_only=True)
    assert {"trainer", "network", "optimizer", "gradient_skipper", "data", "best_model"} <= set(full)
    assert full["trainer"]["iteration"] == 3  # 9 training volumes, batch 4: one epoch
    assert full["data"]["preprocessing"]["spatial_shape"] == [16, 16, 16]
    assert len(full["data"]["val_files"]) == 3
    assert os.path.isfile(os.path.join(out, "pipeline_test", "montage.png"))
    assert len([f for f in os.listdir(os.path.join(out, "pipeline_test")) if f.endswith(".nii.gz")]) == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tensorboard")))

    # a second run with more epochs continues from epoch 1 instead of starting over
    proc = run_bundle({**opts, "max_epochs": 2, "visualise_training_pipeline_before_starting": False})
    log = proc.stdout + proc.stderr
    assert "Restored all variables from" in log and "checkpoint_3.pt" in log
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log
    full = torch.load(latest_checkpoint(os.path.join(out, "checkpoints")), weights_only=True)
    assert full["trainer"]["iteration"] == 6


def test_prior_only_fine_tuning_changes_the_priors_alone(tmp_path, nifti_dir):
    first = str(tmp_path / "first")
    run_bundle(tiny_overrides(nifti_dir, first, max_epochs=1))
    start = torch.load(os.path.join(first, "model.pt"), weights_only=True)
    tuned_dir = str(tmp_path / "tuned")
    run_bundle(
        tiny_overrides(
            nifti_dir, tuned_dir, max_epochs=1, init_weights=os.path.join(first, "model.pt"), train_only="priors"
        )
    )
    tuned = torch.load(os.path.join(tuned_dir, "model.pt"), weights_only=True)
    names = dict(VDVAE(16, **tiny_architecture(16), shared_x_scale=True).named_parameters())
    assert set(names) <= set(tuned)
    priors = [n for n in names if is_prior_parameter(n)]
    assert priors and len(priors) < len(names)
    for n in names:
        if is_prior_parameter(n):
            continue
        assert torch.equal(tuned[n], start[n]), f"{n} changed although only the priors train"
    assert any(not torch.equal(tuned[n], start[n]) for n in priors)  # the priors did learn
    with pytest.raises(ValueError, match="train_only must be one of"):
        trainable_parameters(VDVAE(16, **tiny_architecture(16)), "decoder")
    # a missing init file names the option
    proc = run_bundle(
        tiny_overrides(nifti_dir, str(tmp_path / "x"), init_weights=str(tmp_path / "none.pt")), check=False
    )
    assert proc.returncode != 0 and "--init_weights" in proc.stdout + proc.stderr


def test_resume_is_exact_at_epoch_boundaries(tmp_path, nifti_dir):
    straight = str(tmp_path / "straight")
    run_bundle(tiny_overrides(nifti_dir, straight, max_epochs=2))
    split = str(tmp_path / "split")
    run_bundle(tiny_overrides(nifti_dir, split, max_epochs=1))
    run_bundle(tiny_overrides(nifti_dir, split, max_epochs=2))
    a = torch.load(latest_checkpoint(os.path.join(straight, "checkpoints")), weights_only=True)["network"]
    b = torch.load(latest_checkpoint(os.path.join(split, "checkpoints")), weights_only=True)["network"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    "family, config_files",
    [
        ("vdvae", ["configs/train.json"]),
        ("vdvae", ["configs/train.json", "configs/vdvae_128.json", "configs/multi_gpu_train.json"]),
        ("vq", ["configs/vqvae_train.json"]),
        ("vq", ["configs/vqvae_train.json", "configs/vq_prior.json", "configs/vq_prior_absorbing.json"]),
    ],
)
def test_one_schema_covers_each_family_and_rejects_the_other_familys_options(family, config_files):
    with open(os.path.join(ROOT, "configs/hyperparameters.schema.json")) as f:
        schema = json.load(f)
    own = family_schema(schema, family)
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, c) for c in config_files])
    keys = set(parser.config)
    assert keys <= set(own["properties"]) | set(own["config_components"]), keys - set(own["properties"])
    other = {"vdvae": "vq", "vq": "vdvae"}[family]
    foreign = sorted(set(schema["definitions"][other]["properties"]) - set(own["properties"]))[0]
    with pytest.raises(ValueError, match=f"unknown option '{foreign}'"):
        check_hyperparameters({foreign: None}, own)
    check_hyperparameters({"batch_size": 2, "resolution": 32}, own)  # a shared option, checked once for both
    with pytest.raises(ValueError, match="option 'batch_size'"):
        check_hyperparameters({"batch_size": 0}, own)
    assert set(schema["properties"]).isdisjoint(schema["definitions"][family]["properties"])  # each stated once
    with pytest.raises(ValueError, match="unknown family 'gan'"):
        family_schema(schema, "gan")


def test_bad_options_are_reported_by_name(tmp_path, nifti_dir):
    out = str(tmp_path / "bad")
    proc = run_bundle({**tiny_overrides(nifti_dir, out), "batch_sise": 4}, check=False)
    assert proc.returncode != 0
    assert "unknown option 'batch_sise' (did you mean 'batch_size'?)" in proc.stderr
    proc = run_bundle(tiny_overrides(nifti_dir, out, amp="half", learning_rate="fast", resume="false"), check=False)
    assert proc.returncode != 0
    assert "option 'amp'" in proc.stderr and "option 'learning_rate'" in proc.stderr
    assert "option 'resume': 'false' is not of type 'boolean' (on the command line write True or False)" in proc.stderr
    proc = run_bundle(tiny_overrides(nifti_dir, out, channels=[8, 8, 8]), check=False)
    assert proc.returncode != 0 and "channels must have log2(resolution) + 1 = 5 entries" in proc.stderr
    proc = run_bundle(tiny_overrides(nifti_dir, out, resolution=24), check=False)
    assert proc.returncode != 0 and "resolution must be a power of two" in proc.stderr
    proc = run_bundle(tiny_overrides(str(tmp_path / "empty"), out), check=False)
    assert proc.returncode != 0 and "does not exist" in proc.stderr


def test_config_workflow_check_properties(tmp_path, nifti_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = str(tmp_path / "wf")
    workflow = ConfigWorkflow(
        workflow_type="train",
        config_file="configs/train.json",
        meta_file="configs/metadata.json",
        logging_file="configs/logging.conf",
        **tiny_overrides(nifti_dir, out, max_epochs=1),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    assert workflow.max_epochs == 1
    assert len(workflow.train_dataset) == 9
    workflow.run()
    workflow.finalize()
    assert os.path.isfile(os.path.join(out, "model.pt"))


@pytest.mark.parametrize(
    "preset, resolution, batch", [("vdvae_32", 32, 64), ("vdvae_64", 64, 8), ("vdvae_128", 128, 1)]
)
def test_presets_reproduce_reference_examples(preset, resolution, batch):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs/train.json"), os.path.join(ROOT, f"configs/{preset}.json")])
    assert parser["resolution"] == resolution and parser["batch_size"] == batch
    levels = resolution.bit_length()
    assert parser["channels"] == [20 * (i + 1) for i in range(levels)]
    assert parser["latent_feature_maps_per_resolution"] == [2] + list(range(levels - 1, 0, -1))
    # the reference's optimisation: Adamax 1e-3, per-part clipping at 100, skip only past 1e12 after 50 iterations,
    # float32, no EMA, no KL schedule, the reference's temperature and decoder
    reference = {
        "learning_rate": 1e-3,
        "gradient_clipping_value": 100.0,
        "gradient_skipping_value": 1e12,
        "gradient_skip_factor": 0.0,
        "warmup_iterations": 50,
        "amp": "none",
        "ema_decay": 0.0,
        "beta": 1.0,
        "kl_warmup_steps": 0,
        "free_bits": 0.0,
        "l2_reg_coeff": 1e-4,
        "temperature_mode": "latent",
        "full_resolution_residual": False,
        "shared_x_scale": False,
        "augment": True,
        "latent_prior_resolution": 0,
    }
    assert {k: parser[k] for k in reference} == reference
    # the preset states each per-level list once: the other three channel lists and the top-down kernels follow
    for key, source in (
        ("channels_hidden", "channels"),
        ("channels_top_down", "channels"),
        ("channels_hidden_top_down", "channels"),
        ("kernel_sizes_top_down", "kernel_sizes_bottom_up"),
    ):
        assert parser.get_parsed_content(key) == parser[source]
    assert parser.get_parsed_content("optimizer#_target_", instantiate=False) == "torch.optim.Adamax"


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, nifti_dir):
    import signal
    import time

    out = str(tmp_path / "killed")
    opts = tiny_overrides(nifti_dir, out, max_epochs=40, save_every_n_iterations=1)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json"]
    for k, v in opts.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(out, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline:
        latest = latest_checkpoint(ckpt_dir)
        if latest is not None and int(os.path.basename(latest)[11:-3]) >= 10:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up
    proc.wait()
    files = [f for f in os.listdir(ckpt_dir) if f.endswith(".pt")]
    assert files and all(torch.load(os.path.join(ckpt_dir, f), weights_only=True)["trainer"] for f in files)
    killed_at = int(os.path.basename(latest_checkpoint(ckpt_dir))[11:-3])
    assert killed_at < 120, "the run finished before it was killed"
    proc = run_bundle({**opts, "max_epochs": 41})
    assert "Restored all variables from" in proc.stdout + proc.stderr
    final = torch.load(latest_checkpoint(ckpt_dir), weights_only=True)
    assert final["trainer"]["iteration"] == 41 * 3


def test_inference_samples_nifti_on_the_training_grid(tmp_path, nifti_dir):
    import nibabel as nib
    import numpy as np

    out = str(tmp_path / "train")
    run_bundle(tiny_overrides(nifti_dir, out, max_epochs=1))
    sidecar = json.load(open(os.path.join(out, "model.json")))
    arch = {"resolution": 16, **tiny_architecture(16)}

    def sample(folder, expect_error=False, **extra):
        opts = {"ckpt_path": os.path.join(out, "model.pt"), "output_dir": str(tmp_path / folder), **arch, **extra}
        return run_bundle(opts, config_file="configs/inference.json", check=not expect_error)

    sample("a", num_samples=3, temperature=[0.5, 1.0], batch_size=2, seed=1)
    files = sorted(f for f in os.listdir(tmp_path / "a") if f.endswith(".nii.gz"))
    assert len(files) == 6 and files[0] == "sample_t0.5_00000.nii.gz"
    assert os.path.isfile(tmp_path / "a" / "samples.png")
    img = nib.load(str(tmp_path / "a" / files[0]))
    assert img.shape == (16, 16, 16)
    assert np.allclose(img.affine, np.asarray(sidecar["affine"]))
    data = img.get_fdata()
    assert sidecar["intensity_low"] - 1e-4 <= data.min() and data.max() <= sidecar["intensity_high"] + 1e-4
    sample("b", num_samples=3, temperature=[0.5, 1.0], batch_size=3, seed=1)  # another batch size: same volumes
    sample("c", num_samples=3, temperature=[0.5, 1.0], batch_size=2, seed=2)
    for f in files:
        assert np.array_equal(
            nib.load(str(tmp_path / "b" / f)).get_fdata(), nib.load(str(tmp_path / "a" / f)).get_fdata()
        )
    other = nib.load(str(tmp_path / "c" / files[0])).get_fdata()
    assert not np.allclose(other, data)
    # every tool that samples draws these volumes: the stream of draw_samples with inference.json's sampler
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs/inference.json"))
    parser.update({"ckpt_path": os.path.join(out, "model.pt"), "device": "cpu", **arch})
    with torch.no_grad():
        drawn = draw_samples(parser.get_parsed_content("network"), 0.5, 1, range(3)).numpy()[:, 0]
    written = np.stack([nib.load(str(tmp_path / "a" / f"sample_t0.5_{i:05d}.nii.gz")).get_fdata() for i in range(3)])
    low, high = sidecar["intensity_low"], sidecar["intensity_high"]
    assert np.allclose(low + (drawn + 1) / 2 * (high - low), written, atol=1e-4 * (high - low))
    # the weights' model.json records the options that change their function; another value stops with its name
    assert sidecar["network_options"]["full_resolution_residual"] is True
    wrong = sample("d", expect_error=True, num_samples=1, full_resolution_residual=False)
    assert wrong.returncode != 0 and "pass --full_resolution_residual True" in wrong.stderr

    bad = sample("d", num_samples=0, expect_error=True)
    assert bad.returncode != 0 and "num_samples must be positive" in bad.stderr
    bad = sample("e", temperature=-1.0, expect_error=True)
    assert bad.returncode != 0 and "temperature must be positive" in bad.stderr
    bad = sample("f", channels=[16] * 5, expect_error=True)
    assert bad.returncode != 0 and "weights of another architecture" in bad.stderr
    bad = sample("g", ckpt_path=str(tmp_path / "missing.pt"), expect_error=True)
    assert bad.returncode != 0 and "no weights at" in bad.stderr

    # the Model Zoo's export (ci/verify_bundle.py): TorchScript of inference.json's network_def, from another working
    # directory with bundle_root, that loads and reconstructs like the eager network
    ts_path = str(tmp_path / "model.ts")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    export = {
        "net_id": "network_def",
        "filepath": ts_path,
        "ckpt_file": os.path.join(out, "model.pt"),
        "bundle_root": ROOT,
        "meta_file": os.path.join(ROOT, "configs/metadata.json"),
        **arch,
    }
    run_bundle(export, os.path.join(ROOT, "configs/inference.json"), cwd=str(elsewhere), command="ckpt_export")
    assert os.listdir(elsewhere) == []
    exported = torch.jit.load(ts_path)
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs/inference.json"))
    parser.update({"bundle_root": ROOT, **arch})
    net = parser.get_parsed_content("network_def")  # the eager network of the same options
    net.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    assert torch.allclose(exported(x), net.eval()(x), atol=1e-5)
