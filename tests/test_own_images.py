"""Own image data: any size and mode brought to --image-size by one documented policy, the header checked before
decoding, class-folder trees split by a recorded seeded stratified split, parallel decoding equal to serial,
the size in the cache fingerprint, CIFAR-100 end to end, the bundled sample and the offline fallback to it."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_archives import CIFAR10_CLASSES, cifar10_binary_files, cifar100_binary_files, png_bytes, write_folder, write_tar
from cudacnn.cli import main
from cudacnn.train.checkpoint import load_checkpoint, run_checkpoint
from cudacnn.data import image_folder, load_dataset, read_source, sources
from cudacnn.data.image_folder import decode_image, decode_images, fit_image
from cudacnn.errors import ConfigError, DataError

REPO = Path(__file__).resolve().parent.parent


def reference_fit(pixels: np.ndarray, size: int) -> np.ndarray:
    """torchvision's eval transform, Resize(size) + CenterCrop(size), written with torch ops: the shorter side
    resized to `size` (antialiased bilinear, which torch makes match Pillow's filter), then the centre crop."""
    h, w = pixels.shape[:2]
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None].double()
    out = F.interpolate(image, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
    return out[:, top:top + size, left:left + size].permute(1, 2, 0).round().clamp(0, 255).byte().numpy()


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image (low-frequency noise): resizers agree on it to within rounding."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (1, 3, 5, 5)))
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0].permute(1, 2, 0) \
        .clamp(0, 255).round().byte().numpy()


# ------------------------------------------------------------------ the resize policy

@pytest.mark.parametrize("h,w,size", [(96, 64, 32), (64, 160, 32), (50, 50, 32), (20, 30, 48)])
def test_shorter_side_then_centre_crop(h, w, size):
    pixels = smooth_image(h, w, seed=h + w)
    got = fit_image(Image.fromarray(pixels), size)
    assert got.shape == (size, size, 3) and got.dtype == np.uint8
    diff = np.abs(got.astype(int) - reference_fit(pixels, size).astype(int))
    assert diff.max() <= 3 and diff.mean() < 0.75, (diff.max(), diff.mean())  # rounding: Pillow works in 8 bits
    if h != w:  # the tolerance tells the policy apart: stretching the whole image instead is far off
        stretched = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
        assert np.abs(stretched.astype(int) - got.astype(int)).max() > 10


def test_the_bands_outside_the_centre_square_are_cut():
    pixels = np.zeros((120, 60, 3), np.uint8)
    pixels[:30] = pixels[90:] = 255  # white above and below the centre 60x60 square
    pixels[30:90] = 40
    got = fit_image(Image.fromarray(pixels), 32)
    # inside, only the square; the edge rows' filter reaches a pixel past the crop, as torchvision's does
    assert (got[1:-1] == 40).all() and got.max() < 100


def test_an_image_of_the_target_size_keeps_its_pixels():
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(Image.fromarray(pixels), 32), pixels)


