"""Faults a hostile user causes, command by command: one line naming the path, the right exit status, nothing lost.

Covers the CLI's guard (OSError -> ``error: <path>: <reason>``, exit 2; anything else one line + a hint, exit 1),
damaged checkpoints (GAN steps and transfer folds), a full disk during a checkpoint, 16-bit and palette frames,
damaged discriminator metadata, fold results that are not objects, and one live writer per folder.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_CLIPS, torchrun, write_ucsd
from conftest import error_line as _error_line
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import ShardConfig, build_shards, load_manifest
from ddp_vad.data.sources.frames import read_frame, read_rgb
from ddp_vad.errors import UserError
from ddp_vad.models import build_lrcn, model_config_for
from ddp_vad.runlock import lock_path, run_lock
from ddp_vad.train.checkpoint import checkpoint_problem, list_checkpoints, read_train_state
from ddp_vad.weights import save_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


def _pretrain_args(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["pretrain", "--shards", str(shards), "--out", str(out), "--preset", "tiny", "--steps", str(steps),
            "--batch-size", "4", "--checkpoint-every", "2", "--keep-checkpoints", "3", "--similarity-every", "0",
            "--image-every", "0", "--workers", "0", "--no-progress", *extra]  # fmt: skip


# ------------------------------------------------------------------------------------- the CLI's guard
def test_out_under_a_regular_file_is_one_line_naming_it_for_every_command(tiny_shards, tiny_data, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    model = tmp_path / "m.safetensors"
    cfg = model_config_for("tiny", load_manifest(tiny_shards))
    save_model(build_lrcn(cfg), model, cfg, kind="classifier")
    clip = tiny_data / "Test" / "Test001"
    commands = {
        "shard build": ["shard", "build", str(tiny_data), "--out", str(blocker / "shards")],
        "pretrain": _pretrain_args(tiny_shards, blocker / "gan", 2),
        "evaluate": ["evaluate", str(tmp_path), "--out", str(blocker / "report")],
        "predict": ["predict", str(clip), "--model", str(model), "--out", str(blocker / "s.csv")],
    }
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps({"method": "m", "protocol": "window", "folds": []}))
    for args in commands.values():
        result = CliRunner().invoke(cli, args)
        _error_line(result, 2, str(blocker), "not a folder")
    assert blocker.read_text() == "keep me"


def test_an_unexpected_exception_is_one_line_and_a_hint_with_exit_1(monkeypatch, tmp_path):
    import ddp_vad.api as api_module

    def broken(_cfg):
        raise KeyError("internal")

    monkeypatch.setattr(api_module, "pretrain", broken)  # the public function the command calls
    shards = tmp_path / "s"
    shards.mkdir()
    result = CliRunner().invoke(cli, ["pretrain", "--shards", str(shards), "--out", str(tmp_path / "o")])
    assert _error_line(result, 1, "KeyError") and "rerun with --debug for the traceback" in result.stderr
    result = CliRunner().invoke(cli, ["--debug", "pretrain", "--shards", str(shards), "--out", str(tmp_path / "o")])
    assert isinstance(result.exception, KeyError)  # --debug lets the traceback through


# ------------------------------------------------------------------------------ damaged GAN checkpoints
def test_damaged_newest_checkpoints_fall_back_to_the_newest_intact_one(tiny_shards, tmp_path):
    run = tmp_path / "gan"
    assert CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 6)).exit_code == 0
    ckpts = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(ckpts)] == [2, 4, 6]
    model = ckpts / "step_0000006" / "pytorch_model.bin"
    model.write_bytes(model.read_bytes()[:100])  # truncated
    (ckpts / "step_0000004" / "optimizer.bin").unlink()  # deleted
    torn = ckpts / ".tmp-step_0000099"  # a save killed mid-way, at a step this run never reaches again
    torn.mkdir()
    (torn / "pytorch_model.bin").write_bytes(b"half")
    result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 8))
    assert result.exit_code == 0, result.output
    assert f"warning: {ckpts / 'step_0000006'}: damaged checkpoint (pytorch_model.bin is truncated" in result.stderr
    assert f"warning: {ckpts / 'step_0000004'}: damaged checkpoint (optimizer.bin is missing)" in result.stderr
    assert "resuming from" in result.output and "(step 2)" in result.output  # and so trained steps 3..8 only
    assert (ckpts / "step_0000006.damaged").is_dir() and (ckpts / "step_0000004.damaged").is_dir()  # kept, aside
    assert checkpoint_problem(ckpts / "step_0000008") is None
    assert not torn.exists()  # the next run removes torn staging folders, not only the one it re-saves
    model = ckpts / "step_0000008" / "pytorch_model.bin"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the sha256 tells
    model.write_bytes(bytes(data))
    problem = checkpoint_problem(ckpts / "step_0000008")
    assert problem is not None and "pytorch_model.bin is truncated or changed" in problem


def test_a_gan_run_that_does_not_say_its_protocol_is_refused_under_leakfree(tmp_path):
    from ddp_vad.train.source import check_gan_protocol

    gan = tmp_path / "gan"
    gan.mkdir()
    (gan / "discriminator.safetensors").write_bytes(b"")
    (gan / "config.json").write_text(json.dumps({"config": {"preset": "tiny"}}))  # no "protocol": an older run
    with pytest.raises(UserError, match="pretrained with --protocol window"):
        check_gan_protocol(str(gan), "leakfree")
    assert check_gan_protocol(str(gan), "window") == []


def test_no_usable_checkpoint_is_exit_2_and_moves_nothing(tiny_shards, tmp_path):
    run = tmp_path / "gan"
    assert CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 4)).exit_code == 0
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:07d}" / "optimizer_1.bin").unlink()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 6))
    _error_line(result, 2, "no usable checkpoint", str(run / "checkpoints"), "optimizer_1.bin is missing")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    explicit = run / "checkpoints" / "step_0000004"
    result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 6, "--resume", str(explicit)))
    _error_line(result, 2, str(explicit), "damaged")


def test_disk_full_during_a_checkpoint_removes_the_staging_folder_and_keeps_the_last(tiny_shards, tmp_path,
                                                                                      monkeypatch):  # fmt: skip
    from accelerate import Accelerator

    real_save, calls = Accelerator.save_state, []

    def save_state(self, output_dir, **kw):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: half written, then the disk is full
            real_save(self, output_dir, **kw)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real_save(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    run = tmp_path / "gan"
    result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 6))
    _error_line(result, 2, "No space left on device", "optimizer.bin", "step_0000002 is kept")
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]  # no .tmp-step_0000004 left
    assert checkpoint_problem(ckpts / "step_0000002") is None
    assert read_train_state(ckpts / "step_0000002")["step"] == 2


# ---------------------------------------------------------------------------------- frames and models
def _write(path: Path, array: np.ndarray, **kw) -> Path:
    Image.fromarray(array).save(path, **kw)
    return path


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_16_bit_frames_are_scaled_by_their_bit_depth_never_saturated(tmp_path, suffix):
    gray8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    wide = _write(tmp_path / f"w{suffix}", gray8.astype(np.uint16) * 257)  # the same picture in 16 bits
    assert np.array_equal(read_frame(wide), gray8)
    assert np.array_equal(read_rgb(wide), np.repeat(gray8[..., None], 3, axis=2))


def _tiff_12_bit(path: Path, values: np.ndarray) -> Path:
    """A grayscale TIFF with BitsPerSample 12 (two samples packed in three bytes, as 12-bit cameras write them):
    Pillow decodes it into 16-bit samples of 0..4095."""
    import struct

    h, w = values.shape
    v = values.astype(np.uint32).reshape(h, w // 2, 2)
    packed = np.stack([v[..., 0] >> 4, ((v[..., 0] & 15) << 4) | (v[..., 1] >> 8), v[..., 1] & 255], -1)
    strip = packed.astype(np.uint8).tobytes()
    tags = [(256, 3, w), (257, 3, h), (258, 3, 12), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 3, h),
            (279, 4, len(strip))]  # fmt: skip
    entries = [struct.pack("<HHII" if t == 4 else "<HHIHxx", tag, t, 1, value) for tag, t, value in tags]
    ifd = struct.pack("<H", len(tags)) + b"".join(entries) + struct.pack("<I", 0)
    path.write_bytes(b"II*\x00" + struct.pack("<I", 8 + len(strip)) + strip + ifd)
    return path


def test_12_bit_tiff_frames_are_scaled_by_their_bit_depth_tag(tmp_path):
    gray8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    tif = _tiff_12_bit(tmp_path / "twelve.tif", (gray8.astype(np.int64) * 4095 + 127) // 255)
    assert Image.open(tif).mode == "I;16" and Image.open(tif).tag_v2[258] in (12, (12,))  # 16-bit storage
    assert np.array_equal(read_frame(tif), gray8)  # 4095 is white, not 4095/65535 (a near-black frame)


def test_palette_frames_go_through_their_palette_and_float_frames_are_refused(tmp_path):
    pal = Image.fromarray(np.array([[0, 1], [2, 3]], np.uint8), "P")
    pal.putpalette([0, 0, 0, 255, 255, 255, 10, 10, 10, 200, 200, 200] + [0] * 756)
    pal.save(tmp_path / "p.png")
    assert read_frame(tmp_path / "p.png").tolist() == [[0, 255], [10, 200]]
    _write(tmp_path / "f.tif", np.full((4, 4), 0.5, np.float32))
    with pytest.raises(UserError, match=r"f\.tif: floating-point samples are not supported"):
        read_frame(tmp_path / "f.tif")


def test_16_bit_tiff_dataset_gives_the_same_shards_as_its_8_bit_original(tmp_path):
    eight = write_ucsd(tmp_path / "d8", TINY_CLIPS)
    sixteen = write_ucsd(tmp_path / "d16", TINY_CLIPS)
    for tif in sixteen.rglob("*.tif"):
        _write(tif, np.asarray(Image.open(tif)).astype(np.uint16) * 257)
    sets = [
        build_shards(
            ShardConfig(
                data=str(d), out=str(tmp_path / f"s{i}"), height=24, width=36, folds=4, workers=1, shard_size=8
            ),
            show_progress=False,
        )  # fmt: skip
        for i, d in enumerate((eight, sixteen))
    ]
    a, b = (load_window_set(s) for s in sets)
    assert a.frames.max() > 200 and np.array_equal(a.frames, b.frames)


def test_predict_scores_a_16_bit_png_clip_exactly_like_its_8_bit_copy(tiny_data, tmp_path):
    cfg = model_config_for("tiny", {"window": 10, "height": 24, "width": 36})
    torch.manual_seed(0)
    model = save_model(build_lrcn(cfg), tmp_path / "m.safetensors", cfg, kind="classifier")
    clips = {bits: tmp_path / f"clip{bits}" for bits in (8, 16)}
    for bits, folder in clips.items():
        folder.mkdir()
        for tif in sorted((tiny_data / "Test" / "Test001").glob("*.tif")):
            gray = np.asarray(Image.open(tif))
            _write(folder / f"{tif.stem}.png", gray if bits == 8 else gray.astype(np.uint16) * 257)
    outs = {}
    for bits, folder in clips.items():
        out = tmp_path / f"s{bits}.csv"
        result = CliRunner().invoke(cli, ["predict", str(folder), "--model", str(model), "--out", str(out)])
        assert result.exit_code == 0, result.output
        outs[bits] = [row.split(",")[2] for row in out.read_text().splitlines()[1:]]
    assert outs[8] == outs[16] and len(set(outs[8])) > 1  # the same per-frame scores, and not a constant


def _discriminator(shards: Path, path: Path) -> Path:
    cfg = model_config_for("tiny", load_manifest(shards))
    return save_model(build_lrcn(cfg), path, cfg, kind="discriminator")


@pytest.mark.parametrize(
    "meta, needle",
    [("{not json", "is not valid JSON"), ('["a list"]', "not a JSON object"),
     ('{"window": "ten"}', "bad model config")],
)  # fmt: skip
def test_discriminator_metadata_that_is_not_a_config_is_exit_2_naming_the_file(tiny_shards, tmp_path, meta, needle):
    disc = _discriminator(tiny_shards, tmp_path / "d.safetensors")
    save_file(load_file(str(disc)), str(disc), metadata={"ddp_vad_model_config": meta, "kind": "discriminator"})
    result = CliRunner().invoke(cli, ["transfer", "--shards", str(tiny_shards), "--out", str(tmp_path / "t"),
                                      "--from", str(disc)])  # fmt: skip
    _error_line(result, 2, str(disc), needle)
    assert not (tmp_path / "t").exists()


def test_discriminator_tensors_that_do_not_match_their_config_are_exit_2(tiny_shards, tmp_path):
    disc = _discriminator(tiny_shards, tmp_path / "d.safetensors")
    tensors = load_file(str(disc))
    name = next(k for k in tensors if k.startswith("features.") and tensors[k].dim() > 1)
    tensors[name] = torch.zeros(3, 3)
    with safe_open(str(disc), "pt") as f:  # keep the original metadata
        meta = f.metadata()
    save_file(tensors, str(disc), metadata=meta)
    result = CliRunner().invoke(cli, ["transfer", "--shards", str(tiny_shards), "--out", str(tmp_path / "t"),
                                      "--from", str(disc)])  # fmt: skip
    _error_line(result, 2, str(disc), "do not match")


def test_fold_result_that_is_not_an_object_is_exit_2_naming_it(tiny_shards, tmp_path):
    result_file = tmp_path / "t" / "folds" / "fold_00" / "result.json"
    result_file.parent.mkdir(parents=True)
    result_file.write_text("[1, 2, 3]")
    args = ["transfer", "--shards", str(tiny_shards), "--out", str(tmp_path / "t"), "--from", "scratch", "--epochs",
            "1", "--preset", "tiny", "--no-progress", "--protocol", "window"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    _error_line(result, 2, str(result_file), "must hold a JSON object")
    assert result_file.read_text() == "[1, 2, 3]"


def test_damaged_fold_checkpoint_restarts_that_fold_with_a_warning(tiny_shards, tmp_path):
    args = ["transfer", "--shards", str(tiny_shards), "--out", str(tmp_path / "t"), "--from", "scratch",
            "--epochs", "2", "--batch-size", "16", "--preset", "tiny", "--no-progress",
            "--protocol", "window"]  # fmt: skip
    assert CliRunner().invoke(cli, args).exit_code == 0
    run = tmp_path / "t"
    first = json.loads((run / "folds" / "fold_01" / "result.json").read_text())
    for name in ("result.json", "model.safetensors"):  # fold 1 as a kill during its last epoch leaves it
        (run / "folds" / "fold_01" / name).unlink()
    ckpt = run / "checkpoints" / "fold_01" / "epoch_0002.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])  # damaged
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "fold 1: damaged checkpoint" in result.stderr and "restarts from epoch 0" in result.stderr
    assert ckpt.with_name("epoch_0002.pt.damaged").is_file()
    again = json.loads((run / "folds" / "fold_01" / "result.json").read_text())
    assert [h["epoch"] for h in again["history"]] == [1, 2]  # retrained from the start...
    assert again["metrics"] == first["metrics"]  # ...to the same numbers


# ------------------------------------------------------------------------------------ one live writer
def _hold(folder: Path, what: str) -> subprocess.Popen:
    """Another process that holds ``folder``'s lock until killed."""
    code = ("import sys, time; from ddp_vad.runlock import run_lock\n"
            "with run_lock(sys.argv[1], sys.argv[2]):\n    print('held', flush=True); time.sleep(120)")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), what], stdout=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_live_writer_is_refused_naming_the_holder(tiny_shards, tmp_path):
    run = tmp_path / "gan"
    holder = _hold(run, "pretrain")
    try:
        result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 2))
        _error_line(result, 2, str(run), f"pid {holder.pid} on {socket.gethostname()}", "pretrain")
        assert not (run / "checkpoints").exists()  # the second writer wrote nothing
        result = CliRunner().invoke(cli, ["shard", "build", str(tmp_path), "--out", str(run)])
        _error_line(result, 2, f"pid {holder.pid}")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the lock file behind: the next writer takes it over with a warning and runs.
    assert json.loads(lock_path(run).read_text())["pid"] == holder.pid
    result = CliRunner().invoke(cli, _pretrain_args(tiny_shards, run, 2))
    assert result.exit_code == 0, result.output
    assert f"taking over the stale lock of pretrain (pid {holder.pid}" in result.stderr
    assert not lock_path(run).exists()  # released at the end


