"""What the folds of one ``transfer`` run share (:class:`FoldRun`), and the steps a fold model is built, trained
and scored with: a fresh model and optimiser, the inputs of its trainable part, one epoch, one scoring pass.

``ddp_vad.train.fold`` runs them for an outer fold, and for the inner folds ``--prior-share nested`` trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ddp_vad.data.reader import WindowSet, frames_to_float
from ddp_vad.errors import NonFiniteLossError
from ddp_vad.models import LRCN, ModelConfig
from ddp_vad.motion import window_energies
from ddp_vad.runfiles import fold_checkpoint_dir
from ddp_vad.train.augment import augment_windows, epoch_generator, parse_augment
from ddp_vad.train.checkpoint import list_fold_checkpoints
from ddp_vad.train.classifier import (
    CHUNK,
    build_classifier,
    compute_cache,
    feature_standardization,
    frozen_part,
    train_mode,
)
from ddp_vad.train.crossval import CVWindows


@dataclass
class FoldRun:
    """What every fold of one transfer run shares (``cfg`` is the run's TransferConfig)."""

    cfg: Any
    run_dir: Any
    ws: WindowSet
    cv: CVWindows
    held_out: np.ndarray  # bool [N]: windows of the held-out anomaly type (never trained on)
    model_cfg: ModelConfig
    features_state: dict[str, torch.Tensor] | None
    shared_cache: torch.Tensor | None  # frozen output of every window when it is the same for every fold
    reference: np.ndarray | None  # normal windows (train clips) every fold is calibrated on; None: none / not asked
    reference_cache: torch.Tensor | None  # their frozen-part output where it is the same for every fold
    reference_energies: np.ndarray | None  # their log motion energies (models with a motion prior), computed once
    fingerprint: dict
    accelerator: Any
    scaler_needed: bool
    extra_normal: np.ndarray | None = None  # windows every fold also trains on as normal (--normal-footage train)
    _energies: np.ndarray | None = field(default=None, repr=False)  # per window, NaN until computed

    def energies(self, idx: np.ndarray) -> np.ndarray:
        """Log motion energies of the windows ``idx``, each computed at most once per process: a fold's test windows
        are other folds' training windows, which ``--prior-share nested`` scores in its inner folds."""
        if self._energies is None:
            self._energies = np.full(len(self.ws), np.nan)
        todo = idx[np.isnan(self._energies[idx])]
        if todo.size:
            self._energies[todo] = window_energies(self.ws.frames, todo)
        return self._energies[idx]


@torch.no_grad()
def predict(model: LRCN, forward, get_inputs, idx: np.ndarray, autocast) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anomaly probabilities, predicted classes and log-odds ``l1 - l0`` (float64) of the windows ``idx`` (eval
    mode). The probability is the sigmoid of the log-odds in float64 (the softmax of the two logits)."""
    model.eval()
    log_odds = []
    for lo in range(0, len(idx), CHUNK):
        with autocast():
            logits = forward(get_inputs(idx[lo : lo + CHUNK])).float()
        log_odds.append((logits[:, 1] - logits[:, 0]).double().cpu())
    d = torch.cat(log_odds).numpy() if log_odds else np.zeros(0, np.float64)
    return outputs_of_log_odds(d)


def outputs_of_log_odds(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(anomalous), argmax class, log-odds) of log-odds ``d``."""
    return torch.sigmoid(torch.from_numpy(d)).numpy(), (d > 0).astype(np.int64), d


def class_weights(labels: np.ndarray, num_classes: int = 2) -> torch.Tensor:
    """Balanced cross-entropy weights ``n / (num_classes * n_c)`` from training labels (an absent class gets 0)."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def loss_weight(run: FoldRun, fit_idx: np.ndarray) -> torch.Tensor | None:
    """The cross-entropy class weights a fold model trains on ``fit_idx`` with: balanced (:func:`class_weights` of
    those windows' labels) under ``--class-weight balanced``, None otherwise."""
    balanced = getattr(run.cfg, "class_weight", "none") == "balanced"
    return class_weights(run.cv.labels[fit_idx]) if balanced else None


def input_fn(run: FoldRun, model: LRCN, train_idx: np.ndarray) -> tuple[Callable, tuple | None]:
    """``get_inputs(idx)`` for the trainable part (frames, or the cached frozen output) and the per-fold feature
    standardisation (``--train head``), computed from the fold's training windows only."""
    cfg, device, autocast = run.cfg, run.accelerator.device, run.accelerator.autocast
    frozen = frozen_part(model, cfg.train)
    if frozen is None:
        return (lambda idx: frames_to_float(torch.from_numpy(run.ws.frames[idx]).to(device))), None
    cache = run.shared_cache
    if cache is None:  # from scratch: this fold's own frozen weights
        model.eval()
        cache = compute_cache(frozen, run.ws.frames, device, autocast)
    if cfg.train == "head":  # [N, hidden] is small: keep it on the device; conv maps stay in host memory
        cache = cache.to(device)
    norm = feature_standardization(cache, train_idx) if cfg.train == "head" and cfg.standardize else None

    def get_inputs(idx: np.ndarray) -> torch.Tensor:
        x = cache[torch.from_numpy(idx).to(cache.device)].to(device)
        return x if norm is None else (x - norm[0]) / norm[1]

    return get_inputs, norm


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler) -> None:
    """Backward + step, through the fp16 GradScaler when there is one."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def train_epoch(
    run: FoldRun, k: int, epoch: int, order: np.ndarray, model, forward, get_inputs, optimizer, scaler,
    weight: torch.Tensor | None = None,
):  # fmt: skip
    """One pass over the fold's training windows; returns the mean loss. ``weight``: cross-entropy class weights.

    With ``--augment`` (``--train all`` only) each batch of frames is transformed with the epoch's own generator.
    """
    device, autocast, batch = run.accelerator.device, run.accelerator.autocast, run.cfg.batch_size
    labels = torch.from_numpy(run.cv.labels)
    augments = parse_augment(getattr(run.cfg, "augment", "none"))
    gen = epoch_generator(run.cfg.seed, k, epoch) if augments else None
    weight = None if weight is None else weight.to(device)
    train_mode(model, run.cfg.train)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for lo in range(0, order.size, batch):
        b = order[lo : lo + batch]
        inputs = get_inputs(b)
        if gen is not None:
            inputs = augment_windows(inputs, augments, gen)
        with autocast():
            logits = forward(inputs)
        # Weighted mean over the batch (F.cross_entropy divides by the summed weights of the batch's labels).
        loss = F.cross_entropy(logits.float(), labels[b].to(device), weight=weight)
        optimizer_step(loss, optimizer, scaler)
        total += loss.detach().double() * b.size
    epoch_loss = (total / order.size).item()
    if not math.isfinite(epoch_loss):
        done = list_fold_checkpoints(fold_checkpoint_dir(run.run_dir, k))
        where = f"last good checkpoint: {done[-1][1]}" if done else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"fold {k}: non-finite training loss in epoch {epoch} ({epoch_loss}); stopped without saving; "
            f"{where}. Lower --lr or use --mixed-precision no/bf16, then --resume auto"
        )
    return epoch_loss


def new_model(run: FoldRun, seed: int) -> tuple:
    """A fresh classifier (initialised with ``seed``), its optimizer and GradScaler (or None)."""
    cfg, device = run.cfg, run.accelerator.device
    model = build_classifier(run.model_cfg, cfg.train, seed, run.features_state).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = float(getattr(cfg, "weight_decay", 0.0))
    # AdamW only when asked: the default stays the method's plain Adam, bit for bit.
    optimizer = torch.optim.AdamW(params, cfg.lr, weight_decay=decay) if decay else torch.optim.Adam(params, cfg.lr)
    scaler = torch.amp.GradScaler(device.type) if run.scaler_needed else None
    return model, optimizer, scaler
