"""``manifest.json`` of a shard set: read and validated once, here, with errors that name the key.

Every reader gets its manifest from :func:`load_manifest`, so the rest of the toolkit may index it without checks.
The ``counts`` keys are a contract shared with the other stages and the reports.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ddp_vad.data.format import FORMAT, MANIFEST
from ddp_vad.errors import UserError
from ddp_vad.files import read_json_object

COUNT_KEYS = ("clips", "train_clips", "test_clips", "windows", "anomalous", "normal", "kept", "kept_anomalous",
              "kept_normal")  # fmt: skip
REBUILD = "rebuild with `ddp_vad shard build`"
_SHARD_NAME = re.compile(r"^[^/\\]+\.tar$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _matches(pattern: re.Pattern, value: Any) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class _Checker:
    """Collects nothing: the first wrong key raises a UserError naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, what: str, value: Any = ...) -> None:
        got = "it is missing" if value is ... else f"got {value!r}"
        raise UserError(f"{self.path}: '{key}' must be {what}, {got} ({REBUILD})")

    def get(self, obj: dict, key: str, name: str, what: str, ok) -> Any:
        if key not in obj:
            self.fail(name, what)
        if not ok(obj[key]):
            self.fail(name, what, obj[key])
        return obj[key]

    def integer(self, obj: dict, key: str, name: str, low: int | None = None, high: int | None = None) -> int:
        what = "an integer" + (f" >= {low}" if low is not None and high is None else "")
        what += f" in {low}..{high}" if high is not None else ""
        return self.get(
            obj, key, name, what, lambda v: _is_int(v) and (low is None or v >= low) and (high is None or v <= high)
        )


def validate_manifest(manifest: dict, path: str | Path) -> dict:
    """Check every key the toolkit reads (types and ranges); returns ``manifest``. UserError names the key."""
    c = _Checker(Path(path))
    fmt = manifest.get("format")
    if fmt != FORMAT:
        raise UserError(f"{path}: shard format {fmt!r}, this version reads {FORMAT!r}; {REBUILD}")
    for key in ("dataset", "source"):
        c.get(manifest, key, key, "a string", lambda v: isinstance(v, str))
    c.get(manifest, "balance", "balance", "'undersample' or 'none'", lambda v: v in ("undersample", "none"))
    for key in ("window", "stride", "height", "width"):
        c.integer(manifest, key, key, 1)
    c.integer(manifest, "min_anomalous", "min_anomalous", 1, manifest["window"])
    c.integer(manifest, "folds", "folds", 2)
    c.integer(manifest, "seed", "seed")
    counts = c.get(manifest, "counts", "counts", "an object", lambda v: isinstance(v, dict))
    for key in COUNT_KEYS:
        c.integer(counts, key, f"counts.{key}", 0)
    shards = c.get(manifest, "shards", "shards", "a list", lambda v: isinstance(v, list))
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            c.fail(f"shards[{i}]", "an object", entry)
        c.get(entry, "name", f"shards[{i}].name", "a tar file name", lambda v: _matches(_SHARD_NAME, v))
        c.integer(entry, "samples", f"shards[{i}].samples", 0)
        c.get(entry, "sha256", f"shards[{i}].sha256", "a sha256 hex digest", lambda v: _matches(_SHA256, v))
        for key in ("blocks", "frames"):
            c.integer(entry, key, f"shards[{i}].{key}", 0)
    if sum(e["samples"] for e in shards) != counts["kept"]:
        c.fail("counts.kept", f"the sum of the shards' samples ({sum(e['samples'] for e in shards)})", counts["kept"])
    _validate_extras(c, manifest)
    return manifest


def _validate_extras(c: _Checker, manifest: dict) -> None:
    """The optional summaries that ``shard info`` and the reports print."""
    types = manifest.get("anomaly_types", {})
    if not isinstance(types, dict) or not all(
        isinstance(v, list) and all(isinstance(t, str) for t in v) for v in types.values()
    ):
        c.fail("anomaly_types", "an object {clip: [type, ...]}", types)
    protocols = manifest.get("protocols", {})
    if not isinstance(protocols, dict):
        c.fail("protocols", "an object", protocols)
    for name, info in protocols.items():
        if not isinstance(info, dict):
            c.fail(f"protocols.{name}", "an object", info)
        c.get(info, "available", f"protocols.{name}.available", "true or false", lambda v: isinstance(v, bool))
        folds = c.get(info, "folds", f"protocols.{name}.folds", "a list", lambda v: isinstance(v, list))
        for i, fold in enumerate(folds):
            if not isinstance(fold, dict):
                c.fail(f"protocols.{name}.folds[{i}]", "an object", fold)
            for key in ("fold", "windows", "anomalous", "normal"):
                c.integer(fold, key, f"protocols.{name}.folds[{i}].{key}", 0)


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
