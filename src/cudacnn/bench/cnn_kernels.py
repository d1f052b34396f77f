"""`cudacnn bench cnn-kernels`: the fused BatchNorm + activation (+ residual) (+ 2x2 max-pool) kernels at the
zoo's real shapes, and what they change end to end in `cudacnn train`.

1. Per op (bf16, channels_last, BatchNorm in training mode with float32 parameters, as under autocast):
   forward and forward + backward of ours (kernels.BatchNormAct / ActivationPool) against eager PyTorch
   (cuDNN BatchNorm, then the activation, the add and F.max_pool2d) and against torch.compile of that same
   reference. Bandwidth counts each tensor read or written once (forward: x, residual, y; backward: x, dy,
   residual, dx, d residual), as a fraction of a measured device-to-device copy, beside the most our two
   passes each way allow (`traffic`: the two-pass bound). The times come twice: each
   call launched from Python (what eager training pays, host time included where the GPU waits for it),
   and under a CUDA graph (each variant's 20 calls captured in one graph and replayed: device time, no
   host), whose bandwidth is what the kernels themselves reach and where Inductor's kernels meet ours.
2. End to end: the epoch time of the presets with --kernels torch and --kernels triton, eager and compiled:
   the Trainer of `cudacnn train` (its _train_epoch, the code path of every epoch), on a seeded subset of
   the training set, one warm-up epoch (compilation, cuDNN autotuning) and then timed epochs, scaled to the
   full training set. With --profile DIR, one more epoch of each runs under torch.profiler, a table each.
3. Optionally (--accuracy-seeds N): full trainings of the presets, N seeds each, torch vs triton kernels:
   the test accuracies should agree within seed noise.

Every time is harness.time_fn or cudacnn.timing.DeviceTimer (CUDA events)."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import gc
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cudacnn.bench.harness import Stats, time_fn
from cudacnn.kernels import _launch, planned
from cudacnn.timing import DeviceTimer
from cudacnn.bench.report import measurement, result_row

log = logging.getLogger(__name__)

# (label, (N, C, H, W), activation, residual, pool, normalize): the zoo's BatchNorms at its presets' batches
OP_CASES = [
    ("smallnet s1 conv1 BN+ReLU", (256, 64, 32, 32), "relu", False, False, True),
    ("smallnet s1 conv2 BN+ReLU+pool", (256, 64, 32, 32), "relu", False, True, True),
    ("smallnet s3 conv2 BN+ReLU+pool", (256, 256, 8, 8), "relu", False, True, True),
    ("resnet18 layer1 bn1 BN+ReLU", (512, 64, 32, 32), "relu", False, False, True),
    ("resnet18 layer1 bn2 BN+add+ReLU", (512, 64, 32, 32), "relu", True, False, True),
    ("resnet18 layer2 downsample BN", (512, 128, 16, 16), "none", False, False, True),
    ("resnet18 layer4 bn2 BN+add+ReLU", (512, 512, 4, 4), "relu", True, False, True),
    ("bn_dropout b1 conv1 BN+ReLU", (256, 32, 32, 32), "relu", False, False, True),
    ("bn_dropout b1 conv2 ReLU+pool", (256, 32, 30, 30), "relu", False, True, False),
    ("fast96 g1 BN+GELU", (2000, 128, 16, 16), "gelu", False, False, True),
    ("fast96 g2 last BN+add+GELU", (2000, 512, 8, 8), "gelu", True, False, True),
]
PRESETS = ("smallnet-plus", "resnet18-cifar", "bn-dropout-plus")
# the variants also timed under a CUDA graph (on a GPU): device time, where Inductor's kernels meet ours
GRAPHED = ("eager PyTorch", "torch.compile", "ours")


def copy_bandwidth_gbps(device="cuda", dtype=torch.bfloat16, n: int = 1 << 27) -> float:
    """Device-to-device copy bandwidth (read + write), the ceiling of a memory-bound kernel."""
    x = torch.randn(n, device=device).to(dtype)
    y = torch.empty_like(x)
    stats = time_fn(lambda: y.copy_(x), device, warmup=3, repeats=20)
    return 2 * x.numel() * x.element_size() / (stats.median_ms * 1e-3) / 1e9


def graph_time_fn(fn, device, *, calls: int = 20, warmup: int = 3, repeats: int = 10) -> Stats | None:
    """Device time of one fn() with the host out of the way: `calls` calls captured in one CUDA graph (after
    warm-up calls on a side stream, as torch.cuda.graph wants), the graph replayed `repeats` times between CUDA
    events; ms per call. None off a CUDA device (CPU runs of the benchmark skip it)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    stats = time_fn(graph.replay, device, warmup=1, repeats=repeats)
    del graph
    return Stats(*(getattr(stats, f) / calls for f in ("median_ms", "q1_ms", "q3_ms", "min_ms", "max_ms")),
                 stats.repeats)


