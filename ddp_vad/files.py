"""Files that appear whole or not at all: atomic file writes, staged folders, checksums and JSON objects.

Every file the toolkit writes goes through :func:`atomic_path` (a hidden temp name in the same folder, renamed when
complete), and every folder that is built as a whole (a shard set, a synthetic dataset, a report) through
:func:`staging_folder` + :func:`swap_in`. A ``kill -9`` therefore leaves at most a hidden temp file or staging
folder, never a torn one under the real name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ddp_vad.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden temp path beside ``path``; rename it onto ``path`` when the block succeeds, else remove it.

    The temp name keeps the suffix (``.x.tmp.png``) so that writers that pick a format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with naming(path):
            yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_pair(main: str | os.PathLike, companion: str | os.PathLike) -> Iterator[tuple[Path, Path]]:
    """Yield hidden temp paths for a file and the companion that describes it (an ONNX graph and its sidecar); when
    the block succeeds, remove the old companion, rename the main file into place, then the companion, last.

    An interruption or failure therefore leaves the old pair whole, or (between the renames) the main file without a
    companion, never a main file beside a companion written for another one; the temp files are removed.
    """
    main, companion = Path(main), Path(companion)
    make_folder(main.parent)
    make_folder(companion.parent)
    tmp_main = main.with_name(f".{main.stem}.tmp{main.suffix}")
    tmp_companion = companion.with_name(f".{companion.stem}.tmp{companion.suffix}")
    try:
        with naming(main):
            yield tmp_main, tmp_companion
        companion.unlink(missing_ok=True)  # from here the old main file has no companion rather than a stale one
        os.replace(tmp_main, main)
        os.replace(tmp_companion, companion)  # last: the pair is complete
    finally:
        tmp_main.unlink(missing_ok=True)
        tmp_companion.unlink(missing_ok=True)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise an OSError that names no file (a write to an open file failed: disk full, quota, I/O error) as one
    naming ``path``, so that its one-line message says which file was being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` (whole lines) to ``path``. A failed write (disk full) cuts the file back to where it ended, so
    it never ends in a torn line; the error names ``path``."""
    data = text.encode()
    with naming(path):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            except BaseException:  # a full disk, or Ctrl-C between two partial writes
                with contextlib.suppress(OSError):  # not every file can be cut (/dev/full); keep the first error
                    os.ftruncate(fd, end)
                raise
        finally:
            os.close(fd)


def make_folder(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a regular file in the way is a NotADirectoryError naming that file (mkdir says only
    "File exists")."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        why = "is a file, not a folder" + ("" if blocker == path else f" (needed for {path})")
        raise NotADirectoryError(errno.ENOTDIR, why, str(blocker)) from None
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, tuples and numpy values -> plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def write_json_atomic(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` (dataclasses, paths and numpy values allowed) as indented JSON, atomically."""
    return write_text_atomic(path, json.dumps(to_jsonable(payload), indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """Read a JSON file that must hold an object; bad JSON or another type is a UserError naming the path."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not a text file") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object")
    return data


def sha256_file(path: str | os.PathLike, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(block), b""):
            h.update(chunk)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """``{"bytes": size, "sha256": hex}`` of a file: what a writer records so that a reader can tell the file it
    wrote from a changed, truncated or swapped one (:func:`record_problem`)."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def record_problem(path: str | os.PathLike, record: Any) -> str | None:
    """Why ``path`` is not the file ``record`` (from :func:`file_record`) describes, or None when it is."""
    if not isinstance(record, dict) or not isinstance(record.get("bytes"), int) or "sha256" not in record:
        return "its size/sha256 record is malformed"
    size = Path(path).stat().st_size
    if size != record["bytes"]:
        return f"{size} bytes, {record['bytes']} recorded"
    if sha256_file(path) != record["sha256"]:
        return "its sha256 differs from the one recorded"
    return None


def staging_folder(out: str | os.PathLike) -> Path:
    """A fresh, empty hidden folder beside ``out`` to build it in (one left by a killed build is removed first)."""
    out = Path(out)
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    return stage


def swap_in(stage: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Replace ``out`` with the finished ``stage`` folder; the old ``out`` survives until the new one is in place."""
    stage, out = Path(stage), Path(out)
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(stage, out)
    if old.exists():
        shutil.rmtree(old)
    return out
