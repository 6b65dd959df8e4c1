"""What a pretrain run saves and restores: the train state a checkpoint adds (every rank's data position, the model
config, the GAN-health counts), resuming from it, the exported weights and the resolved config."""

from __future__ import annotations

from pathlib import Path

import torch

from ddp_vad.config import write_resolved_config
from ddp_vad.errors import UserError, error_message
from ddp_vad.models import DISCRIMINATOR_FILE, GENERATOR_FILE, ModelConfig
from ddp_vad.train.checkpoint import read_train_state
from ddp_vad.train.distributed import broadcast_buffers, object_group, print_main, raise_agreed, state_dict_sha256
from ddp_vad.train.pretrain_config import PretrainConfig
from ddp_vad.weights import save_model


def resume_state(accelerator, resume_from: Path, model_cfg: ModelConfig, preset: str) -> tuple[int, int, int, dict]:
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


def train_state(accelerator, batches, model_cfg: ModelConfig, cfg: PretrainConfig, monitor) -> dict:
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


def export_weights(
    accelerator, gen, disc, run_dir: Path, model_cfg: ModelConfig, debug_keys: list[str] | None, pretraining: dict
) -> None:
    """The generator and the discriminator (with ``pretraining``, the variant that made it, in its metadata) from
    the main process; with ``debug_keys``, every rank's keys and weight hashes."""
    g_mod, d_mod = accelerator.unwrap_model(gen), accelerator.unwrap_model(disc)
    broadcast_buffers(g_mod)  # every replica now holds exactly the exported weights (rank 0's BN statistics)
    if accelerator.is_main_process:
        save_model(g_mod, run_dir / GENERATOR_FILE, model_cfg, kind="generator")
        extra = {"pretraining": pretraining}
        save_model(d_mod, run_dir / DISCRIMINATOR_FILE, model_cfg, kind="discriminator", extra=extra)
    if debug_keys is not None:  # test/debug aid: what this rank read ("epoch key" lines) and its weights' hash
        dbg, rank = run_dir / "debug", accelerator.process_index
        dbg.mkdir(parents=True, exist_ok=True)
        with (dbg / f"keys_rank{rank}.txt").open("a") as f:
            f.writelines(k + "\n" for k in debug_keys)
        (dbg / f"weights_rank{rank}.txt").write_text(
            f"generator {state_dict_sha256(g_mod)}\ndiscriminator {state_dict_sha256(d_mod)}\n"
        )


def write_config(
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