def reference_fn(bn: nn.BatchNorm2d | None, activation: str, pool: bool):
    """Eager PyTorch's version of the fused op: cuDNN BatchNorm, add, activation, max-pool."""
    from cudacnn.kernels.activations import reference_forward

    def forward(x, residual=None):
        z = bn(x) if bn is not None else x
        if residual is not None:
            z = z + residual
        if activation != "none":
            z = reference_forward(z, activation)
        return F.max_pool2d(z, 2) if pool else z

    return forward


def traffic(x_bytes: int, y_bytes: int, residual: bool, normalize: bool) -> tuple[tuple[int, int], int]:
    """((forward, backward) minimal bytes, bytes our passes move) of one forward + backward of the fused op.
    Minimal: each tensor once (forward x, residual, y; backward x, residual, dy, dx, d residual). Our kernels
    read the input twice each way where there is a BatchNorm (statistics, then apply; gradient sums, then dx):
    forward x once more, backward x, the residual and dy once more. minimal / passes is the fraction of copy
    bandwidth the op can reach with every pass at copy speed and nothing kept in L2 between passes."""
    inputs = x_bytes * (2 if residual else 1)  # x and the residual; dx and d residual alike
    forward, backward = inputs + y_bytes, inputs + y_bytes + inputs
    again = (x_bytes + inputs + y_bytes) if normalize else 0
    return (forward, backward), forward + backward + again


