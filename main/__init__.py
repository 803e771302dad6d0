"""Single-process entry point (CIFAR-scale experiments): ``python -m main run=<mode> ...``."""
