"""Synthetic UCSD-style data: a fixed camera over a walkway, pedestrians, and five kinds of anomaly.

``run_synth`` writes the layout the UCSD reader reads (DESIGN.md section 2)::

    OUT/SynthPed/Train/Train001/001.tif ...        normal clips only
    OUT/SynthPed/Test/Test001/001.tif ...          one anomaly type per clip
    OUT/SynthPed/Test/Test001_gt/001.bmp ...       0/255 masks of the anomaly object(s)
    OUT/SynthPed/Test/SynthPed.m                   frame-level ground truth in UCSD syntax
    OUT/SynthPed/anomaly_types.json                {"Test001": ["biker"], ...} (copied to OUT/)

or, with ``--format videos``, the generic layout of :mod:`ddp_vad.data.sources.videos` (10 frames/s)::

    OUT/SynthPed/train/Train001.mp4 ...            OUT/SynthPed/test/Test001.mp4 ...
    OUT/SynthPed/labels.csv                        clip,start,end,type rows (Test001,37,80,biker)

Geometry: one flat ground plane seen by a pinhole camera. An object's image scale is linear in the image
row of its feet, and its row speed is ``v * scale**2`` (both follow from 1/depth), so people shrink and slow
down towards the top. Across the path, positions use a coordinate ``u`` (-1 and 1 are the path edges);
lines of constant ``u`` converge like the edges of a straight path. Everything is in normalised image
units (X = x / width, Y = y / height), so a seed gives the same scene at every frame size.

Anomalies differ from walkers in appearance and motion: ``biker`` (fast, rider over two wheels),
``skater`` (fast, small, arms out, board), ``cart`` (large bright vehicle, faster than walking),
``wheelchair`` (wide, low, slow) and ``grass`` (a walker crossing the lawn, perpendicular to the path).
Clips are rendered by rasterising every (object, frame) pair of one kind at once (vectorised numpy), so
the default 70 clips x 200 frames take ~12 s on one core, most of it writing files.
A test frame is anomalous iff its anomaly mask is non-empty, so the .m file and the masks always agree.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ddp_vad.config import write_resolved_config
from ddp_vad.data.sources.video import write_video
from ddp_vad.errors import UserError
from ddp_vad.files import write_json_atomic
from ddp_vad.options import option

DATASET_NAME = "SynthPed"
SYNTH_FPS = 10  # frame rate of --format videos (UCSD's cameras record 10 frames/s)
ANOMALY_TYPES = ("biker", "skater", "cart", "wheelchair", "grass")

# --- scene geometry (normalised image units) ------------------------------------------------------
S_TOP = 0.4  # object scale at the top row; 1.0 at the bottom row (the horizon lies above the frame)
K = 1.0 - S_TOP
PERSON = 0.22  # height of a person at the bottom row, as a fraction of the frame height
PATH_X_TOP, PATH_X_BOTTOM = 0.80, 0.30  # path centre line where it leaves the top / bottom of the frame
PATH_HALF = 0.32  # path half-width at scale 1, as a fraction of the frame width
V_WALK = 0.0115  # walking speed: dY/dt = v * scale**2 (about 1.8 px/frame at the bottom of a 158-row frame)
U_WALK = 0.015  # walking speed across the path, in u per frame (u units shrink with scale like pixels do)

# Speed range (x walking speed) and size (x a person's height) of each kind of actor.
_SPEED = {
    "walker": (0.75, 1.25),
    "biker": (3.0, 3.8),
    "skater": (2.4, 3.0),
    "cart": (1.6, 2.0),
    "wheelchair": (0.45, 0.6),
    "grass": (0.9, 1.2),
}
_SIZE = {"walker": 1.0, "biker": 1.05, "skater": 0.85, "cart": 1.25, "wheelchair": 1.15, "grass": 1.0}
# Extent around the feet point, in units of the drawn height: (half-width, height above feet).
_EXTENT = {
    "walker": (0.25, 1.0),
    "grass": (0.25, 1.0),
    "biker": (0.5, 1.15),
    "skater": (0.45, 0.9),
    "cart": (0.45, 0.75),
    "wheelchair": (0.4, 0.85),
}


def _scale(y):
    return S_TOP + K * y


def _row(scale):
    return (scale - S_TOP) / K


def _path_x(y, u):
    return PATH_X_TOP + (PATH_X_BOTTOM - PATH_X_TOP) * y + u * PATH_HALF * _scale(y)


# --- config -----------------------------------------------------------------------------------------
@dataclass
class SynthConfig:
    """Options of ``ddp_vad synth`` (field names are the CLI option names)."""

    out: str | Path = option(help="Dataset folder.", argument=True)
    train_clips: int = option(34, "Normal-only training clips.")
    test_clips: int = option(36, "Test clips with anomalies.")
    frames: int = option(200, "Frames per clip.")
    height: int = option(158, "Frame height (Ped1: 158).")
    width: int = option(238, "Frame width (Ped1: 238).")
    seed: int = option(0, "Everything is deterministic from this seed.")
    overwrite: bool = option(False, "Replace an existing dataset in OUT.")
    format: str = option(
        "ucsd",
        "ucsd: TIFF frames + .m ground truth; videos: train/ and test/ video files + labels.csv.",
        choices=("ucsd", "videos"),
    )
    container: str = option("mp4", "Video files of --format videos: mp4 (H.264), avi (MPEG-4), mkv.",
                            choices=("mp4", "avi", "mkv"))  # fmt: skip

    def __post_init__(self) -> None:
        if not str(self.out).strip():
            raise UserError("synth: OUT must be a folder path")
        if self.format not in ("ucsd", "videos"):
            raise UserError(f"synth: --format must be ucsd or videos, got {self.format!r}")
        if self.container not in ("mp4", "avi", "mkv"):
            raise UserError(f"synth: video container must be mp4, avi or mkv, got {self.container!r}")
        self.out = Path(self.out)
        limits = {"train_clips": (0, 999), "test_clips": (1, 999), "frames": (10, 999), "height": (16, 4096),
                  "width": (16, 4096), "seed": (0, 2**63 - 1)}  # fmt: skip
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or not low <= value <= high:
                flag = name.replace("_", "-")
                raise UserError(f"synth: --{flag} must be an integer in [{low}, {high}], got {value!r}")
            setattr(self, name, int(value))
        self.overwrite = bool(self.overwrite)


# --- actors -----------------------------------------------------------------------------------------
@dataclass
class _Actor:
    """One moving object. Path movers follow 1/scale(t) = inv0 - K*v*(t - t_ref) at a fixed lateral u;
    grass walkers keep their row and move across the path with u(t) = u + v*(t - t_ref)."""

    kind: str
    t_ref: float
    inv0: float  # 1/scale at t_ref (path movers)
    v: float  # path movers: dY/dt = v*scale^2 (> 0 = towards the camera); grass: du/dt
    u: float
    y_fixed: float = 0.0  # grass walkers' row
    size: float = 1.0
    colors: tuple[float, ...] = (60.0, 40.0, 45.0, 30.0)  # greys: torso/body, legs/wheels, head, extra
    period: float = 11.0  # gait cycle in frames
    phase: float = 0.0
    sway: float = 0.0  # lateral wobble of path movers (u units)
    bag: int = 0  # -1/0/1: bag on the left / none / right
    anomaly: bool = False

    def trajectory(self, t: np.ndarray, height: int, width: int) -> dict[str, np.ndarray]:
        """Pixel position of the feet, drawn height, unit motion direction and on-screen flag per frame."""
        if self.kind == "grass":
            y = np.full(t.shape, self.y_fixed)
            u = self.u + self.v * (t - self.t_ref)
        else:
            inv = self.inv0 - K * self.v * (t - self.t_ref)
            y = _row(1.0 / np.maximum(inv, 1.0 / 4.0))  # clamp far below the frame (off-screen anyway)
            u = self.u + self.sway * np.sin(2 * np.pi * t / 97.0 + self.phase)
        scale = _scale(y)
        x_px, y_px = _path_x(y, u) * width, y * height
        h_px = PERSON * height * scale * self.size
        dx, dy = np.gradient(x_px), np.gradient(y_px)
        norm = np.maximum(np.hypot(dx, dy), 1e-9)
        half_w, top = _EXTENT[self.kind]
        on_screen = (
            (x_px + half_w * h_px >= -1) & (x_px - half_w * h_px <= width)
            & (y_px + 0.1 * h_px >= -1) & (y_px - top * h_px <= height)
        )  # fmt: skip
        return {"x": x_px, "y": y_px, "h": h_px, "dx": dx / norm, "dy": dy / norm, "on": on_screen}


def _transit(kind: str, speed: float, size: float, y_row: float = 0.5) -> float:
    """Frames from entering the picture to leaving it, at constant ``speed`` (v or du/dt)."""
    if kind == "grass":
        scale = _scale(y_row)
        margin = _EXTENT[kind][0] * PERSON * scale * size * 1.6  # in X units (frames are ~1.5x wider)
        return (1 + 2 * margin) / (abs(speed) * PATH_HALF * scale)
    top = _EXTENT[kind][1]
    return (1 / S_TOP - (1 - K * PERSON * size * top)) / (K * abs(speed))


def _entering(kind: str, t_enter: float, direction: int, speed: float, size: float, y_row: float):
    """(inv0 or u, signed v) of an actor that just enters the picture at ``t_enter``."""
    if kind == "grass":
        scale = _scale(y_row)
        margin = _EXTENT[kind][0] * PERSON * scale * size * 1.6
        x = -margin if direction > 0 else 1 + margin
        u = (x - _path_x(y_row, 0.0)) / (PATH_HALF * scale)
        return u, direction * speed
    if direction > 0:  # feet at the top row, walking down (towards the camera)
        return 1 / S_TOP, speed
    return 1 - K * PERSON * size * _EXTENT[kind][1], -speed  # head at the bottom row, walking up


def _look(rng: np.random.Generator, kind: str) -> dict:
    """Random appearance: clothing greys (mostly dark, some light), gait and accessories."""
    if kind == "walker":
        torso = rng.choice([rng.uniform(25, 70), rng.uniform(80, 140), rng.uniform(160, 225)], p=[0.55, 0.3, 0.15])
    else:  # anomalies: clothes that stand out from the paving (dark or white), so they stay learnable
        torso = rng.choice([rng.uniform(25, 80), rng.uniform(205, 240)], p=[0.7, 0.3])
    colors = (float(torso), rng.uniform(20, 85), rng.uniform(25, 75), rng.uniform(20, 45))
    if kind == "cart":
        colors = (rng.uniform(205, 245), rng.uniform(30, 60), rng.uniform(25, 75), rng.uniform(185, 225))
    return {
        "colors": tuple(float(c) for c in colors),
        "period": float(rng.uniform(9.5, 13.0)),
        "phase": float(rng.uniform(0, 2 * np.pi)),
        "sway": float(rng.uniform(0.0, 0.06)) if kind == "walker" else 0.0,
        "bag": int(rng.choice([-1, 0, 0, 0, 1])),
    }


def _crowd(rng: np.random.Generator, frames: int) -> list[_Actor]:
    """Walkers in both directions along the path, with a density drawn per clip; some walk in pairs."""
    density = rng.uniform(3.0, 9.0)  # people on the path at a time, on average
    mean_transit = _transit("walker", V_WALK, 1.0)
    span = frames + 1.6 * mean_transit
    actors: list[_Actor] = []
    for _ in range(rng.poisson(density * span / mean_transit)):
        speed = V_WALK * rng.uniform(*_SPEED["walker"])
        size = rng.uniform(0.88, 1.12)
        direction = 1 if rng.random() < 0.5 else -1
        t_enter = rng.uniform(frames - span, frames)
        inv0, v = _entering("walker", t_enter, direction, speed, size, 0.0)
        u = rng.uniform(-0.85, 0.85)
        actors.append(_Actor("walker", t_enter, inv0, v, u, size=size, **_look(rng, "walker")))
        if rng.random() < 0.2:  # a companion walking alongside
            side = 0.14 if u < 0.6 else -0.14
            actors.append(
                _Actor("walker", t_enter + rng.uniform(-2, 2), inv0, v, u + side, size=rng.uniform(0.88, 1.12),
                       **_look(rng, "walker"))
            )  # fmt: skip
    return actors


def _anomalies(rng: np.random.Generator, kind: str, frames: int) -> list[_Actor]:
    """Anomaly actors covering one or two contiguous parts of the clip (35-80% of its frames in all).

    A part at least one transit long is covered by a stream of actors whose visits overlap a little (the
    first enters at its start, the last leaves at its end). A shorter part must touch the start or the end
    of the clip: one actor that is already there and leaves, or arrives and stays, on the near half.
    """
    speed = rng.uniform(*_SPEED[kind]) * (U_WALK if kind == "grass" else V_WALK)
    size = _SIZE[kind] * rng.uniform(0.92, 1.08)
    y_row = rng.uniform(0.4, 0.92)
    transit = _transit(kind, speed, size, y_row)
    cover = rng.uniform(0.35, 0.8) * frames
    rands = np.random.default_rng(rng.integers(2**63))  # appearance draws do not shift the plan's draws

    def make(t_enter: float, direction: int) -> _Actor:
        pos, v = _entering(kind, t_enter, direction, speed, size, y_row)
        look = _look(rands, kind)
        if kind == "grass":
            return _Actor(kind, t_enter, 0.0, v, pos, y_fixed=y_row, size=size, anomaly=True, **look)
        return _Actor(kind, t_enter, pos, v, rands.uniform(-0.6, 0.6), size=size, anomaly=True, **look)

    two = frames - cover >= 20 and rng.random() < 0.35  # "leaves and comes back"
    lengths = [cover * (w := rng.uniform(0.35, 0.65)), cover * (1 - w)] if two else [cover]
    gap = 10 if two else 0  # two parts are at least 10 frames apart
    gaps = rng.dirichlet(np.ones(len(lengths) + 1)) * (frames - cover - gap)
    if lengths[0] < transit:  # pin a short part to the start / end of the clip
        gaps[1], gaps[0] = gaps[1] + gaps[0], 0.0
    if lengths[-1] < transit:
        gaps[-2], gaps[-1] = gaps[-2] + gaps[-1], 0.0
    actors, start = [], float(gaps[0])
    for i, length in enumerate(lengths):
        end = start + length
        either = int(rng.choice([-1, 1]))
        if length >= transit:
            n = 1 + math.ceil((length - transit) / (0.75 * transit))
            for k in range(n):
                actors.append(make(start + (length - transit) * (k / max(n - 1, 1)), int(rng.choice([-1, 1]))))
        elif start <= 0:  # already there, leaves at `end` (walking towards the camera)
            actors.append(make(end - transit, either if kind == "grass" else 1))
        else:  # arrives at `start` near the camera and is still there at the end of the clip
            actors.append(make(start, either if kind == "grass" else -1))
        start = end + gaps[i + 1] + gap
    return actors


def _fallback(kind: str, frames: int, rng: np.random.Generator) -> list[_Actor]:
    """An anomaly in the middle of the picture at mid-clip (used when a plan ended up invisible)."""
    speed = _SPEED[kind][0] * (U_WALK if kind == "grass" else V_WALK)
    look = _look(rng, kind)
    if kind == "grass":
        return [_Actor(kind, frames / 2, 0.0, speed, 0.0, y_fixed=0.7, anomaly=True, **look)]
    return [_Actor(kind, frames / 2, 1 / _scale(0.7), speed, 0.0, anomaly=True, **look)]


# --- scene ------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: tuple[int, int]) -> np.ndarray:
    """Band-limited noise (~unit std) by bicubic upsampling of a coarse random grid."""
    coarse = rng.standard_normal(cells).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC))


def _background(height: int, width: int, seed: int) -> np.ndarray:
    """The static scene: lawns on both sides of a paved path, trees at the far left, soft vignetting."""
    rng = np.random.default_rng([seed, 0])
    ys = ((np.arange(height, dtype=np.float32) + 0.5) / height)[:, None]
    xs = ((np.arange(width, dtype=np.float32) + 0.5) / width)[None, :]
    scale = _scale(ys)
    u = (xs - _path_x(ys, 0.0)) / (PATH_HALF * scale)
    inside_px = (1 - np.abs(u)) * PATH_HALF * scale * width  # distance to the path edge in pixels
    on_path = np.clip(inside_px + 0.5, 0, 1)
    fine = rng.standard_normal((height, width)).astype(np.float32)
    # lawn: blotchy mid-dark grey with blade texture
    grass = 100 + 9 * _smooth_noise(rng, height, width, (7, 10)) + 6 * _smooth_noise(rng, height, width, (20, 30))
    grass += 5 * _smooth_noise(rng, height, width, (70, 105)) + 5 * fine
    # paving: light, slightly uneven, with joints every ~stride of ground (equally spaced in 1/scale)
    path = 158 + 5 * _smooth_noise(rng, height, width, (5, 8)) + 2 * _smooth_noise(rng, height, width, (40, 60))
    path += 2 * fine
    q = (1 / scale) / 0.11
    joint_px = np.abs(q - np.round(q)) * 0.11 * scale**2 * height / K
    path -= 12 * np.clip(0.9 - joint_px, 0, 1)
    path += 22 * np.clip(1.2 - np.abs(inside_px - 1.0 - 1.5 * scale), 0, 1)  # a bright curb along the edges
    img = grass * (1 - on_path) + path * on_path
    # soft shade of the trees on the far half, then the trees and bushes themselves (top left)
    shade = _smooth_noise(rng, height, width, (6, 9)) + 5 * (0.3 - ys) + 2.5 * (0.5 - xs) - 0.6
    img *= 1 - 0.2 * np.clip(shade, 0, 1)
    crowns = _smooth_noise(rng, height, width, (9, 14)) + 5 * (0.3 - ys) + 3 * (0.45 - xs) - 1.2
    tree = np.clip(crowns * 3, 0, 1) * (1 - on_path)
    leaves = 50 + 12 * _smooth_noise(rng, height, width, (12, 18)) + 10 * _smooth_noise(rng, height, width, (45, 68))
    img = img * (1 - tree) + (leaves + 5 * fine) * tree
    img *= 1 - 0.12 * ((xs - 0.5) ** 2 + (ys - 0.5) ** 2)  # lens vignetting
    return img.astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """What every clip shares: the static background and a bank of sensor-noise frames."""

    background: np.ndarray  # float32 [H, W]
    noise: np.ndarray  # float32 [N, H + M, W + M]; a frame takes a random crop (and flips) of one of them

    @property
    def shape(self) -> tuple[int, int]:
        return self.background.shape


def build_scene(height: int, width: int, seed: int) -> Scene:
    """The fixed camera view (deterministic from ``seed``)."""
    noise = np.random.default_rng([seed, 4]).standard_normal((16, height + 16, width + 16), dtype=np.float32)
    return Scene(_background(height, width, seed), noise)


# --- drawing ----------------------------------------------------------------------------------------
# Items are (actor, frame) pairs. All items of one kind and size class are rasterised at once into small
# patches that follow them (numpy work per shape, not per shape and frame), then composited per frame,
# far to near. Patch extent around the feet, in units of the drawn height: (left, right, up, down).
_PATCH = {
    "walker": (0.3, 0.45, 1.02, 0.1),
    "grass": (0.3, 0.45, 1.02, 0.1),
    "biker": (0.52, 0.62, 1.12, 0.22),
    "skater": (0.45, 0.5, 0.95, 0.2),
    "cart": (0.43, 0.56, 0.76, 0.1),
    "wheelchair": (0.4, 0.45, 0.83, 0.1),
}


class _Patches:
    """``n`` same-size rasters, one per item: premultiplied colour, transmittance and object coverage.

    Each shape is evaluated only on the block of the patches that its items can touch.
    """

    def __init__(self, ox: np.ndarray, oy: np.ndarray, ph: int, pw: int, track_solid: bool) -> None:
        n = len(ox)
        self.ox, self.oy, self.ph, self.pw = ox, oy, ph, pw
        self.gx = (ox[:, None] + np.arange(pw)).astype(np.float32)[:, None, :]  # [n, 1, pw] pixel columns
        self.gy = (oy[:, None] + np.arange(ph)).astype(np.float32)[:, :, None]  # [n, ph, 1] pixel rows
        self.color = np.zeros((n, ph, pw), np.float32)
        self.trans = np.ones((n, ph, pw), np.float32)  # how much of the background shows through
        # coverage by the object itself, without its shadow: the anomaly mask
        self.solid = np.zeros((n, ph, pw), np.float32) if track_solid else None

    def _block(self, cx, cy, rx, ry):
        """The patch block holding every item's box [cx - rx, cx + rx] x [cy - ry, cy + ry]."""
        r0 = max(int(np.floor((cy - ry - self.oy).min())) - 1, 0)
        r1 = min(int(np.ceil((cy + ry - self.oy).max())) + 2, self.ph)
        c0 = max(int(np.floor((cx - rx - self.ox).min())) - 1, 0)
        c1 = min(int(np.ceil((cx + rx - self.ox).max())) + 2, self.pw)
        if r0 >= r1 or c0 >= c1:
            return None
        return (slice(None), slice(r0, r1), slice(c0, c1)), self.gx[:, :, c0:c1], self.gy[:, r0:r1]

    def _over(self, block, a: np.ndarray, color, solid: bool = True) -> None:
        """Paint coverage ``a`` of grey ``color`` on top of what is there."""
        keep = 1 - a
        self.color[block] *= keep
        self.color[block] += a * _col(color)
        self.trans[block] *= keep
        if solid and self.solid is not None:
            self.solid[block] *= keep
            self.solid[block] += a

    def ellipse(self, cx, cy, rx, ry, color, ring=None) -> None:
        """Filled ellipse, or a ring ``ring`` pixels wide."""
        rx, ry = np.maximum(rx, 0.3), np.maximum(ry, 0.3)
        found = self._block(cx, cy, rx, ry)
        if found is None:
            return
        block, gx, gy = found
        rx, ry = _col(rx), _col(ry)
        d = np.sqrt(((gx - _col(cx)) / rx) ** 2 + ((gy - _col(cy)) / ry) ** 2)
        if ring is not None:
            a = _col(ring) / 2 + 0.5 - np.abs(1 - d) * (0.5 * (rx + ry))
        else:
            a = np.minimum(rx, ry) * (1 - d) + 0.5  # ~signed distance to the edge in pixels
        self._over(block, np.clip(a, 0, 1, out=a), color)

    def box(self, cx, cy, rx, ry, color) -> None:
        found = self._block(cx, cy, rx, ry)
        if found is None:
            return
        block, gx, gy = found
        ax = np.clip(_col(rx) + 0.5 - np.abs(gx - _col(cx)), 0, 1)
        ay = np.clip(_col(ry) + 0.5 - np.abs(gy - _col(cy)), 0, 1)
        self._over(block, ax * ay, color)

    def line(self, x0, y0, x1, y1, width, color) -> None:
        """A thick segment (legs, arms, bike frames, boards)."""
        found = self._block((x0 + x1) / 2, (y0 + y1) / 2, np.abs(x1 - x0) / 2 + width, np.abs(y1 - y0) / 2 + width)
        if found is None:
            return
        block, gx, gy = found
        bx, by = _col(x1 - x0), _col(y1 - y0)
        px, py = gx - _col(x0), gy - _col(y0)
        t = np.clip((px * bx + py * by) / np.maximum(bx * bx + by * by, 1e-6), 0, 1)
        a = _col(width) / 2 + 0.5 - np.sqrt((px - t * bx) ** 2 + (py - t * by) ** 2)
        self._over(block, np.clip(a, 0, 1, out=a), color)

    def shadow(self, cx, cy, rx, ry, strength: float) -> None:
        """Soft darkening on the ground (never part of the anomaly mask)."""
        found = self._block(cx, cy, rx * 1.1, ry * 1.1)
        if found is None:
            return
        block, gx, gy = found
        d2 = ((gx - _col(cx)) / _col(rx)) ** 2 + ((gy - _col(cy)) / _col(ry)) ** 2
        self._over(block, strength * np.clip(1.2 - d2, 0, 1), 0.0, solid=False)


