"""The bundle runs from any working directory given --bundle_root: no config reads another config (or anything else)
relative to the working directory, and every run writes only under the folders it is given.

From another directory the bundle folder goes on PYTHONPATH (``run_bundle`` does it, as MONAI's own bundle scripts do):
the configs' ``initialize`` steps use ``scripts`` before MONAI's ``run`` puts the bundle folder on ``sys.path``.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose

from scripts.engine.config import from_config_file
from scripts.vdvae.network import VDVAE
from tests.conftest import ROOT, copy_bundle, files_under, tiny_architecture
from tests.test_bundle import run_bundle, tiny_overrides

ARCH = {"resolution": 16, **tiny_architecture(16)}


def test_no_config_reads_files_relative_to_the_working_directory():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if name.endswith(".json"):
            text = open(os.path.join(ROOT, "configs", name)).read()
            assert not re.search(r'"%[^"#]+#', text), (
                f"configs/{name}: a %file#key macro is read from the working directory"
            )


def test_train_sample_and_evaluate_from_another_directory(tmp_path, nifti_dir):
    """A one-epoch training, sampling and evaluation with the working directory elsewhere and bundle_root a copy of
    the bundle: each writes only under the folders it is given, nothing in the bundle or the working directory."""
    bundle = copy_bundle(str(tmp_path / "bundle"))
    before = files_under(bundle)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    configs = os.path.join(bundle, "configs")
    run = str(tmp_path / "run")

    train = {**tiny_overrides(nifti_dir, run, max_epochs=1), "bundle_root": bundle}
    run_bundle(train, os.path.join(configs, "train.json"), cwd=str(cwd))
    assert {"model.pt", "model.json", "data_split.json", "checkpoints", "tensorboard"} <= set(os.listdir(run))

    model = os.path.join(run, "model.pt")
    samples = str(tmp_path / "samples")
    run_bundle(
        {
            "bundle_root": bundle,
            "ckpt_path": model,
            "output_dir": samples,
            "num_samples": 2,
            "temperature": 0.8,
            **ARCH,
        },
        os.path.join(configs, "inference.json"),
        cwd=str(cwd),
    )
    assert sorted(os.listdir(samples)) == ["sample_t0.8_00000.nii.gz", "sample_t0.8_00001.nii.gz", "samples.png"]

    report = str(tmp_path / "eval")
    evaluate = {
        "bundle_root": bundle,
        "ckpt_path": model,
        "run_dir": run,
        "output_dir": report,
        "num_samples": 2,
        "batch_size": 2,
        "diversity_samples": 2,
        "cache": "none",
        "use_latent_prior": False,
        **ARCH,
    }
    run_bundle(evaluate, os.path.join(configs, "evaluate.json"), cwd=str(cwd))
    heldout = json.load(open(os.path.join(report, "report.json")))["heldout"]
    assert heldout["num_volumes"] == 3  # run_dir's validation split

    assert files_under(bundle) == before
    assert os.listdir(cwd) == []


def parser_for(config_files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", f) for f in config_files])
    parser.update({"bundle_root": ROOT, **overrides})
    return parser


def test_consumers_build_their_network_from_their_own_keys(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the bundle folder
    train = parser_for(["train.json"])
    for config in ("inference.json", "evaluate.json", "reconstruct.json"):
        parser = parser_for([config])
        assert parser.get_parsed_content("channels") == train["channels"]  # defaults stated once, in train.json
        assert parser.get_parsed_content("resolution") == train["resolution"]
        # the overlay of a preset and command-line options change the network that the consumer builds, and the lists
        # that train.json aliases follow the ones they alias, as in training
        preset, trained = parser_for([config, "vdvae_64.json"]), parser_for(["train.json", "vdvae_64.json"])
        assert preset["network_def"]["channels"] == "@channels"
        for key in ("resolution", "channels", "channels_hidden_top_down", "kernel_sizes_top_down"):
            assert preset.get_parsed_content(key) == trained.get_parsed_content(key), (config, key)
        assert preset.get_parsed_content("channels_hidden") == [20, 40, 60, 80, 100, 120, 140]
        net = parser_for([config], **ARCH).get_parsed_content("network_def")
        shapes = {k: v.shape for k, v in net.state_dict().items()}
        assert shapes == {k: v.shape for k, v in VDVAE(**ARCH, shared_x_scale=True).state_dict().items()}
    preprocessing = parser_for(["evaluate.json"], resolution=16).get_parsed_content("preprocessing")
    volume = preprocessing({"image": _volume(tmp_path)})["image"]
    assert tuple(volume.shape) == (1, 16, 16, 16)


def _volume(folder) -> str:
    import nibabel as nib
    import numpy as np

    path = str(folder / "volume.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 24, 22)).astype(np.float32), np.eye(4)), path)
    return path


def test_vq_consumers_take_the_stage_1_and_prior_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage1 = parser_for(["vqvae_train.json"])
    stage2 = parser_for(["vqvae_train.json", "vq_prior.json", "vq_prior_absorbing.json"])
    for files in (["vq_inference.json"], ["evaluate.json", "vq_evaluate.json"]):
        parser = parser_for(files)
        for key in ("resolution", "vq_channels", "num_embeddings", "prior_dim", "num_timesteps", "token_grid"):
            assert parser.get_parsed_content(key) == stage2.get_parsed_content(key), (files, key)
        assert parser.get_parsed_content("priors")["absorbing"].token_grid == tuple(
            stage2.get_parsed_content("token_grid")
        )
    assert parser_for(["evaluate.json", "vq_evaluate.json"]).get_parsed_content("run_dir") == os.path.join(
        ROOT, "runs/vqvae"
    )
    # stage 2 reads the tokens and split of stage 1's run folder, and writes to its own
    stage1_dir = stage1.get_parsed_content("output_dir")
    assert stage2.get_parsed_content("vqvae_dir") == stage1_dir == os.path.join(ROOT, "runs/vqvae")
    assert stage2.get_parsed_content("tokens_path") == os.path.join(ROOT, "runs/vqvae/tokens.pt")
    assert stage2.get_parsed_content("output_dir") == os.path.join(ROOT, "runs/vq_prior_absorbing")
    moved = parser_for(["vqvae_train.json"], output_dir=str(tmp_path / "b"))
    assert moved.get_parsed_content("tokens_path") == str(tmp_path / "b" / "tokens.pt")
    assert moved.get_parsed_content("data#output_dir") == str(tmp_path / "b")


def test_from_config_file_names_what_is_missing(tmp_path):
    assert from_config_file(ROOT, "configs/train.json", "output_dir") == os.path.join(ROOT, "runs/vdvae")
    assert (
        from_config_file(ROOT, "configs/vqvae_train.json", "slicing#validate")[0].__class__.__name__
        == "CenterSpatialCropd"
    )
    with pytest.raises(
        FileNotFoundError, match=r"configs/train.json not found: bundle_root '.*' must be the bundle folder"
    ):
        from_config_file(str(tmp_path), "configs/train.json", "channels")
    with pytest.raises(KeyError, match=r"configs/train.json has no key 'chanels'"):
        from_config_file(ROOT, "configs/train.json", "chanels")
    transforms = from_config_file(
        ROOT, "configs/train.json", "base_transforms", {"resolution": 8}
    )  # the caller's resolution
    assert tuple(Compose(transforms)({"image": _volume(tmp_path)})["image"].shape) == (1, 8, 8, 8)
