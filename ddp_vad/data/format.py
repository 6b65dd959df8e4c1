"""The on-disk shard format (``ddp_vad-shards/2``): blocks of frames stored once, and the manifest.

A shard set is ``OUT/{dataset}-{000000..}.tar`` plus ``OUT/manifest.json``. Each tar holds *blocks*: runs of
consecutive frames of one clip, two members each (webdataset layout, key ``{clip}_{first:04d}``):

- ``{key}.frames.npy``: uint8 [F, H, W], the block's frames (no pickle);
- ``{key}.json``: {"clip", "split", "anomaly_types", "first_frame", "window", "frame_labels": [F x 0/1],
  "windows": {"start", "label", "kept", "fold_window", "fold_clip", "fold_leakfree"}} (one list entry per window
  of the block; ``kept`` and the window/clip folds describe the method's balanced set, ``fold_leakfree`` the
  leak-free protocol's set (-1 outside it); windows of train clips are all stored, for the leak-free GAN).

A window is ``frames[start - first_frame : start - first_frame + window]``: readers expand blocks into windows
as views, so every frame is stored (and read) about once. Only kept windows (after balancing) are seen by the
stages; a window's key is ``{clip}_{start:04d}``. docs/shard-format.md describes the format and its figures.
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_vad.data.tario import tar_members
from ddp_vad.errors import UserError
from ddp_vad.warn import warn

FORMAT = "ddp_vad-shards/2"
MANIFEST = "manifest.json"
FRAMES, META = "frames.npy", "json"
WINDOW_FIELDS = ("start", "label", "kept", "fold_window", "fold_clip", "fold_leakfree")
SELECTIONS = ("kept", "leakfree", "train", "leakfree+train")  # which windows a reader yields: see Block.positions


# ----------------------------------------------------------------------------------------------- blocks
@dataclass
class Block:
    """One block: consecutive frames of one clip and the metadata of every window inside them."""

    key: str
    clip: str
    split: str
    anomaly_types: list[str]
    first: int  # 0-based index (in its clip) of frames[0]
    window: int
    frames: np.ndarray | None  # uint8 [F, H, W]; None when read without frames
    frame_labels: np.ndarray  # uint8 [F]
    start: np.ndarray  # int64 [M], window starts (clip frame index)
    label: np.ndarray  # int64 [M]
    kept: np.ndarray  # bool [M]
    fold_window: np.ndarray  # int64 [M], -1 where not kept
    fold_clip: np.ndarray  # int64 [M], -1 where not kept or the protocol is unavailable
    fold_leakfree: np.ndarray  # int64 [M], -1 outside the leak-free set (every window of the test clips)

    @property
    def n_kept(self) -> int:
        """Number of kept windows (the ones the stages see)."""
        return int(self.kept.sum())

    def positions(self, select: str = "kept") -> np.ndarray:
        """Positions of the windows a stage reads: ``kept`` (the method's balanced set, used by the window and clip
        protocols), ``leakfree`` (the leak-free protocol's labelled set, test clips only) or ``train`` (every window
        of a train clip: the unlabelled normal footage the leak-free GAN pretrains on) or ``leakfree+train`` (both)."""
        if select == "kept":
            return np.flatnonzero(self.kept)
        if select == "leakfree":
            return np.flatnonzero(self.fold_leakfree >= 0)
        if select == "train":
            return np.arange(len(self.start)) if self.split == "train" else np.zeros(0, np.int64)
        if select == "leakfree+train":  # both, in block order (a train clip's windows are never in the labelled set)
            return np.arange(len(self.start)) if self.split == "train" else np.flatnonzero(self.fold_leakfree >= 0)
        raise ValueError(f"unknown window selection {select!r} (one of {', '.join(SELECTIONS)})")

    def window_key(self, j: int) -> str:
        """Key of window ``j``: ``{clip}_{start:04d}``."""
        return f"{self.clip}_{int(self.start[j]):04d}"

    def window_frames(self, j: int) -> np.ndarray:
        """Frames of window ``j`` (uint8 [T, H, W]), a view into the block."""
        o = int(self.start[j]) - self.first
        return self.frames[o : o + self.window]

    def window_sample(self, j: int) -> dict:
        """Window ``j`` as a sample {"key", "frames", "label", "meta"} (the meta of the v1 per-window json)."""
        o = int(self.start[j]) - self.first
        meta = {
            "clip": self.clip,
            "start": int(self.start[j]),
            "frame_labels": self.frame_labels[o : o + self.window].tolist(),
            "anomaly_types": list(self.anomaly_types),
            "split": self.split,
            "fold_window": int(self.fold_window[j]),
            "fold_clip": int(self.fold_clip[j]),
            "fold_leakfree": int(self.fold_leakfree[j]),
        }
        frames = None if self.frames is None else self.frames[o : o + self.window]
        return {"key": self.window_key(j), "frames": frames, "label": int(self.label[j]), "meta": meta}


def npy_parts(array: np.ndarray) -> list:
    """The .npy encoding of ``array`` as [header bytes, raw buffer] (no pickle, no copy of the data)."""
    array = np.ascontiguousarray(array)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return [header.getvalue(), array]


def load_npy(data: bytes) -> np.ndarray:
    """Decode .npy bytes without copying the payload (read-only view); never unpickles."""
    if data[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy payload")
    size_bytes = 2 if data[6] == 1 else 4
    offset = 8 + size_bytes + int.from_bytes(data[8 : 8 + size_bytes], "little")
    dtype, shape, fortran = _parse_header(bytes(data[:offset]))
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed in shards")
    array = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=offset)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


@functools.lru_cache(maxsize=64)
def _parse_header(prefix: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fp = io.BytesIO(prefix)
    major, _ = np.lib.format.read_magic(fp)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(fp)
    return dtype, shape, fortran


def encode_block(block: Block) -> dict:
    """A webdataset sample for ``block``: {"__key__", "frames.npy": [header, buffer], "json": bytes}."""
    meta = {
        "clip": block.clip,
        "split": block.split,
        "anomaly_types": list(block.anomaly_types),
        "first_frame": int(block.first),
        "window": int(block.window),
        "frame_labels": np.asarray(block.frame_labels).astype(int).tolist(),
        "windows": {f: np.asarray(getattr(block, f)).astype(int).tolist() for f in WINDOW_FIELDS},
    }
    return {"__key__": block.key, FRAMES: npy_parts(block.frames), META: json.dumps(meta).encode()}


def decode_block(key: str, members: dict[str, bytes | None], shape: tuple[int, int, int]) -> Block:
    """Decode and check one block (``shape`` = (window, H, W) of the shard set); ValueError names what is wrong."""
    try:
        meta = json.loads(members[META])
        windows = meta["windows"]
        n = len(windows["start"])
        cols = {f: np.asarray(windows[f] if f in windows else [-1] * n, np.int64) for f in WINDOW_FIELDS}
        frame_labels = np.asarray(meta["frame_labels"], np.uint8)
        block = Block(
            key=key,
            clip=str(meta["clip"]),
            split=str(meta["split"]),
            anomaly_types=[str(t) for t in meta["anomaly_types"]],
            first=int(meta["first_frame"]),
            window=int(meta["window"]),
            frames=None if members[FRAMES] is None else load_npy(members[FRAMES]),
            frame_labels=frame_labels,
            kept=cols.pop("kept").astype(bool),
            **cols,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"block {key}: unreadable ({type(exc).__name__}: {exc})") from None
    _check_block(block, shape)
    return block


def _check_block(b: Block, shape: tuple[int, int, int]) -> None:
    window, height, width = shape
    n = len(b.frame_labels)
    problem = None
    if b.window != window:
        problem = f"window {b.window}, the manifest says {window}"
    elif b.frames is not None and (b.frames.dtype != np.uint8 or b.frames.shape != (n, height, width)):
        problem = f"frames {b.frames.shape} {b.frames.dtype}, expected ({n}, {height}, {width}) uint8"
    elif len({len(getattr(b, f)) for f in WINDOW_FIELDS}) != 1 or not len(b.start):
        problem = "window lists of different lengths"
    elif b.start[0] < b.first or b.start[-1] + window > b.first + n or (np.diff(b.start) <= 0).any():
        problem = f"window starts outside frames {b.first}..{b.first + n - 1}"
    elif not (b.kept.any() or (b.fold_leakfree >= 0).any() or b.split == "train"):
        problem = "no window that any protocol uses"
    elif not np.isin(b.label, (0, 1)).all():
        problem = "labels other than 0/1"
    if problem:
        raise ValueError(f"block {b.key}: {problem}")


def read_shard(path: str | Path, shape: tuple[int, int, int], frames: bool = True) -> Iterator[Block]:
    """The blocks of one tar, in file order (the one tar reader of the toolkit).

    A block whose members cannot be decoded is skipped and the others are still read; a broken tar structure
    stops the shard. Either way a ValueError (or OSError) is raised at the end, after the good blocks.
    """
    problems: list[str] = []
    key, members = None, {}
    want = None if frames else (lambda name: not name.endswith("." + FRAMES))
    for name, payload in tar_members(path, want):
        k, _, ext = Path(name).name.partition(".")
        if key is not None and k != key:
            block, problem = _decode_or_problem(key, members, shape)
            if block is not None:
                yield block
            problems += [problem] if problem else []
            members = {}
        if ext not in (FRAMES, META) or ext in members:
            raise ValueError(f"unexpected member {name}")
        key, members[ext] = k, payload
    if key is not None:
        block, problem = _decode_or_problem(key, members, shape)
        if block is not None:
            yield block
        problems += [problem] if problem else []
    if problems:
        raise ValueError(problems[0] if len(problems) == 1 else f"{problems[0]} (and {len(problems) - 1} more)")


def _decode_or_problem(key: str, members: dict, shape: tuple[int, int, int]) -> tuple[Block | None, str | None]:
    if set(members) != {FRAMES, META}:
        return None, f"block {key}: members {sorted(members)}, expected {[FRAMES, META]}"
    try:
        return decode_block(key, members, shape), None
    except ValueError as exc:
        return None, str(exc)


# ------------------------------------------------------------------------------------------- damage
class ShardDamaged(Exception):
    """A shard that is missing or cannot be read whole; ``lost`` of its ``expected`` windows were not read."""

    def __init__(self, path: str, reason: str, lost: int, expected: int):
        super().__init__(path, reason, lost, expected)  # picklable: crosses from loader workers
        self.path, self.reason, self.lost, self.expected = path, reason, lost, expected

    def __str__(self) -> str:
        return f"damaged shard {self.path} ({self.reason}): {self.lost} of {self.expected} windows lost"

    def refusal(self, shard_dir: str | Path) -> UserError:
        """The one-line error of readers that need every window (in-memory sets, cross-validation, evaluation)."""
        return UserError(
            f"{self}; this needs every window (a missing shard would silently change the folds): "
            f"check the set with `ddp_vad shard info {shard_dir} --verify` and rebuild with `ddp_vad shard build`"
        )


_REPORTED: set[str] = set()


def report_damaged(exc: ShardDamaged) -> None:
    """Warn about a damaged shard that is skipped, once per shard and process."""
    if exc.path not in _REPORTED:
        _REPORTED.add(exc.path)
        warn(f"{exc}; skipping it (check with `ddp_vad shard info DIR --verify`)")


def iter_shard(shard_dir: str | Path, entry: dict, manifest: dict, frames: bool = True) -> Iterator[Block]:
    """The blocks of the manifest's shard ``entry``; raises ShardDamaged (after the readable blocks) when the shard
    is missing, broken, or holds another number of windows than the manifest lists."""
    path = Path(shard_dir) / entry["name"]
    expected, got = int(entry["samples"]), 0
    shape = (manifest["window"], manifest["height"], manifest["width"])
    if not path.is_file():
        raise ShardDamaged(str(path), "missing", expected, expected)
    try:
        for block in read_shard(path, shape, frames):
            got += block.n_kept
            yield block
    except (OSError, ValueError) as exc:
        raise ShardDamaged(str(path), str(exc), max(expected - got, 0), expected) from None
    if got != expected:
        lost = max(expected - got, 0)
        raise ShardDamaged(str(path), f"holds {got} windows, the manifest lists {expected}", lost, expected)
