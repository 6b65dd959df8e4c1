"""Reader for the UCSD Anomaly Detection layout (Ped1, Ped2 and the synthetic data written the same way).

Layout (docs/data.md)::

    ROOT/UCSDped1/Train/Train001/001.tif ...
    ROOT/UCSDped1/Test/Test001/001.tif ...        Test/Test001_gt/001.bmp (optional masks)
    ROOT/UCSDped1/Test/UCSDped1.m                 TestVideoFile{end+1}.gt_frame = [60:152];

Clips are found by name, never by position: entry k of the .m file belongs to clip ``Test%03d % k``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ddp_vad.data.sources.base import Dataset
from ddp_vad.data.sources.frames import FrameClip, frame_files, read_frame, resize_frame
from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object

# read_frame / resize_frame / frame_files live in frames.py and stay importable from here.
__all__ = [
    "Clip",
    "UCSDDataset",
    "discover",
    "frame_files",
    "load_anomaly_types",
    "parse_gt_file",
    "read_clip",
    "read_frame",
    "resize_frame",
    "resolve_dataset_dir",
]

FRAME_SUFFIXES = (".tif", ".tiff")
_CLIP_DIR = re.compile(r"^(Train|Test)(\d+)$")
_GT_LINE = re.compile(r"^TestVideoFile\s*\{\s*(?:end\s*\+\s*1|(\d+))\s*\}\s*\.\s*gt_frame\s*=\s*\[(.*)\]\s*;?$")
_GT_RANGE = re.compile(r"^(\d+)(?:\s*:\s*(\d+))?$")


# A UCSD clip is a folder of numbered frames; the dataset is the common one of every layout.
Clip = FrameClip
UCSDDataset = Dataset


def resolve_dataset_dir(path: str | Path, dataset: str | None = None) -> Path:
    """Accept the dataset root (holding UCSDped1/UCSDped2/...) or the dataset folder itself."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data folder not found: {path}")
    if dataset is not None:
        candidate = path if path.name == dataset else path / dataset
        if not _is_dataset_dir(candidate):
            raise UserError(f"no dataset '{dataset}' (a folder with Train/ or Test/) in {path}")
        return candidate
    if _is_dataset_dir(path):
        return path
    found = sorted(p for p in path.iterdir() if p.is_dir() and _is_dataset_dir(p))
    if not found:
        raise UserError(f"no UCSD-style dataset (a folder with Train/ and Test/) in {path}")
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"{path} holds several datasets ({names}); choose one with --dataset")
    return found[0]


def _is_dataset_dir(path: Path) -> bool:
    return path.is_dir() and ((path / "Train").is_dir() or (path / "Test").is_dir())


def parse_gt_file(path: str | Path) -> dict[str, list[tuple[int, int]]]:
    """Parse a UCSD ``.m`` ground-truth file into {clip name: [(first, last), ...]} (1-based, inclusive)."""
    path = Path(path)
    entries: dict[str, list[tuple[int, int]]] = {}
    count = 0
    for lineno, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        line = raw.split("%", 1)[0].strip()
        if not line or re.fullmatch(r"TestVideoFile\s*=\s*\{\s*\}\s*;?", line):
            continue
        match = _GT_LINE.match(line)
        if match is None:
            raise UserError(f"{path}:{lineno}: malformed ground-truth line: {raw.strip()!r}")
        count = int(match.group(1)) if match.group(1) else count + 1
        ranges = []
        body = re.sub(r"\s*:\s*", ":", match.group(2))  # "5 : 90" -> "5:90"
        for part in filter(None, re.split(r"[,;\s]+", body)):
            rng = _GT_RANGE.match(part)
            if rng is None:
                raise UserError(f"{path}:{lineno}: malformed frame range {part!r}")
            first = int(rng.group(1))
            last = int(rng.group(2)) if rng.group(2) else first
            if first < 1 or last < first:
                raise UserError(f"{path}:{lineno}: invalid frame range {part!r} (ranges are 1-based, a <= b)")
            ranges.append((first, last))
        entries[f"Test{count:03d}"] = ranges
    return entries


