"""GAN pretraining under Accelerate: the generator makes 10-frame windows, the LRCN discriminator tells real from fake.

One code path for one CPU process, one GPU, several GPUs and several nodes (``accelerate launch``/``torchrun``):

- G and D are prepared separately (two DDP wrappers); one step is :func:`ddp_vad.train.gan.gan_step` (D step, then
  G step through the updated D). The main process watches the run (:mod:`ddp_vad.train.gan_monitor`).
- Mixed precision comes from accelerate (``--mixed-precision`` overrides it); the LSTM runs in fp32 (models.py);
  fp16 uses accelerate's single GradScaler, skipped steps are counted and logged.
- Data: each rank streams its own shards (``infinite_batches``), never through ``accelerator.prepare``; batches are
  moved to the device here. The stream position (epoch, windows taken) of every rank is checkpointed, so a resumed
  run sees exactly the batches an uninterrupted run would have seen. The stream wraps around its epochs, so every
  batch is full even where a rank's share of an epoch is smaller than a batch.
- Checkpoints: ``checkpoint.save_checkpoint`` (atomic folders, retention). Resume restores weights, optimizer,
  RNG states and data positions: on CPU, N steps + resume + N steps == 2N steps, bit for bit.
- Losses are reduced across ranks every ``log_every`` steps (one small all-reduce, no per-step host sync); a
  non-finite loss stops every rank with a message naming the step, before any checkpoint of the bad state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddp_vad.config import write_resolved_config
from ddp_vad.data.reader import frames_to_float, infinite_batches
from ddp_vad.data.shards import load_manifest
from ddp_vad.data.stream import shards_holding
from ddp_vad.errors import NonFiniteLossError, UserError, error_message
from ddp_vad.models import (
    DISCRIMINATOR_FILE,
    GENERATOR_FILE,
    INPUT_MODES,
    POOLINGS,
    ModelConfig,
    build_generator,
    build_lrcn,
    model_config_for,
    save_model,
)
from ddp_vad.options import option
from ddp_vad.presets import PRESET_NAMES
from ddp_vad.train.checkpoint import read_train_state, remove_partial, resolve_resume, save_checkpoint
from ddp_vad.train.crossval import PROTOCOLS
from ddp_vad.train.distributed import (
    PRECISIONS,
    broadcast_buffers,
    check_process_group,
    check_shard_count,
    decide_on_main,
    main_lock,
    make_accelerator,
    object_group,
    print_main,
    raise_agreed,
    seed_everything,
    state_dict_sha256,
)
from ddp_vad.train.gan import gan_step
from ddp_vad.train.gan_monitor import GanMonitor

DEBUG_ENV = "DDP_VAD_DEBUG_KEYS"


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
    feature_matching: float = option(
        0.0,
        "Add this weight x feature-matching loss (D's features, real vs generated batch means) to G's loss; "
        "0 = the method's GAN.",
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


# ------------------------------------------------------------------------------------------ the run
def _resume(accelerator, resume_from: Path, model_cfg: ModelConfig, preset: str) -> tuple[int, int, int, dict]:
    """Load a checkpoint into the prepared objects; returns (step, data epoch, windows to skip) for this rank and
    the GAN-health state."""
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    state = read_train_state(resume_from)
    if state.get("model") != model_cfg.to_dict():
        made = state.get("model", {})
        raise UserError(
            f"checkpoint {resume_from} was made for another model ({made.get('preset')}, frames "
            f"{made.get('height')}x{made.get('width')}); this run asks for preset {preset} on "
            f"{model_cfg.height}x{model_cfg.width}"
        )
    error = None
    try:
        accelerator.load_state(str(resume_from))  # weights, optimizers, scaler, this rank's RNG states
    except Exception as exc:  # noqa: BLE001 - a file damaged after it was checked, or missing on this node
        error = f"cannot load checkpoint {resume_from} on process {rank}: {error_message(exc)}"
    raise_agreed(error, object_group(world), world)  # no rank goes on alone with half-loaded state
    step = int(state["step"])
    positions = state.get("data") or [[0, 0]]
    if int(state.get("world_size", 0)) == world and len(positions) == world:
        epoch, skip = (int(v) for v in positions[rank])
        if state.get("data_unit") != "windows":  # older checkpoints counted full batches taken from the epoch
            skip *= int(state.get("batch_size") or 0)
    else:  # the data position of another process count cannot be mapped: start the next epoch afresh
        epoch, skip = max(int(p[0]) for p in positions) + 1, 0
        print_main(
            is_main,
            f"note: checkpoint was made with {state.get('world_size')} processes, now {world}: "
            f"the data stream restarts at epoch {epoch}",
        )
    print_main(is_main, f"resuming from {resume_from} (step {step})")
    return step, epoch, skip, state.get("health") or {}


def _next_batch(batches, last: dict | None, error: str | None, batch_size: int, model_cfg: ModelConfig):
    """The next batch and this rank's data error. A rank whose stream fails keeps stepping on its last batch (or
    zeros) so that its peers are not left alone in a collective; every rank stops at the next log step."""
    if error is None:
        try:
            with torch.random.fork_rng(devices=[]):  # a new epoch's DataLoader draws from the CPU RNG: isolate it
                return next(batches), None
        except UserError as exc:
            error = str(exc)
    if last is None:
        shape = (batch_size, model_cfg.window, model_cfg.height, model_cfg.width)
        last = {"frames": torch.zeros(shape, dtype=torch.uint8), "key": []}
    return last, error


def _agree_on_data(accelerator, error: str | None, group) -> None:
    """Stop every rank, with the failing rank's message, when any rank's data stream failed (one small reduce)."""
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0:
        raise_agreed(error, group, accelerator.num_processes)


def _check_finite(rows: np.ndarray, first: int, last_ckpt: Path | None) -> None:
    bad = np.flatnonzero(~np.isfinite(rows[:, :2]).all(axis=1))
    if len(bad):
        s, (ld, lg) = first + int(bad[0]), rows[bad[0], :2]
        where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite loss at step {s} (loss/d={ld}, loss/g={lg}); stopped without saving; {where}. "
            "Lower --lr or use --mixed-precision no/bf16, then --resume auto"
        )


def _train_state(accelerator, batches, model_cfg: ModelConfig, cfg: PretrainConfig, monitor) -> dict:
    """What a checkpoint adds to accelerate's state: every rank's data-stream position, the model config and the
    GAN-health counts (the main process writes the state)."""
    pos = accelerator.gather(torch.tensor([[batches.epoch, batches.index]], device=accelerator.device)).cpu()
    return {
        "data": pos.tolist(),
        "data_unit": "windows",  # positions are (epoch, windows taken from it): the stream wraps around epochs
        "world_size": accelerator.num_processes,
        "model": model_cfg.to_dict(),
        "seed": cfg.seed,
        "batch_size": cfg.batch_size,
        "health": monitor.health.summary() if monitor is not None else None,
    }


def hparams_of(cfg: PretrainConfig) -> dict:
    """The hyperparameters a pretrain run is compared by in TensorBoard's HParams dashboard."""
    keys = ("preset", "steps", "batch_size", "lr", "lr_d", "beta1", "seed", "label_smoothing", "instance_noise",
            "feature_matching", "input_mode", "pooling", "topk",
            "mixed_precision", "shards")  # fmt: skip
    return {k: getattr(cfg, k) for k in keys}


