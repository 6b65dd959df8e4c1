"""Shard sets of labelled windows (format ``ddp_vad-shards/2``, docs/shard-format.md): the names other modules use.

The work lives in ``plan`` (which windows), ``writer`` (``shard build``), ``format`` (blocks on disk),
``manifest`` (read + validate), ``info`` (``shard info --verify``) and ``reader`` (reading windows back).
"""

from __future__ import annotations

from ddp_vad.data.format import FORMAT, MANIFEST
from ddp_vad.data.info import format_info, print_info, verify_shards
from ddp_vad.data.manifest import fold_count, load_manifest, shard_paths, validate_manifest
from ddp_vad.data.plan import ShardConfig, WindowPlan, plan_blocks, plan_windows
from ddp_vad.data.writer import build_shards

__all__ = [
    "FORMAT",
    "MANIFEST",
    "ShardConfig",
    "WindowPlan",
    "build_shards",
    "fold_count",
    "format_info",
    "load_manifest",
    "plan_blocks",
    "plan_windows",
    "print_info",
    "shard_paths",
    "validate_manifest",
    "verify_shards",
]
