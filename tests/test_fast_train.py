"""train_fast end to end on a few images on the CPU (a smoke run: the public API, not accuracy)."""

import numpy as np
import pytest
import torch

from cudacnn.data import Dataset, GpuLoader, Split
from cudacnn.errors import ConfigError
from cudacnn.models.fast import FastNet
from cudacnn.train.fast import recipe, train_fast
from cudacnn.train.fast.bench import parse_overrides


def tiny_dataset(n_train=64, n_test=32):
    rng = np.random.default_rng(0)

    def split(n):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
        return Split(images, labels)

    return Dataset("tiny", [str(i) for i in range(10)], split(n_train), split(n_test))


@pytest.mark.slow
def test_train_fast_smoke_run_on_cpu():
    lines = []
    result = train_fast("fast94", tiny_dataset(), seed=3, device="cpu", compile=False, log=lines.append,
                        batch_size=32, epochs=2, max_steps=3, whiten_images=64)
    assert not result.model.training
    assert result.eval_time_s > 0 and 0.0 <= result.test_acc <= 1.0
    # the reported plain accuracy is the returned model's on the test split, normalized as it was trained
    images, labels = GpuLoader(tiny_dataset().test, 32, "cpu", mean=result.mean, std=result.std).prepare_epoch()
    with torch.no_grad():
        plain = (result.model(images).argmax(1) == labels).float().mean().item()
    assert plain == pytest.approx(result.test_acc_plain)
    assert [h["step"] for h in result.history] == [2, 3]  # max_steps stops inside epoch 2
    assert all(np.isfinite(h["train_loss"]) for h in result.history)
    assert result.config["seed"] == 3 and result.config["max_steps"] == 3
    assert lines and "fast94 seed 3" in lines[0]
    w = result.model.whiten.weight.float()
    assert torch.equal(w[:12], -w[12:]) and w.abs().sum() > 0  # whitening init ran


def test_unknown_preset_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="unknown fast preset"):
        train_fast("fast99", tiny_dataset(), device="cpu")
    with pytest.raises(ConfigError, match="unknown option"):
        train_fast("fast94", tiny_dataset(), device="cpu", learning_rate=1.0)


def test_widths_override_builds_that_net_and_bad_widths_are_config_errors():
    result = train_fast("fast94", tiny_dataset(), device="cpu", compile=False, log=lambda *_: None,
                        batch_size=32, epochs=1, max_steps=1, whiten_images=64, widths="16/24/40")
    convs = [group.convs[0].out_channels for group in result.model.groups]
    assert convs == [16, 24, 40] and result.model.head.in_features == 40
    for bad in ("16/24", "a/b/c", "16/0/8"):
        with pytest.raises(ConfigError, match="widths must be three positive integers"):
            train_fast("fast94", tiny_dataset(), device="cpu", widths=bad)


