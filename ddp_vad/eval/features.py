"""Window features for the classic baselines: raw pixels (the method's) and frame-difference motion energy.

* ``pixels``: windows resized to 60x90 (antialiased bilinear, never upsampled) and flattened, in [0, 1].
* ``motion``: the mean absolute frame difference in each cell of a coarse grid, per step and pooled over the window
  (mean and max per cell) -- the classic cue of this field, a few dozen numbers per window.

Both fill one preallocated float32 matrix chunk by chunk (peak: the result plus one chunk). Standardisation uses the
training rows of each fold only (:func:`mean_std`, :func:`standardise_`).
"""

from __future__ import annotations

import numpy as np

MOTION_GRID = (4, 6)  # rows x columns of the motion-energy grid


def feature_size(frame_h: int, frame_w: int, height: int, width: int) -> tuple[int, int, str | None]:
    """Target (h, w) for features; the shard size plus a note when smaller than asked (no upsampling)."""
    if frame_h < height or frame_w < width:
        return (
            frame_h,
            frame_w,
            f"shards are {frame_h}x{frame_w} (HxW), smaller than {height}x{width}: used as is",
        )
    return height, width, None


def window_features(frames: np.ndarray, height: int, width: int, chunk: int = 256) -> np.ndarray:
    """uint8 windows [N, T, H, W] -> float32 [N, T*height*width] in [0, 1], resized (antialiased bilinear).

    Fills one preallocated matrix chunk by chunk, so the peak is the result plus one chunk.
    """
    import torch
    import torch.nn.functional as F

    n, t, h, w = frames.shape
    out = np.empty((n, t * height * width), dtype=np.float32)
    for lo in range(0, n, chunk):
        part = np.ascontiguousarray(frames[lo : lo + chunk])
        m = part.shape[0]
        block = torch.from_numpy(part).reshape(m * t, 1, h, w).float().div_(255.0)
        if (h, w) != (height, width):
            block = F.interpolate(block, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        out[lo : lo + m] = block.reshape(m, -1).numpy()
    return out


def mean_std(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Column mean and std (float64 accumulation, row chunks: no full-size temporaries)."""
    s = np.zeros(x.shape[1], dtype=np.float64)
    ss = np.zeros(x.shape[1], dtype=np.float64)
    for lo in range(0, x.shape[0], chunk):
        block = x[lo : lo + chunk].astype(np.float64)
        s += block.sum(axis=0)
        ss += np.square(block).sum(axis=0)
    mean = s / x.shape[0]
    var = np.maximum(ss / x.shape[0] - mean**2, 0.0)
    std = np.sqrt(var)
    std[std < 1e-6] = 1.0  # constant pixels: leave them centred, do not blow them up
    return mean.astype(np.float32), std.astype(np.float32)


def standardise_(x: np.ndarray, mean: np.ndarray, std: np.ndarray, chunk: int = 512) -> None:
    for lo in range(0, x.shape[0], chunk):
        block = x[lo : lo + chunk]
        block -= mean
        block /= std


def motion_features(frames: np.ndarray, grid: tuple[int, int] = MOTION_GRID, chunk: int = 256) -> np.ndarray:
    """uint8 windows [N, T, H, W] -> float32 [N, (T-1) + 2*gh*gw] motion energy in [0, 1].

    Per window: the mean |frame(t+1) - frame(t)| of the whole frame for each of the T-1 steps, then for each of the
    gh x gw grid cells its mean and its max over the steps. Rows/columns that do not fill a cell are left out.
    """
    n, t, h, w = frames.shape
    gh, gw = grid
    if t < 2 or h < gh or w < gw:
        raise ValueError(f"motion features need >= 2 frames of at least {gh}x{gw} pixels, got {t}x{h}x{w}")
    ch, cw = h // gh, w // gw
    out = np.empty((n, (t - 1) + 2 * gh * gw), dtype=np.float32)
    for lo in range(0, n, chunk):
        part = frames[lo : lo + chunk, :, : gh * ch, : gw * cw].astype(np.int16)
        diff = np.abs(np.diff(part, axis=1)).astype(np.float32) / 255.0  # [m, T-1, gh*ch, gw*cw]
        m = diff.shape[0]
        cells = diff.reshape(m, t - 1, gh, ch, gw, cw).mean(axis=(3, 5)).reshape(m, t - 1, gh * gw)
        out[lo : lo + m] = np.concatenate([cells.mean(axis=2), cells.mean(axis=1), cells.max(axis=1)], axis=1)
    return out