def _col(v) -> np.ndarray | float:
    """Per-item values [n] -> [n, 1, 1] so they broadcast over patches."""
    return v[:, None, None] if isinstance(v, np.ndarray) else v


def _draw_person(p: _Patches, s: dict[str, np.ndarray]) -> None:
    x, y, h, dx, dy, c = s["x"], s["y"], s["h"], s["dx"], s["dy"], s["colors"]
    step = np.sin(s["phase"])
    bob = 0.015 * h * np.abs(step)
    wide = np.where(dx * dx < 0.5, 1.0, 0.8)  # seen from the side, shoulders look narrower
    hip = y - 0.47 * h - bob
    for side in (-1, 1):  # legs swing along the direction of motion (foreshortened vertically)
        fx = x + side * (0.045 * h * wide + step * 0.11 * h * dx)
        fy = y + side * step * 0.05 * h * dy - 0.01 * h
        p.line(x + side * 0.04 * h * wide, hip, fx, fy, np.maximum(0.09 * h * wide, 0.6), c[:, 1])
    p.ellipse(x, y - 0.67 * h - bob, 0.14 * h * wide, 0.21 * h, c[:, 0])
    p.ellipse(x - 0.03 * h, y - 0.74 * h - bob, 0.06 * h, 0.08 * h, np.minimum(c[:, 0] + 18, 255))  # lit side
    bag = s["bag"]
    if bag.any():
        on = bag != 0  # a bag hanging at one side (drawn off-patch for the others)
        p.ellipse(x + np.where(on, bag * 0.15 * h * wide, 1e4), y - 0.6 * h - bob, 0.06 * h, 0.085 * h, 35)
    p.ellipse(x, y - 0.92 * h - bob, 0.072 * h, 0.08 * h, c[:, 2])


