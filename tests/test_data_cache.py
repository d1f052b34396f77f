"""The decoded cache: reused, invalidated by a changed source, rebuilt when corrupt, written atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from cifar_archives import image_folder_files, png_bytes, write_folder, write_tar
from cudacnn.data import load_dataset, split_validation, stratified_split
from cudacnn.data import sources
from cudacnn.errors import DataError


def _count_reads(monkeypatch):
    calls = []
    real = sources.read_source
    monkeypatch.setattr(sources, "read_source", lambda p, *args: calls.append(p) or real(p, *args))
    return calls


def test_second_load_reads_the_cache(tmp_path, monkeypatch):
    files, expected = image_folder_files()
    tar = write_tar(tmp_path / "t.tar.gz", files)
    calls = _count_reads(monkeypatch)
    first = load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    second = load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    assert len(calls) == 1
    assert second.cache_path == first.cache_path and second.cache_path.exists()
    np.testing.assert_array_equal(second.train.images, expected["train"][0])
    assert second.classes == first.classes
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]  # no temp files


def test_changed_source_invalidates(tmp_path, monkeypatch):
    files, _ = image_folder_files()
    root = write_folder(tmp_path / "tree", files)
    calls = _count_reads(monkeypatch)
    first = load_dataset(root, cache_dir=tmp_path / "cache", quiet=True)
    new = np.full((32, 32, 3), 77, np.uint8)
    target = root / "tiny/train/cat/0000.png"
    target.write_bytes(png_bytes(new))
    os.utime(target, ns=(1, 1))  # a different mtime even on coarse clocks
    second = load_dataset(root, cache_dir=tmp_path / "cache", quiet=True)
    assert len(calls) == 2
    np.testing.assert_array_equal(second.train.images[0], new)
    assert not first.cache_path.exists() or first.cache_path == second.cache_path


def test_corrupt_cache_is_rebuilt_with_warning(tmp_path, monkeypatch, caplog):
    files, expected = image_folder_files()
    tar = write_tar(tmp_path / "t.tar.gz", files)
    first = load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    first.cache_path.write_bytes(first.cache_path.read_bytes()[:1000])  # a partial file
    calls = _count_reads(monkeypatch)
    with caplog.at_level(logging.WARNING):
        again = load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    assert len(calls) == 1 and "rebuilding" in caplog.text
    np.testing.assert_array_equal(again.test.images, expected["test"][0])


def test_corrupt_cache_that_cannot_be_deleted_or_replaced_is_named(tmp_path, monkeypatch, caplog):
    """A corrupt cache another user owns in a sticky folder (e.g. /tmp): neither deleted nor replaced. One warning,
    then one message naming the file and the fix; no traceback, and the source itself is fine."""
    import os
    from pathlib import Path

    files, _ = image_folder_files()
    tar = write_tar(tmp_path / "t.tar.gz", files)
    first = load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    first.cache_path.write_bytes(b"not a cache")
    real_unlink, real_replace = Path.unlink, os.replace

    def refuse_unlink(self, missing_ok=False):
        if self == first.cache_path:
            raise PermissionError(13, "Permission denied", str(self))
        real_unlink(self, missing_ok=missing_ok)

    def refuse_replace(src, dst):
        if Path(dst) == first.cache_path:
            raise PermissionError(13, "Permission denied", str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(Path, "unlink", refuse_unlink)
    monkeypatch.setattr(os, "replace", refuse_replace)
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as failed:
        load_dataset(tar, cache_dir=tmp_path / "cache", quiet=True)
    assert "could not delete the cache" in caplog.text
    assert str(failed.value) == (f"could not write the cache {first.cache_path} (Permission denied); free disk "
                                 "space, or pass --cache-dir a folder you can write to")
    assert [p.name for p in first.cache_path.parent.iterdir()] == [first.cache_path.name]  # no temporary file


def test_cache_file_mode_follows_the_umask(tmp_path, monkeypatch):
    from cudacnn import atomic

    monkeypatch.setattr(atomic, "_umask", lambda: 0o027)
    files, _ = image_folder_files()
    ds = load_dataset(write_tar(tmp_path / "t.tar.gz", files), cache_dir=tmp_path / "cache", quiet=True)
    assert ds.cache_path.stat().st_mode & 0o777 == 0o640  # readable by the group, as open() would make it


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write to read-only folders")
def test_unwritable_cache_dir(tmp_path):
    files, _ = image_folder_files()
    tar = write_tar(tmp_path / "t.tar.gz", files)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(DataError, match="not writable"):
        load_dataset(tar, cache_dir=locked / "cache", quiet=True)


def test_cache_dir_that_is_a_file(tmp_path):
    files, _ = image_folder_files()
    tar = write_tar(tmp_path / "t.tar.gz", files)
    (tmp_path / "blocker").write_text("a file where the cache folder should be")
    with pytest.raises(DataError, match="not writable"):
        load_dataset(tar, cache_dir=tmp_path / "blocker", quiet=True)


def test_stratified_split_is_seeded_and_balanced():
    labels = np.repeat(np.arange(10), 100)
    train, val = stratified_split(labels, 0.1, seed=3)
    assert len(val) == 100 and (np.bincount(labels[val], minlength=10) == 10).all()
    assert len(np.intersect1d(train, val)) == 0 and len(train) + len(val) == 1000
    np.testing.assert_array_equal(val, stratified_split(labels, 0.1, seed=3)[1])
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=4)[1])


def test_split_validation_moves_images(tmp_path):
    files, expected = image_folder_files(per_class=10)
    ds = load_dataset(write_tar(tmp_path / "t.tar.gz", files), cache_dir=tmp_path / "c", quiet=True)
    train, val = split_validation(ds.train, 0.2, seed=0)
    assert len(train) == 24 and len(val) == 6
    assert (val.class_counts(3) == 2).all()


def test_data_cache_lists_and_clears(tmp_path, capsys):
    from cudacnn.cli import main
    from cudacnn.data import cache

    cache_dir, data_dir = tmp_path / "cache", tmp_path / "downloads"
    for name, classes in (("a", ("x", "y")), ("b", ("x", "y", "z"))):
        files, _ = image_folder_files(classes=classes)
        load_dataset(write_tar(tmp_path / f"{name}.tar.gz", files), cache_dir=cache_dir, quiet=True)
    data_dir.mkdir()
    (data_dir / "cifar-10-binary.tar.gz").write_bytes(b"0" * 2048)  # as `cudacnn data download cifar10` leaves it
    entries = cache.list_entries(cache_dir, data_dir)
    by_kind = sorted((e.kind, Path(e.source).name) for e in entries)
    assert by_kind[:2] == [("decoded", "a.tar.gz"), ("decoded", "b.tar.gz")] and by_kind[2][0] == "download"
    assert all(e.size == e.path.stat().st_size > 0 for e in entries)
    flags = ["--cache-dir", str(cache_dir), "--dir", str(data_dir)]
    assert main(["data", "cache", *flags]) == 0
    assert "total" in capsys.readouterr().out
    assert main(["data", "cache", "--clear", "a.tar.gz", *flags]) == 0
    assert [Path(e.source).name for e in cache.list_entries(cache_dir, data_dir) if e.kind == "decoded"] == ["b.tar.gz"]
    assert main(["data", "cache", "--clear", "cifar10", *flags]) == 0
    assert not (data_dir / "cifar-10-binary.tar.gz").exists()
    capsys.readouterr()
    assert main(["data", "cache", "--clear", "nothing", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no cached source matches 'nothing'" in err
    assert main(["data", "cache", "--clear", *flags]) == 0  # a bare --clear: all
    assert cache.list_entries(cache_dir, data_dir) == []


def test_clearing_sample_removes_the_samples_decoded_caches_only(tmp_path, capsys):
    from cudacnn.cli import main
    from cudacnn.data import cache
    from cudacnn.data.sources import sample_path

    cache_dir, data_dir = tmp_path / "cache", tmp_path / "downloads"
    files, _ = image_folder_files(classes=("x", "y"))
    load_dataset(write_tar(tmp_path / "a.tar.gz", files), cache_dir=cache_dir, quiet=True)
    # a decoded cache of the sample, as `--data sample` writes it (its meta names the packaged archive)
    np.savez(cache_dir / "cifar10-sample.tar.gz-0-s32-0.npz", meta=json.dumps({"source": str(sample_path())}))
    flags = ["--cache-dir", str(cache_dir), "--dir", str(data_dir)]
    assert main(["data", "cache", "--clear", "sample", *flags]) == 0
    assert "removed" in capsys.readouterr().out and not (cache_dir / "cifar10-sample.tar.gz-0-s32-0.npz").exists()
    assert [Path(e.source).name for e in cache.list_entries(cache_dir, data_dir)] == ["a.tar.gz"]
    assert sample_path().is_file()
