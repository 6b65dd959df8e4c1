"""Classic ML baselines (scikit-learn) on flattened 60x90 windows, on the same folds as ``transfer``.

For each method, ``OUT/<method>/`` gets ``config.json``, ``oof_scores.csv`` and ``metrics.json`` in the
format of :mod:`ddp_vad.eval.metrics`. A method whose ``metrics.json`` exists is skipped (resume).

Memory plan for the full Ped1 set (~8k windows x 54,000 features = ~1.7 GB float32): the windows are
resized chunk by chunk into one preallocated float32 matrix (the uint8 frames are dropped afterwards);
each fold copies its training rows into one reused buffer and standardises that copy in place with
statistics from the training rows only (computed chunk-wise, no full-size temporaries). Every estimator
works on float32 without converting (the linear SVM is ``SGDClassifier(loss="hinge")``: ``LinearSVC``
would make a float64 copy). Peak ~2x the feature matrix.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.eval.metrics import binary_metrics, read_cv_results
from ddp_vad.options import option
from ddp_vad.train.crossval import PROTOCOLS, CVWindows, finish_cv, fold_split, score_fold

METHODS = ("logreg", "svm", "rf", "knn", "nb")


@dataclass
class BaselinesConfig:
    """Options of ``ddp_vad baselines``."""

    shards: str = option(help="Shard folder.")
    out: str = option(help="Writes OUT/<method>/ files.")
    methods: str = option(",".join(METHODS), f"Comma-separated: {','.join(METHODS)}.")
    protocol: str = option(
        "window", "Folds over windows (the method's) or grouped by clip (no leakage).", choices=PROTOCOLS
    )
    folds: int | None = option(None, "Must match the shards' fold count (default: the shards').")
    seed: int = option(0, "Seed of the estimators.")
    height: int = option(60, "Feature height (no upsampling).")
    width: int = option(90, "Feature width (no upsampling).")
    n_jobs: int | None = option(None, "Parallel jobs for rf/knn (default: all cores).")
    rf_trees: int = option(100, "Random-forest trees.")
    # Bounded trees keep fit time and memory predictable on 54k features.
    rf_max_depth: int = option(20, "Random-forest depth limit.")

    def __post_init__(self) -> None:
        shard_dir = Path(self.shards)
        if not (shard_dir / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json there (build shards with `ddp_vad shard build`)")
        if isinstance(self.methods, list | tuple):
            self.methods = ",".join(self.methods)
        names = [m.strip() for m in str(self.methods).split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if not names or unknown:
            raise UserError(f"--methods {self.methods}: choose from {','.join(METHODS)}")
        self.methods = ",".join(dict.fromkeys(names))  # de-duplicated, order kept
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol}: choose window or clip")
        if self.folds is not None and int(self.folds) < 2:
            raise UserError(f"--folds {self.folds}: need at least 2")
        if int(self.height) < 1 or int(self.width) < 1:
            raise UserError(f"--height/--width {self.height}x{self.width}: must be positive")
        if self.n_jobs is not None and int(self.n_jobs) == 0:
            raise UserError("--n-jobs 0: use a positive number or -1 (all cores)")
        if int(self.rf_trees) < 1 or int(self.rf_max_depth) < 1:
            raise UserError(f"--rf-trees {self.rf_trees} / --rf-max-depth {self.rf_max_depth}: must be positive")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")

    @property
    def method_list(self) -> list[str]:
        """Methods to run, in the order given."""
        return self.methods.split(",")


def make_estimator(
    method: str, seed: int = 0, n_jobs: int | None = None, rf_trees: int = 100, rf_max_depth: int | None = 20
):
    """A fresh scikit-learn classifier for a baseline name (all keep float32 inputs without copying)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.naive_bayes import GaussianNB
    from sklearn.neighbors import KNeighborsClassifier

    if method == "logreg":
        return LogisticRegression(C=1.0, max_iter=300, random_state=seed)
    if method == "svm":  # linear SVM (hinge loss) by SGD; float32-native
        return SGDClassifier(loss="hinge", alpha=1e-3, max_iter=50, tol=1e-3, random_state=seed)
    if method == "rf":
        return RandomForestClassifier(
            n_estimators=rf_trees,
            max_depth=rf_max_depth,
            max_features="sqrt",
            min_samples_leaf=2,
            n_jobs=n_jobs,
            random_state=seed,
        )
    if method == "knn":
        return KNeighborsClassifier(n_neighbors=5, algorithm="brute", n_jobs=n_jobs)
    if method == "nb":
        return GaussianNB()
    raise ValueError(f"unknown baseline {method!r}")


