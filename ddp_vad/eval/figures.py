"""The report's figures (matplotlib, no display needed): accuracy per fold, confusion matrices, GAN similarity
curves, and real vs generated windows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.files import atomic_path


def _new_figure(width: float, height: float):
    # A bare Agg Figure: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", bbox_inches="tight")
    return path


def fig_accuracy_by_fold(entries: list[dict], labels: list[str], metric: str = "accuracy"):
    """Figure 2: ``metric`` per fold (every fold of every repeat, numbered repeat x folds + fold), one line per
    method, chance level dashed."""
    fig = _new_figure(7.5, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    max_fold = -1
    for entry, label in zip(entries, labels, strict=True):
        per_repeat = int(entry.get("folds_per_repeat") or entry["n_folds"])
        x = [int(f.get("repeat", 0)) * per_repeat + int(f["fold"]) for f in entry["folds"]]
        y = [math.nan if f.get(metric) is None else float(f[metric]) for f in entry["folds"]]
        ax.plot(x, y, marker="o", label=label)
        max_fold = max([max_fold, *x])
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlabel("fold (repeat x folds + fold, as in metrics.json)")
    name = metric.replace("_", " ").replace("auroc", "AUROC")
    ax.set_ylabel(name)
    ax.set_ylim(0.0, 1.02)
    ax.set_xticks(range(0, max_fold + 1))
    ax.set_title(f"{name[0].upper()}{name[1:]} per fold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def fig_label_efficiency(by_method: dict[str, dict[float, dict]], metric: str = "accuracy"):
    """Figure 1: ``metric`` against the labelled fraction, one line per method; error bars are the std over folds
    (for the pooled frame AUROC: of the per-fold frame AUROCs)."""
    fig = _new_figure(7.5, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    for method, runs in by_method.items():
        points = sorted(
            (f, e["mean"][metric], e["std"][metric]) for f, e in runs.items() if e["mean"][metric] is not None
        )
        if not points:
            continue
        x, y, err = (np.array(v, dtype=float) for v in zip(*points, strict=True))
        learned = method in ("GAN+LRCN", "LRCN", "Random+LRCN")
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, linewidth=2.2 if learned else 1.0,
                    linestyle="-" if learned else ":", label=method)  # fmt: skip
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xscale("log")
    fractions = sorted({f for runs in by_method.values() for f in runs})
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("labelled fraction of each fold's training windows (log scale)")
    pooled = metric == "frame_auroc"
    ax.set_ylabel("frame AUROC (pooled; bars: std over folds)" if pooled else f"{metric} (mean ± std over folds)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title("Label efficiency: does GAN pretraining help when labels are scarce?")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def fig_confusion(entries: list[dict], labels: list[str]):
    """2x2 confusion matrix (summed over folds) per method; rows = truth, columns = prediction."""
    shown = [(e, lab) for e, lab in zip(entries, labels, strict=True) if e["confusion"]]
    n = max(1, len(shown))
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _new_figure(3.0 * cols, 2.9 * rows)
    for i, (entry, label) in enumerate(shown):
        c = entry["confusion"]
        mat = np.array([[c["tn"], c["fp"]], [c["fn"], c["tp"]]])
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(mat, cmap="Blues", vmin=0, vmax=max(1, mat.max()))
        for (r, k), v in np.ndenumerate(mat):
            ax.text(k, r, str(v), ha="center", va="center", color="black" if v < 0.6 * mat.max() else "white")
        ax.set_xticks([0, 1], ["normal", "anomal."])
        ax.set_yticks([0, 1], ["normal", "anomal."])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(label, fontsize=9)
    if not shown:
        fig.text(0.5, 0.5, "no confusion counts", ha="center")
    fig.tight_layout()
    return fig


def fig_similarity(curves: list[tuple[str, dict[str, list[float]]]]):
    """Figure 3: cosine similarity and L2 distance of real vs generated windows over training steps."""
    fig = _new_figure(9.0, 3.6)
    ax_cos = fig.add_subplot(1, 2, 1)
    ax_l2 = fig.add_subplot(1, 2, 2)
    for name, cols in curves:
        ax_cos.plot(cols["step"], cols["cosine"], marker=".", label=name)
        ax_l2.plot(cols["step"], cols["l2"], marker=".", label=name)
    ax_cos.set_title("cosine similarity (real vs fake)")
    ax_l2.set_title("L2 distance (real vs fake)")
    for ax in (ax_cos, ax_l2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def real_windows(shard_dir: Path, n: int, select: str = "kept") -> list[tuple[str, np.ndarray]]:
    """The first ``n`` windows of a shard set (key, uint8 [T, H, W]) among ``select`` (the windows a stage reads,
    e.g. ``train`` for a leak-free GAN), read lazily from the first shards; a damaged shard is reported and skipped."""
    from itertools import islice

    from ddp_vad.data.stream import stream_windows

    samples = stream_windows(shard_dir, split="all", shuffle=False, select=select)
    return [(s["key"], np.array(s["frames"])) for s in islice(samples, n)]


def _latent_dim(generator: Any, model_cfg: Any) -> int:
    for name in ("z_dim", "latent_dim", "noise_dim", "nz", "zdim"):
        value = model_cfg.get(name) if isinstance(model_cfg, dict) else getattr(model_cfg, name, None)
        if value:
            return int(value)
    import torch

    for module in generator.modules():  # the first Linear takes z
        if isinstance(module, torch.nn.Linear):
            return int(module.in_features)
    raise UserError("cannot tell the generator's latent size from its config")


def fake_windows(run_dir: Path, n: int, seed: int = 0) -> np.ndarray:
    """``n`` generated windows (float [n, T, H, W] in [0, 1]) from the run's exported generator."""
    import torch

    from ddp_vad.weights import load_generator

    generator, model_cfg = load_generator(run_dir)
    generator.eval()
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, _latent_dim(generator, model_cfg), generator=gen)
    with torch.no_grad():
        out = generator(z).float().cpu()
    h, w = out.shape[-2:]
    return out.reshape(n, -1, h, w).clamp_(0, 1).numpy()


