"""Reader for the ShanghaiTech Campus layout::

    ROOT/training/videos/01_001.avi ...          normal footage (frame folders under training/frames/ work too)
    ROOT/testing/frames/01_0014/000.jpg ...      test clips as numbered frames (videos under testing/videos/ too)
    ROOT/testing/test_frame_mask/01_0014.npy     0/1 per frame
    ROOT/testing/test_pixel_mask/01_0014.npy     pixel masks (optional; only their location is kept)

Clips keep their names (``01_001``, ``01_0014``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddp_vad.data.sources.base import Dataset, check_unique_names, clip_name
from ddp_vad.data.sources.clips import labels_checked, make_clip, scan_folder
from ddp_vad.errors import UserError


def is_shanghaitech_layout(path: Path) -> bool:
    """A folder with ``training/`` or ``testing/`` holding ``videos/`` or ``frames/``."""
    return any((path / split / kind).is_dir() for split in ("training", "testing") for kind in ("videos", "frames"))


def read_frame_mask(path: Path) -> np.ndarray:
    """uint8 [n_frames] from a 1-D ``.npy`` of 0/1 (any non-zero value is anomalous)."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the frame labels ({exc})") from None
    if array.ndim != 1:
        raise UserError(f"{path}: expected one label per frame (a 1-D array), got shape {array.shape}")
    return (array != 0).astype(np.uint8)


def discover_shanghaitech(root: Path, fps: float | None = None) -> Dataset:
    """Every ShanghaiTech clip; a test clip without ``test_frame_mask/<clip>.npy`` is an error."""
    train = scan_folder(root / "training" / "videos") + scan_folder(root / "training" / "frames")
    test = scan_folder(root / "testing" / "videos") + scan_folder(root / "testing" / "frames")
    if not train and not test:
        raise UserError(f"no clips in {root / 'training'} or {root / 'testing'} (videos/ or frames/)")
    mask_dir, pixel_dir = root / "testing" / "test_frame_mask", root / "testing" / "test_pixel_mask"
    clips = [make_clip(clip_name(stem), "train", path, fps) for stem, path in train]
    for stem, path in test:
        npy = mask_dir / f"{stem}.npy"
        if not npy.is_file():
            raise UserError(f"{npy} not found: the frame labels of {path}")
        pixels = pixel_dir / f"{stem}.npy"
        masks = pixels if pixels.is_file() else None
        clips.append(
            make_clip(
                clip_name(stem), "test", path, fps, labels_checked(read_frame_mask, npy, path, "frame labels"), masks
            )
        )
    check_unique_names(clips, root)
    return Dataset(root, root.name, clips, mask_dir if test else None, {}, format="shanghaitech")
