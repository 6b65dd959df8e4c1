"""Per-fold score calibration against normal footage (``transfer --calibrate normal``).

Each fold's classifier is trained on its own clips, so its scores have their own offset and spread: with few labels
the fold models barely move from their initialisation, and a window scored 0.6 by one fold can be less unusual than
a window scored 0.3 by another. Pooled over folds (frame AUROC over every labelled clip, or a detector averaging its
fold models), that scale difference costs more than any lever: on the Ped1 sample at 10% of the labels LRCN ranks
frames at 0.84 AUROC within its folds and 0.65 pooled.

The fix needs no label and no test clip: every fold scores the same normal footage (windows of the shards' train
clips, which the leak-free protocol never labels or tests on) and its window log-odds ``d = l1 - l0`` are mapped to
``((d - m) / s - Z99) / T``, where ``m`` and ``s`` are the mean and standard deviation of ``d`` on that footage.
The map is folded into the head's last Linear layer, so the saved model, its out-of-fold scores, its thresholds,
``predict`` and an ONNX export all give the calibrated score, and P(anomalous) = 0.5 sits Z99 = 2.33 spreads above
normal footage's mean (its 99th percentile, were it Gaussian). Within a fold the ranking is unchanged (the map is
increasing). T = 4, the same for every fold, keeps the scores off the float limits: a barely trained fold can have a
normal spread of 1e-3, and a window 60 spreads above normal would otherwise get P = 1.0 exactly, tied with every
other such window. The mean and spread, not the empirical 99th percentile, because they move less with the draw of
normal windows (Ped2 at 10% labels, pooled frame AUROC over four draws: 0.742-0.750 against 0.736-0.764;
benchmarks/results/levers3.md).

With the motion prior (``transfer --motion-prior energy``, :mod:`ddp_vad.motion`) the same footage standardises the
windows' motion energy ``e`` as well, and the calibrated log-odds are ``(z / s - Z99) / T`` with
``z = 2 (1 - a) z_d + 2 a z_e``, ``z_d`` and ``z_e`` the two z-scores, ``a`` the prior's share (``--prior-share``:
0.5, their plain sum, or chosen per fold on an inner split of its training clips, :mod:`ddp_vad.train.prior_share`)
and ``s`` the spread of ``z`` on that footage: the head's last Linear takes the ``z_d`` part and the model's
:class:`ddp_vad.motion.MotionPrior` the ``z_e`` part.

Shards without train clips (a user's folder with no normal-only split) fall back to the fold's own normal training
windows, with a note.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from ddp_vad.data.reader import load_window_set
from ddp_vad.data.shards import load_manifest
from ddp_vad.models import LRCN

CALIBRATIONS = ("normal", "none")
REFERENCE_WINDOWS = 2048  # normal windows each fold scores, at most (~0.45 GB of uint8 at the demo's 120 x 182)
Z99 = 2.326  # P = 0.5 this many normal spreads above the normal mean (the Gaussian 99th percentile)
TEMPERATURE = 4.0  # calibrated log-odds per normal spread: 1/4 (the same for every fold, so the ranking is kept)
EQUAL_SHARE = 0.5  # --prior-share: the classifier's and the prior's z-scores weigh alike
MIN_SCALE = 1e-6  # a fold model that gives every normal window the same score keeps its spread of 1e-6
MIN_ENERGY_SPREAD = 0.05  # log motion energy: footage whose windows all move alike (the tests' tiny clips) does not
# blow the prior up; real footage spreads 0.14 (Ped2) to 0.47 (the synthetic data)


def reference_windows(shards: Any, seed: int, n: int = REFERENCE_WINDOWS) -> np.ndarray | None:
    """Up to ``n`` windows (uint8 [n, T, H, W]) of the shards' train clips, drawn with ``seed``; None without any."""
    if not int(load_manifest(shards)["counts"].get("train_windows", 0)):
        return None
    return load_window_set(shards, n=n, seed=[abs(int(seed)), 0xCA1B], on_damage="skip", select="train").frames


