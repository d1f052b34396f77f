"""Atomic outputs: whole or absent, with the mode a plain open() would give."""

from __future__ import annotations

import pytest

from cudacnn import atomic


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_the_umask_allows(tmp_path, monkeypatch, umask, mode):
    monkeypatch.setattr(atomic, "_umask", lambda: umask)
    path = atomic.write_text_atomic(tmp_path / "sub" / "out.txt", "hello")
    assert path.read_text() == "hello" and path.stat().st_mode & 0o777 == mode


def test_the_process_umask_is_the_one_read(tmp_path):
    """In a child whose umask is 027 (not the usual 022), outputs get what its plain open() gives: 0640."""
    import subprocess
    import sys

    script = ("import os, sys\nos.umask(0o027)\nfrom cudacnn import atomic\n"
              "print(oct(atomic.write_text_atomic(sys.argv[1], 'x').stat().st_mode & 0o777))")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out.txt")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "0o640"


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    (tmp_path / "out.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic.atomic_output(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"] and (tmp_path / "out.txt").read_text() == "old"


def test_errors_name_the_target_not_the_temporary_file(tmp_path):
    target = tmp_path / "out.json"
    target.mkdir()  # a folder where the file goes: the rename fails
    with pytest.raises(IsADirectoryError) as failed:
        atomic.write_text_atomic(target, "{}")
    assert failed.value.filename == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]  # no temporary file left
