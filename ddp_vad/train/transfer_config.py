"""``TransferConfig``: the options of ``ddp_vad transfer`` and their checks (the run itself is
:mod:`ddp_vad.train.transfer`)."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from pathlib import Path

from ddp_vad.architecture_options import checked_capacity_options
from ddp_vad.errors import UserError
from ddp_vad.models import INPUT_MODES, POOLINGS
from ddp_vad.motion import MOTION_PRIORS
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES
from ddp_vad.train.augment import parse_augment
from ddp_vad.train.calibration import CALIBRATIONS, EQUAL_SHARE
from ddp_vad.train.classifier import (
    RANDOM,
    SCRATCH,
    TRAIN_SCOPES,
    discriminator_file,
)
from ddp_vad.train.crossval import (
    PROTOCOL_HELP,
    PROTOCOLS,
    check_fraction,
    check_repeats,
)
from ddp_vad.train.distributed import (
    PRECISIONS,
)
from ddp_vad.train.prior_share import INNER_FOLDS, PRIOR_SHARES, parse_prior_share
from ddp_vad.train.source import FRESH

METHOD_GAN, METHOD_SCRATCH, METHOD_RANDOM = "GAN+LRCN", "LRCN", "Random+LRCN"
NORMAL_FOOTAGE = ("none", "train")  # --normal-footage


@dataclass
class TransferConfig:
    """Options of ``ddp_vad transfer``. ``batch_size`` is per fold (each fold trains alone on its process)."""

    shards: str = option(help="Shard folder (with manifest.json).")
    out: str = option(help="Run folder (RUN).")
    source: str = option(
        help="A pretrain run folder (GAN+LRCN: its discriminator's features), 'scratch' (LRCN, trains everything) "
        "or 'random' (the control: the same head on a frozen, randomly initialised LRCN).",
        flag="--from",
    )
    train: str | None = option(
        None,
        "What is fine-tuned: the head (features frozen, computed once), head + LSTM, or all. "
        "Default: head with a GAN run, all from scratch (a random frozen extractor would be a straw man).",
        choices=TRAIN_SCOPES,
    )
    folds: int | None = option(None, "Must match the shards' fold count (default: the shards').")
    protocol: str = option("leakfree", PROTOCOL_HELP, choices=PROTOCOLS)
    repeats: int = option(
        1, "Repeat the cross-validation with this many fold seeds (repeat 0: the shards' folds); mean ± std over all."
    )
    epochs: int = option(10, "Training epochs per fold.")
    preset: str | None = option(
        None,
        "Architecture for --from scratch (default: paper). A GAN run brings its own; a different one is an error.",
        choices=PRESET_NAMES,
    )
    batch_size: int = option(32, "Windows per step (each fold alone).")
    lr: float = option(1e-3, "Adam learning rate.")
    seed: int = option(0, "Seed of heads, dropout and data order (per fold).")
    resume: str = option(
        "auto",
        "auto: skip finished folds, continue unfinished ones; none: refuse a non-empty --out.",
        choices=("auto", "none"),
    )
    holdout_type: str | None = option(
        None, "Leave this anomaly type out of every training fold and report accuracy on it."
    )
    mixed_precision: str | None = option(None, "Override accelerate's mixed-precision setting.", choices=PRECISIONS)
    method: str | None = option(None, "Name in metrics.json (default: GAN+LRCN, or LRCN from scratch).")
    standardize: bool = option(
        True, "--train head: standardise the frozen features per fold (folded into the saved head).", negatable=True
    )
    labelled_fraction: float = option(
        1.0,
        "Train each fold on this stratified, seeded share of its labelled windows (nested across fractions; at least "
        "one window per class).",
    )
    progress: bool = option(True, "Progress bar on the main process.", negatable=True)
    # Levers (docs/models.md): model options override the preset's for --from scratch (a GAN run brings its own
    # architecture); training options apply to either source.
    input_mode: str | None = option(
        None,
        "LRCN input: frames (the method), diff (|x_t - x_t-1|) or both (default: the preset's).",
        choices=INPUT_MODES,
    )
    pooling: str | None = option(
        None,
        "How a frame's conv map enters the LSTM: flatten (the method), max or topk (default: the preset's).",
        choices=POOLINGS,
    )
    topk: int | None = option(None, "--pooling topk: positions averaged per channel (default: the preset's).")
    input_pool: int | None = option(
        None, "LRCN: average-pool frames by this factor before the conv stack (default: the preset's; demo 3)."
    )
    conv_channels: str | None = option(
        None, "LRCN: channels of each conv layer, comma-separated, one per layer (default: the preset's; demo 8,8,8)."
    )
    dropout: float | None = option(None, "Dropout of the LRCN before its LSTM and head (default: the preset's, 0.5).")
    augment: str = option(
        "none",
        "Comma list of flip, shift, jitter applied to training windows (seeded per seed, fold, epoch); "
        "--train all only (head and head+lstm train on a cached output of the plain windows).",
    )
    class_weight: str = option(
        "balanced",
        "Cross-entropy class weights: balanced (n / (2 n_class) from the fold's training labels: the leak-free set is "
        "every window of the labelled clips, not a balanced subset) or none (the method's plain loss).",
        choices=("none", "balanced"),
    )
    val_clips: int = option(
        0,
        "Hold out this many training clips per fold (seeded) and keep the epoch with the best validation AUROC "
        "(0 = train on every training clip, keep the last epoch). Never the test fold.",
    )
    weight_decay: float = option(0.0, "Decoupled weight decay (AdamW); 0 = the method's plain Adam.")
    normal_footage: str = option(
        "none",
        "train: add the shards' train clips (normal-only footage, never tested on) to every fold's training windows as "
        "normal, the labelled fraction of them (seeded); leakfree protocol only. none: the labelled clips only.",
        choices=NORMAL_FOOTAGE,
    )
    calibrate: str = option(
        "normal",
        "Per-fold score calibration: normal (each fold's log-odds standardised on the same normal footage, the train "
        "clips' windows, so fold models share one scale; folded into the saved model) or none (the method's raw "
        "scores).",
        choices=CALIBRATIONS,
    )
    motion_prior: str | None = option(
        None,
        "energy: add each window's motion energy (the top cells of |frame difference|), standardised on the same "
        "normal footage, to the calibrated log-odds (needs --calibrate normal; the default with it); none: the "
        "classifier's score alone (the default with --calibrate none).",
        choices=MOTION_PRIORS,
    )
    prior_share: str = option(
        str(EQUAL_SHARE),
        "How much the motion prior weighs against the classifier: a share in [0, 1] (0.5, the default: their plain "
        "sum; 1: the motion energy alone; 0: the classifier alone), or nested: each fold picks its share from "
        f"{', '.join(f'{a:.2g}' for a in PRIOR_SHARES)} by the frame AUROC of {INNER_FOLDS} inner folds of its own "
        "training clips (never the test fold), at about twice the training time.",
    )
    # False: check the values only, not that --shards and a GAN --from exist (the pipeline checks every stage's
    # options before an earlier stage has made them).
    check_paths: InitVar[bool] = True

    def __post_init__(self, check_paths: bool) -> None:
        self._check_inputs(check_paths)
        self._check_training()
        self._check_scoring()
        if self.method is None:
            self.method = {SCRATCH: METHOD_SCRATCH, RANDOM: METHOD_RANDOM}.get(self.source, METHOD_GAN)
        if not str(self.method).strip():
            raise UserError("--method: give a non-empty name")

    def _check_inputs(self, check_paths: bool) -> None:
        """The shards, the run folder and the source (``--from``), and the fine-tuned part it implies."""
        if check_paths and not (Path(self.shards) / "manifest.json").is_file():
            raise UserError(f"--shards {self.shards}: no manifest.json there (build shards with `ddp_vad shard build`)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise UserError(f"--out {self.out}: exists and is not a folder")
        self.source = str(self.source)
        if check_paths and self.source not in FRESH:
            discriminator_file(self.source)  # raises with the path when it is not a finished pretrain run
        if self.train is None:
            self.train = "all" if self.source == SCRATCH else "head"
        if self.source == RANDOM and self.train != "head":
            raise UserError(f"--from random --train {self.train}: the control trains the head only (--train head)")

    def _check_training(self) -> None:
        """How each fold trains: folds, epochs, batches, rates, labels, augmentation, weights, extra footage, model."""
        check_repeats(self.repeats)
        if self.train not in TRAIN_SCOPES:
            raise UserError(f"--train {self.train}: choose one of {', '.join(TRAIN_SCOPES)}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol {self.protocol}: choose one of {', '.join(PROTOCOLS)}")
        if self.folds is not None and int(self.folds) < 2:
            raise UserError(f"--folds {self.folds}: need at least 2")
        if int(self.epochs) < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if int(self.batch_size) < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.preset is not None and self.preset not in PRESET_NAMES:
            raise UserError(f"--preset {self.preset}: choose one of {', '.join(PRESET_NAMES)}")
        if self.resume not in ("auto", "none"):
            raise UserError(f"--resume {self.resume}: choose auto or none")
        if self.mixed_precision not in (None, *PRECISIONS):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.holdout_type is not None and not str(self.holdout_type).strip():
            raise UserError("--holdout-type: give an anomaly type name")
        check_fraction(self.labelled_fraction)
        self.augment = ",".join(parse_augment(self.augment)) or "none"
        if self.augment != "none" and self.train != "all":
            raise UserError(
                f"--augment {self.augment} needs --train all: --train {self.train} trains on the frozen part's output, "
                "computed once from the plain windows"
            )
        if self.class_weight not in ("none", "balanced"):
            raise UserError(f"--class-weight {self.class_weight}: choose none or balanced")
        if self.normal_footage not in NORMAL_FOOTAGE:
            raise UserError(f"--normal-footage {self.normal_footage}: choose {' or '.join(NORMAL_FOOTAGE)}")
        if self.normal_footage == "train" and self.protocol != "leakfree":
            raise UserError(f"--normal-footage train needs --protocol leakfree (the {self.protocol} protocol's set "
                            "already holds the train clips' windows)")  # fmt: skip
        if int(self.val_clips) < 0:
            raise UserError(f"--val-clips must be >= 0, got {self.val_clips}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        self.conv_channels = checked_capacity_options(self.input_pool, self.conv_channels)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")

    def _check_scoring(self) -> None:
        """How fold scores are put on one scale: calibration, the motion prior and its share."""
        if self.calibrate not in CALIBRATIONS:
            raise UserError(f"--calibrate {self.calibrate}: choose {' or '.join(CALIBRATIONS)}")
        if self.motion_prior is None:
            self.motion_prior = "energy" if self.calibrate == "normal" else "none"
        if self.motion_prior not in MOTION_PRIORS:
            raise UserError(f"--motion-prior {self.motion_prior}: choose {' or '.join(MOTION_PRIORS)}")
        if self.motion_prior == "energy" and self.calibrate != "normal":
            raise UserError("--motion-prior energy needs --calibrate normal (the prior is standardised on the same "
                            "normal footage); give --motion-prior none with --calibrate none")  # fmt: skip
        self.prior_share = parse_prior_share(self.prior_share)
        if self.prior_share != EQUAL_SHARE and self.motion_prior != "energy":
            raise UserError(f"--prior-share {self.prior_share} needs --motion-prior energy (it weighs the prior "
                            "against the classifier)")  # fmt: skip