def _clip_dirs(split_dir: Path, prefix: str) -> list[Path]:
    if not split_dir.is_dir():
        return []
    dirs = [p for p in split_dir.iterdir() if p.is_dir() and (m := _CLIP_DIR.match(p.name)) and m[1] == prefix]
    return sorted(dirs, key=lambda p: int(_CLIP_DIR.match(p.name)[2]))


def _find_gt_file(test_dir: Path, name: str) -> Path | None:
    preferred = test_dir / f"{name}.m"
    if preferred.is_file():
        return preferred
    found = sorted(test_dir.glob("*.m"))
    if len(found) > 1:
        raise UserError(f"several ground-truth .m files in {test_dir}; expected {preferred.name}")
    return found[0] if found else None


def load_anomaly_types(path: str | Path) -> dict[str, list[str]]:
    """Read a JSON {clip: [types]} file (a bare string per clip is accepted too)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"anomaly types file not found: {path}")
    raw = read_json_object(path, "anomaly types file")  # {clip: [types]}
    return {str(k): [v] if isinstance(v, str) else [str(t) for t in v] for k, v in raw.items()}


def discover(path: str | Path, dataset: str | None = None, anomaly_types: str | Path | None = None) -> Dataset:
    """Find every clip of a UCSD-style dataset, with frame-level labels from its ``.m`` file.

    Raises UserError naming the offending path for: missing folders, clips without frames, gaps in frame
    numbering, test clips without a gt entry, gt ranges past the clip's end and malformed gt lines.
    """
    ds_dir = resolve_dataset_dir(path, dataset)
    train_dirs = _clip_dirs(ds_dir / "Train", "Train")
    test_dirs = _clip_dirs(ds_dir / "Test", "Test")
    if not train_dirs and not test_dirs:
        raise UserError(f"no clip folders (Train001, Test001, ...) under {ds_dir}")
    gt_path = _find_gt_file(ds_dir / "Test", ds_dir.name) if test_dirs else None
    if test_dirs and gt_path is None:
        raise UserError(f"test clips found but no ground-truth .m file in {ds_dir / 'Test'}")
    gt = parse_gt_file(gt_path) if gt_path else {}

    clips = []
    for clip_dir in train_dirs:
        frames = frame_files(clip_dir)
        clips.append(Clip(clip_dir.name, "train", frames, np.zeros(len(frames), np.uint8)))
    for clip_dir in test_dirs:
        frames = frame_files(clip_dir)
        if clip_dir.name not in gt:
            raise UserError(f"{gt_path} has no ground-truth entry for clip {clip_dir.name}")
        labels = np.zeros(len(frames), np.uint8)
        for first, last in gt[clip_dir.name]:
            if last > len(frames):
                raise UserError(
                    f"{gt_path}: range {first}:{last} of {clip_dir.name} is past its last frame ({len(frames)})"
                )
            labels[first - 1 : last] = 1
        mask_dir = clip_dir.with_name(f"{clip_dir.name}_gt")
        clips.append(Clip(clip_dir.name, "test", frames, labels, mask_dir if mask_dir.is_dir() else None))

    types: dict[str, list[str]] = {}
    if anomaly_types is not None:
        types = load_anomaly_types(anomaly_types)
    else:
        for candidate in (ds_dir / "anomaly_types.json", ds_dir.parent / "anomaly_types.json"):
            if candidate.is_file():
                types = load_anomaly_types(candidate)
                break
    return Dataset(ds_dir, ds_dir.name, clips, gt_path, types, format="ucsd")


def read_clip(clip: Clip, height: int, width: int) -> np.ndarray:
    """Decode and resize every frame of a clip -> uint8 [n_frames, height, width].

    Frames inside one clip must share a size (a mixed clip is an error naming the frame).
    """
    return clip.read(height, width)
