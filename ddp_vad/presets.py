"""The one preset table: for each preset, the model's size and the pipeline's run sizes side by side.

``paper`` is the method at full size (GPU work); ``demo`` runs the whole pipeline on 2 CPU cores in minutes, with the
LRCN levers on (motion input, top-k pooling; ``demo-frames`` is the same sizes without them); ``tiny`` is for tests.
The run sizes belong with the model sizes: ``tiny``'s 3x3 kernels only fit three valid conv+pool stages because its
frames are 24x36, and ``demo``'s pooled, narrower LRCN is what keeps 120x182 frames cheap on a CPU.
Stage commands default to ``paper`` (the method); ``ddp_vad pipeline`` defaults to ``demo``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    """``model``: fields of :class:`ddp_vad.models.ModelConfig`; ``run``: the pipeline's data and run sizes."""

    model: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "paper": Preset(
        model=dict(
            z_dim=100, gen_channels=(200, 100, 50), gen_upsample=2,
            conv_channels=(16, 16, 16), conv_kernels=(7, 5, 3), lstm_hidden=1024, dense=256,
        ),
        run=dict(
            train_clips=34, test_clips=36, frames=200, synth_height=158, synth_width=238, height=120, width=182,
            shard_size=200, folds=10, steps=5000, batch_size=32, epochs=30, repeats=1,
            similarity_every=100, checkpoint_every=500,
        ),
    ),
    "demo": Preset(
        # Works at lower resolution inside the models while keeping their inputs/outputs at the shards' frame size:
        # the generator's Linear makes a quarter-resolution map, its convs run at half resolution. The LRCN uses the
        # levers measured in benchmarks/results/levers.md (docs/models.md, "Levers"): frames average-pooled 3x
        # (40 x 60), |x_t - x_t-1| as input, top-4 positions per channel into the LSTM. On the Ped1 sample, leak-free,
        # it lifted frame AUROC from 0.57 (demo-frames) to 0.73 at a third of the training windows, and costs about
        # 1/6 of demo-frames' LRCN per window on a CPU.
        model=dict(
            z_dim=64, gen_channels=(32, 16, 8), gen_upsample=4, gen_conv_div=2, input_pool=3,
            conv_channels=(8, 8, 8), conv_kernels=(5, 3, 3), lstm_hidden=128, dense=64,
            input_mode="diff", pooling="topk", topk=4,
        ),
        run=dict(
            train_clips=4, test_clips=10, frames=80, synth_height=158, synth_width=238, height=120, width=182,
            shard_size=200, folds=5, steps=300, batch_size=16, epochs=4, repeats=1,
            similarity_every=50, checkpoint_every=100,
        ),
    ),
    "demo-frames": Preset(
        # demo before the levers: the method's LRCN (frames in, conv maps flattened into the LSTM), narrower and on
        # frames average-pooled 2x (60 x 91). Kept to reproduce the reference rows of benchmarks/results/levers.md.
        model=dict(
            z_dim=64, gen_channels=(32, 16, 8), gen_upsample=4, gen_conv_div=2, input_pool=2,
            conv_channels=(8, 8, 8), conv_kernels=(7, 5, 3), lstm_hidden=128, dense=64,
        ),
        run=dict(
            train_clips=4, test_clips=10, frames=80, synth_height=158, synth_width=238, height=120, width=182,
            shard_size=200, folds=5, steps=300, batch_size=16, epochs=8, repeats=1,
            similarity_every=50, checkpoint_every=100,
        ),
    ),
    "tiny": Preset(
        model=dict(
            z_dim=16, gen_channels=(8, 8, 4), gen_upsample=2,
            conv_channels=(4, 4, 4), conv_kernels=(3, 3, 3), lstm_hidden=16, dense=16,
        ),
        run=dict(
            train_clips=2, test_clips=4, frames=30, synth_height=48, synth_width=72, height=24, width=36,
            shard_size=8, folds=3, steps=20, batch_size=8, epochs=2, repeats=1,
            similarity_every=10, checkpoint_every=10,
        ),
    ),
}  # fmt: skip
PRESET_NAMES = tuple(PRESETS)
