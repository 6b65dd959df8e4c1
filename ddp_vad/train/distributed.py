"""Process-group sanity checks, main-process printing and seeding for Accelerate-launched stages."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch

from ddp_vad.errors import UserError, error_message
from ddp_vad.warn import warn

ALLOW_NO_PG_ENV = "DDP_VAD_ALLOW_NO_PROCESS_GROUP"
PRECISIONS = ("no", "bf16", "fp16")  # accelerate's mixed-precision names
GROUP_TIMEOUT_ENV = "DDP_VAD_GROUP_TIMEOUT"
DEFAULT_GROUP_TIMEOUT_S = 600.0
PATIENT_TIMEOUT = timedelta(hours=24)
_T = TypeVar("_T")


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
            warn(message)
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
    Forming the process group (and the :func:`patient_group`) is bounded by :func:`group_formation_timeout`.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = ProjectConfiguration(project_dir=project_dir, automatic_checkpoint_naming=False)
    if _needs_cpu_group():
        kwargs.setdefault("cpu", True)
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    if not any(isinstance(h, InitProcessGroupKwargs) for h in handlers):
        handlers.append(InitProcessGroupKwargs(timeout=group_formation_timeout()))
    accelerator = _form_group(
        "the process group",
        lambda: Accelerator(
            mixed_precision=mixed_precision,
            log_with=None,
            project_config=project,
            kwargs_handlers=handlers,
            **kwargs,
        ),
    )
    patient_group()  # formed now, while every rank is here (see patient_group)
    return accelerator


def process_state():
    """accelerate's ``PartialState`` (rank, main process, barriers) under the same CPU rule and formation timeout
    as :func:`make_accelerator`; refuses several launched processes that form no group."""
    from accelerate import PartialState

    kwargs = {"cpu": True} if _needs_cpu_group() else {}
    state = _form_group("the process group", lambda: PartialState(timeout=group_formation_timeout(), **kwargs))
    check_process_group(state.num_processes)
    patient_group()
    return state


def group_formation_timeout() -> timedelta:
    """How long forming a process group may take: ``DDP_VAD_GROUP_TIMEOUT`` seconds, default 600.

    Only formation is bounded by this: a peer that cannot be reached (wrong network interface, MASTER_ADDR,
    firewall) is then an error within minutes. Waits on a formed group keep their own timeout (torch's default,
    24 h for :func:`patient_group`).
    """
    raw = os.environ.get(GROUP_TIMEOUT_ENV, "").strip()
    if not raw:
        return timedelta(seconds=DEFAULT_GROUP_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0:
        raise UserError(f"{GROUP_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def group_formation_hint(what: str, exc: BaseException) -> str:
    """One line explaining a process group that could not form, naming the settings that usually cause it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = first if len(first) <= 200 else first[:197] + "..."
    timeout = group_formation_timeout().total_seconds()
    return (
        f"{what} could not form within {timeout:g} s ({type(exc).__name__}: {first}); check that every process "
        "was started and that MASTER_ADDR/MASTER_PORT reach the first node, and set GLOO_SOCKET_IFNAME and "
        f"NCCL_SOCKET_IFNAME to the network interface the nodes share ({GROUP_TIMEOUT_ENV} sets this timeout)"
    )


def _form_group(what: str, create: Callable[[], _T]) -> _T:
    """Run ``create`` (which forms a process group); a distributed/connection error becomes a one-line UserError.

    The default group's operation timeout is restored to torch's default for its backend afterwards: the short
    timeout is for forming the group only.
    """
    dist = torch.distributed
    was_initialized = dist.is_available() and dist.is_initialized()
    try:
        result = create()
    except UserError:
        raise
    except (RuntimeError, TimeoutError, ConnectionError, ValueError) as exc:
        # DistError (store/network timeouts) and gloo's connect errors are RuntimeErrors; only errors raised while a
        # group forms get the hint (a plain Accelerator/PartialState mistake keeps its own message).
        if not _looks_like_formation_error(exc):
            raise
        raise UserError(group_formation_hint(what, exc)) from None
    if not was_initialized and dist.is_available() and dist.is_initialized():
        from torch.distributed.distributed_c10d import _get_default_timeout, _set_pg_timeout

        _set_pg_timeout(_get_default_timeout(dist.get_backend()))
    return result


