"""One rank of the group-formation tests (test_group_formation.py); writes what happened to OUT/rank{RANK}.json.

``wait``: both ranks form the groups through ``process_state`` (as ``ddp_vad pipeline`` does); rank 1 then works for
longer than the formation timeout before the patient barrier, which must still succeed.
``bad-iface``: a main group forms (standing in for NCCL), then rank 1 names a network interface that does not exist
for gloo, as a wrong GLOO_SOCKET_IFNAME on one node would: forming the gloo side group must fail on both ranks with
the one-line hint, within the formation timeout.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ddp_vad.errors import UserError
from ddp_vad.train.distributed import (
    group_formation_timeout,
    patient_barrier,
    patient_group,
    process_state,
    shutdown_process_group,
)


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


if __name__ == "__main__":
    mode, out = sys.argv[1], Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    result: dict = {"rank": rank}
    t0 = time.perf_counter()
    try:
        if mode == "wait":
            process_state()
            result["main_timeout_s"] = _timeout_s(dist.group.WORLD)
            result["patient_timeout_s"] = _timeout_s(patient_group())
            if rank == 1:
                time.sleep(2 * group_formation_timeout().total_seconds())
            patient_barrier()
            result["barrier_s"] = time.perf_counter() - t0
            shutdown_process_group()
        elif mode == "bad-iface":
            dist.init_process_group("gloo")
            if rank == 1:
                os.environ["GLOO_SOCKET_IFNAME"] = "ddpvad_none0"
            patient_group()
        result["ok"] = True
    except UserError as exc:
        result["error"] = str(exc)
    result["seconds"] = time.perf_counter() - t0
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    os._exit(0)  # a half-formed group may leave gloo threads that would hang interpreter shutdown
