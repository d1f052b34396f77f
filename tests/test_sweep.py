"""Sweeps: grid expansion, the worker queue, the results table's statistics, and a CPU sweep end to end."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

from cudacnn.cli import main
from cudacnn.errors import ConfigError, CudacnnError
from cudacnn.train import sweep
from cudacnn.train.config import TrainConfig

REPO = Path(__file__).resolve().parent.parent


def test_table_statistics_per_setting():
    rows = [{"setting": "lr=0.1", "test_acc": a, "train_time_s": t} for a, t in ((0.90, 10), (0.92, 12), (0.97, 11))]
    rows += [{"setting": "lr=0.2", "test_acc": 0.5, "train_time_s": 9}, {"setting": "lr=0.2", "status": "failed"}]
    first, second = sweep.summarize(rows)
    assert first["setting"] == "lr=0.1" and first["runs"] == 3 and first["failed"] == 0
    assert first["acc_mean"] == pytest.approx(0.93)
    assert first["acc_std"] == pytest.approx(statistics.stdev([0.90, 0.92, 0.97]))  # sample std, n - 1
    assert (first["acc_min"], first["acc_max"], first["train_time_median_s"]) == (0.90, 0.97, 11)
    assert (second["runs"], second["failed"], second["acc_std"], second["acc_mean"]) == (1, 1, 0.0, 0.5)
    table = sweep.markdown_table([first, second])
    assert "| lr=0.1 | 3 | 0 | 0.9300 | 0.0361 | 0.9000 | 0.9700 | 11.0 |" in table


def test_grid_times_seeds_and_validation_before_anything_runs(tmp_path):
    base = TrainConfig(model="simple", device="cpu")
    jobs = sweep.plan_jobs(base, {"lr": [0.1, 0.2], "batch_size": [64, 128]}, [0, 1, 2], tmp_path)
    assert len(jobs) == 12 and len({j.name for j in jobs}) == 12
    assert {(j.config.lr, j.config.batch_size, j.config.seed) for j in jobs} == {
        (lr, bs, s) for lr in (0.1, 0.2) for bs in (64, 128) for s in (0, 1, 2)}
    assert jobs[0].setting == "lr=0.1 batch_size=64" and jobs[0].config.out == str(tmp_path)
    with pytest.raises(ConfigError, match="lr must be positive"):
        sweep.plan_jobs(base, {"lr": [0.1, -1.0]}, [0], tmp_path)
    with pytest.raises(ConfigError, match="unknown setting.*learning_rate"):
        sweep.plan_jobs(base, {"learning_rate": [0.1]}, [0], tmp_path)
    with pytest.raises(ConfigError, match="non-empty list"):
        sweep.grid_points({"lr": 0.1})
    bad = tmp_path / "s.yaml"
    bad.write_text("grids: {lr: [0.1]}\n")
    with pytest.raises(ConfigError, match="unknown key.*grids"):
        sweep.load_spec(bad)


# A queued job for the test below: it touches started_<i>, waits (at most 60 s) until two jobs started, counts
# the jobs running (started minus ended, counted in that order, so never too many), touches counted_<i>, waits
# until two jobs counted, then records [its CUDA_VISIBLE_DEVICES, running, whether both waits ended in time] and
# touches ended_<i>. The first two jobs thus each count both of them; a later one counts what is alive with it.
BARRIER_JOB = """
import json, os, sys, time
from pathlib import Path
folder, i = Path(sys.argv[1]), sys.argv[2]
def count(kind):
    return len(list(folder.glob(kind + "_*")))
def wait_for_two(kind):
    deadline = time.monotonic() + 60  # only so that a broken queue fails instead of hanging
    while count(kind) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    return count(kind) >= 2