def test_modes_become_rgb():
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(Image.fromarray(grey, "L"), 32), np.repeat(grey[..., None], 3, 2))
    rgba = rng.integers(0, 256, (32, 32, 4), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(Image.fromarray(rgba, "RGBA"), 32), rgba[..., :3])
    deep = np.array([[0, 257 * 128, 65535, 257 * 7]], np.uint16).repeat(32, 0).repeat(8, 1)
    deep_rgb = fit_image(Image.fromarray(deep), 32)  # 16-bit values are scaled, not clipped at 255
    np.testing.assert_array_equal(deep_rgb[0, ::8, 0], [0, 128, 255, 7])
    palette = Image.fromarray(rgba[..., :3]).quantize(8)
    np.testing.assert_array_equal(fit_image(palette, 32), np.asarray(palette.convert("RGB")))


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_still_matches():
    """draft() decodes a 640x480 JPEG at 1/8 scale (80x60); the result is still the policy's image."""
    pixels = smooth_image(480, 640, seed=3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    got = decode_image(("photo.jpg", buffer.getvalue()), 32)
    assert isinstance(got, np.ndarray)
    assert np.abs(got.astype(int) - reference_fit(pixels, 32).astype(int)).max() <= 6


def test_exif_orientation_is_applied():
    pixels = np.zeros((40, 80, 3), np.uint8)
    pixels[:, :40] = 255  # left half white, stored landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown portrait, the white half on top
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", exif=exif)
    got = decode_image(("phone.png", buffer.getvalue()), 32)
    assert got[:8].mean() > 200 and got[-8:].mean() < 50


# ------------------------------------------------------------------ the size limit, from the header

def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header says width x height, with a few bytes of image data: any decoding fails."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_a_huge_image_is_refused_from_its_header():
    message = decode_image(("scan.png", png_header_only(13000, 13000)), 32)
    # the size message, not a decoding error: nothing was decoded
    assert message == ("scan.png is 13000x13000 (169,000,000 pixels), over the limit of 64,000,000 (a decompression "
                       "bomb, or a huge scan); shrink it below the limit or remove it")
    assert "not a readable image" in decode_image(("small.png", png_header_only(300, 200)), 32)


def test_a_huge_image_in_a_folder_fails_the_load_in_one_line(tmp_path):
    files = {f"imgs/{c}/{i}.png": png_bytes(np.full((8, 8, 3), i, np.uint8)) for c in "ab" for i in range(3)}
    files["imgs/b/bomb.png"] = png_header_only(20000, 20000)
    # Pillow itself refuses this one already when reading the header (over twice its own limit)
    with pytest.raises(DataError, match=r"bomb.png is over the limit of 64,000,000 pixels \(Image size \(400000000 "):
        read_source(write_folder(tmp_path / "x", files))


# ------------------------------------------------------------------ layouts

def mixed_tree(classes=("ant", "bee", "cat"), per_class=10, seed=0) -> dict[str, bytes]:
    """<root>/<class>/<file> images of mixed sizes, modes and formats."""
    rng = np.random.default_rng(seed)
    files = {}
    for c, cls in enumerate(classes):
        for i in range(per_class):
            h, w = rng.integers(20, 90, 2)
            pixels = smooth_image(int(h), int(w), seed=100 * c + i)
            kind = i % 4
            if kind == 0:
                files[f"pics/{cls}/{i:03d}.png"] = png_bytes(pixels)
            elif kind == 1:
                files[f"pics/{cls}/{i:03d}.png"] = png_bytes(pixels, mode="L")
            elif kind == 2:
                files[f"pics/{cls}/{i:03d}.png"] = png_bytes(pixels, mode="RGBA")
            else:
                files[f"pics/{cls}/{i:03d}.JPG"] = png_bytes(pixels, fmt="JPEG")
    return files


def test_class_folders_are_split_by_a_recorded_hash_of_each_path(tmp_path):
    files = mixed_tree(per_class=10)
    files["pics/cat/notes.txt"] = b"not an image"
    folder, tar = write_folder(tmp_path / "tree", files), write_tar(tmp_path / "tree.tar.gz", files)
    ds = read_source(folder, image_size=24)
    assert ds.name == "pics" and ds.classes == ["ant", "bee", "cat"]
    split = ds.info["split"]
    assert split["test_fraction"] == 0.2 and "sha256" in split["rule"]
    # the rule, computed here from its description: sha256 of the path below the class root, as a fraction
    def fraction(name):
        return int.from_bytes(hashlib.sha256(name.removeprefix("pics/").encode()).digest()[:8], "big") / 2 ** 64
    images = [n for n in files if not n.endswith(".txt")]
    expected = {n for n in images if fraction(n) < 0.2}
    for cls in ds.classes:  # a class with no file under the fraction gives its lowest one to test
        members = [n for n in images if n.split("/")[1] == cls]
        if not expected & set(members):
            expected.add(min(members, key=fraction))
    assert set(split["test_files"]) == expected and len(split["test_files"]) == len(expected)
    assert len(ds.test) == len(expected) and len(ds.train) == 30 - len(expected)
    assert (ds.test.class_counts(3) >= 1).all()
    # each recorded test file is the test image at its place, decoded on its own
    for k, name in enumerate(split["test_files"]):
        np.testing.assert_array_equal(ds.test.images[k], decode_image((name, files[name]), 24))
        assert ds.classes[ds.test.labels[k]] == name.split("/")[1]
    again = read_source(tar, image_size=24)  # the same split from the archive, and on every read
    assert again.info == ds.info
    np.testing.assert_array_equal(again.train.images, ds.train.images)


def test_adding_images_moves_no_existing_image_between_train_and_test(tmp_path):
    files = mixed_tree(per_class=30)
    before = read_source(write_folder(tmp_path / "a", files), image_size=8).info["split"]["test_files"]
    more = dict(files)
    for i in range(30, 33):  # one more image in the first class changes every later class's seeded draw
        more[f"pics/ant/{i:03d}.png"] = files["pics/ant/000.png"]
    after = read_source(write_folder(tmp_path / "b", more), image_size=8).info["split"]["test_files"]
    assert set(before) <= set(after)  # nothing left test
    assert set(after) - set(before) <= set(more) - set(files)  # only new files joined it


def test_a_class_with_few_images_still_gets_a_test_image(tmp_path):
    files = mixed_tree(classes=("a", "b"), per_class=3)
    ds = read_source(write_folder(tmp_path / "t", files) / "pics")  # the class folders at the top
    assert ds.name == "pics"
    assert list(ds.test.class_counts(2)) == [1, 1] and list(ds.train.class_counts(2)) == [2, 2]


def test_a_train_only_tree_is_split(tmp_path):
    files = {name.replace("pics/", "data/train/"): data for name, data in mixed_tree(per_class=5).items()}
    ds = read_source(write_folder(tmp_path / "t", files))
    assert ds.classes == ["ant", "bee", "cat"] and len(ds.train) + len(ds.test) == 15 and len(ds.test) == 3


def test_one_class_folder_is_not_a_data_set(tmp_path):
    files = {f"only/{i}.png": png_bytes(np.zeros((8, 8, 3), np.uint8)) for i in range(4)}
    with pytest.raises(DataError, match=r"not a layout cudacnn knows.*at least two classes"):
        read_source(write_folder(tmp_path / "t", {f"x/{k}": v for k, v in files.items()}))


def test_train_test_tree_of_any_size(tmp_path):
    files = {name.replace("pics/", f"set/{split}/"): data
             for split in ("train", "test") for name, data in mixed_tree(per_class=4, seed=len(split)).items()}
    ds = read_source(write_folder(tmp_path / "t", files), image_size=40)
    assert ds.train.images.shape == (12, 40, 40, 3) and ds.test.images.shape == (12, 40, 40, 3)
    assert "split" not in ds.info  # the tree's own split
    first = sorted(n for n in files if n.startswith("set/train/ant/"))[0]
    np.testing.assert_array_equal(ds.train.images[0], decode_image((first, files[first]), 40))


def test_parallel_decoding_equals_serial(tmp_path):
    files = {f"p/{i:04d}.png": png_bytes(smooth_image(30 + i % 40, 50, seed=i)) for i in range(300)}
    root = write_folder(tmp_path / "t", files)
    items = [(name, root / name) for name in sorted(files)]  # folder files go to the workers as paths
    parallel = decode_images(items, 28, workers=2)
    serial = decode_images(items, 28, workers=1)
    np.testing.assert_array_equal(parallel, serial)
    np.testing.assert_array_equal(serial[7], decode_image((items[7][0], files[items[7][0]]), 28))


def test_decoding_shows_progress_lines_without_a_terminal(monkeypatch, caplog):
    from cudacnn import progress

    ticks = iter(range(0, 10_000, 3))  # every clock reading 3 s later than the last
    monkeypatch.setattr(progress, "now", lambda: next(ticks))
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    items = [(f"{i}.png", png_bytes(np.full((8, 8, 3), i % 256, np.uint8))) for i in range(3 * 512)]
    with caplog.at_level("INFO", logger="cudacnn.progress"):
        decode_images(items, 8, workers=1, quiet=False, description="decoding train images")
    lines = [r.getMessage() for r in caplog.records]
    # chunks of 512 done at t = 3, 6, 9 s: the first shown at once, the next one under 5 s later is not
    assert lines == ["decoding train images 512/1,536 images ETA 0:06",
                     "decoding train images 1,536/1,536 images ETA 0:00"]


# ------------------------------------------------------------------ image size and the cache

def test_image_size_is_part_of_the_cache(tmp_path, monkeypatch):
    files = mixed_tree(per_class=5)
    root = write_folder(tmp_path / "t", files)
    reads = []
    real = sources.read_source
    monkeypatch.setattr(sources, "read_source", lambda p, *a: reads.append(a) or real(p, *a))
    small = load_dataset(root, cache_dir=tmp_path / "c", quiet=True, image_size=16)
    large = load_dataset(root, cache_dir=tmp_path / "c", quiet=True, image_size=48)
    again = load_dataset(root, cache_dir=tmp_path / "c", quiet=True, image_size=16)
    assert [a[0] for a in reads] == [16, 48]  # the third load read the 16-pixel cache, which the 48 one kept
    assert small.image_size == 16 and large.image_size == 48 and again.cache_path == small.cache_path
    np.testing.assert_array_equal(again.train.images, small.train.images)
    assert again.info == small.info  # the recorded split survives the cache
    with pytest.raises(DataError, match="--image-size 4 is out of range"):
        load_dataset(root, cache_dir=tmp_path / "c", quiet=True, image_size=4)


def test_official_archives_are_resized_too(tmp_path):
    files, train, _ = cifar10_binary_files()
    tar = write_tar(tmp_path / "c10.tar.gz", files)
    same = read_source(tar, image_size=32)
    np.testing.assert_array_equal(same.train.images, train[0])
    bigger = read_source(tar, image_size=40)
    assert bigger.train.images.shape == (30, 40, 40, 3)
    np.testing.assert_array_equal(bigger.train.images[3], fit_image(Image.fromarray(train[0][3]), 40))


# ------------------------------------------------------------------ models and the trainer at another size

@pytest.mark.parametrize("model", ["simple", "bn_dropout", "smallnet"])
def test_models_take_another_image_size(model):
    from cudacnn.models import create_model
    from cudacnn.models.registry import check_input_size, takes_option

    kwargs = {"image_size": 48} if takes_option(model, "image_size") else {}
    net = create_model(model, num_classes=5, **kwargs).eval()
    check_input_size(net, model, 48)
    assert net(torch.zeros(2, 3, 48, 48)).shape == (2, 5)


def test_the_input_size_check_computes_nothing():
    from cudacnn.models import create_model
    from cudacnn.models.registry import check_input_size

    net = create_model("resnet18", num_classes=5)
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].device.type))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    check_input_size(net, "resnet18", 1024)  # a real forward here would be hundreds of GFLOPs
    assert seen == ["meta"]
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in net.state_dict().items())
    assert net.training  # left as it was


