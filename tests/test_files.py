"""fastdiff.files.write_atomic: the one way fastdiff writes a file (a complete file or the old one, never half)."""

from __future__ import annotations

import json
import os

import pytest

from fastdiff import files


def test_bytes_text_and_json(tmp_path):
    p = files.write_atomic(tmp_path / "a.bin", b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    files.write_text_atomic(tmp_path / "b.txt", "héllo\n")
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    files.write_json_atomic(tmp_path / "c.json", {"b": 1, "a": [2]}, sort_keys=True)
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [2], "b": 1} and text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json"]  # no temporaries left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def writer(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, writer)
    assert target.read_bytes() == b"old"
    assert [q.name for q in tmp_path.iterdir()] == ["model.safetensors"]


def test_writer_functions_and_permissions(tmp_path):
    def writer(tmp):
        with open(tmp, "w") as f:
            f.write("x")
        os.chmod(tmp, 0o600)  # as safetensors creates its files

    p = files.write_atomic(tmp_path / "w", writer)
    umask = os.umask(0)
    os.umask(umask)
    assert p.read_text() == "x" and (p.stat().st_mode & 0o777) == (0o666 & ~umask)
    assert (files.write_atomic(tmp_path / "m", b"", mode=0o640).stat().st_mode & 0o777) == (0o640 & ~umask)


def test_the_mode_follows_the_umask_which_is_never_set(tmp_path, monkeypatch):
    """Bytes get ``mode`` less the umask in force (the kernel applies it: the temporary is created with os.open and
    that mode); a writer function's file gets ``mode`` less the umask read at import. write_atomic never calls
    os.umask, which sets the process-wide umask (read-by-setting races with other threads creating files)."""
    real_umask = os.umask
    process_umask = real_umask(0o027)
    try:
        assert files._UMASK == process_umask  # read at import, and nothing has changed it since

        def no_umask(*args):
            raise AssertionError("write_atomic called os.umask")

        monkeypatch.setattr(os, "umask", no_umask)
        assert (files.write_atomic(tmp_path / "a", b"x").stat().st_mode & 0o777) == 0o640
        assert (files.write_atomic(tmp_path / "b", b"x", mode=0o606).stat().st_mode & 0o777) == 0o600
        assert (files.write_text_atomic(tmp_path / "c", "x").stat().st_mode & 0o777) == 0o640
        w = files.write_atomic(tmp_path / "w", lambda tmp: tmp.write_bytes(b"x"), mode=0o660)
        assert (w.stat().st_mode & 0o777) == 0o660 & ~process_umask
    finally:
        real_umask(process_umask)


def test_a_stale_temporary_does_not_pass_on_its_mode(tmp_path):
    target = tmp_path / "a"
    stale = files.temporary_name(target)
    stale.write_bytes(b"stale")
    stale.chmod(0o600)
    umask = files._UMASK
    assert (files.write_atomic(target, b"new").stat().st_mode & 0o777) == 0o666 & ~umask
    assert target.read_bytes() == b"new" and not stale.exists()


def test_the_fsync_of_a_written_file_opens_it_read_only(tmp_path, monkeypatch):
    """A writer may leave its file read-only (0o444): the fsync must not need write access to it."""
    modes = []
    real_open = open

    def spy(file, mode="r", *args, **kwargs):
        modes.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(files, "open", spy, raising=False)

    def writer(tmp):
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o444)

    assert files.write_atomic(tmp_path / "r", writer, mode=0o444).read_bytes() == b"x"
    assert modes and all(set(m) <= set("rb") for m in modes), modes


def test_temporary_names():
    tmp = files.temporary_name("/x/000001.png")
    assert tmp.parent.as_posix() == "/x" and files.is_temporary(tmp.name) and tmp.name.startswith(".000001.png.")
    assert not files.is_temporary("000001.png") and not files.is_temporary(".hidden")
