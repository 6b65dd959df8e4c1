"""Distributed correctness on CPU: the full chain `torchrun -m ddp_vad pretrain` (2 processes, gloo) ->
`torchrun -m ddp_vad transfer --from GANRUN` (2 processes) checked against a 1-process transfer, plus the
process-group guard for MPI-style launchers.

test_pretrain.py and test_transfer.py test each stage's 2-process run on even data (and ``--train all`` /
``head+lstm`` fold invariance); this file covers what only the chain on uneven data shows. Its shard set
(conftest's dataset, unbalanced: 71 windows in 11 shards of <= 7, 3 folds) makes (a) the two ranks get different
amounts of data per epoch (they cross epoch boundaries at different steps: no DDP hang), (b) 3 folds over 2
processes leave rank 0 with two folds and rank 1 with one (rank 1 waits at the final gather: clean exit), and
(c) the ``--train head`` feature cache two chunks of 64 windows, one per rank, gathered across processes.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLIPS, torch_threads, torchrun, write_ucsd

from ddp_vad.errors import UserError
from ddp_vad.train.distributed import (
    ALLOW_NO_PG_ENV,
    check_process_group,
    check_shard_count,
    seed_everything,
    state_dict_sha256,
)

REPO = Path(__file__).resolve().parents[1]
NPROC = 2
STEPS, BATCH = 10, 4
TIMEOUT_S = 150  # per launch; a hung rank fails the test instead of blocking the suite


# --------------------------------------------------------------------------------------------- guards
# (test_pretrain.py covers WORLD_SIZE, the override and the shard-count warning; these are the other launchers)
@pytest.mark.parametrize("variable", ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"])
def test_mpi_style_launch_without_process_group_is_refused(monkeypatch, variable):
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", ALLOW_NO_PG_ENV):
        monkeypatch.delenv(name, raising=False)
    check_process_group(1)  # a plain single process
    monkeypatch.setenv(variable, "4")
    with pytest.raises(UserError, match="4 processes were launched"):
        check_process_group(1)
    check_process_group(4)


def test_enough_shards_or_a_non_main_process_stays_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_shard_count(num_shards=16, num_processes=8, workers=2)  # exactly processes x workers
        check_shard_count(num_shards=10, num_processes=8, workers=2, is_main=False)  # only the main process warns
        check_shard_count(num_shards=8, num_processes=8, workers=0)


# ---------------------------------------------------------------------------------------- the chain
def _launch(args: list[str], *, nproc: int = NPROC, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun`` (conftest) with the toolkit's debug mode on."""
    return torchrun(args, cwd, nproc=nproc, timeout=TIMEOUT_S, env={"DDP_VAD_DEBUG": "1"})


def _check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict[str, Path]:
    """Uneven shards, then a 2-process GAN pretraining run on them through `torchrun -m ddp_vad pretrain`."""
    from ddp_vad.data.shards import ShardConfig, build_shards

    root = tmp_path_factory.mktemp("chain")
    data = write_ucsd(root / "data", TINY_CLIPS)
    shards = build_shards(
        ShardConfig(data=str(data), out=str(root / "shards"), height=24, width=36, folds=3, balance="none",
                    workers=1, shard_size=7),
        show_progress=False,
    )  # fmt: skip
    gan = root / "gan"
    result = _launch(
        ["-m", "ddp_vad", "pretrain", "--shards", str(shards), "--out", str(gan), "--preset", "tiny",
         "--steps", str(STEPS), "--batch-size", str(BATCH), "--workers", "1", "--debug-keys", "--checkpoint-every", "0",
         "--similarity-every", "5", "--image-every", "0", "--log-every", "5", "--no-progress", "--protocol", "window"],
        cwd=root,
    )  # fmt: skip
    _check_ok(result)
    return {"root": root, "shards": Path(shards), "gan": gan, "pretrain_stdout": result.stdout}


def _keys_by_epoch(path: Path) -> list[tuple[int, str]]:
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(int(epoch), key) for epoch, key in rows]


@pytest.mark.slow
def test_pretrain_ranks_read_disjoint_shards(chain):
    from ddp_vad.data.reader import epoch_shards, iter_windows

    debug = chain["gan"] / "debug"
    seen = {r: _keys_by_epoch(debug / f"keys_rank{r}.txt") for r in range(NPROC)}
    for r in range(NPROC):
        assert len(seen[r]) == STEPS * BATCH, f"rank {r} took {len(seen[r])} samples, expected {STEPS * BATCH}"
    epochs = sorted({e for r in seen for e, _ in seen[r]})
    assert len(epochs) >= 2, "the run should cross an epoch boundary on some rank"
    for e in epochs:
        urls = epoch_shards(chain["shards"], e, seed=0)
        per_rank = {r: {k for ep, k in seen[r] if ep == e} for r in range(NPROC)}
        assert not per_rank[0] & per_rank[1], f"epoch {e}: both ranks read {sorted(per_rank[0] & per_rank[1])}"
        for r in range(NPROC):
            # split_by_node: rank r reads shards r, r+P, ... of the epoch's shuffled shard list, and nothing else
            allowed = {w["key"] for w in iter_windows(chain["shards"], shards=urls[r::NPROC], frames=False)}
            assert per_rank[r] <= allowed, f"epoch {e}, rank {r} read keys outside its shards"
            assert len(per_rank[r]) == len([1 for ep, _ in seen[r] if ep == e]), "a key repeated within an epoch"
    # Uneven data: the ranks leave epoch 0 at different steps, and still both finish every step (no hang).
    first_epoch = [sum(1 for ep, _ in seen[r] if ep == epochs[0]) for r in range(NPROC)]
    assert first_epoch[0] != first_epoch[1], f"expected uneven epochs per rank, got {first_epoch}"


