"""``predict --webhook`` (infer/webhook.py), against local HTTP servers on 127.0.0.1 only: every event is POSTed as
its --events line, a failed POST is retried, a dead endpoint warns once and changes no score, and a slow endpoint
never holds up the scoring (a bounded queue drops what it cannot hold, and says so once)."""

from __future__ import annotations

import contextlib
import csv
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import fake_transfer_run

from ddp_vad.cli import cli
from ddp_vad.errors import UserError
from ddp_vad.infer.predict import PredictConfig
from ddp_vad.infer.webhook import Webhook
from ddp_vad.models import ModelConfig
from ddp_vad.presets import PRESETS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Endpoint:
    """What a local endpoint received: every request, and the JSON bodies it accepted (in order)."""

    def __init__(self, fail_first: int, delay: float):
        self.fail_first, self.delay = fail_first, delay
        self.requests = 0
        self.bodies: list[dict] = []


@contextlib.contextmanager
def endpoint(fail_first: int = 0, delay: float = 0.0) -> Iterator[tuple[str, _Endpoint]]:
    """An HTTP server on 127.0.0.1 that answers 500 to its first ``fail_first`` POSTs, then takes ``delay`` s to
    accept each one."""
    state = _Endpoint(fail_first, delay)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.requests += 1
            if state.requests <= state.fail_first:
                self.send_error(500, "try again")
                return
            time.sleep(state.delay)
            state.bodies.append(json.loads(body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hook", state
    finally:
        server.shutdown()
        server.server_close()


def dead_url() -> str:
    """A 127.0.0.1 port nobody listens on: bound, then closed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A transfer-run folder: two tiny recorded fold models (random weights), no out-of-fold scores (threshold
    given)."""
    cfg = ModelConfig(preset="tiny", window=10, height=24, width=36, **PRESETS["tiny"].model)
    return fake_transfer_run(tmp_path_factory.mktemp("run"), cfg, 2)


def _predict(clip: Path, run: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["predict", str(clip), "--model", str(run), "--out", str(out), *extra])


def _runs(scores: np.ndarray, t: float) -> int:
    flags = np.r_[0, (scores >= t).astype(int), 0]
    return int((np.diff(flags) == 1).sum())


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """An MPEG-TS video (60 frames, 10 frames/s): noise, with a bright square in frames 11-20 and 36-45."""
    import av

    path = tmp_path_factory.mktemp("clip") / "clip.ts"
    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="mpegts") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 72, 48, "yuv420p"
        for i in range(60):
            img = rng.integers(60, 100, (48, 72, 3), dtype=np.uint8)
            if 10 <= i < 20 or 35 <= i < 45:
                img[10:40, 20:60] = 250
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def scored(run, clip, tmp_path_factory) -> tuple[str, str]:
    """A threshold that gives the clip at least two events, and its CSV without a webhook."""
    out = tmp_path_factory.mktemp("plain") / "plain.csv"
    assert _predict(clip, run, out).exit_code == 0
    scores = np.array([float(r["score"]) for r in csv.DictReader(out.read_text().splitlines())])
    threshold = max(sorted(set(scores)), key=lambda t: _runs(scores, t))
    assert _runs(scores, threshold) >= 2
    result = _predict(clip, run, out, "--threshold", repr(float(threshold)))
    assert result.exit_code == 0
    return repr(float(threshold)), out.read_text()


def test_predict_posts_every_event_as_its_events_line(run, clip, scored, tmp_path):
    threshold, _ = scored
    events = tmp_path / "events.jsonl"
    with endpoint() as (url, state):
        result = _predict(clip, run, tmp_path / "s.csv", "--threshold", threshold, "--events", str(events),
                          "--webhook", url, "--webhook-on", "open,close")  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert len(lines) >= 2
    closed = [{k: v for k, v in b.items() if k != "event"} for b in state.bodies if b["event"] == "close"]
    opened = [b for b in state.bodies if b["event"] == "open"]
    assert closed == lines  # each close payload is its --events line
    assert [(b["clip"], b["start_frame"]) for b in opened] == [(e["clip"], e["start_frame"]) for e in lines]
    assert [b["event"] for b in state.bodies] == ["open", "close"] * len(lines)  # in the order they happened
    n = 2 * len(lines)
    assert f"webhook {url}: {n} of {n} event post(s) delivered, 0 dropped (queue full), 0 failed" in result.stdout
    assert "warning" not in result.stderr


def test_a_failed_post_is_retried_and_a_lasting_failure_warns_once(capsys):
    with endpoint(fail_first=1) as (url, state):
        hook = Webhook(url, backoff=0.01)
        hook.send({"n": 1})
        delivery = hook.close()
    assert state.requests == 2 and state.bodies == [{"n": 1}] and delivery.delivered == 1 and delivery.failed == 0
    assert capsys.readouterr().err == ""
    with endpoint(fail_first=100) as (url, state):
        hook = Webhook(url, retries=2, backoff=0.01)
        for n in range(3):
            hook.send({"n": n})
        delivery = hook.close()
    assert state.requests == 3 + 1 + 1  # the first payload tried 1 + 2 times; the endpoint then known dead: once each
    assert (delivery.sent, delivery.delivered, delivery.failed) == (3, 0, 3)
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: webhook {url}: HTTP 500")


def test_a_dead_endpoint_warns_once_and_scoring_completes_with_the_same_csv(run, clip, scored, tmp_path):
    threshold, plain = scored
    url, out = dead_url(), tmp_path / "s.csv"
    result = _predict(clip, run, out, "--threshold", threshold, "--webhook", url, "--webhook-on", "open,close")
    assert result.exit_code == 0, result.output
    assert out.read_text() == plain
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "Connection refused" in warnings[0], result.stderr
    assert f"webhook {url}: 0 of " in result.stdout and " failed" in result.stdout


def test_a_slow_endpoint_never_holds_up_the_sender(capsys):
    with endpoint(delay=1.0) as (url, state):
        hook = Webhook(url, queue_size=4)
        t0 = time.perf_counter()
        for n in range(20):
            hook.send({"n": n})
        sending = time.perf_counter() - t0
        t0 = time.perf_counter()
        delivery = hook.close(wait=0.2)
        closing = time.perf_counter() - t0
    assert sending < 0.5  # 20 payloads to a server that takes 1 s each: the sender never waited (blocking: 17 s)
    assert closing < 2.5  # the wait (0.2 s), then the POST in flight (1 s); not the 5 s the queue would take
    assert delivery.dropped >= 20 - 5 and delivery.unsent >= 3 and delivery.sent == 20
    assert delivery.delivered + delivery.dropped + delivery.failed + delivery.unsent == 20
    assert [b["n"] for b in state.bodies] == list(range(delivery.delivered))  # in order, the first ones
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1 and "dropping events" in warnings[0]  # one warning however many are dropped


@pytest.mark.parametrize("url", ["ftp://127.0.0.1/x", "file:///etc/passwd", "127.0.0.1:8000", "http://", "http://h:x"])
def test_a_webhook_url_that_is_not_http_is_refused_up_front(run, clip, tmp_path, url):
    with pytest.raises(UserError, match="give an http:// or https:// URL"):
        PredictConfig(source=str(clip), model=str(run), webhook=url)
    result = _predict(clip, run, tmp_path / "s.csv", "--webhook", url)
    assert (
        result.exit_code == 2
        and result.stderr.strip() == f"error: --webhook {url}: give an http:// or https:// URL with a host"
    )
    assert not (tmp_path / "s.csv").exists()
    with pytest.raises(UserError, match="--webhook-on sometimes"):
        PredictConfig(source=str(clip), model=str(run), webhook="http://127.0.0.1:1/", webhook_on="sometimes")
