"""Options of ``ddp_vad pretrain`` (:class:`PretrainConfig`), the hyperparameters its runs are compared by, and
which windows the GAN streams under each protocol."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ddp_vad.architecture_options import checked_capacity_options
from ddp_vad.errors import UserError
from ddp_vad.models import INPUT_MODES, POOLINGS
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES
from ddp_vad.train.crossval import PROTOCOLS
from ddp_vad.train.distributed import PRECISIONS
from ddp_vad.train.pseudo import DEFAULT_KINDS, KINDS, parse_kinds

OBJECTIVES = ("gan", "pseudo")
PLAIN_GAN = "the method's plain GAN"  # how the report names a run without variant


@dataclass
class PretrainConfig:
    """Options of ``ddp_vad pretrain``. ``batch_size`` is per process."""

    shards: str = option(help="Shard folder (with manifest.json).")
    out: str = option(help="Run folder (RUN).")
    preset: str = option("paper", "Model size: paper (GPU), demo (CPU in minutes), tiny (tests).", choices=PRESET_NAMES)
    steps: int = option(2000, "Total optimizer steps (G and D each).")
    batch_size: int = option(32, "Real windows per step per process.")
    lr: float = option(2e-4, "Adam learning rate (generator; also D unless --lr-d).")
    lr_d: float | None = option(None, "Discriminator learning rate (default: --lr).")
    beta1: float = option(0.5, "Adam beta1 (DCGAN's 0.5).")
    checkpoint_every: int = option(
        500, "Save a resumable checkpoint every N steps (and at the end); 0 = only at the end."
    )
    keep_checkpoints: int = option(3, "Newest checkpoints kept; 0 = all.")
    similarity_every: int = option(
        100, "Cosine/L2 of generated vs real windows every N steps (similarity.csv); 0 = off."
    )
    similarity_samples: int = option(30, "Window pairs per similarity.")
    image_every: int = option(500, "TensorBoard image of real vs generated windows every N steps; 0 = off.")
    log_every: int = option(10, "Reduce and log losses every N steps (also when NaN/inf is checked).")
    resume: str = option("auto", "auto (latest checkpoint if any) | latest | none | PATH.")
    seed: int = option(0, "Seed for weights, noise and data order.")
    workers: int = option(1, "Shard-reading workers per process.")
    shuffle_buffer: int = option(1000, "Sample shuffle buffer.")
    cache: bool = option(False, "Keep decoded shards in memory across epochs.", negatable=True)
    mixed_precision: str | None = option(None, "Override accelerate's mixed-precision setting.", choices=PRECISIONS)
    debug_keys: bool = option(
        False, "Write RUN/debug/keys_rank*.txt and weight hashes per rank (for checks).", envvar="DDP_VAD_DEBUG_KEYS"
    )
    progress: bool = option(True, "Progress bar on the main process.", negatable=True)
    label_smoothing: float = option(
        0.0, "Stabiliser: one-sided label smoothing, D's target for real windows is 1 - this (0 = the method's GAN)."
    )
    protocol: str = option(
        "leakfree",
        "Which windows the GAN learns from: leakfree = every window of the train clips only (normal footage, never a "
        "test clip); window/clip = the method's balanced windows of every clip.",
        choices=PROTOCOLS,
    )
    instance_noise: float = option(
        0.0, "Stabiliser: std of Gaussian noise on every window D sees, annealed linearly to 0 (0 = the method's GAN)."
    )

    # Levers of the discriminator's architecture (docs/models.md); the generator and the windows stay as they are.
    input_mode: str | None = option(
        None,
        "Discriminator input: frames (the method), diff (|x_t - x_t-1|) or both (default: the preset's).",
        choices=INPUT_MODES,
    )
    pooling: str | None = option(
        None,
        "Discriminator: flatten (the method), max or topk pooling of each frame's conv map (default: preset's).",
        choices=POOLINGS,
    )
    topk: int | None = option(None, "--pooling topk: positions averaged per channel (default: the preset's).")
    input_pool: int | None = option(
        None, "Discriminator: average-pool frames by this factor before the conv stack (default: the preset's)."
    )
    conv_channels: str | None = option(
        None, "Discriminator: channels of each conv layer, comma-separated, one per layer (default: the preset's)."
    )
    feature_matching: float = option(
        0.0,
        "Add this weight x feature-matching loss (D's features, real vs generated batch means) to G's loss; "
        "0 = the method's GAN.",
    )

    # Pretraining variants (docs/models.md, "Pretraining variants"); the defaults are the method's plain GAN.
    objective: str = option(
        "gan",
        "gan: the method's GAN (with the variants below); pseudo: no generator, D learns the train clips' normal "
        "windows against pseudo-anomalies made from them (needs --pseudo-anomalies).",
        choices=OBJECTIVES,
    )
    pseudo_anomalies: float = option(
        0.0,
        "Pseudo-anomalous windows (made from the train clips) per real window on D's negative side; 0 = none.",
    )
    pseudo_kinds: str = option(
        DEFAULT_KINDS, f"Comma list of pseudo-anomaly kinds: {', '.join(KINDS)} (docs/models.md)."
    )
    phase2_steps: int = option(
        0,
        "After the GAN steps, train D alone this many steps: real + current generator windows as good, an early "
        "generator snapshot + pseudo-anomalies as bad (OGNet's second phase); 0 = off.",
    )

    def __post_init__(self) -> None:
        if self.preset not in PRESET_NAMES:
            raise UserError(f"--preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "log_every", "similarity_samples", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "keep_checkpoints", "similarity_every", "image_every", "workers"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0 (0 = off), got {getattr(self, name)}")
        self.conv_channels = checked_capacity_options(self.input_pool, self.conv_channels)
        for name in ("lr", "lr_d"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UserError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if not 0.0 <= self.beta1 < 1.0:
            raise UserError(f"--beta1 must be in [0, 1), got {self.beta1}")
        if self.mixed_precision not in (None, *PRECISIONS):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not self.resume:
            raise UserError("--resume must be auto, latest, none or a checkpoint folder")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        if not self.feature_matching >= 0.0:
            raise UserError(f"--feature-matching must be >= 0, got {self.feature_matching}")
        if not self.instance_noise >= 0.0:
            raise UserError(f"--instance-noise must be >= 0, got {self.instance_noise}")
        self._check_variants()

    def _check_variants(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if not (math.isfinite(self.pseudo_anomalies) and self.pseudo_anomalies >= 0.0):
            raise UserError(f"--pseudo-anomalies must be a rate >= 0, got {self.pseudo_anomalies}")
        self.pseudo_kinds = ",".join(parse_kinds(self.pseudo_kinds))
        if self.phase2_steps < 0:
            raise UserError(f"--phase2-steps must be >= 0 (0 = off), got {self.phase2_steps}")
        if self.objective == "pseudo" and not self.pseudo_anomalies > 0:
            raise UserError("--objective pseudo trains D against pseudo-anomalies: give --pseudo-anomalies > 0")
        if self.objective == "pseudo" and self.phase2_steps:
            raise UserError("--phase2-steps needs a generator: use it with --objective gan")

    @property
    def total_steps(self) -> int:
        """Every optimizer step of the run: the GAN (or pseudo-objective) steps, then phase 2's."""
        return self.steps + self.phase2_steps


