"""Model zoo: parameter counts derived by hand from the architectures, forward shapes, registry errors,
FLOP counting, and loading torchvision-format ResNet-18 weights."""

from __future__ import annotations

import pytest
import torch

from cudacnn.errors import CheckpointError, ConfigError
from cudacnn.models import create_model, list_models, load_pretrained
from cudacnn.models.commands import count_flops, count_parameters


def conv(c_in, c_out, k=3, bias=True):
    return c_in * c_out * k * k + (c_out if bias else 0)


def linear(n_in, n_out):
    return n_in * n_out + n_out


def bn(c):
    return 2 * c  # weight and bias (running stats are buffers)


def test_registry_lists_every_family():
    assert set(list_models()) == {"simple", "bn_dropout", "smallnet", "resnet18", "fast94", "fast96"}


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown model 'vgg'.*simple"):
        create_model("vgg")


def test_unknown_option_is_a_config_error():
    with pytest.raises(ConfigError, match="simple"):
        create_model("simple", stem="cifar")


def test_simple_matches_the_keras_tutorial_count():
    # 32 -> conv 30 -> pool 15 -> conv 13 -> pool 6 -> conv 4: flatten 64*4*4
    expected = conv(3, 32) + conv(32, 64) + conv(64, 64) + linear(64 * 4 * 4, 64) + linear(64, 10)
    assert expected == 122_570
    assert count_parameters(create_model("simple")) == expected


def test_bn_dropout_count():
    # per block: conv 'same', BN, conv 'valid', pool: 32 -> 32 -> 30 -> 15; 15 -> 15 -> 13 -> 6
    block1 = conv(3, 32) + bn(32) + conv(32, 32)
    block2 = conv(32, 64) + bn(64) + conv(64, 64)
    head = linear(64 * 6 * 6, 512) + bn(512) + linear(512, 10)
    expected = block1 + block2 + head
    assert 1.15e6 < expected < 1.3e6  # "about 1.2 M parameters"
    assert count_parameters(create_model("bn_dropout")) == expected


def test_smallnet_count():
    widths, c_in, expected = (64, 128, 256), 3, 0
    for w in widths:
        expected += conv(c_in, w, bias=False) + bn(w) + conv(w, w, bias=False) + bn(w)
        c_in = w
    expected += linear(256, 10)
    assert count_parameters(create_model("smallnet")) == expected


def test_resnet18_imagenet_stem_matches_torchvision_count():
    # torchvision.models.resnet18() has 11,689,512 parameters
    assert count_parameters(create_model("resnet18", num_classes=1000, stem="imagenet")) == 11_689_512
    # the CIFAR stem swaps the 7x7 conv for a 3x3 one: 64*3*(49-9) fewer weights
    cifar = count_parameters(create_model("resnet18", num_classes=1000, stem="cifar"))
    assert cifar == 11_689_512 - 64 * 3 * (49 - 9)


def test_resnet_rejects_unknown_stem():
    with pytest.raises(ConfigError, match="stem"):
        create_model("resnet18", stem="tiny")


@pytest.mark.parametrize("name,kwargs", [("simple", {}), ("bn_dropout", {}), ("smallnet", {}),
                                         ("resnet18", {"stem": "cifar"}), ("resnet18", {"stem": "imagenet"})])
def test_forward_shape(name, kwargs):
    model = create_model(name, num_classes=7, **kwargs)
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    # channels_last inputs (what the loader serves) give the same answer
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), model(x.contiguous(memory_format=torch.channels_last)),
                               rtol=1e-4, atol=1e-4)


def test_flops_of_simple_by_hand():
    macs = (30 * 30 * 32 * 3 * 9 + 13 * 13 * 64 * 32 * 9 + 4 * 4 * 64 * 64 * 9 + 1024 * 64 + 64 * 10)
    assert count_flops(create_model("simple")) == 2 * macs


def test_models_command_prints_the_table(capsys):
    from cudacnn.cli import main

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "122,570" in out and "resnet18 stem=imagenet" in out and "11,181,642" in out


# -- pretrained ResNet-18 weights in torchvision's layout

