"""fast94: airbench94_muon's recipe on our pipeline: 94% on official CIFAR-10 in airbench's setting.

The net (models/fast.py): a frozen 2x2 patch-whitening conv, three conv groups 64/256/256 (conv, max-pool,
BatchNorm, GELU, conv, BatchNorm, GELU), a global max pool and a linear head; fp16 weights.
Training: Muon on the conv filters, SGD-Nesterov on the biases and the head, a linear lr decay to zero,
label smoothing, alternating flips and 2-pixel crops; TTA over mirrors and 1-pixel shifts at the end.
"""

from cudacnn.train.fast.config import RecordConfig

CONFIG = RecordConfig(
    model="fast94",
    epochs=8.0,
    batch_size=2000,
    # ---- optimizers: the summed loss sets the gradient scale, hence the small bias lr
    muon_lr=0.24,
    muon_momentum=0.6,
    ns_steps=5,
    bias_lr=0.053,
    head_lr=0.67,
    sgd_momentum=0.85,
    wd_per_example=2e-6,
    label_smoothing=0.2,
    activation="gelu",
    # ---- whitening: filters from 5000 images' patches; its bias learns for the first 3 epochs only
    whiten_bias_epochs=3.0,
    whiten_images=5000,
    # ---- augmentation and evaluation
    crop_pad=2,
    cutout=0,
    brightness=0.0,
    contrast=0.0,
    tta_level=2,
    tta_fraction=1.0,
    lookahead_every=0,
    keep_fraction=1.0,
    # ---- speed: 200 steps are short enough for kernel launches to matter, so CUDA graphs
    compile_mode="reduce-overhead",
)
