"""Classic ML baselines (scikit-learn) on the same folds as ``transfer``: pixel methods on flattened 60x90 windows
(the method's), motion methods on frame-difference energy per cell of a coarse grid (:mod:`ddp_vad.eval.features`),
and ``motion-energy`` on one number per window, the log motion energy of its most active cells wherever they are
(:mod:`ddp_vad.motion`).

For each method, ``OUT/<method>/`` gets ``config.json``, ``oof_scores.csv`` and ``metrics.json`` in the
format of :mod:`ddp_vad.train.metrics`. A method whose ``metrics.json`` exists is skipped (resume).

Folds run in parallel threads (:mod:`ddp_vad.eval.fold_threads`): ``--n-jobs`` cores (default: all) are shared out
as J folds at once, each estimator getting ``cores // J`` threads (its ``n_jobs``, BLAS and OpenMP), so a
single-threaded fit (the SGD of ``svm``, ``nb``) uses every core and nothing is oversubscribed. Each fold computes
what it did serially: with the same threads per estimator the scores are bit-identical whatever J is.

Memory plan for the full Ped1 set (~8k windows x 54,000 features = ~1.7 GB float32): the windows are
resized chunk by chunk into one preallocated float32 matrix (the uint8 frames are dropped afterwards);
each fold thread copies its training rows into its own reused buffer and standardises that copy in place with
statistics from the training rows only (computed chunk-wise, no full-size temporaries). Every estimator
works on float32 without converting (the linear SVM is ``SGDClassifier(loss="hinge")``: ``LinearSVC``
would make a float64 copy). Peak ~(1 + J)x the feature matrix; J is lowered to what the available memory holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError
from ddp_vad.eval.features import MOTION_GRID, feature_size, motion_features, window_features
from ddp_vad.eval.fold_threads import run_units
from ddp_vad.motion import TOPK as MOTION_TOPK
from ddp_vad.motion import cell_size, window_energies
from ddp_vad.options import option
from ddp_vad.runfiles import metrics_file
from ddp_vad.train.crossval import (
    PROTOCOL_HELP,
    PROTOCOLS,
    CVWindows,
    check_fraction,
    check_repeats,
    finish_cv,
    fold_split,
    window_selection,
)
from ddp_vad.train.metrics import read_cv_results


@dataclass(frozen=True)
class Baseline:
    """A classic method: which window features it reads and how to make a fresh estimator."""

    features: str  # "pixels" | "motion" (ddp_vad.eval.features) | "energy" (ddp_vad.motion)
    make: Callable[[BaselinesConfig], Any]
    # The estimator's own predict is argmax(predict_proba) (forests, uniform k-NN): one pass gives both, where
    # predict + predict_proba would walk every tree / compute every distance twice.
    predict_from_proba: bool = False
    # The estimator spreads its work over n_jobs threads (forests, k-NN): the fold plan sets it. Others leave it
    # alone (LogisticRegression warns that its n_jobs does nothing; BLAS and OpenMP are limited instead).
    uses_n_jobs: bool = False


def _sk(name: str):
    """A scikit-learn class by dotted name, imported when first needed (keeps the CLI start-up light)."""
    import importlib

    module, cls = name.rsplit(".", 1)
    return getattr(importlib.import_module(f"sklearn.{module}"), cls)


# Add a baseline here: a name, its features and its estimator (every estimator keeps float32 input as it is; the
# fold plan sets n_jobs where uses_n_jobs says so). Classes are weighted where the estimator allows it: the
# leak-free labelled set is every window of the labelled clips, not a balanced subset, and the learned models weigh
# their loss the same way.
BASELINES: dict[str, Baseline] = {
    # lbfgs stops where BLAS's summation order (its thread count) leads it: scores differ by up to 0.5 on Ped2
    # between 1 and 2 BLAS threads (benchmarks/results/baselines.json); metrics.json names the count (threads_per_fold).
    "logreg": Baseline("pixels", lambda c: _sk("linear_model.LogisticRegression")(
        C=1.0, max_iter=300, class_weight="balanced", random_state=c.seed)),
    # Linear SVM (hinge loss) by SGD: float32-native, where LinearSVC would copy to float64.
    "svm": Baseline("pixels", lambda c: _sk("linear_model.SGDClassifier")(
        loss="hinge", alpha=1e-3, max_iter=50, tol=1e-3, class_weight="balanced", random_state=c.seed)),
    "rf": Baseline("pixels", lambda c: _sk("ensemble.RandomForestClassifier")(
        n_estimators=c.rf_trees, max_depth=c.rf_max_depth, max_features="sqrt", min_samples_leaf=2,
        class_weight="balanced", random_state=c.seed), predict_from_proba=True, uses_n_jobs=True),
    "knn": Baseline("pixels", lambda c: _sk("neighbors.KNeighborsClassifier")(
        n_neighbors=5, algorithm="brute"), predict_from_proba=True, uses_n_jobs=True),
    "nb": Baseline("pixels", lambda c: _sk("naive_bayes.GaussianNB")()),
    "motion-logreg": Baseline("motion", lambda c: _sk("linear_model.LogisticRegression")(
        C=1.0, max_iter=1000, class_weight="balanced", random_state=c.seed)),
    "motion-gb": Baseline("motion", lambda c: _sk("ensemble.HistGradientBoostingClassifier")(
        max_iter=200, learning_rate=0.1, class_weight="balanced", random_state=c.seed)),
    # One number per window, where it happens in the frame does not matter: the log motion energy of the most active
    # cells (ddp_vad.motion, the learned runs' motion prior). On its own it ranks about as an unsupervised detector.
    "motion-energy": Baseline("energy", lambda c: _sk("linear_model.LogisticRegression")(
        C=1.0, max_iter=1000, class_weight="balanced", random_state=c.seed)),
}  # fmt: skip
METHODS = tuple(BASELINES)


def make_estimator(method: str, cfg: BaselinesConfig, threads: int | None = None):
    """A fresh scikit-learn classifier for a baseline name; ``threads`` sets its ``n_jobs`` where it uses one."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}")
    model = BASELINES[method].make(cfg)
    if threads is not None and BASELINES[method].uses_n_jobs:
        model.set_params(n_jobs=int(threads))
    return model


