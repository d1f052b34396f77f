"""Every data source ends in the same arrays; every bad input gives one clear DataError."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest

from cifar_archives import (CIFAR10_CLASSES, Exploit, cifar10_binary_files, cifar10_python_files,
                            cifar100_binary_files, cifar100_python_files, image_folder_files, png_bytes,
                            write_folder, write_tar)
from cudacnn.data import load_dataset, read_source
from cudacnn.data.cifar import OFFICIAL, OfficialArchive
from cudacnn.download import download
from cudacnn.errors import DataError


def assert_split(split, images, labels):
    np.testing.assert_array_equal(split.images, images)
    np.testing.assert_array_equal(split.labels, labels)


# ------------------------------------------------------------------ official layouts

def test_cifar10_binary_archive_and_folder(tmp_path):
    files, train, test = cifar10_binary_files()
    for source in (write_tar(tmp_path / "cifar-10-binary.tar.gz", files), write_folder(tmp_path / "x", files)):
        ds = read_source(source)
        assert ds.name == "cifar10" and ds.classes == CIFAR10_CLASSES
        assert_split(ds.train, *train)
        assert_split(ds.test, *test)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    files, train, test = cifar100_binary_files()
    ds = read_source(write_tar(tmp_path / "c100.tar.gz", files))
    assert ds.name == "cifar100" and len(ds.classes) == 100 and ds.classes[3] == "fine03"
    assert_split(ds.train, *train)
    assert_split(ds.test, *test)


def test_cifar10_python_version(tmp_path):
    files, train, test = cifar10_python_files()
    ds = read_source(write_tar(tmp_path / "cifar-10-python.tar.gz", files))
    assert ds.classes == CIFAR10_CLASSES
    assert_split(ds.train, *train)
    assert_split(ds.test, *test)


def test_cifar100_python_version(tmp_path):
    files, train, test = cifar100_python_files()
    above = write_folder(tmp_path / "extracted", files)
    for source in (above, above / "cifar-100-python"):  # the folder the archive extracts to, or the one above it
        ds = read_source(source)
        assert ds.classes[99] == "fine99"
        assert_split(ds.train, *train)
        assert_split(ds.test, *test)


def test_meta_file_without_class_names(tmp_path):
    import pickle

    files, _, _ = cifar10_python_files()
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({"num_vis": 3072}, protocol=2)
    with pytest.raises(DataError, match="batches.meta lacks the key 'label_names'"):
        read_source(write_folder(tmp_path / "x", files))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    files, _, _ = cifar10_python_files()
    files["cifar-10-batches-py/data_batch_3"] = pickle.dumps({b"data": Exploit(marker)}, protocol=2)
    with pytest.raises(DataError, match="data_batch_3.*not a plain CIFAR batch"):
        read_source(write_tar(tmp_path / "evil.tar.gz", files))
    assert not marker.exists()


# ------------------------------------------------------------------ image folders

def test_image_folder_tree_and_tarball(tmp_path):
    files, expected = image_folder_files()
    for source in (write_folder(tmp_path / "tree", files), write_tar(tmp_path / "tree.tar.gz", files)):
        ds = read_source(source)
        assert ds.classes == ["cat", "dog", "frog"]
        assert_split(ds.train, *expected["train"])
        assert_split(ds.test, *expected["test"])


def test_shared_jpeg_set_loads_in_full(cifar_jpeg, full_shared_set):
    per_class = (5000, 1000) if full_shared_set else (200, 50)  # the shared set, or the bundled sample of it
    assert cifar_jpeg.classes == CIFAR10_CLASSES
    assert len(cifar_jpeg.train) == 10 * per_class[0] and len(cifar_jpeg.test) == 10 * per_class[1]
    assert (cifar_jpeg.train.class_counts(10) == per_class[0]).all()
    assert (cifar_jpeg.test.class_counts(10) == per_class[1]).all()
    assert cifar_jpeg.train.images.shape == (10 * per_class[0], 32, 32, 3)


# ------------------------------------------------------------------ bad input

def test_missing_path():
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("/no/such/cifar.tar.gz")


def test_unknown_layout(tmp_path):
    with pytest.raises(DataError, match="not a layout cudacnn knows"):
        read_source(write_tar(tmp_path / "odd.tar.gz", {"readme.txt": b"hello"}))


def test_not_an_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder or a tar archive"):
        read_source(tmp_path / "notes.txt")


def test_truncated_archive(tmp_path):
    files, _, _ = cifar10_binary_files(per_batch=50)
    whole = write_tar(tmp_path / "whole.tar.gz", files).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_source(cut)


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
@pytest.mark.parametrize("damage", ["flipped byte", "no trailer"])
def test_archive_failing_its_checksum(tmp_path, damage, compression):
    """Damage the tar's own parsing never sees: only the CRC and length at the stream's end catch it."""
    files, _, _ = cifar10_binary_files()
    data = bytearray(write_tar(tmp_path / f"whole.tar.{compression}", files, compression).read_bytes())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        del data[-8:]
    bad = tmp_path / f"bad.tar.{compression}"
    bad.write_bytes(bytes(data))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_source(bad)


def test_garbage_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 10)
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_source(bad)


def test_binary_batch_with_partial_record(tmp_path):
    files, _, _ = cifar10_binary_files()
    files["cifar-10-batches-bin/data_batch_2.bin"] = files["cifar-10-batches-bin/data_batch_2.bin"][:-100]
    with pytest.raises(DataError, match="data_batch_2.bin.*not a whole number"):
        read_source(write_folder(tmp_path / "x", files))


def test_missing_batch_file(tmp_path):
    files, _, _ = cifar10_binary_files()
    del files["cifar-10-batches-bin/data_batch_4.bin"]
    with pytest.raises(DataError, match="data_batch_4.bin"):
        read_source(write_folder(tmp_path / "x", files))


def test_corrupt_image(tmp_path):
    files, _ = image_folder_files()
    files["tiny/train/cat/0002.png"] = b"\x89PNG\r\n\x1a\n garbage"
    with pytest.raises(DataError, match="0002.png is not a readable image"):
        read_source(write_folder(tmp_path / "x", files))


def test_empty_class_folder(tmp_path):
    files, _ = image_folder_files()
    root = write_folder(tmp_path / "x", files)
    for png in (root / "tiny/test/frog").glob("*.png"):
        png.unlink()
    (root / "tiny/test/frog/notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"test/frog holds no images \(.png, .jpg"):
        read_source(root)


def test_class_folders_differ_between_splits(tmp_path):
    files, _ = image_folder_files()
    files["tiny/test/zebra/0000.png"] = png_bytes(np.ones((32, 32, 3), np.uint8))
    with pytest.raises(DataError, match="differ"):
        read_source(write_folder(tmp_path / "x", files))


# ------------------------------------------------------------------ download

def _archive(tmp_path):
    files, train, _ = cifar10_binary_files()
    tar = write_tar(tmp_path / "served.tar.gz", files)
    md5 = hashlib.md5(tar.read_bytes()).hexdigest()
    return tar, md5, train


def test_download_verifies_and_renames(tmp_path, monkeypatch):
    tar, md5, train = _archive(tmp_path)
    archive = OfficialArchive("cifar10", tar.as_uri(), md5, "cifar-10-binary.tar.gz")
    monkeypatch.setitem(OFFICIAL, "cifar10", archive)
    ds = load_dataset("cifar10", cache_dir=tmp_path / "cache", data_dir=tmp_path / "data", quiet=True)
    assert_split(ds.train, *train)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["cifar-10-binary.tar.gz"]
    # The second call finds the verified file and does not fetch again.
    tar.unlink()
    assert download(archive, tmp_path / "data", quiet=True) == tmp_path / "data" / "cifar-10-binary.tar.gz"


def test_download_gets_the_umask_mode_and_names_an_unwritable_folder(tmp_path, monkeypatch):
    from cudacnn import atomic

    tar, md5, _ = _archive(tmp_path)
    archive = OfficialArchive("cifar10", tar.as_uri(), md5, "cifar-10-binary.tar.gz")
    monkeypatch.setattr(atomic, "_umask", lambda: 0o022)
    assert download(archive, tmp_path / "data", quiet=True).stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(DataError, match=f"cannot write to {blocked / 'data'}.*CUDACNN_DATA_DIR"):
        download(archive, blocked / "data", quiet=True)


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    tar, _, _ = _archive(tmp_path)
    archive = OfficialArchive("cifar10", tar.as_uri(), "0" * 32, "cifar-10-binary.tar.gz")
    with pytest.raises(DataError, match="not the published"):
        download(archive, tmp_path / "data", quiet=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_download_unreachable_leaves_nothing(tmp_path):
    archive = OfficialArchive("cifar10", (tmp_path / "absent.tar.gz").as_uri(), "0" * 32, "c.tar.gz")
    with pytest.raises(DataError, match="could not download"):
        download(archive, tmp_path / "data", quiet=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_a_full_disk_during_a_download_is_the_disk_full_line_and_no_fallback(tmp_path, monkeypatch):
    import builtins
    import errno

    from cudacnn import download as download_module
    from cudacnn.errors import DiskFullError

    tar, md5, _ = _archive(tmp_path)
    monkeypatch.delenv("CUDACNN_DATA", raising=False)
    monkeypatch.setitem(OFFICIAL, "cifar10", OfficialArchive("cifar10", tar.as_uri(), md5, "cifar-10-binary.tar.gz"))

    class FullDisk:
        """The download's temporary file on a disk that fills up at the first block."""

        def __init__(self, path, mode):
            self.file = builtins.open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, block):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "open", FullDisk, raising=False)
    target = tmp_path / "data" / "cifar-10-binary.tar.gz"
    with pytest.raises(DiskFullError, match=f"no space left on device writing {target}; free space"):
        load_dataset(None, cache_dir=tmp_path / "c", data_dir=tmp_path / "data", quiet=True, fallback_to_sample=True)
    assert list((tmp_path / "data").iterdir()) == []  # nothing half-written


