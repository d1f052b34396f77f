"""Data-parallel training on the CPU with gloo: shards, all-reduced metrics, 2 processes = 1 process at the
same global batch, resume across world sizes, timeouts, and the launcher's failure handling."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from cudacnn.data import Augment, GpuLoader, Split
from cudacnn.errors import ConfigError
from cudacnn.train import distributed
from cudacnn.train.checkpoint import load_checkpoint

from test_train import learnable_dataset, tiny_config

REPO = Path(__file__).resolve().parent.parent


def make_split(n, seed=0, same_image=False):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (1 if same_image else n, 32, 32, 3), dtype=np.uint8)
    return Split(np.repeat(images, n, 0) if same_image else images, rng.integers(0, 10, n))


# ---------------------------------------------------------------------- sharding (one process)
@pytest.mark.parametrize("n, global_batch, drop_last", [(100, 32, True), (100, 30, False), (20, 32, False)])
@pytest.mark.parametrize("world", [2, 3])
def test_global_batch_shards_are_disjoint_and_complete(n, global_batch, drop_last, world):
    split = make_split(n)
    loaders = [distributed.GlobalBatchLoader(split, global_batch, shuffle=True, seed=3, drop_last=drop_last,
                                             rank=r, world_size=world) for r in range(world)]
    alone = GpuLoader(split, global_batch, shuffle=True, seed=3, drop_last=drop_last)
    order = torch.randperm(n, generator=alone._generator())  # the epoch permutation every world size shares
    covered = (n // global_batch) * global_batch if drop_last else n
    parts = [loader.epoch_indices() for loader in loaders]
    merged = torch.cat(parts)
    assert len(merged) == covered and len(set(merged.tolist())) == covered  # disjoint, nothing lost
    assert set(merged.tolist()) == set(order[:covered].tolist())
    assert len({len(loader) for loader in loaders}) == 1  # every rank runs the same number of steps
    assert sum(loader.shard_size() for loader in loaders) == covered
    # step k of every world size trains on the same global batch: permutation[k*G:(k+1)*G]
    batches = [list(loader) for loader in loaders]
    sizes = loaders[0].step_sizes()
    start = 0
    for step, size in enumerate(sizes):
        labels = torch.cat([batches[r][step][1] for r in range(world)])
        assert torch.equal(labels, split_labels(split)[order[start:start + size]])
        start += size


def split_labels(split):
    return torch.from_numpy(split.labels)


def test_augmentation_streams_differ_per_rank():
    split = make_split(16, same_image=True)  # identical images: equal outputs would mean equal random draws
    aug = Augment(crop_pad=4, flip="random")
    outs = [GpuLoader(split, 8, augment=aug, rank=r, world_size=2, seed=1).prepare_epoch()[0] for r in range(2)]
    assert not torch.equal(outs[0], outs[1])
    again = GpuLoader(split, 8, augment=aug, rank=1, world_size=2, seed=1).prepare_epoch()[0]
    assert torch.equal(outs[1], again)  # still a function of (seed, epoch, rank)


def test_accumulation_plan_and_bad_plans():
    assert distributed.accumulation_steps(512, 4, None) == 1
    assert distributed.accumulation_steps(512, 4, 64) == 2
    assert distributed.accumulation_steps(31, 2, 6) == 3  # parts 15 and 16 -> at most 6 per forward
    assert [distributed.part(31, r, 2) for r in range(2)] == [(0, 15), (15, 31)]
    with pytest.raises(ConfigError, match="smaller than the 4 processes"):
        distributed.check_plan(3, 4, 100)
    with pytest.raises(ConfigError, match="fewer than the 4 processes"):
        distributed.check_plan(8, 4, 3)


def test_multicast_switches_are_set_only_where_unset():
    env = {"NCCL_NVLS_ENABLE": "1"}
    distributed.disable_multicast(env)
    assert env == {"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


# ---------------------------------------------------------------------- two gloo processes
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_after_second_epoch(trainer, record):
    if record["epoch"] == 2:
        raise KeyboardInterrupt


def _rank_main(rank: int, port: int, out: str, dataset, configs: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist

    from cudacnn.evaluate.metrics import evaluate
    from cudacnn.models import create_model
    from cudacnn.train.trainer import Trainer

    here, device = distributed.init("cpu", timeout_s=60)
    out = Path(out)
    # metrics: each rank evaluates its shard; the all-reduced result is the whole split's
    torch.manual_seed(0)
    model = create_model("simple", num_classes=dataset.num_classes)
    shard = GpuLoader(dataset.test, 16, rank=rank, world_size=2)
    result = distributed.reduce_eval(evaluate(model, shard, dataset.num_classes, classes=dataset.classes))
    if rank == 0:
        (out / "eval_2ranks.json").write_text(json.dumps(result.to_dict()))
    # training: the same global batch as the one-process references. Rank 1's host clock crosses the progress
    # display's 1-second marks at other steps than rank 0's: progress must add no collective that the other
    # rank does not make at the same step (a mismatched all-reduce hangs or mixes up gradients)
    if rank == 1:
        import itertools
        from types import SimpleNamespace

        from cudacnn.train import trainer as trainer_module

        ticks = itertools.count(step=0.6)
        trainer_module.time = SimpleNamespace(perf_counter=lambda: next(ticks))
    Trainer(configs["dp"], dataset=dataset, quiet=True).fit()
    if rank == 1:
        trainer_module.time = time
    Trainer(configs["uneven"], dataset=dataset, quiet=True).fit()
    Trainer(configs["one_to_two"], run_dir=Path(configs["one_to_two"].out) / "one_to_two", resume=True,
            dataset=dataset, quiet=True).fit()
    try:
        Trainer(configs["two_to_one"], dataset=dataset, quiet=True, callbacks=(stop_after_second_epoch,)).fit()
    except KeyboardInterrupt:
        pass
    # a hung rank: the other one's collective times out with a clear message instead of waiting forever
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=2))
    if rank == 1:
        time.sleep(6)
    else:
        try:
            dist.all_reduce(torch.ones(1), group=group)
            (out / "hang.txt").write_text("no timeout")
        except RuntimeError as exc:
            ok = distributed.is_collective_failure(exc)
            (out / "hang.txt").write_text(f"{ok}\n{distributed.timeout_message(here, exc)}")
    dist.barrier()
    distributed.shutdown()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One 2-process gloo job doing every distributed check; the tests below read what it left."""
    from cudacnn.train.trainer import Trainer

    tmp = tmp_path_factory.mktemp("dist")
    dataset = learnable_dataset(n_train=256, n_test=90)
    # SGD, not Adam: Adam is blind to a wrongly scaled gradient, and it magnifies rounding differences
    base = tiny_config(tmp, epochs=3, batch_size=32, val_fraction=0.25, optimizer="sgd", lr=0.05)
    configs = {name: dataclasses.replace(base, name=name) for name in ("dp", "one_to_two", "two_to_one")}
    configs["uneven"] = dataclasses.replace(base, name="uneven", batch_size=31, max_per_gpu_batch=6)
    # one-process runs: the references, and the start of the run the 2-process job resumes
    Trainer(dataclasses.replace(base, name="ref"), dataset=dataset, quiet=True).fit()
    Trainer(dataclasses.replace(base, name="ref_uneven", batch_size=31), dataset=dataset, quiet=True).fit()
    with pytest.raises(KeyboardInterrupt):
        Trainer(configs["one_to_two"], dataset=dataset, quiet=True, callbacks=(stop_after_second_epoch,)).fit()
    mp.spawn(_rank_main, args=(free_port(), str(tmp), dataset, configs), nprocs=2, join=True)
    Trainer(configs["two_to_one"], run_dir=tmp / "runs" / "two_to_one", resume=True, dataset=dataset,
            quiet=True).fit()
    return tmp, dataset