def test_residual_and_lr_warmup_options(monkeypatch):
    scales, set_lr_scale = [], recipe.set_lr_scale  # what the optimizers get: (main groups, whitening bias) a step

    def recording(groups, scale):
        scales.append(scale)
        set_lr_scale(groups, scale)

    monkeypatch.setattr(recipe, "set_lr_scale", recording)
    result = train_fast("fast96", tiny_dataset(), device="cpu", compile=False, log=lambda *_: None,
                        batch_size=32, epochs=2, whiten_images=64, widths="8/8/16", residual="after_gelu",
                        warmup_fraction=0.5)
    assert all(group.residual == "after_gelu" for group in result.model.groups)  # not fast96's default
    assert scales[0::2] == pytest.approx([0.2, 0.6, 1.0, 0.5])  # 4 steps: the 2-step ramp, then the decay
    assert [h["lr_scale"] for h in result.history] == [1.0, 0.0]  # the ramp's peak after epoch 1 of 2, then 0
    # the cached nets are told apart by their residual placement too
    nets = [recipe.prepared_model("fast96", "cpu", 10, False, widths="8/8/16", residual=r)[0]
            for r in ("", "after_gelu")]
    assert [net.groups[0].residual for net in nets] == ["before_gelu", "after_gelu"]
    assert [recipe.lr_scale(s, 10, 4) for s in (0, 2, 4, 7, 10)] == pytest.approx([0.2, 0.6, 1.0, 0.5, 0.0])
    assert [recipe.lr_scale(s, 10) for s in (0, 5)] == [1.0, 0.5]  # no warm-up: the plain linear decay
    one_step = train_fast("fast96", tiny_dataset(), device="cpu", compile=False, log=lambda *_: None,
                          batch_size=32, epochs=1, max_steps=1, whiten_images=64, widths="8/8/16", warmup_fraction=0.9)
    assert one_step.history[-1]["lr_scale"] == 0.0  # a warm-up longer than the run is cut to leave a decay
    for bad, message in ((dict(residual="sideways"), "residual must be one of"),
                         (dict(warmup_fraction=1.0), r"warmup_fraction must be in \[0, 1\)")):
        with pytest.raises(ConfigError, match=message):
            train_fast("fast96", tiny_dataset(), device="cpu", **bad)


def test_warmup_runs_once_per_graph_shaping_setting(monkeypatch):

    monkeypatch.setattr(recipe, "_WARMED", set())
    calls = []
    monkeypatch.setattr(recipe, "train_fast", lambda name, data, **kw: calls.append(kw.get("batch_size")))
    data = tiny_dataset()
    recipe.warmup("fast94", data, "cpu")
    recipe.warmup("fast94", data, "cpu", epochs=3.0, cutout=4)  # no graph field changed: nothing to compile
    recipe.warmup("fast94", data, "cpu", batch_size=2000)  # the preset's own value: the same key
    recipe.warmup("fast94", data, "cpu", batch_size=500)
    recipe.warmup("fast94", data, "cpu", muon_momentum=0.7)  # a constant in Muon's compiled update
    recipe.warmup("fast94", data, "cpu", compile=False)
    recipe.warmup("fast96", data, "cpu")
    recipe.warmup("fast96", data, "cpu", residual="after_gelu")  # another net
    recipe.warmup("fast96", data, "cpu", rank_by="proxy")  # the proxy's graphs
    assert calls == [None, 500, None, None, None, None, None]


def test_bench_overrides_are_typed():
    assert parse_overrides(["epochs=7", "cutout=12", "max_steps=None", "widths=128/384/640"]) == dict(
        epochs=7.0, cutout=12, max_steps=None, widths="128/384/640")


@pytest.mark.slow
def test_compiled_fp16_net_has_finite_gradients():
    """The fast nets train in fp16 under torch.compile. With the global pool written as amax, Inductor's
    backward missed every max and returned NaN gradients (session 7: fast94 stayed at 10 % on the GPU)."""
    torch.manual_seed(0)
    net = FastNet(widths=(8, 16, 16)).to(memory_format=torch.channels_last).to_training_dtype(torch.float16)
    images = torch.randn(16, 3, 32, 32).half().contiguous(memory_format=torch.channels_last)
    logits = torch.compile(net, dynamic=False)(images)
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 10, (16,)), reduction="sum").backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert net.head.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_fast_compiled_on_gpu():
    result = train_fast("fast94", tiny_dataset(4000, 2000), device="cuda", compile=True, log=lambda *_: None,
                        epochs=1, whiten_images=2000)
    assert result.train_time_s > 0 and len(result.history) == 1
    assert np.isfinite(result.history[0]["train_loss"])
    assert next(result.model.parameters()).dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("overrides", [{}, {"keep_fraction": 0.5}, {"keep_fraction": 0.5, "rank_by": "last_loss"}],
                         ids=["plain", "filtered", "last_loss"])