def test_transfer_baselines_and_evaluate_refuse_a_held_folder_naming_the_holder(tiny_shards, tmp_path):
    run = tmp_path / "held"
    holder = _hold(run, "pretrain")
    shards = ["--shards", str(tiny_shards), "--protocol", "window"]
    try:
        for args in (
            ["transfer", *shards, "--out", str(run), "--from", "scratch", "--preset", "tiny", "--epochs", "1"],
            ["baselines", *shards, "--out", str(run), "--methods", "nb"],
            ["evaluate", str(tmp_path), "--out", str(run)],
        ):
            result = CliRunner().invoke(cli, args)
            _error_line(result, 2, str(run), f"pid {holder.pid} on {socket.gethostname()}", "pretrain")
            assert not run.exists(), args[0]  # wrote nothing (the lock file lies beside the folder)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_stages_inside_a_locked_pipeline_folder_pass_and_outsiders_are_refused(tmp_path):
    out = tmp_path / "pipe"
    with run_lock(out, "pipeline"), run_lock(out / "gan", "pretrain"), run_lock(out / "gan", "pretrain"):
        assert lock_path(out / "gan").is_file()  # a stage of this process inside its own pipeline folder
    assert not lock_path(out).exists() and not lock_path(out / "gan").exists()
    holder = _hold(out, "pipeline")
    try:
        with (
            pytest.raises(UserError, match=rf"{out} is in use by pipeline \(pid {holder.pid}"),
            run_lock(out / "gan", "pretrain"),
        ):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    time.sleep(0.05)
    with run_lock(out / "gan", "pretrain"):  # the dead pipeline's lock no longer blocks anything
        pass


