"""``torchrun`` launcher of the run modes of ``main`` for ImageNet-scale models (``main.py``).

There is one pipeline: ``torchrun --nproc_per_node=N -m main_imagenet run=X`` runs the same mode as
``python -m main run=X``, with DistributedDataParallel over N ranks and the ImageNet task defaults.
"""
