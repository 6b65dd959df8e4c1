"""Streaming windows for training, open_clip style, from shards of blocks.

Chain: the epoch's shard list (seeded shuffle) -> split by node (rank) -> split by loader worker -> tar to blocks
(a damaged shard is reported once and skipped) -> [loader workers hand whole blocks to the main process] -> blocks
expanded into windows (views) -> seeded buffer shuffle (a batch mixes blocks and clips) -> (fold filter) -> batch.
Workers move each frame once (as part of a block), not once per window that holds it.

Only the shards that hold windows of the selection are dealt (the leak-free GAN's ``train`` windows sit in a few
shards: dealing every shard would leave a process epochs with none). When a rank has fewer of them than loader
workers to feed (shards < processes x workers) the split is by sample instead: every worker of every rank reads
every such shard and keeps every (P x W)-th window, deterministically. Either way every process and worker gets a
share of the selected windows every epoch.

The loader is never passed to ``accelerator.prepare`` (it would re-shard or broadcast): batches are moved to the
device by the training loop.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader

from ddp_vad.data.format import ShardDamaged, iter_shard, report_damaged
from ddp_vad.data.manifest import load_manifest
from ddp_vad.errors import UserError
from ddp_vad.warn import warn


def collate(samples: list[dict]) -> dict:
    """Stack window samples into a batch dict of tensors (frames stay uint8: 4x cheaper to move)."""
    return {
        "frames": torch.from_numpy(np.stack([s["frames"] for s in samples])),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B,T,H,W] -> float32 [B,T,1,H,W] in [0, 1] (call it after moving the batch to the device)."""
    return frames.unsqueeze(2).to(torch.float32).div_(255.0)


# ------------------------------------------------------------------------------------------ splitting
def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def split_mode(num_shards: int, processes: int, workers: int) -> str:
    """The split of the windows: "shards" when every loader worker of every process gets a shard, else "samples"."""
    if num_shards == 0:
        raise UserError("the shard set lists no shards; rebuild it with `ddp_vad shard build`")
    return "shards" if num_shards >= processes * max(workers, 1) else "samples"


_ANNOUNCED: set[tuple[int, int, int]] = set()


def announce_split(num_shards: int, processes: int, workers: int, is_main: bool = True) -> str:
    """Return :func:`split_mode`; when the split is by sample, the main process says so once (per process and
    shard/process/worker count: the pretraining check and every epoch's stream share one message)."""
    mode = split_mode(num_shards, processes, workers)
    if mode == "samples" and is_main and (num_shards, processes, workers) not in _ANNOUNCED:
        _ANNOUNCED.add((num_shards, processes, workers))
        readers = processes * max(workers, 1)
        message = (
            f"{num_shards} shard(s) < {processes} process(es) x {max(workers, 1)} loader worker(s): splitting by "
            f"sample (every process reads every shard and keeps every {readers}-th window); rebuild with a smaller "
            "--shard-size to split by shard"
        )
        warn(message)
    return mode


# ------------------------------------------------------------------------------------------- stages
def _read_one(item: dict) -> Iterator:
    """Blocks of one shard; a damaged shard ends with its ShardDamaged (reported by the main process)."""
    try:
        yield from iter_shard(item["dir"], item["entry"], item["manifest"])
    except ShardDamaged as exc:
        yield exc


def _read_blocks(src: Iterable[dict]) -> Iterator:
    for item in src:
        yield from _read_one(item)


_BLOCK_CACHE: dict[str, list] = {}


def _cached_blocks(src: Iterable[dict]) -> Iterator:
    """Like _read_blocks, but each shard is read from disk once per process and then served from memory."""
    for item in src:
        # The sha256 in the key: a set rebuilt in the same folder is not served from a stale cache.
        url = f"{Path(item['dir']) / item['entry']['name']}@{item['entry']['sha256']}"
        if url not in _BLOCK_CACHE:
            _BLOCK_CACHE[url] = list(_read_one(item))
        yield from _BLOCK_CACHE[url]


def _select(src: Iterable, rank: int, world: int, by_sample: bool, select: str = "kept") -> Iterator:
    """(block, positions of the windows this reader emits); by sample: every (P x W)-th selected window."""
    worker, workers = _worker()
    slot, stride, n = rank * workers + worker, world * workers, 0
    for item in src:
        if isinstance(item, ShardDamaged):
            yield item
            continue
        pos = item.positions(select)
        if by_sample:
            pos, n = pos[(n + np.arange(len(pos))) % stride == slot], n + len(pos)
        if len(pos):
            yield item, pos


def _to_shared(src: Iterable) -> Iterator:
    """In a loader worker: block frames as torch tensors, which the DataLoader hands over in shared memory (one
    copy) instead of pickling them through a pipe (three)."""
    for item in src:
        if not isinstance(item, ShardDamaged):
            item[0].frames = torch.from_numpy(item[0].frames)
        yield item


