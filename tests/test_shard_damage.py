"""Damaged shards: one rule for every reader, and the split by sample when shards are fewer than readers.

Each of four damages (truncated tar, broken tar header, deleted tar, corrupted block json) is applied to a copy of
a built set. Streaming training reports the shard once, by name, with the windows lost, and carries on; readers
that need every window (in-memory set, cross-validation, frame-level evaluation) stop with exit status 2 and one
line naming the shard and ``shard info --verify``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ddp_vad.cli import cli
from ddp_vad.data.reader import infinite_batches, iter_windows, load_window_set, stream_batches
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest, verify_shards
from ddp_vad.errors import UserError
from ddp_vad.eval.figures import real_windows
from ddp_vad.eval.frame_scores import read_shard_frame_labels
from ddp_vad.train.gan_monitor import sample_real_windows


def _json_offset(data: bytes) -> tuple[int, int]:
    """(offset, size) of the first ``.json`` member's payload in a tar."""
    pos = 0
    while True:
        name, size = data[pos : pos + 100].split(b"\0", 1)[0], int(data[pos + 124 : pos + 135], 8)
        if name.endswith(b".json"):
            return pos + 512, size
        pos += 512 + size + (-size) % 512


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def break_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    offset, _ = _json_offset(bytes(data))
    data[offset - 512 + 130] ^= 0x01  # a size digit of the json member's header: its checksum no longer matches
    path.write_bytes(bytes(data))


def delete(path: Path) -> None:
    path.unlink()


def corrupt_json(path: Path) -> None:
    data = bytearray(path.read_bytes())
    offset, size = _json_offset(bytes(data))
    data[offset : offset + 8] = b"\xff\xfe{oops"  # not UTF-8, not JSON
    path.write_bytes(bytes(data))


DAMAGES = [truncate, break_header, delete, corrupt_json]


@pytest.fixture(params=DAMAGES, ids=[d.__name__ for d in DAMAGES])
def damaged(request, tiny_shards, tmp_path) -> tuple[Path, Path, set[str], set[str]]:
    """(copy of the tiny set with one shard damaged, the damaged shard, the keys of the windows it held, all keys)."""
    copy = Path(shutil.copytree(tiny_shards, tmp_path / "s"))
    victim = copy / load_manifest(copy)["shards"][2]["name"]
    lost = {w["key"] for w in iter_windows(copy, shards=[victim.name])}
    request.param(victim)
    return copy, victim, lost, set(load_window_set(tiny_shards).keys)


def test_streaming_reports_the_shard_once_and_reads_everything_else(damaged, capsys):
    copy, victim, lost, everything = damaged
    keys = [k for b in stream_batches(copy, 4, workers=2) for k in b["key"]]
    keys2 = [k for b in stream_batches(copy, 4, epoch=1) for k in b["key"]]  # read again: not reported again
    reports = [line for line in capsys.readouterr().err.splitlines() if victim.name in line]
    assert len(reports) == 1 and reports[0].startswith("warning: "), reports
    assert f"{len(lost)} of {len(lost)} windows lost" in reports[0] and "--verify" in reports[0]
    assert sorted(keys) == sorted(keys2) == sorted(everything - lost)


def test_endless_training_stream_skips_it(damaged):
    copy, victim, lost, _ = damaged
    batches = infinite_batches(copy, 4, rank=0, world_size=1)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        seen = {k for _ in range(40) for k in next(batches)["key"]}
    assert batches.epoch >= 1 and seen and not seen & lost


def test_in_memory_and_evaluation_readers_refuse_it_naming_the_shard(damaged):
    copy, victim, _, _ = damaged
    for read in (load_window_set, read_shard_frame_labels):
        with pytest.raises(UserError, match=rf"{victim.name}.*shard info .*--verify") as err:
            read(copy)
        assert "\n" not in str(err.value)
    assert any(victim.name in p for p in verify_shards(copy, show_progress=False))


def test_similarity_pool_and_report_figures_skip_it(damaged, capsys):
    copy, victim, lost, _ = damaged
    manifest = load_manifest(copy)
    pool = sample_real_windows(copy, manifest, 60, seed=0)  # 60 of 64 windows: the victim's are drawn too
    assert victim.name in capsys.readouterr().err
    assert 0 < len(pool) < 60
    shown = real_windows(copy, 1000)
    assert len(shown) == manifest["counts"]["kept"] - len(lost) and not {k for k, _ in shown} & lost


def test_cross_validation_and_verify_exit_2_with_one_line(damaged, tmp_path):
    copy, victim, _, _ = damaged
    for args in (
        ["baselines", "--shards", str(copy), "--out", str(tmp_path / "b"), "--methods", "nb"],
        ["transfer", "--shards", str(copy), "--out", str(tmp_path / "t"), "--from", "scratch", "--preset", "tiny"],
    ):
        args += ["--protocol", "window"]  # 3 test clips: too few for leak-free folds
        result = CliRunner().invoke(cli, args)
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        assert len(errors) == 1 and victim.name in errors[0] and "--verify" in errors[0], result.output
        assert result.output.rstrip().endswith(errors[0])  # the error is the last line, on its own
    result = CliRunner().invoke(cli, ["shard", "info", str(copy), "--verify"])
    assert result.exit_code == 2 and f"BAD  {victim.name}" in result.output


