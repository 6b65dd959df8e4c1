"""Watching the GAN from the main process: real-vs-generated similarity (``RUN/similarity.csv`` and TensorBoard),
sample images, and the per-step losses reduced over every rank.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ddp_vad.config import hparams_values
from ddp_vad.data.reader import frames_to_float, load_window_set
from ddp_vad.files import append_text, write_json_atomic, write_text_atomic
from ddp_vad.train.gan import STAT_NAMES, generate_windows
from ddp_vad.train.gan_health import HEALTH_FILE, GanHealth

SIMILARITY_CSV = "similarity.csv"
REAL_POOL = 256  # real windows kept (main process) for similarity and images, chosen once (seeded)
IMAGE_ROWS = 4


def window_similarity(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, float]:
    """Mean cosine similarity and mean L2 distance between paired windows (flattened), as in the method."""
    f = fake.detach().flatten(1).double().cpu()
    r = real.detach().flatten(1).double().cpu()
    return F.cosine_similarity(f, r, dim=1).mean().item(), (f - r).norm(dim=1).mean().item()


def sample_real_windows(shard_dir: str | Path, manifest: dict, n: int, seed: int, select: str = "kept") -> np.ndarray:
    """``n`` real windows (uint8 [n, T, H, W]) drawn uniformly (seeded) from the ``select`` windows of the shard set
    (the ones the GAN trains on: under the leak-free protocol the train clips', never a test clip's); reads only the
    shards that hold them (a damaged shard is reported and skipped, like in the training stream)."""
    return load_window_set(shard_dir, n=n, seed=[seed, 7], on_damage="skip", select=select).frames


def seeded_cpu_generator(*parts: int) -> torch.Generator:
    seed = int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


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


class GanMonitor:
    """Main-process TensorBoard writer + similarity CSV + sample images of one pretrain run.

    ``start_step`` > 0 (a resume) drops events and CSV rows that a crashed run logged after that step. ``select``:
    the windows the GAN streams (its real-window pool is drawn from those).
    """

    def __init__(
        self,
        run_dir: Path,
        cfg,
        manifest: dict,
        z_dim: int,
        device: torch.device,
        start_step: int,
        health: dict | None = None,
        select: str = "kept",
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.cfg, self.z_dim, self.device, self.run_dir = cfg, z_dim, device, run_dir
        self.health = GanHealth.restore(health, cfg.steps, cfg.label_smoothing)
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else 0)
        self.real_pool = self.fixed_z = None
        if cfg.similarity_every or cfg.image_every:
            self.real_pool = sample_real_windows(cfg.shards, manifest, REAL_POOL, cfg.seed, select)
            self.fixed_z = torch.randn(IMAGE_ROWS, z_dim, generator=seeded_cpu_generator(cfg.seed, 11))
        self.sim_path = run_dir / SIMILARITY_CSV
        kept = _read_similarity_rows(self.sim_path, start_step) if start_step else []
        _write_similarity_rows(self.sim_path, kept)

    def similarity(self, generator: torch.nn.Module, step: int) -> None:
        """Cosine / L2 of ``similarity_samples`` generated windows against as many real ones (seeded per step)."""
        n = self.cfg.similarity_samples
        rng = np.random.default_rng([self.cfg.seed, step, 3])
        idx = rng.choice(len(self.real_pool), size=n, replace=len(self.real_pool) < n)
        z = torch.randn(n, self.z_dim, generator=seeded_cpu_generator(self.cfg.seed, step, 5)).to(self.device)
        fake = generate_windows(generator, z)
        real = frames_to_float(torch.from_numpy(self.real_pool[idx]))
        cos, l2 = window_similarity(fake, real)
        self.writer.add_scalar("similarity/cosine", cos, step)
        self.writer.add_scalar("similarity/l2", l2, step)
        append_text(self.sim_path, f"{step},{cos:.6f},{l2:.6f}\n")  # a full disk leaves no torn last row
        self._report(self.health.observe_similarity(step, cos), step)

    def image(self, generator: torch.nn.Module, step: int) -> None:
        """Real windows above generated ones (fixed noise), one window per row."""
        fake = generate_windows(generator, self.fixed_z.to(self.device))
        real = frames_to_float(torch.from_numpy(self.real_pool[:IMAGE_ROWS]))
        self.writer.add_image("samples/real_top_generated_bottom", windows_image(real, fake), step)

    def losses(self, rows: np.ndarray, first_step: int, gan_until: int | None = None) -> None:
        """Per-step ``STAT_NAMES`` rows (losses, D(real), D(fake), gradient norms) starting at ``first_step``; GAN
        health watches the steps up to ``gan_until`` (all when None: the D-only steps of the variants are not a
        game)."""
        tags = {"loss_d": "loss/d", "loss_g": "loss/g", "d_real": "d/real", "d_fake": "d/fake",
                "grad_norm_d": "grad_norm/d", "grad_norm_g": "grad_norm/g"}  # fmt: skip
        for i, row in enumerate(rows):
            for name, value in zip(STAT_NAMES, row, strict=True):
                self.writer.add_scalar(tags[name], value, first_step + i)
        game = rows if gan_until is None else rows[: max(0, gan_until - first_step + 1)]
        if len(game):
            self._report(self.health.observe_steps(game, first_step, STAT_NAMES), first_step + len(game) - 1)

    def progress(
        self, rows: np.ndarray, first: int, step: int, rate: float, opts, amp_skipped: dict | None, gan_until=None
    ) -> None:
        """The per-step stats since the last log (see :meth:`losses`), the optimizers' learning rates, throughput
        and, with fp16, the optimizer steps the GradScaler skipped."""
        self.losses(rows, first, gan_until)
        opt_g, opt_d = opts
        self.scalars(step, lr__g=opt_g.param_groups[0]["lr"], lr__d=opt_d.param_groups[0]["lr"],
                     throughput__samples_per_s=rate)  # fmt: skip
        if amp_skipped is not None:
            self.scalars(step, amp__skipped_steps_d=amp_skipped["d"], amp__skipped_steps_g=amp_skipped["g"])

    def _report(self, warnings: list[str], step: int) -> None:
        for message in warnings:
            tqdm.write(f"pretrain: WARNING (GAN health): {message}")  # on its own line, above the progress bar
            self.writer.add_text("health/warnings", message, step)

    def write_health(self) -> None:
        """``RUN/gan_health.json``: win rate, similarity points, warnings (read by ``evaluate``)."""
        write_json_atomic(self.run_dir / HEALTH_FILE, self.health.summary())

    def hparams(self, hparams: dict, step: int) -> None:
        """The run's hyperparameters with its final health numbers, for TensorBoard's HParams dashboard."""
        last = self.health.last
        metrics = {"hparams/d_real": last.get("d_real", math.nan), "hparams/d_fake": last.get("d_fake", math.nan),
                   "hparams/similarity_cosine": self.health.similarity[-1][1] if self.health.similarity else math.nan,
                   "hparams/d_win_steps": float(self.health.win_steps)}  # fmt: skip
        self.writer.add_hparams(hparams_values(hparams), metrics, run_name="hparams", global_step=step)

    def scalars(self, step: int, **values: float) -> None:
        """Other scalars at ``step`` (names with ``__`` become ``/``: ``lr__g`` -> ``lr/g``)."""
        for name, value in values.items():
            self.writer.add_scalar(name.replace("__", "/"), value, step)

    def close(self) -> None:
        self.writer.close()