def hparams_of(cfg: PretrainConfig) -> dict:
    """The hyperparameters a pretrain run is compared by in TensorBoard's HParams dashboard."""
    keys = ("preset", "steps", "batch_size", "lr", "lr_d", "beta1", "seed", "label_smoothing", "instance_noise",
            "feature_matching", "input_mode", "pooling", "topk", "input_pool", "conv_channels", "objective",
            "pseudo_anomalies", "pseudo_kinds", "phase2_steps", "mixed_precision", "shards")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def pretraining_of(cfg: dict) -> dict:
    """The variant a pretrain run's resolved config (``config.json``'s ``config``) describes: what the
    discriminator file records and the report shows. Runs that predate the variants were the plain GAN."""
    return {
        "objective": cfg.get("objective", "gan"),
        "pseudo_anomalies": float(cfg.get("pseudo_anomalies") or 0.0),
        "pseudo_kinds": cfg.get("pseudo_kinds") or DEFAULT_KINDS,
        "phase2_steps": int(cfg.get("phase2_steps") or 0),
    }


def describe_pretraining(cfg: dict) -> str:
    """One line for the report: "the method's plain GAN", or the variant's parts."""
    v = pretraining_of(cfg)
    pseudo = f"pseudo-anomalies {v['pseudo_anomalies']:g} per real window ({v['pseudo_kinds']})"
    if v["objective"] == "pseudo":
        return f"no generator: D learns normal windows vs {pseudo}"
    parts = [pseudo] if v["pseudo_anomalies"] > 0 else []
    parts += [f"phase 2: {v['phase2_steps']} D-only steps (OGNet)"] if v["phase2_steps"] else []
    return "GAN + " + " + ".join(parts) if parts else PLAIN_GAN


def gan_windows(protocol: str, manifest: dict, shards: str) -> str:
    """The window selection the GAN streams: the train clips' windows under the leak-free protocol (so no fold's test
    clip is ever seen), else the method's balanced windows of every clip."""
    if protocol != "leakfree":
        return "kept"
    if not manifest["counts"].get("train_windows"):
        raise UserError(
            f"--protocol leakfree: {shards} has no windows of train clips (normal footage) for the GAN to learn "
            "from; add train clips to the data, or use --protocol window/clip"
        )
    return "train"
