"""The generic layout, for your own footage::

    DIR/train/cam1_monday.mp4 ...      normal footage: videos (.mp4, .avi, .mkv, ...) and/or frame folders
    DIR/test/cam1_friday.mp4 ...       labelled clips
    DIR/test/entrance/0001.png ...     a clip stored as numbered frames (0- or 1-based)
    DIR/labels.csv                     clip,start,end[,type] rows

A labels row marks frames ``start..end`` (1-based, inclusive) of one test clip as anomalous; ``clip`` is the
video's file stem or the frame folder's name; overlapping rows are merged (two events may overlap); a test clip
without rows is all normal; ``type`` (optional) names the kind of anomaly for ``transfer --holdout-type``.
A header row ``clip,start,end,type`` and ``#`` comment lines are allowed.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ddp_vad.data.sources.base import Dataset, check_unique_names, clip_name
from ddp_vad.data.sources.clips import labels_from_ranges, make_clip, scan_folder
from ddp_vad.errors import UserError

LABELS_FILE = "labels.csv"


@dataclass(frozen=True)
class LabelRow:
    """One anomalous interval of ``labels.csv`` (``line`` is its line number, for messages)."""

    clip: str
    start: int
    end: int
    type: str | None
    line: int


def is_videos_layout(path: Path) -> bool:
    """A folder with ``train/`` or ``test/``."""
    return (path / "train").is_dir() or (path / "test").is_dir()


def parse_labels_csv(path: Path) -> list[LabelRow]:
    """Read ``clip,start,end[,type]`` rows; a malformed or inverted row is a UserError naming file and line."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")  # utf-8-sig: spreadsheets often save a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    reader = csv.reader(text.splitlines())
    for fields in reader:
        line = reader.line_num
        fields = [f.strip() for f in fields]
        if not any(fields) or fields[0].startswith("#"):
            continue
        if not rows and [f.lower() for f in fields[:3]] == ["clip", "start", "end"]:
            continue  # header
        if len(fields) not in (3, 4):
            raise UserError(f"{path}:{line}: expected clip,start,end[,type], got {len(fields)} fields")
        clip, start, end = fields[:3]
        if not clip:
            raise UserError(f"{path}:{line}: empty clip name")
        try:
            first, last = int(start), int(end)
        except ValueError:
            raise UserError(f"{path}:{line}: start and end must be frame numbers, got {start!r}, {end!r}") from None
        if first < 1:
            raise UserError(f"{path}:{line}: frames are numbered from 1, got start {first}")
        if last < first:
            raise UserError(f"{path}:{line}: inverted range {first}-{last} (start must be <= end)")
        rows.append(LabelRow(clip, first, last, (fields[3] if len(fields) == 4 else "") or None, line))
    return rows


def discover_videos(root: Path, fps: float | None = None) -> Dataset:
    """Every clip of ``root/train`` and ``root/test`` with labels from ``root/labels.csv``."""
    found = {split: scan_folder(root / split) for split in ("train", "test")}
    if not found["train"] and not found["test"]:
        raise UserError(f"no clips (videos or frame folders) in {root / 'train'} or {root / 'test'}")
    labels_path = root / LABELS_FILE
    if found["test"] and not labels_path.is_file():
        raise UserError(f"{labels_path} not found (clip,start,end rows for the clips in {root / 'test'})")
    rows = parse_labels_csv(labels_path) if labels_path.is_file() else []

    by_clip: dict[str, list[LabelRow]] = {}
    test_stems = {stem for stem, _ in found["test"]} | {clip_name(stem) for stem, _ in found["test"]}
    train_stems = {stem for stem, _ in found["train"]} | {clip_name(stem) for stem, _ in found["train"]}
    for row in rows:
        if row.clip not in test_stems:
            where = (
                "is in train/ (normal footage; only test/ clips take labels)"
                if row.clip in train_stems
                else (f"is not a video or frame folder in {root / 'test'}")
            )
            raise UserError(f"{labels_path}:{row.line}: clip {row.clip!r} {where}")
        by_clip.setdefault(clip_name(row.clip), []).append(row)

    clips = [make_clip(clip_name(stem), "train", path, fps) for stem, path in found["train"]]
    types: dict[str, list[str]] = {}
    for stem, path in found["test"]:
        name = clip_name(stem)
        ranges = [(r.start, r.end, f"{labels_path}:{r.line}") for r in by_clip.get(name, [])]
        clips.append(make_clip(name, "test", path, fps, lambda n, r=ranges, s=stem: labels_from_ranges(n, r, s)))
        kinds = sorted({r.type for r in by_clip.get(name, []) if r.type})
        if kinds:
            types[name] = kinds
    check_unique_names(clips, root)
    return Dataset(root, root.name, clips, labels_path if labels_path.is_file() else None, types, format="videos")
