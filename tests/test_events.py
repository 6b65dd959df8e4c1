"""Anomalous events (infer/events.py): runs of flagged frames become one JSON line each as they close, and a line
that fills the disk is cut back, never left half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from ddp_vad.infer.events import Events

REPO = Path(__file__).resolve().parents[1]


def _frames(flags: list[int]) -> list[SimpleNamespace]:
    return [SimpleNamespace(frame=i, time=i / 10, score=0.4 + 0.5 * f + 0.001 * i, anomalous=bool(f))
            for i, f in enumerate(flags, start=1)]  # fmt: skip


def test_runs_of_flagged_frames_become_one_line_each(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text("an older run's line\n")
    events = Events("clip", 0.5, path)
    assert path.read_text() == ""  # a fresh file
    for s in _frames([0, 1, 1, 0, 0, 1, 1, 1]):
        events.add(s)
    assert len(path.read_text().splitlines()) == 1  # the first run is written as soon as it closes
    events.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(e["start_frame"], e["end_frame"], e["peak_frame"]) for e in lines] == [(2, 3, 3), (6, 8, 8)]
    assert events.count == 2 and lines[0]["clip"] == "clip" and lines[0]["threshold"] == 0.5


# A disk that fills up at the size the file has after its first line + 40 bytes: the second line (about 150 bytes)
# crosses it, so its write is cut short and the next one fails (RLIMIT_FSIZE, in a child process).
FULL_DISK = """
import json, resource, signal, sys
from types import SimpleNamespace
from ddp_vad.infer.events import Events
path = sys.argv[1]
events = Events("clip", 0.5, path)
frames = [SimpleNamespace(frame=i, time=i / 10, score=0.9, anomalous=f) for i, f in enumerate([1, 0, 1, 0], 1)]
events.add(frames[0]); events.add(frames[1])
size = len(open(path, "rb").read())
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    events.add(frames[2]); events.add(frames[3])
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_an_events_line_that_fills_the_disk_leaves_the_whole_lines_before_it(tmp_path):
    path = tmp_path / "events.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, env=env,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = path.read_text().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0].endswith("\n") and json.loads(lines[0])["start_frame"] == 1
    assert proc.stdout.split() == ["27", str(path)]  # EFBIG, naming the file
