import json
import os
import stat

import pytest

from autoseg.fileio import atomic_path, atomic_write, read_json, write_json


def test_write_json_is_deterministic_and_readable(tmp_path):
    path = tmp_path / "sub" / "a.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    first = path.read_bytes()
    write_json(path, {"a": [1, 2], "b": 1})
    assert path.read_bytes() == first and first.endswith(b"\n")
    assert read_json(path) == {"a": [1, 2], "b": 1}


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"old": True})

    def broken(handle):
        handle.write(b"{half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, broken)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_written_files_follow_the_umask_not_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "seg.nii.gz") as tmp:
            assert tmp.name.endswith(".nii.gz")  # writers that pick the format by extension still work
            tmp.write_bytes(b"data")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "seg.nii.gz").stat().st_mode)
    assert mode == 0o644


def test_disk_full_becomes_one_line_write_error_naming_the_file(tmp_path, monkeypatch):
    import errno

    from autoseg.errors import WriteError

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(WriteError, match="disk full") as caught:
        write_json(tmp_path / "plans.json", {"a": 1})
    assert str(tmp_path / "plans.json") in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_write_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    from autoseg.errors import WriteError

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(WriteError, match="not writable"):
        write_json(tmp_path / "out" / "x.json", {})


def test_remove_partial_files_takes_all_or_only_the_named_targets(tmp_path):
    from autoseg.fileio import remove_partial_files

    for name in (".a[1].nii.gz.x1.partial.nii.gz", ".b.nii.gz.x2.partial.nii.gz", ".a1.nii.gz.x3.partial.nii.gz",
                 "a[1].nii.gz"):
        (tmp_path / name).write_bytes(b"")
    assert remove_partial_files(tmp_path, ["a[1].nii.gz"]) == 1  # brackets are a name, not a glob class
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a1.nii.gz.x3.partial.nii.gz",
                                                          ".b.nii.gz.x2.partial.nii.gz", "a[1].nii.gz"]
    assert remove_partial_files(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a[1].nii.gz"]
    assert remove_partial_files(tmp_path / "missing") == 0
