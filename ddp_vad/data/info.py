"""``ddp_vad shard info [--verify]``: summarise a shard set and check every shard against its manifest."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ddp_vad.data.format import ShardDamaged, iter_shard
from ddp_vad.data.manifest import load_manifest
from ddp_vad.errors import UserError
from ddp_vad.files import sha256_file


def _verify_one(shard_dir: Path, entry: dict, manifest: dict) -> str | None:
    """The problem of one listed shard, or None: existence, sha256, then every block decoded and checked."""
    path = shard_dir / entry["name"]
    if not path.is_file():
        return f"{entry['name']}: missing"
    if sha256_file(path) != entry["sha256"]:
        return f"{entry['name']}: sha256 mismatch"
    blocks = frames = 0
    try:
        for block in iter_shard(shard_dir, entry, manifest):
            blocks += 1
            frames += len(block.frames)
    except ShardDamaged as exc:
        return f"{entry['name']}: {exc.reason}"
    for key, got in (("blocks", blocks), ("frames", frames)):
        if key in entry and entry[key] != got:
            return f"{entry['name']}: {got} {key}, manifest says {entry[key]}"
    return None


def verify_shards(shard_dir: str | Path, show_progress: bool = True) -> list[str]:
    """Re-read every shard; return one problem string per bad shard (empty list when all is well).

    Checks: tars not listed in the manifest, missing tars, sha256, the tar structure (ustar header checksums, no
    truncation), every block's members, frame shape and dtype, window metadata, and the per-shard counts of windows,
    blocks and frames.
    """
    manifest = load_manifest(shard_dir)
    shard_dir = Path(shard_dir)
    listed = {s["name"] for s in manifest["shards"]}
    strays = sorted(p.name for p in shard_dir.glob("*.tar") if p.name not in listed)
    problems = [f"{name}: not listed in the manifest" for name in strays]
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not show_progress):
        problem = _verify_one(shard_dir, entry, manifest)
        if problem:
            problems.append(problem)
    return problems


def format_info(manifest: dict) -> str:
    """Human-readable summary of a manifest: counts, class balance, folds, storage."""
    c = manifest["counts"]
    kept = max(c["kept"], 1)
    stored = sum(s["frames"] for s in manifest["shards"])
    lines = [
        f"dataset      {manifest['dataset']}  (source: {manifest['source']})",
        f"windows      {manifest['window']} frames of {manifest['height']}x{manifest['width']} (HxW), "
        f"stride {manifest['stride']}, anomalous when >= {manifest['min_anomalous']} frames are",
        f"clips        {c['clips']} ({c['train_clips']} train, {c['test_clips']} test)",
        f"all windows  {c['windows']}: {c['anomalous']} anomalous, {c['normal']} normal",
        f"in shards    {c['kept']} ({manifest['balance']}): {c['kept_anomalous']} anomalous "
        f"({100 * c['kept_anomalous'] / kept:.1f}%), {c['kept_normal']} normal",
        f"shards       {len(manifest['shards'])} tar files, {sum(s['blocks'] for s in manifest['shards'])} blocks, "
        f"{stored} frames stored, seed {manifest['seed']}, {manifest['folds']} folds",
    ]
    for protocol, info in manifest.get("protocols", {}).items():
        if not info["available"]:
            lines.append(f"folds/{protocol:<6} unavailable (fewer clips than folds)")
            continue
        sizes = " ".join(f"{f['anomalous']}/{f['windows']}" for f in info["folds"])
        lines.append(f"folds/{protocol:<6} anomalous/windows per fold: {sizes}")
        empty = info.get("folds_without_anomaly") or []
        if empty:
            lines.append(f"             folds without any anomaly: {empty} (their recall/precision are undefined)")
    types = sorted({t for ts in manifest.get("anomaly_types", {}).values() for t in ts})
    if types:
        lines.append(f"anomaly types {', '.join(types)}")
    return "\n".join(lines)


def print_info(directory: str, verify: bool = False) -> None:
    """``ddp_vad shard info``: print the summary; with ``verify`` check every shard (UserError on problems)."""
    manifest = load_manifest(directory)
    print(format_info(manifest))
    if verify:
        problems = verify_shards(directory)
        if problems:
            for p in problems:
                print(f"BAD  {p}")
            raise UserError(f"{len(problems)} problem(s) in {directory}: {problems[0]}")
        print(f"verify       OK: {len(manifest['shards'])} shards, {manifest['counts']['kept']} samples, sha256 match")
