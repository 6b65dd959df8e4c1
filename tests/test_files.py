"""Results appear whole (files.py): a write that fails or is interrupted half-way leaves the old file as it was
under the real name, and no temp file beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ddp_vad.files import atomic_path, write_json_atomic


def _half_then(exc: BaseException):
    """A ``Path.write_text`` that writes the first half of the text, then raises ``exc`` (Ctrl-C, a full disk)."""
    real = Path.write_text

    def write_text(self: Path, text: str, *args, **kwargs) -> int:
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise exc

    return write_text


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), OSError(28, "No space left on device")])
@pytest.mark.parametrize("existed", [True, False])
def test_an_interrupted_atomic_write_leaves_the_old_content_and_no_temp_file(tmp_path, monkeypatch, exc, existed):
    target = tmp_path / "result.json"
    if existed:
        target.write_text('{"old": 1}\n')
    monkeypatch.setattr(Path, "write_text", _half_then(exc))
    with pytest.raises(type(exc)):
        write_json_atomic(target, {"half": "of this never shows"})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["result.json"] if existed else [])
    if existed:
        assert json.loads(target.read_text()) == {"old": 1}


def test_a_failed_block_removes_what_it_wrote_and_a_whole_one_replaces_the_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent and tmp.suffix == ".png"
        tmp.write_bytes(b"half")
        raise RuntimeError("the writer failed")
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"] and target.read_bytes() == b"old"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # the real name changes only when the block ends well
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"] and target.read_bytes() == b"new"
