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
    """Decode one frame to a 2-D uint8 array (colour and palette frames are converted to grayscale; 16-bit frames
    are scaled by their bit depth, never clipped)."""
    try:
        with Image.open(path) as img:
            img.load()
            return _gray_u8(img, path)
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read frame {path}: {exc}") from None


def read_rgb(path: Path) -> np.ndarray:
    """Decode one frame to uint8 [H, W, 3] (for annotated copies, which keep the colours)."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in _WIDE_MODES:  # Pillow's RGB conversion would clip these to 255: scale as gray instead
                return np.repeat(_gray_u8(img, path)[..., None], 3, axis=2)
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read frame {path}: {exc}") from None


_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # more than 8 bits per sample


def _bits_per_sample(img: Image.Image) -> int | None:
    """The bit depth the file declares: TIFF's BitsPerSample tag; 16 for 16-bit modes and PNG's integer mode."""
    tags = getattr(img, "tag_v2", None)
    if tags is not None and 258 in tags:
        bits = tags[258]
        return int(bits[0] if isinstance(bits, tuple) else bits)
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        return 16
    return None


def _gray_u8(img: Image.Image, path: Path) -> np.ndarray:
    """A decoded image as uint8 gray: values of a wider integer frame map 0..2^bits-1 onto 0..255 (rounded)."""
    if img.mode not in _WIDE_MODES:
        return np.asarray(img if img.mode == "L" else img.convert("L"))  # palette, RGB, 1-bit: through the colours
    bits = _bits_per_sample(img)
    if img.mode == "F" or bits is None or bits > 16:
        depth = "floating-point" if img.mode == "F" else f"{bits or 'unknown'}-bit"
        raise UserError(f"frame {path}: {depth} samples are not supported; convert the frames to 8 or 16 bit")
    values = np.asarray(img).astype(np.int64)
    top = (1 << bits) - 1
    if values.size and (values.min() < 0 or values.max() > top):
        raise UserError(f"frame {path}: values {values.min()}..{values.max()} do not fit its {bits}-bit depth")
    return ((values * 255 + top // 2) // top).astype(np.uint8)


def resize_frame(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a uint8 frame to (height, width); a no-op when the size already matches."""
    if frame.shape == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BILINEAR))
