"""The GPU paths that CPU runs do not exercise by themselves: pinned loader batches, and benchmarks/gpu.py keeping
every row it measured when a time limit cuts it (rows written as they finish, cheap rows first, --time-budget)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddp_vad.data.reader import stream_batches

REPO = Path(__file__).resolve().parents[1]
GPU_BENCH = REPO / "benchmarks" / "gpu.py"


def _gpu_module(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_bench", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "gpu_benchmark.rows.jsonl").read_text().splitlines()]


def test_pin_memory_pins_every_batch_tensor(tiny_shards, monkeypatch):
    # On CUDA, .to(device, non_blocking=True) from pageable memory is synchronous: batches must come pinned. There is
    # no CUDA here, so record the pin_memory calls instead of pinning.
    pinned: list[torch.Tensor] = []

    def record(self, *args, **kwargs):
        pinned.append(self)
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", record)
    batches = list(stream_batches(tiny_shards, 4, workers=0))
    assert not pinned  # off by default (CPU runs)
    batches = list(stream_batches(tiny_shards, 4, workers=0, pin_memory=True))
    tensors = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
    assert batches and len(pinned) == len(tensors) and {id(t) for t in pinned} == {id(t) for t in tensors}
    pinned.clear()  # with loader workers the batches are still assembled (and pinned) in the main process
    batches = list(stream_batches(tiny_shards, 4, workers=2, pin_memory=True))
    tensors = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
    assert batches and {id(t) for t in pinned} == {id(t) for t in tensors}


def test_benchmark_killed_midway_keeps_the_rows_it_measured(tiny_shards, tmp_path):
    out = tmp_path / "bench"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(GPU_BENCH), "--quick", "--shards", str(tiny_shards), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            rows_file = out / "gpu_benchmark.rows.jsonl"
            if rows_file.is_file() and len(rows_file.read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the benchmark ended before it could be cut: " + proc.stderr.read()[-2000:]
        proc.send_signal(signal.SIGKILL)  # as a Slurm/slot time limit does
        proc.wait(timeout=30)
    finally:
        proc.kill()
    rows = _rows(out)
    assert len(rows) >= 2 and all(r["kind"] == "case" for r in rows)
    assert rows[0]["status"] == "ok" and rows[0]["samples_per_s"] > 0  # measured before the kill, not lost
    result = json.loads((out / "gpu_benchmark.json").read_text())
    assert result["meta"]["complete"] is False and result["meta"]["rows_done"] >= 2
    assert [r["phase"] for r in result["cases"]] == [r["phase"] for r in rows[: len(result["cases"])]]
    assert "**Partial:" in (out / "gpu_benchmark.md").read_text()


@pytest.mark.usefixtures("one_torch_thread")
def test_time_budget_skips_what_it_cannot_start_and_compile_rows_come_last(tiny_shards, tmp_path, capsys, monkeypatch):
    gpu = _gpu_module(monkeypatch)
    out = tmp_path / "bench"
    args = ["--quick", "--shards", str(tiny_shards), "--out", str(out), "--compile", "on", "--reader-workers", "0"]
    result = gpu.main([*args, "--time-budget", "0"])
    rows = _rows(out)
    cases = [r for r in rows if r["kind"] == "case"]
    assert result["meta"]["complete"] is True and result["meta"]["rows_done"] == len(rows) > 4
    assert all(r["status"] == "skipped" and r["note"] == "time budget" for r in rows)
    kinds = ["compile" if r.get("compile") else r["kind"] for r in rows]
    assert kinds.index("reader") < kinds.index("compile") and kinds[-1] == "compile"  # compile rows last
    assert not any(c["compile"] for c in cases[: kinds.index("reader")])
    assert "**Partial:" not in (out / "gpu_benchmark.md").read_text()
    assert "rows are written as they finish" in capsys.readouterr().out