def _expand(src: Iterable) -> Iterator[dict]:
    """Blocks -> window samples (frames are views into the block); damaged shards are reported here, once."""
    for item in src:
        if isinstance(item, ShardDamaged):
            report_damaged(item)
            continue
        block, positions = item
        if isinstance(block.frames, torch.Tensor):
            block.frames = block.frames.numpy()
        for j in positions.tolist():
            yield block.window_sample(j)


def _seeded_shuffle(bufsize: int, seed: tuple[int, ...]) -> Callable[[Iterable], Iterator]:
    """Buffer shuffle whose order depends only on ``seed`` (reproducible runs)."""

    def stage(src: Iterable) -> Iterator:
        rng = random.Random(hash(seed))
        buf: list = []
        for item in src:
            buf.append(item)
            if len(buf) >= bufsize:
                j = rng.randrange(len(buf))
                buf[j], buf[-1] = buf[-1], buf[j]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    return stage


def _as_is(item):
    return item


# ------------------------------------------------------------------------------------------ epochs
_HOLDS: dict[tuple[str, str], bool] = {}


def _holds(shard_dir: str | Path, entry: dict, manifest: dict, select: str) -> bool:
    """Whether a shard holds ``select`` windows: the manifest says for ``kept``, else its blocks' metadata (read once
    per process, no pixels). An unreadable shard counts as holding: dealt, then reported and skipped as before."""
    if select == "kept":
        return int(entry["samples"]) > 0
    key = (f"{Path(shard_dir) / entry['name']}@{entry['sha256']}", select)
    if key not in _HOLDS:
        try:
            _HOLDS[key] = any(len(b.positions(select)) for b in iter_shard(shard_dir, entry, manifest, frames=False))
        except ShardDamaged:
            _HOLDS[key] = True
    return _HOLDS[key]


def shards_holding(shard_dir: str | Path, manifest: dict, select: str = "kept") -> list[dict]:
    """The manifest's shard entries that hold windows of ``select`` (the shards a training stream deals)."""
    return [entry for entry in manifest["shards"] if _holds(shard_dir, entry, manifest, select)]


def _epoch_items(
    shard_dir: str | Path, manifest: dict, epoch: int, seed: int, shuffle: bool, select: str | None = None
) -> list[dict]:
    """The epoch's shards (seeded permutation of the manifest's), only those holding ``select`` windows if given."""
    items = [{"dir": str(shard_dir), "entry": entry, "manifest": manifest} for entry in manifest["shards"]]
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(items))
        items = [items[i] for i in perm]
    if select is not None:
        items = [it for it in items if _holds(shard_dir, it["entry"], manifest, select)]
    return items


def epoch_shards(
    shard_dir: str | Path, epoch: int, seed: int, shuffle: bool = True, select: str | None = None
) -> list[str]:
    """The shard list of one epoch: a permutation that depends only on (seed, epoch); with ``select``, only the
    shards holding such windows (what ``split="nodes"`` deals: rank r reads entries r, r + P, ...)."""
    items = _epoch_items(shard_dir, load_manifest(shard_dir), epoch, seed, shuffle, select)
    return [str(Path(shard_dir) / it["entry"]["name"]) for it in items]


def stream_batches(
    shard_dir: str | Path,
    batch_size: int,
    *,
    drop_last: bool = False,
    pin_memory: bool = False,
    **window_kwargs,
) -> Iterable[dict]:
    """One epoch of batches (see the module docstring for the chain): :func:`stream_windows` batched.

    ``drop_last=True`` drops the epoch's last, partial batch. ``pin_memory=True`` (CUDA only) returns batches in
    page-locked memory, so that ``.to(device, non_blocking=True)`` really is asynchronous.
    """
    stages = [stream_windows(shard_dir, **window_kwargs), wds.batched(batch_size, collation_fn=collate,
                                                                      partial=not drop_last)]  # fmt: skip
    if pin_memory:
        stages.append(_pinned)
    return wds.DataPipeline(*stages)


