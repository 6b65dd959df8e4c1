"""The tar layer of the shards: a ustar writer that hashes while it writes, and a strict ustar member reader.

Both write and read the same bytes as ``tarfile``/webdataset (a shard written here is byte-identical to one written
by ``webdataset.TarWriter(encoder=False, mtime=0)``, and webdataset reads it), but they move each member in one or
two buffers instead of ``tarfile``'s stream chunks. They are kept because the side-by-side measurement in
``benchmarks/bench_data.py`` (tar I/O table) shows webdataset's ``TarWriter`` (with a hashing file wrapper) and
``tar_file_iterator`` clearly slower on the same blocks; the figures are in docs/shard-format.md.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

BLOCKSIZE = tarfile.BLOCKSIZE


class TarShardWriter:
    """Writes a webdataset tar (members ``<key>.<ext>``, USTAR headers, mtime 0) while hashing it (sha256)."""

    def __init__(self, path: str | Path):
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0

    def _write(self, data) -> None:
        self.sha.update(data)
        self.file.write(data)
        self.size += len(data)

    def add(self, name: str, payload) -> None:
        """Append one member; ``payload`` is bytes, a contiguous buffer, or a list of them (concatenated)."""
        parts = [memoryview(p).cast("B") for p in (payload if isinstance(payload, list) else [payload])]
        size = sum(len(p) for p in parts)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        info.uname = info.gname = "bigdata"
        self._write(info.tobuf(format=tarfile.USTAR_FORMAT))
        for part in parts:  # no concatenation: the frames go out straight from the decoded clip
            self._write(part)
        if size % BLOCKSIZE:
            self._write(b"\0" * (BLOCKSIZE - size % BLOCKSIZE))

    def close(self) -> str:
        """Finish the archive (two zero blocks, padded to a full record); return its sha256."""
        end = 2 * BLOCKSIZE
        end += (-(self.size + end)) % tarfile.RECORDSIZE
        self._write(b"\0" * end)
        self.file.close()
        return self.sha.hexdigest()

    def abort(self) -> None:
        """Close the file without finishing it (the caller removes it)."""
        self.file.close()


def _octal(field: bytes, what: str) -> int:
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise ValueError(f"bad {what} field in a tar header") from None


def _check_header(header: bytes) -> None:
    """Raise ValueError unless ``header`` is a ustar header with a correct checksum."""
    if header[257:262] != b"ustar":
        raise ValueError("not a ustar header (broken tar header)")
    stored = _octal(header[148:156], "checksum")
    # The checksum counts the checksum field itself as eight spaces (POSIX ustar).
    if sum(header[:148]) + 8 * 32 + sum(header[156:]) != stored:
        raise ValueError("tar header checksum mismatch (broken tar header)")


def tar_members(path: str | Path, want: Callable[[str], bool] | None = None) -> Iterator[tuple[str, bytearray | None]]:
    """(name, payload) of each regular file of a ustar archive, in file order; ``want(name)`` False skips the
    payload (seeks past it, payload None).

    Strict: a header that is not ustar or fails its checksum, a truncated member or a missing end-of-archive marker
    raises ValueError (the members before it have been yielded). Directories are skipped; other member types, pax
    and GNU extensions are errors: shards hold regular files only.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        while True:
            header = f.read(BLOCKSIZE)
            if len(header) < BLOCKSIZE:
                raise ValueError("truncated tar (no end-of-archive marker)")
            if header.count(0) == BLOCKSIZE:
                return
            _check_header(header)
            typeflag = header[156:157]
            if typeflag not in (b"0", b"\0", b"5"):
                raise ValueError(f"unexpected tar member type {typeflag!r}")
            size = _octal(header[124:136], "size")
            padded = size + (-size) % BLOCKSIZE
            name = header[0:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0]
            full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            if typeflag == b"5":
                continue
            if want is not None and not want(full):
                if f.tell() + padded > file_size:
                    raise ValueError("truncated tar member")
                f.seek(padded, 1)
                yield full, None
                continue
            payload = bytearray(size)  # writable: arrays over it can become torch tensors without a copy
            if f.readinto(payload) < size:
                raise ValueError("truncated tar member")
            f.seek(padded - size, 1)  # padding to the next block
            yield full, payload
