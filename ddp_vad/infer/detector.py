"""A trained detector as a Python object: :class:`Detector` scores frames, video files and live streams.

It loads a transfer run (its fold models' mean anomaly probability, the run's threshold), one fold model, or an
exported ONNX model (with its JSON sidecar, no PyTorch needed to score). See docs/api.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_vad.errors import UserError
from ddp_vad.infer.live import StreamBroken, iter_frames
from ddp_vad.infer.model_files import model_files
from ddp_vad.infer.onnx_scorer import load_onnx
from ddp_vad.infer.scoring import Scorer, as_pixels, check_batch_size, frame_scores, stream_scores, window_scores
from ddp_vad.infer.threshold import DEFAULT, check_threshold, run_threshold
from ddp_vad.runfiles import oof_file, run_of_fold_model


@dataclass(frozen=True)
class FrameScore:
    """A frame's final score: 1-based frame number, time in seconds (videos and streams), file name (frame
    folders), anomaly score in [0, 1] and whether it is at or above the detector's threshold."""

    frame: int
    time: float | None
    name: str | None
    score: float
    anomalous: bool


def _threshold_of(path: Path, fold: int | None) -> tuple[float, str]:
    """The run's threshold for a run folder or for a fold model inside one; the default otherwise."""
    if path.is_dir():
        return run_threshold(path, fold)
    owner = run_of_fold_model(path)
    if owner is not None and oof_file(owner[0]).is_file():
        return run_threshold(*owner)
    return DEFAULT, f"default {DEFAULT}: a lone model file has no out-of-fold scores"


