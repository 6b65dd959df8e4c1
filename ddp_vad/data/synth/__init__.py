"""Synthetic UCSD-style data: a fixed camera over a walkway, pedestrians, and five kinds of anomaly.

``run_synth`` writes the UCSD layout (docs/data.md)::

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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ddp_vad.config import write_resolved_config
from ddp_vad.data.sources.video import write_video
from ddp_vad.data.synth.render import anomaly_type_order, synth_clip
from ddp_vad.data.synth.scene import ANOMALY_TYPES, build_scene
from ddp_vad.errors import UserError
from ddp_vad.files import naming, staging_folder, swap_in, write_json_atomic
from ddp_vad.options import option

DATASET_NAME = "SynthPed"
SYNTH_FPS = 10  # frame rate of --format videos (UCSD's cameras record 10 frames/s)
__all__ = ["ANOMALY_TYPES", "DATASET_NAME", "SynthConfig", "gt_line", "run_synth"]


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
        path = folder / f"{i:03d}{suffix}"
        with naming(path):  # a full disk names the frame
            path.write_bytes(buffer.getvalue())


def run_synth(cfg: SynthConfig, show_progress: bool = True) -> Path:
    """Write the synthetic dataset into ``cfg.out/SynthPed`` and return that path.

    The dataset is built in ``OUT/.SynthPed.partial`` and renamed when complete, so a killed run never
    leaves a half-written dataset under the final name. An existing dataset is replaced only with
    ``overwrite``.
    """
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: OUT is not a folder: {out}")
    final = out / DATASET_NAME
    if final.exists() and not cfg.overwrite:
        raise UserError(f"synthetic dataset already exists: {final} (pass --overwrite to replace it)")
    partial = staging_folder(final)  # OUT/.SynthPed.partial; a leftover of a killed run is removed first
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
    swap_in(partial, final)  # with --overwrite the old set is deleted once the new one is in place
    write_json_atomic(out / "anomaly_types.json", types)
    return final
