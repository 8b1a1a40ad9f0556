"""Covariates: the CSV's checks, the encoding and its sidecar round trip, the built-in cohort's measured covariates,
the conditional VDVAE (off = today's network) and a tiny conditional training whose samples follow the condition."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from scripts.engine.covariates import (
    ConditionedGenerator,
    CovariateEncoder,
    condition_values,
    fit_covariates,
    read_covariates_csv,
)
from scripts.engine.default_data import COVARIATES_FILE, generate_mni_cohort, template_masks
from scripts.vdvae.latent_prior import LatentPCAPrior, PosthocPriorVDVAE
from scripts.vdvae.network import VDVAE
from tests.conftest import ROOT, tiny_architecture
from tests.test_bundle import run_bundle, tiny_overrides


def write_csv(path, header, rows) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


@pytest.fixture
def files(tmp_path):
    names = [str(tmp_path / f"s{i}.nii.gz") for i in range(4)]
    return names[:3], names[3:]  # train, validation


def test_csv_errors_name_the_file_line_and_column(tmp_path, files):
    train, val = files
    good = [["s0.nii.gz", 1.0, "A"], ["s1.nii.gz", 2.0, "B"], ["s2.nii.gz", 4.0, "A"], ["s3.nii.gz", 3.0, "B"]]
    kinds = {"age": "numeric", "site": "categorical"}

    def fit(rows, header=("file", "age", "site"), columns=kinds, **kw):
        return fit_covariates(write_csv(tmp_path / "c.csv", header, rows), train, val, columns, **kw)

    encoder, features = fit(good)
    assert encoder.num_features == 3 and encoder.names == ["age", "site"]
    ages = torch.stack([features[f][0] for f in train])
    assert abs(float(ages.mean())) < 1e-6 and abs(float(ages.std()) - 1) < 1e-6  # standardised on training
    assert features[val[0]][1:].tolist() == [0.0, 1.0]  # one-hot B
    with pytest.raises(ValueError, match=r"no row for 1 of the 4 volumes.*s3.nii.gz"):
        fit(good[:3])
    with pytest.raises(ValueError, match=r"line 6: extra.nii.gz"):
        fit(good + [["extra.nii.gz", 1.0, "A"]])
    fit(good + [["unused.nii.gz", 1.0, "A"]], folder_files=train + val + [str(tmp_path / "unused.nii.gz")])
    with pytest.raises(ValueError, match=r"line 3, column 'age'.*'two' is not a number"):
        fit([good[0], ["s1.nii.gz", "two", "B"], *good[2:]])
    with pytest.raises(ValueError, match=r"line 5.*'site'.*category 'C' was not seen in training"):
        fit(good[:3] + [["s3.nii.gz", 3.0, "C"]])
    with pytest.raises(ValueError, match=r"no column 'sex'"):
        fit(good, columns={"sex": "categorical"})
    with pytest.raises(ValueError, match=r"'site' must be 'numeric' or 'categorical'"):
        fit(good, columns={"site": "ordinal"})
    with pytest.raises(ValueError, match=r"line 3: 's0.nii.gz' has a row already \(line 2\)"):
        fit([good[0], good[0], *good[1:]])
    with pytest.raises(ValueError, match=r"no column 'file'"):
        read_covariates_csv(write_csv(tmp_path / "d.csv", ["name", "age"], [["s0.nii.gz", 1]]))
    with pytest.raises(ValueError, match="constant over the training volumes"):
        fit([[r[0], 1.0, r[2]] for r in good])
    # default: every column but the file's, numeric; so a text column stops there
    with pytest.raises(ValueError, match=r"column 'site'.*'A' is not a number"):
        fit(good, columns=None)


def test_encoder_round_trips_through_its_state_and_decodes_numeric_values():
    enc = CovariateEncoder(
        [
            {"name": "age", "kind": "numeric", "mean": 50.0, "std": 10.0},
            {"name": "sex", "kind": "categorical", "categories": ["F", "M"]},
        ]
    )
    same = CovariateEncoder.from_state(json.loads(json.dumps(enc.state_dict())))
    x = same.encode({"age": "70", "sex": "M"})
    assert x.tolist() == [2.0, 0.0, 1.0] and torch.equal(x, enc.encode({"age": 70, "sex": "M"}))
    assert float(same.decode_numeric(x, "age")) == 70.0
    with pytest.raises(ValueError, match="no value for the covariate 'sex'"):
        enc.encode({"age": 1})
    with pytest.raises(ValueError, match="category 'X' was not seen"):
        enc.encode({"age": 1, "sex": "X"})


def test_cohort_covariates_are_measured_from_the_deformed_masks(tmp_path):
    paths = generate_mni_cohort(str(tmp_path), number_of_files=12, voxels_per_axis=16, seed=2)
    rows = list(csv.DictReader(open(tmp_path / COVARIATES_FILE)))
    assert [r["file"] for r in rows] == [os.path.basename(p) for p in paths]
    brain = np.array([float(r["brain_volume_ml"]) for r in rows])
    ventricles = np.array([float(r["ventricle_volume_ml"]) for r in rows])
    masks = template_masks(16)
    voxel_ml = abs(np.linalg.det(nib.load(paths[0]).affine[:3, :3])) / 1000
    template_brain, template_ventricles = masks["brain"].sum() * voxel_ml, masks["ventricles"].sum() * voxel_ml
    assert 1500 < template_brain < 2100 and 12 < template_ventricles < 35  # the MNI brain and its lateral ventricles
    assert np.all(np.abs(brain / template_brain - 1) < 0.35) and len(set(brain)) == 12  # deformed: near, not equal
    assert np.all(np.abs(ventricles / template_ventricles - 1) < 0.5) and len(set(ventricles)) == 12
    # the measurement follows the image: more voxels above 30% of the bright end in a larger brain (contrast and
    # bias field, applied to the image alone, blur the relation; the masks move with the image exactly)
    vols = [nib.load(p).get_fdata() for p in paths]
    extent = [float((v > 0.3 * np.percentile(v, 99.9)).sum()) for v in vols]
    assert np.corrcoef(extent, brain)[0, 1] > 0.6
    # covariates_only rewrites the same CSV for the same volumes, and refuses other volumes
    os.remove(tmp_path / COVARIATES_FILE)
    generate_mni_cohort(str(tmp_path), number_of_files=12, voxels_per_axis=16, seed=2, covariates_only=True)
    assert list(csv.DictReader(open(tmp_path / COVARIATES_FILE))) == rows
    with pytest.raises(ValueError, match="is not the volume that seed 3"):
        generate_mni_cohort(str(tmp_path), number_of_files=12, voxels_per_axis=16, seed=3, covariates_only=True)


def test_conditioning_off_is_todays_network_and_on_starts_from_it():
    torch.manual_seed(0)
    plain = VDVAE(16, **tiny_architecture(16))
    conditional = VDVAE(16, **tiny_architecture(16), num_covariates=3)
    assert not any("covariate" in k for k in plain.state_dict())  # same tensors as before (and the reference)
    extra = set(conditional.state_dict()) - set(plain.state_dict())
    assert extra and all(k.startswith("covariate_projections.") for k in extra)
    conditional.load_state_dict(plain.state_dict(), strict=False)
    x = torch.rand(2, 1, 16, 16, 16) * 2 - 1
    c = torch.randn(2, 3)
    plain.eval(), conditional.eval()
    assert torch.allclose(plain(x), conditional(x, c), atol=1e-6)  # zero projections: the unconditional function
    with torch.no_grad():
        for p in conditional.covariate_projections.parameters():
            p.normal_()
    assert not torch.allclose(plain(x), conditional(x, c), atol=1e-3)
    a = conditional.sample(2, generator_seed=1, covariates=c)
    b = conditional.sample(2, generator_seed=1, covariates=-c)
    assert not torch.allclose(a, b, atol=1e-4)
    # a counterfactual at the volume's own covariates is its reconstruction, at every abduction depth
    with torch.no_grad():  # priors that depend on the state (their heads start at zero)
        for block in conditional.decoder_blocks[1:]:
            for head in (block.prior_mean, block.prior_scale):
                head.weight.normal_(0, 0.3)
    recon = conditional.reconstruct(x, covariates=c)
    for depth in (None, 1, 4, 8):
        assert torch.allclose(conditional.counterfactual(x, c, c, depth), recon, atol=1e-5)
        assert not torch.allclose(conditional.counterfactual(x, c, -c, depth), recon, atol=1e-3)
    # abducting every group moves the latents with the priors; keeping the finer posteriors gives another volume
    assert not torch.allclose(conditional.counterfactual(x, c, -c), conditional.counterfactual(x, c, -c, 1), atol=1e-4)
    with pytest.raises(ValueError, match="needs a conditional VDVAE"):
        plain.counterfactual(x, c, c)
    with pytest.raises(ValueError, match=r"covariates must be \(2, 3\)"):
        conditional(x, torch.randn(2, 2))
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, c)
    # the conditional post-hoc prior regresses the latents on the features
    prior = LatentPCAPrior.fit(conditional, torch.rand(6, 1, 16, 16, 16), 4, covariates=torch.randn(6, 3))
    assert prior.coef.shape == (3, prior.mean.shape[0]) and prior.marginal(1).coef.shape[0] == 3
    with pytest.raises(ValueError, match="fit with covariates"):
        LatentPCAPrior.fit(conditional, torch.rand(6, 1, 16, 16, 16), 4)
    enc = CovariateEncoder([{"name": f"v{i}", "kind": "numeric", "mean": 0.0, "std": 1.0} for i in range(3)])
    values = condition_values(enc, {"v0": 2.0})
    assert values == {"v0": 2.0, "v1": 0.0, "v2": 0.0}
    gen = ConditionedGenerator(PosthocPriorVDVAE(conditional, prior), enc.encode(values))
    assert gen.features.tolist() == [2.0, 0.0, 0.0] and gen.sample(2).shape == (2, 1, 16, 16, 16)
    with pytest.raises(ValueError, match=r"condition names \['age'\]"):
        condition_values(enc, {"age": 1})


def evaluate_run(run_dir: str, output_dir: str, arch: dict, num_samples: int) -> dict:
    """``evaluate.json`` of the run's ``model.pt`` on its validation split at T = 1; returns the report."""
    run_bundle(
        {
            "ckpt_path": os.path.join(run_dir, "model.pt"),
            "run_dir": run_dir,
            "output_dir": output_dir,
            "num_samples": num_samples,
            "temperature": 1.0,
            "diversity_samples": num_samples,
            **arch,
        },
        "configs/evaluate.json",
    )
    return json.load(open(os.path.join(output_dir, "report.json")))


