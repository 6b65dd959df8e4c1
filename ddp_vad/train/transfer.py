"""Transfer learning with fold-parallel k-fold cross-validation (``ddp_vad transfer``).

The classifier is an LRCN (``models.LRCN``: ``features`` = conv stack + LSTM, ``head`` = dense layers). With
``--from GANRUN`` its ``features`` are an exact copy of the pretrained discriminator's and the head is new; with
``--from scratch`` everything is freshly initialised. ``--train`` picks what is fine-tuned (the method's Table 2
scenarios): ``head`` (features frozen), ``head+lstm`` (conv stack frozen) or ``all``. Cross-entropy, Adam.

**Frozen parts are computed once, not every epoch.** With ``--train head`` the whole feature extractor is frozen, so
its output (eval mode: the dropout before the LSTM is off) is computed once for every window and the head is trained
on those cached features -- far cheaper than re-running the CNN + LSTM each epoch (DESIGN.md 6). With ``head+lstm``
only the conv stack is frozen; it has no mode-dependent layers, so caching its per-frame output and running dropout +
LSTM + head on the cache is *exactly* the full forward pass. With a GAN source the frozen part is the same for every
fold and is computed once per run (for ``head`` split over the processes in fixed chunks and gathered); from scratch
it differs per fold and is computed by the fold's owner.

**Standardised head inputs** (``--train head``, on by default, ``--no-standardize`` turns it off): a discriminator's
LSTM outputs vary little between windows around a large offset (on the Ped1 sample after 100 demo GAN steps: std
0.01 per feature around |mean| 0.6), so the dropout before the head's first Linear buries the signal and the head stays
at chance. Each fold standardises the cached features with the mean/std of its training windows; at export this is
folded into the head's first Linear, so ``model.safetensors`` is a plain LRCN that maps frames to the same scores.

**Fold-parallel.** With P processes fold k runs on process ``k % P`` as an independent model: never DDP-wrapped
(ranks train different folds; DDP would average their gradients), never passed to ``accelerator.prepare``. Every
process holds every window (``load_window_set``) and selects by fold. A fold's seed, initial weights and data order
depend only on ``(seed, fold)`` and feature chunks have fixed boundaries, so per-fold results do not depend on P.
The main process gathers the fold results and writes ``RUN/metrics.json``, ``RUN/oof_scores.csv`` and
``RUN/config.json``.

**Per-fold files** are written by the fold's owner, which is their only holder (several nodes need RUN on a shared
filesystem for a later run with another process count to see them): ``RUN/tb/fold_XX/`` (loss/train,
accuracy/test, lr per epoch), ``RUN/checkpoints/fold_XX/epoch_XXXX.pt`` (the latest epoch's model, optimizer, RNG
state; plain tensors and types only, loaded with ``weights_only=True``), and when the fold finishes
``RUN/folds/fold_XX/model.safetensors`` + ``result.json`` (metrics and out-of-fold scores), written atomically.
``--resume auto`` skips folds whose ``result.json`` exists and continues an unfinished fold from its checkpoint (on
CPU to the same numbers as an uninterrupted run); ``--resume none`` refuses a non-empty RUN. Files of a run with
other settings are refused, never mixed in.

**Leave-one-anomaly-type-out** (``--holdout-type TYPE``): windows whose ``anomaly_types`` include TYPE are removed
from every training fold; they stay in the test folds and are scored like every other window. ``metrics.json``
reports how the held-out windows were classified (``"holdout"``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddp_vad.config import write_resolved_config
from ddp_vad.data.reader import WindowSet, frames_to_float, load_window_set
from ddp_vad.data.shards import fold_count, load_manifest
from ddp_vad.errors import UserError
from ddp_vad.eval.metrics import binary_metrics, write_cv_results
from ddp_vad.files import atomic_path, sha256_file, write_json_atomic
from ddp_vad.models import (
    DISCRIMINATOR_FILE,
    LRCN,
    PRESETS,
    FeatureExtractor,
    ModelConfig,
    build_lrcn,
    load_model_config,
    model_config_for,
    save_model,
)
from ddp_vad.train.distributed import check_process_group, make_accelerator, patient_group, print_main

SCRATCH = "scratch"
TRAIN_SCOPES = ("head", "head+lstm", "all")
PROTOCOLS = ("window", "clip")
METHOD_GAN, METHOD_SCRATCH = "GAN+LRCN", "LRCN"
DEFAULT_PRESET = "paper"
MODEL_FILE, RESULT_FILE = "model.safetensors", "result.json"
_CKPT_FORMAT = "ddp_vad-transfer-checkpoint/1"
_CHUNK = 64  # windows per forward pass for frozen features and scoring: fixed, so numbers do not depend on P


class NonFiniteLossError(UserError):
    """The training loss became NaN/inf; the fold stopped without checkpointing the bad state."""


@dataclass
class TransferConfig:
    """Options of ``ddp_vad transfer`` (field names = CLI option names; ``source`` is ``--from``).

    ``batch_size`` is per fold (each fold trains alone on its process). ``method`` defaults to ``GAN+LRCN`` with a
    GAN run and ``LRCN`` from scratch. ``preset`` is the architecture for ``--from scratch`` (default paper); a GAN
    run brings its own and a different ``preset`` is ignored with a note.
    """

    shards: str
    out: str
    source: str
    train: str = "head"
    folds: int | None = None  # None: the shards' fold count (a different number is an error)
    protocol: str = "window"
    epochs: int = 10
    preset: str | None = None
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    resume: str = "auto"
    holdout_type: str | None = None
    mixed_precision: str | None = None
    method: str | None = None
    standardize: bool = True  # --train head: standardise the cached features per fold (folded into the head)
    progress: bool = True

    def __post_init__(self) -> None:
        if not (Path(self.shards) / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json there (build shards with `ddp_vad shard build`)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")
        self.source = str(self.source)
        if self.source != SCRATCH:
            discriminator_file(self.source)  # raises with the path when it is not a finished pretrain run
        if self.train not in TRAIN_SCOPES:
            raise UserError(f"--train {self.train}: choose one of {', '.join(TRAIN_SCOPES)}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol}: choose window or clip")
        if self.folds is not None and int(self.folds) < 2:
            raise UserError(f"--folds {self.folds}: need at least 2")
        if int(self.epochs) < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.preset is not None and self.preset not in PRESETS:
            raise UserError(f"--preset {self.preset}: choose one of {', '.join(PRESETS)}")
        if self.resume not in ("auto", "none"):
            raise UserError(f"--resume {self.resume}: choose auto or none")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.holdout_type is not None and not str(self.holdout_type).strip():
            raise UserError("--holdout-type: give an anomaly type name")
        if self.method is None:
            self.method = METHOD_SCRATCH if self.source == SCRATCH else METHOD_GAN
        if not str(self.method).strip():
            raise UserError("--method: give a non-empty name")


# --------------------------------------------------------------------------------------- model setup
def discriminator_file(source: str | Path) -> Path:
    """The discriminator weights of a pretrain run (a run folder or the ``.safetensors`` file itself)."""
    path = Path(source)
    if not path.exists():
        raise UserError(
            f"--from {source}: GAN run not found (give a pretrain run folder holding {DISCRIMINATOR_FILE}, "
            f"or '{SCRATCH}')"
        )
    if path.is_dir():
        path = path / DISCRIMINATOR_FILE
        if not path.is_file():
            raise UserError(f"--from {source}: no {DISCRIMINATOR_FILE} there (is the pretrain run finished?)")
    return path


def resolve_model(cfg: TransferConfig, manifest: dict) -> tuple[ModelConfig, dict[str, torch.Tensor] | None, list]:
    """The classifier's architecture, the GAN feature-extractor weights to start from (None from scratch) and notes.

    A GAN run must have been trained on windows of the shards' length and frame size.
    """
    notes: list[str] = []
    if cfg.source == SCRATCH:
        return model_config_for(cfg.preset or DEFAULT_PRESET, manifest), None, notes
    from safetensors.torch import load_file

    path = discriminator_file(cfg.source)
    model_cfg = load_model_config(path)
    got = (model_cfg.window, model_cfg.height, model_cfg.width)
    want = (int(manifest["window"]), int(manifest["height"]), int(manifest["width"]))
    if got != want:
        raise UserError(
            f"GAN run {cfg.source} was trained on windows of {got[0]} frames of {got[1]}x{got[2]} (HxW) but the shards "
            f"in {cfg.shards} hold {want[0]} frames of {want[1]}x{want[2]}: pretrain on these shards or use shards of "
            "the GAN's size"
        )
    if cfg.preset is not None and cfg.preset != model_cfg.preset:
        notes.append(f"--preset {cfg.preset} ignored: the GAN run brings its own architecture ({model_cfg.preset})")
    prefix = "features."
    state = {k[len(prefix) :]: v for k, v in load_file(str(path)).items() if k.startswith(prefix)}
    return model_cfg, state, notes


def fold_seed(seed: int, fold: int) -> int:
    """The seed of one fold: a function of (seed, fold) only, never of the process that runs it."""
    return int(np.random.SeedSequence([abs(int(seed)), int(fold), 0x7F]).generate_state(1)[0])


def set_trainable(model: LRCN, train: str) -> LRCN:
    """Freeze what ``train`` keeps fixed: ``head`` -> all of ``features``; ``head+lstm`` -> the conv stack."""
    if train not in TRAIN_SCOPES:
        raise UserError(f"--train {train}: choose one of {', '.join(TRAIN_SCOPES)}")
    model.requires_grad_(True)
    if train == "head":
        model.features.requires_grad_(False)
    elif train == "head+lstm":
        model.features.convs.requires_grad_(False)
    return model


def build_classifier(
    model_cfg: ModelConfig, train: str, seed: int, features_state: dict[str, torch.Tensor] | None = None
) -> LRCN:
    """A classifier LRCN seeded with ``seed`` (the fold's): features copied from ``features_state`` when given
    (exactly), head new, parameters frozen per ``train``. Also seeds torch's global RNG (dropout) with ``seed``."""
    torch.manual_seed(seed)
    model = build_lrcn(model_cfg)
    if features_state is not None:
        model.features.load_state_dict(features_state, strict=True)
    return set_trainable(model, train)


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable, frozen and total parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def lstm_from_frame_features(features: FeatureExtractor, y: torch.Tensor) -> torch.Tensor:
    """``features.forward`` after the conv stack: dropout -> LSTM (fp32, autocast off) -> last step.

    ``features(x) == lstm_from_frame_features(features, features.frame_features(x))`` (mirrors
    ``FeatureExtractor.forward``; a test checks that they agree).
    """
    y = features.dropout(y)
    with torch.autocast(device_type=y.device.type, enabled=False):
        out, _ = features.lstm(y.float())
    return out[:, -1]


def frozen_part(model: LRCN, train: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The frozen prefix whose output is cached: the whole feature extractor (``head``), the conv stack
    (``head+lstm``) or nothing (``all``)."""
    if train == "head":
        return model.features
    if train == "head+lstm":
        return model.features.frame_features
    return None


def trainable_forward(model: LRCN, train: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits from the cached frozen output (or from frames when nothing is cached)."""
    if train == "head":
        return model.head
    if train == "head+lstm":
        return lambda y: model.head(lstm_from_frame_features(model.features, y))
    return model


def feature_standardization(cache: torch.Tensor, train_idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature over the fold's training windows (constant features keep std 1)."""
    x = cache[torch.from_numpy(train_idx).to(cache.device)].double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std < 1e-6, torch.ones_like(std), std)
    return mean.float(), std.float()


def fold_standardization_into_head(model: LRCN, mean: torch.Tensor, std: torch.Tensor) -> LRCN:
    """A copy of ``model`` whose head takes raw features: ``(x - mean) / std`` is folded into the head's first Linear
    (``W' = W / std``, ``b' = b - W' mean``). Exact in eval mode, where the dropout before that Linear is the
    identity, so the exported LRCN maps frames to the same scores without any extra layer."""
    import copy

    out = copy.deepcopy(model)
    linear = out.head.net[1]
    with torch.no_grad():
        w = linear.weight.double() / std.double().to(linear.weight.device)
        linear.bias.copy_((linear.bias.double() - w @ mean.double().to(w.device)).to(linear.bias.dtype))
        linear.weight.copy_(w.to(linear.weight.dtype))
    return out


def _train_mode(model: LRCN, train: str) -> None:
    model.train()
    if train == "head":  # the cached features came from eval mode; only the head's own dropout is active
        model.features.eval()


# ----------------------------------------------------------------------------------- frozen features
def _chunks(n: int) -> list[np.ndarray]:
    return [np.arange(lo, min(lo + _CHUNK, n)) for lo in range(0, n, _CHUNK)]


@torch.no_grad()
def encode_windows(
    fn: Callable[[torch.Tensor], torch.Tensor],
    frames: np.ndarray,
    chunks: list[np.ndarray],
    device: torch.device,
    autocast: Callable,
) -> list[torch.Tensor]:
    """``fn`` of the given chunks of uint8 windows, as float32 CPU tensors (one per chunk)."""
    out = []
    for idx in chunks:
        x = frames_to_float(torch.from_numpy(frames[idx]).to(device))
        with autocast():
            out.append(fn(x).float().cpu())
    return out


def compute_cache(
    fn: Callable[[torch.Tensor], torch.Tensor],
    frames: np.ndarray,
    device: torch.device,
    autocast: Callable,
    group=None,
    rank: int = 0,
    world: int = 1,
) -> torch.Tensor:
    """``fn`` of every window, computed in fixed chunks; with ``world > 1`` chunk i is computed by process
    ``i % world`` and the chunks are gathered (every process must call this). Identical numbers for any ``world``."""
    chunks = _chunks(len(frames))
    if world == 1:
        return torch.cat(encode_windows(fn, frames, chunks, device, autocast))
    mine = list(range(rank, len(chunks), world))
    parts = encode_windows(fn, frames, [chunks[i] for i in mine], device, autocast)
    everything = _all_gather(list(zip(mine, parts, strict=True)), group, world)
    by_index = dict(item for part in everything for item in part)
    return torch.cat([by_index[i] for i in range(len(chunks))])


# ---------------------------------------------------------------------------------------- collectives
def _object_group(world: int):
    """The long-timeout gloo group for gathering Python objects: ranks whose folds finish early wait at the final
    gather while others still train."""
    return None if world == 1 else patient_group()


def _all_gather(obj: Any, group, world: int) -> list[Any]:
    """Every process's ``obj``, in rank order (every process must call this)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _raise_agreed(error: str | None, group, world: int) -> None:
    """Raise the first error any process found, on every process (so none is left waiting at a collective)."""
    errors = [e for e in _all_gather(error, group, world) if e]
    if errors:
        raise UserError(errors[0])


# ----------------------------------------------------------------------------------------- fold files
def fold_name(fold: int) -> str:
    """``fold_XX`` (the per-fold folder name under tb/, checkpoints/ and folds/)."""
    return f"fold_{fold:02d}"


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.glob("epoch_*.pt"):
        stem = p.stem.removeprefix("epoch_")
        if stem.isdigit():
            found.append((int(stem), p))
    return sorted(found)


def save_fold_checkpoint(ckpt_dir: Path, epoch: int, state: dict) -> Path:
    """Write ``ckpt_dir/epoch_XXXX.pt`` atomically (temp file + rename) and remove the older ones."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    path = ckpt_dir / f"epoch_{epoch:04d}.pt"
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    for e, old in _checkpoints(ckpt_dir):
        if e < epoch:
            old.unlink(missing_ok=True)
    return path


def load_fold_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_fold_checkpoint` (no pickled objects: ``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file: say which one
        raise UserError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(state, dict) or state.get("format") != _CKPT_FORMAT:
        raise UserError(f"{path} is not a ddp_vad transfer checkpoint")
    return state


def _fingerprint(cfg: TransferConfig, manifest: dict, model_cfg: ModelConfig, mixed_precision: str) -> dict:
    """Everything a fold's numbers depend on; files of a run with another fingerprint are never reused."""
    shards = hashlib.sha256("".join(s.get("sha256", s["name"]) for s in manifest["shards"]).encode()).hexdigest()
    source = SCRATCH
    if cfg.source != SCRATCH:
        source = f"sha256:{sha256_file(discriminator_file(cfg.source))}"
    return {
        "shards": shards,
        "source": source,
        "model": model_cfg.to_dict(),
        **{k: getattr(cfg, k) for k in ("train", "protocol", "epochs", "batch_size", "lr", "seed", "holdout_type")},
        "standardize": bool(cfg.standardize and cfg.train == "head"),
        "mixed_precision": mixed_precision,
    }


def _differences(a: dict, b: dict) -> str:
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    brief = ("model", "shards", "source")  # too long to print: name them only
    return ", ".join(k if k in brief else f"{k}: {b.get(k)!r} -> {a.get(k)!r}" for k in keys)


# -------------------------------------------------------------------------------------------- the fold
@dataclass
class _Run:
    """What every fold of one run shares."""

    cfg: TransferConfig
    run_dir: Path
    ws: WindowSet
    fold_of: np.ndarray
    held_out: np.ndarray  # bool [N]: windows of the held-out anomaly type (never trained on)
    model_cfg: ModelConfig
    features_state: dict[str, torch.Tensor] | None
    shared_cache: torch.Tensor | None  # frozen output of every window when it is the same for every fold
    fingerprint: dict
    accelerator: Any
    scaler_needed: bool


@torch.no_grad()
def _predict(model: LRCN, forward, get_inputs, idx: np.ndarray, autocast) -> tuple[np.ndarray, np.ndarray]:
    """Anomaly probabilities (float64) and predicted classes of the windows ``idx`` (eval mode)."""
    model.eval()
    scores, preds = [], []
    for lo in range(0, len(idx), _CHUNK):
        with autocast():
            logits = forward(get_inputs(idx[lo : lo + _CHUNK])).float()
        scores.append(torch.softmax(logits, dim=1)[:, 1].double().cpu())
        preds.append(logits.argmax(dim=1).cpu())
    if not scores:
        return np.zeros(0, np.float64), np.zeros(0, np.int64)
    return torch.cat(scores).numpy(), torch.cat(preds).numpy().astype(np.int64)


def _holdout_part(run: _Run, test_idx: np.ndarray, preds: np.ndarray, n_excluded: int) -> dict | None:
    if run.cfg.holdout_type is None:
        return None
    sel = run.held_out[test_idx]
    labels, pred = run.ws.labels[test_idx][sel], preds[sel]
    return {
        "n": int(sel.sum()),
        "n_anomalous": int(labels.sum()),
        "correct": int((pred == labels).sum()),
        "predicted_anomalous": int(pred.sum()),
        "detected": int(((pred == 1) & (labels == 1)).sum()),
        "excluded_from_training": n_excluded,
    }


def train_fold(run: _Run, k: int, resume_state: dict | None = None, pbar=None) -> dict:
    """Train and score fold ``k`` (on this process); writes the fold's files and returns its result.

    ``resume_state``: the fold's latest checkpoint, to continue from.
    """
    from torch.utils.tensorboard import SummaryWriter

    cfg, ws, acc = run.cfg, run.ws, run.accelerator
    device, autocast = acc.device, acc.autocast
    name = fold_name(k)
    t0 = time.perf_counter()
    test_idx = np.flatnonzero(run.fold_of == k)
    train_idx = np.flatnonzero((run.fold_of != k) & ~run.held_out)
    n_excluded = int(((run.fold_of != k) & run.held_out).sum())
    if train_idx.size == 0:
        raise UserError(f"fold {k} has no training windows (too few windows, or --holdout-type removed them all)")
    notes = []
    if np.unique(ws.labels[train_idx]).size < 2:
        notes.append(f"training windows of fold {k} hold one class only")

    model = build_classifier(run.model_cfg, cfg.train, fold_seed(cfg.seed, k), run.features_state).to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type) if run.scaler_needed else None
    start_epoch, history = 0, []
    ckpt_dir = run.run_dir / "checkpoints" / name
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        if scaler is not None and resume_state.get("scaler"):
            scaler.load_state_dict(resume_state["scaler"])
        torch.set_rng_state(resume_state["rng_cpu"])
        if device.type == "cuda" and resume_state.get("rng_device") is not None:
            torch.cuda.set_rng_state(resume_state["rng_device"], device)
        start_epoch = int(resume_state["epoch"])
        history = json.loads(resume_state["history"])

    frozen = frozen_part(model, cfg.train)
    norm: tuple[torch.Tensor, torch.Tensor] | None = None
    if frozen is None:

        def get_inputs(idx: np.ndarray) -> torch.Tensor:
            return frames_to_float(torch.from_numpy(ws.frames[idx]).to(device))

    else:
        cache = run.shared_cache
        if cache is None:  # from scratch: this fold's own frozen weights
            model.eval()
            cache = compute_cache(frozen, ws.frames, device, autocast)

        if cfg.train == "head":  # [N, hidden] is small: keep it on the device; conv maps stay in host memory
            cache = cache.to(device)

        if cfg.train == "head" and cfg.standardize:
            norm = feature_standardization(cache, train_idx)

        def get_inputs(idx: np.ndarray) -> torch.Tensor:
            x = cache[torch.from_numpy(idx).to(cache.device)].to(device)
            return x if norm is None else (x - norm[0]) / norm[1]

    forward = trainable_forward(model, cfg.train)
    labels = torch.from_numpy(ws.labels)
    writer = SummaryWriter(str(run.run_dir / "tb" / name), purge_step=start_epoch + 1 if start_epoch else None)
    last = None
    try:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            order = train_idx[np.random.default_rng([abs(cfg.seed), k, epoch]).permutation(train_idx.size)]
            _train_mode(model, cfg.train)
            total = torch.zeros((), dtype=torch.float64, device=device)
            for lo in range(0, order.size, cfg.batch_size):
                b = order[lo : lo + cfg.batch_size]
                y = labels[b].to(device)
                with autocast():
                    logits = forward(get_inputs(b))
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                total += loss.detach().double() * b.size
            epoch_loss = (total / order.size).item()
            if not math.isfinite(epoch_loss):
                done = _checkpoints(ckpt_dir)
                where = f"last good checkpoint: {done[-1][1]}" if done else "no checkpoint was written yet"
                raise NonFiniteLossError(
                    f"fold {k}: non-finite training loss in epoch {epoch} ({epoch_loss}); stopped without saving; "
                    f"{where}. Lower --lr or use --mixed-precision no/bf16, then --resume auto"
                )
            last = _predict(model, forward, get_inputs, test_idx, autocast)
            test_acc = float((last[1] == ws.labels[test_idx]).mean()) if test_idx.size else float("nan")
            lr = optimizer.param_groups[0]["lr"]
            writer.add_scalar("loss/train", epoch_loss, epoch)
            writer.add_scalar("accuracy/test", test_acc, epoch)
            writer.add_scalar("lr", lr, epoch)
            history.append({"epoch": epoch, "loss": epoch_loss, "test_accuracy": test_acc})
            save_fold_checkpoint(
                ckpt_dir,
                epoch,
                {
                    "format": _CKPT_FORMAT,
                    "fold": k,
                    "epoch": epoch,
                    "fingerprint": json.dumps(run.fingerprint, sort_keys=True),
                    "model": {n: t.detach().cpu() for n, t in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "rng_cpu": torch.get_rng_state(),
                    "rng_device": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "history": json.dumps(history),
                },
            )
            if pbar is not None:
                pbar.update(1)
                pbar.set_postfix(fold=k, loss=f"{epoch_loss:.3f}", acc=f"{test_acc:.3f}")
    finally:
        writer.close()
    if last is None:  # resumed from the final epoch's checkpoint
        last = _predict(model, forward, get_inputs, test_idx, autocast)
    scores, preds = last

    row = {"fold": k, **binary_metrics(ws.labels[test_idx], preds), "n_train": int(train_idx.size)}
    oof = [
        {"key": ws.keys[i], "clip": ws.clips[i], "start": int(ws.starts[i]), "label": int(ws.labels[i]),
         "score": float(s), "fold": k}
        for i, s in zip(test_idx.tolist(), scores.tolist(), strict=True)
    ]  # fmt: skip
    if "note" in row:
        notes.append(f"fold {k}: {row['note']}")
    result = {
        "fold": k,
        "fingerprint": run.fingerprint,
        "metrics": row,
        "oof": oof,
        "holdout": _holdout_part(run, test_idx, preds, n_excluded),
        "history": history,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 3),
        "rank": int(acc.process_index),
    }
    fold_dir = run.run_dir / "folds" / name
    export = model if norm is None else fold_standardization_into_head(model, *norm)
    save_model(export, fold_dir / MODEL_FILE, run.model_cfg, kind="classifier")
    write_json_atomic(fold_dir / RESULT_FILE, result)  # last: its presence marks the fold finished
    return result


# ------------------------------------------------------------------------------------------ the run
def _fold_status(run_dir: Path, k: int, fingerprint: dict) -> tuple[str, Any, str | None]:
    """("done", result) / ("resume", checkpoint state) / ("new", None) for fold ``k``, or an error message."""
    name = fold_name(k)
    result_path = run_dir / "folds" / name / RESULT_FILE
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError as exc:
            return "new", None, f"cannot parse {result_path}: {exc.msg}"
        if result.get("fingerprint") != fingerprint:
            diff = _differences(fingerprint, result.get("fingerprint") or {})
            return "new", None, f"{result_path} was made with other settings ({diff}); use another --out"
        return "done", result, None
    ckpt_dir = run_dir / "checkpoints" / name
    for tmp in ckpt_dir.glob(".*.tmp.pt") if ckpt_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)  # left by a kill during a save
    ckpts = _checkpoints(ckpt_dir)
    if not ckpts:
        return "new", None, None
    try:
        state = load_fold_checkpoint(ckpts[-1][1])
    except UserError as exc:
        return "new", None, str(exc)
    if json.loads(state["fingerprint"]) != fingerprint:
        diff = _differences(fingerprint, json.loads(state["fingerprint"]))
        return "new", None, f"{ckpts[-1][1]} was made with other settings ({diff}); use another --out"
    return "resume", state, None


def _holdout_mask(ws: WindowSet, holdout_type: str | None) -> np.ndarray:
    if holdout_type is None:
        return np.zeros(len(ws), bool)
    mask = np.array([holdout_type in types for types in ws.anomaly_types], bool)
    if not mask.any():
        known = sorted({t for ts in (ws.manifest.get("anomaly_types") or {}).values() for t in ts})
        known = known or sorted({t for ts in ws.anomaly_types for t in ts})
        listing = ", ".join(known) if known else "none: build the shards with --anomaly-types JSON"
        raise UserError(f"--holdout-type {holdout_type}: no window has that anomaly type (available: {listing})")
    return mask


def _run_level_error(cfg: TransferConfig, run_dir: Path, fingerprint: dict) -> str | None:
    if cfg.resume == "none" and run_dir.is_dir() and any(run_dir.iterdir()):
        return f"--out {run_dir} is not empty: use --resume auto to continue that run, or choose another --out"
    config_path = run_dir / "config.json"
    if config_path.is_file():
        try:
            old = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            return f"cannot parse {config_path}: choose another --out"
        if old.get("stage") != "transfer":
            return f"--out {run_dir} holds another kind of run ({config_path}); choose another --out"
        if old.get("fingerprint") != fingerprint:
            diff = _differences(fingerprint, old.get("fingerprint") or {})
            return f"--out {run_dir} holds a transfer run with other settings ({diff}); choose another --out"
    return None


def _fmt(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def run_transfer(cfg: TransferConfig) -> Path:
    """Cross-validate the classifier described by ``cfg`` fold-parallel; returns the run folder.

    Every process must call this (under ``accelerate launch``/``torchrun`` or alone). See the module docstring.
    """
    t_start = time.perf_counter()
    run_dir = Path(cfg.out)
    manifest = load_manifest(cfg.shards)
    n_folds = fold_count(manifest, cfg.folds, cfg.shards)
    model_cfg, features_state, notes = resolve_model(cfg, manifest)
    if cfg.source == SCRATCH and cfg.train != "all":
        notes.append(
            f"--from scratch with --train {cfg.train}: the frozen part keeps its random initial weights "
            "(the method's LRCN baseline trains everything: --train all)"
        )

    accelerator = make_accelerator(cfg.mixed_precision, project_dir=str(run_dir))
    check_process_group(accelerator.num_processes)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    group = _object_group(world)
    for note in notes:
        print_main(is_main, f"transfer: note: {note}")

    ws = load_window_set(cfg.shards, show_progress=is_main and cfg.progress)
    if len(ws) == 0:
        raise UserError(f"--shards {cfg.shards}: no windows")
    fold_of = np.asarray(ws.folds(cfg.protocol), dtype=np.int64)
    held_out = _holdout_mask(ws, cfg.holdout_type)
    fingerprint = _fingerprint(cfg, manifest, model_cfg, str(accelerator.mixed_precision))

    # Preflight: which of my folds are finished / resumable; any problem stops every process.
    mine = [k for k in range(n_folds) if k % world == rank]
    status = {k: _fold_status(run_dir, k, fingerprint) for k in mine}
    error = next((s[2] for s in status.values() if s[2]), None)
    if is_main:
        error = _run_level_error(cfg, run_dir, fingerprint) or error
    _raise_agreed(error, group, world)
    kinds = {k: v for part in _all_gather({k: s[0] for k, s in status.items()}, group, world) for k, v in part.items()}
    todo_anywhere = any(v != "done" for v in kinds.values())
    for kind, what in (("done", "finished earlier, skipped"), ("resume", "resumed from their checkpoints")):
        folds = [str(k) for k in sorted(kinds) if kinds[k] == kind]
        if folds:
            print_main(is_main, f"transfer: fold(s) {', '.join(folds)} {what}")
    if world > n_folds:
        print_main(is_main, f"transfer: note: {world} processes for {n_folds} folds: {world - n_folds} stay idle")

    probe = set_trainable(build_lrcn(model_cfg), cfg.train)
    counts = parameter_counts(probe)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cache_kind = {"head": "feature-extractor output (eval mode)", "head+lstm": "conv-stack output", "all": None}
        if cfg.train == "head" and cfg.standardize:
            cache_kind["head"] += ", standardised per fold (training windows), folded into the exported head"
        write_resolved_config(run_dir, cfg, extra={
            "stage": "transfer",
            "method": cfg.method,
            "model": model_cfg.to_dict(),
            "source": SCRATCH if cfg.source == SCRATCH else str(discriminator_file(cfg.source).resolve()),
            "protocol": cfg.protocol,
            "train": cfg.train,
            "n_folds": n_folds,
            "world_size": world,
            "fold_owner": "fold k runs on process k % world_size",
            "mixed_precision": str(accelerator.mixed_precision),
            "parameters": counts,
            "cached_frozen_output": cache_kind[cfg.train],
            "manifest": {"path": str(Path(cfg.shards).resolve()),
                         **{k: manifest.get(k) for k in ("dataset", "window", "height", "width", "folds", "counts")}},
            "fingerprint": fingerprint,
        })  # fmt: skip
        print_main(
            is_main,
            f"transfer: {cfg.method} ({cfg.source}), train {cfg.train} ({counts['trainable']:,} of {counts['total']:,} "
            f"parameters), {len(ws)} windows, {n_folds} folds ({cfg.protocol}) over {world} process(es), "
            f"{cfg.epochs} epochs",
        )
    del probe

    shared_cache, cache_seconds = None, 0.0
    frozen_shared = features_state is not None and cfg.train != "all"
    if frozen_shared and todo_anywhere:  # the GAN's frozen part is the same for every fold: compute it once
        t0 = time.perf_counter()
        encoder = build_classifier(model_cfg, cfg.train, 0, features_state).to(device).eval()
        distribute = cfg.train == "head"  # small features: split the work; conv maps are big, each process computes
        shared_cache = compute_cache(
            frozen_part(encoder, cfg.train), ws.frames, device, accelerator.autocast, group,
            rank if distribute else 0, world if distribute else 1,
        )  # fmt: skip
        del encoder
        cache_seconds = round(time.perf_counter() - t0, 3)
        print_main(is_main, f"transfer: frozen features of {len(ws)} windows in {cache_seconds:.1f}s")

    run = _Run(
        cfg=cfg, run_dir=run_dir, ws=ws, fold_of=fold_of, held_out=held_out, model_cfg=model_cfg,
        features_state=features_state, shared_cache=shared_cache, fingerprint=fingerprint, accelerator=accelerator,
        scaler_needed=str(accelerator.mixed_precision) == "fp16",
    )  # fmt: skip
    pbar = tqdm(
        total=len(mine) * cfg.epochs, desc="transfer (main process's folds)" if world > 1 else "transfer",
        unit="epoch", disable=not (is_main and cfg.progress), dynamic_ncols=True,
    )  # fmt: skip
    results = []
    for k in mine:
        kind, payload, _ = status[k]
        if kind == "done":
            results.append(payload)
            pbar.update(cfg.epochs)
            continue
        if kind == "resume":
            pbar.update(int(payload["epoch"]))
        results.append(train_fold(run, k, payload if kind == "resume" else None, pbar))
    pbar.close()

    gathered = [r for part in _all_gather(results, group, world) for r in part]
    if is_main:
        gathered.sort(key=lambda r: r["fold"])
        fold_rows = [r["metrics"] for r in gathered]
        oof_rows = [row for r in gathered for row in r["oof"]]
        all_notes = notes + [n for r in gathered for n in r.get("notes", [])]
        extra: dict[str, Any] = {
            "source": cfg.source,
            "train": cfg.train,
            "n_folds": n_folds,
            "epochs": cfg.epochs,
            "model_preset": model_cfg.preset,
            "world_size": world,
            "parameters": counts,
            "frozen_feature_seconds": cache_seconds,
            "fold_seconds": [r["seconds"] for r in gathered],
            "seconds": round(time.perf_counter() - t_start, 2),
            "notes": all_notes,
        }
        if cfg.holdout_type is not None:
            per_fold = [{"fold": r["fold"], **r["holdout"]} for r in gathered]
            n = sum(p["n"] for p in per_fold)
            n_anom = sum(p["n_anomalous"] for p in per_fold)
            extra["holdout"] = {
                "type": cfg.holdout_type,
                "n": n,
                "n_anomalous": n_anom,
                "accuracy": sum(p["correct"] for p in per_fold) / n if n else None,
                "detection_rate": sum(p["detected"] for p in per_fold) / n_anom if n_anom else None,
                "predicted_anomalous": sum(p["predicted_anomalous"] for p in per_fold) / n if n else None,
                "per_fold": per_fold,
                "note": "held-out windows are removed from every training fold and scored in their own test fold; "
                "accuracy uses their labels, detection_rate = held-out anomalous windows predicted anomalous",
            }
        path = write_cv_results(run_dir, cfg.method, cfg.protocol, fold_rows, oof_rows, extra=extra)
        mean = json.loads(path.read_text())["mean"]
        for note in all_notes:
            print(f"transfer: note: {note}")
        print(
            f"transfer: {cfg.method} recall {_fmt(mean['recall'])} precision {_fmt(mean['precision'])} "
            f"accuracy {_fmt(mean['accuracy'])} F1 {_fmt(mean['f1'])} ({extra['seconds']:.1f}s) -> {run_dir}",
            flush=True,
        )
        if cfg.holdout_type is not None:
            h = extra["holdout"]
            print(f"transfer: held-out type {cfg.holdout_type}: {h['n']} windows, accuracy {_fmt(h['accuracy'])}, "
                  f"anomalous detected {_fmt(h['detection_rate'])}", flush=True)  # fmt: skip
    _all_gather(None, group, world)  # nobody leaves before the main process has written the results
    return run_dir


__all__ = [
    "METHOD_GAN",
    "METHOD_SCRATCH",
    "TRAIN_SCOPES",
    "TransferConfig",
    "build_classifier",
    "compute_cache",
    "fold_seed",
    "lstm_from_frame_features",
    "parameter_counts",
    "run_transfer",
    "set_trainable",
]
