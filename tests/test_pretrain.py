"""GAN pretraining: outputs, exact resume, kill -9, two real processes, bf16, NaN stop, option errors."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ddp_vad.train.pretrain as pretrain
from ddp_vad.cli import cli
from ddp_vad.data.reader import load_window_set
from ddp_vad.errors import NonFiniteLossError, UserError
from ddp_vad.files import write_json_atomic
from ddp_vad.train.checkpoint import list_checkpoints, read_train_state
from ddp_vad.train.distributed import check_process_group, check_shard_count, state_dict_sha256
from ddp_vad.train.gan_monitor import sample_real_windows, window_similarity
from ddp_vad.train.pretrain import PretrainConfig, run_pretrain
from ddp_vad.weights import load_discriminator, load_generator

REPO = Path(__file__).resolve().parents[1]
SCALARS = {
    "loss/d",
    "loss/g",
    "d/real",
    "d/fake",
    "lr/g",
    "lr/d",
    "throughput/samples_per_s",
    "similarity/cosine",
    "similarity/l2",
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # see conftest.torch_threads


def config(shards: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(
        preset="tiny",
        steps=8,
        batch_size=4,
        checkpoint_every=3,
        keep_checkpoints=2,
        similarity_every=4,
        image_every=4,
        log_every=2,
        workers=0,
        progress=False,
        protocol="window",  # the 64 kept windows of both splits: the epoch arithmetic below counts them
    )
    return PretrainConfig(shards=str(shards), out=str(out), **{**base, **kw})


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def csv_rows(run: Path) -> list[list[str]]:
    with (run / "similarity.csv").open() as f:
        return list(csv.reader(f))


def subprocess_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    return env


# --------------------------------------------------------------------------------------- one run
def test_run_writes_scalars_images_csv_weights_and_checkpoints(tiny_shards, tmp_path):
    run = run_pretrain(config(tiny_shards, tmp_path / "run"))

    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [6, 8]  # every 3 + final, keep 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    acc = events(run)
    tags = acc.Tags()
    assert set(tags["scalars"]) >= SCALARS
    assert [e.step for e in acc.Scalars("loss/d")] == list(range(1, 9))
    assert all(0.0 <= e.value <= 1.0 for e in acc.Scalars("d/real") + acc.Scalars("d/fake"))
    assert all(e.value > 0 for e in acc.Scalars("throughput/samples_per_s"))
    assert acc.Scalars("lr/g")[0].value == pytest.approx(2e-4)
    assert "samples/real_top_generated_bottom" in tags["images"]
    assert [e.step for e in acc.Images("samples/real_top_generated_bottom")] == [4, 8]

    rows = csv_rows(run)
    assert rows[0] == ["step", "cosine", "l2"]
    assert [int(r[0]) for r in rows[1:]] == [0, 4, 8]
    assert all(-1.0 <= float(r[1]) <= 1.0 and float(r[2]) > 0 for r in rows[1:])
    assert [e.value for e in acc.Scalars("similarity/l2")] == pytest.approx([float(r[2]) for r in rows[1:]])

    gen, gcfg = load_generator(run)
    disc, dcfg = load_discriminator(run)
    assert gcfg == dcfg and (gcfg.preset, gcfg.height, gcfg.width, gcfg.window) == ("tiny", 24, 36, 10)
    with torch.no_grad():
        assert gen(torch.randn(2, gcfg.z_dim)).shape == (2, 10, 1, 24, 36)
    # The exported weights are the final checkpoint's (accelerate's pytorch_model.bin = G, pytorch_model_1.bin = D).
    for name, file in (("generator", "pytorch_model.bin"), ("discriminator", "pytorch_model_1.bin")):
        saved = torch.load(run / "checkpoints/step_0000008" / file, weights_only=True)
        exported = weights(run / f"{name}.safetensors")
        assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)
    assert state_dict_sha256(disc) == state_dict_sha256(weights(run / "discriminator.safetensors"))

    conf = json.loads((run / "config.json").read_text())
    assert conf["config"]["preset"] == "tiny" and conf["model"]["height"] == 24
    assert conf["world_size"] == 1 and conf["steps_done"] == 8 and conf["manifest"]["window"] == 10
    state = read_train_state(run / "checkpoints/step_0000008")
    assert state["step"] == 8 and state["world_size"] == 1 and len(state["data"]) == 1


def test_similarity_measures():
    a = torch.rand(5, 10, 1, 6, 8)
    cos, l2 = window_similarity(a, a.clone())
    assert cos == pytest.approx(1.0) and l2 == pytest.approx(0.0)
    b = torch.zeros_like(a)
    b[:, 0, 0, 0, 0] = 1.0
    c = torch.zeros_like(a)
    c[:, 0, 0, 0, 1] = 2.0
    cos, l2 = window_similarity(b, c)  # orthogonal, distance sqrt(1 + 4)
    assert cos == pytest.approx(0.0) and l2 == pytest.approx(5**0.5)


def test_real_window_pool_is_seeded_and_taken_from_the_shards(tiny_shards):
    ws = load_window_set(tiny_shards)
    pool = sample_real_windows(tiny_shards, ws.manifest, 10, seed=3)
    again = sample_real_windows(tiny_shards, ws.manifest, 10, seed=3)
    other = sample_real_windows(tiny_shards, ws.manifest, 10, seed=4)
    assert pool.shape == (10, 10, 24, 36) and np.array_equal(pool, again) and not np.array_equal(pool, other)
    flat = ws.frames.reshape(len(ws), -1)
    for window in pool:
        assert (flat == window.reshape(-1)).all(axis=1).any()


# ------------------------------------------------------------------------------------------ resume
def count_gan_steps(monkeypatch) -> list[int]:
    """Spy on the GAN step: a resumed run must do only the remaining steps (a restart from 0 gives the same
    weights, deterministically, so equal weights alone would not show that it resumed)."""
    calls: list[int] = []
    real = pretrain.gan_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain, "gan_step", counted)
    return calls


def test_resume_gives_bit_identical_weights_csv_and_events(tiny_shards, tmp_path, monkeypatch, capsys):
    # workers=1: a loader worker per epoch (whose DataLoader draws a seed from the CPU RNG) must not matter.
    opts = dict(similarity_every=2, keep_checkpoints=0, workers=1)
    straight = run_pretrain(config(tiny_shards, tmp_path / "a", steps=20, **opts))

    # 8 steps (checkpoints 3, 6, 8), then lose the step-8 checkpoint as if killed after logging steps 7-8:
    # resume must restart from 6, crossing an epoch boundary (16 batches per epoch) before step 20.
    resumed = tmp_path / "b"
    run_pretrain(config(tiny_shards, resumed, steps=8, **opts))
    assert [int(r[0]) for r in csv_rows(resumed)[1:]] == [0, 2, 4, 6, 8]
    shutil.rmtree(resumed / "checkpoints/step_0000008")
    (resumed / "checkpoints/.tmp-step_0000009").mkdir()  # a save torn by kill -9
    (resumed / "checkpoints/.tmp-step_0000009/model.safetensors").write_bytes(b"torn")
    capsys.readouterr()
    # A real resume is a later process. Within one process and one second, TensorBoard orders event files by a
    # per-process counter compared as text ('...9' after '...10') and would read the resumed file first.
    time.sleep(1.05)
    steps = count_gan_steps(monkeypatch)
    run_pretrain(config(tiny_shards, resumed, steps=20, **opts))
    assert len(steps) == 14  # steps 7..20 only
    assert "(step 6)" in capsys.readouterr().out

    assert same_weights(straight / "generator.safetensors", resumed / "generator.safetensors")
    assert same_weights(straight / "discriminator.safetensors", resumed / "discriminator.safetensors")
    assert not (resumed / "checkpoints/.tmp-step_0000009").exists()
    assert csv_rows(resumed) == csv_rows(straight)  # the orphaned step-8 row is not duplicated
    a, b = events(straight).Scalars("loss/d"), events(resumed).Scalars("loss/d")
    assert [e.step for e in b] == list(range(1, 21))  # purge_step dropped the orphaned step 7-8 events
    assert [e.value for e in b] == [e.value for e in a]
    assert read_train_state(resumed / "checkpoints/step_0000020")["data"][0][0] == 1  # second epoch


def test_resume_option_errors(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="no checkpoint"):
        run_pretrain(config(tiny_shards, tmp_path / "r", resume="latest"))
    with pytest.raises(UserError, match="not found"):
        run_pretrain(config(tiny_shards, tmp_path / "r", resume=str(tmp_path / "nope")))
    run = run_pretrain(config(tiny_shards, tmp_path / "r", steps=3))
    with pytest.raises(UserError, match="already holds checkpoints"):
        run_pretrain(config(tiny_shards, run, resume="none"))
    state = read_train_state(run / "checkpoints/step_0000003")
    write_json_atomic(
        run / "checkpoints/step_0000003/train_state.json", {**state, "model": {**state["model"], "lstm_hidden": 99}}
    )
    with pytest.raises(UserError, match="another model"):
        run_pretrain(config(tiny_shards, run, steps=5))
    result = CliRunner().invoke(
        cli,
        [
            "pretrain",
            "--shards",
            str(tiny_shards),
            "--out",
            str(tmp_path / "c"),
            "--preset",
            "tiny",
            "--resume",
            "latest",
        ],
    )
    assert result.exit_code == 2 and "error: --resume latest: no checkpoint" in result.output


def test_cli_help_lists_the_contract_options():
    out = CliRunner().invoke(cli, ["pretrain", "--help"]).output
    for opt in (
        "--shards",
        "--out",
        "--preset",
        "--steps",
        "--batch-size",
        "--checkpoint-every",
        "--similarity-every",
        "--resume",
        "--seed",
        "--mixed-precision",
        "--keep-checkpoints",
    ):
        assert opt in out


@pytest.mark.slow
def test_kill_9_then_resume_auto_matches_an_uninterrupted_run(tiny_shards, tmp_path, monkeypatch):
    run = tmp_path / "killed"
    args = ["pretrain", "--shards", str(tiny_shards), "--out", str(run), "--preset", "tiny", "--steps", "400",
            "--batch-size", "4", "--checkpoint-every", "4", "--keep-checkpoints", "0", "--similarity-every", "4",
            "--workers", "0", "--no-progress", "--protocol", "window"]  # fmt: skip
    # kill -9 at a fixed point: in the middle of writing the step-12 checkpoint (its staging folder half written).
    code = (
        "import os, signal, sys\n"
        "import ddp_vad.train.checkpoint as c\n"
        "real = c.write_json_atomic\n"
        "def write(path, payload):\n"
        "    if payload.get('step') == 12: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, payload)\n"
        "c.write_json_atomic = write\n"
        "from ddp_vad.cli import main\n"
        "sys.argv = ['ddp_vad', *sys.argv[1:]]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], env=subprocess_env(), capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4, 8]
    assert (run / "checkpoints" / ".tmp-step_0000012").is_dir()  # the torn save

    target = 14  # resume and go a little further (not a multiple of 4: the end saves too)
    steps = count_gan_steps(monkeypatch)
    run_pretrain(config(tiny_shards, run, steps=target, checkpoint_every=4, keep_checkpoints=0, similarity_every=4))
    assert len(steps) == target - 8  # resumed from step 8: steps 9..14 only
    monkeypatch.undo()
    straight = run_pretrain(
        config(tiny_shards, tmp_path / "straight", steps=target, checkpoint_every=4, similarity_every=4)
    )
    assert same_weights(run / "generator.safetensors", straight / "generator.safetensors")
    assert same_weights(run / "discriminator.safetensors", straight / "discriminator.safetensors")
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    steps = [int(r[0]) for r in csv_rows(run)[1:]]
    assert steps == sorted(set(steps)) and steps[-1] == target - target % 4


# ------------------------------------------------------------------------------- two processes
@pytest.mark.slow
def test_two_process_gloo_run_splits_data_and_keeps_replicas_identical(tiny_shards, tmp_path):
    run = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddp_vad", "pretrain", "--shards", str(tiny_shards), "--out", str(run),
           "--preset", "tiny", "--steps", "10", "--batch-size", "4", "--checkpoint-every", "5",
           "--similarity-every", "5", "--image-every", "5", "--workers", "1", "--debug-keys",
           "--no-progress", "--protocol", "window"]  # fmt: skip
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]

    # Each rank streams its own half of the shards: within an epoch the ranks' samples are disjoint and together
    # cover the data set (64 kept windows over 2 x 10 batches of 4: every rank finishes its epoch 0).
    seen = {}
    for r in (0, 1):
        lines = (run / f"debug/keys_rank{r}.txt").read_text().split("\n")
        seen[r] = [line.split()[1] for line in lines if line.startswith("0 ")]
        assert len(seen[r]) == len(set(seen[r])) > 0
    assert 64 - 2 * 3 <= len(seen[0]) + len(seen[1]) <= 64  # each rank drops at most a partial batch of 3
    assert not set(seen[0]) & set(seen[1])
    assert set(seen[0]) | set(seen[1]) <= set(load_window_set(tiny_shards).keys)

    hashes = [(run / f"debug/weights_rank{r}.txt").read_text() for r in (0, 1)]
    assert hashes[0] == hashes[1]
    exported = (
        f"generator {state_dict_sha256(weights(run / 'generator.safetensors'))}\n"
        f"discriminator {state_dict_sha256(weights(run / 'discriminator.safetensors'))}\n"
    )
    assert hashes[0] == exported
    state = read_train_state(run / "checkpoints/step_0000010")
    assert state["world_size"] == 2 and len(state["data"]) == 2
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert "loss/d" in events(run).Tags()["scalars"]


@pytest.mark.slow
def test_two_processes_on_a_small_train_set_train_to_the_last_step(small_train_shards, tmp_path):
    # Issue 21: 62 train windows in shards of 20, `torchrun --nproc_per_node 2 ... pretrain --preset tiny --steps 40`
    # stopped mid-run with "gives this process no windows" (a rank dealt only shards without train windows).
    run = tmp_path / "gan"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ddp_vad", "pretrain", "--shards", str(small_train_shards), "--out", str(run),
           "--preset", "tiny", "--steps", "40", "--debug-keys", "--no-progress",
           "--checkpoint-every", "0", "--similarity-every", "0", "--image-every", "0"]  # fmt: skip
    res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "pretrain done: 40 steps" in res.stdout
    train = set(load_window_set(small_train_shards, select="train").keys)
    per_rank = []
    for r in (0, 1):
        rows = [line.split() for line in (run / f"debug/keys_rank{r}.txt").read_text().splitlines() if line]
        assert len(rows) == 40 * 32 and {k for _, k in rows} <= train  # every step a full batch of train windows
        per_rank.append({int(e) for e, _ in rows})
    assert len(per_rank[0]) > 20 and len(per_rank[1]) > 20  # many epochs each (31 windows a rank and epoch)


# ---------------------------------------------------------------------------- precision and NaN
def test_bf16_autocast_on_cpu_runs_with_the_lstm_in_fp32(tiny_shards, tmp_path, monkeypatch):
    seen: dict[str, set] = {"conv": set(), "lstm": set()}
    real_build = pretrain.build_lrcn

    def build_with_hooks(cfg):
        lrcn = real_build(cfg)
        lrcn.features.convs[0].register_forward_hook(lambda _m, _i, out: seen["conv"].add(out.dtype))
        lrcn.features.lstm.register_forward_hook(lambda _m, _i, out: seen["lstm"].add(out[0].dtype))
        return lrcn

    monkeypatch.setattr(pretrain, "build_lrcn", build_with_hooks)
    run = run_pretrain(config(tiny_shards, tmp_path / "bf16", steps=4, mixed_precision="bf16"))
    assert seen == {"conv": {torch.bfloat16}, "lstm": {torch.float32}}
    assert all(np.isfinite(e.value) for e in events(run).Scalars("loss/d"))
    assert json.loads((run / "config.json").read_text())["mixed_precision"] == "bf16"
    assert weights(run / "generator.safetensors")["project.weight"].dtype == torch.float32


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tiny_shards, tmp_path, monkeypatch):
    real_step, calls = pretrain.gan_step, []

    def poisoned(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls.append(1)
        return out * float("nan") if len(calls) == 5 else out

    monkeypatch.setattr(pretrain, "gan_step", poisoned)
    run = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="step 5 .*last good checkpoint: .*step_0000004"):
        run_pretrain(config(tiny_shards, run, steps=20, checkpoint_every=2, keep_checkpoints=5, log_every=3))
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [2, 4]
    assert not (run / "generator.safetensors").exists()


def test_huge_learning_rate_diverges_with_a_clear_error(tiny_shards, tmp_path):
    with pytest.raises(NonFiniteLossError, match="non-finite loss at step"):
        run_pretrain(config(tiny_shards, tmp_path / "lr", steps=30, lr=1e30, log_every=1))


# --------------------------------------------------------------------------------- launch checks
def test_several_processes_without_a_process_group_are_refused(monkeypatch, capsys):
    monkeypatch.delenv("DDP_VAD_ALLOW_NO_PROCESS_GROUP", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="no process group"):
        check_process_group(1)
    check_process_group(2)  # a real group: fine
    monkeypatch.setenv("DDP_VAD_ALLOW_NO_PROCESS_GROUP", "1")
    check_process_group(1)
    assert re.fullmatch(
        r"warning: 2 processes were launched .*no process group.* to run anyway\.\n", capsys.readouterr().err
    )


def test_fewer_shards_than_processes_times_workers(capsys):
    check_shard_count(2, 2, 2)
    assert re.match(r"warning: 2 shard.*splitting by sample", capsys.readouterr().err)
    # Fewer shards than processes: no longer an error, every rank reads every shard and keeps its share.
    check_shard_count(1, 2, 0)
    assert re.match(r"warning: 1 shard.*every 2-th window", capsys.readouterr().err)
    with pytest.raises(UserError, match="no shards"):
        check_shard_count(0, 2, 0)
