"""The engine's memory pool: the pure allocator, tensors carved from CPU slabs, and the steady-state
training loop on the GPU backend (Triton interpreter on CPU, or a real GPU when there is one)."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import cudacnn.engine as gnn
from cudacnn.engine.memory import ALIGNMENT, MemoryPool, OffsetAllocator, PoolExhaustedError


def _assert_disjoint(blocks: dict[int, int]) -> None:
    spans = sorted(blocks.items())
    for (a, size), (b, _) in zip(spans, spans[1:]):
        assert a + size <= b, f"live blocks [{a}, {a + size}) and [{b}, ...) overlap"


def test_allocator_live_blocks_never_alias_and_everything_coalesces_back():
    rng = np.random.default_rng(0)
    alloc = OffsetAllocator(1 << 20)
    live: dict[int, int] = {}
    for _ in range(2000):
        if live and rng.random() < 0.45:
            offset = list(live)[rng.integers(len(live))]
            alloc.free(offset)
            del live[offset]
        else:
            size = int(rng.integers(1, 64)) * ALIGNMENT
            offset = alloc.alloc(size)
            if offset is None:
                continue
            assert offset % ALIGNMENT == 0
            live[offset] = size
            _assert_disjoint(live)
    assert alloc.used_bytes == sum(live.values())
    for offset in list(live):
        alloc.free(offset)
    assert alloc.by_offset == [(0, 1 << 20)], "freed neighbours must merge back into one range"


def test_allocator_reuses_freed_blocks_best_fit():
    alloc = OffsetAllocator(10_000)
    a = alloc.alloc(1000)
    b = alloc.alloc(3000)
    c = alloc.alloc(500)
    alloc.free(a)  # a 1000-byte hole at the front
    alloc.free(c)  # c merges with the tail
    assert alloc.alloc(800) == a  # best fit: the small hole, not the big tail
    assert alloc.alloc(2000) == b + 3000
    assert alloc.alloc(10_000) is None


def test_pool_tensors_are_aligned_disjoint_and_freed_with_their_last_view():
    pool = MemoryPool("cpu", slab_bytes=1 << 16)
    a = pool.empty((10, 10))
    b = pool.empty((3,), torch.int8)
    c = pool.empty((7, 5))
    ptrs = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in (a, b, c))
    assert all(end <= start for (_, end), (start, _) in zip(ptrs, ptrs[1:]))
    assert all(t.data_ptr() % ALIGNMENT == 0 for t in (a, b, c))
    a.fill_(1.0), c.fill_(2.0)
    assert a.sum().item() == 100.0  # writing c did not touch a
    assert pool.stats()["live_blocks"] == 3

    view = a.t()[2:]  # a view outlives the tensor it was made from
    address = a.data_ptr()
    del a
    gc.collect()
    assert pool.stats()["live_blocks"] == 3
    del view
    gc.collect()
    assert pool.stats()["live_blocks"] == 2
    again = pool.empty((10, 10))  # the freed block is served again, from the same slab
    assert again.data_ptr() == address
    stats = pool.stats()
    assert stats["slabs"] == 1 and stats["allocs_new_slab"] == 1 and stats["allocs_from_pool"] == 3
    assert stats["bytes_in_use"] == 512 + 256 + 256  # 400 B rounds up to 512, 140 B and 3 B to 256
    assert stats["peak_bytes_in_use"] >= stats["bytes_in_use"]


def test_pool_grows_by_slabs_and_exhaustion_is_a_clear_error():
    pool = MemoryPool("cpu", slab_bytes=4096, max_bytes=3 * 4096)
    keep = [pool.empty((1024,)) for _ in range(3)]  # 4 KiB each: one slab each
    assert pool.stats()["slabs"] == 3
    with pytest.raises(PoolExhaustedError, match="pool exhausted.*may reserve at most 0.0 MiB"):
        pool.empty((10,))
    assert isinstance(PoolExhaustedError("x"), MemoryError)
    del keep
    gc.collect()
    assert pool.stats()["bytes_in_use"] == 0
    reused = pool.empty((1024,))  # fits a freed slab
    assert pool.stats()["slabs"] == 3 and reused.numel() == 1024
    with pytest.raises(PoolExhaustedError, match="16.0 MiB|smaller batch size"):
        pool.empty((4096,))  # 16 KiB: no free range holds it and a new slab would pass the limit


def test_fragmentation_statistic():
    pool = MemoryPool("cpu", slab_bytes=8 * ALIGNMENT)
    blocks = [pool.empty((ALIGNMENT // 4,)) for _ in range(8)]  # fill the slab with 8 one-unit blocks
    assert pool.stats()["fragmentation"] == 0.0  # nothing free
    del blocks[::2]  # free every other block: 4 free units, none adjacent
    gc.collect()
    assert pool.stats()["fragmentation"] == pytest.approx(0.75)
    blocks.clear()
    gc.collect()
    assert pool.stats()["fragmentation"] == 0.0


def test_steady_training_loop_takes_no_new_slab_after_the_first_iteration(monkeypatch):
    from cudacnn.engine import memory

    monkeypatch.setattr(memory, "_pool", MemoryPool(memory.gpu_device(), slab_bytes=1 << 20))  # a fresh one
    gnn.manual_seed(0)
    model = gnn.Sequential([gnn.Conv2d(3, 4, 3), gnn.BatchNorm2d(4), gnn.ReLU(), gnn.MaxPool2d(2), gnn.Flatten(),
                            gnn.Dropout(0.2), gnn.Linear(4 * 3 * 3, 5), gnn.Softmax()]).to("cuda")
    optimizer = gnn.Adam(model.parameters())
    rng = np.random.default_rng(0)
    x = model.ops.asarray(rng.standard_normal((4, 3, 8, 8)).astype(np.float32))
    y = model.ops.asarray(rng.integers(0, 5, 4))
    counts = []
    for _ in range(4):
        model.train_step(x, y, optimizer)
        gc.collect()
        stats = gnn.memory_stats()
        counts.append((stats["allocs_new_slab"], stats["bytes_in_use"], stats["allocs_from_pool"]))
    assert all(c[:2] == counts[0][:2] for c in counts), f"(new slabs, bytes in use, from pool): {counts}"
    served = [b[2] - a[2] for a, b in zip(counts, counts[1:])]
    assert served[0] > 20 and len(set(served)) == 1  # each step's many blocks all come from the pool
    assert stats["peak_bytes_in_use"] >= stats["bytes_in_use"] > 0