def sphere_cohort(folder, radii) -> str:
    """Bright balls of the given radii (voxels) in 16^3 noise, and their CSV (radius numeric, site categorical)."""
    os.makedirs(folder, exist_ok=True)
    grid = np.stack(np.meshgrid(*[np.arange(16) - 7.5] * 3, indexing="ij"))
    rng = np.random.default_rng(0)
    rows = []
    for i, r in enumerate(radii):
        centre = rng.uniform(-1, 1, 3)[:, None, None, None]
        dist = np.sqrt(((grid - centre) ** 2).sum(0))
        vol = 1 / (1 + np.exp(2 * (dist - r))) + rng.normal(0, 0.02, dist.shape)
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), os.path.join(folder, f"ball_{i:02d}.nii.gz"))
        rows.append([f"ball_{i:02d}.nii.gz", r, "AB"[i % 2]])
    return write_csv(os.path.join(folder, "covariates.csv"), ["file", "radius", "site"], rows)


def test_conditional_training_samples_follow_the_condition(tmp_path):
    """A tiny conditional run on balls whose radius is the covariate: the sidecar holds the encoding, inference.json
    samples at a requested radius without the CSV, and larger requested radii give larger balls."""
    data = str(tmp_path / "balls")
    table = sphere_cohort(data, radii=np.linspace(2.5, 6.5, 16).round(2).tolist())
    out = str(tmp_path / "run")
    columns = {"radius": "numeric", "site": "categorical"}
    run_bundle(
        tiny_overrides(data, out, max_epochs=3, covariates_csv=table, covariates=columns, latent_prior_resolution=16)
    )
    sidecar = json.load(open(os.path.join(out, "model.json")))
    assert [c["name"] for c in sidecar["covariates"]["columns"]] == ["radius", "site"]
    assert sidecar["covariates"]["columns"][1]["categories"] == ["A", "B"]
    arch = {"resolution": 16, **tiny_architecture(16)}
    for use_latent_prior in (True, False):  # the post-hoc prior (regressed on the features) and the learned priors
        brightness = []
        for radius in (2.5, 4.5, 6.5):
            parser = ConfigParser()
            parser.read_config(os.path.join(ROOT, "configs/inference.json"))
            parser.update(
                {
                    "ckpt_path": os.path.join(out, "model.pt"),
                    "device": "cpu",
                    "use_latent_prior": use_latent_prior,
                    "condition": {"radius": radius, "site": "A"},
                    **arch,
                }
            )
            net = parser.get_parsed_content("network")
            torch.manual_seed(0)
            with torch.no_grad():
                samples = torch.cat([net.sample(1, 1.0) for _ in range(8)])
            brightness.append(float(samples.mean()))  # a larger ball is a brighter volume
        # the covariate projections start at zero: only training makes the samples depend on the condition
        assert brightness[0] + 1e-3 < brightness[1] < brightness[2] - 1e-3, (use_latent_prior, brightness)
    # a condition for a column the model does not have, or without its categorical column, stops by name
    opts = {"ckpt_path": os.path.join(out, "model.pt"), "output_dir": str(tmp_path / "s"), **arch}
    proc = run_bundle({**opts, "condition": {"radius": 3.0}}, "configs/inference.json", check=False)
    assert proc.returncode != 0 and "no value for the covariate 'site'" in proc.stdout + proc.stderr
    proc = run_bundle({**opts, "condition": {"age": 3.0}}, "configs/inference.json", check=False)
    assert proc.returncode != 0 and "condition names ['age']" in proc.stdout + proc.stderr
    # a list of values: one set of samples per value, named by it, the same noise for each
    sweep = {**opts, "condition": {"radius": [2.5, 6.5], "site": "A"}, "num_samples": 3, "temperature": 1.0}
    run_bundle(sweep, "configs/inference.json")
    means = {
        r: np.mean(
            [nib.load(str(tmp_path / "s" / f"sample_t1_radius{r}_{i:05d}.nii.gz")).get_fdata().mean() for i in range(3)]
        )
        for r in ("2.5", "6.5")
    }
    assert means["2.5"] < means["6.5"], means
    assert os.path.getsize(tmp_path / "s" / "samples.png") > 0
    # evaluate.json reads the held-out volumes' covariates from the training CSV recorded in the sidecar
    assert sidecar["covariates"]["csv"] == os.path.abspath(table)
    report = evaluate_run(out, str(tmp_path / "e"), arch, num_samples=4)
    assert "training volume i mod" in report["conditioning"]
    assert np.isfinite(report["likelihood"]["neg_elbo_nats_per_voxel"]["median"])

    # counterfactuals: each ball decoded with its radius changed by -2 and +2 voxels (the site kept)
    recon_dir = str(tmp_path / "cf")
    recon = {"ckpt_path": os.path.join(out, "model.pt"), "input_dir": data, "output_dir": recon_dir, **arch}
    run_bundle({**recon, "covariates_csv": table, "counterfactual": {"radius": [-2, 2]}}, "configs/reconstruct.json")
    means = {"recon": [], "radius-2": [], "radius+2": []}
    for i in range(16):
        stem = os.path.join(recon_dir, f"ball_{i:02d}")
        rec = nib.load(f"{stem}_recon.nii.gz").get_fdata()
        means["recon"].append(rec.mean())
        for label in ("radius-2", "radius+2"):
            cf = nib.load(f"{stem}_cf_{label}.nii.gz").get_fdata()
            diff = nib.load(f"{stem}_cf_{label}_diff.nii.gz").get_fdata()
            assert np.allclose(diff, cf - rec, atol=1e-4)
            means[label].append(cf.mean())
    assert os.path.getsize(os.path.join(recon_dir, "ball_00_counterfactual.png")) > 0
    smaller, same, larger = (float(np.mean(means[k])) for k in ("radius-2", "recon", "radius+2"))
    assert smaller + 1e-3 < same < larger - 1e-3, (smaller, same, larger)
    # a conditional model needs each volume's covariates (by default the training CSV, here moved away); changes
    # name covariates the model has
    os.rename(table, table + ".moved")
    proc = run_bundle(recon, "configs/reconstruct.json", check=False)
    os.rename(table + ".moved", table)
    assert proc.returncode != 0 and "--covariates_csv" in proc.stdout + proc.stderr
    proc = run_bundle(
        {**recon, "covariates_csv": table, "counterfactual": {"age": 1}}, "configs/reconstruct.json", check=False
    )
    assert proc.returncode != 0 and "counterfactual names ['age']" in proc.stdout + proc.stderr