@pytest.mark.slow
def test_pretrain_replicas_identical_after_ddp_steps(chain):
    from safetensors.torch import load_file

    from ddp_vad.models import build_lrcn
    from ddp_vad.weights import load_model_config

    gan = chain["gan"]
    hashes = [(gan / "debug" / f"weights_rank{r}.txt").read_text() for r in range(NPROC)]
    assert hashes[0] == hashes[1], f"replicas differ after DDP steps:\n{hashes[0]}\n{hashes[1]}"
    exported = load_file(str(gan / "discriminator.safetensors"))
    assert f"discriminator {state_dict_sha256(exported)}" in hashes[0]  # what was exported is what every rank holds
    # ... and it was trained: ranks saw different data, so only gradient averaging keeps them equal.
    seed_everything(0)
    init = build_lrcn(load_model_config(gan / "discriminator.safetensors")).state_dict()
    assert any(not torch.equal(init[k], exported[k]) for k in init), "discriminator unchanged by training"
    config = json.loads((gan / "config.json").read_text())
    assert config["world_size"] == NPROC and config["steps_done"] == STEPS
    steps = [line.split(",")[0] for line in (gan / "similarity.csv").read_text().splitlines()[1:]]
    assert steps == ["0", "5", "10"], f"similarity.csv written by more than the main process? {steps}"
    assert chain["pretrain_stdout"].count("pretrain done") == 1  # only the main process prints


@pytest.fixture(scope="module")
def transfer_runs(chain) -> tuple[Path, Path]:
    """(2-process run, 1-process run) of `transfer --from GAN --train head` on the 2-process GAN run: the frozen
    features are computed in two chunks (one per rank) and gathered; 3 folds give rank 0 two folds, rank 1 one."""
    from ddp_vad.train.transfer import TransferConfig, run_transfer

    root, parallel, single = chain["root"], chain["root"] / "transfer-p2", chain["root"] / "transfer-p1"
    options = {"shards": str(chain["shards"]), "from": str(chain["gan"]), "train": "head", "epochs": "2",
               "batch-size": "8", "seed": "0", "protocol": "window"}  # fmt: skip
    result = _launch(
        ["-m", "ddp_vad", "transfer", "--out", str(parallel), "--no-progress",
         *[a for k, v in options.items() for a in (f"--{k}", v)]],
        cwd=root,
    )  # fmt: skip
    _check_ok(result)
    assert result.stdout.count("transfer: GAN+LRCN window AUROC") == 1  # the main process reports, once
    with torch_threads(1):  # like each torchrun worker (OMP_NUM_THREADS=1): same kernels, same float sums
        run_transfer(TransferConfig(shards=options["shards"], out=str(single), source=options["from"], train="head",
                                    epochs=2, batch_size=8, seed=0, progress=False, protocol="window"))  # fmt: skip
    return parallel, single


def _oof(run: Path) -> dict[str, tuple[float, int]]:
    lines = (run / "oof_scores.csv").read_text().splitlines()
    header = lines[0].split(",")
    key, score, fold = header.index("key"), header.index("score"), header.index("fold")
    return {row[key]: (float(row[score]), int(row[fold])) for row in (line.split(",") for line in lines[1:])}


@pytest.mark.slow
def test_chain_transfer_fold_parallel_matches_one_process(transfer_runs):
    parallel, single = transfer_runs
    mp, ms = (json.loads((run / "metrics.json").read_text()) for run in (parallel, single))
    assert [f["fold"] for f in mp["folds"]] == [0, 1, 2]
    assert mp["folds"] == ms["folds"], "per-fold metrics depend on the number of processes"
    op, os_ = _oof(parallel), _oof(single)
    assert sorted(op) == sorted(os_) and len(op) == 71  # every window scored once, in its own test fold
    keys = sorted(op)
    # Scores are continuous: equal scores mean the gathered feature chunks and every fold's training are identical.
    np.testing.assert_allclose([op[k][0] for k in keys], [os_[k][0] for k in keys], rtol=0, atol=1e-6)
    assert [op[k][1] for k in keys] == [os_[k][1] for k in keys]
    for k in range(3):  # fold k ran on process k mod P (uneven: rank 0 trained folds 0 and 2)
        result = json.loads((parallel / "folds" / f"fold_{k:02d}" / "result.json").read_text())
        assert result["rank"] == k % NPROC
    config = json.loads((parallel / "config.json").read_text())
    assert config["world_size"] == NPROC and config["source"].endswith("discriminator.safetensors")


@pytest.mark.slow
def test_pipeline_under_torchrun_prepares_data_once_and_trains_on_both_processes(tmp_path):
    # Data preparation is main-process work: a second process that also ran synth / shard build would race it on
    # the same files; the training stages must form one 2-process group (not two single-process runs).
    out = tmp_path / "run"
    args = ["-m", "ddp_vad", "pipeline", "--out", str(out), "--preset", "tiny", "--methods", "nb", "--curve", "1",
            "--protocol", "window"]  # fmt: skip
    result = _launch(args, cwd=tmp_path)
    _check_ok(result)
    log = result.stdout
    assert log.count("] synth -> ") == 1 and log.count("] shard build -> ") == 1, log[-3000:]
    assert log.count("] pretrain (tiny") == 1, log[-3000:]
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert len(manifest["shards"]) >= NPROC
    assert json.loads((out / "gan" / "config.json").read_text())["world_size"] == NPROC
    for run in ("lrcn-gan", "lrcn-scratch"):
        assert json.loads((out / run / "metrics.json").read_text())["world_size"] == NPROC
    assert "| GAN+LRCN |" in (out / "report" / "report.md").read_text()
