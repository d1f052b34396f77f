"""fast96: airbench96's net, trained on the hardest examples: 93.3%+ on the shared JPEG set.

The net (models/fast.py): the fast94 design at widths 128/512/512 with a third conv per group and a
residual connection added before the group's last GELU (airbench96's later record version).
What differs from fast94's training: 32 epochs; each step learns from the hardest 3/4 of its batch, ranked
by each example's loss when it last trained (no proxy net to run); Lookahead every 5 steps; 4-pixel crops
and 12-pixel cutout; a lower Muon lr.
"""

from cudacnn.train.fast.config import RecordConfig

CONFIG = RecordConfig(
    model="fast96",
    epochs=32.0,
    batch_size=2000,
    # ---- optimizers
    muon_lr=0.2,
    muon_momentum=0.6,
    bias_lr=0.053,
    head_lr=0.67,
    sgd_momentum=0.85,
    wd_per_example=2e-6,
    label_smoothing=0.2,
    # ---- whitening
    whiten_bias_epochs=3.0,
    whiten_images=5000,
    # ---- augmentation, averaging and evaluation
    crop_pad=4,
    cutout=12,
    tta_level=2,
    lookahead_every=5,
    # ---- the hardest 3/4 of each batch: 0.12-0.16 points above whole batches in the same time
    keep_fraction=0.75,
    # ---- speed: the smaller filtered steps leave kernel launches exposed, so CUDA graphs
    compile_mode="reduce-overhead",
)
