"""Record-speed CIFAR-10 training (airbench-style). Each preset's whole recipe is one RecordConfig in its own
file (fast94.py, fast96.py); recipe.py trains it: `train_fast("fast94", dataset)`."""