TORCHVISION_KEYS = {  # a sample of torchvision.models.resnet18().state_dict() keys and shapes
    "conv1.weight": (64, 3, 7, 7), "bn1.running_var": (64,), "bn1.num_batches_tracked": (),
    "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.downsample.0.weight": (128, 64, 1, 1),
    "layer2.0.downsample.1.running_mean": (128,), "layer4.1.bn2.bias": (512,),
    "fc.weight": (1000, 512), "fc.bias": (1000,),
}


@pytest.fixture(scope="module")
def imagenet_state():
    torch.manual_seed(1)
    state = create_model("resnet18", num_classes=1000, stem="imagenet").state_dict()
    for key, shape in TORCHVISION_KEYS.items():
        assert tuple(state[key].shape) == shape, key
    assert len(state) == 122  # torchvision's resnet18 state_dict has 122 entries
    return {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}  # distinct from any init


def test_load_pretrained_keeps_body_and_replaces_head(tmp_path, imagenet_state):
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(imagenet_state, path)
    model = create_model("resnet18", num_classes=10, stem="imagenet")
    fresh_fc = model.fc.weight.detach().clone()
    load_pretrained(model, path)
    loaded = model.state_dict()
    torch.testing.assert_close(loaded["layer3.1.conv2.weight"], imagenet_state["layer3.1.conv2.weight"])
    torch.testing.assert_close(loaded["bn1.running_mean"], imagenet_state["bn1.running_mean"])
    assert loaded["fc.weight"].shape == (10, 512)
    torch.testing.assert_close(loaded["fc.weight"], fresh_fc)


def test_load_pretrained_accepts_wrappers_and_old_files(tmp_path, imagenet_state):
    # DataParallel prefix, a {'state_dict': ...} wrapper, and no num_batches_tracked (old torchvision files)
    state = {f"module.{k}": v for k, v in imagenet_state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 90}, path)
    model = load_pretrained(create_model("resnet18", stem="imagenet"), path)
    torch.testing.assert_close(model.state_dict()["conv1.weight"], imagenet_state["conv1.weight"])


def test_load_pretrained_cifar_stem_says_which_stem_fits(tmp_path, imagenet_state):
    path = tmp_path / "w.pth"
    torch.save(imagenet_state, path)
    with pytest.raises(CheckpointError, match=r"conv1.weight \(64, 3, 7, 7\) vs model \(64, 3, 3, 3\).*stem='imagenet'"):
        load_pretrained(create_model("resnet18", stem="cifar"), path)