def stream_windows(
    shard_dir: str | Path,
    *,
    epoch: int = 0,
    seed: int = 0,
    split: str = "nodes",
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 0,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
    fold_filter: Callable[[dict], bool] | None = None,
    cache: bool = False,
    select: str = "kept",
) -> Iterable[dict]:
    """One epoch of window samples (unbatched; see the module docstring for the chain).

    ``split="nodes"`` gives each rank a disjoint share of the windows (DDP training): by shard (of the shards holding
    ``select`` windows), or by sample when those shards < processes x workers. ``split="all"`` gives every rank
    every window (fold-parallel fine-tuning, with ``fold_filter(meta) -> bool`` selecting samples). ``cache=True``
    keeps decoded blocks in this process's memory across epochs (forces ``workers=0``). Damaged shards are reported
    once and skipped. ``select`` picks the windows (``kept``: the method's balanced set; ``train``: every window of
    the train clips, for the leak-free GAN).
    """
    if split not in ("nodes", "all"):
        raise UserError(f"split must be 'nodes' or 'all', got {split!r}")
    rank, world_size = _rank_and_world(rank, world_size)
    workers = 0 if cache else workers
    manifest = load_manifest(shard_dir)
    by_sample = False
    if split == "nodes":  # deal only the shards holding selected windows: no rank is dealt none
        items = _epoch_items(shard_dir, manifest, epoch, seed, shuffle, select)
        if not items:
            raise UserError(f"{shard_dir}: no shard holds '{select}' windows (check `ddp_vad shard info`)")
        by_sample = announce_split(len(items), world_size, workers, is_main=rank == 0) == "samples"
        items = items if by_sample else items[rank::world_size]
    else:
        items = _epoch_items(shard_dir, manifest, epoch, seed, shuffle)
        rank, world_size = 0, 1
        if workers > len(items):  # every rank reads everything: only the workers split, by shard
            warn(f"{shard_dir}: {len(items)} shards but {workers} loader workers: using {len(items)}")
            workers = len(items)

    read = _cached_blocks if cache else _read_blocks
    split_stage = [] if by_sample else [wds.split_by_worker]
    source = functools.partial(iter, items)  # a callable: DataPipeline would splice a list into its stages
    pick = functools.partial(_select, rank=rank, world=world_size, by_sample=by_sample, select=select)
    blocks = [source, *split_stage, read, pick]
    if workers > 0:  # workers read and decode; whole blocks cross to the main process
        pipeline = wds.DataPipeline(*blocks, _to_shared)
        blocks = [DataLoader(pipeline, batch_size=None, num_workers=workers, collate_fn=_as_is)]
    stages = [*blocks, _expand]
    if shuffle and shuffle_buffer > 1:
        stages.append(_seeded_shuffle(shuffle_buffer, (seed, epoch, rank)))
    if fold_filter is not None:
        stages.append(wds.select(lambda s: fold_filter(s["meta"])))
    return wds.DataPipeline(*stages)


def _pinned(batches: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: every tensor of a batch in page-locked memory."""
    for batch in batches:
        yield {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class InfiniteBatches:
    """Endless full batches for step-based training: epoch after epoch, each with a fresh shard/sample order.

    The stream wraps around its epochs: a batch that the end of an epoch leaves short is filled from the next epoch,
    so a rank whose share of an epoch is smaller than a batch (few windows, many processes) still gets full batches
    and every window is used. Every rank gets an endless stream, so ranks never run dry at different times (no DDP
    hang). ``epoch`` and ``index`` (windows already taken from that epoch) say where the stream is; pass them back as
    ``start_epoch``/``skip_samples`` to resume at exactly the same window. Each batch's ``epoch`` lists the epoch
    every window came from.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        batch_size: int,
        *,
        start_epoch: int = 0,
        skip_samples: int = 0,
        pin_memory: bool = False,
        **window_kwargs,
    ):
        self.shard_dir, self.batch_size, self.window_kwargs = shard_dir, batch_size, window_kwargs
        self.pin_memory = pin_memory
        self.epoch, self.index = start_epoch, 0
        self._skip = skip_samples
        self._it: Iterator[dict] | None = None

    def __iter__(self) -> InfiniteBatches:
        return self

    def _open_epoch(self) -> None:
        self._it = iter(stream_windows(self.shard_dir, epoch=self.epoch, **self.window_kwargs))
        self.index = 0
        while self._skip > 0:  # resume: the windows this epoch gave before the checkpoint
            self._skip -= 1
            if next(self._it, None) is None:
                break
            self.index += 1

    def __next__(self) -> dict:
        samples, epochs, empty = [], [], 0
        while len(samples) < self.batch_size:
            if self._it is None:
                self._open_epoch()
            sample = next(self._it, None)
            if sample is None:
                empty = empty + 1 if self.index == 0 else 0
                if empty >= 2:  # two whole epochs without a window: wrapping around would loop forever
                    raise UserError(
                        f"{self.shard_dir} gives this process no windows (epochs {self.epoch - 1} and {self.epoch}): "
                        "every shard it reads is damaged or holds none of the windows it trains on"
                    )
                self._it = None
                self.epoch += 1
                continue
            self.index += 1
            samples.append(sample)
            epochs.append(self.epoch)
        batch = collate(samples)
        batch["epoch"] = epochs
        return next(_pinned([batch])) if self.pin_memory else batch


def infinite_batches(
    shard_dir: str | Path,
    batch_size: int,
    *,
    seed: int = 0,
    start_epoch: int = 0,
    skip_samples: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 0,
    cache: bool = False,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
    select: str = "kept",
) -> InfiniteBatches:
    """Endless full batches from :func:`stream_windows` with ``split="nodes"`` (see :class:`InfiniteBatches`)."""
    return InfiniteBatches(
        shard_dir,
        batch_size,
        start_epoch=start_epoch,
        skip_samples=skip_samples,
        pin_memory=pin_memory,
        seed=seed,
        split="nodes",
        rank=rank,
        world_size=world_size,
        workers=workers,
        cache=cache,
        shuffle_buffer=shuffle_buffer,
        select=select,
    )