def test_check_conditioning_measures_requested_against_measured_brain_volume(tmp_path):
    """The control check on a tiny conditional run of the built-in cohort (16^3): the image measurement of brain
    volume is checked on the held-out volumes, requested values span the training range and beyond, and the
    report, table and figure are written."""
    from scripts.tools.check_conditioning import check_conditioning
    from scripts.tools.check_counterfactuals import check_counterfactuals

    data = str(tmp_path / "cohort")
    generate_mni_cohort(data, number_of_files=12, voxels_per_axis=16, seed=4)
    out = str(tmp_path / "run")
    opts = tiny_overrides(data, out, max_epochs=1, covariates_csv=os.path.join(data, COVARIATES_FILE))
    run_bundle(opts)
    report = check_conditioning(
        os.path.join(ROOT, "configs/train.json"),
        num_values=4,
        num_samples=2,
        report_dir=str(tmp_path / "check"),
        **{k: v for k, v in opts.items()},
    )
    lo, hi = report["training_range"]
    requested = [r["requested"] for r in report["per_value"]]
    assert requested[0] < lo < hi < requested[-1]  # 10% of the range beyond each end
    assert [r["inside"] for r in report["per_value"]] == [False, True, True, False]
    assert report["samples_inside_range"]["count"] == 4 and report["samples_beyond_range"]["count"] == 4
    floor = report["heldout_volumes"]
    assert floor["mae_over_training_std"] < 3.0  # the image measurement is near the mask-measured value
    for name in ("conditioning.json", "conditioning.md", "conditioning.png"):
        assert os.path.getsize(tmp_path / "check" / name) > 0
    with pytest.raises(ValueError, match="no image measurement"):
        check_conditioning(os.path.join(ROOT, "configs/train.json"), covariate="ventricle_volume_ml", **opts)

    # counterfactuals of the held-out volumes, abducting every group and only down to 4^3
    cf = check_counterfactuals(
        os.path.join(ROOT, "configs/train.json"),
        changes=[-1.0, 1.0],
        num_volumes=2,
        abduct_to_resolutions=[None, 4],
        report_dir=str(tmp_path / "cf"),
        **opts,
    )
    assert [r["abduct_to_resolution"] for r in cf["per_depth"]] == [None, 4]
    for row in cf["per_depth"]:
        assert sorted(row["per_change"]) == ["+1 SD", "-1 SD"] and len(row["per_change"]["+1 SD"]) == 2
        assert np.isfinite(row["reversibility_rmse"]) and -1 <= row["pearson_r"] <= 1
    for name in ("counterfactuals.json", "counterfactuals.md", "counterfactuals.png"):
        assert os.path.getsize(tmp_path / "cf" / name) > 0
    with pytest.raises(ValueError, match="non-zero changes"):
        check_counterfactuals(os.path.join(ROOT, "configs/train.json"), changes=[0.0, 1.0], **opts)