def test_load_pretrained_names_missing_and_unexpected_keys(tmp_path, imagenet_state):
    state = {k: v for k, v in imagenet_state.items() if not k.startswith("layer4.")}
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(e.g. layer4\..*unexpected keys \(e.g. extra.weight"):
        load_pretrained(create_model("resnet18", stem="imagenet"), path)


def test_load_pretrained_refuses_non_weight_files(tmp_path):
    with pytest.raises(CheckpointError, match="do not exist"):
        load_pretrained(create_model("resnet18"), tmp_path / "nope.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_pretrained(create_model("resnet18"), junk)


def test_models_table_describes_each_model_and_names_its_presets():
    from cudacnn.models.commands import model_rows
    from cudacnn.train.presets import PRESETS

    rows = {label: (about, presets) for label, about, presets, _, _ in model_rows()}
    assert all(about for about, _ in rows.values())
    listed = [p for _, presets in rows.values() for p in presets.split(", ") if p != "-"]
    assert sorted(listed) == sorted(PRESETS)  # every preset once
    for label, (_, presets) in rows.items():
        for preset in filter(lambda p: p != "-", presets.split(", ")):
            config = PRESETS[preset]["config"]
            assert label.split()[0] == config["model"]
            for option in label.split()[1:]:  # a variant's options are the preset's
                key, value = option.split("=")
                assert str(config.get("model_kwargs", {}).get(key)) == value
    assert rows["resnet18 stem=imagenet"][1] == "resnet18-transfer"


# -- `--pretrained imagenet`: torchvision's published file, downloaded once and checked like the CIFAR archives

def _published_weights(tmp_path, state, prefix=None):
    """The weights served at a file:// URL, named the torchvision way: <name>-<first 8 hex of SHA-256>.pth."""
    import hashlib

    from cudacnn.download import Published

    served = tmp_path / "served.pth"
    torch.save(state, served)
    digest = hashlib.sha256(served.read_bytes()).hexdigest()[:8]
    return served, Published("resnet18-imagenet", served.as_uri(), f"resnet18-{digest}.pth",
                             sha256_prefix=prefix or digest, flag="--pretrained")


@pytest.fixture
def weights_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDACNN_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "weights"


def test_the_imagenet_weights_are_torchvisions_official_file():
    from cudacnn.models.weights import PRETRAINED

    published = PRETRAINED["imagenet"]
    assert published.url == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert published.filename == published.url.rsplit("/", 1)[1]
    assert published.sha256_prefix == "f37072fd" and published.md5 is None


def test_pretrained_imagenet_downloads_once_and_loads(tmp_path, imagenet_state, monkeypatch, weights_home):
    from cudacnn.models import weights

    served, published = _published_weights(tmp_path, imagenet_state)
    monkeypatch.setitem(weights.PRETRAINED, "imagenet", published)
    model = load_pretrained(create_model("resnet18", stem="imagenet"), "imagenet")
    torch.testing.assert_close(model.state_dict()["layer2.0.conv1.weight"], imagenet_state["layer2.0.conv1.weight"])
    assert [p.name for p in weights_home.iterdir()] == [published.filename]  # no partial file left
    served.unlink()  # the second use reads the verified file, with no transfer
    load_pretrained(create_model("resnet18", stem="imagenet"), "imagenet")


def test_pretrained_imagenet_uses_torch_hubs_copy(tmp_path, imagenet_state, monkeypatch, weights_home):
    from cudacnn.models import weights

    served, published = _published_weights(tmp_path, imagenet_state)
    monkeypatch.setitem(weights.PRETRAINED, "imagenet", published)
    hub = tmp_path / "hub" / "checkpoints" / published.filename
    hub.parent.mkdir(parents=True)
    served.rename(hub)  # nothing to download from
    assert weights.resolve_pretrained("imagenet") == hub
    assert not weights_home.exists()


def test_pretrained_download_with_a_wrong_hash_leaves_nothing(tmp_path, imagenet_state, monkeypatch, weights_home):
    from cudacnn.errors import DataError
    from cudacnn.models import weights

    _, published = _published_weights(tmp_path, imagenet_state, prefix="00000000")
    monkeypatch.setitem(weights.PRETRAINED, "imagenet", published)
    with pytest.raises(DataError, match="has SHA-256 .*not the published 00000000.*corrupted"):
        weights.resolve_pretrained("imagenet", quiet=True)
    assert list(weights_home.iterdir()) == []


def test_pretrained_download_without_network_names_the_fix(tmp_path, monkeypatch, weights_home, capsys):
    from cudacnn.cli import main
    from cudacnn.download import Published
    from cudacnn.models import weights

    unreachable = Published("resnet18-imagenet", "http://127.0.0.1:9/resnet18-f37072fd.pth", "resnet18-f37072fd.pth",
                            sha256_prefix="f37072fd", flag="--pretrained")
    monkeypatch.setitem(weights.PRETRAINED, "imagenet", unreachable)
    code = main(["train", "--preset", "resnet18-transfer", "--pretrained", "imagenet", "--data", "sample",
                 "--device", "cpu", "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code == 2 and "could not download http://127.0.0.1:9/resnet18-f37072fd.pth" in err
    assert "pass the file with --pretrained" in err and not (weights_home / "resnet18-f37072fd.pth").exists()


def test_pretrained_files_load_weights_only(tmp_path):
    """A pickle that would run code when unpickled is refused (torch.load(weights_only=True))."""
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": Exploit()}, path)
    with pytest.raises(CheckpointError, match="not a readable weights-only"):
        load_pretrained(create_model("resnet18", stem="imagenet"), path)
    assert not marker.exists()