(folder / f"started_{i}").touch()
met = wait_for_two("started")
started = count("started")
running = started - count("ended")
(folder / f"counted_{i}").touch()
met = wait_for_two("counted") and met
(folder / f"{i}.json").write_text(json.dumps([os.environ["CUDA_VISIBLE_DEVICES"], running, met]))
(folder / f"ended_{i}").touch()
"""


def test_queue_runs_at_most_one_job_per_worker(tmp_path):
    """Six jobs, two workers: each job sees its worker's CUDA_VISIBLE_DEVICES, exactly two run at once (the
    jobs' file barrier holds the first two until both started: no timing involved)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    commands = [[sys.executable, "-c", BARRIER_JOB, str(marks), str(i)] for i in range(6)]
    envs = [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    results = sweep.run_queue(commands, envs, [tmp_path / "logs" / f"{i}.log" for i in range(6)], poll_s=0.02)
    assert [r["returncode"] for r in results] == [0] * 6
    seen = [json.loads((marks / f"{i}.json").read_text()) for i in range(6)]
    assert all(met for _, _, met in seen), seen  # every job found a second one started (no 60 s time-out)
    assert all(gpu == envs[r["worker"]]["CUDA_VISIBLE_DEVICES"] for (gpu, _, _), r in zip(seen, results))
    assert {gpu for gpu, _, _ in seen} == {"0", "1"}
    running = [n for _, n, _ in seen]
    assert running[:2] == [2, 2] and max(running) == 2, running  # the first two overlapped (the bound: next test)


def test_queue_never_runs_more_jobs_than_workers_nor_two_on_one(tmp_path, monkeypatch):
    """Fake processes that end on their third poll: the queue's bound, checked at every launch, no timing."""
    live, most = [], []

    class Job:
        def __init__(self, command, env, stdout, stderr):
            self.polls, self.returncode, self.gpu = 0, None, env["CUDA_VISIBLE_DEVICES"]
            assert self.gpu not in {job.gpu for job in live}, "two jobs on one worker"
            live.append(self)
            most.append(len(live))

        def poll(self):
            self.polls += 1
            if self.polls == 3:
                live.remove(self)
                self.returncode = 0
            return self.returncode

    monkeypatch.setattr(sweep.subprocess, "Popen", Job)
    envs = [{"CUDA_VISIBLE_DEVICES": str(gpu)} for gpu in range(3)]
    results = sweep.run_queue([["job"]] * 8, envs, [tmp_path / f"{i}.log" for i in range(8)], poll_s=0)
    assert [r["returncode"] for r in results] == [0] * 8 and max(most) == 3 and len(most) == 8


def test_interrupted_runs_resume_or_restart(monkeypatch, tmp_path):
    """A run with a checkpoint (and its config.yaml) continues from it, its folder kept; one that left nothing
    to continue from, or a checkpoint without the config.yaml that --resume reads, starts again in a clean
    folder (a second attempt must not trip over the first one's files)."""
    names = ("ckpt", "early", "noconfig")
    jobs = [sweep.Job(name, "base", 0, TrainConfig(model="simple", device="cpu")) for name in names]
    for name in names:
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    for name in ("ckpt", "noconfig"):
        (tmp_path / name / "checkpoints" / "last.pt").write_bytes(b"x")
    for name in ("ckpt", "early"):
        (tmp_path / name / "config.yaml").write_text("model: simple\n")
    seen = {}

    def fake_queue(commands, envs, logs, on_done=None):  # what each run's folder holds when it is launched
        seen.update(commands=commands, exists={name: (tmp_path / name).exists() for name in names},
                    ckpt_files={p.relative_to(tmp_path / "ckpt").as_posix()
                                for p in (tmp_path / "ckpt").rglob("*") if p.is_file()})
        return [{"returncode": 1, "wall_s": 0.0, "worker": 0} for _ in commands]

    monkeypatch.setattr(sweep, "run_queue", fake_queue)
    with pytest.raises(CudacnnError, match="3 of 3 runs failed"):
        sweep.run_sweep(jobs, tmp_path, workers=1, quiet=True)
    ckpt_args, early_args, noconfig_args = (c[c.index("train") + 1:] for c in seen["commands"])
    assert ckpt_args[:2] == ["--resume", str(tmp_path / "ckpt")]
    assert seen["ckpt_files"] == {"checkpoints/last.pt", "config.yaml"}  # resumed from its own files, untouched
    assert (tmp_path / "ckpt" / "checkpoints" / "last.pt").read_bytes() == b"x"
    for args, name in ((early_args, "early"), (noconfig_args, "noconfig")):
        assert args[:2] == ["--config", str(tmp_path / "configs" / f"{name}.yaml")], args
        assert not seen["exists"][name], name  # the stale folder was removed before the run started again


def test_train_runs_with_gpus_becomes_a_seed_sweep(monkeypatch, tmp_path):
    called = {}
    monkeypatch.setattr(sweep, "seeds_sweep", lambda config, gpus, quiet: called.update(
        seeds=(config.seed, config.runs), gpus=gpus))
    assert main(["train", "--model", "simple", "--runs", "3", "--seed", "5", "--gpus", "2", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    assert called == {"seeds": (5, 3), "gpus": 2}


@pytest.mark.slow
def test_cpu_sweep_end_to_end(tmp_path, monkeypatch):
    from cifar_archives import image_folder_files, write_tar

    files, _ = image_folder_files(classes=("a", "b"), per_class=10)
    tar = write_tar(tmp_path / "imgs.tar.gz", files)
    spec = tmp_path / "grid.yaml"
    spec.write_text(f"base: {{model: simple, epochs: 1, batch_size: 8, amp: none, val_fraction: 0.0, "
                    f"data: '{tar}', cache_dir: '{tmp_path / 'cache'}', channels_last: false}}\n"
                    "grid: {lr: [0.01, 0.02]}\nseeds: [0, 1]\ngpus: 2\n")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "src"))
    out = tmp_path / "sweeps"
    assert main(["sweep", str(spec), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    folder = out / "grid"
    summary = json.loads((folder / "results.json").read_text())
    assert summary["workers"] == 2 and len(summary["runs"]) == 4
    assert [s["setting"] for s in summary["settings"]] == ["lr=0.01", "lr=0.02"]
    for entry in summary["settings"]:
        accs = [r["test_acc"] for r in summary["runs"] if r["setting"] == entry["setting"]]
        assert entry["runs"] == 2 and entry["acc_mean"] == pytest.approx(statistics.fmean(accs))
        assert entry["acc_min"] == min(accs) and entry["acc_max"] == max(accs)
    for run in summary["runs"]:  # each run is a normal run folder, its config as the grid point says
        run_dir = folder / run["run"]
        assert json.loads((run_dir / "eval.json").read_text())["accuracy"] == run["test_acc"]
        assert (run_dir / "checkpoints" / "last.pt").exists()
    assert "| lr=0.01 | 2 | 0 |" in (folder / "results.md").read_text()
    # running the sweep again finds every run finished and only rewrites the table
    before = {p: p.stat().st_mtime_ns for p in folder.glob("*/eval.json")}
    assert main(["sweep", str(spec), "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in folder.glob("*/eval.json")}


def test_fast_preset_seeds_go_in_one_block_per_worker(monkeypatch, tmp_path):
    captured = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda jobs, folder, gpus, quiet: captured.update(jobs=jobs, gpus=gpus))
    config = TrainConfig(model="fast94", preset="fast94", runs=8, seed=10, out=str(tmp_path), name="s")
    sweep.seeds_sweep(config, 3, quiet=True)
    blocks = [(j.config.seed, j.config.runs) for j in captured["jobs"]]
    assert blocks == [(10, 2), (12, 3), (15, 3)] and captured["gpus"] == 3  # seeds 10..17, each once


def test_gpu_workers_get_one_gpu_and_a_share_of_the_cores(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(sweep.os, "cpu_count", lambda: 64)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    envs = sweep.worker_envs(4, "cuda")
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2", "3"]
    assert {e["OMP_NUM_THREADS"] for e in envs} == {e["TORCHINDUCTOR_COMPILE_THREADS"] for e in envs} == {"16"}
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")  # only these two are ours
    assert [e["CUDA_VISIBLE_DEVICES"] for e in sweep.worker_envs(2, "cuda")] == ["2", "5"]
    with pytest.raises(ConfigError, match="--gpus 3 but this machine has 2"):
        sweep.worker_envs(3, "cuda")


def test_children_import_this_package(monkeypatch):
    """Sweep workers and launched ranks find this very package first, whatever PYTHONPATH held."""
    from cudacnn.train.distributed import put_package_on_pythonpath

    src = str(REPO / "src")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    put_package_on_pythonpath()
    put_package_on_pythonpath()  # once only
    assert sweep.os.environ["PYTHONPATH"].split(sweep.os.pathsep) == [src, "/elsewhere"]
    monkeypatch.delenv("PYTHONPATH")
    put_package_on_pythonpath()
    assert sweep.os.environ["PYTHONPATH"] == src


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", ".."])
def test_sweep_name_must_stay_inside_out(tmp_path, capsys, name):
    spec = tmp_path / "grid.yaml"
    spec.write_text("base: {model: simple, epochs: 1}\ngrid: {lr: [0.01, 0.02]}\n")
    out = tmp_path / "sweeps"
    assert main(["sweep", str(spec), "--device", "cpu", "--out", str(out), "--name", name]) == 2
    assert f"sweep name {name!r} must be a plain folder name" in capsys.readouterr().err
    assert not tmp_path.joinpath("elsewhere").exists() and not out.exists()
