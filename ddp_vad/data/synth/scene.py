"""The synthetic scene: ground-plane geometry, the actors (walkers and the five anomaly kinds) and their plans, and
the textured static background. Pure numpy, deterministic from the seed (see the package docstring)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

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