@dataclass
class BaselinesConfig:
    """Options of ``ddp_vad baselines``."""

    shards: str = option(help="Shard folder.")
    out: str = option(help="Writes OUT/<method>/ files.")
    methods: str = option(",".join(METHODS), f"Comma-separated: {','.join(METHODS)}.")
    protocol: str = option("leakfree", PROTOCOL_HELP, choices=PROTOCOLS)
    folds: int | None = option(None, "Must match the shards' fold count (default: the shards').")
    repeats: int = option(1, "Repeat the cross-validation with this many fold seeds (as transfer --repeats).")
    seed: int = option(0, "Seed of the estimators.")
    height: int = option(60, "Feature height (no upsampling).")
    width: int = option(90, "Feature width (no upsampling).")
    n_jobs: int | None = option(
        None, "Cores (default: all): folds run in parallel threads, each estimator gets the cores left over."
    )
    # 50, not 100 (issue 22's budget): with the same seed they are the first 50 trees of the 100, at half the fit
    # time; frame AUROC 0.359 -> 0.347 (Ped1 sample), 0.263 -> 0.262 (Ped2), benchmarks/results/baselines_rf_trees.json.
    rf_trees: int = option(50, "Random-forest trees.")
    # Bounded trees keep fit time and memory predictable on 54k features.
    rf_max_depth: int = option(20, "Random-forest depth limit.")
    labelled_fraction: float = option(
        1.0,
        "Train each fold on this stratified, seeded share of its labelled windows (nested across fractions; at least "
        "one window per class).",
    )
    check_paths: InitVar[bool] = True  # False: values only, --shards is made later (the pipeline's up-front check)

    def __post_init__(self, check_paths: bool) -> None:
        shard_dir = Path(self.shards)
        if check_paths and not (shard_dir / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json there (build shards with `ddp_vad shard build`)")
        if isinstance(self.methods, list | tuple):
            self.methods = ",".join(self.methods)
        names = [m.strip() for m in str(self.methods).split(",") if m.strip()]
        unknown = [m for m in names if m not in METHODS]
        if not names or unknown:
            raise UserError(f"--methods {self.methods}: choose from {','.join(METHODS)}")
        self.methods = ",".join(dict.fromkeys(names))  # de-duplicated, order kept
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol}: choose one of {', '.join(PROTOCOLS)}")
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
        check_fraction(self.labelled_fraction)
        check_repeats(self.repeats)

    @property
    def method_list(self) -> list[str]:
        """Methods to run, in the order given."""
        return self.methods.split(",")