def anomaly_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """P(anomalous) per row: ``predict_proba[:, 1]``, or the sigmoid of the SVM's decision function."""
    classes = list(model.classes_)
    if hasattr(model, "predict_proba") and getattr(model, "loss", None) != "hinge":
        return model.predict_proba(x)[:, classes.index(1)].astype(np.float64)
    d = np.asarray(model.decision_function(x), dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(d, -500, 500)))


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


def _mean_std(x: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
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


def _standardise_(x: np.ndarray, mean: np.ndarray, std: np.ndarray, chunk: int = 512) -> None:
    for lo in range(0, x.shape[0], chunk):
        block = x[lo : lo + chunk]
        block -= mean
        block /= std


def _n_jobs(n_jobs: int | None) -> int:
    if n_jobs is not None:
        return int(n_jobs)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _fit_predict(method: str, cfg: BaselinesConfig, x_train, y_train, x_test, seen_warnings: dict) -> tuple:
    """Scores, predictions and a note for one fold; warnings of the fit are collected (de-duplicated)."""
    train_classes = np.unique(y_train)
    if train_classes.size < 2:
        # Nothing to learn from one class: predict it, and say so rather than crash.
        only = int(train_classes[0]) if train_classes.size else 0
        note = f"training folds hold class {only} only: constant prediction"
        return np.full(len(x_test), float(only)), np.full(len(x_test), only, dtype=np.int64), note
    model = make_estimator(method, cfg.seed, _n_jobs(cfg.n_jobs), cfg.rf_trees, cfg.rf_max_depth)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x_train, y_train)
        y_pred = np.asarray(model.predict(x_test), dtype=np.int64)
        score = anomaly_scores(model, x_test)
    for w in caught:
        seen_warnings[f"{w.category.__name__}: {str(w.message).splitlines()[0]}"] = None
    return score, y_pred, None


def _run_method(
    method: str, cfg: BaselinesConfig, x: np.ndarray, cv: CVWindows, n_folds: int, buf: np.ndarray
) -> tuple[list[dict], list[dict], list[str]]:
    """k-fold CV of one method. Returns fold rows, out-of-fold rows and de-duplicated fit warnings."""
    from tqdm.auto import tqdm

    fold_rows: list[dict] = []
    oof_rows: list[dict] = []
    seen_warnings: dict[str, None] = {}
    for k in tqdm(range(n_folds), desc=f"{method} folds", unit="fold", leave=False):
        train_idx, test_idx, _ = fold_split(cv, k)
        if test_idx.size == 0:
            fold_rows.append({"fold": k, **binary_metrics([], []), "seconds": 0.0})
            continue
        t0 = time.perf_counter()
        x_train = buf[: train_idx.size]
        np.take(x, train_idx, axis=0, out=x_train)
        mean, std = _mean_std(x_train)
        _standardise_(x_train, mean, std)
        x_test = x[test_idx]  # a copy (fancy indexing): safe to standardise in place
        _standardise_(x_test, mean, std)
        score, y_pred, note = _fit_predict(method, cfg, x_train, cv.labels[train_idx], x_test, seen_warnings)
        row, oof = score_fold(cv, k, test_idx, score, y_pred)
        if note:
            row["note"] = f"{row['note']}; {note}" if "note" in row else note
        row["seconds"] = round(time.perf_counter() - t0, 3)
        fold_rows.append(row)
        oof_rows += oof
    return fold_rows, oof_rows, list(seen_warnings)