def _draw_biker(p: _Patches, s: dict[str, np.ndarray]) -> None:
    x, y, h, dx, dy, c = s["x"], s["y"], s["h"], s["dx"], s["dy"], s["colors"]
    r = 0.19 * h
    fx, fy = 0.3 * h * dx, 0.18 * h * dy  # wheel offsets along the motion, foreshortened vertically
    thin = np.maximum(0.045 * h, 0.7)
    for sign in (-1, 1):
        p.ellipse(x + sign * fx, y - r + sign * fy, r, r * (0.8 + 0.2 * np.abs(dx)), 30, ring=np.maximum(0.08 * h, 1))
    p.line(x - fx, y - r - fy, x + fx, y - r + fy, thin, 40)  # frame
    bar_x, bar_y = x + fx, y - 2.1 * r + fy
    p.line(bar_x, bar_y, x + fx, y - r + fy, thin, 40)  # fork
    p.line(bar_x - 0.16 * h, bar_y, bar_x + 0.16 * h, bar_y, thin, 35)  # handlebar
    pedal = 0.07 * h * np.sin(2 * s["phase"])
    for sign in (-1, 1):
        p.line(x, y - 0.55 * h, x + sign * pedal, y - 0.23 * h, np.maximum(0.08 * h, 0.6), c[:, 1])
    p.ellipse(x + 0.05 * h * dx, y - 0.74 * h, 0.14 * h, 0.2 * h, c[:, 0])
    for sign in (-1, 1):  # arms to the handlebar
        p.line(x + sign * 0.1 * h, y - 0.82 * h, bar_x + sign * 0.12 * h, bar_y, thin, c[:, 0])
    p.ellipse(x + 0.08 * h * dx, y - 0.99 * h, 0.072 * h, 0.08 * h, c[:, 2])


