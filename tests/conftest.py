"""Shared fixtures: the real Ped1 sample, tiny hand-made UCSD datasets and tiny shard sets."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path(os.environ.get("DDP_VAD_SAMPLE", REPO.parent / "shared" / "data" / "ucsd-ped1-sample"))
AVENUE_LABELS = Path(os.environ.get("DDP_VAD_AVENUE_LABELS", REPO.parent / "shared" / "data" / "avenue-labels-sample"))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, as each torchrun worker does with OMP_NUM_THREADS=n: numbers then compare
    bitwise with a multi-process run, and tiny models run far faster than with threads contending for shared cores.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """:func:`torch_threads` (1) around one test; modules opt in with ``pytest.mark.usefixtures``."""
    with torch_threads(1):
        yield


def write_ucsd(
    root: Path,
    clips: dict[str, tuple[int, list[tuple[int, int]] | None]],
    size=(30, 40),
    name: str = "UCSDped1",
    seed: int = 0,
) -> Path:
    """Write a tiny UCSD-layout dataset: {clip: (n_frames, gt ranges or None for train clips)}.

    Frames carry a bright square on anomalous frames so that labels are visible in the pixels.
    """
    rng = np.random.default_rng(seed)
    ds = root / name
    gt_lines = ["TestVideoFile = {};"]
    tests = sorted((c for c in clips if c.startswith("Test")), key=lambda c: int(c[4:]))
    for clip, (n, ranges) in clips.items():
        split = "Train" if clip.startswith("Train") else "Test"
        d = ds / split / clip
        d.mkdir(parents=True)
        anomalous = np.zeros(n, bool)
        for a, b in ranges or []:
            anomalous[a - 1 : b] = True
        for i in range(n):
            frame = rng.integers(0, 120, size, dtype=np.uint8)
            if anomalous[i]:
                frame[2:10, 2:10] = 255
            Image.fromarray(frame).save(d / f"{i + 1:03d}.tif")
    if tests:
        last = int(tests[-1][4:])
        by_number = {int(c[4:]): clips[c][1] for c in tests}
        for k in range(1, last + 1):
            ranges = by_number.get(k) or [(1, 2)]  # entries for absent clips exist in the real file too
            gt_lines.append("TestVideoFile{end+1}.gt_frame = [" + ", ".join(f"{a}:{b}" for a, b in ranges) + "];")
        (ds / "Test" / f"{name}.m").write_text("\n".join(gt_lines) + "\n")
    return ds


TINY_CLIPS = {
    "Train001": (24, None),
    "Train002": (20, None),
    "Test001": (24, [(8, 20)]),
    "Test002": (22, [(1, 6), (15, 22)]),
    "Test004": (26, [(10, 26)]),
}


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """A 5-clip UCSD-style dataset with known labels (Test003 is absent on purpose)."""
    return write_ucsd(tmp_path / "data", TINY_CLIPS)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Shards of the tiny dataset at 24x36, 4 folds, small shards (read-only for tests)."""
    from ddp_vad.data.shards import ShardConfig, build_shards

    root = tmp_path_factory.mktemp("tiny")
    data = write_ucsd(root / "data", TINY_CLIPS)
    return build_shards(
        ShardConfig(data=str(data), out=str(root / "shards"), height=24, width=36, folds=4, workers=1, shard_size=8),
        show_progress=False,
    )


@pytest.fixture(scope="session")
def tiny_run(tiny_shards, tmp_path_factory) -> Path:
    """A finished 4-fold transfer run from scratch on :func:`tiny_shards` (tiny preset, 1 epoch; read-only for
    tests: copy it before damaging it)."""
    from ddp_vad.train.transfer import TransferConfig, run_transfer

    out = tmp_path_factory.mktemp("tiny_run") / "run"
    cfg = TransferConfig(
        shards=str(tiny_shards), out=str(out), source="scratch", preset="tiny", epochs=1, batch_size=8,
        protocol="window", progress=False,
    )  # fmt: skip
    with torch_threads(1):
        return run_transfer(cfg)


def fake_transfer_run(root: Path, cfg, folds: int, seed: int = 0) -> Path:
    """A transfer-run folder as ``transfer`` leaves it for loading, with random weights: ``config.json`` (stage,
    ``n_folds``, ``repeats``, a fingerprint) and per fold ``model.safetensors`` + ``result.json`` holding the model's
    size and sha256 (fold k's weights seeded ``seed + k``). Out-of-fold scores are the test's to write."""
    from ddp_vad.files import write_json_atomic
    from ddp_vad.models import build_lrcn
    from ddp_vad.runfiles import config_file
    from ddp_vad.train.fold_store import save_finished_fold

    fingerprint = {"made_by": "tests/conftest.fake_transfer_run"}
    write_json_atomic(config_file(root), {"stage": "transfer", "n_folds": folds, "repeats": 1,
                                          "fingerprint": fingerprint})  # fmt: skip
    for k in range(folds):
        torch.manual_seed(seed + k)
        save_finished_fold(root, k, build_lrcn(cfg), cfg, {"fold": k, "fingerprint": fingerprint})
    return root


