#!/usr/bin/env bash
# N processes (default 2) on the CPU with a gloo process group, through torchrun: local debugging of the distributed
# code paths without accelerate's launcher (same effect as launch/cpu_2proc.yaml).
#
#   launch/cpu_2proc.sh pretrain --shards SHARDS --out RUN --preset tiny --steps 20
#   NPROC=3 launch/cpu_2proc.sh transfer --shards SHARDS --out RUN2 --from RUN --folds 4
#
# torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; ddp_vad's make_accelerator() sees several processes and no GPU and
# asks accelerate for the CPU (gloo). GPUs are hidden so that this stays a CPU run on any machine. --standalone picks a
# free rendezvous port, so several of these can run at once. One thread per process avoids oversubscribing the cores.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: $0 {pretrain|transfer|...} [ddp_vad options]" >&2
    exit 2
fi

export CUDA_VISIBLE_DEVICES=""
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "${PYTHON:-python}" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" -m ddp_vad "$@"