def _op_rows(label, shape, activation, residual, pool, normalize, copy_gbps, compile, warmup, repeats, device):
    from cudacnn.kernels import ActivationPool, BatchNormAct

    n, c, h, w = shape
    dtype = torch.bfloat16
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
    res = torch.randn_like(x) if residual else None
    if normalize:
        bn_ref = nn.BatchNorm2d(c, device=device)
        ours = BatchNormAct.from_torch(copy.deepcopy(bn_ref), activation, pool)
        params = [ours.weight, ours.bias]
    else:
        bn_ref, ours, params = None, ActivationPool(activation), []
    ref = reference_fn(bn_ref, activation, pool)
    variants = {"eager PyTorch": (ref, list(bn_ref.parameters()) if bn_ref is not None else [])}
    if compile:
        torch._dynamo.reset()
        bn_compiled = copy.deepcopy(bn_ref)
        variants["torch.compile"] = (torch.compile(reference_fn(bn_compiled, activation, pool)),
                                     list(bn_compiled.parameters()) if bn_compiled is not None else [])
    variants["ours"] = (ours, params)
    xg = x.detach().requires_grad_()
    rg = res.detach().requires_grad_() if res is not None else None
    dy = torch.randn_like(ours(x, res) if normalize else ours(x))
    fwd, both, fwd_graph, both_graph = {}, {}, {}, {}
    for name, (fn, weights) in variants.items():
        call = (lambda fn=fn: fn(x, res)) if normalize else (lambda fn=fn: fn(x))
        inputs = [t for t in (xg, rg) if t is not None] + [p for p in weights if p.requires_grad]

        def step(fn=fn, inputs=inputs):
            y = fn(xg, rg) if normalize else fn(xg)
            torch.autograd.grad(y, inputs, dy)

        with torch.no_grad():
            fwd[name] = time_fn(call, device, warmup=warmup, repeats=repeats)
        both[name] = time_fn(step, device, warmup=warmup, repeats=repeats)
        if name in GRAPHED:
            try:
                with torch.no_grad():
                    fwd_graph[name] = graph_time_fn(call, device, warmup=warmup)
                both_graph[name] = graph_time_fn(step, device, warmup=warmup)
            except RuntimeError as e:  # a capture that fails costs this variant's device times, not the rest
                log.warning("%s: %s could not be captured in a CUDA graph: %s", label, name, e)
    (fwd_bytes, bwd_bytes), passes = traffic(x.numel() * x.element_size(), dy.numel() * dy.element_size(),
                                             residual, normalize)
    bound = round((fwd_bytes + bwd_bytes) / passes, 3)
    rows = []
    summary = {"name": label, "group": "ours: bandwidth (fraction of a device copy) and speedups",
               "fwd+bwd two-pass bound": bound}
    for direction, stats, graphed, nbytes in (("forward", fwd, fwd_graph, fwd_bytes),
                                              ("forward+backward", both, both_graph, fwd_bytes + bwd_bytes)):
        gbps = nbytes / (stats["ours"].median_ms * 1e-3) / 1e9
        info = dict(shape=list(shape), dtype="bf16", layout="channels_last", activation=activation,
                    residual=residual, pool=pool, batchnorm=normalize, bytes=nbytes, ours_gbps=round(gbps, 1),
                    of_copy_bandwidth=round(gbps / copy_gbps, 3), two_pass_bound=bound)
        for name, s in stats.items():
            info[f"vs {name}"] = round(s.median_ms / stats["ours"].median_ms, 3)
        short = "fwd" if direction == "forward" else "fwd+bwd"
        graph = {name: s for name, s in graphed.items() if s is not None}
        measurements = {k: measurement(v) for k, v in stats.items() if k != "ours"}
        measurements.update({f"{k} (CUDA graph)": measurement(v) for k, v in graph.items()})
        measurements["ours"] = measurement(stats["ours"])  # last: result_row's speedup is eager / ours
        summary[f"{short} GB/s"] = round(gbps, 1)
        summary[f"{short} of copy"] = round(gbps / copy_gbps, 3)
        for name, s in stats.items():
            if name != "ours":
                summary[f"{short} vs {name}"] = round(s.median_ms / stats["ours"].median_ms, 3)
        graph_note = ""
        if "ours" in graph and "eager PyTorch" in graph:
            graph_gbps = nbytes / (graph["ours"].median_ms * 1e-3) / 1e9
            extra = {"ours_graph_gbps": round(graph_gbps, 1),
                     "graph_of_copy_bandwidth": round(graph_gbps / copy_gbps, 3)}
            extra.update({f"graph_vs {name}": round(s.median_ms / graph["ours"].median_ms, 3)
                          for name, s in graph.items() if name != "ours"})
            info.update(extra)
            summary.update({f"{short} graph ms ours": round(graph["ours"].median_ms, 4),
                            f"{short} graph ms eager": round(graph["eager PyTorch"].median_ms, 4),
                            f"{short} graph of copy": extra["graph_of_copy_bandwidth"]})
            summary.update({f"{short} graph vs {name}": extra[f"graph_vs {name}"]
                            for name in graph if name != "ours"})
            graph_note = (f"; CUDA graph: ours {graph['ours'].median_ms:.3f} ms ({extra['graph_of_copy_bandwidth']:.2f}"
                          f" of copy), eager {graph['eager PyTorch'].median_ms:.3f} ms")
        rows.append(result_row(f"{label} {direction}", "fused BN + act (+ add) (+ pool), bf16 channels_last",
                               measurements, **info))
        log.info("%-40s %-17s ours %.3f ms (%.0f GB/s, %.2f of copy); eager %.3f ms%s%s", label, direction,
                 stats["ours"].median_ms, gbps, gbps / copy_gbps, stats["eager PyTorch"].median_ms,
                 f"; compiled {stats['torch.compile'].median_ms:.3f} ms" if "torch.compile" in stats else "",
                 graph_note)
    return rows + [summary]


