"""The GPU-resident loader and its augmentations (run here on the CPU: same code path)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, Augment, GpuLoader, Split
from cudacnn.data import augment


def make_split(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return Split(rng.integers(1, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n))


def raw_loader(split, **kw):
    """A loader whose normalization is the identity, so outputs are the augmented uint8 values."""
    return GpuLoader(split, 16, mean=(0, 0, 0), std=(1 / 255,) * 3, **kw)


def test_plain_epoch_returns_the_data_in_order():
    split = make_split()
    loader = raw_loader(split)
    images, labels = loader.prepare_epoch()
    np.testing.assert_array_equal(images.permute(0, 2, 3, 1).numpy(), split.images)
    np.testing.assert_array_equal(labels.numpy(), split.labels)


def test_batches_are_channels_last_in_the_requested_dtype():
    loader = GpuLoader(make_split(40), 16, dtype=torch.bfloat16)
    batches = list(loader)
    assert [len(x) for x, _ in batches] == [16, 16, 8] and len(loader) == 3
    x, y = batches[0]
    assert x.dtype == torch.bfloat16 and x.shape == (16, 3, 32, 32) and y.dtype == torch.int64
    assert x.is_contiguous(memory_format=torch.channels_last)
    loader_drop = GpuLoader(make_split(40), 16, drop_last=True)
    assert len(loader_drop) == 2 and len(list(loader_drop)) == 2


def test_normalization_uses_mean_and_std():
    split = make_split(8)
    x, _ = GpuLoader(split, 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), channels_last=False).prepare_epoch()
    expected = (split.images.transpose(0, 3, 1, 2) / 255.0 - 0.5) / 0.25
    np.testing.assert_allclose(x.numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_jittered_epoch_is_normalize_then_jitter_in_one_pass(dtype):
    """The loader folds the colour jitter into its one-pass normalization: the same values as normalizing, then
    shifting and scaling each image (augment.color_jitter) with the same draws, then casting."""
    split = make_split(32)
    aug = Augment(brightness=0.2, contrast=0.1)
    loader = GpuLoader(split, 8, augment=aug, dtype=dtype, seed=3)
    out, _ = loader.prepare_epoch()
    mean, std = (torch.tensor(v, dtype=torch.float64)[:, None, None] for v in (CIFAR10_MEAN, CIFAR10_STD))
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).double() / 255
    normalized = ((x - mean) / std).float()
    gen = GpuLoader(split, 8, augment=aug, seed=3)._generator(stream=7919)  # the loader's augmentation stream
    expected = augment.color_jitter(normalized, 0.2, 0.1, gen).to(dtype)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, atol=1e-5 if dtype == torch.float32 else 4e-3, rtol=1e-5)
    plain, _ = GpuLoader(split, 8, dtype=dtype, seed=3).prepare_epoch()
    assert (out.float() - plain.float()).abs().amax((1, 2, 3)).min() > 0.01  # every image was jittered


def test_shuffle_is_a_seeded_permutation():
    split = make_split()
    a = raw_loader(split, shuffle=True, seed=5)
    b = raw_loader(split, shuffle=True, seed=5)
    ia, ib = a.epoch_indices(), b.epoch_indices()
    assert torch.equal(ia, ib) and sorted(ia.tolist()) == list(range(64)) and not torch.equal(ia, torch.arange(64))
    a.set_epoch(1)
    assert not torch.equal(a.epoch_indices(), ib)


def test_indexed_batches_name_each_image_and_match_plain_iteration():
    split = make_split(40)
    a = raw_loader(split, shuffle=True, seed=3, augment=Augment(flip="alternate"))
    b = raw_loader(split, shuffle=True, seed=3, augment=Augment(flip="alternate"))
    for epoch in range(2):
        indexed, plain = list(a.indexed_batches()), list(b)
        assert len(indexed) == len(plain) == 3
        seen = torch.cat([idx for _, _, idx in indexed])
        assert sorted(seen.tolist()) == list(range(40)) and not torch.equal(seen, torch.arange(40))
        for (x, y, idx), (px, py) in zip(indexed, plain):
            assert torch.equal(x, px) and torch.equal(y, py)  # the same epoch, with indices added
            assert torch.equal(y, torch.from_numpy(split.labels)[idx])
            stored = torch.from_numpy(split.images[idx.numpy()]).permute(0, 3, 1, 2).float()
            same = (x == stored).flatten(1).all(1) | (x == stored.flip(-1)).flatten(1).all(1)
            assert same.all()  # each batch image is its index's stored image (or its mirror)


def test_same_seed_gives_the_same_augmented_epoch():
    split = make_split()
    aug = Augment(crop_pad=4, flip="random", cutout=8)
    x1, y1 = raw_loader(split, augment=aug, shuffle=True, seed=1).prepare_epoch()
    x2, y2 = raw_loader(split, augment=aug, shuffle=True, seed=1).prepare_epoch()
    x3, _ = raw_loader(split, augment=aug, shuffle=True, seed=2).prepare_epoch()
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


def test_random_flip_mirrors_exactly_the_flipped_images():
    images = torch.from_numpy(make_split(200).images).permute(0, 3, 1, 2)
    out = augment.random_flip(images, torch.Generator().manual_seed(0))
    mirrored = (out == images.flip(-1)).flatten(1).all(1)
    same = (out == images).flatten(1).all(1)
    assert bool((mirrored ^ same).all())  # every image is either itself or its exact mirror
    assert 60 < int(mirrored.sum()) < 140


def test_alternating_flip_shows_each_image_both_ways_in_two_epochs():
    split = make_split(100)
    loader = raw_loader(split, augment=Augment(flip="alternate"), channels_last=False)
    originals = torch.from_numpy(split.images).permute(0, 3, 1, 2).float()
    flipped = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        x, _ = loader.prepare_epoch()
        flipped.append((x == originals.flip(-1)).flatten(1).all(1) & ~(x == originals).flatten(1).all(1))
    assert bool((flipped[0] ^ flipped[1]).all())
    assert 25 < int(flipped[0].sum()) < 75


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_crops_are_windows_of_the_padded_image(mode):
    images = torch.from_numpy(make_split(12).images).permute(0, 3, 1, 2)
    out = augment.random_crop(images, 4, torch.Generator().manual_seed(1), mode)
    padded = augment.pad_images(images, 4, mode)
    offsets = set()
    for i in range(len(images)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(out[i], padded[i, :, dy:dy + 32, dx:dx + 32])]
        assert hits, f"image {i} is not a window of its padded image"
        offsets.add(hits[0])
    assert len(offsets) > 1


def test_reflect_padding_matches_torch_on_floats():
    images = torch.from_numpy(make_split(3).images).permute(0, 3, 1, 2)
    ours = augment.pad_images(images, 3, "reflect").float()
    reference = torch.nn.functional.pad(images.float(), (3, 3, 3, 3), mode="reflect")
    assert torch.equal(ours, reference)


def test_cutout_zeroes_one_square_at_most_size_squared():
    images = torch.from_numpy(make_split(50).images).permute(0, 3, 1, 2)  # values >= 1
    out = augment.cutout(images, 8, torch.Generator().manual_seed(0))
    zeroed = (out == 0).all(1)  # (N, H, W) pixels zeroed in every channel
    counts = zeroed.flatten(1).sum(1)
    assert bool((counts <= 64).all()) and bool((counts > 0).all()) and int((counts == 64).sum()) > 10
    for mask in zeroed:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert int(mask.sum()) == len(rows) * len(cols)  # a rectangle: the square clipped by the border
    assert torch.equal(out[out != 0], images[out != 0])


def test_rank_shards_are_disjoint_and_cover_the_epoch():
    split = make_split(101)
    shards = [raw_loader(split, shuffle=True, seed=9, rank=r, world_size=3).epoch_indices() for r in range(3)]
    together = torch.cat(shards)
    assert sorted(together.tolist()) == list(range(101))
    assert max(len(s) for s in shards) - min(len(s) for s in shards) <= 1


def test_bad_arguments():
    with pytest.raises(ValueError, match="flip"):
        Augment(flip="sideways")
    with pytest.raises(ValueError, match="batch_size"):
        GpuLoader(make_split(4), 0)


def test_ctrl_c_during_parallel_decoding_exits_without_stray_workers():
    """Ctrl-C (SIGINT to the whole process group) while decode_images runs its process pool: the child
    handles KeyboardInterrupt and exits 130, with no traceback and no worker left behind (the 20 s wait
    only guards against a hang; the decoding alone takes some 8 s). A worker
    used to die of it when caught writing its results, which broke the pool and could hang the shutdown
    forever; stopping the main process first makes the workers block in that write, so the race is
    (nearly) always lost without the fix."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import io, sys\n"
        "import numpy as np\n"
        "from PIL import Image\n"
        "from cudacnn.data.image_folder import decode_images\n"
        "buf = io.BytesIO()\n"
        "Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, 'PNG')\n"
        "items = [(f'{i}.png', buf.getvalue()) for i in range(200_000)]  # some 8 s on 2 cores\n"
        "print('ready', flush=True)\n"
        "try:\n"
        "    decode_images(items, workers=4)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
        "print('finished', flush=True)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True)
    pgid = child.pid  # it leads its own session and process group, which its workers join
    try:
        assert child.stdout.readline() == "ready\n", child.stderr.read()
        time.sleep(0.5)  # the workers are decoding
        os.kill(child.pid, signal.SIGSTOP)
        time.sleep(0.3)  # each worker finishes a chunk, then blocks writing its results to the stopped process
        os.killpg(pgid, signal.SIGINT)
        os.kill(child.pid, signal.SIGCONT)
        out, err = child.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        out = "still running 20 s after the Ctrl-C"
    finally:
        if child.poll() is None:  # hung, or the test failed early: leave nothing behind
            os.killpg(pgid, signal.SIGKILL)
            err = child.communicate()[1]
    assert child.returncode == 130 and out == "interrupted\n", (out, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    with pytest.raises(ProcessLookupError):  # the workers were waited for, not orphaned
        os.killpg(pgid, 0)