def anomaly_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """P(anomalous) per row: ``predict_proba[:, 1]``, or the sigmoid of the SVM's decision function."""
    classes = list(model.classes_)
    if hasattr(model, "predict_proba") and getattr(model, "loss", None) != "hinge":
        return model.predict_proba(x)[:, classes.index(1)].astype(np.float64)
    d = np.asarray(model.decision_function(x), dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(d, -500, 500)))


def _fit_predict(method: str, cfg: BaselinesConfig, x_train, y_train, x_test, threads: int | None = None) -> tuple:
    """Scores, predictions and a note for one fold (the estimator gets ``threads``)."""
    train_classes = np.unique(y_train)
    if train_classes.size < 2:
        # Nothing to learn from one class: predict it, and say so rather than crash.
        only = int(train_classes[0]) if train_classes.size else 0
        note = f"training folds hold class {only} only: constant prediction"
        return np.full(len(x_test), float(only)), np.full(len(x_test), only, dtype=np.int64), note
    model = make_estimator(method, cfg, threads)
    note = fit_to_size(model, len(x_train))
    model.fit(x_train, y_train)
    if BASELINES[method].predict_from_proba:
        proba = model.predict_proba(x_test)
        score = proba[:, list(model.classes_).index(1)].astype(np.float64)
        y_pred = np.asarray(model.classes_[np.argmax(proba, axis=1)], dtype=np.int64)  # the estimator's predict
    else:
        y_pred = np.asarray(model.predict(x_test), dtype=np.int64)
        score = anomaly_scores(model, x_test)
    return score, y_pred, note


def fit_to_size(model: Any, n_train: int) -> str | None:
    """Shrink what a tiny training set cannot hold (k of k-NN above its row count, as at a small labelled fraction);
    returns a note saying so, or None when the estimator fits as configured."""
    k = getattr(model, "n_neighbors", None)
    if isinstance(k, int) and k > n_train:
        model.set_params(n_neighbors=n_train)
        return f"{n_train} training windows < {k} neighbours: k = {n_train}"
    return None


def _run_method(
    method: str, cfg: BaselinesConfig, x: np.ndarray, cv: CVWindows
) -> tuple[list[dict], list[dict], list[str], list[str], dict]:
    """k-fold CV of one method (every fold of every repeat), folds in parallel threads
    (:func:`ddp_vad.eval.fold_threads.run_units`): fold rows, out-of-fold rows, warnings, notes, the fold plan."""

    def fit_predict(x_train, y_train, x_test, threads):
        return _fit_predict(method, cfg, x_train, y_train, x_test, threads)

    splits = [fold_split(cv, k, fraction=cfg.labelled_fraction, seed=cfg.seed)[:2] for k in range(cv.n_units)]
    return run_units(cv, x, splits, fit_predict, cfg.n_jobs, desc=f"{method} folds")


