"""Finding clips in a folder (video files and frame folders side by side) and building either kind."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ddp_vad.data.sources.frames import IMAGE_SUFFIXES, FrameClip, frame_files
from ddp_vad.data.sources.video import VIDEO_SUFFIXES, VideoClip, frame_times
from ddp_vad.errors import UserError

LabelsFor = Callable[[int], np.ndarray]  # frame count -> uint8 labels (raises UserError when they do not fit)


def natural_key(name: str) -> list:
    """Sort key that puts "2" before "10"."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def scan_folder(folder: Path) -> list[tuple[str, Path]]:
    """(stem, path) of every video file and every sub-folder (a clip stored as frames) directly in ``folder``.

    Other files are ignored; hidden entries too. Sorted naturally by name; a missing folder gives [].
    """
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if p.name.startswith("."):
            continue
        if p.is_dir():
            found.append((p.name, p))
        elif p.suffix.lower() in VIDEO_SUFFIXES:
            found.append((p.stem, p))
    return sorted(found, key=lambda item: natural_key(item[1].name))


def make_clip(
    name: str,
    split: str,
    path: Path,
    fps: float | None = None,
    labels_for: LabelsFor | None = None,
    masks: Path | None = None,
) -> FrameClip | VideoClip:
    """A clip from a video file (frames counted by demuxing) or a folder of numbered images (0- or 1-based).

    ``labels_for(n_frames)`` gives the labels of the clip's own frames (before any ``fps`` resampling).
    """
    if path.is_dir():
        if fps:
            raise UserError(f"{path}: --fps resamples videos by their timestamps; a folder of frames has none")
        paths = frame_files(path, IMAGE_SUFFIXES, first=None)
        labels = labels_for(len(paths)) if labels_for else np.zeros(len(paths), np.uint8)
        return FrameClip(name, split, paths, labels, masks)
    times = frame_times(path)
    labels = labels_for(len(times)) if labels_for else None
    return VideoClip.create(name, split, path, times, labels, fps, masks)


def labels_from_ranges(n_frames: int, ranges: list[tuple[int, int, str]], clip: str) -> np.ndarray:
    """0/1 per frame from 1-based inclusive ``(first, last, where)`` ranges; overlapping ranges are merged.

    ``where`` ("labels.csv:7") starts the error of a range past the clip's last frame.
    """
    labels = np.zeros(n_frames, np.uint8)
    for first, last, where in ranges:
        if last > n_frames:
            raise UserError(f"{where}: range {first}-{last} of {clip} is past its last frame ({n_frames})")
        labels[first - 1 : last] = 1
    return labels


def labels_checked(
    read: Callable[[Path], np.ndarray], label_file: Path, clip: Path, what: str
) -> Callable[[int], np.ndarray]:
    """Per-frame labels read from ``label_file`` when the clip's frame count is known, which must match it."""

    def labels_for(n_frames: int) -> np.ndarray:
        labels = read(label_file)
        if len(labels) != n_frames:
            raise UserError(f"{label_file}: {len(labels)} {what}, but {clip} has {n_frames} frames")
        return labels

    return labels_for