def _export(accelerator, gen, disc, run_dir: Path, model_cfg: ModelConfig, debug_keys: list[str] | None) -> None:
    g_mod, d_mod = accelerator.unwrap_model(gen), accelerator.unwrap_model(disc)
    broadcast_buffers(g_mod)  # every replica now holds exactly the exported weights (rank 0's BN statistics)
    if accelerator.is_main_process:
        save_model(g_mod, run_dir / GENERATOR_FILE, model_cfg, kind="generator")
        save_model(d_mod, run_dir / DISCRIMINATOR_FILE, model_cfg, kind="discriminator")
    if debug_keys is not None:  # test/debug aid: what this rank read ("epoch key" lines) and its weights' hash
        dbg, rank = run_dir / "debug", accelerator.process_index
        dbg.mkdir(parents=True, exist_ok=True)
        with (dbg / f"keys_rank{rank}.txt").open("a") as f:
            f.writelines(k + "\n" for k in debug_keys)
        (dbg / f"weights_rank{rank}.txt").write_text(
            f"generator {state_dict_sha256(g_mod)}\ndiscriminator {state_dict_sha256(d_mod)}\n"
        )


def run_pretrain(cfg: PretrainConfig) -> Path:
    """Train the GAN described by ``cfg``; returns the run folder."""
    manifest = load_manifest(cfg.shards)
    accelerator = make_accelerator(cfg.mixed_precision, project_dir=cfg.out)
    check_process_group(accelerator.num_processes)
    world = accelerator.num_processes
    with main_lock(cfg.out, "pretrain", accelerator.is_main_process, object_group(world), world):
        return _train(cfg, accelerator, manifest)


