"""Data-parallel training over several processes, one per GPU, through PyTorch's own stack.

torchrun (or `cudacnn train --gpus N`, which calls torchrun's launcher) starts the processes and sets
RANK / WORLD_SIZE / LOCAL_RANK; `init()` joins the process group (NCCL on GPUs, gloo on the CPU) with a
timeout, so a rank that dies or hangs ends the whole job instead of a silent wait.

Sharding keeps training independent of the world size: at step k every world size trains on the same
global batch (rank r takes its contiguous part of it), and each rank's loss is scaled so that DDP's mean
of the ranks' gradients is the gradient of the global batch's mean loss. So 1 and 2 processes end with
the same weights, and a run resumes at another world size on the same trajectory.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from cudacnn.data import GpuLoader
from cudacnn.train.config import DIST_TIMEOUT_S
from cudacnn.errors import ConfigError, CudacnnError

log = logging.getLogger(__name__)

# NVLink SHARP / multicast stays off on multi-GPU machines (the lent machines do not support it).
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def disable_multicast(env=None) -> None:
    """Set the multicast switches in `env` (default os.environ) where the user has not set them."""
    env = os.environ if env is None else env
    for key, value in MULTICAST_OFF.items():
        env.setdefault(key, value)


@dataclass(frozen=True)
class Dist:
    """Where this process stands in the job; the default is the single-process job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> Dist:
    return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))


def init(device: str = "auto", timeout_s: float = DIST_TIMEOUT_S) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment; (Dist, this rank's device).
    Outside torchrun (WORLD_SIZE unset or 1) this is the single-process job and joins nothing."""
    from cudacnn.train.setup import pick_device

    here = from_env()
    if not here.enabled:
        return here, pick_device(device)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not use_cuda:
        raise ConfigError(f"--device {device} asked for GPUs but PyTorch sees none; use --device cpu")
    if use_cuda:
        count = torch.cuda.device_count()
        if here.local_rank >= count:
            raise ConfigError(f"local rank {here.local_rank} has no GPU: this host has {count}; "
                              f"start at most {count} processes per host (--gpus / --nproc-per-node)")
        target = torch.device("cuda", here.local_rank)
        torch.cuda.set_device(target)
        disable_multicast()  # for plain torchrun too: NCCL reads these when the communicator starts
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a timed-out collective ends the process
    else:
        target = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                device_id=target if use_cuda else None)
    return here, target


def wait_for_all() -> None:
    """After a successful run: no rank tears its connections down while another still uses them (rank 0
    finishes last, writing the report). Not after a failure, where the others may never arrive."""
    if active():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------- collectives (no-ops alone)
def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj, src: int = 0):
    """rank `src`'s `obj` on every rank (a checkpoint, a run folder name or an error message)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def main_computes(fn):
    """fn() computed on rank 0 alone and sent to every rank; an error there is raised on every rank
    (rather than leaving the others waiting for a value that never comes)."""
    if not active():
        return fn()
    outcome = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn())
        except CudacnnError as exc:
            outcome = ("error", exc)
        except Exception as exc:  # noqa: BLE001 - sent as text: not every exception pickles
            outcome = ("error", CudacnnError(f"rank 0: {type(exc).__name__}: {exc}"))
    kind, value = broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Make every rank's BN running statistics rank 0's (the ones its checkpoint saves)."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def reduce_eval(result):
    """The EvalResult of the whole split from each rank's result on its shard: confusion matrices and loss
    sums are summed over ranks (accuracy, per-class metrics follow from the summed confusion matrix)."""
    from cudacnn.evaluate.metrics import EvalResult

    if not active():
        return result
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    cm = torch.as_tensor(result.confusion, dtype=torch.int64, device=device)
    loss_sum = torch.tensor([result.loss * result.num_samples], dtype=torch.float64, device=device)
    all_reduce_sum(cm)
    all_reduce_sum(loss_sum)
    cm_np = cm.cpu().numpy()
    return EvalResult.from_confusion(cm_np, float(loss_sum) / max(int(cm_np.sum()), 1), result.classes,
                                     result.tta_level)


