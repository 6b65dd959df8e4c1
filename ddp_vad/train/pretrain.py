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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ddp_vad.architecture_options import architecture_overrides
from ddp_vad.data.reader import frames_to_float, infinite_batches
from ddp_vad.data.shards import load_manifest
from ddp_vad.data.stream import shards_holding
from ddp_vad.errors import NonFiniteLossError, UserError
from ddp_vad.models import ModelConfig, build_generator, build_lrcn, model_config_for
from ddp_vad.train.checkpoint import remove_partial, resolve_resume, save_checkpoint
from ddp_vad.train.disc_phase import PseudoSource, disc_step, early_step, keep_early, load_early, phase2_windows
from ddp_vad.train.distributed import (
    check_process_group,
    check_shard_count,
    decide_on_main,
    main_lock,
    make_accelerator,
    object_group,
    print_main,
    raise_agreed,
    seed_everything,
)
from ddp_vad.train.gan import gan_step
from ddp_vad.train.gan_monitor import GanMonitor
from ddp_vad.train.pretrain_config import PretrainConfig, gan_windows, hparams_of, pretraining_of
from ddp_vad.train.pretrain_state import export_weights, resume_state, train_state, write_config

__all__ = ["PretrainConfig", "gan_windows", "hparams_of", "run_pretrain"]  # the config's names, re-exported

DEBUG_ENV = "DDP_VAD_DEBUG_KEYS"


# ------------------------------------------------------------------------------------------ the run
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


@dataclass
class _Variants:
    """What the pretraining variants add to a run: its pseudo-anomaly source, the unwrapped generator and, for
    phase 2, the early generator snapshot (None until taken)."""

    source: PseudoSource | None
    gen: torch.nn.Module
    early: torch.nn.Module | None = None


def _variants(cfg: PretrainConfig, accelerator, gen, model_cfg: ModelConfig, start_step: int) -> _Variants:
    source = None
    if cfg.pseudo_anomalies > 0:
        source = PseudoSource(cfg.shards, cfg.pseudo_anomalies, cfg.pseudo_kinds, model_cfg.window, cfg.seed,
                              accelerator.process_index)  # fmt: skip
    variants = _Variants(source, gen)
    if cfg.phase2_steps and cfg.objective == "gan" and start_step >= early_step(cfg.steps):  # a resumed run
        variants.early = load_early(Path(cfg.out), accelerator.device)
    return variants


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
    model_cfg = model_config_for(cfg.preset, manifest, **architecture_overrides(cfg))
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
        start_step, epoch, skip, health = resume_state(accelerator, resume_from, model_cfg, cfg.preset)
    else:
        seed_everything(cfg.seed, rank=rank)  # each rank draws its own noise and dropout masks
    if is_main:
        write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=start_step)
    batches = infinite_batches(
        cfg.shards, cfg.batch_size, seed=cfg.seed, start_epoch=epoch, skip_samples=skip, rank=rank, world_size=world,
        workers=cfg.workers, cache=cfg.cache, shuffle_buffer=cfg.shuffle_buffer,
        pin_memory=accelerator.device.type == "cuda",  # the batches are copied with non_blocking=True
        select=select,
    )  # fmt: skip
    monitor = None
    if is_main:
        monitor = GanMonitor(run_dir, cfg, manifest, model_cfg.z_dim, accelerator.device, start_step, health, select)
    try:
        step = _loop(cfg, accelerator, gan, batches, monitor, model_cfg, start_step, resume_from, debug_keys)
    finally:
        if monitor is not None:
            monitor.close()
    export_weights(accelerator, gan.gen, gan.disc, run_dir, model_cfg, debug_keys, pretraining_of(asdict(cfg)))
    if is_main:
        write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=step)
    accelerator.wait_for_everyone()
    print_main(is_main, f"pretrain done: {step} steps; weights in {run_dir}")
    return run_dir


def _is_gan_step(cfg: PretrainConfig, step: int) -> bool:
    """Whether step ``step`` (from 0) is a GAN step (not phase 2, not the pseudo objective's D-only step)."""
    return cfg.objective == "gan" and step < cfg.steps


def _gan_until(cfg: PretrainConfig) -> int:
    """The last GAN step (from 1): GAN health watches those only (D is meant to win its D-only steps)."""
    return cfg.steps if cfg.objective == "gan" else 0


