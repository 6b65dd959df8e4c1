"""Cross-validation units of an in-memory method (the ``baselines``) run in parallel threads of one process.

``n_jobs`` cores are shared out as J units (folds) at once, each unit's estimator getting ``cores // J`` threads:
its ``n_jobs``, BLAS (process-wide) and OpenMP (per calling thread) are all set to that. A single-threaded fit (an
SGD, a naive Bayes) then keeps every core busy, a multi-threaded one (a forest, k-NN) is not oversubscribed, and no
OpenMP pool spins on cores another fold is using. Threads rather than processes: the units share the feature
matrix without a copy, and scikit-learn's fits and numpy's loops release the GIL.

Each unit computes what it computes serially, in its own buffer; results are put back in unit order. With the same
threads per estimator, the scores do not depend on J (``tests/test_baselines.py`` checks it bit for bit).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np

from ddp_vad.eval.features import mean_std, standardise_
from ddp_vad.train.crossval import CVWindows, score_fold
from ddp_vad.train.metrics import binary_metrics

# (x_train, y_train, x_test, threads) -> (P(anomalous) per test row, predicted class per test row, note or None)
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray, int], tuple[np.ndarray, np.ndarray, str | None]]


def cores(n_jobs: int | None) -> int:
    """Cores to use: ``n_jobs`` if positive, all for ``None`` or -1, all but ``-n_jobs - 1`` below (as
    scikit-learn counts)."""
    try:
        available = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        available = max(1, os.cpu_count() or 1)
    if n_jobs is None:
        return available
    return int(n_jobs) if n_jobs > 0 else max(1, available + 1 + int(n_jobs))


def available_memory() -> int | None:
    """Bytes the kernel says can be allocated without swapping (Linux ``MemAvailable``), None elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def fold_plan(n_jobs: int | None, n_units: int, unit_bytes: int, available: int | None) -> tuple[int, int]:
    """(units at once J, threads per unit) for ``n_jobs`` cores: J = the cores, at most one per unit and no more
    than 80% of the ``available`` memory holds (a running unit holds a standardised copy of up to ``unit_bytes``);
    the cores left over go to each unit's estimator."""
    n_cores = cores(n_jobs)
    jobs = max(1, min(n_cores, n_units))
    if available is not None and unit_bytes > 0:
        jobs = max(1, min(jobs, int(0.8 * available) // unit_bytes))
    return jobs, max(1, n_cores // jobs)


def _run_unit(
    cv: CVWindows,
    x: np.ndarray,
    k: int,
    split: tuple[np.ndarray, np.ndarray],
    fit_predict: FitPredict,
    threads: int,
    buffer: tuple[threading.local, int],
) -> tuple[dict, list[dict], str | None]:
    """Unit ``k`` in a worker thread: its training rows standardised (training statistics only) in this thread's
    buffer, its test rows in a copy; fit, score, and the fold's metrics row and out-of-fold rows."""
    from threadpoolctl import threadpool_limits

    train_idx, test_idx = split
    if test_idx.size == 0:
        repeat, fold = cv.unit(k)
        return {"fold": fold, "repeat": repeat, **binary_metrics([], []), "seconds": 0.0}, [], None
    t0 = time.perf_counter()
    local, rows = buffer
    if getattr(local, "buf", None) is None:  # one buffer per thread, sized for the largest training split
        local.buf = np.empty((rows, x.shape[1]), dtype=np.float32)
    x_train = local.buf[: train_idx.size]
    np.take(x, train_idx, axis=0, out=x_train)
    mean, std = mean_std(x_train)
    standardise_(x_train, mean, std)
    x_test = x[test_idx]  # a copy (fancy indexing): safe to standardise in place
    standardise_(x_test, mean, std)
    with threadpool_limits(threads, user_api="openmp"):  # OpenMP's thread count is the calling thread's
        score, y_pred, note = fit_predict(x_train, cv.labels[train_idx], x_test, threads)
    row, oof = score_fold(cv, k, test_idx, score, y_pred, n_train=int(train_idx.size))
    if note:
        row["note"] = f"{row['note']}; {note}" if "note" in row else note
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row, oof, note


def run_units(
    cv: CVWindows,
    x: np.ndarray,
    splits: Sequence[tuple[np.ndarray, np.ndarray]],
    fit_predict: FitPredict,
    n_jobs: int | None,
    desc: str = "folds",
) -> tuple[list[dict], list[dict], list[str], list[str], dict]:
    """Every unit ``k`` of ``cv`` (train/test rows ``splits[k]`` of the float32 matrix ``x``), J at once
    (:func:`fold_plan`). Returns the fold rows and out-of-fold rows in unit order, the fit warnings (de-duplicated,
    sorted), per-unit notes and the plan (``fold_jobs``, ``threads_per_fold``)."""
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    max_train = max((tr.size for tr, _ in splits), default=0)
    unit_bytes = max((tr.size + te.size for tr, te in splits), default=0) * x.shape[1] * x.itemsize
    jobs, threads = fold_plan(n_jobs, len(splits), unit_bytes, available_memory())
    buffer = (threading.local(), max_train)
    done: dict[int, tuple] = {}
    pool = ThreadPoolExecutor(jobs, thread_name_prefix="fold")
    # Warnings are caught once here for every thread: catch_warnings is process-wide, not per thread.
    with warnings.catch_warnings(record=True) as caught, threadpool_limits(threads, user_api="blas"):
        warnings.simplefilter("always")
        try:
            futures = {
                pool.submit(_run_unit, cv, x, k, split, fit_predict, threads, buffer): k
                for k, split in enumerate(splits)
            }
            for future in tqdm(as_completed(futures), total=len(futures), desc=desc, unit="fold", leave=False):
                done[futures[future]] = future.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # after an error, start no further unit
    order = range(len(splits))
    fold_rows = [done[k][0] for k in order]
    oof_rows = [row for k in order for row in done[k][1]]
    notes = [f"fold {k}: {done[k][2]}" for k in order if done[k][2]]
    fit_warnings = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught})
    return fold_rows, oof_rows, fit_warnings, notes, {"fold_jobs": jobs, "threads_per_fold": threads}