def _looks_like_formation_error(exc: BaseException) -> bool:
    if isinstance(exc, torch.distributed.DistError | TimeoutError | ConnectionError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("timed out", "timeout", "connect", "gloo", "nccl", "socket", "store"))


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
    the others, so nobody waits that long for a dead peer. Forming the group is a collective bounded by
    :func:`group_formation_timeout` (gloo connects over GLOO_SOCKET_IFNAME: a wrong interface would otherwise hang
    for the full 24 h); :func:`make_accelerator` and :func:`process_state` form it at once, while every rank is
    there, so a later first wait (one rank busy for an hour) does not count against formation.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    key = id(dist.group.WORLD)  # one per process group (``ddp_vad pipeline`` runs several stages in one)
    if key not in _PATIENT_GROUPS:
        from torch.distributed.distributed_c10d import _set_pg_timeout

        group = _form_group(
            "the gloo side group", lambda: dist.new_group(backend="gloo", timeout=group_formation_timeout())
        )
        _set_pg_timeout(PATIENT_TIMEOUT, group)  # formed: from now on only waits, which may be long
        _PATIENT_GROUPS[key] = group
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


def object_group(world: int):
    """The group for gathering Python objects between stages' ranks: the long-timeout gloo group (ranks whose work
    ends early wait there while others still train), or None for one process."""
    return None if world == 1 else patient_group()


def all_gather_objects(obj: Any, group, world: int) -> list[Any]:
    """Every process's ``obj``, in rank order (every process must call this)."""
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj, group=group)
    return out


def raise_agreed(error: str | None, group, world: int) -> None:
    """Raise the first error any process found, on every process, so none is left waiting at a collective alone."""
    errors = [e for e in all_gather_objects(error, group, world) if e]
    if errors:
        raise UserError(errors[0])


def decide_on_main(decide: Callable[[], _T], is_main: bool, group, world: int) -> _T:
    """Run ``decide`` on the main process only and hand its result to every process.

    For decisions that read files (which checkpoint to resume from): nodes without a shared filesystem would each
    see their own folder and decide differently. A UserError on the main process stops every process.
    """
    value, error = None, None
    if is_main:
        try:
            value = decide()
        except UserError as exc:
            error = str(exc)
    value, error = all_gather_objects((value, error), group, world)[0]  # rank 0 is the main process
    if error:
        raise UserError(error)
    return value


@contextlib.contextmanager
def main_lock(folder: str | os.PathLike, what: str, is_main: bool, group, world: int) -> Iterator[None]:
    """:func:`ddp_vad.runlock.run_lock` taken by the main process only; every process stops when it is refused."""
    from ddp_vad.runlock import run_lock

    with contextlib.ExitStack() as stack:
        error = None
        if is_main:
            try:
                stack.enter_context(run_lock(folder, what))
            except (UserError, OSError) as exc:  # refused, or --out under a regular file: tell every process
                error = error_message(exc)
        raise_agreed(error, group, world)
        yield


def main_process_only(run: Callable[[], _T], what: str) -> _T | None:
    """Run a stage that is not distributed (synth, shard build, baselines, evaluate) on the main process only.

    Under a launcher with several processes the others wait (on the long-timeout group) and return None; an error
    on the main process stops every process with the same message, so none waits forever.
    """
    if launched_world_size() <= 1:
        return run()
    state = process_state()
    world = state.num_processes
    value, failure = None, None
    if state.is_main_process:
        print(f"{what}: {world} processes were launched; the main process does the work, the others wait",
              file=sys.stderr, flush=True)  # fmt: skip
        try:
            value = run()
        except Exception as exc:  # told to the others below, then raised here unchanged (the CLI formats it)
            failure = exc
    error = None if failure is None else error_message(failure)
    errors = [e for e in all_gather_objects(error, object_group(world), world) if e]
    if failure is not None:
        raise failure
    if errors:
        raise UserError(errors[0])
    return value