def fold_calibration_into_head(model: LRCN, gain: float, bias: float) -> LRCN:
    """A copy of ``model`` whose log-odds are ``gain * d + bias``: the head's last Linear gets rows
    ``+-gain (w1 - w0) / 2`` and biases ``+-(gain (b1 - b0) + bias) / 2``. The map is affine and, for ``gain`` > 0,
    increasing, so it also holds per cell under ``cells`` pooling (the mean of the top-k cells commutes with it);
    ``gain`` 0 leaves the constant ``bias`` (the prior alone scores, ``--prior-share 1``)."""
    out = copy.deepcopy(model)
    last = out.head.net[-1]
    with torch.no_grad():
        w, b = last.weight.double(), last.bias.double()
        w1 = gain * (w[1] - w[0]) / 2
        b1 = (gain * (b[1] - b[0]) + bias) / 2
        last.weight.copy_(torch.stack([-w1, w1]).to(last.weight.dtype))
        last.bias.copy_(torch.stack([-b1, b1]).to(last.bias.dtype))
    return out


def calibration_record(
    d: np.ndarray, source: str, energies: np.ndarray | None = None, share: float = EQUAL_SHARE
) -> dict:
    """The calibration of a model that gives normal windows the log-odds ``d`` (see the module docstring), as the
    record a fold's ``result.json`` keeps (``source``: where the windows came from): the normal mean and spread, the
    ``gain`` and ``bias`` of the log-odds map, and with ``energies`` (the same windows' log motion energies: a model
    with a motion prior) the prior's standardisation, weight and ``share`` of the sum (:func:`shared_z`)."""
    spread = max(float(d.std()), MIN_SCALE)
    record: dict = {"source": source, "windows": int(len(d)), "mean": float(d.mean()), "spread": spread}
    classifier, total = 1.0, 1.0
    if energies is not None:
        if len(energies) != len(d):
            raise ValueError(f"{len(energies)} motion energies for {len(d)} normal windows' log-odds: one per window")
        e_spread = max(float(energies.std()), MIN_ENERGY_SPREAD)
        classifier, prior = 2 * (1 - share), 2 * share
        z = shared_z((d - d.mean()) / spread, (energies - energies.mean()) / e_spread, share)
        total = max(float(z.std()), MIN_SCALE)
        weight = prior / (TEMPERATURE * e_spread * total)
        record["motion"] = {"mean": float(energies.mean()), "spread": e_spread, "sum_spread": total, "weight": weight,
                            "share": float(share)}  # fmt: skip
    gain = classifier / (TEMPERATURE * spread * total)
    record.update(gain=gain, bias=-gain * float(d.mean()) - Z99 / TEMPERATURE)
    return record


def calibrate_from_log_odds(
    model: LRCN, d: np.ndarray, source: str, energies: np.ndarray | None = None, share: float = EQUAL_SHARE
) -> tuple[LRCN, dict]:
    """``model`` calibrated on the log-odds ``d`` it gives normal windows, and the record of it
    (:func:`calibration_record`). With a motion prior on the model, ``energies`` are the same windows' log motion
    energies and the prior is set from them."""
    if model.prior is not None and energies is None:
        raise ValueError("a model with a motion prior is calibrated with the normal windows' energies")
    record = calibration_record(d, source, energies if model.prior is not None else None, share)
    out = fold_calibration_into_head(model, record["gain"], record["bias"])
    if "motion" in record:
        out.prior.set(record["motion"]["mean"], record["motion"]["weight"])
    return out, record


def shared_z(z_classifier: np.ndarray, z_motion: np.ndarray, share: float) -> np.ndarray:
    """The two normal-footage z-scores combined with the prior's ``share`` in [0, 1]:
    ``2 (1 - share) z_classifier + 2 share z_motion`` (0.5: their plain sum; 1: the motion energy alone)."""
    return 2 * (1 - share) * z_classifier + 2 * share * z_motion


def calibrated_log_odds(d: np.ndarray, record: dict, energies: np.ndarray | None = None) -> np.ndarray:
    """The calibrated model's log-odds of windows whose raw log-odds are ``d`` (and log motion energies
    ``energies``, with a prior): the map :func:`calibrate_from_log_odds` folded into the model, applied in float64."""
    out = record["gain"] * d + record["bias"]
    if "motion" in record:
        out = out + record["motion"]["weight"] * (energies - record["motion"]["mean"])
    return out
