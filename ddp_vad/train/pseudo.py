"""Pseudo-anomalous windows made from normal footage: pure, seeded functions (no I/O, no torch).

Discriminators trained only on a scene's normal footage transfer to anomaly detection when they learn *normal versus
almost normal but wrong* (docs/models.md, "Pretraining variants"). Each kind below turns the train clips' normal
frames into a window that is wrong in one way:

- ``skip``: every ``stride``-th frame (stride 2-4): people move 2-4x too fast;
- ``jump``: consecutive frames with one jump of 4-15 frames in the middle;
- ``reverse``: a normal window played backwards;
- ``freeze``: a normal window frozen from a random step on (the last frames repeat one frame);
- ``patch``: a patch of another clip (or of the same clip at another time), with its own motion, pasted into a
  normal window and moving across it.

``clips`` are uint8 frame arrays [F, H, W] (whole train clips); windows are uint8 [T, H, W]. Every random choice
comes from the ``numpy.random.Generator`` passed in, so a (seed, rank, step) gives the same windows on any run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ddp_vad.errors import UserError

KINDS = ("skip", "jump", "reverse", "freeze", "patch")
DEFAULT_KINDS = "skip,reverse,freeze,patch"
STRIDES = (2, 3, 4)
JUMP_GAPS = (4, 15)  # inclusive range of a jump's extra frames


def parse_kinds(text: str) -> tuple[str, ...]:
    """``"skip,reverse"`` -> ("skip", "reverse"); an unknown or empty list is a UserError naming the value."""
    kinds = tuple(k.strip() for k in str(text).split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise UserError(f"--pseudo-kinds {text!r}: give a comma list of {', '.join(KINDS)}")
    return tuple(dict.fromkeys(kinds))


def pseudo_count(rate: float, batch: int) -> int:
    """Pseudo-anomalous windows that go with ``batch`` real ones at ``rate`` (0 at rate 0: batches untouched)."""
    return int(round(rate * batch)) if rate > 0 else 0


# ----------------------------------------------------------------------------------------- the kinds
def skip_window(clip: np.ndarray, start: int, stride: int, window: int) -> np.ndarray:
    """Frames ``start, start + stride, ...`` of ``clip`` (``window`` of them)."""
    return clip[start + stride * np.arange(window)]


def jump_window(clip: np.ndarray, start: int, at: int, gap: int, window: int) -> np.ndarray:
    """Frames ``start ..`` of ``clip``, where the ``at``-th and later frames come ``gap`` frames later (one jump)."""
    idx = start + np.arange(window)
    idx[at:] += gap
    return clip[idx]


def reversed_window(window: np.ndarray) -> np.ndarray:
    """The window played backwards."""
    return np.ascontiguousarray(window[::-1])


def frozen_window(window: np.ndarray, at: int) -> np.ndarray:
    """Frames ``at`` and later replaced by frame ``at - 1`` (the footage freezes)."""
    out = window.copy()
    out[at:] = window[at - 1]
    return out


def patch_positions(start: tuple[int, int], velocity: tuple[float, float], frames: int, limit: tuple[int, int]):
    """Top-left corner of the pasted patch in each frame: ``start + t * velocity``, clipped to ``limit`` (inclusive)."""
    t = np.arange(frames)
    y = np.clip(np.round(start[0] + t * velocity[0]).astype(int), 0, limit[0])
    x = np.clip(np.round(start[1] + t * velocity[1]).astype(int), 0, limit[1])
    return y, x


def patched_window(
    window: np.ndarray,
    source: np.ndarray,
    size: tuple[int, int],
    src: tuple[int, int],
    dst: tuple[int, int],
    velocity: tuple[float, float],
) -> np.ndarray:
    """``window`` with the ``size`` patch at ``src`` of each ``source`` frame pasted at ``dst + t * velocity``."""
    (h, w), (sy, sx) = size, src
    out = window.copy()
    ys, xs = patch_positions(dst, velocity, len(window), (window.shape[1] - h, window.shape[2] - w))
    for t, (y, x) in enumerate(zip(ys.tolist(), xs.tolist(), strict=True)):
        out[t, y : y + h, x : x + w] = source[t, sy : sy + h, sx : sx + w]
    return out


# ------------------------------------------------------------------------------------------ sampling
def _normal(clips: Sequence[np.ndarray], window: int, rng: np.random.Generator, avoid: int | None = None):
    """(clip index, a random normal window of it); another clip than ``avoid`` where there is one."""
    choices = [i for i in range(len(clips)) if i != avoid] or list(range(len(clips)))
    ci = int(choices[rng.integers(len(choices))])
    start = int(rng.integers(len(clips[ci]) - window + 1))
    return ci, clips[ci][start : start + window]


def _long_enough(clips: Sequence[np.ndarray], span: int) -> list[int]:
    return [i for i, c in enumerate(clips) if len(c) >= span]


def _skip(clips, window, rng) -> np.ndarray:
    for stride in rng.permutation(STRIDES).tolist():  # a random stride that some clip is long enough for
        span = stride * (window - 1) + 1
        ok = _long_enough(clips, span)
        if ok:
            clip = clips[ok[rng.integers(len(ok))]]
            return skip_window(clip, int(rng.integers(len(clip) - span + 1)), stride, window)
    raise UserError(f"every train clip is shorter than {2 * (window - 1) + 1} frames: no frame-skip window fits")


def _jump(clips, window, rng) -> np.ndarray:
    gap = int(rng.integers(JUMP_GAPS[0], JUMP_GAPS[1] + 1))
    ok = _long_enough(clips, window + gap)
    if not ok:
        gap, ok = 1, _long_enough(clips, window + 1)
    if not ok:
        raise UserError(f"every train clip is shorter than {window + 1} frames: no jump window fits")
    clip = clips[ok[rng.integers(len(ok))]]
    at = int(rng.integers(1, window))
    return jump_window(clip, int(rng.integers(len(clip) - window - gap + 1)), at, gap, window)


def _patch(clips, window, rng) -> np.ndarray:
    ci, base = _normal(clips, window, rng)
    _, source = _normal(clips, window, rng, avoid=ci if len(clips) > 1 else None)
    H, W = base.shape[1:]
    h = int(rng.integers(max(2, H // 6), max(3, H // 3) + 1))
    w = int(rng.integers(max(2, W // 6), max(3, W // 3) + 1))
    src = (int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)))
    dst = (int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1)))
    speed = float(rng.uniform(1.0, max(1.5, W / (2.0 * window))))  # pixels per frame: it visibly moves across
    angle = float(rng.uniform(0.0, 2.0 * np.pi))
    return patched_window(base, source, (h, w), src, dst, (speed * np.sin(angle), speed * np.cos(angle)))


def pseudo_window(kind: str, clips: Sequence[np.ndarray], window: int, rng: np.random.Generator) -> np.ndarray:
    """One pseudo-anomalous window of ``kind`` from ``clips`` (all random choices from ``rng``)."""
    if kind == "skip":
        return _skip(clips, window, rng)
    if kind == "jump":
        return _jump(clips, window, rng)
    if kind == "patch":
        return _patch(clips, window, rng)
    _, base = _normal(clips, window, rng)
    if kind == "reverse":
        return reversed_window(base)
    if kind == "freeze":
        return frozen_window(base, int(rng.integers(1, window)))
    raise UserError(f"unknown pseudo-anomaly kind {kind!r} (one of {', '.join(KINDS)})")


def sample_pseudo(
    clips: Sequence[np.ndarray], n: int, kinds: Sequence[str], window: int, rng: np.random.Generator
) -> tuple[np.ndarray, list[str]]:
    """``n`` pseudo-anomalous windows (uint8 [n, T, H, W]), each of a kind drawn uniformly from ``kinds``, and
    their kinds."""
    if not clips or min(len(c) for c in clips) < window:
        raise UserError(f"pseudo-anomalies need train clips of at least {window} frames")
    h, w = clips[0].shape[1:]
    out = np.empty((n, window, h, w), np.uint8)
    drawn = [kinds[int(i)] for i in rng.integers(len(kinds), size=n)] if n else []
    for i, kind in enumerate(drawn):
        out[i] = pseudo_window(kind, clips, window, rng)
    return out, drawn


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The generator of one step's pseudo-anomalies on one process: the same windows on any rerun or resume."""
    return np.random.default_rng([abs(int(seed)), int(rank), int(step), 17])