def fig_real_vs_fake(real: list[tuple[str, np.ndarray]], fake: np.ndarray, max_frames: int = 10):
    """Figure 4: rows of real windows (from the shards) above rows of generated ones, frames left to right."""
    rows = [(f"real {k}", f.astype(np.float32) / 255.0) for k, f in real]
    rows += [(f"fake {i}", f) for i, f in enumerate(fake)]
    t = min(max_frames, max(r[1].shape[0] for r in rows))
    h, w = rows[0][1].shape[-2:]
    fig = _new_figure(1.1 * t * w / max(h, 1) + 1.2, 1.1 * len(rows) + 0.3)
    for r, (name, window) in enumerate(rows):
        for c in range(t):
            ax = fig.add_subplot(len(rows), t, r * t + c + 1)
            if c < window.shape[0]:
                ax.imshow(window[c], cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
            if r == 0:
                ax.set_title(f"t={c}", fontsize=7)
    fig.suptitle("Real (top) vs generated (bottom) windows", fontsize=10)
    return fig


def _shade_truth(ax, frames: np.ndarray, labels: np.ndarray) -> None:
    """Shade the anomalous stretches of a clip (ground truth) on a score-over-time axis."""
    on = np.flatnonzero(np.diff(np.concatenate([[0], labels.astype(np.int8), [0]])))
    for i, (lo, hi) in enumerate(zip(on[::2], on[1::2], strict=True)):
        ax.axvspan(frames[lo] - 0.5, frames[hi - 1] + 0.5, color="red", alpha=0.15, lw=0,
                   label="ground truth: anomalous" if i == 0 else None)  # fmt: skip


def fig_timelines(clips: dict[str, dict[str, Any]]):
    """Figure 5: out-of-fold anomaly score over time for a few held-out clips, one line per method, the ground
    truth's anomalous frames shaded (the field's standard picture). ``clips``: {clip: {"frames", "labels",
    "scores": {method: scores}}} with the frames in order."""
    n = max(1, len(clips))
    fig = _new_figure(9.0, 2.3 * n + 0.4)
    for i, (clip, data) in enumerate(clips.items()):
        ax = fig.add_subplot(n, 1, i + 1)
        frames, labels = np.asarray(data["frames"]), np.asarray(data["labels"])
        _shade_truth(ax, frames, labels)
        for method, scores in data["scores"].items():
            ax.plot(frames, scores, linewidth=1.4, label=method)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("P(anomalous)")
        ax.set_title(f"{clip} (held out: scored by the model of the fold that did not train on it)", fontsize=9)
        ax.grid(alpha=0.3)
        if i == 0:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    if clips:
        fig.axes[-1].set_xlabel("frame")
    else:
        fig.text(0.5, 0.5, "no clip with both classes was scored", ha="center")
    fig.tight_layout()
    return fig
