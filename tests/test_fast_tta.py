"""TTA averaging: the views and their weights, checked against hand-built references."""

import numpy as np
import pytest
import torch

from cudacnn.evaluate.tta import predict_tta


def pixels(x):  # a "model" whose logits are the image's pixels, so every view shows in the output
    return x.flatten(1)


def reference_views(img, level):
    """(weight, view) pairs built with NumPy, independently of the module under test."""
    views = [(1.0, img)]
    if level >= 1:
        views = [(0.5, img), (0.5, img[..., ::-1])]
    if level >= 2:
        padded = np.pad(img, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
        h, w = img.shape[-2:]
        shifted = [padded[..., :h, :w], padded[..., 2:, 2:]]
        if level == 3:
            shifted += [padded[..., :h, 2:], padded[..., 2:, :w]]
        views = [(wt / 2, v) for wt, v in views]
        for s in shifted:
            views += [(0.25 / len(shifted), s), (0.25 / len(shifted), s[..., ::-1])]
    return views


@pytest.mark.parametrize("level", [0, 1, 2, 3])
def test_tta_matches_weighted_views(level):
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(level))
    want = sum(wt * v.reshape(5, -1) for wt, v in reference_views(x.numpy(), level))
    got = predict_tta(pixels, x, level=level, batch_size=2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-6, atol=1e-6)


def test_level2_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    got = predict_tta(pixels, x, level=2).view(4, 4)
    # pixel (1,1): itself 5 and its mirror x[1,2]=6 (weight 1/4 each); the up-left shift reads x[0,0]=0 and,
    # mirrored, x[0,1]=1; the down-right shift reads x[2,2]=10 and, mirrored, x[2,3]=11 (weight 1/8 each)
    assert got[1, 1].item() == pytest.approx(0.25 * (5 + 6) + 0.125 * (0 + 1 + 10 + 11))
    # pixel (0,0): reflect padding makes both shifts read x[1,1]=5; mirrored, x[1,2]=6
    assert got[0, 0].item() == pytest.approx(0.25 * (0 + 3) + 0.125 * (5 + 6 + 5 + 6))


def test_nonlinear_model_averages_logits_not_inputs():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(7, 3, 6, 6)
    want = 0.5 * (net(x) + net(x.flip(-1)))
    torch.testing.assert_close(predict_tta(net, x, level=1, batch_size=3), want.detach())
    plain = predict_tta(net, x, level=0, batch_size=4)
    torch.testing.assert_close(plain, net(x).detach())


def test_rejects_unknown_level():
    with pytest.raises(ValueError, match="TTA level"):
        predict_tta(pixels, torch.zeros(1, 3, 4, 4), level=4)


def test_fraction_spends_the_views_on_the_least_confident():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x = torch.randn(20, 3, 6, 6)
    with torch.no_grad():
        plain, full = predict_tta(net, x, level=0), predict_tta(net, x, level=2)
        got = predict_tta(net, x, level=2, batch_size=3, fraction=0.25)
    unsure = plain.softmax(1).amax(1).argsort()[:5]  # the 5 least confident by the plain logits
    sure = torch.ones(20, dtype=torch.bool)
    sure[unsure] = False
    torch.testing.assert_close(got[unsure], full[unsure])
    torch.testing.assert_close(got[sure], plain[sure])
    assert not torch.allclose(full[sure], plain[sure])  # the views would have changed the others too
    with pytest.raises(ValueError, match="fraction"):
        predict_tta(net, x, level=2, fraction=0.0)