def test_a_cohort_without_its_csv_names_the_command_that_writes_it(tmp_path):
    from scripts.engine.data import DataSplit

    folder = str(tmp_path / "mni_cohort")
    generate_mni_cohort(folder, number_of_files=3, voxels_per_axis=16, seed=0)
    os.remove(os.path.join(folder, COVARIATES_FILE))  # as an older version left it
    csv_path = os.path.join(folder, COVARIATES_FILE)
    with pytest.raises(FileNotFoundError, match="--covariates_only True"):
        DataSplit(folder, str(tmp_path / "run"), covariates_csv=csv_path, default_dataset_dir=folder)
    with pytest.raises(FileNotFoundError, match="covariates_csv .* does not exist"):
        DataSplit(folder, str(tmp_path / "run"), covariates_csv=str(tmp_path / "none.csv"))
    with pytest.raises(ValueError, match="given without covariates_csv"):
        DataSplit(folder, str(tmp_path / "run"), covariates={"age": "numeric"})
    generate_mni_cohort(folder, number_of_files=3, voxels_per_axis=16, seed=0, covariates_only=True)
    split = DataSplit(folder, str(tmp_path / "run"), train_frac=0.6, covariates_csv=csv_path)
    assert split.num_covariates == 2 and all(item["covariates"].shape == (2,) for item in split.train_data())


