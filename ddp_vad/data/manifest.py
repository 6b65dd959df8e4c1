"""``manifest.json`` of a shard set: read and checked in one place."""

from __future__ import annotations

from pathlib import Path

from ddp_vad.data.format import FORMAT, MANIFEST
from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object

REBUILD = "rebuild with `ddp_vad shard build`"


def validate_manifest(manifest: dict, path: str | Path) -> dict:
    """Check the format and the keys every reader needs; returns ``manifest``."""
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise UserError(f"{path}: shard format {fmt!r}, this version reads {FORMAT!r}; {REBUILD}")
    for key in ("window", "height", "width", "folds", "shards"):
        if key not in manifest:
            raise UserError(f"{path} lacks the '{key}' field; {REBUILD}")
    return manifest


def load_manifest(shard_dir: str | Path) -> dict:
    """Read and validate ``shard_dir/manifest.json``; a missing, broken or old manifest is a UserError naming it."""
    path = Path(shard_dir) / MANIFEST
    if not Path(shard_dir).is_dir():
        raise UserError(f"shard folder not found: {shard_dir}")
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {shard_dir} (build shards with `ddp_vad shard build`)")
    return validate_manifest(read_json_object(path, "shard manifest"), path)


def fold_count(manifest: dict, requested: int | None, shard_dir: str | Path) -> int:
    """The shards' fold count; a different ``--folds`` request is a UserError (folds are fixed at build time)."""
    n_folds = int(manifest["folds"])
    if requested is not None and int(requested) != n_folds:
        raise UserError(
            f"--folds {requested}: the shards in {shard_dir} were built with {n_folds} folds "
            f"(rebuild them with --folds {requested}, or leave --folds out)"
        )
    return n_folds


def shard_paths(shard_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Paths of the shards listed in the manifest, in manifest order."""
    manifest = manifest or load_manifest(shard_dir)
    return [str(Path(shard_dir) / s["name"]) for s in manifest["shards"]]
