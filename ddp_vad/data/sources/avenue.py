"""Reader for the CUHK Avenue layout::

    ROOT/training_videos/01.avi ... 16.avi           normal footage
    ROOT/testing_videos/01.avi ... 21.avi            test videos
    ROOT/testing_label_mask/1_label.mat ...          (or ROOT/ground_truth_demo/testing_label_mask/, as unzipped)

Each ``N_label.mat`` (MATLAB 5) holds ``volLabel``, a 1 x n_frames cell array with one pixel mask per frame of
``testing_videos/NN.avi``; a frame is anomalous when its mask has any non-zero pixel. Clips are named
``Train01`` / ``Test08`` after the video's number.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ddp_vad.data.sources.base import Dataset, check_unique_names, clip_name
from ddp_vad.data.sources.clips import labels_checked, make_clip, scan_folder
from ddp_vad.errors import UserError

LABEL_DIRS = ("testing_label_mask", "ground_truth_demo/testing_label_mask")


def is_avenue_layout(path: Path) -> bool:
    """A folder with ``training_videos/`` or ``testing_videos/``."""
    return (path / "training_videos").is_dir() or (path / "testing_videos").is_dir()


def label_file_name(video_stem: str) -> str:
    """``08`` -> ``8_label.mat`` (the label files drop the leading zero)."""
    return f"{int(video_stem)}_label.mat" if video_stem.isdigit() else f"{video_stem}_label.mat"


def read_label_mat(path: Path) -> np.ndarray:
    """uint8 [n_frames]: 1 where the frame's mask in ``volLabel`` has a non-zero pixel."""
    import scipy.io  # scipy comes with scikit-learn; imported here as it is slow to import

    try:
        cells = scipy.io.loadmat(str(path), variable_names=["volLabel"]).get("volLabel")
    except (OSError, ValueError, NotImplementedError, TypeError) as exc:  # NotImplementedError: MATLAB v7.3
        raise UserError(f"{path}: cannot read the MATLAB file ({exc})") from None
    if cells is None or cells.dtype != object or cells.size == 0:
        raise UserError(f"{path}: no volLabel cell array (one mask per frame) in it")
    return np.array([int(np.any(np.asarray(m))) for m in cells.ravel()], np.uint8)


def discover_avenue(root: Path, fps: float | None = None) -> Dataset:
    """Every Avenue clip, test labels from the ``.mat`` masks (a test video without its label file is an error)."""
    train = scan_folder(root / "training_videos")
    test = scan_folder(root / "testing_videos")
    if not train and not test:
        raise UserError(f"no videos in {root / 'training_videos'} or {root / 'testing_videos'}")
    label_dir = next((root / d for d in LABEL_DIRS if (root / d).is_dir()), None)
    if test and label_dir is None:
        raise UserError(f"no label folder ({' or '.join(LABEL_DIRS)}) in {root} for its testing_videos")
    clips = [make_clip(f"Train{clip_name(stem)}", "train", path, fps) for stem, path in train]
    for stem, path in test:
        mat = label_dir / label_file_name(stem)
        if not mat.is_file():
            raise UserError(f"{mat} not found: the labels of {path}")
        clips.append(
            make_clip(
                f"Test{clip_name(stem)}",
                "test",
                path,
                fps,
                labels_checked(read_label_mat, mat, path, "frame masks"),
                mat,
            )
        )
    check_unique_names(clips, root)
    return Dataset(root, root.name, clips, label_dir, {}, format="avenue")