def test_evaluate_refuses_a_run_whose_shards_are_damaged_naming_the_shard(tiny_shards, tmp_path):
    from ddp_vad.eval.baselines import BaselinesConfig, run_baselines

    copy = Path(shutil.copytree(tiny_shards, tmp_path / "s"))
    run_baselines(BaselinesConfig(shards=str(copy), out=str(tmp_path / "b"), methods="nb", protocol="window"))
    victim = copy / load_manifest(copy)["shards"][2]["name"]
    truncate(victim)
    result = CliRunner().invoke(cli, ["evaluate", str(tmp_path / "b" / "nb"), "--out", str(tmp_path / "r")])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(errors) == 1 and victim.name in errors[0] and "--verify" in errors[0], result.output
    assert not (tmp_path / "r").exists()  # no report with a quiet note instead of the frame-level numbers


def test_pretraining_runs_on_with_a_damaged_shard(damaged, tmp_path):
    copy, victim, _, _ = damaged
    args = ["pretrain", "--shards", str(copy), "--out", str(tmp_path / "gan"), "--preset", "tiny", "--steps", "3",
            "--batch-size", "4", "--workers", "0", "--similarity-every", "2", "--checkpoint-every", "0",
            "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert victim.name in result.stderr
    assert (tmp_path / "gan" / "similarity.csv").read_text().count("\n") >= 2


# -------------------------------------------------------------------------------------- split by sample
@pytest.fixture(scope="module")
def one_shard(tmp_path_factory) -> Path:
    from tests.conftest import TINY_CLIPS, write_ucsd

    root = tmp_path_factory.mktemp("one")
    data = write_ucsd(root / "data", {k: v for k, v in TINY_CLIPS.items() if k != "Train002"})  # one group of 4
    cfg = ShardConfig(data=str(data), out=str(root / "s"), height=24, width=36, folds=4, workers=1, shard_size=1000)
    return build_shards(cfg, show_progress=False)


def test_fewer_shards_than_readers_split_by_sample(one_shard):
    assert len(load_manifest(one_shard)["shards"]) == 1
    everything = sorted(load_window_set(one_shard).keys)
    for epoch in (0, 1):
        seen = []
        for rank in (0, 1):
            keys = [k for b in stream_batches(one_shard, 4, epoch=epoch, rank=rank, world_size=2, workers=2)
                    for k in b["key"]]  # fmt: skip
            again = [k for b in stream_batches(one_shard, 4, epoch=epoch, rank=rank, world_size=2, workers=2)
                     for k in b["key"]]  # fmt: skip
            assert keys == again  # deterministic
            assert abs(len(keys) - len(everything) / 2) <= 2
            seen.append(set(keys))
        assert not seen[0] & seen[1] and sorted(seen[0] | seen[1]) == everything


def test_split_by_sample_is_said_once(one_shard, capsys):
    list(stream_batches(one_shard, 4, rank=0, world_size=3))
    assert "warning: 1 shard(s) < 3 process(es) x 1 loader worker(s): splitting by sample" in capsys.readouterr().err
    list(stream_batches(one_shard, 4, epoch=1, rank=0, world_size=3))  # the same run's next epoch: silent
    list(stream_batches(one_shard, 4, rank=1, world_size=3))  # never from a non-main rank
    assert "splitting by sample" not in capsys.readouterr().err
    batches = infinite_batches(one_shard, 4, rank=2, world_size=3)
    assert len(next(batches)["key"]) == 4  # the last rank gets data too: no DDP hang
    assert np.unique([len(b["key"]) for b in stream_batches(one_shard, 100, rank=2, world_size=3)]).size == 1


@pytest.mark.slow
def test_two_real_processes_split_one_shard_by_sample(one_shard, tmp_path):
    """torchrun, 2 processes x 2 loader workers on a single shard: disjoint halves, every window once."""
    script = Path(__file__).with_name("_dist_stream.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", str(script),
           str(one_shard), str(tmp_path), "0"]  # fmt: skip
    result = subprocess.run(cmd, timeout=120, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0] and ranks[1] and not set(ranks[0]) & set(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == sorted(load_window_set(one_shard).keys)
    assert result.stderr.count("warning: 1 shard(s) < 2 process(es)") == 1  # said once, by rank 0, on one line


@pytest.mark.slow
def test_torchrun_pretrain_on_fewer_shards_than_processes(one_shard, tmp_path):
    """The issue's case: `torchrun --nproc_per_node 2 -m ddp_vad pretrain` on a one-shard set trains (by sample)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "ddp_vad",
           "pretrain", "--shards", str(one_shard), "--out", str(tmp_path / "gan"), "--preset", "tiny", "--steps", "3",
           "--batch-size", "4", "--workers", "1", "--checkpoint-every", "0", "--similarity-every", "0",
           "--image-every", "0", "--no-progress"]  # fmt: skip
    result = subprocess.run(cmd, timeout=240, env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "splitting by sample" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "gan" / "generator.safetensors").is_file()