@dataclass
class _Gan:
    """The prepared (DDP-wrapped) models and optimizers of one run."""

    gen: torch.nn.Module
    disc: torch.nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer


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


def _build(cfg: PretrainConfig, accelerator, model_cfg: ModelConfig) -> _Gan:
    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    gen, disc = build_generator(model_cfg), build_lrcn(model_cfg)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d or cfg.lr, betas=(cfg.beta1, 0.999))
    return _Gan(*accelerator.prepare(gen, disc, opt_g, opt_d))


def _train(cfg: PretrainConfig, accelerator, manifest: dict) -> Path:
    """The run itself, under the run folder's lock: set up (or resume), loop, export."""
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    group = object_group(world)
    model_cfg = model_config_for(cfg.preset, manifest, input_mode=cfg.input_mode, pooling=cfg.pooling, topk=cfg.topk)
    select = gan_windows(cfg.protocol, manifest, cfg.shards)
    check_shard_count(len(shards_holding(cfg.shards, manifest, select)), world, cfg.workers, is_main)
    # Decided by the main process for all: nodes without a shared filesystem would each see their own checkpoints.
    resume_from = decide_on_main(lambda: resolve_resume(cfg.resume, ckpt_dir), is_main, group, world)
    debug_keys = [] if cfg.debug_keys or os.environ.get(DEBUG_ENV, "") not in ("", "0") else None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(ckpt_dir)
    accelerator.wait_for_everyone()

    gan = _build(cfg, accelerator, model_cfg)
    start_step, epoch, skip, health = 0, 0, 0, {}
    if resume_from is not None:
        start_step, epoch, skip, health = _resume(accelerator, resume_from, model_cfg, cfg.preset)
    else:
        seed_everything(cfg.seed, rank=rank)  # each rank draws its own noise and dropout masks
    if is_main:
        _write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=start_step)
    batches = infinite_batches(
        cfg.shards, cfg.batch_size, seed=cfg.seed, start_epoch=epoch, skip_samples=skip, rank=rank, world_size=world,
        workers=cfg.workers, cache=cfg.cache, shuffle_buffer=cfg.shuffle_buffer,
        pin_memory=accelerator.device.type == "cuda",  # the batches are copied with non_blocking=True
        select=select,
    )  # fmt: skip
    monitor = None
    if is_main:
        monitor = GanMonitor(run_dir, cfg, manifest, model_cfg.z_dim, accelerator.device, start_step, health)
    try:
        step = _loop(cfg, accelerator, gan, batches, monitor, model_cfg, start_step, resume_from, debug_keys)
    finally:
        if monitor is not None:
            monitor.close()
    _export(accelerator, gan.gen, gan.disc, run_dir, model_cfg, debug_keys)
    if is_main:
        _write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=step)
    accelerator.wait_for_everyone()
    print_main(is_main, f"pretrain done: {step} steps; weights in {run_dir}")
    return run_dir