def test_timed_path_never_waits_on_the_host(monkeypatch, overrides):
    """Between the whitening init and the timer's last stop (training and the TTA evaluation), any implicit
    device->host sync raises."""

    data = tiny_dataset(4000, 2000)
    recipe.warmup("fast94", data, "cuda", **overrides)  # compiling may sync; do it outside the strict region
    # one plain run too: CUDA-graph trees may record a graph for a path the warm-up did not take (recording
    # syncs); the strict run below checks the steady state every later timed run is in
    train_fast("fast94", data, device="cuda", log=lambda *_: None, epochs=2, whiten_images=2000, **overrides)
    init_whiten, stop = FastNet.init_whiten, recipe.DeviceTimer.stop

    def init_then_strict(self, *args, **kwargs):
        init_whiten(self, *args, **kwargs)  # its 12x12 eigh is the one allowed wait
        torch.cuda.set_sync_debug_mode("error")

    def relax_then_stop(self):
        if len(self.spans) == 2:  # the second span is the TTA evaluation: strict through it too
            torch.cuda.set_sync_debug_mode(0)
        stop(self)

    monkeypatch.setattr(FastNet, "init_whiten", init_then_strict)
    monkeypatch.setattr(recipe.DeviceTimer, "stop", relax_then_stop)
    try:
        result = train_fast("fast94", data, device="cuda", log=lambda *_: None, epochs=2, whiten_images=2000,
                            **overrides)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert result.history[-1]["step"] == 4


def test_filtered_run_trains_on_the_kept_part_with_its_own_proxy(monkeypatch):
    """keep_fraction < 1: each step the main net learns from exactly the examples the proxy kept (8 of 32);
    the proxy learns every proxy_learn_every-th step, is its own net even at the main net's widths, and
    shares the main net's whitening filters."""
    from cudacnn.train.fast.filtering import ProxyFilter

    made, kept, learned, main_inputs = [], [], [], []
    make, select = recipe.make_proxy_filter, ProxyFilter.__call__
    monkeypatch.setattr(recipe, "make_proxy_filter", lambda *a, **k: made.append(make(*a, **k)) or made[-1])

    def recording_select(self, images, labels, learn):
        learned.append(learn)
        kept.append(select(self, images, labels, learn))
        return kept[-1]

    monkeypatch.setattr(ProxyFilter, "__call__", recording_select)
    main_forward = FastNet.forward

    def recording_forward(self, x):
        if self is not made[0].model:
            main_inputs.append(x.clone())
        return main_forward(self, x)

    monkeypatch.setattr(FastNet, "forward", recording_forward)
    result = train_fast("fast94", tiny_dataset(), seed=1, device="cpu", compile=False, log=lambda *_: None,
                        batch_size=32, epochs=2, max_steps=3, whiten_images=64, keep_fraction=0.25,
                        widths="8/8/16", proxy_widths="8/8/16")
    assert result.history[-1]["step"] == 3 and np.isfinite(result.history[-1]["train_loss"])
    proxy = made[0].model
    assert proxy.head.in_features == 16 and made[0].keep == 8
    prepared = len(recipe._PREPARED)
    main, _ = recipe.prepared_model("fast94", "cpu", 10, False, recipe.resolve_config("fast94", {}).compile_mode,
                                    "8/8/16")
    assert len(recipe._PREPARED) == prepared  # the run's own main net, looked up, not a new one made here
    main_weights, trained = main.state_dict(), result.model.state_dict()
    assert main_weights.keys() == trained.keys()
    assert all(torch.equal(main_weights[k], trained[k]) for k in trained)  # the net that trained
    assert proxy is not main  # same preset and widths, yet two nets
    assert learned == [True, False, True]  # proxy_learn_every defaults to 2
    assert len(main_inputs) >= 3 and all(torch.equal(x, k[0]) for x, k in zip(main_inputs, kept))
    torch.testing.assert_close(proxy.whiten.weight, result.model.whiten.weight)
    assert recipe.examples_per_step(recipe.resolve_config("fast96", dict(keep_fraction=0.5))) == 1000
    for bad, message in ((dict(keep_fraction=0.0), r"keep_fraction must be in \(0, 1\]"),
                         (dict(rank_by="random"), "rank_by must be one of"),
                         (dict(keep_fraction=1.5), r"keep_fraction must be in \(0, 1\]"),
                         (dict(proxy_learn_every=0), "proxy_learn_every must be a positive integer"),
                         (dict(tta_level=5), "tta_level must be one of")):
        with pytest.raises(ConfigError, match=message):
            train_fast("fast94", tiny_dataset(), device="cpu", batch_size=32, **bad)