def op_rows(compile: bool = True, warmup: int = 5, repeats: int = 30, only: str | None = None,
            cases=OP_CASES, device="cuda", copy_elements: int = 1 << 27, on_rows=None) -> list[dict]:
    """The per-op rows; on_rows(rows) after each case (the command saves what is done so far)."""
    copy_gbps = copy_bandwidth_gbps(device, n=copy_elements)
    log.info("device copy bandwidth: %.0f GB/s", copy_gbps)
    rows = [{"name": "device copy bf16", "group": "bandwidth ceiling", "gbps": round(copy_gbps, 1)}]
    if on_rows:
        on_rows(rows[:1])
    for label, shape, activation, residual, pool, normalize in cases:
        if only and only not in label:
            continue
        new = _op_rows(label, shape, activation, residual, pool, normalize, copy_gbps, compile, warmup, repeats,
                       device)
        rows += new
        if on_rows:
            on_rows(new)
        _release()
    return rows


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def _subset(dataset, n: int | None, seed: int = 0):
    if not n or n >= len(dataset.train):
        return dataset
    index = np.sort(np.random.default_rng(seed).permutation(len(dataset.train))[:n])
    return dataclasses.replace(dataset, train=dataset.train.subset(index))


KERNEL_SETTINGS = ("torch", "triton")
# the epoch modes besides torch.compile's own (any other mode is `--compile --compile-mode MODE`): label, config
EAGER_MODES = {"eager": ("eager", dict(compile=False)),
               "graphs": ("eager, CUDA graphs", dict(compile=False, cuda_graphs=True))}


def _mode(mode: str) -> tuple[str, dict]:
    """(row label, config overrides) of an epoch mode."""
    return EAGER_MODES.get(mode, (f"compiled ({mode})", dict(compile=True, compile_mode=mode)))


def epoch_times(preset: str, mode: str, dataset, full_train: int, data: str | None, timed_epochs: int = 2,
                device: str = "cuda", profile: Path | None = None) -> dict[str, tuple[Stats, dict]]:
    """{kernels: (epoch times, info)} of `cudacnn train --preset P --kernels K` for K in KERNEL_SETTINGS, eager
    (`mode` "eager"), eager with `--cuda-graphs` ("graphs") or with `--compile --compile-mode MODE`
    ("reduce-overhead": CUDA graphs); ms scaled to
    `full_train` images. Both settings' Trainers are built and run one warm-up epoch each, then their timed
    epochs alternate, the order flipping every epoch: eager epochs at these sizes are host-bound and the host's
    speed drifts, so each pair of epochs meets the same host. With `profile` (a folder), one more epoch of each
    runs under torch.profiler and its table is written there."""
    from cudacnn.train.config import resolve
    from cudacnn.train.trainer import Trainer, make_progress

    _, compiled = _mode(mode)
    epochs = 1 + timed_epochs + (profile is not None)  # the schedule (OneCycle) must cover every epoch run
    with contextlib.ExitStack() as stack:
        trainers = {}
        for kernels in KERNEL_SETTINGS:
            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="cudacnn-cnn-kernels-"))
            config = resolve(preset, None, dict(kernels=kernels, data=data, out=scratch, epochs=epochs,
                                                device=device, **compiled))
            trainers[kernels] = Trainer(config, run_dir=Path(scratch), dataset=dataset, quiet=True)
        samples = {kernels: [] for kernels in trainers}
        records = {}
        progress = stack.enter_context(make_progress(True))
        for trainer in trainers.values():
            trainer._train_epoch(0, progress)
        for epoch in range(1, 1 + timed_epochs):
            order = KERNEL_SETTINGS if epoch % 2 else KERNEL_SETTINGS[::-1]
            for kernels in order:
                trainer = trainers[kernels]
                with DeviceTimer(trainer.device) as timer:
                    records[kernels] = trainer._train_epoch(epoch, progress)
                samples[kernels].append(timer.ms * full_train / len(trainer.train_loader.labels))
        out = {}
        for kernels, trainer in trainers.items():
            fused = sum(type(m).__name__ in ("BatchNormAct", "ActivationPool") for m in trainer.model.modules())
            info = {"steps_timed": len(trainer.train_loader), "train_loss": round(records[kernels]["train_loss"], 4),
                    "fused_modules": fused}
            if profile is not None:  # the profiled epoch's sums: a host-bound epoch has more host than GPU time
                info.update(write_profile(functools.partial(trainer._train_epoch, 1 + timed_epochs, progress),
                                          Path(profile) / f"{preset}-{mode}-{kernels}.txt",
                                          f"{preset} {mode} --kernels {kernels}"))
            if kernels != "torch":  # whether the Triton kernels skipped Triton's per-call launch path, or Python
                info.update(fast_launch=_launch.active(), cached_launches=_launch.cached_launches(),
                            cpp_plans=planned.plan_count(), conv_nodes=planned.conv_link_count())
            out[kernels] = (Stats.of(samples[kernels]), info)
        del trainers, trainer
    _release()
    return out


