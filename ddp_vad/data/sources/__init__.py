"""Dataset readers, one small module per layout, behind one entry point: :func:`open_dataset`.

Layouts (``--format``), each with a train role (normal footage) and a test role (labelled clips):

- ``ucsd``: ``Train/Train001/001.tif``, ``Test/Test001/...``, ``Test/<name>.m`` (:mod:`.ucsd`);
- ``avenue``: ``training_videos/``, ``testing_videos/``, ``testing_label_mask/N_label.mat`` (:mod:`.avenue`);
- ``shanghaitech``: ``training/videos/``, ``testing/frames/``, ``testing/test_frame_mask/`` (:mod:`.shanghaitech`);
- ``videos``: ``train/``, ``test/`` (videos and/or frame folders) + ``labels.csv`` (:mod:`.videos`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ddp_vad.data.sources.avenue import discover_avenue, is_avenue_layout
from ddp_vad.data.sources.base import Clip, Dataset, decode_clip, decode_stats, reset_decode_stats
from ddp_vad.data.sources.shanghaitech import discover_shanghaitech, is_shanghaitech_layout
from ddp_vad.data.sources.ucsd import discover, load_anomaly_types
from ddp_vad.data.sources.videos import discover_videos, is_videos_layout
from ddp_vad.errors import UserError

__all__ = ["FORMATS", "Clip", "Dataset", "decode_clip", "decode_stats", "detect_format", "open_dataset"]

FORMATS = ("ucsd", "avenue", "shanghaitech", "videos")


def _is_ucsd_layout(path: Path) -> bool:
    return (path / "Train").is_dir() or (path / "Test").is_dir()


_MARKERS: dict[str, Callable[[Path], bool]] = {
    "ucsd": _is_ucsd_layout,
    "avenue": is_avenue_layout,
    "shanghaitech": is_shanghaitech_layout,
    "videos": is_videos_layout,
}
_EXPECTED = (
    "UCSD (Train/, Test/), Avenue (training_videos/, testing_videos/), ShanghaiTech (training/videos/, "
    "testing/frames/) or your own (train/, test/ + labels.csv)"
)


def detect_format(path: str | Path, format: str | None = None, dataset: str | None = None) -> tuple[str, Path]:
    """The layout of ``path`` and the folder that holds it: ``path`` itself or one sub-folder of it
    (``dataset`` names the sub-folder when there are several, as with UCSDped1 and UCSDped2 side by side)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data folder not found: {path}")
    if format is not None and format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    wanted = [format] if format else list(FORMATS)
    if dataset is not None:  # --dataset names the folder: look nowhere else
        levels = [[path if path.name == dataset else path / dataset]]
    else:  # the folder itself, else its sub-folders
        levels = [[path], [p for p in sorted(path.iterdir()) if p.is_dir() and not p.name.startswith(".")]]
    for level in levels:
        hits = [(fmt, folder) for folder in level for fmt in wanted if _MARKERS[fmt](folder)]
        if len(hits) == 1:
            return hits[0]
        if len({folder for _, folder in hits}) > 1:
            names = ", ".join(sorted({folder.name for _, folder in hits}))
            raise UserError(f"{path} holds several datasets ({names}); choose one with --dataset")
        if hits:
            found = ", ".join(fmt for fmt, _ in hits)
            raise UserError(f"{hits[0][1]} looks like several layouts ({found}); choose one with --format")
    what = f"no {format} layout" if format else "no dataset"
    where = levels[0][0] if dataset is not None else path
    raise UserError(f"{what} in {where}: expected {_EXPECTED}")


def open_dataset(
    path: str | Path,
    format: str | None = None,
    dataset: str | None = None,
    anomaly_types: str | Path | None = None,
    fps: float | None = None,
) -> Dataset:
    """Discover every clip of the dataset at ``path`` (layout detected unless ``format`` says it).

    ``anomaly_types`` (JSON {clip: [types]}) replaces the types the layout brings (UCSD's anomaly_types.json,
    the ``type`` column of labels.csv). ``fps`` resamples video clips by their timestamps. Bad input of any kind
    is a UserError naming the file (and row).
    """
    if fps is not None and not fps > 0:
        raise UserError(f"--fps must be > 0, got {fps}")
    format, folder = detect_format(path, format, dataset)
    if format == "ucsd":
        if fps:
            raise UserError(f"{folder}: --fps resamples videos by their timestamps; UCSD clips are frame folders")
        ds = discover(folder, None, anomaly_types)
    else:
        reader = {"avenue": discover_avenue, "shanghaitech": discover_shanghaitech, "videos": discover_videos}
        ds = reader[format](folder, fps)
        if anomaly_types is not None:
            ds = dataclasses.replace(ds, anomaly_types=load_anomaly_types(anomaly_types))
    reset_decode_stats()  # counted afresh by the decode workers forked after this
    return ds
