"""Presets: each classic recipe as published, plus our better recipes for the same models.
`cudacnn train --preset NAME`; every value can be overridden by --config or a flag."""

from __future__ import annotations

from cudacnn.train.fast import fast94, fast96

PRESETS: dict[str, dict] = {
    # ---- the classic recipes, reproduced
    "keras-cnn": {
        "about": "Keras tutorial CNN: Adam 1e-3, batch 32, 15 epochs, no augmentation, fp32",
        "config": dict(model="simple", optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=32, epochs=15,
                       schedule="none", amp="none", val_fraction=0.0),
    },
    "bn-dropout": {
        "about": "BatchNorm + Dropout CNN: Adam 1e-3, batch 128, 20 epochs, flips and shifts",
        "config": dict(model="bn_dropout", optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=128,
                       epochs=20, schedule="none", amp="none", val_fraction=0.0, flip="random", crop_pad=2),
    },
    "smallnet-onecycle": {
        "about": "Conv-BN-ReLU net: AdamW + OneCycle, label smoothing 0.1, bf16 AMP, crop/flip, "
                 "early stopping, up to 100 epochs, flip/translate TTA at test time",
        "config": dict(model="smallnet", optimizer="adamw", lr=3e-3, weight_decay=5e-2, batch_size=128,
                       epochs=100, schedule="onecycle", label_smoothing=0.1, amp="bf16", crop_pad=4,
                       flip="random", early_stopping=30, val_fraction=0.1, tta=True),
    },
    "resnet18-transfer": {
        "about": "ResNet-18 (ImageNet stem, images upsampled to 128x128): Adam 1e-3, batch 128, 10 epochs; "
                 "--pretrained imagenet downloads torchvision's ImageNet weights (or --pretrained FILE)",
        "config": dict(model="resnet18", model_kwargs={"stem": "imagenet", "input_size": 128}, optimizer="adam", lr=1e-3,
                       weight_decay=0.0, batch_size=128, epochs=10, schedule="none", amp="bf16",
                       flip="random", crop_pad=4, val_fraction=0.0),
    },
    # ---- our recipes for the same models
    "keras-cnn-plus": {
        "about": "the Keras CNN with our pipeline: batch 256, OneCycle AdamW, label smoothing, flips, bf16",
        "config": dict(model="simple", optimizer="adamw", lr=4e-3, weight_decay=5e-2, batch_size=256, epochs=15,
                       schedule="onecycle", label_smoothing=0.1, amp="bf16", flip="random", crop_pad=2,
                       val_fraction=0.0),
    },
    "bn-dropout-plus": {
        "about": "the BN+Dropout CNN with SGD-Nesterov OneCycle, label smoothing, crop/flip/cutout, bf16",
        "config": dict(model="bn_dropout", optimizer="sgd", lr=0.1, weight_decay=5e-4, batch_size=256, epochs=20,
                       schedule="onecycle", label_smoothing=0.1, amp="bf16", flip="random", crop_pad=4,
                       val_fraction=0.0),
    },
    "smallnet-plus": {
        "about": "SmallNet with SGD-Nesterov OneCycle, label smoothing, crop/flip/cutout, 40 epochs, TTA",
        "config": dict(model="smallnet", optimizer="sgd", lr=0.2, weight_decay=5e-4, batch_size=256, epochs=40,
                       schedule="onecycle", label_smoothing=0.1, amp="bf16", crop_pad=4, flip="random",
                       cutout=8, val_fraction=0.0, tta=True),
    },
    "resnet18-cifar": {
        "about": "ResNet-18 with the CIFAR stem: SGD-Nesterov OneCycle, label smoothing, crop/flip/cutout, 30 epochs",
        "config": dict(model="resnet18", model_kwargs={"stem": "cifar"}, optimizer="sgd", lr=0.2,
                       weight_decay=5e-4, batch_size=512, epochs=30, schedule="onecycle", label_smoothing=0.1,
                       amp="bf16", crop_pad=4, flip="random", cutout=8, val_fraction=0.0, tta=True),
    },
    "resnet18-cifar-4k": {
        "about": "resnet18-cifar at a global batch of 4096 for several GPUs: peak lr 1.2, 40 epochs (the same "
                 "480 steps as 10 epochs at 1024), CUDA graphs; 3.5x one GPU's throughput on 4 H200",
        "config": dict(model="resnet18", model_kwargs={"stem": "cifar"}, optimizer="sgd", lr=1.2,
                       weight_decay=5e-4, batch_size=4096, epochs=40, schedule="onecycle", label_smoothing=0.1,
                       amp="bf16", crop_pad=4, flip="random", cutout=8, val_fraction=0.0, tta=True,
                       compile=True, compile_mode="reduce-overhead"),
    },
    # ---- record-speed recipes: each sets its whole recipe in its own file, changed with --set KEY=VALUE
    "fast94": {"about": "record-speed recipe aiming at airbench94's accuracy in less time (train/fast/fast94.py)",
               "config": dict(model="fast94", val_fraction=0.0, compile=True), "record": fast94.CONFIG},
    "fast96": {"about": "record-speed recipe aiming at airbench96's accuracy in less time: its 128/512/512 net, "
                        "trained on the hardest 3/4 of each batch (train/fast/fast96.py)",
               "config": dict(model="fast96", val_fraction=0.0, compile=True), "record": fast96.CONFIG},
}

RECORD_PRESETS = tuple(name for name, preset in PRESETS.items() if "record" in preset)
DEFAULT_PRESET = "smallnet-plus"