class Detector:
    """Per-frame anomaly scores from a window classifier (see :meth:`load`).

    A window of ``window`` frames (gray, ``height`` x ``width``) gets the classifier's anomaly probability
    (the mean over fold models); a frame's score is the max over the windows that cover it.
    """

    def __init__(
        self,
        scorer: Scorer,
        window: int,
        height: int,
        width: int,
        threshold: float = DEFAULT,
        threshold_note: str = "",
        description: str = "",
    ):
        self.scorer = scorer
        self.window, self.height, self.width = window, height, width
        self.threshold, self.threshold_note = threshold, threshold_note
        self.description = description
        self.files: list[Path] = []  # the model files it was loaded from, each checked (see Detector.load)

    @classmethod
    def load(cls, path: str | Path, fold: int | None = None, threshold: float | None = None) -> Detector:
        """A detector from a transfer run folder (``folds/fold_XX/model.safetensors``; ``fold`` picks one), a
        ``model.safetensors`` file, or an exported ``.onnx`` file (with its ``.json`` sidecar).

        ``threshold`` overrides the one the run records (see :mod:`ddp_vad.infer.threshold`): a finite number in
        [0, 1], else a UserError. ``fold=k`` (unit k with ``--repeats``) gets fold k's own threshold, chosen without
        its test clips.
        """
        given = None if threshold is None else check_threshold(threshold, "threshold")
        path = Path(path)
        if path.suffix == ".onnx":
            if fold is not None:  # the graph is the ensemble it was exported as: a fold cannot be picked from it
                raise UserError(f"fold={fold} (--fold): {path} is an exported model, one graph for the folds it "
                                "was exported with; export one fold with `ddp_vad export RUN --fold K`")  # fmt: skip
            scorer, meta = load_onnx(path)
            value, note = meta.get("threshold", DEFAULT), meta.get("threshold_rule", "from the export's sidecar")
            det = cls(scorer, meta["window"], meta["height"], meta["width"], value, note, f"{path.name} (ONNX)")
            det.files = [path]
        else:
            from ddp_vad.infer.scoring import TorchScorer
            from ddp_vad.models import build_lrcn
            from ddp_vad.weights import load_model

            files = model_files(path, fold)
            loaded = [load_model(f, build_lrcn) for f in files]
            cfg = loaded[0][1]
            for f, (_, other) in zip(files, loaded, strict=True):
                if (other.window, other.height, other.width) != (cfg.window, cfg.height, cfg.width):
                    raise UserError(f"{f}: its window/frame size differs from {files[0]}'s")
            value, note = _threshold_of(path, fold)
            det = cls(TorchScorer([m for m, _ in loaded]), cfg.window, cfg.height, cfg.width, value, note,
                      f"{len(files)} fold model(s)")  # fmt: skip
            det.files = files
        if given is not None:
            det.threshold, det.threshold_note = given, "given"
        return det

    def score_frames(self, frames: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Per-frame scores ``[N]`` of gray frames ``[N, H, W]`` (an array or nested lists), ``N >= window``.

        Pixel values: uint8 as they are (0..255); any other integer type (int64 arrays, lists of ints) must hold
        0..255 and scores exactly as uint8; floats must lie in [0, 1] (the model's input scale: uint8 / 255).
        Anything else (floats above 1 such as 0..255 held as float32, NaN or inf, negative values, bools, zero-size
        frames, ``batch_size < 1``) is a :class:`UserError`. Frames of another size are resized (bilinear) to the
        model's. The PyTorch and ONNX detectors score the same frames the same (within float rounding)."""
        check_batch_size(batch_size)
        frames = as_pixels(frames)
        if len(frames) < self.window:
            raise UserError(f"{len(frames)} frames; the model needs at least {self.window}")
        frames = self._resize(frames)
        return frame_scores(window_scores(frames, self.scorer, self.window, batch_size), len(frames), self.window)

    def score_video(self, path: str | Path, batch_size: int = 64) -> np.ndarray:
        """Per-frame scores of a video file or a folder of numbered frames (decoded as a stream)."""
        return np.array([s.score for s in self.stream(path, batch_size=batch_size)])

    def stream(
        self,
        source: str | Path,
        batch_size: int = 1,
        reconnect: int = 0,
        stop: Callable[[], bool] | None = None,
    ) -> Iterator[FrameScore]:
        """Yield each frame's :class:`FrameScore` of ``source`` as soon as it is final.

        ``source``: a folder of frames, a video file, a stream URL, a capture device (``/dev/video0``) or ``-``
        (stdin). A frame is final once every window covering it is scored: at most ``window - 2 + batch_size``
        frames after it arrives (``window - 1`` with the default batch of 1). Memory is bounded by
        ``window - 1 + batch_size`` frames. A broken live stream is reopened ``reconnect`` times, then the frames
        already read are scored and yielded and :class:`ddp_vad.infer.live.StreamBroken` is raised; ``stop()`` returning
        true (checked per frame) ends the stream the same way, without the error.
        """
        failure: list[BaseException] = []

        def frames() -> Iterator[tuple[tuple[int, float | None, str | None], np.ndarray]]:
            try:
                for frame in iter_frames(source, self.height, self.width, reconnect):
                    yield (frame.number, frame.time, frame.name), frame.gray
                    if stop is not None and stop():
                        return
            except (StreamBroken, KeyboardInterrupt) as exc:
                failure.append(exc)  # score what was read first, then raise

        try:
            for (number, time, name), score in stream_scores(
                frames(), self.scorer, self.window, batch_size, str(source)
            ):
                yield FrameScore(number, time, name, score, score >= self.threshold)
        except UserError:
            if failure:  # "too few frames" after a break: the break is the news
                raise failure[0] from None
            raise
        if failure:
            raise failure[0]

    def _resize(self, frames: np.ndarray) -> np.ndarray:
        if frames.shape[1:] == (self.height, self.width):
            return frames
        from PIL import Image

        if frames.dtype == np.uint8:
            from ddp_vad.data.sources.frames import resize_frame

            return np.stack([resize_frame(f, self.height, self.width) for f in frames])
        size = (self.width, self.height)
        return np.stack([np.asarray(Image.fromarray(f.astype(np.float32), "F").resize(size, Image.BILINEAR))
                         for f in frames])  # fmt: skip

    def __repr__(self) -> str:
        return (f"Detector({self.description}, window={self.window}, size={self.height}x{self.width}, "
                f"threshold={self.threshold:.4f})")  # fmt: skip
