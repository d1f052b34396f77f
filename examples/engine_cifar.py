"""Train the Keras-tutorial `simple` CNN on CIFAR-10 with cudacnn.engine, our own framework.

    PYTHONPATH=src python examples/engine_cifar.py --device cuda --epochs 15
    PYTHONPATH=src python examples/engine_cifar.py --device cuda --profile --epochs 0
    PYTHONPATH=src python examples/engine_cifar.py --bench --epochs 0     # GPU vs CPU backend vs PyTorch eager

--data defaults to the shared JPEG set (.data/cifar10-jpeg.tar.gz); accuracy on it is lower than on the
official CIFAR-10 files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import cudacnn.engine as gnn
from cudacnn.atomic import write_text_atomic
from cudacnn.data import CIFAR10_MEAN, CIFAR10_STD, load_dataset
from cudacnn.evaluate.predict import normalize

DEFAULT_DATA = Path(__file__).resolve().parent.parent / ".data" / "cifar10-jpeg.tar.gz"


def to_inputs(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 32, 32, 3) -> normalised float32 (N, 3, 32, 32), C-contiguous NumPy for the engine."""
    return np.ascontiguousarray(normalize(images, CIFAR10_MEAN, CIFAR10_STD).numpy())


def train(args, data) -> dict:
    gnn.manual_seed(args.seed)
    model = gnn.simple_cnn().to(args.device)
    print(model, f"\n{model.num_parameters():,} parameters")
    X, y = data["X_train"], data["y_train"]
    if args.limit:  # a random subset: the files may be sorted by class
        keep = np.random.default_rng(args.seed).permutation(len(X))[:args.limit]
        X, y = X[keep], y[keep]
    optimizer = gnn.Adam(model.parameters(), lr=args.lr)
    history, start = [], time.perf_counter()
    for epoch in range(args.epochs):  # epoch by epoch, to stop inside --time-budget
        record = model.fit(X, y, epochs=1, batch_size=args.batch_size, optimizer=optimizer, seed=args.seed + epoch,
                           validation_data=(data["X_test"], data["y_test"]), flip=not args.no_flip)[0]
        history.append({**record, "epoch": epoch + 1})
        elapsed = time.perf_counter() - start
        if args.time_budget and elapsed * (epoch + 2) / (epoch + 1) > args.time_budget:
            print(f"stopping after {epoch + 1} epochs: the next would pass --time-budget {args.time_budget} s")
            break
    if args.save:
        model.save(args.save)
    best = max(h["val_accuracy"] for h in history)
    print(f"final test accuracy {history[-1]['val_accuracy']:.4f} (best {best:.4f}) after {len(history)} epochs")
    return {"history": history, "final_test_accuracy": history[-1]["val_accuracy"], "best_test_accuracy": best,
            "memory": gnn.memory_stats() if args.device != "cpu" else None}


# -- --bench ----------------------------------------------------------------------------------------------
def time_engine_epoch(device, X, y, batch_size, max_steps=None) -> float:
    """Seconds for one training epoch (or its first max_steps steps) after a short warm-up."""
    gnn.manual_seed(0)
    model = gnn.simple_cnn().to(device)
    opt = gnn.Adam(model.parameters())
    model.fit(X[:batch_size * 3], y[:batch_size * 3], epochs=1, batch_size=batch_size, optimizer=opt, verbose=False)
    history = model.fit(X, y, epochs=1, batch_size=batch_size, optimizer=opt, verbose=False, max_steps=max_steps)
    return history[0]["seconds"]


