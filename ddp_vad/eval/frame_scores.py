"""Frame-level scores of a cross-validated run, and the numbers the report leads with.

Under the leak-free protocol every window of every labelled clip is scored out of fold, by the model of the fold
that held its clip out; a frame's score is the max over the windows that cover it (in one repeat of the
cross-validation). From these frame scores come:

* the **pooled frame AUROC** over every frame of the labelled clips (the field's "micro" AUROC), per repeat and
  averaged over repeats;
* the **mean per-clip AUROC** over the clips that hold both classes;
* the **per-fold frame AUROC** (the frames of one fold's clips), whose spread over repeat-folds is reported;
* a **paired difference** between two runs on the same frames, with a bootstrap interval over clips (clips, not
  frames, are the independent units: neighbouring frames share most of their windows).

This is a supervised, cross-validated number: published results (UCSD Ped1: MDT 0.818, future-frame prediction
0.831; Ped2: future-frame prediction 0.954, MNAD 0.970) are unsupervised, trained on normal clips only and scored on
the official test clips, so they orient, not compare.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ddp_vad.train.metrics import auroc, max_over_covering

# Unsupervised frame AUROCs on each dataset's full official test set, for orientation beside our supervised number
# (a report shows the row of the dataset at hand: ddp_vad.eval.findings.published_frame_auroc).
PUBLISHED_FRAME_AUROC = {
    "UCSD Ped1": {"MDT (Mahadevan et al., 2010)": 0.818, "future frame prediction (Liu et al., 2018)": 0.831},
    "UCSD Ped2": {"future frame prediction (Liu et al., 2018)": 0.954, "MNAD (Park et al., 2020)": 0.970},
}
# The paired bootstrap draws N_BOOTSTRAP resamples, then doubles them (up to MAX_BOOTSTRAP) until each interval end
# lies within END_TOLERANCE of where unlimited resamples would put it (95%), so that two seeds agree to 0.001
# (docs/run-folders.md has the measurement).
N_BOOTSTRAP, MAX_BOOTSTRAP, END_TOLERANCE = 20_000, 1_280_000, 0.0005
_CELLS = 1 << 22  # at most this many (score, clip) cells in memory at once while the bootstrap's matrix is built


@dataclass
class RepeatFrames:
    """Every scored frame of one repeat: parallel arrays, sorted by (clip, frame)."""

    clips: np.ndarray  # str [F]
    frames: np.ndarray  # int64 [F], 0-based frame index within the clip
    labels: np.ndarray  # int64 [F]
    scores: np.ndarray  # float64 [F]
    folds: np.ndarray  # int64 [F], the fold whose model scored the frame


def _label_map(frame_labels: Any) -> Mapping[str, Sequence[int]]:
    # A WindowSet-like object (keys + frame_labels array) works as well as a plain {key: labels} mapping.
    if hasattr(frame_labels, "frame_labels") and not isinstance(frame_labels, Mapping):
        return dict(zip(list(frame_labels.keys), np.asarray(frame_labels.frame_labels).tolist(), strict=True))
    return frame_labels


def frames_by_repeat(
    oof_rows: Iterable[Mapping[str, Any]], frame_labels: Any, window: int | None = None
) -> dict[int, RepeatFrames]:
    """``{repeat: RepeatFrames}`` from out-of-fold window rows and each window's frame labels (``{key: [0/1]}``).

    Frame ``start + t`` of a clip gets the max score over the repeat's windows covering it and the max of their
    labels for it (they agree on real data). Raises ValueError when no scored window has frame labels, or when
    ``window`` is given and a window's labels are not that long.
    """
    labels_by_key = _label_map(frame_labels)
    per: dict[int, list[list]] = {}  # repeat -> flat (clip, frame, label, score, fold) entries, one per window frame
    missing = seen = 0
    for row in oof_rows:
        seen += 1
        fl = labels_by_key.get(str(row["key"]))
        if fl is None:
            missing += 1
            continue
        if window is not None and len(fl) != int(window):
            raise ValueError(f"window {row['key']}: {len(fl)} frame labels, expected {int(window)}")
        entries = per.setdefault(int(row.get("repeat", 0)), [[], [], [], [], []])
        start, n = int(row["start"]), len(fl)
        entries[0] += [str(row["clip"])] * n
        entries[1] += range(start, start + n)
        entries[2] += [int(v) for v in fl]
        entries[3] += [float(row["score"])] * n
        entries[4] += [int(row.get("fold", 0))] * n
    if seen and missing == seen:
        raise ValueError(f"none of the {missing} scored windows has frame labels (wrong shards?)")
    return {repeat: RepeatFrames(*max_over_covering(*entries)) for repeat, entries in sorted(per.items())}


def per_clipauroc(rf: RepeatFrames) -> float | None:
    """Mean of the per-clip frame AUROCs over the clips that hold both classes (None when no clip does)."""
    values = [auroc(rf.labels[rf.clips == c], rf.scores[rf.clips == c]) for c in np.unique(rf.clips)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def frame_summary(by_repeat: dict[int, RepeatFrames]) -> dict[str, Any]:
    """The frame-level numbers of one run: pooled AUROC (mean and std over repeats), mean per-clip AUROC, the
    per-(repeat, fold) AUROCs and the frame and clip counts."""
    pooled = [auroc(rf.labels, rf.scores) for rf in by_repeat.values()]
    clipwise = [per_clipauroc(rf) for rf in by_repeat.values()]
    per_fold = []
    for repeat, rf in by_repeat.items():
        for fold in np.unique(rf.folds).tolist():
            sel = rf.folds == fold
            per_fold.append({"repeat": repeat, "fold": int(fold), "frame_auroc": auroc(rf.labels[sel], rf.scores[sel])})
    defined = [v for v in pooled if v is not None]
    clip_defined = [v for v in clipwise if v is not None]
    fold_defined = [p["frame_auroc"] for p in per_fold if p["frame_auroc"] is not None]
    first = next(iter(by_repeat.values()), None)
    return {
        "frame_auroc": float(np.mean(defined)) if defined else None,
        "frame_auroc_repeat_std": float(np.std(defined)) if defined else None,
        "frame_auroc_per_repeat": pooled,
        "clip_auroc": float(np.mean(clip_defined)) if clip_defined else None,
        "fold_frame_auroc_mean": float(np.mean(fold_defined)) if fold_defined else None,
        "fold_frame_auroc_std": float(np.std(fold_defined)) if fold_defined else None,
        "per_fold": per_fold,
        "repeats": len(by_repeat),
        "n_frames": int(first.labels.size) if first is not None else 0,
        "n_anomalous_frames": int(first.labels.sum()) if first is not None else 0,
        "n_clips": int(np.unique(first.clips).size) if first is not None else 0,
    }


def _aligned(a: dict[int, RepeatFrames], b: dict[int, RepeatFrames]) -> list[tuple[RepeatFrames, np.ndarray]]:
    """Per shared repeat: ``a``'s frames restricted to those ``b`` scored too, and ``b``'s scores on them."""
    out = []
    for repeat in sorted(set(a) & set(b)):
        ra, rb = a[repeat], b[repeat]
        key_b = {(c, f): i for i, (c, f) in enumerate(zip(rb.clips.tolist(), rb.frames.tolist(), strict=True))}
        pos = [key_b.get((c, f), -1) for c, f in zip(ra.clips.tolist(), ra.frames.tolist(), strict=True)]
        keep = np.array([p >= 0 for p in pos], bool)
        if not keep.any():
            continue
        sub = RepeatFrames(ra.clips[keep], ra.frames[keep], ra.labels[keep], ra.scores[keep], ra.folds[keep])
        out.append((sub, rb.scores[np.array([p for p in pos if p >= 0], np.int64)]))
    return out


class _RankedScores:
    """One run's frame scores reduced once to a clip-by-clip matrix, so that the AUROC of any weighting of its clips
    (a bootstrap resample of clips is a weight per clip) is a quadratic form: the Mann-Whitney statistic, ties
    counted half, is ``w @ M @ w`` with ``M[c, d]`` the (anomalous frame of clip c, normal frame of clip d) pairs
    ranked right, over ``(w @ P) (w @ N)`` with ``P``, ``N`` the clips' anomalous and normal frame counts. Exact,
    and thousands of resamples cost a matrix product. ``n_clips``: the weight vectors' length (default: the largest
    clip index + 1)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray, clip_index: np.ndarray, n_clips: int | None = None):
        order = np.argsort(scores, kind="mergesort")
        s, anomalous, clip = scores[order], labels[order] == 1, np.asarray(clip_index, np.int64)[order]
        n_clips = int(n_clips if n_clips is not None else (clip.max() + 1 if clip.size else 0))
        tie = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])]) if s.size else np.zeros(0, np.int64)
        n_groups = int(tie[-1]) + 1 if tie.size else 0
        self.pos = np.bincount(clip[anomalous], minlength=n_clips).astype(np.float64)
        self.neg = np.bincount(clip[~anomalous], minlength=n_clips).astype(np.float64)
        self.pairs = np.zeros((n_clips, n_clips))
        pos = np.flatnonzero(anomalous)
        pos = pos[np.argsort(clip[pos], kind="stable")]  # anomalous frames grouped by clip
        first = np.flatnonzero(np.r_[True, clip[pos][1:] != clip[pos][:-1]]) if pos.size else pos
        step = max(1, _CELLS // max(n_groups, pos.size, 1))  # normal frames' clips a few at a time: bounded memory
        for d0 in range(0, n_clips if pos.size else 0, step):
            d1 = min(n_clips, d0 + step)
            sel = ~anomalous & (clip >= d0) & (clip < d1)
            neg = np.bincount(tie[sel] * (d1 - d0) + clip[sel] - d0, minlength=n_groups * (d1 - d0))
            neg = neg.reshape(n_groups, d1 - d0)
            ranked = np.cumsum(neg, axis=0) - 0.5 * neg  # normal frames below each tie group, ties counted half
            self.pairs[clip[pos][first], d0:d1] = np.add.reduceat(ranked[tie[pos]], first, axis=0)

    def aurocs(self, clip_weights: np.ndarray) -> np.ndarray:
        """AUROC per row of ``clip_weights`` ([draws, clips]); NaN where the weighted frames hold one class."""
        w = np.atleast_2d(np.asarray(clip_weights, np.float64))
        den = (w @ self.pos) * (w @ self.neg)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, ((w @ self.pairs) * w).sum(axis=1) / den, np.nan)

    def auroc(self, clip_weight: np.ndarray) -> float | None:
        """AUROC of one weighting of the clips (None with one class)."""
        value = float(self.aurocs(clip_weight)[0])
        return None if math.isnan(value) else value


