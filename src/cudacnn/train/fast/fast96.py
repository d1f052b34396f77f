"""fast96: airbench96's net, trained on the hardest examples: 93.3%+ on the shared JPEG set.

The net (models/fast.py): the fast94 design at widths 128/512/512 with a third conv per group and a
residual connection added before the group's last GELU (airbench96's later record version).
Training is fast94's (train/fast/fast94.py: optimizers, whitening, evaluation, CUDA graphs) but for the
settings below.
"""

import dataclasses

from cudacnn.train.fast import fast94

CONFIG = dataclasses.replace(
    fast94.CONFIG,
    model="fast96",
    epochs=32.0,
    muon_lr=0.2,        # the deeper, wider net takes a lower Muon lr
    # ---- stronger augmentation and weight averaging for the longer run
    crop_pad=4,
    cutout=12,
    lookahead_every=5,
    # ---- the hardest 3/4 of each batch, ranked by each example's loss when it last trained (no proxy net to
    # run): 0.12-0.16 points above whole batches in the same time
    keep_fraction=0.75,
)
