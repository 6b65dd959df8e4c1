"""The GAN generator and the LRCN (discriminator and classifier) and their configs (safetensors I/O:
:mod:`ddp_vad.weights`).

Layouts are tabled in docs/models.md. Windows are ``[B, T, 1, H, W]`` floats in ``[0, 1]``; the generator treats the
T frames as channels. The LRCN is ``features`` (time-distributed conv/pool x3 -> dropout -> LSTM, last step) plus
``head`` (dropout -> dense -> ReLU -> dense 2 logits), two submodules so that transfer can keep one and replace
the other.

As discriminator the LRCN keeps its 2-way head: class 1 means "real", and the real/fake logit is the log-odds
``logits[:, 1] - logits[:, 0]`` (:func:`real_fake_logit`), i.e. exactly the logit of the 2-way softmax. The
classifier later gets a fresh 2-way head on the same features.

Presets (model sizes) are in :mod:`ddp_vad.presets`. ``paper``'s generator starts with a ~110M-parameter Linear
(100 -> 200x60x91), which is GPU work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ddp_vad.errors import UserError
from ddp_vad.motion import MotionPrior
from ddp_vad.presets import PRESET_NAMES, PRESETS
from ddp_vad.warn import warn

GENERATOR_FILE = "generator.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
INPUT_MODES = ("frames", "diff", "both")
POOLINGS = ("flatten", "max", "topk", "cells")


@dataclass
class ModelConfig:
    """Architecture of the generator and the LRCN (window length and frame size come from the shards)."""

    preset: str = "paper"
    window: int = 10
    height: int = 120
    width: int = 182
    z_dim: int = 100
    gen_channels: tuple[int, ...] = (200, 100, 50)  # Linear output channels, then one 3x3 conv per entry after it
    gen_upsample: int = 2  # the Linear makes a ceil(H/u) x ceil(W/u) map, upsampled (nearest) for the convs
    gen_conv_div: int = 1  # generator convs run at ceil(H/d) x ceil(W/d); d > 1 resizes the output to H x W
    input_pool: int = 1  # LRCN average-pools frames by this factor before its conv stack (1 = the method)
    conv_channels: tuple[int, ...] = (16, 16, 16)
    conv_kernels: tuple[int, ...] = (7, 5, 3)
    lstm_hidden: int = 1024
    dense: int = 256
    dropout: float = 0.5
    num_classes: int = 2
    # Fixed input normalisation of the LRCN, (x - mean) / std on [0, 1] frames: a deviation from the method, which
    # feeds [0, 1] frames (docs/models.md). Stored with the weights so every loader applies the same.
    input_mean: float = 0.5
    input_std: float = 0.25
    # Levers against chance-level scores on unseen clips (docs/models.md, "Input modes and pooling"). The defaults
    # are the method: raw frames in, conv maps flattened per frame into the LSTM.
    input_mode: str = "frames"  # frames | diff (|x_t - x_{t-1}|, T-1 steps) | both (frame and diff as 2 channels)
    diff_std: float = 0.05  # abs frame differences are divided by this (Ped1 sample: mean 0.009, std 0.03)
    pooling: str = "flatten"  # flatten | max | topk: how a frame's last conv map becomes the LSTM's input;
    # cells: no spatial pooling, the LSTM and head run per cell of the last conv map and the window's logit is the
    # mean of the topk largest cell logits (multiple-instance style: one small unusual object can decide)
    topk: int = 8  # pooling=topk: mean of the k largest positions per channel; pooling=cells: of the k largest cells
    # The motion prior (ddp_vad.motion): the window's motion energy, standardised on normal footage at calibration,
    # added to the log-odds. Its buffers are part of the weights; False for the method and every discriminator.
    motion_prior: bool = False

    def __post_init__(self) -> None:
        self.gen_channels = tuple(int(c) for c in self.gen_channels)
        self.conv_channels = tuple(int(c) for c in self.conv_channels)
        self.conv_kernels = tuple(int(k) for k in self.conv_kernels)
        for name in (
            "window",
            "height",
            "width",
            "z_dim",
            "gen_upsample",
            "gen_conv_div",
            "input_pool",
            "lstm_hidden",
            "dense",
            "num_classes",
        ):
            if getattr(self, name) < 1:
                raise UserError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.input_mode not in INPUT_MODES:
            raise UserError(f"model config: input_mode must be one of {', '.join(INPUT_MODES)}: {self.input_mode!r}")
        if self.pooling not in POOLINGS:
            raise UserError(f"model config: pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if self.input_mode != "frames" and self.window < 2:
            raise UserError(f"model config: input_mode {self.input_mode} needs windows of >= 2 frames")
        if self.motion_prior and (self.window < 2 or self.num_classes != 2):
            raise UserError(f"model config: motion_prior needs windows of >= 2 frames and 2 classes, got window "
                            f"{self.window}, num_classes {self.num_classes}")  # fmt: skip
        if self.pooling == "cells" and self.num_classes != 2:
            raise UserError(f"model config: pooling cells needs 2 classes, got num_classes={self.num_classes}")
        if self.topk < 1:
            raise UserError(f"model config: topk must be >= 1, got {self.topk}")
        if not self.diff_std > 0:
            raise UserError(f"model config: diff_std must be > 0, got {self.diff_std}")
        if not self.input_std > 0:
            raise UserError(f"model config: input_std must be > 0, got {self.input_std}")
        if not self.gen_channels or min(self.gen_channels) < 1:
            raise UserError(f"model config: gen_channels must be positive, got {self.gen_channels}")
        if len(self.conv_channels) != len(self.conv_kernels) or not self.conv_channels:
            raise UserError(
                f"model config: conv_channels {self.conv_channels} and conv_kernels {self.conv_kernels} "
                "must be non-empty and of equal length"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model config: dropout must be in [0, 1), got {self.dropout}")
        h, w = self.feature_map()
        if h < 1 or w < 1:
            pooled = f" pooled {self.input_pool}x" if self.input_pool > 1 else ""
            less_pooling = ", less --input-pool" if self.input_pool > 1 else ""
            raise UserError(
                f"frames of {self.height}x{self.width}{pooled} are too small for the '{self.preset}' preset's conv "
                f"stack (kernels {self.conv_kernels}); use a smaller preset (tiny){less_pooling} or larger frames"
            )

    @property
    def gen_map(self) -> tuple[int, int]:
        """Spatial size of the generator's first (Linear) feature map."""
        return math.ceil(self.height / self.gen_upsample), math.ceil(self.width / self.gen_upsample)

    @property
    def gen_conv_map(self) -> tuple[int, int]:
        """Spatial size at which the generator's convs run."""
        return math.ceil(self.height / self.gen_conv_div), math.ceil(self.width / self.gen_conv_div)

    def feature_map(self) -> tuple[int, int]:
        """Spatial size after the LRCN's conv(valid)+maxpool(2) stages."""
        h, w = self.height // self.input_pool, self.width // self.input_pool
        for k in self.conv_kernels:
            h, w = (h - k + 1) // 2, (w - k + 1) // 2
        return h, w

    @property
    def frame_features(self) -> int:
        """Length of one frame's conv features (the LSTM's input size): the flattened map, or one value per channel
        when positions are pooled or each cell has its own LSTM sequence (``cells``)."""
        h, w = self.feature_map()
        return self.conv_channels[-1] * (h * w if self.pooling == "flatten" else 1)

    @property
    def in_channels(self) -> int:
        """Channels of one time step at the conv stack's input (2 when ``input_mode`` is ``both``)."""
        return 2 if self.input_mode == "both" else 1

    @property
    def steps(self) -> int:
        """Time steps the LSTM sees: T frames, or T - 1 when differences are taken."""
        return self.window if self.input_mode == "frames" else self.window - 1

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are a UserError (a file from another version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise UserError(f"model config has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


def model_config_for(preset: str, manifest: dict, **overrides) -> ModelConfig:
    """The ``preset`` architecture sized for the shards described by ``manifest`` (window, height, width); keyword
    ``overrides`` (None values ignored) replace preset fields, e.g. ``input_mode="diff"`` from the command line."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (expected one of {', '.join(PRESET_NAMES)})")
    fields = {**PRESETS[preset].model, **{k: v for k, v in overrides.items() if v is not None}}
    asked, kernels = overrides.get("conv_channels"), fields["conv_kernels"]
    if asked is not None and len(asked) != len(kernels):
        raise UserError(
            f"--conv-channels {','.join(map(str, asked))}: the '{preset}' preset has {len(kernels)} conv layers "
            f"(kernels {','.join(map(str, kernels))}); give one channel count per layer"
        )
    cfg = ModelConfig(
        preset=preset,
        window=int(manifest["window"]),
        height=int(manifest["height"]),
        width=int(manifest["width"]),
        **fields,
    )
    check_topk(cfg, overrides.get("topk"))
    return cfg


def check_topk(cfg: ModelConfig, asked: int | None) -> None:
    """Top-k pooling (of positions per channel, or of cells) averages at most the positions of the last conv map: an
    asked ``--topk`` above them is refused,
    and one that does nothing (another pooling) or a preset's default above them is noted."""
    h, w = cfg.feature_map()
    where = f"the '{cfg.preset}' preset's conv stack leaves {h}x{w} = {h * w} position(s) on {cfg.height}x{cfg.width}"
    if asked is not None and cfg.pooling not in ("topk", "cells"):
        warn(f"--topk {asked}: has no effect with pooling {cfg.pooling} (only with --pooling topk or cells)")
    elif cfg.pooling in ("topk", "cells") and cfg.topk > h * w:
        if asked is not None:
            raise UserError(f"--topk {asked}: {where} frames; give --topk {h * w} or less")
        warn(
            f"pooling {cfg.pooling}: the default topk {cfg.topk} is more than {where} frames: all {h * w} are averaged"
        )


# ------------------------------------------------------------------------------------------ generator
class Generator(nn.Module):
    """z [B, z_dim] -> Linear -> C x h x w -> BN, ReLU -> upsample (nearest) -> (conv3x3 + BN + ReLU)* ->
    conv1x1 T (-> bilinear resize to H x W when ``gen_conv_div > 1``) -> sigmoid -> window [B, T, 1, H, W]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c0 = cfg.gen_channels[0]
        h0, w0 = cfg.gen_map
        self.project = nn.Linear(cfg.z_dim, c0 * h0 * w0)
        self.bn0 = nn.BatchNorm2d(c0)
        # Upsampling to an explicit size handles odd frame sizes (a 61-row map becomes exactly 121 rows, no crop);
        # for 120x182 at u=2 it is exactly the method's x2 UpSampling of 60x91.
        self.upsample = nn.Upsample(size=cfg.gen_conv_map, mode="nearest")
        full = (cfg.height, cfg.width)
        self.resize = nn.Identity() if cfg.gen_conv_map == full else nn.Upsample(size=full, mode="bilinear")
        layers: list[nn.Module] = []
        prev = c0
        for c in cfg.gen_channels[1:]:
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            prev = c
        self.body = nn.Sequential(*layers)
        self.to_frames = nn.Conv2d(prev, cfg.window, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h0, w0 = cfg.gen_map
        x = self.project(z).view(z.shape[0], cfg.gen_channels[0], h0, w0)
        x = self.upsample(torch.relu(self.bn0(x)))
        x = torch.sigmoid(self.resize(self.to_frames(self.body(x))))
        return x.unsqueeze(2)  # [B, T, H, W] -> [B, T, 1, H, W]


# --------------------------------------------------------------------------------------------- LRCN
class FeatureExtractor(nn.Module):
    """Time-distributed conv(valid)+ReLU+maxpool2 stages -> dropout -> LSTM; returns the last step [B, hidden].

    The LSTM runs in fp32 with autocast disabled: autocast would cast it to fp16 even under bf16 (docs/models.md).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.AvgPool2d(cfg.input_pool)] if cfg.input_pool > 1 else []
        prev = cfg.in_channels
        for c, k in zip(cfg.conv_channels, cfg.conv_kernels, strict=True):
            layers += [nn.Conv2d(prev, c, k), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            prev = c
        self.convs = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.frame_features, cfg.lstm_hidden, batch_first=True)
        self.out_features = cfg.lstm_hidden
        self.input_mean, self.input_std = cfg.input_mean, cfg.input_std
        self.input_mode, self.diff_std = cfg.input_mode, cfg.diff_std
        self.pooling, self.topk = cfg.pooling, cfg.topk

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed (parameter-free) input stem: [B, T, 1, H, W] in [0, 1] -> [B, T', C, H, W] for the convs.

        ``frames``: centred frames (T' = T). ``diff``: ``|x_t - x_{t-1}| / diff_std`` (T' = T - 1): the motion the
        conv stack never sees when it looks at one frame at a time. ``both``: frame t and that difference as two
        channels (T' = T - 1). Differences are taken at full resolution, before ``input_pool``, so pooling
        averages local motion energy instead of blurring the frames first.
        """
        # Centre and scale [0, 1] frames (no parameters): on raw [0, 1] input an LRCN trained from scratch stays
        # at chance (loss 0.693 for epochs on the demo data); centred input trains.
        if self.input_mode == "frames":
            return (x - self.input_mean) / self.input_std
        diff = (x[:, 1:] - x[:, :-1]).abs() / self.diff_std
        if self.input_mode == "diff":
            return diff
        return torch.cat([(x[:, 1:] - self.input_mean) / self.input_std, diff], dim=2)

    def frame_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, 1, H, W] -> per-step conv features [B, T', F] (flattened maps, or pooled per channel); with
        ``cells`` pooling [B, T', C, n], one C-vector per cell of the last conv map (n = h * w)."""
        x = self.stem(x)
        b, t = x.shape[:2]
        y = self.convs(x.reshape(b * t, *x.shape[2:]))
        if self.pooling == "max":  # local evidence: the strongest position per channel, wherever it is
            y = y.amax(dim=(2, 3))
        elif self.pooling == "topk":  # the mean of the k strongest positions: as local, less noisy than one max
            flat = y.flatten(2)
            y = flat.topk(min(self.topk, flat.shape[2]), dim=2).values.mean(dim=2)
        elif self.pooling == "cells":
            return y.reshape(b, t, y.shape[1], -1)
        return y.reshape(b, t, -1)

    def temporal(self, y: torch.Tensor) -> torch.Tensor:
        """Per-step conv features [B, T', F] -> dropout -> LSTM (fp32, autocast off) -> last step [B, hidden].
        Per cell ([B, T', C, n], ``cells`` pooling): one LSTM sequence per cell (shared weights) -> [B, n, hidden]."""
        y = self.dropout(y)
        cells = y.dim() == 4
        if cells:
            b, t, c, n = y.shape
            y = y.permute(0, 3, 1, 2).reshape(b * n, t, c)
        with torch.autocast(device_type=y.device.type, enabled=False):
            out, _ = self.lstm(y.float())
        last = out[:, -1]
        return last.reshape(b, n, -1) if cells else last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.temporal(self.frame_features(x))


class Head(nn.Module):
    """Dropout -> Dense(dense) + ReLU -> Dense(num_classes) logits.

    On per-cell features [B, n, F] (``cells`` pooling) the same layers score every cell, and the window's log-odds
    is the mean of the ``topk`` largest cell log-odds ``l1 - l0``; it returns ``[-d/2, d/2]``, whose softmax is
    ``sigmoid(d)`` and whose :func:`real_fake_logit` is ``d``.
    """

    def __init__(self, in_features: int, dense: int, num_classes: int = 2, dropout: float = 0.5, topk: int = 1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(in_features, dense), nn.ReLU(inplace=True), nn.Linear(dense, num_classes)
        )
        self.topk = topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        if logits.dim() == 2:
            return logits
        d = logits[..., 1] - logits[..., 0]  # [B, n] per-cell log-odds
        d = d.topk(min(self.topk, d.shape[1]), dim=1).values.mean(dim=1)
        return torch.stack([-d / 2, d / 2], dim=1)


class LRCN(nn.Module):
    """``features`` (CNN + LSTM) followed by ``head``; input [B, T, 1, H, W] in [0, 1], output logits [B, 2]. With
    ``motion_prior`` the window's standardised motion energy is added to the log-odds (:class:`MotionPrior`; zero
    until calibration sets it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.features = FeatureExtractor(cfg)
        self.head = Head(cfg.lstm_hidden, cfg.dense, cfg.num_classes, cfg.dropout, cfg.topk)
        self.prior = MotionPrior() if cfg.motion_prior else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        # Training never sees the prior (calibration sets it after training; until then it adds 0): skip its cost.
        return logits if self.prior is None or self.training else self.prior(x, logits)


def real_fake_logit(logits: torch.Tensor) -> torch.Tensor:
    """Discriminator logit (real = class 1) from the LRCN's 2-way logits: log p(real) - log p(fake)."""
    return logits[:, 1] - logits[:, 0]


def build_generator(cfg: ModelConfig) -> Generator:
    """A freshly initialised generator for ``cfg``."""
    return Generator(cfg)


def build_lrcn(cfg: ModelConfig) -> LRCN:
    """A freshly initialised LRCN (discriminator or classifier) for ``cfg``."""
    return LRCN(cfg)


def count_parameters(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())
