"""The engine's memory pool: device memory taken from torch's allocator only in large slabs, then carved
into aligned blocks by a best-fit allocator that splits and coalesces free ranges.

`MemoryPool.empty(shape)` hands back a torch tensor that is a raw window into a slab (not a torch view,
so torch's caching allocator never sees it). A finalizer returns the block when Python drops the last
reference to the tensor or to any view of it (slices, reshape, view, as_strided keep their base alive).
`detach()` and `view(dtype)` make tensors that do not keep the base: hold the original, or copy, for as long
as they are read. The engine itself only copies out of pool tensors (`to_numpy`).

    OffsetAllocator   pure bookkeeping over [0, size): testable without any device
    MemoryPool        slabs (torch uint8 tensors) + one OffsetAllocator per slab + statistics
"""

from __future__ import annotations

import bisect
import weakref
from dataclasses import dataclass

import torch

from cudacnn.errors import ConfigError, CudacnnError

ALIGNMENT = 256  # bytes: every block starts on a 256 B boundary, enough for 128-bit vector loads
DEFAULT_SLAB_BYTES = 256 << 20


class PoolExhaustedError(CudacnnError, MemoryError):
    """The pool would have to grow past its max_bytes limit."""


def round_up(n: int, alignment: int = ALIGNMENT) -> int:
    return (n + alignment - 1) // alignment * alignment


