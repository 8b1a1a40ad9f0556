"""Distributed training with torchrun on CPU (gloo): configs/multi_gpu_train.json on two processes.

The runs use the tiny architecture of tests/test_bundle.py on 7 of the synthetic volumes (4 training, 3
validation) with batch 2 per process, so one epoch is one DDP step. The first run is a 2-node launch (two
torchrun agents of one process each, c10d rendezvous on this machine), the others ``--standalone
--nproc_per_node=2``. A test overlay adds :class:`RankProbe`, which records on every rank what it trained and
validated on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow

from scripts.engine.distributed import TORCHRUN_ENV, check_volumes_per_rank
from scripts.engine.handlers import latest_checkpoint
from scripts.vdvae.network import VDVAE
from scripts.vdvae.trainer import VDVAEEvaluator
from tests.conftest import ROOT, tiny_architecture
from tests.test_bundle import run_bundle, tiny_overrides

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with the gloo backend"
)

TRAIN = "configs/train.json"
MULTI = "configs/multi_gpu_train.json"


def weight_checksum(state: dict) -> float:
    """Sum of every entry of a state dict, in float64 (identical weights give identical sums)."""
    return float(sum(v.double().sum() for v in state.values()))


class RankProbe:
    """Test handler, attached to the trainer and the evaluator by a test overlay. Writes ``folder/rank<r>.json``
    with this rank's first training step of the run (epoch, iteration, weight checksum before the step, volumes,
    loss) and every validation (volumes, per-volume negative ELBO, the reduced key metric), and
    ``folder/rank<r>_network.pt`` with the final weights. With ``nan_at_iteration`` > 0, rank 1 fills that
    iteration's batch with NaN (a non-finite loss on one rank only)."""

    def __init__(self, folder: str, network: torch.nn.Module, nan_at_iteration: int = 0) -> None:
        self.folder = folder
        self.network = network
        self.nan_at_iteration = int(nan_at_iteration)
        self.rank = int(os.environ.get("RANK", "0"))
        self.record: dict = {"first_step": None, "validations": []}

    def attach(self, engine) -> None:
        if isinstance(engine, VDVAEEvaluator):
            engine.add_event_handler(
                Events.EPOCH_STARTED, lambda e: self.record["validations"].append({"files": [], "values": []})
            )
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._validation_batch)
            engine.add_event_handler(Events.EPOCH_COMPLETED, self._validation_end)
        else:
            engine.add_event_handler(Events.ITERATION_STARTED, self._step_start)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._step_end)
            engine.add_event_handler(Events.COMPLETED, self._save)

    def _step_start(self, engine) -> None:
        if self.rank == 1 and engine.state.iteration == self.nan_at_iteration:
            engine.state.batch["image"].fill_(float("nan"))
        if self.record["first_step"] is None:
            self.record["first_step"] = {
                "epoch": engine.state.epoch,
                "iteration": engine.state.iteration,
                "checksum": weight_checksum(self.network.state_dict()),
            }

    def _step_end(self, engine) -> None:
        step = self.record["first_step"]
        if "loss" not in step:
            step["files"] = list(engine.state.batch["image"].meta["filename_or_obj"])
            step["loss"] = engine.state.output["loss"]

    def _validation_batch(self, engine) -> None:
        current = self.record["validations"][-1]
        current["files"] += list(engine.state.batch["image"].meta["filename_or_obj"])
        current["values"] += engine.state.output["neg_elbo_nats"].float().tolist()

    def _validation_end(self, engine) -> None:
        self.record["validations"][-1]["metric"] = float(engine.state.metrics["val_neg_elbo_nats"])
        self._write()

    def _save(self, engine) -> None:
        torch.save(self.network.state_dict(), os.path.join(self.folder, f"rank{self.rank}_network.pt"))
        self._write()

    def _write(self) -> None:
        os.makedirs(self.folder, exist_ok=True)
        with open(os.path.join(self.folder, f"rank{self.rank}.json"), "w") as f:
            json.dump(self.record, f)


def probe_overlay(folder: str, nan_at_iteration: int = 0) -> str:
    """Writes ``folder/probe.json``: an overlay that attaches a :class:`RankProbe` writing into ``folder`` and
    trains on the deterministic preprocessing only (no augmentation, no random crop)."""
    os.makedirs(folder, exist_ok=True)
    probe_config = {"folder": folder, "network": "@network", "nan_at_iteration": nan_at_iteration}
    overlay = {
        "train#probe": {"_target_": "tests.test_distributed.RankProbe", **probe_config},
        "train#trainer#train_handlers": "$@train#handlers + [@train#probe]",
        "validate#evaluator#val_handlers": "$@validate#handlers + [@train#probe]",
        "train#preprocessing#transforms": "@base_transforms",
    }
    path = os.path.join(folder, "probe.json")
    with open(path, "w") as f:
        json.dump(overlay, f)
    return path