def _loop(cfg, accelerator, gan: _Gan, batches, monitor, model_cfg, start_step, last_ckpt, debug_keys) -> int:
    """Steps ``start_step + 1 .. cfg.steps``: GAN step, then every ``log_every`` steps one reduce of the stats (the
    NaN check, logging), similarity and images on the main process, checkpoints. Returns the last step."""
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    ckpt_dir, group = Path(cfg.out) / "checkpoints", object_group(world)
    unwrapped_gen = accelerator.unwrap_model(gan.gen)
    skipped, stats, step = {"d": 0, "g": 0}, [], start_step
    data_error: str | None = None  # this rank's stream gave no batch: agreed by all ranks at the next log step
    batch = None
    pbar = tqdm(total=cfg.steps, initial=min(start_step, cfg.steps), desc="pretrain", unit="step",
                disable=not (is_main and cfg.progress), dynamic_ncols=True)  # fmt: skip
    if is_main and start_step == 0 and cfg.similarity_every:
        monitor.similarity(unwrapped_gen, 0)
    t_last, steps_last = time.perf_counter(), step
    while step < cfg.steps:
        batch, data_error = _next_batch(batches, batch, data_error, cfg.batch_size, model_cfg)
        if debug_keys is not None:
            debug_keys.extend(f"{e} {k}" for e, k in zip(batch.get("epoch", []), batch["key"], strict=False))
        real = frames_to_float(batch["frames"].to(accelerator.device, non_blocking=True))
        noise = cfg.instance_noise * (1.0 - step / cfg.steps)  # annealed linearly to 0
        stats.append(gan_step(accelerator, gan.gen, gan.disc, gan.opt_g, gan.opt_d, real, model_cfg.z_dim,
                              cfg.label_smoothing, noise, cfg.feature_matching))  # fmt: skip
        if accelerator.scaler is not None:
            skipped["d"] += int(gan.opt_d.step_was_skipped)
            skipped["g"] += int(gan.opt_g.step_was_skipped)
        step += 1
        pbar.update(1)
        do_ckpt = step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
        if do_ckpt or step % cfg.log_every == 0:
            # One small all-reduce every log_every steps: no per-step host sync.
            _agree_on_data(accelerator, data_error, group)
            rows = accelerator.reduce(torch.stack(stats), reduction="mean").cpu().double().numpy()
            first, now = step - len(stats) + 1, time.perf_counter()
            stats.clear()
            _check_finite(rows, first, last_ckpt)
            if is_main:
                rate = (step - steps_last) * cfg.batch_size * world / max(now - t_last, 1e-9)
                amp = skipped if accelerator.scaler is not None else None  # fp16 only
                monitor.progress(rows, first, step, rate, (gan.opt_g, gan.opt_d), amp)
                pbar.set_postfix(loss_d=f"{rows[-1, 0]:.3f}", loss_g=f"{rows[-1, 1]:.3f}", sps=f"{rate:.1f}")
            t_last, steps_last = now, step
        if is_main and cfg.similarity_every and step % cfg.similarity_every == 0:
            monitor.similarity(unwrapped_gen, step)
        if is_main and cfg.image_every and (step % cfg.image_every == 0 or step == cfg.steps):
            monitor.image(unwrapped_gen, step)
        if do_ckpt:
            state = _train_state(accelerator, batches, model_cfg, cfg, monitor)
            last_ckpt = save_checkpoint(accelerator, ckpt_dir, step, state, cfg.keep_checkpoints)
            if is_main:
                monitor.writer.flush()
    pbar.close()
    if is_main:
        monitor.write_health()
        monitor.hparams(hparams_of(cfg), step)
    return step


def _write_config(
    run_dir: Path, cfg: PretrainConfig, model_cfg: ModelConfig, manifest: dict, accelerator, step: int
) -> None:
    keep = ("dataset", "window", "stride", "height", "width", "seed", "folds", "counts")
    write_resolved_config(
        run_dir,
        cfg,
        extra={
            "model": model_cfg.to_dict(),
            "manifest": {"path": str(Path(cfg.shards).resolve()), **{k: manifest.get(k) for k in keep}},
            "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "steps_done": step,
        },
    )
