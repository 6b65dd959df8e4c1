"""Run under torchrun: each rank streams one epoch with split="nodes" and writes the keys it saw."""

import sys
from pathlib import Path

import torch.distributed as dist

from ddp_vad.data.reader import stream_batches

if __name__ == "__main__":
    shards, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    keys = []
    for batch in stream_batches(shards, 4, epoch=int(sys.argv[3]), seed=0, workers=2):
        keys += batch["key"]
    (out / f"rank{rank}.txt").write_text("\n".join(keys) + "\n")
    dist.barrier()
    dist.destroy_process_group()
