"""Process-group sanity checks, main-process printing and seeding for Accelerate-launched stages."""

from __future__ import annotations

import hashlib
import os
import random
import sys
import warnings

import numpy as np
import torch

from ddp_vad.errors import UserError

ALLOW_NO_PG_ENV = "DDP_VAD_ALLOW_NO_PROCESS_GROUP"


def launched_world_size() -> int:
    """How many processes the launcher says it started (torchrun / accelerate set WORLD_SIZE), else 1."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def check_process_group(num_processes: int) -> None:
    """Refuse to run when several processes were launched but this one is not part of a process group.

    ``accelerate launch --multi_gpu`` on a machine without GPUs starts N independent processes that each train
    alone and overwrite each other's files. Set DDP_VAD_ALLOW_NO_PROCESS_GROUP=1 to only warn.
    """
    launched = launched_world_size()
    if launched > 1 and num_processes == 1:
        message = (
            f"{launched} processes were launched (WORLD_SIZE={launched}) but no process group was initialised: "
            "each process would train alone and overwrite the others' files. On CPU use "
            "`torchrun --nproc_per_node N -m ddp_vad ...` (gloo); on GPUs check CUDA_VISIBLE_DEVICES and the "
            f"accelerate config. Set {ALLOW_NO_PG_ENV}=1 to run anyway."
        )
        if os.environ.get(ALLOW_NO_PG_ENV, "") not in ("", "0"):
            warnings.warn("WARNING: " + message, stacklevel=2)
            print("WARNING: " + message, file=sys.stderr, flush=True)
            return
        raise UserError(message)


def check_shard_count(num_shards: int, num_processes: int, workers: int, is_main: bool = True) -> None:
    """Error when the set lists no shard; when shards < processes x loader workers the stream splits by sample
    instead of by shard (no rank or worker goes without data), and the main process says so once."""
    from ddp_vad.data.stream import announce_split

    announce_split(num_shards, num_processes, workers, is_main)


def print_main(is_main: bool, *args, **kwargs) -> None:
    """``print`` on the main process only (flushes, so logs of several processes interleave sanely)."""
    if is_main:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (all devices) with ``seed + rank`` (rank > 0 gives per-process streams)."""
    s = int(seed) + int(rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def state_dict_sha256(module: torch.nn.Module | dict) -> str:
    """Hash of a module's (or state dict's) tensors by name, dtype, shape and bytes: equal on every replica."""
    state = module if isinstance(module, dict) else module.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def make_accelerator(mixed_precision: str | None = None, project_dir: str | None = None, **kwargs):
    """A fresh ``Accelerator`` for one stage.

    Accelerate keeps its settings in a process-wide singleton that refuses a second, different mixed precision;
    stages run one after another in one process (``ddp_vad pipeline``, tests), so the accelerator/gradient state
    (not the process group) is reset first. ``mixed_precision=None`` takes accelerate's config/environment.
    Several processes on a machine without an accelerator get ``cpu=True``: accelerate only forms a gloo process
    group (MULTI_CPU) when asked for the CPU; otherwise torchrun would start N independent trainings.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = ProjectConfiguration(project_dir=project_dir, automatic_checkpoint_naming=False)
    if _needs_cpu_group():
        kwargs.setdefault("cpu", True)
    return Accelerator(mixed_precision=mixed_precision, log_with=None, project_config=project, **kwargs)


def process_state():
    """accelerate's ``PartialState`` (rank, main process, barriers) under the same CPU rule as
    :func:`make_accelerator`; refuses several launched processes that form no group."""
    from accelerate import PartialState

    state = PartialState(**({"cpu": True} if _needs_cpu_group() else {}))
    check_process_group(state.num_processes)
    return state


def _needs_cpu_group() -> bool:
    """Several processes on a machine without an accelerator: only a CPU (gloo) state joins them."""
    return launched_world_size() > 1 and not has_accelerator()


def has_accelerator() -> bool:
    """Whether torch sees a GPU-like device (CUDA, XPU, MPS, ...)."""
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return bool(api.is_available())
    return torch.cuda.is_available()


_PATIENT_GROUPS: dict[int, object] = {}


def patient_group():
    """A gloo group with a 24 h timeout over every process (None without a process group).

    For waits that may outlast the default (NCCL) timeout: ranks whose folds finish early, or ranks waiting while
    the main process builds shards or fits baselines. A process that fails makes torchrun / accelerate launch stop
    the others, so nobody waits that long for a dead peer.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    key = id(dist.group.WORLD)  # one per process group (``ddp_vad pipeline`` runs several stages in one)
    if key not in _PATIENT_GROUPS:
        from datetime import timedelta

        _PATIENT_GROUPS[key] = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    return _PATIENT_GROUPS[key]


def patient_barrier() -> None:
    """Wait for every process on :func:`patient_group` (a no-op without a process group)."""
    group = patient_group()
    if group is not None:
        torch.distributed.barrier(group=group)


def shutdown_process_group(clean: bool = True) -> None:
    """Destroy every process group this process joined (a no-op without one).

    Left to interpreter exit, gloo's worker threads can be torn down while still joinable and the process dies
    with SIGABRT ("terminate called without an active exception") after its work is done. ``clean`` first waits
    for every rank, so none tears its group down while a peer still talks to it; after an error only this
    process's groups go (a barrier could wait for a rank that already failed).
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        patient_barrier()
    dist.destroy_process_group()
    _PATIENT_GROUPS.clear()


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank; a no-op without a process group.

    DDP broadcasts buffers at the start of each forward, so after the last step the replicas' running statistics
    still differ; call this before exporting so every replica holds exactly what is written.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for buf in module.buffers():
        torch.distributed.broadcast(buf.data, src=src)
