"""GAN pretraining under Accelerate: the generator makes 10-frame windows, the LRCN discriminator tells real from fake.

One code path for one CPU process, one GPU, several GPUs and several nodes (``accelerate launch``/``torchrun``):

- G and D are prepared separately (two DDP wrappers). Each step: D step on real vs detached fake windows
  (BCE-with-logits on the LRCN's real/fake logit), then the G step through the *updated* D with the
  non-saturating loss. D is frozen with ``requires_grad_(False)`` (never ``eval()``: cuDNN LSTM backward needs train
  mode) and called under ``no_sync`` (its gradients are not wanted, so DDP must not wait for them).
- Mixed precision comes from accelerate (``--mixed-precision`` overrides it); the LSTM runs in fp32 (models.py);
  fp16 uses accelerate's single GradScaler, skipped steps are counted and logged.
- Data: each rank streams its own shards (``infinite_batches``), never through ``accelerator.prepare``; batches are
  moved to the device here. The stream position (epoch, batches taken) of every rank is checkpointed, so a resumed
  run sees exactly the batches an uninterrupted run would have seen.
- Checkpoints: ``checkpoint.save_checkpoint`` (atomic folders, retention). Resume restores weights, optimizer,
  RNG states and data positions: on CPU, N steps + resume + N steps == 2N steps, bit for bit.
- Losses are reduced across ranks every ``log_every`` steps (one small all-reduce, no per-step host sync); a
  non-finite loss stops every rank with a message naming the step, before any checkpoint of the bad state.
"""

from __future__ import annotations

import csv
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddp_vad.config import write_resolved_config
from ddp_vad.data.reader import frames_to_float, infinite_batches, load_window_set
from ddp_vad.data.shards import load_manifest
from ddp_vad.errors import UserError
from ddp_vad.files import write_text_atomic
from ddp_vad.models import (
    DISCRIMINATOR_FILE,
    GENERATOR_FILE,
    PRESETS,
    ModelConfig,
    build_generator,
    build_lrcn,
    model_config_for,
    real_fake_logit,
    save_model,
)
from ddp_vad.train.checkpoint import list_checkpoints, read_train_state, remove_partial, resolve_resume, save_checkpoint
from ddp_vad.train.distributed import (
    broadcast_buffers,
    check_process_group,
    check_shard_count,
    make_accelerator,
    print_main,
    seed_everything,
    state_dict_sha256,
)

SIMILARITY_CSV = "similarity.csv"
DEBUG_ENV = "DDP_VAD_DEBUG_KEYS"
_REAL_POOL = 256  # real windows kept (main process) for similarity and images, chosen once (seeded)
_IMAGE_ROWS = 4


class NonFiniteLossError(UserError):
    """A loss became NaN/inf; the run stopped without checkpointing the bad state."""


