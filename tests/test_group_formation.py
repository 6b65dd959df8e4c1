"""Process groups that cannot form fail fast with a one-line hint; formed groups keep their long waits.

A wrong network interface (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME), an unreachable MASTER_ADDR or a rank that never
starts used to hang until the group's timeout: 24 h for the gloo side group. Forming a group is now bounded by
DDP_VAD_GROUP_TIMEOUT; waits on the formed side group keep 24 h. All on the loopback address, with a 3 s timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddp_vad.errors import UserError
from ddp_vad.train.distributed import GROUP_TIMEOUT_ENV, group_formation_hint, group_formation_timeout

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_group_worker.py")
FORMATION_S = 3  # short, yet above the start-up skew of two ranks on a busy 2-core machine
LIMIT_S = 60  # a hang fails the test instead of blocking the suite


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    env.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
        **{GROUP_TIMEOUT_ENV: str(FORMATION_S)},
    )  # fmt: skip
    return env


def _two_ranks(mode: str, out: Path) -> list[dict]:
    port = _free_port()
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), mode, str(out)], env=_rank_env(r, 2, port), cwd=REPO)
        for r in (0, 1)
    ]
    try:
        for p in procs:
            p.wait(timeout=LIMIT_S)
    finally:
        for p in procs:
            p.kill()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_formation_timeout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(GROUP_TIMEOUT_ENV, raising=False)
    assert group_formation_timeout().total_seconds() == 600
    monkeypatch.setenv(GROUP_TIMEOUT_ENV, "45")
    assert group_formation_timeout().total_seconds() == 45
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv(GROUP_TIMEOUT_ENV, bad)
        with pytest.raises(UserError, match=GROUP_TIMEOUT_ENV):
            group_formation_timeout()


def test_hint_is_one_line_naming_both_interfaces_and_the_master_address(monkeypatch):
    monkeypatch.setenv(GROUP_TIMEOUT_ENV, "30")
    hint = group_formation_hint("the gloo side group", RuntimeError("Timed out\nwaiting for peers\n" + "x" * 500))
    assert "\n" not in hint and len(hint) < 600
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", GROUP_TIMEOUT_ENV, "30 s"):
        assert name in hint


def test_a_rank_that_never_starts_fails_the_cli_within_the_formation_timeout(tiny_shards, tmp_path):
    # A 2-process launch where only rank 0 starts (torchrun on the other node never ran, or MASTER_ADDR is wrong).
    t0 = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "ddp_vad", "pretrain", "--shards", str(tiny_shards), "--out", str(tmp_path / "run"),
         "--preset", "tiny", "--steps", "2"],
        env=_rank_env(0, 2, _free_port()), cwd=REPO, capture_output=True, text=True, timeout=LIMIT_S,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: the process group could not form within {FORMATION_S} s"), result.stderr
    assert "Traceback" not in result.stderr and "GLOO_SOCKET_IFNAME" in lines[-1]
    assert elapsed < FORMATION_S + 20  # start-up + the formation timeout, not torch's 30 min default
    assert not (tmp_path / "run").exists()


def test_side_group_with_a_wrong_interface_fails_on_both_ranks_within_the_timeout(tmp_path):
    ranks = _two_ranks("bad-iface", tmp_path)
    for r in ranks:
        assert "error" in r, r
        assert r["error"].startswith(f"the gloo side group could not form within {FORMATION_S} s"), r
        assert "GLOO_SOCKET_IFNAME" in r["error"] and "\n" not in r["error"]
        assert r["seconds"] < FORMATION_S + 10, r  # not the side group's 24 h
    assert "ddpvad_none0" in ranks[1]["error"]  # the rank with the wrong interface names it


def test_formed_side_group_waits_longer_than_the_formation_timeout(tmp_path):
    ranks = _two_ranks("wait", tmp_path)
    for r in ranks:
        assert r.get("ok"), r
        assert r["patient_timeout_s"] == 24 * 3600  # formed with the short timeout, then lengthened for the waits
        assert r["main_timeout_s"] == 30 * 60  # torch's gloo default restored after formation
    assert ranks[0]["barrier_s"] > 2 * FORMATION_S  # rank 0 waited past the formation timeout for rank 1
