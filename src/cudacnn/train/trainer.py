"""The trainer: a data source and a config in, a trained, evaluated and reported run folder out.

Run folder: config.yaml, metrics.jsonl (one line per epoch), checkpoints/{last,best}.pt, eval.json,
plots/*.png, report.html, summary.md. Checkpoints are written at every epoch end, so an interruption
loses at most the current epoch, and `--resume RUN` continues to the same weights as an uninterrupted run.

Under torchrun (or `cudacnn train --gpus N`) the same trainer runs data-parallel: every rank trains its part
of each global batch through DistributedDataParallel, evaluation is sharded and all-reduced, and rank 0
alone writes the run folder (see cudacnn.train.distributed).
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from rich.progress import Progress

from cudacnn.atomic import write_text_atomic
from cudacnn.data import Augment, Dataset, GpuLoader, channel_stats, load_dataset, split_validation
from cudacnn.data.sources import SAMPLE, sample_path
from cudacnn.errors import CheckpointError, ConfigError, CudacnnError, DiskFullError
from cudacnn.evaluate.metrics import evaluate
from cudacnn.models import create_model
from cudacnn.models.registry import check_input_size, takes_option
from cudacnn.progress import format_duration, make_progress
from cudacnn.train import distributed, setup, sinks
from cudacnn.train.callbacks import EarlyStopping
from cudacnn.train.checkpoint import (check_compatible, load_checkpoint, run_checkpoint, save_checkpoint,
                                     stored_model_kwargs)
from cudacnn.train.config import (DIST_TIMEOUT_S, TrainConfig, claim_run_dir, from_dict, load_config_file, run_name,
                                  save_config)
from cudacnn.train.graphs import GraphedStep, check_graphs
from cudacnn.train.setup import device_name

log = logging.getLogger(__name__)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDiverged(CudacnnError):
    pass


@dataclass
class RunResult:
    run_dir: Path
    epochs_done: int
    test_accuracy: float
    best_val_accuracy: float | None
    history: list[dict] = field(default_factory=list)


class Trainer:
    """`Trainer(config).fit()`; callbacks are called as cb(trainer, epoch_record) after each epoch (on every
    rank). `dist_timeout_s`: under torchrun, a collective waiting longer than this fails (a dead or hung rank).
    `fit_to_cpu`: on a CPU, cut the run to a few minutes (cpu_plan.cpu_sized; for a recipe the user did not pick)."""

    def __init__(self, config: TrainConfig, run_dir: Path | None = None, resume: bool = False,
                 dataset: Dataset | None = None, callbacks: tuple[Callable, ...] = (), quiet: bool = False,
                 dist_timeout_s: float = DIST_TIMEOUT_S, fit_to_cpu: bool = False):
        self.config, self.callbacks, self.resume = config, callbacks, resume
        self.dist, self.device = distributed.init(config.device, dist_timeout_s)
        if config.cuda_graphs:  # before anything is written
            check_graphs(config, self.device, self.dist.enabled)
        self.quiet = quiet or not self.dist.is_main
        self.run_dir = Path(run_dir) if run_dir else distributed.main_computes(lambda: new_run_dir(config))
        setup.seed_everything(config.seed, config.deterministic)
        setup.set_tf32(config.tf32)
        sinks.check_available(config.log_sinks)  # before the data loads or anything is written
        # with no source named, an offline machine falls back to the bundled sample (with a warning)
        self.dataset = dataset or load_dataset(config.data, cache_dir=config.cache_dir, quiet=quiet,
                                               image_size=config.image_size, fallback_to_sample=not resume)
        if config.data is None and self.dataset.source == str(sample_path()):
            self.config = config = replace(config, data=SAMPLE)  # what evaluate and resume will load
        if fit_to_cpu and self.device.type == "cpu" and not self.dist.enabled:
            from cudacnn.train.cpu_plan import cpu_sized

            self.config = config = cpu_sized(config, len(self.dataset.train))
        self._build_data()
        self._build_model()

    # ------------------------------------------------------------------ construction
    def _build_data(self) -> None:
        c = self.config
        train, self.val_split = self.dataset.train, None
        if c.val_fraction > 0:
            train, self.val_split = split_validation(train, c.val_fraction, seed=c.seed)
            if len(train) == 0:
                raise ConfigError(f"--val-fraction {c.val_fraction} leaves no training images of "
                                  f"{len(self.dataset.train)}; lower it")
        mean, std = channel_stats(train.images)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        dtype = torch.float32  # autocast casts inside the model; inputs stay fp32 for exactness on CPU
        common = dict(device=self.device, mean=self.mean, std=self.std, dtype=dtype,
                      channels_last=c.channels_last and self.device.type == "cuda",
                      rank=self.dist.rank, world_size=self.dist.world_size)
        distributed.check_plan(c.batch_size, self.dist.world_size, len(train))
        # Each rank takes its part of every global batch, so the world size never changes what is trained.
        self.train_loader = distributed.GlobalBatchLoader(
            train, c.batch_size, augment=Augment(c.crop_pad, "reflect", c.flip, c.cutout),
            shuffle=True, drop_last=len(train) > c.batch_size, seed=c.seed, **common)
        self.accumulation = distributed.accumulation_steps(c.batch_size, self.dist.world_size,
                                                           c.max_per_gpu_batch)
        eval_batch = max(-(-c.batch_size // self.dist.world_size), 500)
        if c.max_per_gpu_batch:
            eval_batch = min(eval_batch, c.max_per_gpu_batch)
        # Evaluation shards are contiguous parts of the split; metrics are summed over ranks.
        self.val_loader = GpuLoader(self.val_split, eval_batch, **common) if self.val_split else None
        self.test_loader = GpuLoader(self.dataset.test, eval_batch, **common)

    def _build_model(self) -> None:
        c = self.config
        kwargs = dict(c.model_kwargs)
        if self.dataset.image_size != 32 and takes_option(c.model, "image_size"):  # a head sized by the input
            kwargs.setdefault("image_size", self.dataset.image_size)
        self.model = create_model(c.model, num_classes=self.dataset.num_classes, **kwargs)
        if self.dataset.image_size != 32:
            check_input_size(self.model, c.model, self.dataset.image_size)
        # the run's config (config.yaml, checkpoints) names the net's shape, defaults included, so that resuming
        # and loading rebuild this net even after the model's defaults change
        self.config = c = replace(c, model_kwargs={**kwargs, **getattr(self.model, "arch", {})})
        if c.pretrained:
            from cudacnn.models.resnet import load_pretrained

            load_pretrained(self.model, c.pretrained)
        if c.init_from and not self.resume:  # a resume restores its own weights
            self._init_from(c.init_from)
        if c.kernels != "torch":
            from cudacnn.kernels import cross_entropy_loss, swap_modules

            # SyncBatchNorm conversion below would drop the activation a fused BatchNormAct carries: keep BN then
            self.model = swap_modules(self.model, c.kernels, batchnorm=not (c.sync_bn and self.dist.enabled))
            self.criterion = cross_entropy_loss(c.kernels, c.label_smoothing)
        else:
            self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=c.label_smoothing)
        if c.sync_bn and self.dist.enabled:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        memory_format = torch.channels_last if c.channels_last and self.device.type == "cuda" else None
        self.model = self.model.to(self.device, memory_format=memory_format)
        # CUDA graphs (reduce-overhead) cut the per-step launch cost that bounds small per-GPU batches; they
        # need a GPU, so the CPU compiles in the default mode.
        mode = c.compile_mode if self.device.type == "cuda" else "default"
        self.forward = torch.compile(self.model, mode=mode) if c.compile else self.model
        self.ddp = None
        if self.dist.enabled:  # DDP broadcasts rank 0's initial weights and averages gradients
            from torch.nn.parallel import DistributedDataParallel

            # DDP around the compiled model, not torch.compile around DDP: dynamo cannot trace DDP's own
            # forward and runs it eagerly, then compiles only a model forward it may trace as a frame of its
            # own (nn.Sequential's is torch's code: never). Either way its DDPOptimizer splits the compiled
            # graph at the gradient buckets. No per-forward broadcast of BN statistics (ranks keep their own;
            # evaluation and the checkpoint use rank 0's); gradients live in the all-reduce buckets.
            self.ddp = DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True)
            self.forward = self.ddp
            self._fold_rank_into_rng(0)
        self.optimizer = setup.build_optimizer(self.model, c)
        self.scheduler = setup.build_scheduler(self.optimizer, c, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(self.device.type) if c.amp == "fp16" else None
        self.graphed = GraphedStep(self.model, self._forward_backward, self.device) if c.cuda_graphs else None
        self.ema = setup.build_ema(self.model, c.ema_decay)
        self.early = EarlyStopping(c.early_stopping)
        self.history: list[dict] = []
        self.start_epoch = 0

    def _init_from(self, source: str) -> None:
        """Start from the (verified) weights of a run folder or checkpoint, with a fresh optimizer: fine-tuning."""
        ckpt = load_checkpoint(source)
        if ckpt["model_name"] != self.config.model:
            raise CheckpointError(f"--init-from {source} holds a '{ckpt['model_name']}' model, this run trains "
                                  f"'{self.config.model}'; pass --model {ckpt['model_name']} or another checkpoint")
        check_compatible(self.model, ckpt["model"], f"--init-from {source} (model '{ckpt['model_name']}', "
                         f"{len(ckpt['classes'])} classes)")
        self.model.load_state_dict(ckpt["model"])
        if list(ckpt["classes"]) != list(self.dataset.classes):  # allowed: fine-tuning to other labels of one count
            log.warning("--init-from %s was trained on the classes %s; this data's are %s: its head starts from "
                        "the other classes' weights", source, ", ".join(map(str, ckpt["classes"])),
                        ", ".join(map(str, self.dataset.classes)))
        if not self.quiet:
            log.info("starting from the weights of %s (epoch %d)", source, ckpt["epoch"] + 1)

    @property
    def inference_model(self) -> torch.nn.Module:
        """The weights that are evaluated and saved: the EMA when it is on."""
        return self.ema.module if self.ema else self.model

    # ------------------------------------------------------------------ checkpoints
    def _state(self, epoch: int) -> dict:
        return {
            "model_name": self.config.model, "model_kwargs": self.config.model_kwargs,
            "classes": self.dataset.classes, "mean": self.mean, "std": self.std,
            "model": self.inference_model.state_dict(), "epoch": epoch, "config": self.config.to_dict(),
            "train_state": {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "ema": self.ema.state_dict() if self.ema else None,
                "early_stopping": self.early.state_dict(), "rng": setup.rng_state(), "history": self.history,
            },
        }

    def _restore(self, ckpt: dict) -> None:
        if ckpt["model_name"] != self.config.model:
            raise CheckpointError(f"the checkpoint is of model '{ckpt['model_name']}', the run trains "
                                  f"'{self.config.model}'; resume with the run's own config")
        if "train_state" not in ckpt:
            raise CheckpointError("the checkpoint holds weights only (a best.pt or an export), not the training "
                                  "state a resume needs; resume from the run's checkpoints/last.pt")
        built = stored_model_kwargs(ckpt)
        # the config and the checkpoint both name the whole shape: a mismatch means the run's files were mixed
        if any(self.config.model_kwargs.get(key) != value for key, value in built.items()):
            raise CheckpointError(f"the checkpoint's net ({ckpt['model_name']} with {built}) is not the one this "
                                  f"version of cudacnn builds from the run's config ({self.config.model_kwargs}): "
                                  "the model's defaults changed since; evaluate, predict and export still load it, "
                                  "but it cannot be resumed")
        state = ckpt["train_state"]
        check_compatible(self.model, state["model"], f"checkpoint of model '{ckpt['model_name']}'")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema and state["ema"]:
            self.ema.load_state_dict(state["ema"])
        self.early.load_state_dict(state["early_stopping"])
        setup.set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.start_epoch = ckpt["epoch"] + 1
        self._fold_rank_into_rng(self.start_epoch)

    def _fold_rank_into_rng(self, epoch: int) -> None:
        """Ranks >= 1 draw their own dropout masks; rank 0 keeps the single-process stream."""
        if self.dist.rank > 0:
            torch.manual_seed(self.config.seed * 1_000_003 + epoch * 7919 + self.dist.rank)

    # ------------------------------------------------------------------ loops
    def _train_epoch(self, epoch: int, progress: Progress) -> dict:
        c, model = self.config, self.model
        model.train()
        self.train_loader.set_epoch(epoch)
        steps = len(self.train_loader)
        task = progress.add_task(f"epoch {epoch + 1}/{c.epochs}", total=steps, stats="", eta_label="epoch ETA")
        if self.graphed:  # the graph adds to its own totals
            loss_sum, correct = self.graphed.totals()
        else:
            loss_sum = torch.zeros((), device=self.device)
            correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, start = 0, time.perf_counter()
        shown = start - 1.0  # the first step is shown at once: an ETA within seconds of the start
        world = self.dist.world_size
        batches = zip(self.train_loader, self.train_loader.step_sizes())
        for step, ((images, labels), global_size) in enumerate(batches):
            seen += len(labels)
            if self.graphed:  # one batch a step (no split under graphs), its gradients written, not added
                self.graphed.step(images, labels)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                micro = [(x, y) for x, y in zip(images.tensor_split(self.accumulation),
                                                labels.tensor_split(self.accumulation)) if len(y)]
                for index, (x, y) in enumerate(micro):
                    # Gradients are all-reduced once, after the last micro-batch.
                    last = index == len(micro) - 1
                    with nullcontext() if last or self.ddp is None else self.ddp.no_sync():
                        # DDP averages over ranks: scaled so the result is the global batch's mean-loss gradient.
                        self._forward_backward(x, y, loss_sum, correct, scale=len(y) * world / global_size)
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            if c.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
            if self.scaler:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.scheduler:
                self.scheduler.step()
            if self.ema:
                self.ema.update_parameters(model)
            now = time.perf_counter()
            if now - shown >= 1.0 or step == steps - 1:  # the only host syncs of the epoch: one a second
                shown = now
                # each rank's own clock decides when it shows progress, so only the last step, which every
                # rank reaches together, may run a collective: in between, a rank shows its own figures
                last_step = step == steps - 1
                mean_loss, accuracy, total = (self._global_stats(loss_sum, correct, seen) if last_step
                                              else self._local_stats(loss_sum, correct, seen))
                if not math.isfinite(mean_loss) and (last_step or not self.dist.enabled):
                    raise TrainingDiverged(self._diverged_message(epoch))
                elapsed = time.perf_counter() - start
                # the run's remaining training steps at this epoch's pace (evaluation not included)
                left = elapsed / (step + 1) * (steps - step - 1 + steps * (c.epochs - epoch - 1))
                progress.update(task, completed=step + 1, stats=f"loss {mean_loss:.3f} acc {accuracy:.3f} "
                                f"{total / elapsed:,.0f} img/s, run ETA {format_duration(left)}")
        progress.remove_task(task)
        elapsed = time.perf_counter() - start
        mean_loss, accuracy, total = self._global_stats(loss_sum, correct, seen)
        return {"epoch": epoch + 1, "train_loss": mean_loss, "train_acc": accuracy,
                "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                "images_per_s": total / elapsed}

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor, loss_sum: torch.Tensor, correct: torch.Tensor,
                          scale: float = 1.0) -> None:
        """Forward, loss and backward of one (micro-)batch; its loss sum and correct count added to the totals in
        place. Under --cuda-graphs this is the step the graph holds."""
        c = self.config
        # a graph keeps the casts of the step that captured it: autocast's weight-cast cache would outlive them
        with torch.autocast(self.device.type, dtype=AMP_DTYPES.get(c.amp), enabled=c.amp != "none",
                            cache_enabled=self.graphed is None):
            logits = self.forward(x)
            loss = self.criterion(logits.float(), y)
        scaled = loss if scale == 1 else loss * scale
        # One GPU: backward runs on this thread rather than autograd's device thread; the hand-off there and
        # back cost 65-140 us a backward, more with our ops' Python autograd Functions in the graph, and small
        # nets' eager steps are host-bound (benchmarks/kernels.md). DDP keeps the default, under which its
        # gradient hooks were tested.
        with (torch.autograd.set_multithreading_enabled(False) if self.ddp is None else nullcontext()):
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()

    def _local_stats(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, int]:
        """(mean loss, accuracy, samples) of this rank, the samples scaled to the world; no collective."""
        return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen * self.dist.world_size

    def _global_stats(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, float, int]:
        """(mean loss, accuracy, samples) over all ranks; one host sync."""
        if not self.dist.enabled:
            return loss_sum.item() / seen, correct.item() / seen, seen
        stats = torch.stack([loss_sum.double(), correct.double(),
                             torch.tensor(float(seen), dtype=torch.float64, device=self.device)])
        total_loss, total_correct, total = distributed.all_reduce_sum(stats).tolist()
        return total_loss / total, total_correct / total, int(total)

    def _evaluate(self, loader: GpuLoader, tta_level: int = 0):
        """The EvalResult of the inference weights (EMA if on) on a whole split: each rank evaluates its
        shard, the results are summed over ranks."""
        return distributed.reduce_eval(evaluate(self.inference_model, loader, self.dataset.num_classes,
                                                device=self.device, tta_level=tta_level,
                                                classes=self.dataset.classes))

    def _validate(self, loader: GpuLoader) -> tuple[float, float]:
        """(loss, accuracy) on a split; the same evaluation as the final test."""
        distributed.broadcast_buffers(self.inference_model)  # rank 0's BN statistics, the saved ones
        result = self._evaluate(loader)
        return result.loss, result.accuracy

    def _diverged_message(self, epoch: int) -> str:
        last = self.run_dir / "checkpoints" / "last.pt"
        kept = f"the last good checkpoint is {last}" if last.exists() else "no epoch had finished"
        return (f"the training loss became NaN/inf in epoch {epoch + 1}; stopped ({kept}). "
                f"Lower --lr (now {self.config.lr}), add --grad-clip 1.0, or use --amp bf16 instead of fp16")

    # ------------------------------------------------------------------ the run
    def fit(self) -> RunResult:
        c = self.config
        ckpt_dir = self.run_dir / "checkpoints"
        last = ckpt_dir / "last.pt"
        if self.resume:
            from cudacnn.data.split import check_test_files

            check_test_files(self.run_dir, self.dataset, purpose="resume on")
            # Rank 0 reads the checkpoint and sends it to all: other hosts need no copy of the run folder.
            where = self.device if not self.dist.enabled else "cpu"
            ckpt = distributed.main_computes(lambda: load_checkpoint(last, map_location=where) if last.exists() else None)
            if ckpt is not None:
                self._restore(ckpt)
            if not self.quiet and (self.start_epoch >= c.epochs or self.early.should_stop):  # stopped in finish()
                log.info("%s finished training; evaluating it and writing its report", self.run_dir)
            elif not self.quiet:  # no checkpoint: the run stopped in its first epoch, and starts over
                log.info("resuming %s at epoch %d", self.run_dir, self.start_epoch + 1)
        elif self.dist.is_main:
            save_config(c, self.run_dir / "config.yaml")
            self._write_data_info()
        if self.dist.is_main:
            ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.sinks = sinks.MetricSinks(self.run_dir, c.log_sinks if self.dist.is_main else [], self.start_epoch + 1)
        if self.dist.enabled and self.dist.is_main:
            self._write_parallel_info()
        if not self.quiet:
            log.info("training %s on %s (%d train / %d val / %d test) on %s, seed %d; run folder %s", c.model,
                     self.dataset.name, len(self.train_loader.labels),
                     len(self.val_split) if self.val_split else 0, len(self.dataset.test),
                     f"{self.dist.world_size} x {device_name(self.device)}" if self.dist.enabled
                     else device_name(self.device) + (f" ({self.device})" if self.device.type == "cuda" else ""),
                     c.seed, self.run_dir)
        epoch = self.start_epoch
        try:
            with make_progress(self.quiet) as progress:
                # an early-stopped run resumed before its evaluation was written trains no further
                for epoch in range(self.start_epoch, self.start_epoch if self.early.should_stop else c.epochs):
                    record = self._train_epoch(epoch, progress)
                    if self.val_loader:
                        record["val_loss"], record["val_acc"] = self._validate(self.val_loader)
                    self._end_epoch(epoch, record)
                    if self.early.should_stop:
                        log.info("early stopping: no validation gain in %d epochs", c.early_stopping)
                        break
        except KeyboardInterrupt:
            kept = f"checkpoints in {ckpt_dir}" if last.exists() else "no epoch finished yet, so it starts over"
            log.warning("interrupted in epoch %d; %s. Continue with: cudacnn train --resume %s",
                        epoch + 1, kept, self.run_dir)
            raise
        except torch.cuda.OutOfMemoryError as exc:
            if self.dist.enabled:
                per_rank = -(-c.batch_size // self.dist.world_size) // self.accumulation
                raise CudacnnError(f"CUDA ran out of memory at {per_rank} samples per GPU; try "
                                   f"--max-per-gpu-batch {max(1, per_rank // 2)} (same global batch)") from exc
            raise CudacnnError(f"CUDA ran out of memory at batch size {c.batch_size}; "
                               f"try --batch-size {max(1, c.batch_size // 2)}") from exc
        except RuntimeError as exc:
            if self.dist.enabled and distributed.is_collective_failure(exc):
                raise CudacnnError(distributed.timeout_message(self.dist, exc)) from exc
            raise
        except DiskFullError as exc:
            raise self._disk_full(exc) from exc
        finally:
            self.sinks.close()
        try:
            return self.finish()
        except DiskFullError as exc:
            raise self._disk_full(exc) from exc

    def _disk_full(self, exc: DiskFullError) -> DiskFullError:
        """The same error, naming the command that continues: the last checkpoint written is whole."""
        return DiskFullError(exc.path, f"free space and resume with `cudacnn train --resume {self.run_dir}`")

    def _write_data_info(self) -> None:
        """data.json: what the run trained on, including how the source was read (e.g. the train/test split
        drawn from a class-folder tree, with every test image's name)."""
        from cudacnn.data.image_folder import RESIZE_POLICY

        d = self.dataset
        info = {"name": d.name, "source": d.source, "classes": d.classes, "image_size": d.image_size,
                "resize": RESIZE_POLICY, "train_images": len(d.train), "test_images": len(d.test), **d.info}
        write_text_atomic(self.run_dir / "data.json", json.dumps(info, indent=1))

    def _write_parallel_info(self) -> None:
        c, world = self.config, self.dist.world_size
        info = {"world_size": world, "backend": "nccl" if self.device.type == "cuda" else "gloo",
                "global_batch": c.batch_size,
                "per_rank_batch": [hi - lo for lo, hi in (distributed.part(c.batch_size, r, world)
                                                          for r in range(world))],
                "accumulation_steps": self.accumulation, "sync_bn": self.config.sync_bn,
                "from_epoch": self.start_epoch + 1}
        write_text_atomic(self.run_dir / "distributed.json", json.dumps(info, indent=2))

    def _end_epoch(self, epoch: int, record: dict) -> None:
        self.history.append(record)
        improved = self.early.update(record["val_acc"]) if "val_acc" in record else False
        if self.dist.is_main:
            state = self._state(epoch)
            # best.pt before last.pt: if writing fails in between (a full disk), the resume from the previous
            # last.pt repeats this epoch and writes both again
            weights = {k: v for k, v in state.items() if k != "train_state"}
            if improved:  # weights for evaluation; resuming reads last.pt alone
                save_checkpoint(self.run_dir / "checkpoints" / "best.pt", weights)
            kept = top_epochs(self.history, self.config.keep_best)
            if record["epoch"] in kept:
                save_checkpoint(self.run_dir / "checkpoints" / f"best-e{record['epoch']:03d}.pt", weights)
            save_checkpoint(self.run_dir / "checkpoints" / "last.pt", state)
            prune_best(self.run_dir / "checkpoints", kept)
            # Rewritten from the checkpointed history, so a resumed run never repeats or loses a line.
            write_text_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
            self.sinks.write(self.history)
        if not self.quiet:
            val = f" val loss {record['val_loss']:.3f} acc {record['val_acc']:.4f}" if "val_acc" in record else ""
            log.info("epoch %d: train loss %.3f acc %.4f%s (%.1f s, %.0f img/s)", record["epoch"],
                     record["train_loss"], record["train_acc"], val, record["epoch_time_s"], record["images_per_s"])
        for callback in self.callbacks:
            callback(self, record)

    def finish(self) -> RunResult:
        """Evaluate the best (or last) weights on the test split and write plots and the report."""
        from cudacnn.evaluate.plots import plot_training_curves
        from cudacnn.evaluate.report import environment, save_evaluation, write_report

        where = self.device if not self.dist.enabled else "cpu"

        def read_weights():  # the weights alone travel to the other ranks, not the optimizer state
            chosen = run_checkpoint(self.run_dir)
            ckpt = load_checkpoint(chosen, map_location=where)
            return chosen, {"model": ckpt["model"], "epoch": ckpt["epoch"]}

        chosen, weights = distributed.main_computes(read_weights)  # only rank 0 has the run folder for sure
        self.inference_model.load_state_dict(weights["model"])
        result = self._evaluate(self.test_loader, tta_level=2 if self.config.tta else 0)
        plain_accuracy = self._evaluate(self.test_loader).accuracy if self.config.tta else result.accuracy
        if self.dist.is_main:  # rank 0 alone writes the run folder
            extra = {"checkpoint": str(chosen), "epoch": weights["epoch"] + 1, "data": self.dataset.source,
                     "device": device_name(self.device),
                     "train_time_s": sum(r["epoch_time_s"] for r in self.history),
                     "accuracy_without_tta": plain_accuracy, **environment()}
            if self.dist.enabled:
                extra["world_size"] = self.dist.world_size
            if self.device.type == "cuda":
                extra["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
            save_evaluation(result, self.run_dir, extra)
            plot_training_curves(self.history, self.run_dir / "plots" / "curves.png")
            write_report(self.run_dir)
        best_val = max((r["val_acc"] for r in self.history if "val_acc" in r), default=None)
        if not self.quiet:
            log.info("test accuracy %.4f (%s); report: %s", result.accuracy, self.dataset.name,
                     self.run_dir / "report.html")
        return RunResult(self.run_dir, len(self.history), result.accuracy, best_val, self.history)


def top_epochs(history: list[dict], n: int) -> set[int]:
    """The epochs (1-based) of the n best records by validation accuracy, else training accuracy; ties go to
    the earlier epoch. Taken from the checkpointed history, so a resumed run keeps the same files."""
    key = "val_acc" if any("val_acc" in r for r in history) else "train_acc"
    ranked = sorted(history, key=lambda r: (-r.get(key, float("-inf")), r["epoch"]))
    return {r["epoch"] for r in ranked[:n]}


def prune_best(folder: Path, kept: set[int]) -> None:
    """Delete the best-eNNN.pt files of epochs that left the top N."""
    for path in folder.glob("best-e*.pt"):
        epoch = path.stem.removeprefix("best-e")
        if epoch.isdigit() and int(epoch) not in kept:
            path.unlink(missing_ok=True)


def new_run_dir(config: TrainConfig) -> Path:
    name = run_name(config)
    if config.runs > 1:
        name += f"-seed{config.seed}"
    return claim_run_dir(Path(config.out) / name)


def finished_message(run_dir: Path, config: TrainConfig) -> str | None:
    """One line saying that a run folder is finished (it trained its epochs, or stopped early, and finish()
    wrote its evaluation and report, summary.md last), or None when `--resume` has work left."""
    run_dir = Path(run_dir)
    last, eval_path = run_dir / "checkpoints" / "last.pt", run_dir / "eval.json"
    if not (last.exists() and eval_path.exists() and (run_dir / "summary.md").exists()):
        return None
    ckpt = load_checkpoint(last)
    early = EarlyStopping(config.early_stopping)
    early.load_state_dict(ckpt.get("train_state", {}).get("early_stopping", {}))
    done = ckpt["epoch"] + 1
    if done < config.epochs and not early.should_stop:
        return None  # a longer resume (--epochs) of a run without a planned schedule
    try:
        accuracy = f", test accuracy {100 * json.loads(eval_path.read_text(encoding='utf-8'))['accuracy']:.2f}%"
    except (ValueError, KeyError, TypeError):
        accuracy = ""
    stopped = " (stopped early)" if done < config.epochs else ""
    return (f"{run_dir} is finished: {done}/{config.epochs} epochs{stopped}{accuracy}; nothing to resume. "
            f"See {run_dir / 'report.html'}, evaluate it again with `cudacnn evaluate {run_dir}`, or start a new run")


def resume_config(run_dir: Path, overrides: dict | None = None) -> TrainConfig:
    """The saved config of a run folder (device-like settings may be overridden)."""
    config_file = Path(run_dir) / "config.yaml"
    if not config_file.exists():
        raise CheckpointError(f"{run_dir} is not a run folder (no config.yaml); pass the folder that "
                              "`cudacnn train` created")
    saved = from_dict(load_config_file(config_file), origin=str(config_file))
    config = from_dict(overrides or {}, saved).validate()
    if config.epochs != saved.epochs and saved.schedule != "none":  # its saved scheduler state fits no other length
        raise ConfigError(f"--epochs {config.epochs}: the run's {saved.schedule} learning-rate schedule is planned "
                          f"for {saved.epochs} epochs; resume without --epochs, or start a new run")
    return config