def probe(folder: str, rank: int) -> dict:
    with open(os.path.join(folder, f"rank{rank}.json")) as f:
        return json.load(f)


def small_split(nifti_dir: str, out: str, **extra) -> dict:
    """Tiny overrides on 7 volumes (4 training, 3 validation), batch 2, one epoch. Latent scales are kept
    in [0.0001, 0.0002] so that the posterior samples barely move the loss (relative spread ~1e-4 instead of 5%
    over 4 volumes at initialisation), which lets runs with different latent noise be compared closely."""
    opts = tiny_overrides(nifti_dir, out, max_epochs=1, batch_size=2, max_niis_to_use=7, train_frac=0.55)
    opts.update(scale_hidden_clamp_bounds=[0.0001, 0.0002], **extra)
    return opts


STANDALONE = ["--standalone", "--nproc_per_node=2"]


def torchrun_command(launch: list[str], overrides: dict, config_files: list[str]) -> list[str]:
    """``torchrun <launch> -m monai.bundle run`` on ``config_files`` with ``overrides``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "monai.bundle", "run"]
    cmd += ["--config_file", json.dumps(config_files)]
    for k, v in overrides.items():
        cmd += [f"--{k}", v if isinstance(v, str) else json.dumps(v)]
    return cmd


def clean_env() -> dict:
    """This environment without torchrun's variables, one thread per process (2 processes on 2 cores)."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV and not k.startswith("TORCHELASTIC")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def torchrun(launches: list[list[str]], overrides: dict, config_files: list[str]) -> str:
    """Runs one torchrun agent per entry of ``launches`` (one per simulated node) to the end; returns their logs."""
    procs = [
        subprocess.Popen(
            torchrun_command(launch, overrides, config_files),
            cwd=ROOT,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for launch in launches
    ]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("torchrun failed:\n" + "\n".join(log[-5000:] for log in logs))
    return "\n".join(logs)


def two_nodes() -> list[list[str]]:
    """torchrun arguments of a 2-node launch (one process per node) with a c10d rendezvous on this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}"]
    return [[*common, f"--node_rank={node}", f"--rdzv_id=vdvae-test-{port}"] for node in (0, 1)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, nifti_dir) -> dict:
    """One epoch (one step) of a 2-node, 1-process-per-node gloo run with the probe."""
    out = str(tmp_path_factory.mktemp("ddp") / "run")
    folder = os.path.join(out, "probe")
    log = torchrun(two_nodes(), small_split(nifti_dir, out), [TRAIN, MULTI, probe_overlay(folder)])
    return {"out": out, "probe": folder, "log": log}


def test_two_processes_write_one_checkpoint_and_identical_replicas(ddp_run):
    out = ddp_run["out"]
    ckpt_dir = os.path.join(out, "checkpoints")
    assert os.listdir(ckpt_dir) == ["checkpoint_1.pt"]  # 4 volumes, 2 processes x batch 2: one step per epoch
    ckpt = torch.load(os.path.join(ckpt_dir, "checkpoint_1.pt"), weights_only=True)
    rank0 = torch.load(os.path.join(ddp_run["probe"], "rank0_network.pt"), weights_only=True)
    rank1 = torch.load(os.path.join(ddp_run["probe"], "rank1_network.pt"), weights_only=True)
    assert rank0.keys() == rank1.keys() == ckpt["network"].keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
        assert torch.equal(rank0[k], ckpt["network"][k]), k
    assert weight_checksum(rank0) != probe(ddp_run["probe"], 0)["first_step"]["checksum"]  # the step changed them
    # logging, TensorBoard and images on rank 0 only
    assert len(os.listdir(os.path.join(out, "tensorboard"))) == 1
    assert ddp_run["log"].count("VDVAETrainer - INFO - Epoch[1] Complete") == 1


def test_validation_is_reduced_exactly_without_padding(ddp_run):
    with open(os.path.join(ddp_run["out"], "data_split.json")) as f:
        val_files = json.load(f)["val"]
    ranks = [probe(ddp_run["probe"], r)["validations"][0] for r in (0, 1)]
    assert [len(r["files"]) for r in ranks] == [2, 1]  # 3 volumes split unevenly, none repeated
    assert sorted(ranks[0]["files"] + ranks[1]["files"]) == sorted(val_files)
    values = ranks[0]["values"] + ranks[1]["values"]
    exact = sum(values) / len(values)
    assert ranks[0]["metric"] == pytest.approx(exact, rel=1e-6) and ranks[1]["metric"] == pytest.approx(exact, rel=1e-6)
    padded = (sum(values) + ranks[1]["values"][0]) / 4  # what a padding sampler would report
    assert abs(padded - exact) > 1e-6 * abs(exact)


def test_first_step_matches_one_process_with_twice_the_batch(ddp_run, tmp_path, nifti_dir):
    out = str(tmp_path / "single")
    folder = os.path.join(out, "probe")
    run_bundle(small_split(nifti_dir, out, batch_size=4), config_file=json.dumps([TRAIN, probe_overlay(folder)]))
    single = probe(folder, 0)["first_step"]
    ranks = [probe(ddp_run["probe"], r)["first_step"] for r in (0, 1)]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] == single["checksum"]  # same initial weights
    assert len(set(ranks[0]["files"]) | set(ranks[1]["files"])) == 4  # the ranks share the 4 volumes out
    assert sorted(ranks[0]["files"] + ranks[1]["files"]) == sorted(single["files"])
    # the loss is a batch mean and DDP averages gradients, so the ranks' mean loss is the 4-volume batch's loss;
    # only the posterior samples differ, and small_split makes them nearly irrelevant
    ddp_loss = (ranks[0]["loss"] + ranks[1]["loss"]) / 2
    assert ddp_loss == pytest.approx(single["loss"], rel=1e-3)


def test_resume_and_nan_skip_under_ddp_then_one_device_and_inference(ddp_run, tmp_path, nifti_dir, monkeypatch):
    out = str(tmp_path / "resumed")
    shutil.copytree(ddp_run["out"], out, ignore=shutil.ignore_patterns("probe"))
    folder = os.path.join(out, "probe")
    opts = small_split(nifti_dir, out, max_epochs=2)
    torchrun([STANDALONE], opts, [TRAIN, MULTI, probe_overlay(folder, nan_at_iteration=2)])
    resumed_from = torch.load(os.path.join(ddp_run["out"], "checkpoints", "checkpoint_1.pt"), weights_only=True)
    for r in (0, 1):  # every rank continued from the same checkpoint
        first = probe(folder, r)["first_step"]
        assert (first["epoch"], first["iteration"]) == (2, 2)
        assert first["checksum"] == weight_checksum(resumed_from["network"])
    assert latest_checkpoint(os.path.join(out, "checkpoints")).endswith("checkpoint_2.pt")

    # that step's loss was NaN on rank 1 only, and neither rank stepped
    losses = [probe(folder, r)["first_step"]["loss"] for r in (0, 1)]
    assert losses[0] == losses[0] and losses[1] != losses[1]
    after = torch.load(os.path.join(out, "checkpoints", "checkpoint_2.pt"), weights_only=True)
    assert after["gradient_skipper"]["skipped_total"] == 1  # saved by rank 0, whose own loss was finite
    for r in (0, 1):
        weights = torch.load(os.path.join(folder, f"rank{r}_network.pt"), weights_only=True)
        assert all(torch.equal(weights[k], resumed_from["network"][k]) for k in weights)

    # the distributed checkpoint resumes a single-device run (batch 4: one step per epoch)
    proc = run_bundle({**opts, "max_epochs": 3, "batch_size": 4})
    assert "Restored all variables from" in proc.stdout + proc.stderr and "checkpoint_2.pt" in proc.stdout + proc.stderr
    final = torch.load(latest_checkpoint(os.path.join(out, "checkpoints")), weights_only=True)
    assert final["trainer"]["iteration"] == 3

    # resuming with another effective batch (2 steps per epoch) is refused instead of silently cutting epochs
    monkeypatch.chdir(ROOT)
    workflow = ConfigWorkflow(workflow_type="train", config_file=TRAIN, **{**opts, "max_epochs": 4, "batch_size": 2})
    workflow.initialize()
    with pytest.raises(RuntimeError) as err:  # MONAI wraps what a config expression raises
        workflow.run()
    assert "written with 1 iterations per epoch but this run has 2" in str(err.value.__cause__)

    # and its weights load into a plain network, as configs/inference.json does
    net = VDVAE(16, **tiny_architecture(16), shared_x_scale=True)
    net.load_state_dict(torch.load(os.path.join(out, "model.pt"), weights_only=True))
    net.load_state_dict(final["network"])
    assert net.sample(1, 0.5).shape == (1, 1, 16, 16, 16)


def _stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first, then the parent id), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> set[int]:
    """Process ids of every descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        fields = _stat(entry)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def live_processes(pids, mentioning: str) -> list[int]:
    """Those of ``pids``, and any process whose command line contains ``mentioning``, that are alive (not zombies)."""
    found = set(pids)
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if mentioning.encode() in f.read():
                    found.add(int(entry))
        except OSError:
            continue
    return sorted(p for p in found if (fields := _stat(p)) is not None and fields[0] != "Z")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("stop", ["sigterm_to_torchrun", "ctrl_c", "sigkill_to_torchrun"])
def test_stopping_a_run_stops_every_process_and_keeps_the_checkpoint(stop, tmp_path, nifti_dir):
    out = str(tmp_path / f"stopped_{stop}")
    opts = tiny_overrides(nifti_dir, out, max_epochs=1000, num_workers=1, save_every_n_iterations=1)
    proc = subprocess.Popen(
        torchrun_command(STANDALONE, opts, [TRAIN, MULTI]),
        cwd=ROOT,
        env=clean_env(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ckpt_dir = os.path.join(out, "checkpoints")
        deadline = time.time() + 240
        tree: set[int] = set()
        while time.time() < deadline:  # until it has saved 4 steps and both ranks have a data-loader worker
            latest = latest_checkpoint(ckpt_dir)
            tree = descendants(proc.pid)
            if latest is not None and int(os.path.basename(latest)[11:-3]) >= 4 and len(tree) >= 4:
                break
            assert proc.poll() is None, "the run ended early"
            time.sleep(0.1)
        assert len(tree) >= 4, tree
        start = time.time()
        if stop == "ctrl_c":  # the terminal sends SIGINT to the foreground process group
            os.killpg(proc.pid, signal.SIGINT)
        elif stop == "sigterm_to_torchrun":  # torchrun forwards it to the ranks
            proc.send_signal(signal.SIGTERM)
        else:  # torchrun cannot forward SIGKILL: the ranks get SIGTERM from the kernel (exit_with_launcher)
            proc.kill()
        proc.wait(timeout=60)
        elapsed = time.time() - start
        deadline = time.time() + 15  # orphaned data-loader workers check their parent every 5 s
        while time.time() < deadline and live_processes(tree, out):
            time.sleep(0.2)
        assert live_processes(tree, out) == [], "processes of the run are still alive"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    assert elapsed < 15, f"torchrun took {elapsed:.1f} s to stop"
    files = [f for f in os.listdir(ckpt_dir) if f.startswith("checkpoint_")]
    assert files
    for name in files:
        ckpt = torch.load(os.path.join(ckpt_dir, name), weights_only=True)
        assert ckpt["trainer"]["iteration"] == int(name[11:-3])


def test_bad_launches_say_how_to_launch(tmp_path, nifti_dir, monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    opts = tiny_overrides(nifti_dir, str(tmp_path / "bad"))
    workflow = ConfigWorkflow(workflow_type="train", config_file=[TRAIN, MULTI], **opts)
    with pytest.raises(RuntimeError) as err:
        workflow.initialize()
    assert "must be started by torchrun" in str(err.value.__cause__)
    assert "torchrun --standalone --nproc_per_node=N -m monai.bundle run" in str(err.value.__cause__)

    # train.json alone under torchrun would train N independent copies into one output_dir
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    workflow = ConfigWorkflow(workflow_type="train", config_file=TRAIN, **opts)
    with pytest.raises(RuntimeError) as err:
        workflow.initialize()
    assert "Add the distributed overlay" in str(err.value.__cause__) and MULTI in str(err.value.__cause__)
    assert not os.path.exists(tmp_path / "bad")  # stopped before writing anything

    # validation is split across ranks without padding: each needs a volume
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="the validation split has 3 volume.* but the run has 4 processes"):
        check_volumes_per_rank(SimpleNamespace(val_files=["a.nii", "b.nii", "c.nii"]))
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert check_volumes_per_rank(SimpleNamespace(val_files=["a.nii", "b.nii", "c.nii"]))


RANK0_ONLY = {"StatsHandler", "TensorBoardStatsHandler", "scripts.engine.handlers.VolumeImageLogger"}


@pytest.mark.parametrize(
    "config_files",
    [
        [TRAIN],
        [TRAIN, "configs/vdvae_64.json"],
        ["configs/vqvae_train.json"],
        ["configs/vqvae_train.json", "configs/vq_prior.json"],
    ],
)
def test_overlay_only_adds_and_rank0_handlers_are_switched_off_by_an_expression(config_files):
    with open(os.path.join(ROOT, MULTI)) as f:
        overlay = json.load(f)
    # the overlay restates nothing of the training configs: it adds to train, validate, imports and initialize
    assert set(overlay) == {"device", "processes", "+train", "+validate", "+imports", "+initialize"}
    assert set(overlay["+train"]) == {"training_network", "sampler"} and set(overlay["+validate"]) == {"sampler"}

    single, multi = ConfigParser(), ConfigParser()
    single.read_config([os.path.join(ROOT, f) for f in config_files])
    multi.read_config([os.path.join(ROOT, f) for f in [*config_files, MULTI]])
    assert multi["initialize"][:-1] == single["initialize"] and multi["finalize"] == single["finalize"]
    assert "require_base('configs/multi_gpu_train.json'" in multi["initialize"][-1]  # appended: runs last
    assert single["train#sampler"] is None and multi["train#sampler#_target_"] == "DistributedSampler"
    assert multi["train#dataloader"] == single["train#dataloader"]  # the loader takes @train#sampler either way
    assert single["initialize"][0] == multi["initialize"][0] == "$@processes"  # before anything is built
    assert single["processes"] == "$scripts.engine.distributed.require_single_process()"
    assert multi["processes"] == "$scripts.engine.distributed.start_process_group(@device)"
    assert multi["finalize"][-1] == "$scripts.engine.distributed.end_process_group()"
    assert multi["train#training_network#_target_"] == "torch.nn.parallel.DistributedDataParallel"
    for section in ("train", "validate"):  # whatever their order, the logging handlers run on rank 0 only
        for h in single[f"{section}#handlers"]:
            target = h.get("_target_") if isinstance(h, dict) else h
            assert (
                isinstance(h, dict) and h.get("_disabled_") == "$not scripts.engine.handlers.is_main_process()"
            ) == (target in RANK0_ONLY), (section, target)


def test_rank0_handlers_are_built_on_rank0_only(monkeypatch, tmp_path, nifti_dir):
    monkeypatch.chdir(ROOT)
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    built = {}
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        parser = ConfigParser()
        parser.read_config(os.path.join(ROOT, TRAIN))
        parser.update(tiny_overrides(nifti_dir, str(tmp_path / rank)))
        handlers = parser.get_parsed_content("validate#handlers")
        built[rank] = (sorted(type(h).__name__ for h in handlers), parser.get_parsed_content("summary_writer"))
    assert built["0"][0] == ["BestModelSaver", "StatsHandler", "TensorBoardStatsHandler", "VolumeImageLogger"]
    assert built["1"][0] == ["BestModelSaver"] and built["1"][1] is None
    built["0"][1].close()
    assert os.listdir(tmp_path / "0" / "tensorboard") and not (tmp_path / "1" / "tensorboard").exists()


def test_vq_family_trains_both_stages_under_torchrun_with_the_same_overlay(tmp_path, nifti_dir):
    from tests.test_vq import stage1_overrides, stage2_overrides

    s1 = stage1_overrides(nifti_dir, str(tmp_path / "vqvae"), max_epochs=1, batch_size=2)
    log = torchrun([STANDALONE], s1, ["configs/vqvae_train.json", MULTI])
    assert os.path.isfile(s1["vqvae_path"]) and os.path.isfile(os.path.join(s1["output_dir"], "tokens.pt"))
    assert log.count("VQVAETrainer - INFO - Epoch[1] Complete") == 1  # logged by rank 0 only
    assert len(os.listdir(os.path.join(s1["output_dir"], "tensorboard"))) == 1
    s2 = stage2_overrides(s1, str(tmp_path / "prior"), max_epochs=1, batch_size=2)
    log = torchrun(
        [STANDALONE],
        s2,
        ["configs/vqvae_train.json", "configs/vq_prior.json", "configs/vq_prior_autoregressive.json", MULTI],
    )
    assert os.path.isfile(s2["model_path"]) and log.count("PriorTrainer - INFO - Epoch[1] Complete") == 1
    assert latest_checkpoint(os.path.join(s2["output_dir"], "checkpoints")) is not None
