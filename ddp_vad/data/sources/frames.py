"""Clips stored as folders of numbered image files (UCSD's TIFFs, ShanghaiTech's JPEGs, your own PNGs)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ddp_vad.data.sources.base import read_frames
from ddp_vad.errors import UserError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass(frozen=True)
class FrameClip:
    """One clip: its ordered frame files and a 0/1 label per frame (train clips are all-normal)."""

    name: str
    split: str  # "train" | "test"
    frame_paths: tuple[Path, ...]
    frame_labels: np.ndarray = field(repr=False)
    mask_dir: Path | None = None

    @property
    def n_frames(self) -> int:
        return len(self.frame_paths)

    @property
    def source(self) -> Path:
        return self.frame_paths[0].parent

    @property
    def mask_path(self) -> Path | None:
        return self.mask_dir

    def iter_frames(self, height: int, width: int) -> Iterator[np.ndarray]:
        """Decode and resize frame by frame; frames inside one clip must share a size (else an error naming it)."""
        first_shape = None
        for path in self.frame_paths:
            frame = read_frame(path)
            if first_shape is None:
                first_shape = frame.shape
            elif frame.shape != first_shape:
                raise UserError(
                    f"frame {path} is {frame.shape[1]}x{frame.shape[0]} but earlier frames of {self.name} "
                    f"are {first_shape[1]}x{first_shape[0]} (WxH)"
                )
            yield resize_frame(frame, height, width)

    def read(self, height: int, width: int) -> np.ndarray:
        """Every frame, resized -> uint8 [n_frames, height, width]."""
        return read_frames(self, height, width)


def frame_files(
    clip_dir: Path, suffixes: tuple[str, ...] = (".tif", ".tiff"), first: int | None = 1
) -> tuple[Path, ...]:
    """Frame files ordered by their number; anything not named ``<number><suffix>`` is ignored.

    Numbers must run ``first..first+N-1`` without gaps (``first=None`` accepts a start at 0 or 1).
    """
    numbered = []
    for p in clip_dir.iterdir():
        if p.suffix.lower() in suffixes and p.stem.isdigit() and not p.name.startswith("."):
            numbered.append((int(p.stem), p))
    numbered.sort()
    if not numbered:
        raise UserError(f"clip has no frames ({'/'.join(suffixes)} files named by number): {clip_dir}")
    numbers = [n for n, _ in numbered]
    start = first if first is not None else min(numbers[0], 1)
    if numbers != list(range(start, start + len(numbers))):
        missing = sorted(set(range(start, numbers[-1] + 1)) - set(numbers))
        detail = f"missing frame {missing[0]:03d}" if missing else "duplicate frame numbers"
        raise UserError(f"frames of {clip_dir} are not numbered {start}..N without gaps ({detail})")
    return tuple(p for _, p in numbered)


def read_frame(path: Path) -> np.ndarray:
    """Decode one frame to a 2-D uint8 array (colour frames are converted to grayscale)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode != "L":
                img = img.convert("L")
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read frame {path}: {exc}") from None


def read_rgb(path: Path) -> np.ndarray:
    """Decode one frame to uint8 [H, W, 3] (for annotated copies, which keep the colours)."""
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read frame {path}: {exc}") from None


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 frame to (height, width); a no-op when the size already matches."""
    if frame.shape == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