def _features(kind: str, frames: np.ndarray, cfg: BaselinesConfig) -> tuple[np.ndarray, dict]:
    """The feature matrix of one kind and its description (for config.json / metrics.json)."""
    n, t_len, frame_h, frame_w = frames.shape
    if kind == "energy":
        x = window_energies(frames).astype(np.float32)[:, None]
        return x, {"kind": "energy", "cell": cell_size(frame_h), "topk": MOTION_TOPK, "window": t_len,
                   "n_features": 1, "standardise": "per fold, mean/std of the training rows"}  # fmt: skip
    if kind == "motion":
        x = motion_features(frames)
        return x, {"kind": "motion", "grid": list(MOTION_GRID), "window": t_len, "n_features": int(x.shape[1]),
                   "standardise": "per fold, mean/std of the training rows"}  # fmt: skip
    height, width, size_note = feature_size(frame_h, frame_w, int(cfg.height), int(cfg.width))
    if size_note:
        print(f"baselines: note: {size_note}")
    x = window_features(frames, height, width)
    return x, {"kind": "pixels", "height": height, "width": width, "window": t_len, "n_features": int(x.shape[1]),
               "standardise": "per fold, mean/std of the training rows", "note": size_note}  # fmt: skip


def _todo(cfg: BaselinesConfig, results: dict[str, Path]) -> list[str]:
    """Methods without results yet; finished ones must match this run's protocol and labelled fraction."""
    todo = []
    for m in cfg.method_list:
        if not results[m].is_file():
            todo.append(m)
            continue
        done = read_cv_results(results[m])
        got = (done["protocol"], float(done.get("labelled_fraction", 1.0)), int(done.get("repeats", 1)))
        if got != (cfg.protocol, float(cfg.labelled_fraction), cfg.repeats):
            raise UserError(
                f"{results[m]} holds protocol '{got[0]}' / labelled fraction {got[1]} / {got[2]} repeat(s) results, "
                f"not '{cfg.protocol}' / {cfg.labelled_fraction} / {cfg.repeats}: use another --out"
            )
        print(f"baselines: {m} already done ({results[m]}), skipping")
    return todo


def run_baselines(cfg: BaselinesConfig) -> dict[str, Path]:
    """Cross-validate every method in ``cfg.methods`` on the shards; write ``OUT/<method>/`` files.

    Folds are the shards' (under ``cfg.protocol``), so the split matches ``transfer`` exactly.
    Returns ``{method: metrics.json path}``.
    """
    from ddp_vad.data.reader import load_window_set
    from ddp_vad.data.shards import fold_count, load_manifest

    out = Path(cfg.out)
    manifest = load_manifest(cfg.shards)
    n_folds = fold_count(manifest, cfg.folds, cfg.shards)
    results = {m: metrics_file(out / m) for m in cfg.method_list}
    todo = _todo(cfg, results)
    if not todo:
        return results

    t_load = time.perf_counter()
    ws = load_window_set(cfg.shards, select=window_selection(cfg.protocol))
    if len(ws) == 0:
        raise UserError(f"--shards {cfg.shards}: no windows")
    cv = CVWindows.from_window_set(ws, cfg.protocol, n_folds, cfg.repeats)
    kinds = sorted({BASELINES[m].features for m in todo})
    feats = {kind: _features(kind, ws.frames, cfg) for kind in kinds}
    del ws  # the uint8 frames are no longer needed
    sizes = ", ".join(f"{k} {x.shape[1]} ({x.nbytes / 2**20:.0f} MiB)" for k, (x, _) in feats.items())
    print(
        f"baselines: {len(cv.labels)} windows, features {sizes}, {n_folds} folds x {cfg.repeats} repeat(s), "
        f"protocol {cfg.protocol}, "
        f"labelled fraction {cfg.labelled_fraction:g}, loaded in {time.perf_counter() - t_load:.1f}s"
    )
    for method in todo:
        run_dir = out / method
        run_dir.mkdir(parents=True, exist_ok=True)
        x, features = feats[BASELINES[method].features]
        estimator = repr(make_estimator(method, cfg))
        write_resolved_config(run_dir, cfg, extra={"method": method, "features": features, "estimator": estimator})
        t0 = time.perf_counter()
        fold_rows, oof_rows, fit_warnings, notes, plan = _run_method(method, cfg, x, cv)
        seconds = time.perf_counter() - t0
        extra = {
            "labelled_fraction": float(cfg.labelled_fraction),
            "n_folds": n_folds,
            "repeats": cfg.repeats,
            "features": features,
            "estimator": estimator,
            "seconds": round(seconds, 2),
            **plan,
            "warnings": fit_warnings,
            "notes": notes,
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
