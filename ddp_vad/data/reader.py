"""Reading shards: an in-memory window set, and open_clip-style streaming for training.

Streaming chain: shard list -> seeded per-epoch shard shuffle -> split by node (rank) -> split by worker ->
tar to samples (bad members are warned about and skipped) -> seeded sample shuffle -> decode -> (fold filter)
-> batch. The loader is never passed to ``accelerator.prepare`` (it would re-shard or broadcast): batches are
moved to the device by the training loop.
"""

from __future__ import annotations

import functools
import io
import json
import random
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from ddp_vad.data.shards import load_manifest, shard_paths
from ddp_vad.errors import UserError


# ------------------------------------------------------------------------------------------ samples
def load_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes without copying the payload (read-only view); never unpickles."""
    major = data[6]
    size_bytes = 2 if major == 1 else 4
    header_len = int.from_bytes(data[8 : 8 + size_bytes], "little")
    offset = 8 + size_bytes + header_len
    dtype, shape, fortran = _parse_header(data[:offset])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


@functools.lru_cache(maxsize=64)
def _parse_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fp = io.BytesIO(prefix)
    major, minor = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype, shape, fortran


def decode_sample(sample: dict) -> dict:
    """Raw webdataset sample (bytes per extension) -> {"key", "frames" uint8 [T,H,W], "label", "meta"}."""
    frames = load_npy(sample["frames.npy"])
    return {
        "key": sample["__key__"],
        "frames": frames,
        "label": int(sample["cls"]),
        "meta": json.loads(sample["json"]),
    }


def _tar_members(path: str | Path) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of each regular file of a ustar archive, read with two reads per member.

    Much faster than ``tarfile`` for shards of many small members; the shards are written by
    :class:`ddp_vad.shards.TarShardWriter`. Other tar flavours (pax, GNU long names) go through ``tarfile``.
    """
    with open(path, "rb") as f:
        while True:
            header = f.read(tarfile.BLOCKSIZE)
            if len(header) < tarfile.BLOCKSIZE:
                raise ValueError(f"{path}: truncated tar (no end-of-archive marker)")
            if header.count(0) == tarfile.BLOCKSIZE:
                return
            typeflag = header[156:157]
            if header[257:262] != b"ustar" or typeflag not in (b"0", b"\0", b"5"):
                yield from _tar_members_slow(path)  # not one of ours: let tarfile handle every case
                return
            size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
            payload = f.read(size)
            if len(payload) < size:
                raise ValueError(f"{path}: truncated tar member")
            f.read((-size) % tarfile.BLOCKSIZE)  # padding to the next block
            if typeflag != b"5":
                name = header[0:100].split(b"\0", 1)[0]
                prefix = header[345:500].split(b"\0", 1)[0]
                full = (prefix + b"/" + name if prefix else name).decode()
                yield full, payload


def _tar_members_slow(path: str | Path) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def iter_tar(path: str | Path) -> Iterator[dict]:
    """Decoded samples of one tar, in file order (members of one sample are contiguous)."""
    current: dict = {}
    for name, payload in _tar_members(path):
        key, _, ext = Path(name).name.partition(".")
        if current and current["__key__"] != key:
            yield decode_sample(current)
            current = {}
        current["__key__"] = key
        current[ext] = payload
    if current:
        yield decode_sample(current)


def _shard_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Pipeline stage: shard urls -> decoded samples; a broken shard is reported and skipped, not fatal."""
    for item in src:
        try:
            yield from iter_tar(item["url"])
        except (OSError, ValueError, KeyError) as exc:
            warnings.warn(f"skipping the rest of shard {item['url']}: {exc}", stacklevel=2)


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples into a batch dict of tensors (frames stay uint8: 4x cheaper to move)."""
    return {
        "frames": torch.from_numpy(np.stack([s["frames"] for s in samples])),
        "label": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "key": [s["key"] for s in samples],
        "meta": [s["meta"] for s in samples],
    }


