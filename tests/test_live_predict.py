"""predict on live footage: an MPEG-TS stream piped into `predict -` is scored row by row (latency), gives the same
scores as the same stream read from a file, writes events, ends cleanly on Ctrl-C, and stops with one line on a
stream that cannot be opened. Also ground-truth shading."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fake_transfer_run

from ddp_vad.cli import cli
from ddp_vad.infer.predict import ground_truth
from ddp_vad.infer.threshold import compute_thresholds
from ddp_vad.models import ModelConfig
from ddp_vad.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend on shared cores
WINDOW, N_FRAMES = 10, 60
# Writes the first half of a file to stdout, waits for GO (a file) to appear, then sends the rest slowly.
FEEDER = """
import os, sys, time
data, go = open(sys.argv[1], "rb").read(), sys.argv[2]
out = sys.stdout.buffer
out.write(data[: len(data) // 2]); out.flush()
deadline = time.time() + 60
while not os.path.exists(go) and time.time() < deadline:
    time.sleep(0.05)
try:
    for i in range(len(data) // 2, len(data), 1000):
        out.write(data[i : i + 1000]); out.flush(); time.sleep(float(sys.argv[3]))
except BrokenPipeError:
    pass
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A transfer-run folder: two tiny fold models (random weights) and out-of-fold scores with both classes."""
    root = tmp_path_factory.mktemp("run")
    cfg = ModelConfig(preset="tiny", window=WINDOW, height=24, width=36, **PRESETS["tiny"].model)
    fake_transfer_run(root, cfg, folds=2, seed=0)
    rows = ["key,clip,start,label,score,fold"] + [
        f"k{i},c,{i},{i % 2},{0.3 + 0.2 * (i % 2) + 0.01 * (i % 7):.4f},{i % 3 // 2}" for i in range(30)
    ]
    (root / "oof_scores.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def ts_clip(tmp_path_factory) -> Path:
    """An MPEG-TS file (MPEG-4 video, 10 frames/s) of a bright square crossing a noisy background."""
    path = tmp_path_factory.mktemp("ts") / "clip.ts"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 72, 48, "yuv420p"
        for i in range(N_FRAMES):
            img = rng.integers(60, 100, (48, 72, 3), dtype=np.uint8)
            img[10:30, i % 60 : i % 60 + 12] = 250
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("anomalous") is not None]  # a row being written is skipped


def _frames_in(data: bytes, tmp: Path) -> int:
    tmp.write_bytes(data)
    with av.open(str(tmp)) as container:
        return sum(1 for _ in container.decode(video=0))


def _start(ts_clip: Path, tmp_path: Path, delay: float, *extra: str) -> tuple[subprocess.Popen, subprocess.Popen]:
    go = tmp_path / "go"
    feeder = subprocess.Popen([sys.executable, "-c", FEEDER, str(ts_clip), str(go), str(delay)], stdout=subprocess.PIPE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    predict = subprocess.Popen(
        [sys.executable, "-m", "ddp_vad", "predict", "-", *extra],
        stdin=feeder.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    feeder.stdout.close()  # predict holds the pipe now
    return feeder, predict


def _wait_rows(csv_path: Path, n: int, timeout: float = 60) -> list[dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = _rows(csv_path)
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    raise AssertionError(f"only {len(_rows(csv_path))} rows after {timeout} s")


def test_predict_scores_a_piped_stream_row_by_row_like_the_same_file(run, ts_clip, tmp_path):
    live_csv, events = tmp_path / "live.csv", tmp_path / "events.jsonl"
    half = _frames_in(ts_clip.read_bytes()[: len(ts_clip.read_bytes()) // 2], tmp_path / "half.ts")
    # Rows due while the writer waits: the frames of the first half, less the window's latency (window - 1), one
    # frame the TS demuxer holds until the next packet starts, and one cut in half.
    due = half - (WINDOW - 1) - 2
    feeder, predict = _start(ts_clip, tmp_path, 0.02, "--model", str(run), "--out", str(live_csv),
                             "--events", str(events))  # fmt: skip
    try:
        early = _wait_rows(live_csv, due)
        assert feeder.poll() is None, "the writer had finished: rows did not come before the end of the stream"
        assert [int(r["frame"]) for r in early] == list(range(1, len(early) + 1))
    finally:
        (tmp_path / "go").touch()
    out, err = predict.communicate(timeout=120)
    feeder.wait(timeout=30)
    assert predict.returncode == 0, err
    # the same stream from a file, same batch size: the same numbers
    file_csv = tmp_path / "file.csv"
    result = CliRunner().invoke(cli, ["predict", str(ts_clip), "--model", str(run), "--out", str(file_csv),
                                      "--batch-size", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    live, from_file = _rows(live_csv), _rows(file_csv)
    assert len(live) == len(from_file) == N_FRAMES
    assert live == from_file
    assert len({r["score"] for r in live}) > 5  # varying scores: the comparison could fail
    # events: maximal runs of anomalous rows, with times and the peak
    flags = [int(r["anomalous"]) for r in live]
    runs, start = [], None
    for i, flag in enumerate([*flags, 0], start=1):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i - 1))
            start = None
    written = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["start_frame"], e["end_frame"]) for e in written] == runs and runs
    for e in written:
        scores = [float(r["score"]) for r in live[e["start_frame"] - 1 : e["end_frame"]]]
        assert e["peak_score"] == pytest.approx(max(scores), abs=1e-6)
        assert e["start_time"] == pytest.approx(float(live[e["start_frame"] - 1]["time"]), abs=1e-3)
        assert e["clip"] == "stdin" and e["threshold"] == pytest.approx(compute_thresholds(run)["thresholds"]["all"])


def test_ctrl_c_finishes_the_rows_it_read_and_exits_130(run, ts_clip, tmp_path):
    live_csv = tmp_path / "live.csv"
    feeder, predict = _start(ts_clip, tmp_path, 0.3, "--model", str(run), "--out", str(live_csv))
    try:
        before = len(_wait_rows(live_csv, 5))
        predict.send_signal(signal.SIGINT)
    finally:
        (tmp_path / "go").touch()  # more data arrives: PyAV returns to Python, which sees the interrupt
    out, err = predict.communicate(timeout=60)
    feeder.wait(timeout=30)
    assert predict.returncode == 130, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("interrupted: stdin:"), err
    rows = _rows(live_csv)
    assert before + WINDOW - 1 <= len(rows) < N_FRAMES  # the frames waiting for their windows were scored too
    assert [int(r["frame"]) for r in rows] == list(range(1, len(rows) + 1))
    assert (tmp_path / "live.png").is_file()


def test_a_stream_that_cannot_be_opened_is_retried_then_one_line(run, tmp_path):
    result = CliRunner().invoke(
        cli, ["predict", "tcp://127.0.0.1:9", "--model", str(run), "--out", str(tmp_path / "s.csv"), "--reconnect", "1"]
    )
    assert result.exit_code == 2
    assert "reconnecting (1/1)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: tcp://127.0.0.1:9: cannot open") and "after 1 reconnect tries" in last


def test_ground_truth_comes_from_labels_or_the_ucsd_gt_file(tiny_data, tmp_path):
    clip = tiny_data / "Test" / "Test002"
    assert ground_truth(str(clip), None) == [(1, 6), (15, 22)]
    labels = tmp_path / "labels.csv"
    labels.write_text("clip,start,end\nTest002,3,4\nother,1,2\n")
    assert ground_truth(str(clip), str(labels)) == [(3, 4)]
    assert ground_truth(str(tiny_data / "Train" / "Train001"), None) == []


def test_the_plot_shades_the_ground_truth_when_the_clip_has_it(run, tiny_data, tmp_path):
    from PIL import Image

    clip = tiny_data / "Test" / "Test002"  # gt [1:6, 15:22] in the dataset's .m file
    empty = tmp_path / "labels.csv"
    empty.write_text("clip,start,end\nother,1,2\n")  # labels without rows for this clip: nothing to shade
    images = {}
    for name, extra in (("gt", []), ("none", ["--labels", str(empty)])):
        out = tmp_path / f"{name}.csv"
        result = CliRunner().invoke(cli, ["predict", str(clip), "--model", str(run), "--out", str(out), *extra])
        assert result.exit_code == 0, result.output
        images[name] = np.asarray(Image.open(out.with_suffix(".png")).convert("RGB")).astype(int)

    def light_blue(img: np.ndarray) -> int:  # the ground truth's span
        r, b = img[..., 0], img[..., 2]
        return int(((b > r + 20) & (b > 200) & (r > 150)).sum())

    assert light_blue(images["gt"]) > 5000 and light_blue(images["none"]) == 0


@pytest.fixture
def breaking_server(ts_clip):
    """An HTTP server whose first response breaks off halfway through the clip; later ones send it whole."""
    import http.server
    import threading

    data, requests = ts_clip.read_bytes(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data if len(requests) > 1 else data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/clip.ts", requests
    server.shutdown()


def test_a_broken_stream_is_reopened_and_numbering_continues(run, breaking_server, tmp_path):
    url, requests = breaking_server
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["predict", url, "--model", str(run), "--out", str(out), "--reconnect", "1"])
    assert result.exit_code == 0, result.output
    assert "stream broke" in result.stderr and "reconnecting (1/1)" in result.stderr
    rows = _rows(out)
    assert len(requests) == 2 and N_FRAMES < len(rows) < 2 * N_FRAMES  # part of the first try, then all of it
    assert [int(r["frame"]) for r in rows] == list(range(1, len(rows) + 1))


def test_a_broken_stream_without_reconnects_keeps_its_rows_and_stops_with_one_line(run, breaking_server, tmp_path):
    url, requests = breaking_server
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["predict", url, "--model", str(run), "--out", str(out)])
    assert result.exit_code == 2 and len(requests) == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {url}: stream broke (Input/output error) (after 0 reconnect tries)"
    ]
    rows = _rows(out)
    assert WINDOW <= len(rows) < N_FRAMES and (tmp_path / "s.png").is_file()  # the frames read were all scored


# ------------------------------------------------------------------------------------ timeouts, full disk
@pytest.fixture
def stalling_server(ts_clip):
    """An HTTP server that sends the first half of the clip and then nothing more, the connection left open."""
    import http.server
    import threading

    data, release = ts_clip.read_bytes(), threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            release.wait(60)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/clip.ts"
    release.set()
    server.shutdown()


def test_a_stream_that_stops_sending_says_it_timed_out(run, stalling_server, tmp_path, monkeypatch):
    from ddp_vad.infer import live

    monkeypatch.setattr(live, "TIMEOUT", 1.0)
    out = tmp_path / "s.csv"
    result = CliRunner().invoke(cli, ["predict", stalling_server, "--model", str(run), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {stalling_server}: stream broke (timed out: no data for 1 s) (after 0 reconnect tries)"
    ]
    assert WINDOW <= len(_rows(out)) < N_FRAMES  # the frames before the silence were scored
    # a server that takes the connection and never answers: the open times out, and says so
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        result = CliRunner().invoke(cli, ["predict", url, "--model", str(run), "--out", str(out)])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {url}: cannot open (timed out: no answer for 1 s) (after 0 reconnect tries)"
    )


def _file_size_limit(limit: int):
    """A ``preexec_fn`` that caps the size of any file the process writes (a disk that fills up at ``limit``
    bytes: the write that crosses it is cut short, the next fails with EFBIG)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write (EFBIG) instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


def test_a_live_csv_that_fills_the_disk_ends_in_a_whole_row(run, ts_clip, tmp_path):
    out, limit = tmp_path / "live.csv", 245  # the header and about 10 rows; not at a row's end
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ddp_vad", "predict", "-", "--model", str(run), "--out", str(out)],
        input=ts_clip.read_bytes(), capture_output=True, env=env, timeout=120, preexec_fn=_file_size_limit(limit),
    )  # fmt: skip
    text = out.read_bytes()
    assert 100 < len(text) <= limit and text.endswith(b"\r\n"), text  # cut back to the last whole row
    lines = text.decode().splitlines()
    assert lines[0] == "frame,time,score,anomalous" and all(len(line.split(",")) == 4 for line in lines)
    assert [int(line.split(",")[0]) for line in lines[1:]] == list(range(1, len(lines)))
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.strip().splitlines()[-1] == f"error: {out}: File too large", err
