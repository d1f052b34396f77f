"""Building blocks of the record recipes: whitening init, Muon's orthogonalisation, Lookahead,
the alternating flip schedule, the fast nets' shapes and init."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cudacnn.data import Augment, GpuLoader, Split
from cudacnn.models import create_model
from cudacnn.train.fast.lookahead import Lookahead
from cudacnn.train.fast.muon import Muon, muon_step, newton_schulz, newton_schulz_stacked
from cudacnn.train.fast.whitening import patches, whitening_filters


def correlated_images(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 3, 8, 8, generator=g)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.5, 0.5, 0.7]])  # correlated channels
    x = torch.einsum("ij,njhw->nihw", mix, base)
    return x + 0.7 * torch.roll(x, 1, dims=3) + 3.0  # neighbouring pixels correlated, nonzero mean


def test_whitening_filters_whiten_patches():
    x = correlated_images()
    w = whitening_filters(x, kernel=2, eps=0.0)
    out = torch.nn.functional.conv2d(x, w)  # (N, 12, 7, 7)
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = torch.cov(flat.T)
    torch.testing.assert_close(cov, torch.eye(12, dtype=torch.float64), atol=2e-3, rtol=0)
    # the raw patches were far from white, so the test would catch a no-op
    raw = torch.cov(patches(x, 2).double().T)
    assert (raw - torch.diag(raw.diag())).abs().max() > 0.5


def test_whitening_orders_directions_by_variance():
    x = correlated_images()
    w = whitening_filters(x, kernel=2, eps=0.0).reshape(12, -1).double()
    inv_norms = 1 / w.norm(dim=1)  # ~ sqrt(eigenvalue)
    assert torch.all(inv_norms[:-1] >= inv_norms[1:] - 1e-9)


@pytest.mark.parametrize("shape", [(64, 216), (256, 576), (40, 10)])
def test_newton_schulz_sets_singular_values_near_one(shape):
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    g = g * torch.logspace(-1, 1, shape[1])  # unequal singular values (condition number ~100)
    x = newton_schulz(g)
    assert x.shape == g.shape
    s = torch.linalg.svdvals(x.float())
    assert s.min() > 0.5 and s.max() < 1.3
    # same singular vectors: X is U V^T of G up to the singular-value squashing
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    assert torch.nn.functional.cosine_similarity((u @ vh).flatten(), x.flatten(), dim=0) > 0.9


def test_stacked_newton_schulz_is_each_matrix_own():
    """Padding every matrix to the largest (tall ones turned wide) must not change any matrix's result."""
    g = torch.Generator().manual_seed(3)
    mats = [torch.randn(8, 36, generator=g), torch.randn(16, 72, generator=g) * 10, torch.randn(30, 6, generator=g),
            torch.randn(16, 144, generator=g) * torch.logspace(-1, 1, 144)]
    stacked = newton_schulz_stacked(mats, steps=3)
    for m, out in zip(mats, stacked):
        assert out.shape == m.shape
        torch.testing.assert_close(out, newton_schulz(m, steps=3), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(stacked[0], newton_schulz(mats[0], steps=5), atol=1e-3)  # the step count is used


def test_muon_step_renormalizes_and_moves_against_gradient():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 4, 3, 3) * 5)
    opt = Muon([p], lr=0.1, momentum=0.0, nesterov=False)
    p.grad = torch.randn_like(p)
    before = p.detach().clone()
    opt.step()
    normed = before * (8 ** 0.5 / before.norm())
    update = (normed - p.detach()).reshape(8, -1) / 0.1
    assert torch.dot(update.flatten(), p.grad.flatten()) > 0  # a descent direction
    torch.testing.assert_close(update, newton_schulz(p.grad.reshape(8, -1)), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_compiled_muon_matches_eager_over_steps():
    """The compiled update of all filter banks is the same optimizer: momentum, Nesterov, renormalization, lr
    schedule."""
    torch.manual_seed(0)
    start = [torch.randn(8, 4, 3, 3) * 3, torch.randn(6, 8, 3, 3)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    finals = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        opt = Muon(params, lr=0.2, momentum=0.6, nesterov=True, compiled=compiled)
        for step, step_grads in enumerate(grads):
            opt.param_groups[0]["lr"] = 0.2 * (1 - step / 3)  # a changing lr must not change the graph
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals.append([p.detach() for p in params])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one for all banks, over 3 lrs
    for eager, compiled, first in zip(*finals, start):
        assert (eager - first).abs().max() > 0.05  # it moved
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


def test_lookahead_update_rule():
    fast = [torch.tensor([1.0, 2.0]), torch.tensor([10.0])]
    la = Lookahead(fast)
    fast[0] += torch.tensor([4.0, 4.0])
    fast[1] -= 10.0
    la.update(decay=0.75)  # slow <- 0.75 slow + 0.25 fast; fast <- slow
    torch.testing.assert_close(la.slow[0], torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(la.slow[1], torch.tensor([7.5]))
    torch.testing.assert_close(fast[0], la.slow[0])
    fast[1] += 2.0
    la.update(decay=1.0)  # back to the slow weights
    torch.testing.assert_close(fast[1], torch.tensor([7.5]))
    fast[1] += 2.0
    la.update(decay=0.0)  # no-op on the fast weights
    torch.testing.assert_close(fast[1], torch.tensor([9.5]))


def test_lookahead_tracks_model_floats_in_place():
    net = create_model("fast94")
    la = Lookahead.of_model(net)
    assert len(la.fast) == sum(1 for t in net.state_dict().values() if t.is_floating_point())
    with torch.no_grad():
        net.head.weight.add_(1.0)
    la.update(decay=1.0)
    assert torch.equal(net.head.weight, la.slow[[t.data_ptr() for t in la.fast].index(net.head.weight.data_ptr())])


def test_color_jitter_shifts_then_scales_each_image_within_its_ranges():
    from cudacnn.data.augment import color_jitter

    x = torch.randn(200, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = color_jitter(x, 0.2, 0.1, torch.Generator().manual_seed(1))
    # out = (x + shift) * scale per image: recover scale and shift by least squares
    xf, of = x.flatten(1), out.flatten(1)
    xc, oc = xf - xf.mean(1, keepdim=True), of - of.mean(1, keepdim=True)
    scale = (xc * oc).sum(1) / (xc * xc).sum(1)
    shift = of.mean(1) / scale - xf.mean(1)
    torch.testing.assert_close(of, (xf + shift[:, None]) * scale[:, None], atol=1e-5, rtol=1e-5)
    assert scale.min() >= 0.9 - 1e-5 and scale.max() <= 1.1 + 1e-5 and scale.std() > 0.03
    assert shift.abs().max() <= 0.2 + 1e-5 and shift.std() > 0.05
    assert torch.equal(color_jitter(x, 0.0, 0.0, torch.Generator()), x)


def test_alternating_flip_schedule():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 4, 4, 3)).astype(np.uint8)
    loader = GpuLoader(Split(images, np.arange(64) % 10), 64, augment=Augment(flip="alternate"))
    src = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    flipped = []
    for epoch in range(4):
        loader.set_epoch(epoch)
        out, _ = loader.prepare_epoch()
        plain = loader.normalize(src.to(torch.uint8)).float()
        mirrored = plain.flip(-1)
        is_flip = torch.tensor([torch.equal(o, m) and not torch.equal(o, p)
                               for o, p, m in zip(out.float(), plain, mirrored)])
        flipped.append(is_flip)
    assert 20 < flipped[0].sum() < 44  # a random half first ...
    assert torch.equal(flipped[1], ~flipped[0])  # ... then the other half
    assert torch.equal(flipped[2], flipped[0]) and torch.equal(flipped[3], flipped[1])


@pytest.mark.parametrize("name,width", [("fast94", 256), ("fast96", 512)])
def test_fast_nets_shapes_and_identity_init(name, width):
    net = create_model(name, num_classes=7)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net.head.in_features == width
    conv = net.groups[1].convs[1]
    w = conv.weight
    assert torch.all(w[:, :, 1, 1].diagonal() == 1) and w[0, :, 1, 1].sum() == 1  # dirac init
    frozen = [n for n, p in net.named_parameters() if not p.requires_grad]
    assert "whiten.weight" in frozen and all("norms" in n or n == "whiten.weight" for n in frozen)
    first = net.head.weight.clone()
    net.reset()
    for head in (first, net.head.weight):  # unit std from the start and after every reset, freshly drawn
        assert head.std().item() == pytest.approx(1.0, abs=1e-5)
    assert not torch.equal(first, net.head.weight)
    net.reset("torch")  # nn.Linear's own: uniform within 1/sqrt(fan_in)
    assert net.head.weight.abs().max() <= width**-0.5 and net.head.weight.std() < 0.05


def test_fast96_is_the_measured_recipe():
    """The shape and length measured in benchmarks/fast.md."""
    from cudacnn.train.fast.recipe import resolve_config

    assert create_model("fast96").arch == {"widths": [128, 512, 512], "activation": "gelu"}
    cfg = resolve_config("fast96", {})
    assert (cfg.epochs, cfg.muon_lr, cfg.crop_pad, cfg.cutout, cfg.lookahead_every, cfg.keep_fraction,
            cfg.compile_mode) == (28.0, 0.2, 4, 12, 5, 0.75, "reduce-overhead")
    assert (cfg.head_init, cfg.pool_kernel, cfg.muon_step) == ("unit_std", "triton", "graphed")
    assert resolve_config("fast96", {"epochs": 24}).epochs == 24.0  # --set replaces one field


def test_residual_is_added_before_the_last_gelu():
    torch.manual_seed(0)
    group = create_model("fast96").groups[0].eval()
    for norm in group.norms:  # nonzero biases and statistics: where the residual goes then matters
        norm.bias.data.normal_()
        norm.running_mean.normal_()
    x = torch.randn(2, 24, 16, 16)
    with torch.no_grad():
        first = F.gelu(group.norms[0](F.max_pool2d(group.convs[0](x), 2)))
        last = group.norms[2](group.convs[2](F.gelu(group.norms[1](group.convs[1](first)))))
        torch.testing.assert_close(group(x), F.gelu(last + first))
        assert not torch.allclose(group(x), F.gelu(last) + first)


def test_global_pool_is_adaptive_max_pool_forward_and_backward():
    from cudacnn.models.fast import global_max_pool

    x = torch.randn(4, 8, 3, 3, dtype=torch.float64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    g = torch.randn(4, 8, dtype=torch.float64)
    (global_max_pool(x) * g).sum().backward()
    (F.adaptive_max_pool2d(y, 1).flatten(1) * g).sum().backward()
    torch.testing.assert_close(global_max_pool(x), F.adaptive_max_pool2d(y, 1).flatten(1))
    torch.testing.assert_close(x.grad, y.grad)
    assert (x.grad != 0).sum() == 4 * 8  # the whole gradient goes to each map's max


def test_detached_whitening_bias_leaves_every_other_gradient_unchanged():
    torch.manual_seed(0)
    net = create_model("fast94", widths=(8, 16, 16)).double()
    images, labels = torch.randn(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    grads = []
    for bias_grad in (True, False):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(images, whiten_bias_grad=bias_grad), labels).backward()
        grads.append({n: p.grad for n, p in net.named_parameters() if p.requires_grad})
    learning, frozen = grads
    assert learning["whiten.bias"].abs().sum() > 0 and frozen["whiten.bias"] is None
    assert learning.keys() == frozen.keys()
    for name in learning.keys() - {"whiten.bias"}:
        torch.testing.assert_close(frozen[name], learning[name], msg=name)


def test_last_loss_filter_ranks_by_each_examples_last_recorded_loss():
    from cudacnn.train.fast.filtering import LastLossFilter

    rank = LastLossFilter(num_examples=10, keep=3, device="cpu")
    batch = torch.tensor([7, 2, 5, 0, 9])
    first = batch[rank.select(batch)]
    assert len(set(first.tolist())) == 3  # nothing recorded yet: any 3
    rank.record(first, torch.tensor([0.5, 2.0, 1.0], dtype=torch.float16))
    # the two never-trained examples rank above every recorded loss, then the highest recorded one
    unseen = set(batch.tolist()) - set(first.tolist())
    assert set(batch[rank.select(batch)].tolist()) == unseen | {int(first[1])}
    rank.record(batch, torch.tensor([0.1, 0.9, 0.3, 0.8, 0.2]))
    assert set(batch[rank.select(batch)].tolist()) == {2, 0, 5}
    assert rank.last_loss.dtype == torch.float32 and torch.isinf(rank.last_loss[[1, 3, 4, 6, 8]]).all()


def test_muon_step_with_a_tensor_lr_is_the_optimizer_step():
    """The graphed step's function: the same update as Muon.step, its lr read from a tensor."""
    torch.manual_seed(0)
    start = [torch.randn(8, 4, 3, 3) * 3, torch.randn(6, 8, 3, 3)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(3)]
    eager = [torch.nn.Parameter(w.clone()) for w in start]
    opt = Muon(eager, lr=0.2, momentum=0.6, nesterov=True, ns_steps=3)
    params = [w.clone() for w in start]
    bufs = [torch.zeros_like(w) for w in start]
    for step, step_grads in enumerate(grads):
        lr = 0.2 * (1 - step / 3)
        opt.param_groups[0]["lr"] = lr
        for p, g in zip(eager, step_grads):
            p.grad = g.clone()
        opt.step()
        muon_step(params, step_grads, bufs, torch.tensor(lr), 0.6, True, 3)
    for ours, ref, first in zip(params, eager, start):
        assert (ours - first).abs().max() > 0.05
        torch.testing.assert_close(ours, ref.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_muon_matches_compiled_over_runs():
    """The captured step gives the compiled step's result, and a second optimizer on the same parameters reuses
    the graph with zeroed momentum."""
    torch.manual_seed(0)
    start = [torch.randn(64, 24, 3, 3, device="cuda").half(), torch.randn(256, 64, 3, 3, device="cuda").half()]
    grads = [[torch.randn_like(w) for w in start] for _ in range(4)]
    finals = {}
    for graphed in (False, True, True):
        params = finals.setdefault(("params", graphed), [torch.nn.Parameter(w.clone()) for w in start])
        with torch.no_grad():
            for p, w in zip(params, start):
                p.copy_(w)
        opt = Muon(params, lr=0.2, momentum=0.6, nesterov=True, ns_steps=3, compiled=not graphed, graphed=graphed)
        for step, step_grads in enumerate(grads):
            opt.param_groups[0]["lr"] = 0.2 * (1 - step / 4)
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        finals[graphed] = [p.detach().clone() for p in params]
    for ref, ours, first in zip(finals[False], finals[True], start):
        assert (ref.float() - first.float()).abs().max() > 0.05
        torch.testing.assert_close(ours.float(), ref.float(), atol=2e-3, rtol=2e-3)
