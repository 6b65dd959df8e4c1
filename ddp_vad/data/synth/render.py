"""Drawing the actors into frames: every (object, frame) pair of one kind is rasterised at once (vectorised numpy),
with an anomaly mask per frame; :func:`synth_clip` renders one whole clip, pure in its arguments."""

from __future__ import annotations

import math

import numpy as np

from ddp_vad.data.synth.scene import (
    ANOMALY_TYPES,
    Scene,
    _Actor,
    _anomalies,
    _crowd,
    _fallback,
)

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