# --------------------------------------------------------------------- several processes agree
def _torchrun(args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 ARGS`` (conftest) without the toolkit's debug mode."""
    return torchrun(args, cwd, timeout=timeout, env={"DDP_VAD_DEBUG": None})


@pytest.mark.slow
def test_a_data_error_on_one_rank_stops_both_ranks_with_its_message(tiny_shards, tmp_path):
    worker = str(REPO / "tests" / "_agree_worker.py")
    result = _torchrun([worker, "data", str(tiny_shards), str(tmp_path / "gan")], tmp_path)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and all("gives this process no full batch of 2 samples" in line for line in lines), lines
    assert f"{REPO / 'ddp_vad'}" not in result.stderr  # no worker traceback (torchrun prints its own summary)
    assert not list((tmp_path / "gan" / "checkpoints").glob("step_*"))  # stopped before the step-4 checkpoint


@pytest.mark.slow
def test_two_process_pretrain_wraps_small_epochs_and_every_rank_resumes_from_the_main_decision(tiny_shards, tmp_path):
    """64 windows over 2 ranks give each rank about 32 per epoch, fewer than a batch of 40: the stream wraps around
    its epochs (full batches, no stop). The resumed run decides on the main process only (rank 1 would fail if it
    tried) and every rank continues from that checkpoint at exactly its own data position."""
    from ddp_vad.data.reader import infinite_batches

    gan, worker = tmp_path / "gan", str(REPO / "tests" / "_agree_worker.py")
    small = [
        "--batch-size",
        "40",
        "--debug-keys",
        "--checkpoint-every",
        "3",
        "--log-every",
        "3",
        "--protocol",
        "window",
    ]
    first = _torchrun(["-m", "ddp_vad", *_pretrain_args(tiny_shards, gan, 3), *small], tmp_path, timeout=120)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _torchrun([worker, "resume", str(tiny_shards), str(gan), "--steps", "5", *small], tmp_path, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "(step 3)" in resumed.stdout
    for rank in range(2):  # the keys each rank trained on, over both runs: those of one uninterrupted stream
        stream = infinite_batches(tiny_shards, 40, seed=0, rank=rank, world_size=2)
        expected = [
            f"{e} {k}" for b in (next(stream) for _ in range(5)) for e, k in zip(b["epoch"], b["key"], strict=True)
        ]
        assert (gan / "debug" / f"keys_rank{rank}.txt").read_text().splitlines() == expected, f"rank {rank}"
        assert len({e for e in expected if e.split()[0] == "0"}) < 40  # an epoch's share is smaller than a batch
    hashes = [(gan / "debug" / f"weights_rank{r}.txt").read_text() for r in range(2)]
    assert hashes[0] == hashes[1]
    assert json.loads((gan / "config.json").read_text())["steps_done"] == 5


@pytest.mark.slow
def test_synth_under_a_launcher_runs_once_on_the_main_process(tmp_path):
    args = ["-m", "ddp_vad", "synth", str(tmp_path / "data"), "--train-clips", "1", "--test-clips", "1",
            "--frames", "12", "--height", "40", "--width", "60"]  # fmt: skip
    result = _torchrun(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("the main process does the work") == 1
    assert len(list((tmp_path / "data" / "SynthPed").rglob("*.tif"))) == 24
    assert not list((tmp_path / "data").glob(".*partial"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_decode_workers_die_with_a_killed_shard_build(tmp_path):
    import psutil

    from ddp_vad.data.synth import SynthConfig, run_synth

    data = run_synth(SynthConfig(out=str(tmp_path / "data"), train_clips=6, test_clips=10, frames=200, seed=0),
                     show_progress=False)  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "ddp_vad", "shard", "build", str(data), "--out", str(tmp_path / "s"), "--workers", "2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, workers = time.time() + 60, []
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            workers = psutil.Process(proc.pid).children(recursive=True)
            time.sleep(0.02)
        assert len(workers) >= 2, "the build never started its decode workers"
    finally:
        proc.kill()  # kill -9 of the build itself, not of its workers
        proc.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"orphaned decode workers: {[p.pid for p in alive]}"


def test_files_and_folders_are_swapped_in_by_ddp_vad_files_only():
    """Atomic writes have one home (ddp_vad/files.py): no module renames a finished temp file or folder into place
    by hand. Moving a damaged checkpoint aside is not a write."""
    import re

    pending = {"infer/predict.py"}  # its own temp files, to be routed through files.py by the issue that owns it
    by_hand = re.compile(r"os\.(replace|rename)\(|\.(rename|replace)\((?!aside)\w+\)")  # str.replace has 2 args
    offenders = []
    for path in sorted((REPO / "ddp_vad").rglob("*.py")):
        name = path.relative_to(REPO / "ddp_vad").as_posix()
        if name == "files.py" or name in pending:
            continue
        offenders += [f"{name}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if by_hand.search(line)]
    assert not offenders, f"hand-made atomic writes (use ddp_vad.files): {offenders}"