def test_a_connection_lost_mid_transfer_is_a_download_error(tmp_path, monkeypatch):
    import io
    import urllib.request

    from cudacnn.download import DownloadError

    class Dropped(io.BytesIO):
        headers = {"Content-Length": "100"}

        def read(self, size=-1):
            raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Dropped())
    archive = OfficialArchive("cifar10", "http://example.invalid/c.tar.gz", "0" * 32, "c.tar.gz")
    with pytest.raises(DownloadError, match=r"could not download .*Connection reset by peer.*check your connection"):
        download(archive, tmp_path / "data", quiet=True)
    assert list((tmp_path / "data").iterdir()) == []


def test_an_unreadable_existing_download_is_one_line(tmp_path, monkeypatch):
    from cudacnn import download as download_module

    (tmp_path / "c.tar.gz").write_bytes(b"x")
    archive = OfficialArchive("cifar10", "file:///unused", "0" * 32, "c.tar.gz")

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(download_module, "digests_of", unreadable)  # root reads any file: deny it here
    with pytest.raises(DataError, match=r"c.tar.gz cannot be read \(Permission denied\); fix its permissions"):
        download(archive, tmp_path, quiet=True)


def test_existing_file_with_wrong_checksum_is_reported(tmp_path):
    (tmp_path / "c.tar.gz").write_bytes(b"not it")
    archive = OfficialArchive("cifar10", "file:///unused", "0" * 32, "c.tar.gz")
    with pytest.raises(DataError, match="has MD5 .*, not the published 0{32}; delete it"):
        download(archive, tmp_path, quiet=True)
