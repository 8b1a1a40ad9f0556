# Copyright 2026 The VDVAE bundle authors. Licensed under the Apache License, Version 2.0.
"""Helpers for distributed training with ``torchrun`` (``configs/multi_gpu_train.json``).

The training configs (``train.json``, ``vqvae_train.json``, ``vq_prior.json``) are written for any number of
processes: their first ``initialize`` step is ``@processes``, which is :func:`require_single_process` in the configs
themselves and :func:`start_process_group` in the overlay; rank-0-only handlers carry
``"_disabled_": "$not scripts.engine.handlers.is_main_process()"``; ``finalize`` ends with :func:`end_process_group`. The
overlay then only adds what differs (the device, DistributedDataParallel, MONAI ``DistributedSampler``), as the
MONAI Model Zoo's ``multi_gpu_train.json`` files do. This module adds what the zoo bundles leave implicit:

* :func:`local_device` checks that the process was started by ``torchrun`` and returns ``cuda:LOCAL_RANK`` (or
  the CPU), failing with the command to use when it was not;
* :func:`require_single_process` stops ``configs/train.json`` launched under ``torchrun`` without the overlay
  (N processes training independently into one ``output_dir``);
* :func:`start_process_group` / :func:`end_process_group` create and destroy the process group of a ``torchrun``
  process (and quieten the logging of ranks other than 0);
* :func:`exit_with_launcher` makes the kernel stop a rank whose ``torchrun`` agent died, even by SIGKILL, so a
  killed run leaves no orphan ranks (Ctrl-C and SIGTERM are forwarded to every rank by the agent itself);
* :func:`agreed_checkpoint` makes every rank resume from the checkpoint rank 0 chose;
* :func:`check_volumes_per_rank` explains a validation set smaller than the number of processes.
"""

from __future__ import annotations

import logging
import os
import signal

import torch
import torch.distributed as dist

from scripts.engine.handlers import latest_checkpoint

__all__ = [
    "TORCHRUN_ENV",
    "LAUNCH_COMMAND",
    "world_size",
    "local_device",
    "require_single_process",
    "start_process_group",
    "end_process_group",
    "exit_with_launcher",
    "agreed_checkpoint",
    "check_volumes_per_rank",
]

TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_COMMAND = (
    "torchrun --standalone --nproc_per_node=N -m monai.bundle run "
    "--config_file \"['configs/train.json','configs/multi_gpu_train.json']\""
)


def world_size() -> int:
    """Number of processes: from the process group when there is one, else ``WORLD_SIZE`` (1 when unset)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device() -> torch.device:
    """The device of this ``torchrun`` process: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.

    Raises RuntimeError with the launch command when the process was not started by ``torchrun`` (its
    environment variables are missing), and when ``LOCAL_RANK`` has no GPU (``--nproc_per_node`` above the
    number of visible GPUs)."""
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise RuntimeError(
            "configs/multi_gpu_train.json runs one process per device and must be started by torchrun "
            f"(missing environment variables {', '.join(missing)}). Launch it as\n  {LAUNCH_COMMAND}\n"
            "(N = GPUs on this node, or CPU processes); across nodes replace --standalone by --nnodes, "
            "--node_rank, --rdzv_backend=c10d and --rdzv_endpoint=HOST:PORT. For one device use configs/train.json alone."
        )
    local_rank = int(os.environ["LOCAL_RANK"])
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no GPU: this node has {count} visible CUDA device(s); "
            f"set torchrun's --nproc_per_node to at most {count}"
        )
    return torch.device("cuda", local_rank)


def require_single_process() -> bool:
    """Raises RuntimeError when this process is one of several started by ``torchrun`` without a process group
    (``configs/train.json`` launched without ``configs/multi_gpu_train.json``); returns True otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            f"configs/train.json trains in a single process, but this is one of WORLD_SIZE={os.environ['WORLD_SIZE']} "
            "processes started by torchrun, which would train independently and overwrite each other's "
            f"checkpoints. Add the distributed overlay:\n  {LAUNCH_COMMAND}"
        )
    return True


def start_process_group(device: torch.device) -> bool:
    """Sets up this ``torchrun`` process (``processes`` in ``configs/multi_gpu_train.json``): arms
    :func:`exit_with_launcher`, creates the default process group (NCCL for a CUDA ``device``, else Gloo) unless one
    exists, makes ``device`` the current CUDA device, and lowers the logging of every rank but 0 to warnings.
    Returns True."""
    exit_with_launcher()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.get_rank() > 0:
        logging.getLogger().setLevel(logging.WARNING)
    return True


def end_process_group() -> bool:
    """Waits for every rank, then destroys the default process group if there is one (the last ``finalize`` step of
    the training configs). Returns True.

    The barrier keeps a rank that finishes early (rank 0 still saves checkpoints and writes tokens) from tearing down
    its Gloo connections under a peer that still uses them, which aborts that peer ("terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return True


def exit_with_launcher() -> bool:
    """Asks the kernel to send SIGTERM to this process when its parent, the ``torchrun`` agent, dies (Linux
    ``PR_SET_PDEATHSIG`` via torch's own binding), so that a launcher killed even with SIGKILL leaves no orphan
    ranks; their data-loader workers exit on their own once their parent is gone. Returns True when armed
    (started by torchrun on Linux), False otherwise; raises RuntimeError when the agent is already gone."""
    setter = getattr(torch.multiprocessing, "_prctl_pr_set_pdeathsig", None)
    if "TORCHELASTIC_RUN_ID" not in os.environ or setter is None or not hasattr(os, "getppid"):
        return False
    parent = os.getppid()
    setter(signal.SIGTERM)
    if parent == 1 or os.getppid() != parent:  # the agent died before the request took effect
        raise RuntimeError("the torchrun agent that started this process has exited")
    return True


def agreed_checkpoint(ckpt_dir: str) -> str | None:
    """The newest ``checkpoint_<iteration>.pt`` in ``ckpt_dir`` as rank 0 sees it, the same on every rank (or None
    to start afresh). Raises RuntimeError on a rank that cannot read that file: a multi-node run that resumes
    needs ``output_dir`` on a filesystem shared by all nodes."""
    if not (dist.is_available() and dist.is_initialized()):
        return latest_checkpoint(ckpt_dir)
    choice = [latest_checkpoint(ckpt_dir) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(choice, src=0)
    path = choice[0]
    if path is not None and not os.path.isfile(path):
        raise RuntimeError(
            f"rank {dist.get_rank()}: rank 0 resumes from {path}, which this node cannot read; put output_dir on "
            "a filesystem shared by all nodes (or start afresh with --resume False)"
        )
    return path


def check_volumes_per_rank(data) -> bool:
    """Raises ValueError when the validation split of ``data`` (a :class:`scripts.engine.data.DataSplit`) has fewer
    volumes than there are processes: validation is split across ranks without padding, so every rank needs at
    least one volume. Returns True otherwise."""
    n_val, n_proc = len(data.val_files), world_size()
    if n_val < n_proc:
        raise ValueError(
            f"the validation split has {n_val} volume(s) but the run has {n_proc} processes, and every process "
            "validates at least one: lower train_frac, add volumes, or use fewer processes"
        )
    return True
