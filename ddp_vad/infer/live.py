"""Frame sources for scoring: a folder of frames, a video file, or live footage that PyAV opens.

Live footage is a stream URL (``rtsp://``, ``http://``, ``udp://``, ...), a capture device (``/dev/video0``) or
``-`` (a video stream on stdin, e.g. MPEG-TS piped from ffmpeg). A live stream that breaks (an error while
opening or reading it, or no data for :data:`TIMEOUT` seconds on a network source; a damaged packet is skipped) is
reopened up to ``reconnect`` times; frame numbers continue across a reconnect.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddp_vad.errors import UserError

STDIN = "-"
TIMEOUT = 10.0  # seconds a network source may send nothing (while opening, or between reads) before it counts as broken


class StreamBroken(UserError):
    """A live stream failed and could not be reopened; the frames before the break were delivered."""


@dataclass(frozen=True)
class Frame:
    """One decoded frame: 1-based number, time in seconds (None for frame folders), file name (frame folders)."""

    number: int
    time: float | None
    name: str | None
    gray: np.ndarray  # uint8 [H, W], the source's own size


def is_live(source: str | Path) -> bool:
    """Whether ``source`` is live footage (stdin, a URL or a capture device) rather than a folder or a file."""
    text = str(source)
    return text == STDIN or "://" in text or text.startswith("/dev/")


def check_source(source: str | Path) -> None:
    """Refuse a source that cannot be one: a missing path, or a file that is not a video."""
    from ddp_vad.data.sources.video import VIDEO_SUFFIXES

    if is_live(source):
        return
    path = Path(source)
    if not path.exists():
        raise UserError(f"clip folder, video or stream not found: {source}")
    if path.is_file() and path.suffix.lower() not in VIDEO_SUFFIXES:
        raise UserError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}) nor a folder of frames")


def source_name(source: str | Path) -> str:
    """A short name for outputs: the folder's name, the file's stem, ``stdin`` or the URL's last part."""
    text = str(source)
    if text == STDIN:
        return "stdin"
    if is_live(text):
        return text.rstrip("/").rsplit("/", 1)[-1].split("?")[0] or "stream"
    path = Path(text)
    return path.name if path.is_dir() else path.stem


def iter_frames(source: str | Path, height: int, width: int, reconnect: int = 0, wait: float = 1.0) -> Iterator[Frame]:
    """Decode ``source`` frame by frame, gray and resized to ``height`` x ``width`` (see the module docstring);
    a live stream is reopened up to ``reconnect`` times, ``wait`` seconds apart."""
    from ddp_vad.data.sources.frames import resize_frame

    check_source(source)
    if not is_live(source) and Path(source).is_dir():
        yield from _folder_frames(Path(source), height, width)
        return
    if not is_live(source):
        from ddp_vad.data.sources.video import iter_gray

        for i, (gray, t) in enumerate(iter_gray(Path(source), threads=0), start=1):
            yield Frame(i, t, None, resize_frame(gray, height, width))
        return
    number, tries = 0, 0
    while True:
        try:
            for gray, t in _live_gray(str(source)):
                number += 1
                tries = 0  # a stream that delivers again has its tries back
                yield Frame(number, t, None, resize_frame(gray, height, width))
            return  # end of stream
        except StreamBroken as exc:
            if str(source) == STDIN or tries >= reconnect:
                raise StreamBroken(f"{exc} (after {tries} reconnect tries)") from None
            tries += 1
            print(f"{exc}; reconnecting ({tries}/{reconnect})", file=sys.stderr, flush=True)
            time.sleep(wait)


def _folder_frames(folder: Path, height: int, width: int) -> Iterator[Frame]:
    from ddp_vad.data.sources.frames import IMAGE_SUFFIXES, FrameClip, frame_files

    paths = frame_files(folder, IMAGE_SUFFIXES, first=None)
    clip = FrameClip(folder.name, "test", paths, np.zeros(len(paths), np.uint8))
    for i, (path, gray) in enumerate(zip(paths, clip.iter_frames(height, width), strict=True), start=1):
        yield Frame(i, None, path.name, gray)


def _live_gray(source: str) -> Iterator[tuple[np.ndarray, float | None]]:
    """Decode a live source; a failure to open or read it becomes :class:`StreamBroken`."""
    import av

    from ddp_vad.data.sources.video import gray_of

    try:
        if source == STDIN:
            container = av.open("pipe:0", "r")
        elif source.startswith("/dev/"):
            container = av.open(source, "r", format="v4l2")
        else:
            container = av.open(source, "r", timeout=TIMEOUT)
    except av.ExitError:  # FFmpeg's "Immediate exit requested": PyAV's timeout stopped the wait
        raise StreamBroken(f"{source}: cannot open (timed out: no answer for {TIMEOUT:g} s)") from None
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise StreamBroken(f"{source}: cannot open ({_why(exc)})") from None
    with container:
        if not container.streams.video:
            raise UserError(f"{source}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1  # frame threading would hold back one frame per thread
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.InvalidDataError:
                    continue  # one damaged packet (common over UDP): skip it, the stream goes on
                for frame in frames:
                    yield gray_of(frame), frame.time
        except av.ExitError:
            raise StreamBroken(f"{source}: stream broke (timed out: no data for {TIMEOUT:g} s)") from None
        except (av.FFmpegError, OSError) as exc:
            raise StreamBroken(f"{source}: stream broke ({_why(exc)})") from None


def _why(exc: BaseException) -> str:
    """The reason without the path (FFmpeg's errors repeat the URL)."""
    return getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
