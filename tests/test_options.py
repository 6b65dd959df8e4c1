"""The option layer refuses what it cannot do: a missing required option, a config-file value of the wrong type, a
``--topk`` or ``--val-clips`` beyond what the data holds, a later pipeline stage's bad option (before any stage runs);
and every command ends alike on Ctrl-C (exit 130), on a full disk (the error names the file) and never leaves a torn
last CSV row."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
from click.testing import CliRunner
from conftest import error_line as _error_line

from ddp_vad.cli import cli
from ddp_vad.clispec import STAGE_CONFIGS, live_specs
from ddp_vad.errors import UserError, error_message
from ddp_vad.files import append_text, write_text_atomic
from ddp_vad.runlock import lock_path

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


def _never_runs(*_args, **_kw):
    raise AssertionError("the command ran")


def _value(spec: dict) -> str:
    return spec["choices"][0] if spec["choices"] else {"int": "1", "float": "0.5"}.get(spec["kind"], "x")


# ------------------------------------------------------------------------------------ required options
def test_every_required_option_left_out_is_one_line_exit_2_naming_it(monkeypatch):
    monkeypatch.setattr("ddp_vad.cli._config", _never_runs)  # nothing may be built or run
    checked = 0
    for path, specs in live_specs().items():
        required = [s for s in specs if s["required"]]
        for left_out in required:
            args = path.split()
            for s in required:
                if s is left_out:
                    continue
                args += [_value(s)] if s["argument"] else [s["flag"] or "--" + s["name"].replace("_", "-"), _value(s)]
            result = CliRunner().invoke(cli, args)
            if left_out["argument"]:
                needle = f"missing argument {left_out['name'].upper()}"
            else:
                needle = f"missing option {left_out['flag'] or '--' + left_out['name'].replace('_', '-')}"
            _error_line(result, 2, needle)
            checked += 1
    assert checked >= len(STAGE_CONFIGS)  # every stage command has at least one
    _error_line(CliRunner().invoke(cli, ["shard", "info"]), 2, "missing argument DIRECTORY")


# ------------------------------------------------------------------------------------ config files
@pytest.mark.parametrize(
    "text,suffix,needle",
    [
        ("epochs = 1.7\n", ".toml", "epochs = 1.7: expected an integer"),
        ("epochs = true\n", ".toml", "epochs = true: expected an integer"),
        ('lr = "0.001"\n', ".toml", 'lr = "0.001": expected a number'),
        ("lr: 1e-3\n", ".yaml", "in YAML write 0.001"),
        ("standardize = 1\n", ".toml", "standardize = 1: expected true or false"),
        ("protocol = 3\n", ".toml", "expected one of"),
        ("from = 7\n", ".toml", "from = 7: expected text"),
        ("mixed_precision: no\n", ".yaml", "mixed_precision = false"),  # YAML 1.1 reads no as false
        ("shards: null\n", ".yaml", "shards = null: expected a value"),
    ],
)
def test_config_file_values_are_checked_against_the_option_type(tmp_path, monkeypatch, text, suffix, needle):
    monkeypatch.setattr("ddp_vad.cli._config", _never_runs)
    config = tmp_path / f"run{suffix}"
    config.write_text(text)
    args = ["transfer", "--config", str(config), "--shards", "s", "--out", "o", "--from", "x"]
    result = CliRunner().invoke(cli, args)
    _error_line(result, 2, str(config), needle)


def test_config_file_values_of_the_right_type_are_taken(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr("ddp_vad.cli._config", lambda path, kwargs: seen.update(kwargs))
    monkeypatch.setattr("ddp_vad.cli._stage", lambda name: lambda cfg: None)
    config = tmp_path / "run.toml"
    config.write_text('epochs = 3\nlr = 1\nstandardize = false\nfrom = "scratch"\ntopk = 2\ndropout = 0.25\n')
    result = CliRunner().invoke(cli, ["transfer", "--config", str(config), "--shards", "s", "--out", "o"])
    assert result.exit_code == 0, result.output
    taken = tuple(seen[k] for k in ("epochs", "lr", "standardize", "source", "dropout"))
    assert taken == (3, 1, False, "scratch", 0.25)


# ------------------------------------------------------------------------------------ --topk, --val-clips
TINY = {"window": 10, "height": 24, "width": 36}  # the tiny preset leaves a 1x2 conv map here


def test_topk_above_the_conv_map_positions_is_refused_and_a_default_one_is_noted(capsys):
    from ddp_vad.models import model_config_for

    with pytest.raises(UserError, match=r"--topk 3: .*1x2 = 2 position\(s\) on 24x36 frames; give --topk 2 or less"):
        model_config_for("tiny", TINY, pooling="topk", topk=3)
    assert model_config_for("tiny", TINY, pooling="topk", topk=2).topk == 2
    assert capsys.readouterr().err == ""
    model_config_for("tiny", TINY, pooling="topk")  # the default topk, 8
    assert "warning: pooling topk: the default topk 8 is more than" in capsys.readouterr().err
    model_config_for("tiny", TINY, pooling="max", topk=2)
    assert "warning: --topk 2: has no effect with pooling max" in capsys.readouterr().err


def _transfer_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["transfer", "--shards", str(shards), "--out", str(out), "--from", "scratch", "--preset", "tiny",
            "--protocol", "window", "--epochs", "1", "--batch-size", "8", "--no-progress", *extra]  # fmt: skip


def test_topk_and_val_clips_beyond_the_data_stop_transfer_before_any_fold(tiny_shards, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(cli, _transfer_args(tiny_shards, run, "--pooling", "topk", "--topk", "5"))
    _error_line(result, 2, "--topk 5", "give --topk 2 or less")
    assert not (run / "folds").exists()
    result = CliRunner().invoke(cli, _transfer_args(tiny_shards, run, "--val-clips", "5"))
    line = _error_line(result, 2, "--val-clips 5: fold 0 trains on", "needs one left to fit on")
    assert not (run / "folds").exists(), line  # refused before the first fold, not validated on nothing


# ------------------------------------------------------------------------------------ the pipeline
def test_pipeline_checks_every_stage_option_before_the_first_stage(tmp_path, monkeypatch):
    monkeypatch.setattr("ddp_vad.pipeline._prepare_data", _never_runs)
    out = tmp_path / "p"
    result = CliRunner().invoke(cli, ["pipeline", "--out", str(out), "--preset", "tiny", "--methods", "bogus"])
    _error_line(result, 2, "--methods bogus")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ Ctrl-C
INTERRUPTIBLE = [["synth", "x"], ["shard", "build", "x"], ["shard", "info", "x"], ["pretrain", "--shards", "s",
                 "--out", "o"], ["transfer", "--shards", "s", "--out", "o", "--from", "scratch"], ["baselines",
                 "--shards", "s", "--out", "o"], ["evaluate", "r", "--out", "o"], ["predict", "x"], ["export", "r"],
                 ["pipeline", "--out", "o"]]  # fmt: skip


@pytest.mark.parametrize("stop", [KeyboardInterrupt, click.exceptions.Abort])
def test_ctrl_c_is_exit_130_and_one_line_for_every_command(monkeypatch, stop):
    def interrupted(*_args, **_kw):
        raise stop()

    monkeypatch.setattr("ddp_vad.cli._config", lambda path, kwargs: None)
    monkeypatch.setattr("ddp_vad.cli._stage", lambda name: interrupted)
    monkeypatch.setattr("ddp_vad.data.shards.print_info", interrupted)
    assert all(any(a[: len(p.split())] == p.split() for a in INTERRUPTIBLE) for p in STAGE_CONFIGS)
    for args in INTERRUPTIBLE:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 130, (args, result.output)
        assert "Aborted" not in result.output and "Traceback" not in result.output
        if args[0] != "predict":  # predict prints its own line (the frames it scored)
            assert result.stderr.splitlines() == ["interrupted"], (args, result.output)


def _plain_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_sigint_during_a_real_run_exits_130(tiny_shards, tmp_path):
    run = tmp_path / "gan"
    args = ["pretrain", "--shards", str(tiny_shards), "--out", str(run), "--preset", "tiny", "--steps", "100000",
            "--batch-size", "4", "--checkpoint-every", "0", "--similarity-every", "0", "--image-every", "0",
            "--workers", "0", "--no-progress", "--protocol", "window"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    # The child gets SIGINT as a shell would deliver it: unblocked, default disposition. A child inherits its
    # parent's blocked-signal mask and ignored signals, and earlier tests in the same pytest process can leave
    # SIGINT blocked there (the full suite timed out here while the test alone passed).
    proc = subprocess.Popen([sys.executable, "-m", "ddp_vad", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_plain_sigint)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not lock_path(run).exists():  # the stage holds its folder: the run is under way
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        state = f"pytest's SIGINT: blocked {signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])}, " \
                f"handler {signal.getsignal(signal.SIGINT)}"  # fmt: skip
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit 60 s after SIGINT ({state})")
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err and "Aborted" not in err, err


def test_ctrl_c_raised_inside_exec_still_exits_130(tmp_path):
    # Under `python -m`, CPython kills itself with SIGINT at exit after a KeyboardInterrupt raised inside exec() of
    # a string, even one the guard caught: a Ctrl-C landing in a dataclass being created by a lazy import (the real
    # run above, under load, exited -2). Deterministic here: the command raises it from exec itself.
    script = tmp_path / "boom.py"
    script.write_text(
        "import sys\n"
        "from ddp_vad.cli import cli, main\n"
        "@cli.command('boom')\n"
        "def boom():\n"
        "    exec('raise KeyboardInterrupt')\n"
        "sys.argv = ['ddp_vad', 'boom']\n"
        "main()\n"
    )
    # As `python -m ddp_vad` runs: only a module run checks that mark at exit (a script's SystemExit exits at once).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "boom"], env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=_plain_sigint)  # fmt: skip
    assert (proc.returncode, proc.stderr.strip()) == (130, "interrupted")


# ------------------------------------------------------------------------------------ full disk, torn rows
def _full_disk(*_args, **_kw):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write to an open file: no file name


def test_a_full_disk_names_the_file_being_written(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    monkeypatch.setattr(Path, "write_text", _full_disk)
    with pytest.raises(OSError) as caught:
        write_text_atomic(target, "{}")
    assert error_message(caught.value) == f"{target}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # no temp file left either
    with pytest.raises(OSError, match="No space left") as caught:
        append_text("/dev/full", "1,0.5,0.25\n")  # a real ENOSPC
    assert caught.value.filename == "/dev/full"


def test_a_full_disk_during_synth_is_one_line_naming_the_frame(tmp_path, monkeypatch):
    monkeypatch.setattr(Path, "write_bytes", _full_disk)
    out = tmp_path / "synth"
    args = ["synth", str(out), "--train-clips", "0", "--test-clips", "1", "--frames", "10", "--height", "16",
            "--width", "16"]  # fmt: skip
    line = _error_line(CliRunner().invoke(cli, args), 2, "No space left on device", str(out))
    assert line.endswith(".tif: No space left on device"), line


def _torn_write(path_end: str, fail_at: int):
    """An ``os.write`` that, on its ``fail_at``-th call for a file whose name ends with ``path_end``, writes half the
    bytes and then finds the disk full."""
    real, calls = os.write, []

    def write(fd, data):
        if not os.readlink(f"/proc/self/fd/{fd}").endswith(path_end):
            return real(fd, data)
        calls.append(fd)
        if len(calls) == fail_at:
            real(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    return write


def test_a_failed_append_leaves_no_torn_last_line(tmp_path, monkeypatch):
    rows = tmp_path / "rows.csv"
    rows.write_text("step,cosine,l2\n")
    append_text(rows, "1,0.5,0.25\n")
    monkeypatch.setattr(os, "write", _torn_write("rows.csv", 1))
    with pytest.raises(OSError, match="No space left") as caught:
        append_text(rows, "2,0.6,0.2\n")
    assert caught.value.filename == str(rows)
    assert rows.read_text() == "step,cosine,l2\n1,0.5,0.25\n"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to tell files apart")
def test_pretrain_similarity_csv_keeps_whole_rows_on_a_full_disk(tiny_shards, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "write", _torn_write("similarity.csv", 2))  # the second row fails half-way
    run = tmp_path / "gan"
    args = ["pretrain", "--shards", str(tiny_shards), "--out", str(run), "--preset", "tiny", "--steps", "4",
            "--batch-size", "4", "--checkpoint-every", "0", "--similarity-every", "1", "--similarity-samples", "4",
            "--image-every", "0", "--workers", "0", "--no-progress", "--protocol", "window"]  # fmt: skip
    _error_line(CliRunner().invoke(cli, args), 2, str(run / "similarity.csv"), "No space left on device")
    text = (run / "similarity.csv").read_text()
    assert text.endswith("\n") and [len(r.split(",")) for r in text.splitlines()] == [3, 3], text  # header, row 1