@dataclass
class PretrainConfig:
    """Options of ``ddp_vad pretrain`` (names match the CLI flags). ``batch_size`` is per process."""

    shards: str
    out: str
    preset: str = "paper"
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-4
    lr_d: float | None = None
    beta1: float = 0.5
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    similarity_every: int = 100
    similarity_samples: int = 30
    image_every: int = 500
    log_every: int = 10
    resume: str = "auto"
    seed: int = 0
    workers: int = 1
    shuffle_buffer: int = 1000
    cache: bool = False
    mixed_precision: str | None = None
    debug_keys: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        for name in ("steps", "batch_size", "log_every", "similarity_samples"):
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
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise UserError(f"--mixed-precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if not self.resume:
            raise UserError("--resume must be auto, latest, none or a checkpoint folder")


# ------------------------------------------------------------------------------------------ helpers
def window_similarity(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity and mean L2 distance between paired windows (flattened), as in the method."""
    f = fake.detach().flatten(1).double().cpu()
    r = real.detach().flatten(1).double().cpu()
    return F.cosine_similarity(f, r, dim=1).mean().item(), (f - r).norm(dim=1).mean().item()


def sample_real_windows(shard_dir: str | Path, manifest: dict, n: int, seed: int) -> np.ndarray:
    """``n`` real windows (uint8 [n, T, H, W]) drawn uniformly (seeded) from the whole shard set; reads only the
    shards that hold them (a damaged shard is reported and skipped, like in the training stream)."""
    return load_window_set(shard_dir, n=n, seed=[seed, 7], on_damage="skip").frames


def _seeded_cpu_generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def generate_windows(generator: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Windows from an unwrapped generator in eval mode (BN running statistics; training state untouched)."""
    was_training = generator.training
    generator.eval()
    try:
        return generator(z).float()
    finally:
        generator.train(was_training)


def windows_image(real: torch.Tensor, fake: torch.Tensor, gap: int = 2) -> np.ndarray:
    """Grayscale grid [1, H', W'] in [0, 1]: one window per row (frames left to right), real rows above fake ones."""
    rows = [*real, *fake]  # each [T, 1, H, W]
    t, _, h, w = rows[0].shape
    img = np.ones((len(rows) * (h + gap) + gap * 3, t * (w + gap)), np.float32)
    for r, window in enumerate(rows):
        y = r * (h + gap) + (gap * 3 if r >= len(real) else 0)  # a wider gap between real and fake
        for k in range(t):
            img[y : y + h, k * (w + gap) : k * (w + gap) + w] = window[k, 0].detach().float().cpu().numpy()
    return img[None]


def _read_similarity_rows(path: Path, up_to_step: int) -> list[list[str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= up_to_step]


def _write_similarity_rows(path: Path, rows: list[list]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["step", "cosine", "l2"])
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def _gan_step(accelerator, gen, disc, opt_g, opt_d, real: torch.Tensor, z_dim: int) -> torch.Tensor:
    """One D step then one G step; returns detached [loss_d, loss_g, mean p(real|real), mean p(real|fake)]."""
    b = real.shape[0]
    ones = torch.ones(b, device=real.device)
    zeros = torch.zeros(b, device=real.device)
    fake = gen(torch.randn(b, z_dim, device=real.device))

    # D step: real -> 1, fake -> 0; one forward over both halves (D has no batch norm, so this equals two calls).
    logit = real_fake_logit(disc(torch.cat([real, fake.detach()]))).float()
    loss_d = F.binary_cross_entropy_with_logits(logit, torch.cat([ones, zeros]))
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    opt_d.step()

    # G step through the updated D, non-saturating loss -log D(G(z)). D frozen (not eval) and out of DDP sync.
    disc.requires_grad_(False)
    try:
        with accelerator.no_sync(disc):
            loss_g = F.binary_cross_entropy_with_logits(real_fake_logit(disc(fake)).float(), ones)
            opt_g.zero_grad(set_to_none=True)
            accelerator.backward(loss_g)
            opt_g.step()
    finally:
        disc.requires_grad_(True)
    probs = torch.sigmoid(logit.detach())
    return torch.stack([loss_d.detach(), loss_g.detach(), probs[:b].mean(), probs[b:].mean()])


# ------------------------------------------------------------------------------------------ the run
def run_pretrain(cfg: PretrainConfig) -> Path:
    """Train the GAN described by ``cfg``; returns the run folder (see DESIGN.md section 3 for its layout)."""
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"
    manifest = load_manifest(cfg.shards)
    accelerator = make_accelerator(cfg.mixed_precision, project_dir=str(run_dir))
    check_process_group(accelerator.num_processes)
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    model_cfg = model_config_for(cfg.preset, manifest)
    check_shard_count(len(manifest["shards"]), world, cfg.workers, is_main)
    resume_from = resolve_resume(cfg.resume, ckpt_dir)
    debug = cfg.debug_keys or os.environ.get(DEBUG_ENV, "") not in ("", "0")

    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial(ckpt_dir)
    accelerator.wait_for_everyone()

    seed_everything(cfg.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    gen, disc = build_generator(model_cfg), build_lrcn(model_cfg)
    opt_g = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr_d or cfg.lr, betas=(cfg.beta1, 0.999))
    gen, disc, opt_g, opt_d = accelerator.prepare(gen, disc, opt_g, opt_d)

    start_step, epoch, skip = 0, 0, 0
    if resume_from is not None:
        state = read_train_state(resume_from)
        if state.get("model") != model_cfg.to_dict():
            raise UserError(
                f"checkpoint {resume_from} was made for another model ({state.get('model', {}).get('preset')}, "
                f"frames {state.get('model', {}).get('height')}x{state.get('model', {}).get('width')}); "
                f"this run asks for preset {cfg.preset} on {model_cfg.height}x{model_cfg.width}"
            )
        accelerator.load_state(str(resume_from))  # weights, optimizers, scaler, this rank's RNG states
        start_step = int(state["step"])
        positions = state.get("data") or [[0, 0]]
        if int(state.get("world_size", 0)) == world and len(positions) == world:
            epoch, skip = (int(v) for v in positions[rank])
        else:  # the data position of another process count cannot be mapped: start the next epoch afresh
            epoch, skip = max(int(p[0]) for p in positions) + 1, 0
            print_main(
                is_main,
                f"note: checkpoint was made with {state.get('world_size')} processes, now {world}: "
                f"the data stream restarts at epoch {epoch}",
            )
        print_main(is_main, f"resuming from {resume_from} (step {start_step})")
    else:
        seed_everything(cfg.seed, rank=rank)  # each rank draws its own noise and dropout masks

    if is_main:
        _write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=start_step)
    batches = infinite_batches(
        cfg.shards,
        cfg.batch_size,
        seed=cfg.seed,
        start_epoch=epoch,
        skip_batches=skip,
        rank=rank,
        world_size=world,
        workers=cfg.workers,
        cache=cfg.cache,
        shuffle_buffer=cfg.shuffle_buffer,
    )

    writer = None
    real_pool = fixed_z = None
    sim_path = run_dir / SIMILARITY_CSV
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides events a crashed run logged after the checkpoint we resume from.
        writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else 0)
        if cfg.similarity_every or cfg.image_every:
            real_pool = sample_real_windows(cfg.shards, manifest, _REAL_POOL, cfg.seed)
            fixed_z = torch.randn(_IMAGE_ROWS, model_cfg.z_dim, generator=_seeded_cpu_generator(cfg.seed, 11))
        _write_similarity_rows(sim_path, _read_similarity_rows(sim_path, start_step) if start_step else [])

    def log_similarity(step: int) -> None:
        g = accelerator.unwrap_model(gen)
        n = cfg.similarity_samples
        rng = np.random.default_rng([cfg.seed, step, 3])
        idx = rng.choice(len(real_pool), size=n, replace=len(real_pool) < n)
        z = torch.randn(n, model_cfg.z_dim, generator=_seeded_cpu_generator(cfg.seed, step, 5)).to(device)
        fake = generate_windows(g, z)
        real = frames_to_float(torch.from_numpy(real_pool[idx]))
        cos, l2 = window_similarity(fake, real)
        writer.add_scalar("similarity/cosine", cos, step)
        writer.add_scalar("similarity/l2", l2, step)
        with sim_path.open("a") as f:
            f.write(f"{step},{cos:.6f},{l2:.6f}\n")

    def log_image(step: int) -> None:
        fake = generate_windows(accelerator.unwrap_model(gen), fixed_z.to(device))
        real = frames_to_float(torch.from_numpy(real_pool[:_IMAGE_ROWS]))
        writer.add_image("samples/real_top_generated_bottom", windows_image(real, fake), step)

    keys_seen: list[str] = []
    skipped = {"d": 0, "g": 0}
    stats: list[torch.Tensor] = []
    step = start_step
    last_ckpt = list_checkpoints(ckpt_dir)[-1][1] if list_checkpoints(ckpt_dir) else None
    try:
        if is_main and start_step == 0 and cfg.similarity_every:
            log_similarity(0)
        pbar = tqdm(
            total=cfg.steps,
            initial=min(start_step, cfg.steps),
            desc="pretrain",
            unit="step",
            disable=not (is_main and cfg.progress),
            dynamic_ncols=True,
        )
        t_last, steps_last = time.perf_counter(), step
        while step < cfg.steps:
            with torch.random.fork_rng(devices=[]):  # a new epoch's DataLoader draws from the CPU RNG: isolate it
                batch = next(batches)
            if debug:
                keys_seen.extend(f"{batches.epoch} {k}" for k in batch["key"])
            real = frames_to_float(batch["frames"].to(device, non_blocking=True))
            stats.append(_gan_step(accelerator, gen, disc, opt_g, opt_d, real, model_cfg.z_dim))
            if accelerator.scaler is not None:
                skipped["d"] += int(opt_d.step_was_skipped)
                skipped["g"] += int(opt_g.step_was_skipped)
            step += 1
            pbar.update(1)

            do_ckpt = step == cfg.steps or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            if do_ckpt or step % cfg.log_every == 0:
                rows = accelerator.reduce(torch.stack(stats), reduction="mean").cpu().double().numpy()
                first = step - len(stats) + 1
                stats.clear()
                bad = np.flatnonzero(~np.isfinite(rows[:, :2]).all(axis=1))
                if len(bad):
                    s, (ld, lg) = first + int(bad[0]), rows[bad[0], :2]
                    where = f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                    raise NonFiniteLossError(
                        f"non-finite loss at step {s} (loss/d={ld}, loss/g={lg}); stopped without saving; {where}. "
                        "Lower --lr or use --mixed-precision no/bf16, then --resume auto"
                    )
                now = time.perf_counter()
                if is_main:
                    for i, (ld, lg, pr, pf) in enumerate(rows):
                        writer.add_scalar("loss/d", ld, first + i)
                        writer.add_scalar("loss/g", lg, first + i)
                        writer.add_scalar("d/real", pr, first + i)
                        writer.add_scalar("d/fake", pf, first + i)
                    writer.add_scalar("lr/g", opt_g.param_groups[0]["lr"], step)
                    writer.add_scalar("lr/d", opt_d.param_groups[0]["lr"], step)
                    rate = (step - steps_last) * cfg.batch_size * world / max(now - t_last, 1e-9)
                    writer.add_scalar("throughput/samples_per_s", rate, step)
                    if accelerator.scaler is not None:
                        writer.add_scalar("amp/skipped_steps_d", skipped["d"], step)
                        writer.add_scalar("amp/skipped_steps_g", skipped["g"], step)
                    pbar.set_postfix(loss_d=f"{rows[-1, 0]:.3f}", loss_g=f"{rows[-1, 1]:.3f}", sps=f"{rate:.1f}")
                t_last, steps_last = now, step

            if is_main and cfg.similarity_every and step % cfg.similarity_every == 0:
                log_similarity(step)
            if is_main and cfg.image_every and (step % cfg.image_every == 0 or step == cfg.steps):
                log_image(step)
            if do_ckpt:
                pos = accelerator.gather(torch.tensor([[batches.epoch, batches.index]], device=device)).cpu()
                train_state = {
                    "data": pos.tolist(),
                    "world_size": world,
                    "model": model_cfg.to_dict(),
                    "seed": cfg.seed,
                    "batch_size": cfg.batch_size,
                }
                last_ckpt = save_checkpoint(accelerator, ckpt_dir, step, train_state, cfg.keep_checkpoints)
                if is_main:
                    writer.flush()
        pbar.close()
    finally:
        if writer is not None:
            writer.close()

    g_mod, d_mod = accelerator.unwrap_model(gen), accelerator.unwrap_model(disc)
    broadcast_buffers(g_mod)  # every replica now holds exactly the exported weights (rank 0's BN statistics)
    if is_main:
        save_model(g_mod, run_dir / GENERATOR_FILE, model_cfg, kind="generator")
        save_model(d_mod, run_dir / DISCRIMINATOR_FILE, model_cfg, kind="discriminator")
        _write_config(run_dir, cfg, model_cfg, manifest, accelerator, step=step)
    if debug:  # test/debug aid: what this rank read ("epoch key" lines) and its weights' hash (one file per rank)
        dbg = run_dir / "debug"
        dbg.mkdir(parents=True, exist_ok=True)
        with (dbg / f"keys_rank{rank}.txt").open("a") as f:
            f.writelines(k + "\n" for k in keys_seen)
        (dbg / f"weights_rank{rank}.txt").write_text(
            f"generator {state_dict_sha256(g_mod)}\ndiscriminator {state_dict_sha256(d_mod)}\n"
        )
    accelerator.wait_for_everyone()
    print_main(is_main, f"pretrain done: {step} steps; weights in {run_dir}")
    return run_dir


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