def interval_ends(boots: np.ndarray) -> dict[str, float | list[float]]:
    """The 95% percentile interval of bootstrap draws, and where each end could fall with another seed: the
    q-quantile of n draws lies (95%) between the draws ranked n q -+ 1.96 sqrt(n q (1 - q)) (order statistics)."""
    b = np.sort(np.asarray(boots, np.float64))
    out: dict[str, float | list[float]] = {}
    for name, q in (("low", 0.025), ("high", 0.975)):
        half = 1.96 * math.sqrt(b.size * q * (1 - q))
        first, last = max(0, math.floor(b.size * q - half)), min(b.size - 1, math.ceil(b.size * q + half))
        out[name] = float(np.percentile(b, 100 * q))
        out[f"{name}_range"] = [float(b[first]), float(b[last])]
    return out


def _bootstrap(diff, n_clips: int, n_boot: int | None, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Defined draws of ``diff`` (weights per clip [draws, clips] -> [draws], NaN where undefined) over resamples of
    clips with replacement, and their :func:`interval_ends` with ``n_boot`` (resamples drawn) and ``settled``:
    ``n_boot`` resamples, or (None) N_BOOTSTRAP doubled until both ends have settled."""
    rng = np.random.default_rng([abs(int(seed)), 0xB007])
    parts: list[np.ndarray] = []
    drawn, target = 0, n_boot or N_BOOTSTRAP
    while True:
        while drawn < target:  # 4096 resamples at a time: bounded memory
            n = min(4096, target - drawn)
            draws = rng.integers(0, n_clips, (n, n_clips)) + n_clips * np.arange(n)[:, None]
            parts.append(diff(np.bincount(draws.ravel(), minlength=n * n_clips).reshape(n, n_clips)))
            drawn += n
        boots = np.concatenate(parts)
        boots = boots[~np.isnan(boots)]
        ends = interval_ends(boots) if boots.size else {"low": math.nan, "high": math.nan}
        ends["settled"] = bool(boots.size) and all(
            max(ends[e] - ends[f"{e}_range"][0], ends[f"{e}_range"][1] - ends[e]) <= END_TOLERANCE
            for e in ("low", "high")
        )
        if n_boot is not None or ends["settled"] or not boots.size or target >= MAX_BOOTSTRAP:
            return boots, {**ends, "n_boot": drawn}
        target *= 2


def paired_difference(
    a: dict[int, RepeatFrames], b: dict[int, RepeatFrames], n_boot: int | None = None, seed: int = 0
) -> dict[str, Any] | None:
    """Pooled frame AUROC of ``a`` minus that of ``b`` on the frames both scored (mean over shared repeats), with a
    95% percentile interval from a bootstrap that resamples clips with replacement (the same clips for both runs
    and every repeat): ``n_boot`` resamples, or by default as many as it takes (N_BOOTSTRAP doubled, up to
    MAX_BOOTSTRAP) for both ends to lie within END_TOLERANCE of their limit (``settled``). ``low_range`` /
    ``high_range``: where each end would fall with other draws (95%); ``borderline``: zero lies inside one of them,
    so the interval's verdict rests on bootstrap noise. Also the per-(repeat, fold) paired differences. None when
    there is nothing to pair."""
    pairs = _aligned(a, b)
    if not pairs:
        return None
    clips = np.unique(pairs[0][0].clips)
    ranked = []
    for rf, sb in pairs:
        index = np.searchsorted(clips, rf.clips)
        ranked.append((_RankedScores(rf.labels, rf.scores, index, clips.size),
                       _RankedScores(rf.labels, sb, index, clips.size)))  # fmt: skip

    def diff(weights: np.ndarray) -> np.ndarray:
        values = np.stack([ra.aurocs(weights) - rb.aurocs(weights) for ra, rb in ranked])  # [repeats, draws]
        defined = ~np.isnan(values)
        with np.errstate(invalid="ignore"):
            return np.where(defined.any(axis=0), np.nansum(values, axis=0) / defined.sum(axis=0), np.nan)

    point = float(diff(np.ones(clips.size))[0])
    if math.isnan(point):
        return None
    boots, ends = _bootstrap(diff, clips.size, n_boot, seed)
    per_fold = []
    for rf, sb in pairs:
        for fold in np.unique(rf.folds).tolist():
            sel = rf.folds == fold
            da, db = auroc(rf.labels[sel], rf.scores[sel]), auroc(rf.labels[sel], sb[sel])
            if da is not None and db is not None:
                per_fold.append(da - db)
    ranges = [ends[k] for k in ("low_range", "high_range") if k in ends]
    return {
        "diff": point,
        **ends,
        "borderline": any(lo < 0 < hi for lo, hi in ranges),
        "n_undefined": int(ends["n_boot"] - boots.size),  # resamples with one class only: left out
        "n_clips": int(clips.size),
        "repeats": len(pairs),
        "per_fold_mean": float(np.mean(per_fold)) if per_fold else None,
        "per_fold_std": float(np.std(per_fold)) if per_fold else None,
        "n_folds": len(per_fold),
    }


def clip_timeline(by_repeat: dict[int, RepeatFrames], clip: str, repeat: int = 0) -> tuple[np.ndarray, ...] | None:
    """(frames, scores, labels) of one clip in one repeat, in frame order (None when the run did not score it)."""
    rf = by_repeat.get(repeat)
    if rf is None:
        return None
    sel = rf.clips == clip
    if not sel.any():
        return None
    return rf.frames[sel], rf.scores[sel], rf.labels[sel]


def timeline_clips(by_repeat: dict[int, RepeatFrames], n: int = 4) -> list[str]:
    """Up to ``n`` clips to draw: those holding both classes, spread over the anomaly shares (deterministic)."""
    rf = by_repeat.get(0) or next(iter(by_repeat.values()), None)
    if rf is None:
        return []
    shares = {c: float(rf.labels[rf.clips == c].mean()) for c in np.unique(rf.clips).tolist()}
    both = sorted((s, c) for c, s in shares.items() if 0.0 < s < 1.0)
    if len(both) <= n:
        return [c for _, c in both]
    picks = np.linspace(0, len(both) - 1, n).round().astype(int)
    return [both[i][1] for i in sorted(set(picks.tolist()))]


def read_shard_frame_labels(shard_dir: str | os.PathLike, select: str = "kept") -> dict[str, list[int]]:
    """Per-window frame labels ``{key: [0/1 x T]}`` of the ``select`` windows (``kept``: the balanced set of the
    window and clip protocols; ``leakfree``: every window of the labelled clips), from the block metadata only.

    Much cheaper than materialising every window (no frames are read). Raises UserError when the
    folder holds no manifest or a listed shard is damaged (frame-level metrics need every window).
    """
    from ddp_vad.data.reader import iter_windows  # the shard reader: imported only when shards are read

    return {w["key"]: w["meta"]["frame_labels"] for w in iter_windows(shard_dir, select, frames=False)}


def frame_level_scores(
    oof_rows: Iterable[Mapping[str, Any]],
    frame_labels: Mapping[str, Sequence[int]] | Any,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
    """Per-frame labels and scores of repeat 0 from out-of-fold window scores (the rule of
    :func:`frames_by_repeat`, which does every repeat).

    ``frame_labels`` maps a window key to its per-frame labels (length ``window``), as stored in each
    shard sample's json (see :func:`read_shard_frame_labels`); a ``WindowSet`` works too. Frame ``start + t``
    of a clip gets the *max* score over the scored windows that cover it and the label its windows give it
    (the max, should they ever disagree). Frames covered by no scored window are left out. ``window`` defaults to
    the length of the labels.

    Returns ``(labels, scores, index)`` with ``index[i] = (clip, frame)`` in sorted order.
    """
    rf = frames_by_repeat([r for r in oof_rows if int(r.get("repeat", 0)) == 0], frame_labels, window).get(0)
    if rf is None:
        return np.zeros(0, np.int64), np.zeros(0, np.float64), []
    return rf.labels, rf.scores, list(zip(rf.clips.tolist(), rf.frames.tolist(), strict=True))


def frame_level_auroc(
    oof_rows: Iterable[Mapping[str, Any]],
    frame_labels: Mapping[str, Sequence[int]] | Any,
    window: int | None = None,
) -> float | None:
    """Frame-level AUROC of :func:`frame_level_scores`; None with one class."""
    y, s, _ = frame_level_scores(oof_rows, frame_labels, window)
    return auroc(y, s)