def _draw_skater(p: _Patches, s: dict[str, np.ndarray]) -> None:
    x, y, h, dx, dy, c = s["x"], s["y"], s["h"], s["dx"], s["dy"], s["colors"]
    bx, by = 0.3 * h * dx, 0.15 * h * dy
    p.line(x - bx, y - by, x + bx, y + by, np.maximum(0.07 * h, 0.8), 25)  # board
    for sign in (-1, 1):  # crouched legs
        p.line(x + sign * 0.06 * h, y - 0.02 * h, x + sign * 0.03 * h, y - 0.42 * h, np.maximum(0.09 * h, 0.7), c[:, 1])
    p.ellipse(x + 0.05 * h * dx, y - 0.6 * h, 0.14 * h, 0.2 * h, c[:, 0])
    swing = 0.06 * h * np.sin(0.5 * s["phase"])  # arms out for balance, rocking slowly
    p.line(x - 0.32 * h, y - 0.58 * h + swing, x + 0.32 * h, y - 0.58 * h - swing, np.maximum(0.06 * h, 0.7), c[:, 0])
    p.ellipse(x + 0.08 * h * dx, y - 0.84 * h, 0.075 * h, 0.085 * h, c[:, 2])


def _draw_cart(p: _Patches, s: dict[str, np.ndarray]) -> None:
    x, y, h, c = s["x"], s["y"], s["h"], s["colors"]
    p.box(x, y - 0.27 * h, 0.36 * h, 0.22 * h, c[:, 0])  # bright body
    for sign in (-1, 1):
        p.ellipse(x + sign * 0.27 * h, y - 0.05 * h, 0.07 * h, 0.06 * h, c[:, 1])  # wheels
        p.box(x + sign * 0.31 * h, y - 0.56 * h, 0.02 * h, 0.1 * h, c[:, 1])  # roof posts
    p.box(x, y - 0.5 * h, 0.27 * h, 0.06 * h, 70)  # windscreen
    p.ellipse(x, y - 0.47 * h, 0.06 * h, 0.07 * h, c[:, 2])  # driver
    p.box(x, y - 0.68 * h, 0.39 * h, 0.05 * h, c[:, 3])  # roof