def run_baselines(cfg: BaselinesConfig) -> dict[str, Path]:
    """Cross-validate every method in ``cfg.methods`` on the shards; write ``OUT/<method>/`` files.

    Folds are the shards' (``fold_window`` or ``fold_clip``), so the split matches ``transfer`` exactly.
    Returns ``{method: metrics.json path}``.
    """
    from ddp_vad.data.reader import load_window_set
    from ddp_vad.data.shards import fold_count, load_manifest

    out = Path(cfg.out)
    manifest = load_manifest(cfg.shards)
    n_folds = fold_count(manifest, cfg.folds, cfg.shards)
    results = {m: out / m / "metrics.json" for m in cfg.method_list}
    todo = [m for m in cfg.method_list if not results[m].is_file()]
    for m in cfg.method_list:
        if m not in todo:  # resuming must not mix protocols in one folder
            done = read_cv_results(results[m])
            if done["protocol"] != cfg.protocol:
                raise UserError(
                    f"{results[m]} holds protocol '{done['protocol']}' results, not '{cfg.protocol}': use another --out"
                )
    for m in cfg.method_list:
        if m not in todo:
            print(f"baselines: {m} already done ({results[m]}), skipping")
    if not todo:
        return results

    t_load = time.perf_counter()
    ws = load_window_set(cfg.shards)
    n, t_len, frame_h, frame_w = ws.frames.shape
    if n == 0:
        raise UserError(f"--shards {cfg.shards}: no windows")
    height, width, size_note = feature_size(frame_h, frame_w, int(cfg.height), int(cfg.width))
    x = window_features(ws.frames, height, width)
    cv = CVWindows.from_window_set(ws, cfg.protocol)
    del ws  # the uint8 frames are no longer needed
    load_seconds = time.perf_counter() - t_load
    features = {
        "height": height,
        "width": width,
        "window": t_len,
        "n_features": int(x.shape[1]),
        "n_windows": n,
        "standardise": "per fold, mean/std of the training rows",
        "note": size_note,
    }
    if size_note:
        print(f"baselines: note: {size_note}")
    print(
        f"baselines: {n} windows x {x.shape[1]} features ({x.nbytes / 2**20:.0f} MiB float32), "
        f"{n_folds} folds, protocol {cfg.protocol}, loaded in {load_seconds:.1f}s"
    )
    # One training buffer reused by every fold and method (the largest training split).
    max_train = max(int(np.sum(cv.fold_of != k)) for k in range(n_folds))
    buf = np.empty((max_train, x.shape[1]), dtype=np.float32)

    for method in todo:
        run_dir = out / method
        run_dir.mkdir(parents=True, exist_ok=True)
        estimator = make_estimator(method, cfg.seed, _n_jobs(cfg.n_jobs), cfg.rf_trees, cfg.rf_max_depth)
        write_resolved_config(
            run_dir,
            cfg,
            extra={"method": method, "features": features, "estimator": repr(estimator)},
        )
        t0 = time.perf_counter()
        fold_rows, oof_rows, fit_warnings = _run_method(method, cfg, x, cv, n_folds, buf)
        seconds = time.perf_counter() - t0
        extra = {
            "n_folds": n_folds,
            "features": features,
            "estimator": repr(estimator),
            "seconds": round(seconds, 2),
            "warnings": fit_warnings,
        }
        finish_cv(run_dir, method, cfg.protocol, fold_rows, oof_rows, extra, seconds, "baselines")
    return results


__all__ = [
    "METHODS",
    "BaselinesConfig",
    "anomaly_scores",
    "feature_size",
    "make_estimator",
    "run_baselines",
    "window_features",
]