def _step(cfg: PretrainConfig, accelerator, gan: _Gan, variants: _Variants, real, step: int, model_cfg) -> torch.Tensor:
    """Optimizer step ``step`` (from 0) on ``real`` windows: the GAN step (pseudo-anomalies join D's negatives at
    --pseudo-anomalies), D alone against pseudo-anomalies (--objective pseudo), or phase 2 after the GAN steps.
    Returns the ``STAT_NAMES`` row."""
    pseudo = None if variants.source is None else variants.source.windows(step, len(real), real.device)
    if cfg.objective == "pseudo":
        return disc_step(accelerator, gan.disc, gan.opt_d, real, pseudo)
    if step >= cfg.steps:
        good, bad = phase2_windows(variants.gen, variants.early, real, model_cfg.z_dim, pseudo)
        return disc_step(accelerator, gan.disc, gan.opt_d, good, bad)
    noise = cfg.instance_noise * (1.0 - step / cfg.steps)  # annealed linearly to 0
    return gan_step(accelerator, gan.gen, gan.disc, gan.opt_g, gan.opt_d, real, model_cfg.z_dim,
                    cfg.label_smoothing, noise, cfg.feature_matching, pseudo)  # fmt: skip


def _loop(cfg, accelerator, gan: _Gan, batches, monitor, model_cfg, start_step, last_ckpt, debug_keys) -> int:
    """Steps ``start_step + 1 .. cfg.total_steps``: one step (:func:`_step`), then every ``log_every`` steps one
    reduce of the stats (the NaN check, logging), similarity and images on the main process, checkpoints. Returns
    the last step."""
    is_main, world = accelerator.is_main_process, accelerator.num_processes
    ckpt_dir, group = Path(cfg.out) / "checkpoints", object_group(world)
    unwrapped_gen = accelerator.unwrap_model(gan.gen)
    variants = _variants(cfg, accelerator, unwrapped_gen, model_cfg, start_step)
    skipped, stats, step = {"d": 0, "g": 0}, [], start_step
    data_error: str | None = None  # this rank's stream gave no batch: agreed by all ranks at the next log step
    batch = None
    total = cfg.total_steps
    pbar = tqdm(total=total, initial=min(start_step, total), desc="pretrain", unit="step",
                disable=not (is_main and cfg.progress), dynamic_ncols=True)  # fmt: skip
    if is_main and start_step == 0 and cfg.similarity_every and _gan_until(cfg):
        monitor.similarity(unwrapped_gen, 0)
    t_last, steps_last = time.perf_counter(), step
    while step < total:
        batch, data_error = _next_batch(batches, batch, data_error, cfg.batch_size, model_cfg)
        if debug_keys is not None:
            debug_keys.extend(f"{e} {k}" for e, k in zip(batch.get("epoch", []), batch["key"], strict=False))
        real = frames_to_float(batch["frames"].to(accelerator.device, non_blocking=True))
        stats.append(_step(cfg, accelerator, gan, variants, real, step, model_cfg))
        if accelerator.scaler is not None:
            skipped["d"] += int(gan.opt_d.step_was_skipped)
            skipped["g"] += int(gan.opt_g.step_was_skipped) if _is_gan_step(cfg, step) else 0
        step += 1
        pbar.update(1)
        if cfg.phase2_steps and _is_gan_step(cfg, step - 1) and step == early_step(cfg.steps):
            variants.early = keep_early(unwrapped_gen, Path(cfg.out), model_cfg, is_main)
        do_ckpt = step == total or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
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
                monitor.progress(rows, first, step, rate, (gan.opt_g, gan.opt_d), amp, _gan_until(cfg))
                pbar.set_postfix(loss_d=f"{rows[-1, 0]:.3f}", loss_g=f"{rows[-1, 1]:.3f}", sps=f"{rate:.1f}")
            t_last, steps_last = now, step
        if is_main and cfg.similarity_every and step % cfg.similarity_every == 0 and step <= _gan_until(cfg):
            monitor.similarity(unwrapped_gen, step)
        if is_main and cfg.image_every and (step % cfg.image_every == 0 or step == total):
            monitor.image(unwrapped_gen, step)
        if do_ckpt:
            state = train_state(accelerator, batches, model_cfg, cfg, monitor)
            last_ckpt = save_checkpoint(accelerator, ckpt_dir, step, state, cfg.keep_checkpoints)
            if is_main:
                monitor.writer.flush()
    pbar.close()
    if is_main:
        monitor.write_health()
        monitor.hparams(hparams_of(cfg), step)
    return step
