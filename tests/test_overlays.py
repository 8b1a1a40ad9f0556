"""Misuse is named: an overlay config run without its base, and weights that were never made."""

import glob
import os
import warnings

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow

from tests.conftest import ROOT

BASES = {"train", "inference", "evaluate", "reconstruct", "vqvae_train", "vq_inference"}
NOT_RUN = {"metadata", "hyperparameters.schema"}
OVERLAYS = sorted(
    name
    for name in (os.path.basename(p)[:-5] for p in glob.glob(f"{ROOT}/configs/*.json"))
    if name not in BASES | NOT_RUN
)
FIRST_BASE = {
    "anomaly": "configs/inference.json",
    "vq_anomaly": "configs/vq_inference.json",
    "vq_evaluate": "configs/evaluate.json",
    "vq_prior": "configs/vqvae_train.json",
    "vq_prior_autoregressive": "configs/vqvae_train.json and configs/vq_prior.json",
    "vq_prior_absorbing": "configs/vqvae_train.json and configs/vq_prior.json",
    "multi_gpu_train": "configs/train.json",
    "vdvae_32": "configs/train.json",
    "vdvae_64": "configs/train.json",
    "vdvae_128": "configs/train.json",
}


def test_every_config_is_a_base_or_a_known_overlay():
    assert set(OVERLAYS) == set(FIRST_BASE), "a new overlay needs a require_base check and a row here"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_an_overlay_alone_names_its_base(overlay):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI: "Can't merge entry ['+initialize'] ... copying instead"
        workflow = ConfigWorkflow(config_file=os.path.join(ROOT, "configs", f"{overlay}.json"), workflow_type=None)
        with pytest.raises(RuntimeError) as raised:
            workflow.initialize()
    message = str(raised.value.__cause__)
    assert f"configs/{overlay}.json is an overlay" in message
    assert f"put {FIRST_BASE[overlay]}" in message and f"'configs/{overlay}.json']" in message


def test_an_overlay_after_its_base_passes_the_check():
    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, f) for f in ("configs/inference.json", "configs/vdvae_64.json")])
    parser.parse()
    assert parser.get_parsed_content("initialize")[-1] is True  # the preset's check, appended to the base's list
    assert parser["resolution"] == 64


def _vq_inference(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(os.path.join(ROOT, "configs/vq_inference.json"))
    parser.update({"bundle_root": ROOT, "device": "cpu", **overrides})
    return parser


def test_missing_vq_weights_name_the_option_and_the_command(tmp_path):
    parser = _vq_inference(vqvae_path=str(tmp_path / "vqvae.pt"), prior="autoregressive")
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("network")
    message = str(raised.value.__cause__)
    assert "(--vqvae_path)" in message and "--config_file configs/vqvae_train.json" in message
    torch.save(parser.get_parsed_content("vqvae_def").state_dict(), tmp_path / "vqvae.pt")
    parser = _vq_inference(
        vqvae_path=str(tmp_path / "vqvae.pt"), prior="autoregressive", ckpt_path=str(tmp_path / "prior.pt")
    )
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("network")
    message = str(raised.value.__cause__)
    assert "(--ckpt_path)" in message and "'configs/vq_prior_autoregressive.json']" in message
    assert "--prior autoregressive" in message