def write_profile(work, path: Path, title: str) -> dict:
    """Runs `work()` under torch.profiler and writes its ops sorted by device time, with the sum of the GPU
    kernels' time, then sorted by the host's own (self) CPU time, with its sum: where a step's time goes, for
    one setting beside another; an eager step that waits on the host shows it in the second table. Returns the
    two sums ({profile_gpu_ms, profile_host_ms}; the profiler's own overhead is in the host time)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        work()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    kernel_ms = sum(e.device_time_total for e in events if e.device_type.name == "CUDA") / 1e3
    path.parent.mkdir(parents=True, exist_ok=True)
    host_ms = sum(e.self_cpu_time_total for e in events) / 1e3
    tables = [f"{title}: {kernel_ms:.1f} ms of GPU kernels, {host_ms:.1f} ms of host (self CPU) time\n"]
    for key in (["device_time_total"] if cuda else []) + ["self_cpu_time_total"]:
        tables.append(f"\nsorted by {key}\n" + events.table(sort_by=key, row_limit=40, max_name_column_width=70))
    path.write_text("".join(tables))
    return {"profile_gpu_ms": round(kernel_ms, 1), "profile_host_ms": round(host_ms, 1)}


def train_rows(dataset, presets=PRESETS, modes=("eager", "default"), train_images: int = 10240,
               data: str | None = None, device: str = "cuda", on_rows=None,
               profile: Path | None = None, timed_epochs: int = 5) -> list[dict]:
    """Per preset and mode ("eager", or a torch.compile mode), the median of `timed_epochs` epoch times with our
    kernels and PyTorch's (`profile`: a folder for a profiled epoch of each, see epoch_times)."""
    short = _subset(dataset, train_images)
    rows = []
    for preset in presets:
        for mode in modes:
            runs, infos = {}, {}
            label, _ = _mode(mode)
            for kernels, (stats, info) in epoch_times(preset, mode, short, len(dataset.train), data, timed_epochs,
                                                      device=device, profile=profile).items():
                runs[f"--kernels {kernels}"], infos[kernels] = measurement(stats), info
                log.info("%s %s --kernels %s: %.3f s / epoch (%s)", preset, label, kernels, stats.median_ms / 1e3,
                         info)
            rows.append(result_row(f"{preset} epoch, {label}: torch vs triton kernels",
                                   f"cudacnn train --preset {preset} epoch ({len(short.train)} images timed, "
                                   f"scaled to {len(dataset.train)})", runs, compile=mode, **{
                                       f"{k}_{key}": v for k, info in infos.items() for key, v in info.items()}))
            if on_rows:
                on_rows(rows[-1:])
    return rows