def test_a_size_a_model_cannot_take_is_one_line():
    from cudacnn.models import create_model
    from cudacnn.models.registry import check_input_size

    with pytest.raises(ConfigError, match="model 'simple' needs images of at least 18x18 pixels, got --image-size 16"):
        create_model("simple", image_size=16)
    with pytest.raises(ConfigError, match=r"model 'simple' cannot take 48x48 images .*choose another --image-size"):
        check_input_size(create_model("simple"), "simple", 48)  # built for 32: its head does not fit


def test_train_and_predict_at_another_image_size(tmp_path, capsys):
    files = mixed_tree(classes=("a", "b"), per_class=10)
    root = write_folder(tmp_path / "t", files)
    run = tmp_path / "runs" / "r"
    assert main(["train", "--data", str(root), "--model", "simple", "--image-size", "24", "--epochs", "1",
                 "--batch-size", "8", "--device", "cpu", "--amp", "none", "--val-fraction", "0", "--out",
                 str(tmp_path / "runs"), "--name", "r", "--cache-dir", str(tmp_path / "c"), "--quiet"]) == 0
    config = (run / "config.yaml").read_text()
    assert "image_size: 24" in config
    data = json.loads((run / "data.json").read_text())
    assert data["image_size"] == 24 and "sha256" in data["split"]["rule"]
    test_count = len(data["split"]["test_files"])
    assert test_count == data["test_images"] >= 2
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["model_kwargs"]["image_size"] == 24
    photo = tmp_path / "photo.jpg"
    Image.fromarray(smooth_image(300, 500, seed=9)).save(photo)
    capsys.readouterr()
    assert main(["predict", str(run), str(photo), "--json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert set(line["probabilities"]) == {"a", "b"}
    assert main(["evaluate", str(run), "--device", "cpu", "--cache-dir", str(tmp_path / "c")]) == 0
    chosen = run_checkpoint(run)  # evaluate writes evals/<checkpoint>.json beside the training's eval.json
    result = json.loads((run / "evals" / f"{chosen.stem}.json").read_text())
    assert result["num_samples"] == test_count and result["epoch"] == load_checkpoint(chosen)["epoch"] + 1
    assert result["checkpoint"] == str(chosen)


def test_evaluate_refuses_a_test_set_other_than_the_recorded_one(tmp_path, capsys):
    files = mixed_tree(classes=("a", "b"), per_class=6)
    root = write_folder(tmp_path / "t", files)
    cache = str(tmp_path / "c")
    assert main(["train", "--data", str(root), "--model", "smallnet", "--model-kwargs", '{"widths": [4, 8, 8]}',
                 "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu", "--amp", "none",
                 "--val-fraction", "0", "--out", str(tmp_path / "runs"), "--name", "r", "--cache-dir", cache,
                 "--quiet"]) == 0
    run = tmp_path / "runs" / "r"
    assert main(["evaluate", str(run), "--device", "cpu", "--cache-dir", cache]) == 0  # the same files: accepted
    # a new image whose path hashes into the test share: the folder's test set is no longer the run's
    name = next(f"a/new{i}.png" for i in range(1000) if image_folder.split_fraction(f"a/new{i}.png") < 0.2)
    (root / "pics" / name).write_bytes(files["pics/a/000.png"])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu", "--cache-dir", cache]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the test images of") and "1 new" in err and err.count("\n") == 1
    assert not (run / "evals").exists() or len(list((run / "evals").glob("*.json"))) == 1
    # a resume would train on images the run tested on: refused the same way, before anything is written
    from cudacnn.train.trainer import Trainer, resume_config

    before = sorted(p.name for p in run.rglob("*"))
    with pytest.raises(DataError, match="1 new, or a different split rule.; resume on the files the run was tested"):
        Trainer(resume_config(run, {"cache_dir": cache}), run_dir=run, resume=True, quiet=True).fit()
    assert sorted(p.name for p in run.rglob("*")) == before


# ------------------------------------------------------------------ CIFAR-100, end to end

def test_cifar100_trains_evaluates_and_reports(tmp_path, capsys):
    files, train, test = cifar100_binary_files(n=40)
    tar = write_tar(tmp_path / "cifar-100-binary.tar.gz", files)
    cache = str(tmp_path / "c")
    assert main(["train", "--data", str(tar), "--model", "smallnet", "--model-kwargs", '{"widths": [8, 16, 16]}',
                 "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--amp", "none", "--val-fraction", "0",
                 "--out", str(tmp_path / "runs"), "--name", "c100", "--cache-dir", cache, "--quiet"]) == 0
    run = tmp_path / "runs" / "c100"
    result = json.loads((run / "eval.json").read_text())
    assert result["num_samples"] == 40 and len(result["classes"]) == 100
    # rows are the true classes: the 100 fine labels of the test records
    np.testing.assert_array_equal(np.array(result["confusion"]).sum(1), np.bincount(test[1], minlength=100))
    assert "fine99" in (run / "report.html").read_text()
    assert main(["evaluate", str(run), "--device", "cpu", "--cache-dir", cache]) == 0
    assert main(["data", "info", str(tar), "--cache-dir", cache]) == 0
    assert "cifar100" in capsys.readouterr().out


# ------------------------------------------------------------------ the bundled sample and the fallback

def test_the_sample_is_a_stratified_cifar10_subset():
    ds = read_source(sources.sample_path())
    assert ds.name == "cifar10-sample" and ds.classes == CIFAR10_CLASSES
    assert (ds.train.class_counts(10) == 200).all() and (ds.test.class_counts(10) == 50).all()
    assert sources.sample_path().stat().st_size < 2_000_000
    assert "JPEG re-encoding" in (sources.sample_path().parent / "README.md").read_text()


def test_the_sample_ships_as_package_data():
    from importlib.resources import as_file, files

    resource = files("cudacnn.data").joinpath("sample", "cifar10-sample.tar.gz")
    assert resource.is_file() and resource.read_bytes()[:2] == b"\x1f\x8b"  # a gzip file inside the package
    with as_file(resource) as path:
        assert path.resolve() == sources.sample_path()  # the file `--data sample` reads


def test_the_sample_is_what_its_script_makes(shared_jpeg_path, full_shared_set, tmp_path):
    if not full_shared_set:
        pytest.skip("rebuilding the sample needs the full shared set it was drawn from")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_sample", REPO / "scripts" / "make_sample.py")
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    make_sample.build(shared_jpeg_path, tmp_path / "s.tar.gz")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(tmp_path / "s.tar.gz") == digest(sources.sample_path())


def test_data_sample_by_name(tmp_path):
    ds = load_dataset("sample", cache_dir=tmp_path / "c", quiet=True)
    assert len(ds.train) == 2000 and len(ds.test) == 500


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Official CIFAR-10 at an address that cannot be reached, no CUDACNN_DATA."""
    from cudacnn.data.cifar import OFFICIAL, OfficialArchive

    monkeypatch.delenv("CUDACNN_DATA", raising=False)
    monkeypatch.setenv("CUDACNN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setitem(OFFICIAL, "cifar10", OfficialArchive("cifar10", "http://127.0.0.1:9/cifar-10-binary.tar.gz",
                                                             "0" * 32, "cifar-10-binary.tar.gz"))


def test_offline_default_falls_back_to_the_sample_loudly(tmp_path, offline, caplog):
    with caplog.at_level("WARNING"):
        ds = load_dataset(None, cache_dir=tmp_path / "c", quiet=True, fallback_to_sample=True)
    assert ds.source == str(sources.sample_path())
    assert "could not download http://127.0.0.1:9/cifar-10-binary.tar.gz" in caplog.text
    assert "TRAINING ON THE BUNDLED SAMPLE INSTEAD" in caplog.text
    with pytest.raises(DataError, match="could not download"):  # a source named by the user never falls back
        load_dataset("cifar10", cache_dir=tmp_path / "c", quiet=True, fallback_to_sample=True)
    with pytest.raises(DataError, match="could not download"):  # nor does anything but the trainer's default
        load_dataset(None, cache_dir=tmp_path / "c", quiet=True)


def test_train_without_data_offline_trains_on_the_sample_and_records_it(tmp_path, offline, monkeypatch):
    from cudacnn.train.trainer import Trainer
    from cudacnn.train.config import TrainConfig

    config = TrainConfig(model="simple", epochs=1, batch_size=500, amp="none", device="cpu", val_fraction=0.0,
                         out=str(tmp_path / "runs"), name="offline", cache_dir=str(tmp_path / "c"))
    trainer = Trainer(config, quiet=True)
    assert trainer.dataset.name == "cifar10-sample" and trainer.config.data == "sample"
    trainer.fit()
    assert "data: sample" in (tmp_path / "runs" / "offline" / "config.yaml").read_text()


_REAL_DECODE_CHUNK = image_folder._decode_chunk


def counting_decode_chunk(items, size):
    """_decode_chunk that leaves a file per chunk in $COUNT_DIR (a module-level function: workers unpickle it)."""
    import os
    import time

    if items[0][0] != "bad.png":
        time.sleep(0.05)  # margin: the queue takes seconds, the main process reacts in milliseconds
    (Path(os.environ["COUNT_DIR"]) / items[0][0]).touch()
    return _REAL_DECODE_CHUNK(items, size)


def test_a_bad_image_stops_the_parallel_decode_early(tmp_path, monkeypatch):
    """The error is raised once its chunk is back; the queued chunks are cancelled, not decoded first."""
    monkeypatch.setenv("COUNT_DIR", str(tmp_path))
    monkeypatch.setattr(image_folder, "_decode_chunk", counting_decode_chunk)
    good = png_bytes(np.zeros((8, 8, 3), np.uint8))
    items = [("bad.png", b"not an image")] + [(f"{i}.png", good) for i in range(1, 200 * 512)]
    with pytest.raises(DataError, match="bad.png is not a readable image"):
        decode_images(items, 8, workers=2)
    assert 1 <= len(list(tmp_path.iterdir())) < 200  # of 200 chunks