def time_torch_epoch(X, y, batch_size) -> float:
    """The same model, optimizer and batch size in plain PyTorch eager mode (data already on the GPU)."""
    import torch
    import torch.nn.functional as F

    from cudacnn.models import create_model

    torch.manual_seed(0)
    model = create_model("simple").cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    X_dev, y_dev = torch.from_numpy(X).cuda(), torch.from_numpy(y).cuda()

    def epoch(n_steps):
        order = torch.randperm(len(X), device="cuda")
        for step in range(n_steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(X_dev[idx]), y_dev[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    epoch(5)
    torch.cuda.synchronize()
    start = time.perf_counter()
    epoch(-(-len(X) // batch_size))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def matmul_bench() -> dict:
    import torch
    import triton

    from cudacnn.engine import gpu_ops

    a_np, b_np = (np.random.default_rng(i).standard_normal((1024, 1024)).astype(np.float32) for i in (1, 2))
    a, b = gpu_ops.asarray(a_np), gpu_ops.asarray(b_np)
    ta, tb = torch.from_numpy(a_np).cuda(), torch.from_numpy(b_np).cuda()
    err = float((gpu_ops.matmul(a, b).double() - ta.double() @ tb.double()).norm() / (ta.double() @ tb.double()).norm())
    engine_ms = triton.testing.do_bench(lambda: gpu_ops.matmul(a, b), warmup=100, rep=500, return_mode="median")
    torch_ms = triton.testing.do_bench(lambda: ta @ tb, warmup=100, rep=500, return_mode="median")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    return {"engine_ms": engine_ms, "torch_ms": torch_ms, "ratio": engine_ms / torch_ms, "rel_err": err,
            "torch_allow_tf32": tf32}


def agreement(X, y) -> dict:
    """One training step of the same weights on both backends: max relative difference of logits/grads."""
    out = {}
    for device in ("cpu", "cuda"):
        gnn.manual_seed(0)
        model = gnn.simple_cnn().to(device)
        logits = model.forward(X)
        opt = gnn.SGD(model.parameters(), lr=0.0)
        stats = model.ops.to_numpy(model.train_step(model.ops.asarray(X), model.ops.asarray(y), opt))
        out[device] = (logits, {k: model.ops.to_numpy(p.grad) for k, p in model.parameters().items()}, stats[0])

    def rel(a, b):
        return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))

    grads = {k: rel(out["cuda"][1][k], out["cpu"][1][k]) for k in out["cpu"][1]}
    return {"logits_max_rel_diff": rel(out["cuda"][0], out["cpu"][0]), "grad_max_rel_diff": max(grads.values()),
            "loss_cpu": float(out["cpu"][2]), "loss_gpu": float(out["cuda"][2]), "per_grad": grads}


def bench(args, data) -> dict:
    import torch

    X, y = data["X_train"], data["y_train"]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
              "cpu_threads": torch.get_num_threads()}
    import triton

    result["triton"] = triton.__version__
    result["agreement"] = agreement(X[:64], y[:64])
    print("agreement", json.dumps(result["agreement"], indent=None)[:300])
    result["matmul_1024"] = matmul_bench()
    print("matmul", result["matmul_1024"])
    result["epochs"] = {}
    for batch_size in args.bench_batch_sizes:
        gpu_s = time_engine_epoch("cuda", X, y, batch_size)
        steps_total = -(-len(X) // batch_size)
        cpu_steps = max(2, min(steps_total, args.cpu_images // batch_size))
        cpu_part = time_engine_epoch("cpu", X, y, batch_size, max_steps=cpu_steps)
        cpu_s = cpu_part * steps_total / cpu_steps
        torch_s = time_torch_epoch(X, y, batch_size)
        row = {"engine_gpu_s": gpu_s, "engine_cpu_s_extrapolated": cpu_s, "cpu_steps_timed": cpu_steps,
               "torch_eager_s": torch_s, "gpu_speedup_vs_cpu": cpu_s / gpu_s, "gpu_vs_torch": gpu_s / torch_s}
        result["epochs"][batch_size] = row
        print("epoch", batch_size, row)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="train on the first N images only")
    parser.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    parser.add_argument("--profile", action="store_true", help="print per-layer time and memory for one batch")
    parser.add_argument("--bench", action="store_true", help="time an epoch: GPU vs CPU backend vs PyTorch eager")
    parser.add_argument("--bench-batch-sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100, 500])
    parser.add_argument("--cpu-images", type=int, default=5000, help="images the CPU backend is timed on (--bench)")
    parser.add_argument("--time-budget", type=float, default=0, help="stop training before passing this many seconds")
    parser.add_argument("--save", help="write the trained weights (npz)")
    parser.add_argument("--json", help="write all results here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    ds = load_dataset(args.data, quiet=True)
    data = {"X_train": to_inputs(ds.train.images), "y_train": ds.train.labels.astype(np.int64),
            "X_test": to_inputs(ds.test.images), "y_test": ds.test.labels.astype(np.int64)}
    print(f"data: {len(data['X_train'])} train / {len(data['X_test'])} test images ({time.perf_counter() - start:.1f} s)")
    results = {"args": dict(vars(args))}
    if args.bench:
        results["bench"] = bench(args, data)
    if args.profile:
        gnn.manual_seed(0)
        model = gnn.simple_cnn().to(args.device)
        results["profile"] = model.profile(data["X_train"][:args.batch_size], data["y_train"][:args.batch_size])
    if args.epochs > 0:
        results["train"] = train(args, data)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
