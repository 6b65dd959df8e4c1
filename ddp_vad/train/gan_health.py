"""Is the GAN still a game? Watches the discriminator's win rate and the similarity curve, warns once per problem.

A GAN can fail without anyone noticing: on real Ped1 (demo preset) the discriminator's loss fell to ~0.002 by step
150 (it wins outright, generator loss ~6), and a discriminator that wins outright gives its features nothing more to
learn. Two warnings, each printed once, logged to TensorBoard and written to ``RUN/gan_health.json`` (and read by
``evaluate``):

* **D wins outright**: mean D(real) > 0.95 of its target (1, or 1 - s with ``--label-smoothing s``) and mean
  D(fake) < 0.05 for a sustained stretch of consecutive steps (at least 50 steps and 10% of the run);
* **similarity stalls**: the cosine similarity of generated to real windows has not beaten its earlier best by 0.005
  over the last 30% of its points (at least 3, after at least 6 points).

The state is part of every checkpoint, so a resumed run continues the same counts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

HEALTH_FILE = "gan_health.json"
WIN_PROB = 0.95  # D(real) above this and D(fake) below 1 - this: D wins outright at that step
MIN_STALL_GAIN = 0.005


@dataclass
class GanHealth:
    """Running health counts of one pretrain run (main process)."""

    total_steps: int
    label_smoothing: float = 0.0  # D's target for real windows is 1 - this: the win test is relative to it
    win_streak: int = 0  # consecutive steps at which D won outright, up to the last step seen
    longest_win_streak: int = 0
    win_steps: int = 0
    first_win_step: int | None = None
    last: dict = field(default_factory=dict)  # the last step's d_real, d_fake, grad norms
    similarity: list = field(default_factory=list)  # [step, cosine] points
    warnings: list = field(default_factory=list)
    warned: list = field(default_factory=list)  # kinds already warned about ("d_wins", "similarity_stalls")

    @property
    def real_bar(self) -> float:
        """D(real) above which D wins: 0.95 of its target (1 with plain labels, 1 - s with smoothing)."""
        return WIN_PROB * (1.0 - self.label_smoothing)

    @property
    def sustained(self) -> int:
        """How many consecutive winning steps count as sustained."""
        return max(50, math.ceil(0.1 * self.total_steps))

    def observe_steps(self, rows, first_step: int, names: tuple[str, ...]) -> list[str]:
        """Per-step stat rows (columns ``names``) from ``first_step`` on; returns new warnings."""
        new = []
        for i, row in enumerate(rows):
            stats = dict(zip(names, (float(v) for v in row), strict=True))
            wins = stats["d_real"] > self.real_bar and stats["d_fake"] < 1 - WIN_PROB
            self.win_streak = self.win_streak + 1 if wins else 0
            self.win_steps += int(wins)
            if wins and self.first_win_step is None:
                self.first_win_step = first_step + i
            self.longest_win_streak = max(self.longest_win_streak, self.win_streak)
            self.last = {"step": first_step + i, **{k: v for k, v in stats.items() if not k.startswith("loss")}}
            if self.win_streak == self.sustained:
                new += self._warn(
                    "d_wins",
                    f"the discriminator wins outright (D(real) > {self.real_bar:.3f}, "
                    f"D(fake) < {1 - WIN_PROB:.2f}) for "
                    f"{self.sustained} consecutive steps up to step {first_step + i}: its features stop learning. "
                    "Try --label-smoothing 0.1 or --instance-noise 0.1, or a lower --lr-d",
                )
        return new

    def observe_similarity(self, step: int, cosine: float) -> list[str]:
        """One similarity point; returns new warnings."""
        self.similarity.append([int(step), float(cosine)])
        n = len(self.similarity)
        recent = max(3, math.ceil(0.3 * n))
        if n < 6 or n - recent < 1:
            return []
        before = max(c for _, c in self.similarity[: n - recent])
        after = max(c for _, c in self.similarity[n - recent :])
        if after < before + MIN_STALL_GAIN:
            return self._warn(
                "similarity_stalls",
                f"similarity of generated to real windows stalled: best cosine {before:.4f} before step "
                f"{self.similarity[n - recent][0]}, at most {after:.4f} in the last {recent} points",
            )
        return []

    def _warn(self, kind: str, message: str) -> list[str]:
        """Record a warning the first time its kind occurs; returns it then (else nothing)."""
        if kind in self.warned:
            return []
        self.warned.append(kind)
        self.warnings.append(message)
        return [message]

    def summary(self) -> dict:
        """What gan_health.json holds."""
        return {**asdict(self), "sustained_steps": self.sustained, "win_prob": WIN_PROB}

    @classmethod
    def restore(cls, data: dict | None, total_steps: int, label_smoothing: float = 0.0) -> GanHealth:
        """A health state from a checkpoint (a fresh one without), for a run of ``total_steps``."""
        keep = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**{**keep, "total_steps": total_steps, "label_smoothing": label_smoothing})