def weights(run_dir):
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["train_state"]["model"]


def assert_same_weights(a_dir, b_dir, rtol=1e-5, atol=1e-6):
    a, b = weights(a_dir), weights(b_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


@pytest.mark.slow
def test_all_reduced_metrics_equal_the_whole_split(two_ranks):
    from cudacnn.evaluate.metrics import evaluate
    from cudacnn.models import create_model

    tmp, dataset = two_ranks
    torch.manual_seed(0)
    model = create_model("simple", num_classes=dataset.num_classes)
    whole = evaluate(model, GpuLoader(dataset.test, 16), dataset.num_classes, classes=dataset.classes)
    reduced = json.loads((tmp / "eval_2ranks.json").read_text())
    assert reduced["num_samples"] == len(dataset.test) == 90
    assert reduced["confusion"] == whole.confusion.tolist()
    assert reduced["accuracy"] == pytest.approx(whole.accuracy)
    assert reduced["loss"] == pytest.approx(whole.loss, rel=1e-5)


@pytest.mark.slow
def test_two_processes_end_with_the_weights_of_one(two_ranks):
    tmp, _ = two_ranks
    runs = tmp / "runs"
    assert_same_weights(runs / "ref", runs / "dp")
    ref = [json.loads(line) for line in (runs / "ref" / "metrics.jsonl").read_text().splitlines()]
    dp = [json.loads(line) for line in (runs / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in dp] == pytest.approx([r["train_loss"] for r in ref], rel=1e-4)
    assert [r["val_acc"] for r in dp] == pytest.approx([r["val_acc"] for r in ref])
    info = json.loads((runs / "dp" / "distributed.json").read_text())
    assert info["world_size"] == 2 and info["per_rank_batch"] == [16, 16] and info["backend"] == "gloo"
    assert json.loads((runs / "dp" / "eval.json").read_text())["num_samples"] == 90  # sharded test, reduced


@pytest.mark.slow
def test_uneven_parts_with_gradient_accumulation_match_one_process(two_ranks):
    tmp, _ = two_ranks
    runs = tmp / "runs"
    info = json.loads((runs / "uneven" / "distributed.json").read_text())
    assert info["per_rank_batch"] == [15, 16] and info["accumulation_steps"] == 3
    assert_same_weights(runs / "ref_uneven", runs / "uneven")


@pytest.mark.slow
def test_resume_across_world_sizes(two_ranks):
    tmp, _ = two_ranks
    runs = tmp / "runs"
    for name in ("one_to_two", "two_to_one"):
        assert len((runs / name / "metrics.jsonl").read_text().splitlines()) == 3
        assert_same_weights(runs / "ref", runs / name)


@pytest.mark.slow
def test_a_hung_rank_times_out_with_a_clear_message(two_ranks):
    tmp, _ = two_ranks
    ok, message = (tmp / "hang.txt").read_text().split("\n", 1)
    assert ok == "True"
    assert "another rank died or hung" in message and "--dist-timeout" in message


# ---------------------------------------------------------------------- the launcher
def test_a_dead_rank_stops_the_job_with_its_rank_named(tmp_path):
    """Rank 1 exits with code 3 while rank 0 would sleep a minute: the launcher stops rank 0 and names
    rank 1; every rank's environment has NVLink multicast switched off."""
    code = ("import os, sys, time; r = os.environ['RANK']; "
            f"open(r'{tmp_path}/env' + r, 'w').write(os.environ.get('NCCL_NVLS_ENABLE', '') + "
            "os.environ.get('TORCH_SYMM_MEM_DISABLE_MULTICAST', '') + os.environ.get('NVSHMEM_DISABLE_NVLS', '')); "
            "sys.exit(3) if r == '1' else time.sleep(60)")
    launcher = ("import sys\nfrom cudacnn.train.distributed import launch\nfrom cudacnn.errors import CudacnnError\n"
                f"try:\n    launch(2, ['-c', {code!r}])\nexcept CudacnnError as exc:\n    print('ERROR', exc)\n"
                "    sys.exit(2)\n")
    env = {k: v for k, v in os.environ.items() if k not in distributed.MULTICAST_OFF}
    env["PYTHONPATH"] = str(REPO / "src")
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", launcher], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ERROR rank 1 of 2 exited with code 3" in done.stdout
    assert time.monotonic() - start < 60  # rank 0 was stopped, not waited for
    assert (tmp_path / "env0").read_text() == (tmp_path / "env1").read_text() == "011"


def train_two_ranks_on_the_cpu(tmp_path, *extra, env=None) -> subprocess.CompletedProcess:
    """`cudacnn train --gpus 2 --device cpu` on a small image folder, in a child process (`env`: more
    environment variables for it and its ranks)."""
    from cifar_archives import image_folder_files, write_tar

    tar = tmp_path / "imgs.tar.gz"
    if not tar.exists():
        files, _ = image_folder_files(classes=("a", "b"), per_class=12)
        write_tar(tar, files)
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    args = ["train", "--gpus", "2", "--data", str(tar), "--model", "simple", "--batch-size", "8",
            "--device", "cpu", "--amp", "none", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "c"),
            "--val-fraction", "0.25", "--quiet", "--no-channels-last", *extra]
    return subprocess.run([sys.executable, "-m", "cudacnn", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_gpus_2_on_the_cpu(tmp_path):
    """`cudacnn train --gpus 2 --device cpu`: the launcher starts two gloo ranks; one run folder results."""
    done = train_two_ranks_on_the_cpu(tmp_path, "--epochs", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    tar = tmp_path / "imgs.tar.gz"
    (run,) = list((tmp_path / "runs").iterdir())  # the ranks agreed on one folder name
    assert json.loads((run / "distributed.json").read_text())["world_size"] == 2
    from cudacnn.data import load_dataset

    test_size = len(load_dataset(tar, cache_dir=tmp_path / "c", quiet=True).test)
    assert json.loads((run / "eval.json").read_text())["num_samples"] == test_size  # sharded, then summed
    assert (run / "report.html").exists() and (run / "checkpoints" / "last.pt").exists()


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_ddp_trains_like_eager(tmp_path):
    """`--compile` under DDP (the multi-GPU speed lever): two ranks end with eager's weights. Each run gets its
    own inductor cache folder: only the compiled one writes generated code there."""
    caches = {}
    for name, extra in (("eager", ()), ("compiled", ("--compile",))):
        caches[name] = tmp_path / f"inductor-{name}"
        done = train_two_ranks_on_the_cpu(tmp_path, "--epochs", "2", "--name", name, *extra,
                                          env={"TORCHINDUCTOR_CACHE_DIR": str(caches[name])})
        assert done.returncode == 0, done.stderr[-3000:]
    assert yaml.safe_load((tmp_path / "runs" / "compiled" / "config.yaml").read_text())["compile"] is True
    generated = [p for p in caches["compiled"].rglob("*.py") if p.is_file()] if caches["compiled"].exists() else []
    assert generated, "the --compile run left no inductor-generated code: nothing was compiled"
    assert not caches["eager"].exists() or not any(p.is_file() for p in caches["eager"].rglob("*"))
    # inductor's fused kernels round differently from eager: a looser bound than between two eager runs
    assert_same_weights(tmp_path / "runs" / "compiled", tmp_path / "runs" / "eager", rtol=1e-4, atol=1e-5)