def test_conditional_vq_prior_trains_and_samples_at_conditions(tmp_path):
    """The VQ family with covariates: stage 1 as usual, the autoregressive token prior conditioned on the balls'
    radius; its sidecar holds the encoding, vq_inference.json samples a list of conditions (same noise for each), and
    the samples differ between conditions; vq_evaluate.json reads the held-out covariates."""
    from tests.test_vq import AUTOREGRESSIVE, PRIOR, STAGE1, stage1_overrides, stage2_overrides

    data = str(tmp_path / "balls")
    table = sphere_cohort(data, radii=np.linspace(2.5, 6.5, 12).round(2).tolist())
    s1 = stage1_overrides(data, str(tmp_path / "vqvae"), covariates_csv=table, covariates={"radius": "numeric"})
    run_bundle(s1, STAGE1)
    s2 = stage2_overrides(s1, str(tmp_path / "prior"))
    run_bundle(s2, json.dumps([STAGE1, PRIOR, AUTOREGRESSIVE]))
    sidecar = json.load(open(tmp_path / "prior" / "prior.json"))
    assert [c["name"] for c in sidecar["covariates"]["columns"]] == ["radius"]
    shared = {
        "vqvae_path": s1["vqvae_path"],
        "ckpt_path": s2["model_path"],
        "prior": "autoregressive",
        **{k: s1[k] for k in ("resolution", "vq_channels", "num_embeddings", "embedding_dim")},
        **{k: s2[k] for k in ("prior_dim", "prior_depth", "prior_heads")},
    }
    out = tmp_path / "samples"
    run_bundle(
        {**shared, "output_dir": str(out), "condition": {"radius": [2.5, 6.5]}, "num_samples": 2},
        "configs/vq_inference.json",
    )
    small, large = (
        [nib.load(str(out / f"sample_t0.9_radius{r}_{i:05d}.nii.gz")).get_fdata() for i in range(2)]
        for r in ("2.5", "6.5")
    )
    assert not np.allclose(small[0], large[0])  # the same noise, another condition
    evaluation = tmp_path / "eval"
    run_bundle(
        {
            **shared,
            "run_dir": s1["output_dir"],
            "output_dir": str(evaluation),
            "num_samples": 2,
            "diversity_samples": 2,
            "temperature": 1.0,
        },
        json.dumps(["configs/evaluate.json", "configs/vq_evaluate.json"]),
    )
    report = json.load(open(evaluation / "report.json"))
    assert "training volume i mod" in report["conditioning"]
