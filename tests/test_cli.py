"""The CLI starts fast: building it imports no stage (and no torch); --help reads cached option declarations that
must equal the live config dataclasses'."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ddp_vad.cli import StageCommand, cli
from ddp_vad.clispec import STAGE_CONFIGS, cached_specs, config_class, live_specs
from ddp_vad.options import params_from_specs

REPO = Path(__file__).resolve().parents[1]

# Runs `ddp_vad ARGS` in a fresh interpreter and prints which heavy modules it imported.
_PROBE = """
import sys
from ddp_vad.cli import cli
try:
    cli(sys.argv[1:], prog_name="ddp_vad")
except SystemExit:
    pass
print("IMPORTED", sorted(m for m in ("torch", "sklearn", "webdataset", "matplotlib") if m in sys.modules))
"""


def _probe(*args: str) -> tuple[str, float]:
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's package, installed or not
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, check=True, env=env)
    out = out.stdout
    return out, time.perf_counter() - t0


@pytest.mark.parametrize("args", [["--help"], ["transfer", "--help"], ["shard", "build", "-h"], ["predict", "--help"]])
def test_help_imports_no_stage_and_is_fast(args):
    out, seconds = _probe(*args)
    assert "IMPORTED []" in out, out  # no torch, scikit-learn, webdataset or matplotlib to print help
    assert "Usage: ddp_vad" in out
    assert seconds < 2.0, f"ddp_vad {' '.join(args)} took {seconds:.2f} s"  # measured ~0.1 s; 2-4 s before


def test_cached_option_declarations_equal_the_live_dataclasses():
    """cli_spec.json is what --help shows: it must not drift (regenerate: python -m ddp_vad.clispec)."""
    assert cached_specs() == live_specs(), "cli_spec.json is stale: run `python -m ddp_vad.clispec`"


def test_help_from_the_cache_equals_help_from_the_live_dataclass():
    for path in STAGE_CONFIGS:
        cached = [p.to_info_dict() for p in params_from_specs(cached_specs()[path])]
        live = [p.to_info_dict() for p in params_from_specs(live_specs()[path])]
        assert cached == live, path


def test_a_command_that_runs_takes_its_options_from_the_live_dataclass(monkeypatch, tmp_path):
    import ddp_vad.api as api

    seen = {}
    monkeypatch.setattr(api, "synth", lambda cfg: seen.setdefault("cfg", cfg))
    monkeypatch.setattr("ddp_vad.cli.cached_specs", lambda: {})  # no cache: the live dataclass must do
    command = cli.commands["synth"]
    assert isinstance(command, StageCommand)
    monkeypatch.setattr(command, "_source", None)
    result = CliRunner().invoke(cli, ["synth", str(tmp_path / "d"), "--frames", "12", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert isinstance(seen["cfg"], config_class("synth"))
    assert (seen["cfg"].frames, seen["cfg"].seed) == (12, 3)
