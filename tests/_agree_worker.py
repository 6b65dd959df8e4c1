"""One rank of the agreement tests (test_failures.py), started by torchrun with 2 processes.

``data``: rank 1's stream runs dry after 3 batches (as a rank without a full batch would) while rank 0's does not;
both ranks must stop with rank 1's message at the next log step, none left waiting in a collective.
``resume``: only the main process may decide which checkpoint to resume from; rank 1 would fail if it tried.
Arguments after the first three are added to the pretrain command line (a later option overrides an earlier one).
"""

import os
import sys

from ddp_vad.cli import main
from ddp_vad.data import reader
from ddp_vad.errors import UserError
from ddp_vad.train import pretrain

if __name__ == "__main__":
    mode, shards, out = sys.argv[1:4]
    rank = int(os.environ["RANK"])
    if mode == "data" and rank == 1:
        real_next, taken = reader.InfiniteBatches.__next__, []

        def next_batch(self):
            if len(taken) >= 3:
                raise UserError(f"{self.shard_dir} gives this process no full batch of {self.batch_size} samples")
            taken.append(1)
            return real_next(self)

        reader.InfiniteBatches.__next__ = next_batch
    if mode == "resume" and rank != 0:

        def refuse(*_args):
            raise AssertionError("resolve_resume ran on a non-main process")

        pretrain.resolve_resume = refuse
    sys.argv = ["ddp_vad", "pretrain", "--shards", shards, "--out", out, "--preset", "tiny", "--steps", "8",
                "--batch-size", "2", "--log-every", "4", "--checkpoint-every", "4", "--similarity-every", "0",
                "--image-every", "0", "--workers", "0", "--no-progress", *sys.argv[4:]]  # fmt: skip
    main()
