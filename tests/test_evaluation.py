"""Sampling, reconstruction and evaluation configs, the Model Zoo's per-bundle workflow check, and bad input.

One tiny model (16^3) is trained once per module through ConfigWorkflow("train") and reused by every test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle import run as bundle_run
from monai.inferers import Inferer
from monai.metrics import MultiScaleSSIMMetric
from monai.transforms import LoadImage

from scripts.engine.anatomy import AnatomyScore
from scripts.engine.evaluation import RandomFeatureNet
from scripts.engine.generate_synthetic_data import generate_synthetic_data
from scripts.engine.metrics import ms_ssim_parameters
from scripts.engine.sampling import SampleRequests, SamplingEvaluator
from scripts.engine.visualisation import DPI
from scripts.vdvae.network import VDVAE
from tests.conftest import ROOT, tiny_architecture
from tests.test_figures import png_size

ARCH = {"resolution": 16, **tiny_architecture(16)}


def _errors(exc: BaseException) -> str:
    """Messages of an exception and of everything it was raised from (MONAI wraps config expression errors)."""
    out = []
    while exc is not None:
        out.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(out)


@pytest.fixture(autouse=True)
def _bundle_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the workflows below name their config files relative to the bundle root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, nifti_dir) -> dict:
    """The Model Zoo's train check on generated NIfTIs: ConfigWorkflow(train) initialize, check_properties, run,
    finalize, with a tiny architecture (9 training, 3 validation volumes, 2 epochs)."""
    out = str(tmp_path_factory.mktemp("eval_run"))
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        workflow = ConfigWorkflow(
            workflow_type="train",
            config_file="configs/train.json",
            meta_file="configs/metadata.json",
            logging_file="configs/logging.conf",
            dataset_dir=nifti_dir,
            output_dir=out,
            model_path=os.path.join(out, "model.pt"),
            batch_size=4,
            max_epochs=2,
            num_workers=0,
            train_frac=0.75,
            amp="none",
            images_to_plot=1,
            **ARCH,
        )
        workflow.initialize()
        missing = workflow.check_properties()
        workflow.run()
        workflow.finalize()
    finally:
        os.chdir(cwd)
    # train.json's defaults (the class defaults are the reference's)
    net = VDVAE(**ARCH, full_resolution_residual=True, shared_x_scale=True)
    net.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    return {
        "run_dir": out,
        "model": os.path.join(out, "model.pt"),
        "train_check": missing,
        "net": net.eval(),
        "nifti_dir": nifti_dir,
    }


def test_zoo_workflows_train_and_inference(trained, tmp_path):
    assert trained["train_check"] in (None, [])
    split = json.load(open(os.path.join(trained["run_dir"], "data_split.json")))
    assert len(split["train"]) == 9 and len(split["val"]) == 3

    out = str(tmp_path / "samples")
    workflow = ConfigWorkflow(
        workflow_type="inference",
        config_file="configs/inference.json",
        meta_file="configs/metadata.json",
        logging_file="configs/logging.conf",
        ckpt_path=trained["model"],
        output_dir=out,
        num_samples=3,
        temperature=[0.5, 1.0],
        batch_size=2,
        **ARCH,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    # the required properties are the real parts of the sampling workflow, not placeholders
    assert isinstance(workflow.dataset, SampleRequests) and len(workflow.dataset) == 6
    assert isinstance(workflow.evaluator, SamplingEvaluator) and isinstance(workflow.inferer, Inferer)
    workflow.run()
    workflow.finalize()
    files = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert len(files) == 6 and os.path.isfile(os.path.join(out, "samples.png"))
    sidecar = json.load(open(os.path.splitext(trained["model"])[0] + ".json"))
    img = nib.load(os.path.join(out, files[0]))
    # ITK-based readers prefer the qform, nibabel the sform: both hold the training grid
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
    assert np.allclose(img.get_qform(), sidecar["affine"], atol=1e-5) and np.allclose(
        img.get_sform(), sidecar["affine"]
    )
    loaded = LoadImage(image_only=True)(os.path.join(out, files[0]))
    assert tuple(loaded.shape) == (16, 16, 16)


def test_reconstruct_writes_full_and_progressive_reconstructions(trained, tmp_path):
    out = str(tmp_path / "recon")
    workflow = ConfigWorkflow(
        workflow_type="inference",
        config_file="configs/reconstruct.json",
        ckpt_path=trained["model"],
        input_dir=trained["nifti_dir"],
        output_dir=out,
        batch_size=5,
        **ARCH,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()
    workflow.finalize()
    names = sorted(f[: -len(".nii.gz")] for f in os.listdir(trained["nifti_dir"]))
    assert len(names) == 12
    levels = [1, 2, 4, 8]  # latent resolutions below the finest (16) of the tiny architecture
    for name in names:
        expected = {f"{name}_input.nii.gz", f"{name}_recon.nii.gz", f"{name}.png"} | {
            f"{name}_recon_to_r{r}.nii.gz" for r in levels
        }
        assert expected <= set(os.listdir(out)), name
    height, width = png_size(os.path.join(out, f"{names[0]}.png"))  # one row per level, input and full: >= 1 inch each
    assert width >= 6 * DPI and height >= (2 + len(levels)) * DPI

    # the written reconstruction is network.reconstruct of the preprocessed input, mapped to the input's window
    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update({"dataset_dir": trained["nifti_dir"], **ARCH})
    src = os.path.join(trained["nifti_dir"], f"{names[0]}.nii.gz")
    x = parser.get_parsed_content("validate#preprocessing")({"image": src})["image"]
    raw = np.asarray(nib.load(src).dataobj, dtype=np.float32)
    low, high = np.percentile(raw, [0.05, 99.95])
    full = trained["net"].reconstruct(x.as_tensor()[None])[0, 0].numpy()
    coarse = trained["net"].reconstruct(x.as_tensor()[None], 1)[0, 0].numpy()
    written = nib.load(os.path.join(out, f"{names[0]}_recon.nii.gz"))
    assert np.allclose(written.get_fdata(), low + (full + 1) / 2 * (high - low), atol=1e-3 * (high - low))
    written_coarse = nib.load(os.path.join(out, f"{names[0]}_recon_to_r1.nii.gz")).get_fdata()
    assert np.allclose(written_coarse, low + (coarse + 1) / 2 * (high - low), atol=1e-3 * (high - low))
    assert np.allclose(written.affine, np.asarray(x.affine), atol=1e-5)  # the input's grid: overlays it


def test_evaluate_report(trained, tmp_path):
    out = str(tmp_path / "eval")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "configs/evaluate.json",
        "--ckpt_path",
        trained["model"],
        "--run_dir",
        trained["run_dir"],
        "--output_dir",
        out,
        "--num_samples",
        "6",
        "--temperature",
        "[0.5,1.0]",
        "--batch_size",
        "4",
        "--diversity_samples",
        "5",
    ]
    for k, v in ARCH.items():
        cmd += [f"--{k}", json.dumps(v)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert png_size(os.path.join(out, "report.png"))[1] == 12 * DPI  # the report figure is 12 inches wide

    lik = report["likelihood"]
    assert report["heldout"]["num_volumes"] == 3 and report["train"]["num_volumes"] == 9
    assert "validation split" in report["heldout"]["source"]
    assert np.isfinite(lik["neg_elbo_nats_per_voxel"]["mean"]) and lik["neg_elbo_bits_per_voxel"]["mean"] > 0
    groups = lik["kl_per_group"]
    assert len(groups) == trained["net"].num_latent_groups == 6
    assert [g["resolution"] for g in groups] == trained["net"].group_resolutions()
    assert sorted(lik["active_groups"] + lik["collapsed_groups"]) == list(range(6))
    assert all(g["active"] == (g["kl_nats_per_volume"] > lik["kl_active_threshold_nats_per_volume"]) for g in groups)
    assert lik["kl_nats_per_volume"] == pytest.approx(sum(g["kl_nats_per_volume"] for g in groups), rel=1e-4)

    rec = report["reconstruction"]
    assert np.isfinite(rec["psnr_db"]) and -1.0 <= rec["ssim"] <= 1.0
    assert (
        report["ms_ssim_parameters"]
        == ms_ssim_parameters(16)
        == {"kernel_size": 7, "kernel_sigma": 1.5, "num_scales": 2, "weights": [0.1356, 0.8644]}
    )
    assert report["real"]["diversity_pairs"] == 3 and 0.0 <= report["real"]["diversity_mean_pairwise_ms_ssim"] <= 1.0
    assert set(report["samples"]) == {"0.5", "1"}
    for s in report["samples"].values():
        assert s["diversity_pairs"] == 10  # the first 5 of 6 samples: 5 * 4 / 2 pairs
        assert 0.0 <= s["diversity_mean_pairwise_ms_ssim"] <= 1.0
        assert np.isfinite(s["frechet_distance_to_train"]) and np.isfinite(s["mmd_to_train"])
        assert s["num_volumes_for_distribution_metrics"] == 3
        assert len(s["closest_samples"]) == 5 and all(
            c["nearest_train_volume"] in json.load(open(os.path.join(trained["run_dir"], "data_split.json")))["train"]
            for c in s["closest_samples"]
        )
    assert report["samples"]["1"]["frechet_distance_to_train"] >= 0

    # memorisation: the held-out figures equal a brute-force nearest-neighbour search on the preprocessed volumes
    parser = ConfigParser()
    parser.read_config("configs/train.json")
    parser.update({"dataset_dir": trained["nifti_dir"], **ARCH})
    pre = parser.get_parsed_content("validate#preprocessing")
    split = json.load(open(os.path.join(trained["run_dir"], "data_split.json")))
    train = np.stack([np.asarray(pre({"image": f})["image"]).ravel() for f in split["train"]])
    held = np.stack([np.asarray(pre({"image": f})["image"]).ravel() for f in split["val"]])
    nearest = np.sqrt(((held[:, None] - train[None]) ** 2).mean(-1)).min(1)
    got = report["real"]["nearest_train_rmse"]
    assert nearest.min() > 0
    assert got["min"] == pytest.approx(nearest.min(), abs=1e-4) and got["max"] == pytest.approx(nearest.max(), abs=1e-4)
    assert got["mean"] == pytest.approx(nearest.mean(), abs=1e-4)

    # anatomy: the held-out figure is the anatomy score of the preprocessed held-out volumes; every set has one
    anatomy = report["anatomy"]
    expected = AnatomyScore(16).score_all(torch.from_numpy(held.reshape(-1, 1, 16, 16, 16)).float())
    assert anatomy["heldout"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-3)
    assert set(anatomy["samples"]) == {"0.5", "1"}
    assert anatomy["samples"]["1"] == report["samples"]["1"]["anatomy_score"]
    assert {"heldout_blurred_0.5_voxel", "heldout_blurred_1_voxel", "heldout_blurred_1.5_voxel"} <= set(anatomy)
    assert np.isfinite(anatomy["reconstructions"]["mean"])
    assert 0.0 <= rec["blur_equivalent_sigma_voxels"]["median"] <= 3.0


def test_evaluate_heldout_inside_train_is_flagged(trained, tmp_path):
    """Held-out volumes that are training volumes are at distance 0 from their nearest training volume."""
    out = str(tmp_path / "eval_same")
    bundle_run(
        config_file="configs/evaluate.json",
        ckpt_path=trained["model"],
        run_dir=trained["run_dir"],
        output_dir=out,
        heldout_dir=trained["nifti_dir"],
        train_dir=trained["nifti_dir"],
        num_samples=2,
        batch_size=4,
        diversity_samples=2,
        **ARCH,
    )
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["heldout"]["num_volumes"] == 12 and report["train"]["num_volumes"] == 12
    assert report["real"]["nearest_train_rmse"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert report["real"]["heldout_volumes_identical_to_a_training_volume"] == 12
    assert report["samples"]["1.2"]["diversity_pairs"] == 1  # at evaluate.json's default temperature


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        ("evaluate", {"num_samples": 0}, "num_samples must be positive"),
        ("evaluate", {"num_samples": 1}, "num_samples must be at least 2"),
        ("evaluate", {"temperature": [0.5, 0.0]}, "temperature must be positive"),
        ("evaluate", {"ckpt_path": "MISSING"}, "no weights at"),
        ("evaluate", {"ckpt_path": "CORRUPT"}, "not a readable PyTorch state dict"),
        ("evaluate", {"channels": [16] * 5}, "weights of another architecture"),
        (
            "evaluate",
            {"heldout_dir": "OTHER_SHAPE"},
            "has shape (8, 8, 8), but the training volumes have shape (16, 16, 16)",
        ),
        ("evaluate", {"run_dir": "EMPTY"}, "heldout_dir is not set and"),
        ("reconstruct", {"ckpt_path": "MISSING"}, "no weights at"),
        ("reconstruct", {"progressive_resolutions": [3]}, "progressive_resolutions [3] hold no latent group"),
    ],
)
def test_bad_input_is_named(trained, tmp_path, config, overrides, message):
    other = tmp_path / "other_shape"
    generate_synthetic_data(str(other), voxels_per_axis=8, number_of_files=2, random_seed=3)
    (tmp_path / "corrupt.pt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    paths = {
        "MISSING": str(tmp_path / "missing.pt"),
        "CORRUPT": str(tmp_path / "corrupt.pt"),
        "OTHER_SHAPE": str(other),
        "EMPTY": str(tmp_path / "empty"),
    }
    opts = {
        "ckpt_path": trained["model"],
        "output_dir": str(tmp_path / "out"),
        **ARCH,
        "num_samples": 2,
        "batch_size": 4,
    }
    if config == "evaluate":
        opts["run_dir"] = trained["run_dir"]
    else:
        opts["input_dir"] = trained["nifti_dir"]
        del opts["num_samples"]
    opts.update({k: paths.get(v, v) if isinstance(v, str) else v for k, v in overrides.items()})
    with pytest.raises(Exception) as excinfo:
        bundle_run(config_file=f"configs/{config}.json", **opts)
    assert message in _errors(excinfo.value)
    assert not os.path.isfile(tmp_path / "out" / "report.json")


@pytest.mark.parametrize("resolution", [8, 16, 32])
def test_ms_ssim_parameters_are_valid_for_monai(resolution):
    params = ms_ssim_parameters(resolution)
    metric = MultiScaleSSIMMetric(
        spatial_dims=3,
        data_range=1.0,
        kernel_size=params["kernel_size"],
        kernel_sigma=params["kernel_sigma"],
        weights=params["weights"],
    )
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 1, resolution, resolution, resolution, generator=gen)
    smooth = torch.nn.functional.avg_pool3d(a, 3, 1, 1)
    assert torch.allclose(metric(a, a), torch.ones(2, 1), atol=1e-4)
    value = metric(smooth, a)
    assert torch.isfinite(value).all() and (value < 1).all()
    assert abs(sum(params["weights"]) - 1) < 1e-3


def test_ms_ssim_parameters_per_resolution():
    expected = {8: (3, 2), 16: (7, 2), 32: (7, 3), 64: (7, 4), 128: (7, 5)}
    for r, (k, n) in expected.items():
        p = ms_ssim_parameters(r)
        assert (p["kernel_size"], p["num_scales"]) == (k, n)
        # MONAI's own size check and a coarsest scale at least one kernel wide
        assert r // max(1, n - 1) ** 2 > k - 1 and r // 2 ** (n - 1) >= k
    assert ms_ssim_parameters(4) is None


def test_feature_network_is_fixed_and_weight_free():
    x = torch.rand(3, 1, 16, 16, 16) * 2 - 1
    torch.manual_seed(123)
    a = RandomFeatureNet()(x)
    torch.manual_seed(456)
    b = RandomFeatureNet()(x)
    assert a.shape == (3, 224) and torch.equal(a, b)  # independent of the global RNG
    assert not torch.allclose(a[0], a[1])
    assert RandomFeatureNet()(torch.rand(2, 1, 32, 32, 32)).shape == (2, 224)


def test_both_families_implement_the_generator_interface_and_others_are_refused(tmp_path):
    from scripts.engine.evaluation import evaluate
    from scripts.engine.generator import Generator, require_generator
    from scripts.vq.networks import VQVAE, AutoregressivePrior, VQGenerator

    torch.manual_seed(0)
    vdvae = VDVAE(resolution=8, **tiny_architecture(8)).eval()
    vqvae = VQVAE(resolution=8, channels=[8], num_res_layers=1, num_embeddings=4, embedding_dim=2)
    vq = VQGenerator(vqvae, AutoregressivePrior(vqvae.token_grid, 4, dim=8, depth=1, heads=1)).eval()
    x = torch.rand(3, 1, 8, 8, 8) * 2 - 1
    for net, rows in ((vdvae, {"neg_elbo_nats", "neg_elbo_bits", "kl_per_group"}), (vq, {"bits_per_token"})):
        assert isinstance(require_generator(net), Generator)
        terms = net.heldout_likelihood(x)
        assert set(terms) == rows and all(v.shape[0] == 3 for v in terms.values())
        section = net.likelihood_report(terms, kl_active_threshold=0.5)
        assert net.describe()["family"].startswith("vq" if net is vq else "vdvae") and net.reconstruction_note()
        assert net(x).shape == x.shape and net.sample(2, 1.0).shape == (2, 1, 8, 8, 8)
    groups = vdvae.likelihood_report(vdvae.heldout_likelihood(x), kl_active_threshold=0.5)["kl_per_group"]
    assert [g["resolution"] for g in groups] == vdvae.group_resolutions()
    assert section["tokens_per_volume"] == 64 and section["bits_per_volume"] == pytest.approx(
        section["bits_per_token"]["mean"] * 64
    )
    with pytest.raises(TypeError, match="lacks .*heldout_likelihood"):
        evaluate(
            torch.nn.Conv3d(1, 1, 1),
            ["a.nii", "b.nii"],
            ["c.nii"],
            lambda d: d,
            str(tmp_path),
            temperature=1.0,
            check_shapes=False,
        )