class OffsetAllocator:
    """Best-fit allocator over the byte range [0, size).

    Free ranges are kept twice: sorted by (size, offset) to find the best fit with one bisect, and
    sorted by offset to find the neighbours to merge with on free."""

    def __init__(self, size: int):
        self.size = size
        self.by_size: list[tuple[int, int]] = [(size, 0)]
        self.by_offset: list[tuple[int, int]] = [(0, size)]
        self.used: dict[int, int] = {}  # offset -> size of live blocks

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new block of nbytes (already aligned), or None if no free range is big enough."""
        i = bisect.bisect_left(self.by_size, (nbytes, -1))
        if i == len(self.by_size):
            return None
        size, offset = self.by_size.pop(i)
        self.by_offset.remove((offset, size))
        if size > nbytes:  # split: the tail stays free
            self._add_free(offset + nbytes, size - nbytes)
        self.used[offset] = nbytes
        return offset

    def free(self, offset: int) -> None:
        size = self.used.pop(offset)
        # coalesce with the free neighbours on either side
        j = bisect.bisect_left(self.by_offset, (offset, 0))
        if j < len(self.by_offset) and self.by_offset[j][0] == offset + size:
            nxt_off, nxt_size = self.by_offset[j]
            self._remove_free(nxt_off, nxt_size)
            size += nxt_size
        if j > 0 and sum(self.by_offset[j - 1]) == offset:
            prev_off, prev_size = self.by_offset[j - 1]
            self._remove_free(prev_off, prev_size)
            offset, size = prev_off, prev_size + size
        self._add_free(offset, size)

    @property
    def used_bytes(self) -> int:
        return sum(self.used.values())

    def largest_free(self) -> int:
        return self.by_size[-1][0] if self.by_size else 0

    def _add_free(self, offset: int, size: int) -> None:
        bisect.insort(self.by_size, (size, offset))
        bisect.insort(self.by_offset, (offset, size))

    def _remove_free(self, offset: int, size: int) -> None:
        self.by_size.remove((size, offset))
        self.by_offset.remove((offset, size))


@dataclass
class Slab:
    storage: torch.Tensor  # uint8, the only memory the pool ever asks torch for
    allocator: OffsetAllocator
    base: int  # bytes skipped so that offset 0 is aligned (CUDA slabs already are; CPU memory may not be)
    untyped: torch.UntypedStorage


class _Block(weakref.ref):
    """A weak reference to a pool tensor that remembers which block to give back when it dies."""

    __slots__ = ("index", "offset")


class MemoryPool:
    """Slabs + a best-fit allocator per slab, with an exact-size free list in front: a freed block waits
    in the list for its size (a training step asks for the same sizes every time, so this is O(1)),
    and goes back to its slab's allocator, coalescing with free neighbours, only when a request finds
    nothing else, before the pool would take a new slab."""

    def __init__(self, device: str | torch.device = "cuda", slab_bytes: int = DEFAULT_SLAB_BYTES,
                 max_bytes: int | None = None, alignment: int = ALIGNMENT):
        self.device = torch.device(device)
        self.slab_bytes = slab_bytes
        self.max_bytes = max_bytes
        self.alignment = alignment
        self.slabs: list[Slab] = []
        self.free_lists: dict[int, list[tuple[int, int]]] = {}  # block size -> freed (slab, offset)
        self._live: set[_Block] = set()
        self.in_use = 0
        self.peak = 0
        self.served_from_pool = 0
        self.new_slabs = 0
        self.frees = 0

    # -- raw blocks -------------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> tuple[int, int]:
        """(slab index, byte offset) of a fresh aligned block of at least nbytes."""
        nbytes = round_up(max(nbytes, 1), self.alignment)
        cached = self.free_lists.get(nbytes)
        if cached:
            index, offset = cached.pop()
            self.served_from_pool += 1
        else:
            index = self._best_fit(nbytes)
            if index is None and self.free_lists:
                self.release_cached()  # coalesce what the free lists hold, then look again
                index = self._best_fit(nbytes)
            if index is None:
                index = self._grow(nbytes)
            else:
                self.served_from_pool += 1
            offset = self.slabs[index].allocator.alloc(nbytes)
        self.in_use += nbytes
        self.peak = max(self.peak, self.in_use)
        return index, offset

    def free(self, index: int, offset: int) -> None:
        nbytes = self.slabs[index].allocator.used[offset]
        self.free_lists.setdefault(nbytes, []).append((index, offset))
        self.in_use -= nbytes
        self.frees += 1

    def release_cached(self) -> None:
        """Hand every block waiting in the free lists back to its slab's allocator."""
        for blocks in self.free_lists.values():
            for index, offset in blocks:
                self.slabs[index].allocator.free(offset)
        self.free_lists.clear()

    def _best_fit(self, nbytes: int) -> int | None:
        """The slab whose smallest free range that holds nbytes is smallest."""
        best = None
        for index, slab in enumerate(self.slabs):
            by_size = slab.allocator.by_size
            k = bisect.bisect_left(by_size, (nbytes, -1))
            if k < len(by_size) and (best is None or by_size[k][0] < best[0]):
                best = (by_size[k][0], index)
        return None if best is None else best[1]

    def _grow(self, nbytes: int) -> int:
        size = max(self.slab_bytes, nbytes)
        if self.max_bytes is not None and self.reserved + size > self.max_bytes:
            raise PoolExhaustedError(
                f"engine memory pool exhausted: a block of {nbytes / 2**20:.1f} MiB needs a new slab of "
                f"{size / 2**20:.1f} MiB, but {self.in_use / 2**20:.1f} MiB are in use and the pool may "
                f"reserve at most {self.max_bytes / 2**20:.1f} MiB; use a smaller batch size or raise the "
                f"limit with gnn.configure_memory(max_bytes=...)")
        storage = torch.empty(size + self.alignment, dtype=torch.uint8, device=self.device)
        base = -storage.data_ptr() % self.alignment
        self.slabs.append(Slab(storage, OffsetAllocator(size), base, storage.untyped_storage()))
        self.new_slabs += 1
        return len(self.slabs) - 1

    # -- tensors ----------------------------------------------------------------------------------
    def empty(self, shape, dtype=torch.float32, strides=None) -> torch.Tensor:
        """An uninitialised tensor carved from a slab; the block returns to the pool with its last view
        (a view of a tensor keeps its base alive, so a weak reference to the base sees the last one go;
        detach() and view(dtype) results are not such views: see the module docstring)."""
        shape = tuple(shape)
        if strides is None:
            strides = contiguous_strides(shape)
        itemsize = dtype.itemsize
        span = 1 + sum((n - 1) * st for n, st in zip(shape, strides)) if all(shape) else 0
        index, offset = self.alloc(span * itemsize)
        slab = self.slabs[index]
        tensor = torch.empty(0, dtype=dtype, device=self.device)
        tensor.set_(slab.untyped, (slab.base + offset) // itemsize, shape, strides)
        block = _Block(tensor, self._release)
        block.index, block.offset = index, offset
        self._live.add(block)
        return tensor

    def _release(self, block: _Block) -> None:
        self._live.discard(block)
        self.free(block.index, block.offset)

    # -- statistics -------------------------------------------------------------------------------
    @property
    def reserved(self) -> int:
        return sum(s.allocator.size for s in self.slabs)

    def stats(self) -> dict:
        self.release_cached()  # so that free ranges are coalesced and counted as such
        free = self.reserved - self.in_use
        largest = max((s.allocator.largest_free() for s in self.slabs), default=0)
        return {
            "bytes_in_use": self.in_use,
            "bytes_reserved": self.reserved,
            "peak_bytes_in_use": self.peak,
            "slabs": len(self.slabs),
            "allocs_from_pool": self.served_from_pool,
            "allocs_new_slab": self.new_slabs,
            "frees": self.frees,
            "live_blocks": sum(len(s.allocator.used) for s in self.slabs),
            # 0 when all free memory is one range; near 1 when it is scattered in small pieces
            "fragmentation": 0.0 if free == 0 else 1.0 - largest / free,
        }

    def reset_peak(self) -> None:
        self.peak = self.in_use


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(int(size), 1)
    return tuple(reversed(strides))


# -- the GPU backend's pool -----------------------------------------------------------------------------
_pool: MemoryPool | None = None
_pool_options: dict = {}


def gpu_device() -> torch.device:
    """Where the GPU backend's memory lives: the CUDA device, or CPU memory when Triton interprets
    kernels (TRITON_INTERPRET=1: how the GPU code path is tested without a GPU)."""
    from cudacnn.kernels._runtime import interpreting  # here: importing the kernels package loads triton

    if interpreting():
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    raise ConfigError("the engine's GPU backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its Triton "
                      "kernels on the CPU); use model.to('cpu') for the NumPy backend")


def default_pool() -> MemoryPool:
    global _pool
    if _pool is None:
        _pool = MemoryPool(gpu_device(), **_pool_options)
    return _pool


def configure_memory(slab_bytes: int | None = None, max_bytes: int | None = None) -> None:
    """Set the GPU pool's slab size and limit. Takes effect for slabs taken from now on."""
    if slab_bytes is not None:
        _pool_options["slab_bytes"] = slab_bytes
    if max_bytes is not None:
        _pool_options["max_bytes"] = max_bytes
    if _pool is not None:
        _pool.slab_bytes = _pool_options.get("slab_bytes", _pool.slab_bytes)
        _pool.max_bytes = _pool_options.get("max_bytes", _pool.max_bytes)


def memory_stats() -> dict:
    """The GPU pool's counters (all zero before the GPU backend has allocated anything)."""
    if _pool is None:
        return MemoryPool("cpu").stats()
    return _pool.stats()