def _draw_wheelchair(p: _Patches, s: dict[str, np.ndarray]) -> None:
    x, y, h, c = s["x"], s["y"], s["h"], s["colors"]
    for sign in (-1, 1):
        p.ellipse(x + sign * 0.25 * h, y - 0.22 * h, 0.1 * h, 0.22 * h, c[:, 3], ring=np.maximum(0.065 * h, 0.9))
    p.box(x, y - 0.1 * h, 0.09 * h, 0.1 * h, c[:, 1])  # lower legs
    p.box(x, y - 0.27 * h, 0.13 * h, 0.07 * h, c[:, 1])  # lap
    p.ellipse(x, y - 0.46 * h, 0.14 * h, 0.17 * h, c[:, 0])
    p.ellipse(x, y - 0.7 * h, 0.072 * h, 0.08 * h, c[:, 2])


_DRAW = {
    "walker": _draw_person,
    "grass": _draw_person,
    "biker": _draw_biker,
    "skater": _draw_skater,
    "cart": _draw_cart,
    "wheelchair": _draw_wheelchair,
}


def _rasterise(kind: str, s: dict[str, np.ndarray], max_elements: int = 1 << 21) -> list[tuple[np.ndarray, _Patches]]:
    """Rasterise items of one kind (state arrays [n]) in size classes, so patches stay tight.

    Returns (item indices, their patches) pairs."""
    left, right, up, down = _PATCH[kind]
    size_class = np.floor(np.log(np.maximum(s["h"], 1.0)) / np.log(1.3)).astype(np.int64)
    out = []
    for cls in np.unique(size_class):
        idx = np.flatnonzero(size_class == cls)
        h_max = float(s["h"][idx].max())
        ph, pw = math.ceil((up + down) * h_max) + 4, math.ceil((left + right) * h_max) + 4
        step = max(1, max_elements // (ph * pw))  # bound memory on large frames
        for start in range(0, len(idx), step):
            part = {k: v[idx[start : start + step]] for k, v in s.items()}
            ox = np.floor(part["x"] - left * part["h"]).astype(np.int64) - 2
            oy = np.floor(part["y"] - up * part["h"]).astype(np.int64) - 2
            patches = _Patches(ox, oy, ph, pw, track_solid=kind != "walker")
            p_shadow = 0.22 * part["h"] * (1.6 if kind in ("cart", "biker") else 1.0)
            patches.shadow(part["x"] + 0.16 * part["h"], part["y"] - 0.01 * part["h"], p_shadow, 0.05 * part["h"], 0.3)
            _DRAW[kind](patches, part)
            out.append((idx[start : start + step], patches))
    return out


def _render_clip(
    scene: Scene, actors: list[_Actor], frames: int, rng: np.random.Generator, with_mask: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Draw ``frames`` frames -> (uint8 [T, H, W], bool anomaly mask [T, H, W] or None)."""
    height, width = scene.shape
    t = np.arange(frames, dtype=np.float64)
    # every on-screen (actor, frame) item, grouped by kind
    items: dict[str, dict[str, list]] = {}
    for a in actors:
        s = a.trajectory(t, height, width)
        frame_idx = np.flatnonzero(s["on"])
        if not len(frame_idx):
            continue
        group = items.setdefault(a.kind, {k: [] for k in ("x", "y", "h", "dx", "dy", "phase", "colors", "bag",
                                                          "frame", "anomaly")})  # fmt: skip
        for k in ("x", "y", "h", "dx", "dy"):
            group[k].append(s[k][frame_idx].astype(np.float32))
        group["phase"].append((a.phase + 2 * np.pi * frame_idx / a.period).astype(np.float32))
        group["colors"].append(np.tile(np.asarray(a.colors, np.float32), (len(frame_idx), 1)))
        group["bag"].append(np.full(len(frame_idx), a.bag, np.float32))
        group["frame"].append(frame_idx)
        group["anomaly"].append(np.full(len(frame_idx), a.anomaly))
    order: list[tuple[int, float, _Patches, int, bool]] = []
    for kind, group in items.items():
        s = {k: np.concatenate(v) for k, v in group.items()}
        frame_of, anomalous = s.pop("frame"), s.pop("anomaly")
        for item_idx, patches in _rasterise(kind, s):
            for j, item in enumerate(item_idx):
                order.append((int(frame_of[item]), float(s["y"][item]), patches, j, bool(anomalous[item])))
    order.sort(key=lambda o: (o[0], o[1]))  # per frame, far (small y) first so nearer ones cover them
    canvas = np.empty((frames, height, width), np.float32)
    canvas[:] = scene.background
    mask = np.zeros((frames, height, width), np.float32) if with_mask else None
    for frame, _, patches, j, anomalous in order:
        ox, oy = int(patches.ox[j]), int(patches.oy[j])
        ph, pw = patches.ph, patches.pw
        x0, x1, y0, y1 = max(ox, 0), min(ox + pw, width), max(oy, 0), min(oy + ph, height)
        if x0 >= x1 or y0 >= y1:
            continue
        src = (j, slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
        region = canvas[frame, y0:y1, x0:x1]
        region *= patches.trans[src]
        region += patches.color[src]
        if anomalous and mask is not None and patches.solid is not None:
            np.maximum(mask[frame, y0:y1, x0:x1], patches.solid[src], out=mask[frame, y0:y1, x0:x1])
    # camera: per-clip exposure, a little flicker and Gaussian sensor noise (crops of the scene's bank)
    canvas *= rng.uniform(0.92, 1.08)
    canvas += rng.uniform(-6, 6)
    bank, margin = scene.noise, scene.noise.shape[1] - height
    picks = rng.integers(0, [len(bank), margin + 1, margin + 1, 2, 2], size=(frames, 5))
    flicker = rng.normal(0, 0.7, frames)
    for i, (k, oy, ox, fy, fx) in enumerate(picks):
        crop = bank[k, oy : oy + height, ox : ox + width][:: 1 - 2 * fy, :: 1 - 2 * fx]
        canvas[i] += 2.2 * crop + flicker[i]
    canvas += 0.5  # round half up on the cast below
    out = np.clip(canvas, 0, 255, out=canvas).astype(np.uint8)
    return out, (mask >= 0.5) if mask is not None else None


# --- output -----------------------------------------------------------------------------------------
def _ranges(labels: np.ndarray) -> list[tuple[int, int]]:
    """0/1 per frame -> 1-based inclusive runs of ones."""
    padded = np.concatenate([[0], labels.astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [(int(a) + 1, int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def gt_line(labels: np.ndarray) -> str:
    """One UCSD ground-truth line, e.g. ``TestVideoFile{end+1}.gt_frame = [5:90, 140:200];``."""
    body = ", ".join(f"{a}:{b}" for a, b in _ranges(labels))
    return f"TestVideoFile{{end+1}}.gt_frame = [{body}];"


def _write_images(folder: Path, images: np.ndarray, fmt: str, suffix: str) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images, start=1):
        buffer = io.BytesIO()  # encoding in memory then one write is ~2x faster than saving to a path
        Image.fromarray(image).save(buffer, format=fmt)
        (folder / f"{i:03d}{suffix}").write_bytes(buffer.getvalue())


def anomaly_type_order(seed: int) -> list[str]:
    """The seeded order in which test clips cycle through the anomaly types."""
    order = np.random.default_rng([seed, 1]).permutation(len(ANOMALY_TYPES))
    return [ANOMALY_TYPES[i] for i in order]


def synth_clip(
    scene: Scene, seed: int, split: str, index: int, frames: int, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render one clip (``kind`` = anomaly type for test clips) -> (frames, mask or None). Pure in its args."""
    rng = np.random.default_rng([seed, 2, 0 if split == "train" else 1, index])
    actors = _crowd(rng, frames)
    if kind is None:
        return _render_clip(scene, actors, frames, rng, with_mask=False)
    plan_rng = np.random.default_rng(rng.integers(2**63))
    frames_u8, mask = _render_clip(scene, actors + _anomalies(plan_rng, kind, frames), frames, rng, True)
    if not mask.any():  # the plan's actors never became visible (tiny clips): put one in plain sight
        rng = np.random.default_rng([seed, 3, index])
        frames_u8, mask = _render_clip(scene, actors + _fallback(kind, frames, rng), frames, rng, True)
    return frames_u8, mask


def run_synth(cfg: SynthConfig, show_progress: bool = True) -> Path:
    """Write the synthetic dataset into ``cfg.out/SynthPed`` and return that path.

    The dataset is built in ``OUT/.SynthPed.partial`` and renamed when complete, so a killed run never
    leaves a half-written dataset under the final name. An existing dataset is replaced only with
    ``overwrite``.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: OUT is not a folder: {out}")
    final, partial = out / DATASET_NAME, out / f".{DATASET_NAME}.partial"
    if final.exists() and not cfg.overwrite:
        raise UserError(f"synthetic dataset already exists: {final} (pass --overwrite to replace it)")
    if partial.exists():
        shutil.rmtree(partial)  # leftover of a killed run
    scene = build_scene(cfg.height, cfg.width, cfg.seed)
    order = anomaly_type_order(cfg.seed)
    jobs = [("train", i, None) for i in range(cfg.train_clips)]
    jobs += [("test", i, order[i % len(order)]) for i in range(cfg.test_clips)]
    gt_lines, types = ["TestVideoFile = {};"], {}
    label_rows = ["clip,start,end,type"]
    for split, index, kind in tqdm(jobs, desc="synth", unit="clip", disable=not show_progress):
        frames_u8, mask = synth_clip(scene, cfg.seed, split, index, cfg.frames, kind)
        name = f"{split.capitalize()}{index + 1:03d}"
        if cfg.format == "videos":  # the generic layout: one video per clip, anomalous intervals in labels.csv
            write_video(partial / split / f"{name}.{cfg.container}", frames_u8, fps=SYNTH_FPS)
            if mask is not None:
                label_rows += [f"{name},{a},{b},{kind}" for a, b in _ranges(mask.any(axis=(1, 2)))]
                types[name] = [kind]
            continue
        split_dir = partial / split.capitalize()
        _write_images(split_dir / name, frames_u8, "TIFF", ".tif")
        if mask is not None:
            _write_images(split_dir / f"{name}_gt", mask.astype(np.uint8) * 255, "BMP", ".bmp")
            gt_lines.append(gt_line(mask.any(axis=(1, 2))))
            types[name] = [kind]
    if cfg.format == "videos":
        (partial / "labels.csv").write_text("\n".join(label_rows) + "\n")
    else:
        (partial / "Test").mkdir(parents=True, exist_ok=True)
        (partial / "Test" / f"{DATASET_NAME}.m").write_text("\n".join(gt_lines) + "\n")
    (partial / "anomaly_types.json").write_text(json.dumps(types, indent=2) + "\n")
    write_resolved_config(partial, cfg, extra={"dataset": DATASET_NAME, "anomaly_types": list(ANOMALY_TYPES)})
    if final.exists():  # overwrite: swap in the new set, then delete the old one
        old = out / f".{DATASET_NAME}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)
    write_json_atomic(out / "anomaly_types.json", types)
    return final