def timeout_message(here: Dist, exc: BaseException) -> str:
    return (f"rank {here.rank} of {here.world_size}: a collective operation failed or timed out "
            f"({str(exc).splitlines()[0][:200]}); another rank died or hung, so the whole job stops. "
            "Look for the first failing rank's message; if a slow step is legitimate, raise --dist-timeout")


def is_collective_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        word in text for word in ("timed out", "timeout", "connection closed", "connection reset", "gloo", "nccl"))


# ---------------------------------------------------------------------- the global batch
def part(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous part of `total` items; parts differ by at most one item."""
    return rank * total // world_size, (rank + 1) * total // world_size


def accumulation_steps(global_batch: int, world_size: int, max_per_gpu: int | None) -> int:
    """Micro-batches per step so no rank's forward exceeds `max_per_gpu` samples (1 = no accumulation)."""
    largest = -(-global_batch // world_size)
    return 1 if not max_per_gpu else -(-largest // max_per_gpu)


def check_plan(global_batch: int, world_size: int, train_size: int) -> None:
    if global_batch < world_size:
        raise ConfigError(f"global batch {global_batch} is smaller than the {world_size} processes; "
                          f"use --batch-size >= {world_size} or fewer processes")
    if min(global_batch, train_size) < world_size:
        raise ConfigError(f"the training split has {train_size} samples, fewer than the {world_size} processes")


class GlobalBatchLoader(GpuLoader):
    """Rank r's part of each global batch of the epoch permutation. The permutation comes from
    (seed, epoch) as in GpuLoader; batch k covers permutation[k*G:(k+1)*G] and rank r takes its contiguous
    part of it, so the parts are disjoint, cover the epoch, and batch k is the same set at any world size.
    Augmentation is drawn per rank (GpuLoader folds the rank into its augmentation stream)."""

    def __init__(self, split, global_batch: int, device="cpu", *, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False, **kwargs):
        lo, hi = part(global_batch, rank, world_size)
        super().__init__(split, hi - lo, device, rank=rank, world_size=world_size, drop_last=drop_last, **kwargs)
        self.global_batch = global_batch

    def step_sizes(self) -> list[int]:
        """The global batch size of each step of an epoch (the last may be short without drop_last)."""
        n, g = len(self.labels), self.global_batch
        sizes = [g] * (n // g)
        if n % g and not self.drop_last:
            sizes.append(n % g)
        return sizes

    def __len__(self) -> int:
        return len(self.step_sizes())

    def shard_size(self) -> int:
        return sum(hi - lo for lo, hi in (part(s, self.rank, self.world_size) for s in self.step_sizes()))

    def epoch_indices(self) -> torch.Tensor:
        n = len(self.labels)
        order = (torch.randperm(n, device=self.device, generator=self._generator()) if self.shuffle
                 else torch.arange(n, device=self.device))
        pieces, start = [], 0
        for size in self.step_sizes():
            lo, hi = part(size, self.rank, self.world_size)
            pieces.append(order[start + lo:start + hi])
            start += size
        return torch.cat(pieces) if pieces else order[:0]
    # iteration is GpuLoader's: every full step's part is batch_size long, and the short last one ends the epoch


# ---------------------------------------------------------------------- the launcher
def put_package_on_pythonpath() -> None:
    """Child processes (ranks, sweep workers) run `python -m cudacnn`: make them import this very package."""
    src = str(Path(__file__).resolve().parents[2])
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if src not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([src, *filter(None, paths)])


def launch(nproc: int, python_args: list[str]) -> None:
    """Run `python PYTHON_ARGS` as `nproc` ranks on this host through torchrun's launcher (standalone
    rendezvous, no restarts). When a rank fails, the launcher stops the others; this raises CudacnnError
    naming the rank."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    disable_multicast()
    put_package_on_pythonpath()
    args = parse_args(["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "--no-python",
                       sys.executable, *python_args])
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
               else f"exited with code {failure.exitcode}")
        raise CudacnnError(f"rank {rank} of {nproc} {how}; the launcher stopped the other ranks. "
                           "Its own message is printed above") from None