@pytest.fixture(scope="session")
def small_train_shards(tmp_path_factory) -> Path:
    """Issue 21's small-train shape: ``synth --train-clips 2 --test-clips 4 --frames 40`` at 24x36 (62 train
    windows), ``shard build --folds 2 --shard-size 20``: the train clips' windows sit in few of the 5 shards."""
    from ddp_vad.data.shards import ShardConfig, build_shards
    from ddp_vad.data.synth import SynthConfig, run_synth

    root = tmp_path_factory.mktemp("small_train")
    data = run_synth(SynthConfig(out=str(root / "data"), train_clips=2, test_clips=4, frames=40, height=24, width=36),
                     show_progress=False)  # fmt: skip
    return build_shards(
        ShardConfig(data=str(data), out=str(root / "shards"), height=24, width=36, folds=2, workers=1, shard_size=20),
        show_progress=False,
    )


def _absent(message: str) -> None:
    """Real data that is not here: skip the test, or fail it where the data is required (CI)."""
    if os.environ.get("DDP_VAD_REQUIRE_SAMPLE", "") not in ("", "0"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real Ped1 excerpt: skipped where it is absent (a clone outside the team's workspace), required in CI."""
    if not (SAMPLE / "UCSDped1").is_dir():
        _absent(f"real UCSD Ped1 sample not found at {SAMPLE} (set DDP_VAD_SAMPLE to its folder)")
    return SAMPLE


@pytest.fixture(scope="session")
def avenue_labels_dir() -> Path:
    """Two real CUHK Avenue label files (``testing_label_mask/8_label.mat``: 36 frames, all anomalous;
    ``21_label.mat``: 76 frames, 14..66 anomalous): skipped where absent, required in CI like the Ped1 sample."""
    masks = AVENUE_LABELS / "testing_label_mask"
    if not all((masks / f"{n}_label.mat").is_file() for n in (8, 21)):
        _absent(f"real Avenue label files not found in {masks} (set DDP_VAD_AVENUE_LABELS to their folder)")
    return AVENUE_LABELS


def copy_clips(sample: Path, dest: Path, clips: list[str]) -> Path:
    """Copy a few clips (and the gt file) of the read-only sample so a test may damage them."""
    src = sample / "UCSDped1"
    out = dest / "UCSDped1"
    for clip in clips:
        split = "Train" if clip.startswith("Train") else "Test"
        shutil.copytree(src / split / clip, out / split / clip)
    (out / "Test").mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "Test" / "UCSDped1.m", out / "Test" / "UCSDped1.m")
    return out


def square_frames(n: int, size=(36, 48), seed: int = 0) -> np.ndarray:
    """uint8 [n, H, W] frames with a bright square moving across a textured background (smooth enough that
    lossy codecs keep them close to the original)."""
    rng = np.random.default_rng(seed)
    h, w = size
    base = (np.add.outer(np.arange(h), np.arange(w)) * 2 % 80 + 40).astype(np.uint8)
    base = base + rng.integers(0, 10, size, dtype=np.uint8)
    out = np.repeat(base[None], n, axis=0)
    for i in range(n):
        x = (i * 3) % (w - 8)
        out[i, h // 3 : h // 3 + 8, x : x + 8] = 230
    return out


def torchrun(args: list[str], cwd: Path, *, nproc: int = 2, timeout: float = 240, env: dict | None = None):
    """``torchrun --standalone --nproc_per_node NPROC ARGS`` on the CPU (one thread per process, this checkout on
    PYTHONPATH); the whole process group (launcher and workers) is killed when it outlives ``timeout``, so a hang
    fails the test instead of blocking the suite."""
    full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    for name, value in (env or {}).items():
        if value is None:  # None removes a variable
            full_env.pop(name, None)
        else:
            full_env[name] = value
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    full_env.pop("DDP_VAD_ALLOW_NO_PROCESS_GROUP", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil

        # torchrun starts its workers in sessions of their own: kill them by pid (they hold the output pipes open),
        # then the group this test started.
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(args[:4])} did not finish within {timeout}s (hang?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def error_line(result, code: int, *needles: str) -> str:
    """The one ``error:`` line of a CLI result with exit status ``code``; every needle must be in it."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
