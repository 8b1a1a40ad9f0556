"""What the Model Zoo's own CI checks (``python ci/verify_bundle.py -b <name> -m full`` in Project-MONAI/model-zoo),
offline and in the same way: the bundle copied to ``models/<name>/`` of a zoo-like folder that is the working
directory, ``models/model.pt`` made from ``network_def``'s initial weights (the stand-in for the weights the zoo would
download), the metadata schema in ``eval/schema.json`` (where ``ci/prepare_schema.py`` downloads it), and the same
MONAI calls with ``bundle_root`` relative to the zoo root.

``tests/fixtures/meta_schema_20240725.json`` is a copy of the schema at the URL in ``configs/metadata.json``
(MONAI-extra-test-data release 0.8.1, Apache-2.0); change both together.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, verify_metadata, verify_net_in_out

from tests.conftest import ROOT, copy_bundle

NAME = "brain_mri_generative_vdvae"  # the bundle's name in the zoo
SCHEMA = os.path.join(ROOT, "tests", "fixtures", "meta_schema_20240725.json")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> str:
    """A zoo checkout's layout holding this bundle; returns the zoo root."""
    root = str(tmp_path_factory.mktemp("model_zoo"))
    bundle = copy_bundle(os.path.join(root, "models", NAME))
    parser = ConfigParser()  # as the zoo's _produce_fake_weights: network_def of the inference config, initial weights
    parser.read_config(os.path.join(bundle, "configs", "inference.json"))
    parser["bundle_root"] = bundle
    torch.save(parser.get_parsed_content("network_def").state_dict(), os.path.join(bundle, "models", "model.pt"))
    os.makedirs(os.path.join(bundle, "eval"))
    shutil.copy(SCHEMA, os.path.join(bundle, "eval", "schema.json"))
    return root


@pytest.fixture
def in_zoo(zoo, monkeypatch) -> str:
    """The zoo root as working directory (as its CI runs); returns the bundle's path relative to it."""
    monkeypatch.chdir(zoo)
    return os.path.join("models", NAME)


def test_files_version_and_changelog(in_zoo):
    for required in ("configs/metadata.json", "LICENSE", "models/model.pt", "configs/inference.json"):
        assert os.path.isfile(os.path.join(in_zoo, required)), required
    metadata = json.load(open(os.path.join(in_zoo, "configs", "metadata.json")))
    assert metadata["version"] in metadata["changelog"]
    # models/ is in the repository and says what lands there
    assert os.path.isfile(os.path.join(ROOT, "models", "README.md"))


def test_metadata_against_its_schema(in_zoo):
    metadata = json.load(open(os.path.join(in_zoo, "configs", "metadata.json")))
    assert metadata["schema"].endswith("/" + os.path.basename(SCHEMA)), (
        "metadata.json names another schema: update tests/fixtures"
    )
    meta, schema = os.path.join(in_zoo, "configs", "metadata.json"), os.path.join(in_zoo, "eval", "schema.json")
    verify_metadata(meta_file=meta, filepath=schema)  # the schema file exists, so it is read instead of downloaded


def test_network_shape_and_torchscript_export(in_zoo):
    meta = os.path.join(in_zoo, "configs", "metadata.json")
    config = os.path.join(in_zoo, "configs", "inference.json")
    verify_net_in_out(net_id="network_def", meta_file=meta, config_file=config, bundle_root=in_zoo)
    ts_path = os.path.join(in_zoo, "models", "verify_model.ts")
    weights = os.path.join(in_zoo, "models", "model.pt")
    ckpt_export(
        net_id="network_def",
        filepath=ts_path,
        ckpt_file=weights,
        meta_file=meta,
        config_file=config,
        bundle_root=in_zoo,
    )
    assert isinstance(torch.jit.load(ts_path), torch.jit.ScriptModule)
