"""``python -m main_imagenet run=<stage> ...`` or ``torchrun --nproc_per_node=N -m main_imagenet run=<stage> ...``."""
from main_imagenet.main import main

main()