def test_last_loss_run_trains_on_the_examples_it_ranks_hardest(monkeypatch):
    """rank_by=last_loss: no proxy; each step the main net learns from the kept half of the batch, unseen
    examples first, and records exactly its own per-example losses on them."""
    from cudacnn.train.fast.filtering import LastLossFilter

    filters, steps, main_outputs = [], [], []

    class Recording(LastLossFilter):
        def __init__(self, *args):
            super().__init__(*args)
            filters.append(self)

        def select(self, indices):
            hard = super().select(indices)
            steps.append(dict(before=self.last_loss.clone(), batch=indices, kept=indices[hard]))
            return hard

        def record(self, indices, losses):
            assert torch.equal(indices, steps[-1]["kept"])
            steps[-1]["losses"] = losses.detach().clone()
            super().record(indices, losses)

    monkeypatch.setattr(recipe, "LastLossFilter", Recording)
    main_forward = FastNet.forward

    def recording_forward(self, x):
        main_outputs.append(main_forward(self, x))
        return main_outputs[-1]

    monkeypatch.setattr(FastNet, "forward", recording_forward)
    assert recipe.make_proxy_filter(recipe.resolve_config("fast94", dict(keep_fraction=0.5, rank_by="last_loss")),
                                    "cpu", 10, False) is None
    data = tiny_dataset()
    train_fast("fast94", data, seed=2, device="cpu", compile=False, log=lambda *_: None, batch_size=32, epochs=2,
               max_steps=4, whiten_images=64, keep_fraction=0.5, rank_by="last_loss", widths="8/8/16")
    assert len(filters) == 1 and len(steps) == 4 and filters[0].last_loss.shape == (64,)
    labels = torch.from_numpy(data.train.labels)
    unseen_counts = []
    for step, outputs in zip(steps, main_outputs):
        assert len(step["kept"]) == 16 and len(set(step["kept"].tolist())) == 16
        expected = torch.nn.functional.cross_entropy(outputs, labels[step["kept"]], label_smoothing=0.2,
                                                     reduction="none")
        torch.testing.assert_close(step["losses"], expected.detach())
        before, kept = step["before"], step["kept"]
        dropped = torch.tensor(sorted(set(step["batch"].tolist()) - set(kept.tolist())))
        assert before[kept].min() >= before[dropped].max()  # the kept half ranked highest
        # never-trained examples (last loss inf) come first: all of them if they fit, else only they
        unseen = int(torch.isinf(before[step["batch"]]).sum())
        unseen_counts.append(unseen)
        if unseen <= 16:
            assert torch.isinf(before[kept]).sum() == unseen
        else:
            assert torch.isinf(before[kept]).all()
        assert torch.isfinite(before[kept]).sum() == 16 - min(16, unseen)
    assert torch.isfinite(steps[2]["before"]).sum() == 32  # epoch 1 trained on 2 x 16 distinct examples
    # epoch 2's two batches hold those 32 unseen examples between them, so one of them holds at most 16:
    # both cases above were checked (steps 0 and 1 hold 32 unseen each)
    assert unseen_counts[:2] == [32, 32] and min(unseen_counts[2:]) <= 16, unseen_counts
