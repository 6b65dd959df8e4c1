"""``transfer --normal-footage train``: the shards' train clips (normal-only footage) join every fold's training
windows as normal, at the labelled fraction, and are never tested on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import torch_threads

from ddp_vad.data.reader import load_window_set
from ddp_vad.train.metrics import read_oof_scores
from ddp_vad.train.transfer import TransferConfig, run_transfer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_normal_footage_trains_every_fold_on_the_train_clips_and_tests_none(small_train_shards, tmp_path, fraction):
    from ddp_vad.train.crossval import CVWindows, fold_split

    def run(out: str, footage: str) -> Path:
        cfg = TransferConfig(shards=str(small_train_shards), out=str(tmp_path / out), source="scratch", preset="tiny",
                             epochs=1, batch_size=8, progress=False, labelled_fraction=fraction,
                             normal_footage=footage)  # fmt: skip
        with torch_threads(1):
            return run_transfer(cfg)

    plain, with_footage = run("plain", "none"), run("footage", "train")
    train_keys = set(load_window_set(small_train_shards, select="train").keys)
    n_footage = len(train_keys)
    cv = CVWindows.from_window_set(load_window_set(small_train_shards, select="leakfree"), "leakfree")
    for k in range(2):
        n_labelled = len(fold_split(cv, k, None, fraction, 0)[0])
        metrics = [json.loads((r / "folds" / f"fold_{k:02d}" / "result.json").read_text())["metrics"]
                   for r in (plain, with_footage)]  # fmt: skip
        assert metrics[0]["n_train"] == n_labelled
        assert metrics[1]["n_train"] == n_labelled + int(np.ceil(fraction * n_footage))
    oof = read_oof_scores(with_footage)
    assert not {r["key"] for r in oof} & train_keys  # never tested on
    assert sorted(r["key"] for r in oof) == sorted(r["key"] for r in read_oof_scores(plain))


def test_normal_footage_needs_the_leakfree_protocol(tiny_shards, tmp_path):
    from ddp_vad.errors import UserError

    with pytest.raises(UserError, match="--normal-footage train needs --protocol leakfree"):
        TransferConfig(shards=str(tiny_shards), out=str(tmp_path / "r"), source="scratch", protocol="window",
                       normal_footage="train")  # fmt: skip
