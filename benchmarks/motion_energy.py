"""How far one number per frame gets: unsupervised motion scores on a dataset's labelled clips (round 4 of the levers,
``benchmarks/results/levers4.md``).

    python benchmarks/motion_energy.py DATA [--height 120 --width 182] [--flow]

For each frame t >= 1 of every test clip, the absolute difference with frame t-1 (or, with ``--flow``, the optical
flow magnitude by OpenCV's Farneback and DIS, when opencv-python-headless is installed) is averaged over square cells
of 4, 8 and 16 pixels, and the frame's score is the largest cell (max) or the mean of the 4 largest (top4). Prints
the frame AUROC pooled over every labelled frame and the mean per clip (clips holding both classes), and the
seconds per frame pair of each flow method. No label is used to score: the labels only measure.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import roc_auc_score

from ddp_vad.data.sources import open_dataset


def cell_scores(m: np.ndarray, cell: int) -> tuple[float, float]:
    """(max, mean of the 4 largest) of the cell means of one map."""
    h, w = m.shape[0] // cell * cell, m.shape[1] // cell * cell
    cells = np.sort(m[:h, :w].reshape(h // cell, cell, w // cell, cell).mean(axis=(1, 3)).ravel())
    return float(cells[-1]), float(cells[-4:].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--width", type=int, default=182)
    ap.add_argument("--flow", action="store_true", help="also optical flow (needs opencv-python-headless)")
    args = ap.parse_args()
    flows = {}
    if args.flow:
        import cv2

        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)
        flows = {
            "farneback": lambda a, b: cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 15, 3, 5, 1.2, 0),
            "dis": lambda a, b: dis.calc(a, b, None),
        }
    scores: dict[str, list[float]] = {}
    labels, clips = [], []
    seconds = dict.fromkeys(flows, 0.0)
    for clip in open_dataset(args.data).clips:
        if clip.split != "test":
            continue
        frames = clip.read(args.height, args.width)
        for t in range(1, len(frames)):
            a, b = frames[t - 1], frames[t]
            maps = {"diff": np.abs(b.astype(np.float32) - a) / 255}
            for name, flow in flows.items():
                t0 = time.perf_counter()
                f = flow(a, b)
                seconds[name] += time.perf_counter() - t0
                maps[name] = np.hypot(f[..., 0], f[..., 1])
            for name, m in maps.items():
                for cell in (4, 8, 16):
                    top1, top4 = cell_scores(m, cell)
                    scores.setdefault(f"{name} cell {cell} max", []).append(top1)
                    scores.setdefault(f"{name} cell {cell} top4", []).append(top4)
            labels.append(int(clip.frame_labels[t]))
            clips.append(clip.name)
    y, c = np.array(labels), np.array(clips)
    print(f"{args.data} at {args.height}x{args.width}: {len(y)} frames, {y.mean():.3f} anomalous")
    for name, s in scores.items():
        s = np.asarray(s)
        per = [roc_auc_score(y[c == k], s[c == k]) for k in np.unique(c) if 0 < y[c == k].mean() < 1]
        print(f"  {name:24s} pooled {roc_auc_score(y, s):.3f}  mean per clip {np.mean(per):.3f} ({len(per)} clips)")
    for name, sec in seconds.items():
        print(f"  {name}: {sec / max(len(y), 1) * 1000:.2f} ms per frame pair")


if __name__ == "__main__":
    main()