def frames_to_float(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [B,T,H,W] -> float32 [B,T,1,H,W] in [0, 1] (call it after moving the batch to the device)."""
    return frames.unsqueeze(2).to(torch.float32).div_(255.0)


# ----------------------------------------------------------------------------------- in-memory set
@dataclass
class WindowSet:
    """Every window of a shard set in memory, in manifest/tar order (identical on every process and run)."""

    frames: np.ndarray  # uint8 [N, T, H, W]
    labels: np.ndarray  # int64 [N]
    keys: list[str]
    clips: list[str]
    starts: np.ndarray  # int64 [N]
    frame_labels: np.ndarray  # uint8 [N, T]
    fold_window: np.ndarray  # int64 [N]
    fold_clip: np.ndarray  # int64 [N] (-1: protocol unavailable)
    anomaly_types: list[list[str]]
    splits: list[str]
    manifest: dict

    def __len__(self) -> int:
        return len(self.keys)

    def folds(self, protocol: str) -> np.ndarray:
        """Fold index per window under ``protocol`` ("window" or "clip")."""
        if protocol == "window":
            return self.fold_window
        if protocol == "clip":
            if len(self.fold_clip) and self.fold_clip.min() < 0:
                raise UserError(
                    f"protocol 'clip' needs at least {self.manifest['folds']} clips; these shards have "
                    f"{self.manifest['counts']['clips']} (use --protocol window or fewer --folds at build time)"
                )
            return self.fold_clip
        raise UserError(f"unknown protocol {protocol!r} (expected 'window' or 'clip')")

    def subset(self, index: np.ndarray) -> WindowSet:
        """A WindowSet of the selected windows (boolean mask or integer indices)."""
        idx = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return WindowSet(
            frames=self.frames[idx],
            labels=self.labels[idx],
            keys=[self.keys[i] for i in idx],
            clips=[self.clips[i] for i in idx],
            starts=self.starts[idx],
            frame_labels=self.frame_labels[idx],
            fold_window=self.fold_window[idx],
            fold_clip=self.fold_clip[idx],
            anomaly_types=[self.anomaly_types[i] for i in idx],
            splits=[self.splits[i] for i in idx],
            manifest=self.manifest,
        )


def load_window_set(shard_dir: str | Path, show_progress: bool = False) -> WindowSet:
    """Read every shard of ``shard_dir`` into one WindowSet (frames preallocated once, no extra copies)."""
    manifest = load_manifest(shard_dir)
    n = sum(s["samples"] for s in manifest["shards"])
    t, h, w = manifest["window"], manifest["height"], manifest["width"]
    frames = np.empty((n, t, h, w), np.uint8)
    rows = []
    i = 0
    for path in tqdm(shard_paths(shard_dir, manifest), desc="load", unit="shard", disable=not show_progress):
        if not Path(path).is_file():
            raise UserError(f"shard listed in the manifest is missing: {path}")
        for sample in iter_tar(path):
            if i >= n:
                raise UserError(f"{shard_dir} holds more samples than its manifest lists ({n})")
            frames[i] = sample["frames"]
            rows.append((sample["key"], sample["label"], sample["meta"]))
            i += 1
    if i != n:
        raise UserError(f"{shard_dir}: read {i} samples, manifest lists {n} (run `ddp_vad shard info --verify`)")
    metas = [meta for _, _, meta in rows]
    return WindowSet(
        frames=frames,
        labels=np.array([label for _, label, _ in rows], np.int64),
        keys=[key for key, _, _ in rows],
        clips=[m["clip"] for m in metas],
        starts=np.array([m["start"] for m in metas], np.int64),
        frame_labels=np.array([m["frame_labels"] for m in metas], np.uint8).reshape(n, t),
        fold_window=np.array([m["fold_window"] for m in metas], np.int64),
        fold_clip=np.array([m["fold_clip"] for m in metas], np.int64),
        anomaly_types=[list(m.get("anomaly_types", [])) for m in metas],
        splits=[m.get("split", "") for m in metas],
        manifest=manifest,
    )


# -------------------------------------------------------------------------------------- streaming
def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _seeded_shuffle(bufsize: int, seed: tuple[int, ...]) -> Callable[[Iterable], Iterator]:
    """Buffer shuffle whose order depends only on ``seed`` and the worker id (reproducible runs)."""

    def stage(src: Iterable) -> Iterator:
        rng = random.Random(hash((*seed, _worker_id())))
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


_SHARD_CACHE: dict[str, list[dict]] = {}


def _cached_samples(src: Iterable[dict]) -> Iterator[dict]:
    """Decoded samples of each shard, read from disk once per process and then served from memory."""
    for item in src:
        url = item["url"]
        if url not in _SHARD_CACHE:
            _SHARD_CACHE[url] = list(iter_tar(url))
        yield from _SHARD_CACHE[url]


def epoch_shards(shard_dir: str | Path, epoch: int, seed: int, shuffle: bool = True) -> list[str]:
    """The shard list of one epoch: a permutation that depends only on (seed, epoch)."""
    urls = shard_paths(shard_dir)
    if shuffle:
        perm = np.random.default_rng([seed, epoch]).permutation(len(urls))
        urls = [urls[i] for i in perm]
    return urls


def stream_batches(
    shard_dir: str | Path,
    batch_size: int,
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
    drop_last: bool = False,
    cache: bool = False,
    pin_memory: bool = False,
) -> Iterable[dict]:
    """One epoch of batches (see the module docstring for the chain).

    ``split="nodes"`` gives each rank a disjoint share of the shards (DDP training); ``split="all"`` gives every
    rank every shard (fold-parallel fine-tuning, with ``fold_filter(meta) -> bool`` selecting samples).
    ``cache=True`` keeps decoded shards in this process's memory across epochs (forces ``workers=0``).
    ``pin_memory=True`` (CUDA only) returns batches in page-locked memory, so that ``.to(device, non_blocking=True)``
    really overlaps the copy with compute (from pageable memory it is synchronous); with workers the DataLoader's
    pin thread does it in the background.
    """
    if split not in ("nodes", "all"):
        raise UserError(f"split must be 'nodes' or 'all', got {split!r}")
    rank, world_size = _rank_and_world(rank, world_size)
    urls = epoch_shards(shard_dir, epoch, seed, shuffle)
    if split == "nodes":
        if len(urls) < world_size:
            raise UserError(
                f"{shard_dir} has {len(urls)} shards for {world_size} processes: some would get no data; "
                "rebuild with a smaller --shard-size"
            )
        urls = urls[rank::world_size]
    if cache:
        workers = 0
    if workers > len(urls):
        warnings.warn(
            f"{len(urls)} shards per process but {workers} loader workers: using {len(urls)} workers "
            "(rebuild with a smaller --shard-size for more parallel reading)",
            stacklevel=2,
        )
        workers = len(urls)

    stages: list = [wds.SimpleShardList(urls), wds.split_by_worker]
    if cache:
        stages.append(_cached_samples)
    else:
        stages.append(_shard_samples)
    if shuffle and shuffle_buffer > 1:
        stages.append(_seeded_shuffle(shuffle_buffer, (seed, epoch, rank)))
    if fold_filter is not None:
        stages.append(wds.select(lambda s: fold_filter(s["meta"])))
    stages.append(wds.batched(batch_size, collation_fn=collate, partial=not drop_last))
    if pin_memory and workers == 0:
        stages.append(_pinned)
    pipeline = wds.DataPipeline(*stages)
    if workers > 0:
        return wds.WebLoader(pipeline, batch_size=None, num_workers=workers, shuffle=False, pin_memory=pin_memory)
    return pipeline


def _pinned(batches: Iterable[dict]) -> Iterator[dict]:
    """Batches with their tensors in page-locked memory (the loader's pin thread does this when there are workers)."""
    for batch in batches:
        yield {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class InfiniteBatches:
    """Endless batches for step-based training: epoch after epoch, each with a fresh shard/sample order.

    Every rank gets an endless stream, so ranks never run dry at different times (no DDP hang). ``epoch`` and
    ``index`` (batches already taken from that epoch) say where the stream is; pass them back as
    ``start_epoch``/``skip_batches`` to resume at exactly the same batch.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        batch_size: int,
        *,
        start_epoch: int = 0,
        skip_batches: int = 0,
        **stream_kwargs,
    ):
        self.shard_dir, self.batch_size, self.stream_kwargs = shard_dir, batch_size, stream_kwargs
        self.epoch, self.index = start_epoch, 0
        self._skip = skip_batches
        self._it: Iterator[dict] | None = None

    def __iter__(self) -> InfiniteBatches:
        return self

    def __next__(self) -> dict:
        for _ in range(3):  # an epoch that yields nothing twice in a row would loop forever
            if self._it is None:
                self._it = iter(stream_batches(self.shard_dir, self.batch_size, epoch=self.epoch, **self.stream_kwargs))
                self.index = 0
                while self._skip > 0:
                    self._skip -= 1
                    if next(self._it, None) is None:
                        break
                    self.index += 1
            batch = next(self._it, None)
            if batch is not None:
                self.index += 1
                return batch
            self._it = None
            self.epoch += 1
        raise UserError(f"{self.shard_dir} gives this process no full batch of {self.batch_size} samples")


def infinite_batches(
    shard_dir: str | Path,
    batch_size: int,
    *,
    seed: int = 0,
    start_epoch: int = 0,
    skip_batches: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 0,
    drop_last: bool = True,
    cache: bool = False,
    shuffle_buffer: int = 1000,
    pin_memory: bool = False,
) -> InfiniteBatches:
    """Endless version of :func:`stream_batches` with ``split="nodes"`` (see :class:`InfiniteBatches`)."""
    return InfiniteBatches(
        shard_dir,
        batch_size,
        start_epoch=start_epoch,
        skip_batches=skip_batches,
        seed=seed,
        split="nodes",
        rank=rank,
        world_size=world_size,
        workers=workers,
        drop_last=drop_last,
        cache=cache,
        shuffle_buffer=shuffle_buffer,
        pin_memory=pin_memory,
    )