def full_training(preset: str, kernels: str, seed: int, dataset, epochs: int | None = None, data: str | None = None,
                  device: str = "cuda", cuda_graphs: bool = False):
    """`cudacnn train --preset P --kernels K --seed S [--cuda-graphs]` on `dataset`, in a scratch folder; its
    TrainResult."""
    from cudacnn.train.config import resolve
    from cudacnn.train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="cudacnn-cnn-kernels-") as scratch:
        config = resolve(preset, None, dict(kernels=kernels, seed=seed, epochs=epochs, data=data, out=scratch,
                                            device=device, cuda_graphs=cuda_graphs))
        return Trainer(config, run_dir=Path(scratch), dataset=dataset, quiet=True).fit()


def accuracy_rows(dataset, presets=PRESETS, seeds: int = 3, epochs: int | None = None,
                  data: str | None = None, device: str = "cuda", on_rows=None) -> list[dict]:
    """Test accuracy of full trainings, torch vs triton kernels, `seeds` seeds each."""
    rows = []
    for preset in presets:
        accs = {}
        for kernels in ("torch", "triton"):
            accs[kernels] = []
            for seed in range(seeds):
                result = full_training(preset, kernels, seed, dataset, epochs, data, device)
                accs[kernels].append(result.test_accuracy)
                log.info("%s --kernels %s seed %d: test accuracy %.4f", preset, kernels, seed, result.test_accuracy)
                _release()
        row = {"name": f"{preset} accuracy, torch vs triton kernels", "group": "same accuracy check",
               "epochs": epochs or "preset's", "seeds": seeds}
        for kernels, values in accs.items():
            row[f"{kernels}_accuracies"] = [round(a, 4) for a in values]
            row[f"{kernels}_mean"] = round(float(np.mean(values)), 4)
            row[f"{kernels}_std"] = round(float(np.std(values)), 4)
        rows.append(row)
        if on_rows:
            on_rows([row])
    return rows


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_options(p) -> None:
    p.add_argument("--data", help="data source (default: CUDACNN_DATA, else official CIFAR-10)")
    p.add_argument("--cache-dir", type=Path, help="decoded-cache folder (default: CUDACNN_CACHE)")
    p.add_argument("--no-ops", action="store_true", help="skip the per-op rows")
    p.add_argument("--no-epochs", action="store_true", help="skip the end-to-end epoch rows")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile rows (ops and epochs)")
    p.add_argument("--no-eager", action="store_true", help="no eager epoch rows (only the --compile-modes ones)")
    p.add_argument("--compile-modes", default="default", help="comma-separated torch.compile modes of the "
                   "compiled epoch rows (reduce-overhead: CUDA graphs, which take the launches off the host)")
    p.add_argument("--cuda-graphs", action="store_true", help="also time epochs with --cuda-graphs (the eager "
                   "model's forward and backward replayed from CUDA graphs, both kernel settings)")
    p.add_argument("--op", help="only the per-op cases whose label contains this text")
    p.add_argument("--profile", type=Path, metavar="DIR", help="also profile one more epoch of each preset, mode "
                   "and kernel setting (torch.profiler), a table each in DIR")
    p.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets to time end to end")
    p.add_argument("--train-images", type=int, default=10240,
                   help="images an epoch trains on for the timing (a seeded subset; times scaled to the full set)")
    p.add_argument("--timed-epochs", type=_at_least_one, default=5,
                   help="timed epochs per setting, after one warm-up epoch (an eager epoch at these sizes is "
                   "host-bound, and varies from one to the next)")
    p.add_argument("--accuracy-seeds", type=int, default=0,
                   help="also train each preset fully with torch and triton kernels, this many seeds each")
    p.add_argument("--accuracy-epochs", type=int, help="epochs of those trainings (default: the preset's)")
