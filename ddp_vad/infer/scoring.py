"""Per-frame anomaly scores from a window classifier: batch scoring of windows and the bounded streaming buffer.

A *scorer* is any callable mapping a batch of windows (uint8 ``[B, T, H, W]``) to their anomaly probabilities
``[B]``: :class:`TorchScorer` (the mean over fold models of the softmax's anomalous class) or
:class:`ddp_vad.infer.onnx_scorer.OnnxScorer`. Every stride-1 window is scored, and a frame's score is the max over the
windows that cover it (the rule the evaluation uses for frame-level AUROC).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

from ddp_vad.errors import UserError

T = TypeVar("T")
Scorer = Callable[[np.ndarray], np.ndarray]


class TorchScorer:
    """Mean anomaly probability of a batch of windows ``[B, T, H, W]`` over PyTorch models (fold models).

    uint8 windows are pixel values (divided by 255, as in training); float windows are taken as already in [0, 1].
    """

    def __init__(self, models: Sequence[Any]):
        self.models = list(models)

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(windows)).unsqueeze(2).float()
        if windows.dtype == np.uint8:
            x.div_(255.0)
        scores = np.zeros(len(windows), np.float64)
        with torch.no_grad():
            for model in self.models:
                scores += torch.softmax(model(x).float(), dim=1)[:, 1].numpy()
        return scores / len(self.models)


def as_pixels(frames: Any) -> np.ndarray:
    """Gray frames ``[N, H, W]`` as a scorer takes them: uint8 pixel values, or float32 in [0, 1].

    uint8 stays as it is; other integer types (int64 arrays, nested lists of ints) must hold 0..255 and become uint8
    (the same scores); floats must be finite and in [0, 1]. Anything else is a one-line :class:`UserError`: a float
    array holding 0..255 would otherwise be fed 255 times too bright, and NaN would score NaN.
    """
    try:
        frames = np.asarray(frames)
    except ValueError as exc:  # ragged nested lists
        raise UserError(f"frames must be an array [N, H, W] of gray pixel values: {exc}") from None
    if frames.ndim != 3:
        raise UserError(f"frames must be [N, H, W] gray, got shape {frames.shape}")
    if frames.shape[1] == 0 or frames.shape[2] == 0:
        raise UserError(f"frames of size {frames.shape[1]}x{frames.shape[2]}: no pixels to score")
    kind = frames.dtype.kind
    if frames.dtype == np.uint8 or frames.size == 0:
        return frames
    if kind in "iu":
        low, high = int(frames.min()), int(frames.max())
        if low < 0 or high > 255:
            raise UserError(f"integer frames must hold pixel values 0..255, got {low}..{high}")
        return frames.astype(np.uint8)
    if kind == "f":
        if not np.isfinite(frames).all():
            raise UserError("frames hold NaN or inf pixel values")
        low, high = float(frames.min()), float(frames.max())
        if low < 0.0 or high > 1.0:
            raise UserError(f"float frames must lie in [0, 1] (the model's scale), got {low:g}..{high:g}: "
                            "give uint8 (or integer) pixel values 0..255, or divide by 255")  # fmt: skip
        return frames.astype(np.float32, copy=False)
    raise UserError(f"frames of dtype {frames.dtype}: give uint8 pixel values 0..255 or floats in [0, 1]")


def check_batch_size(batch_size: Any) -> None:
    """A batch size is an integer >= 1 (a UserError otherwise)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise UserError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def as_scorer(models_or_scorer: Scorer | Sequence[Any]) -> Scorer:
    """A scorer as given, or a :class:`TorchScorer` over a list of models."""
    return models_or_scorer if callable(models_or_scorer) else TorchScorer(models_or_scorer)


def window_scores(frames: np.ndarray, scorer: Scorer | Sequence[Any], window: int, batch_size: int) -> np.ndarray:
    """Score of every stride-1 window of ``frames`` (uint8 [N, H, W]), ``batch_size`` windows per call.

    A NaN or inf score is a :class:`UserError`: a broken model must stop, not mark frames "not anomalous"."""
    check_batch_size(batch_size)
    scorer = as_scorer(scorer)
    n = len(frames) - window + 1
    scores = np.zeros(max(n, 0), np.float64)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(start + batch_size, n))
        scores[start : start + len(idx)] = scorer(frames[idx[:, None] + np.arange(window)])
        if not np.isfinite(scores[start : start + len(idx)]).all():
            raise UserError(f"the model scored window(s) {start + 1}..{start + len(idx)} NaN or inf: its weights or "
                            "the frames are damaged; no score was used")  # fmt: skip
    return scores


def frame_scores(win_scores: np.ndarray, n_frames: int, window: int) -> np.ndarray:
    """A frame's score = max over the scores of the windows that cover it."""
    out = np.zeros(n_frames)
    _cover(out, win_scores, window)
    return out


def stream_scores(
    items: Iterable[tuple[T, np.ndarray]],
    scorer: Scorer | Sequence[Any],
    window: int,
    batch_size: int,
    source: str = "the clip",
) -> Iterator[tuple[T, float]]:
    """Per-frame scores of a stream of ``(tag, uint8 [H, W] frame)``, yielded in order as ``(tag, score)``.

    Holds at most ``window - 1 + batch_size`` frames: each time the buffer is full its ``batch_size`` windows are
    scored in one batch (the same batches as :func:`window_scores` on the whole clip, so the same numbers), the
    first ``batch_size`` frames are final and leave, the last ``window - 1`` move to the front. A frame's score is
    therefore out at most ``window - 2 + batch_size`` frames after it came in (``window - 1`` with batch 1). When
    ``items`` ends, the frames left are scored and yielded.
    """
    check_batch_size(batch_size)
    scorer = as_scorer(scorer)
    span = window - 1 + batch_size
    buf: np.ndarray | None = None
    best = np.zeros(span)  # running max of the scores of the windows covering each buffered frame
    tags: deque = deque()
    filled = total = 0
    for tag, frame in items:
        if buf is None:
            buf = np.empty((span, *frame.shape), np.uint8)
        buf[filled] = frame
        tags.append(tag)
        filled, total = filled + 1, total + 1
        if filled < span:
            continue
        _cover(best, window_scores(buf, scorer, window, batch_size), window)
        for j in range(batch_size):
            yield tags.popleft(), float(best[j])
        buf[: window - 1] = buf[batch_size:]
        best[: window - 1] = best[batch_size:]
        best[window - 1 :] = 0.0
        filled = window - 1
    if total < window:
        raise UserError(f"{source} has {total} frames; the model needs at least {window}")
    if filled >= window:  # the last, partial batch
        _cover(best, window_scores(buf[:filled], scorer, window, batch_size), window)
    for j in range(filled):
        yield tags.popleft(), float(best[j])


def _cover(best: np.ndarray, win: np.ndarray, window: int) -> None:
    for start, score in enumerate(win):
        np.maximum(best[start : start + window], score, out=best[start : start + window])
