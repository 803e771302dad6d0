"""The application: every run mode (``python -m main run=<mode>``) and the stage code they share.

Importing the package registers every mode in ``main.run_modes.RUN_MODES``: each module below registers the
modes it defines when it is imported. ``main_imagenet`` (the ``torchrun`` launcher) and ``generate_dataset``
(the published code's command form for data models) are entry points on top of this package.
"""
from main import (  # noqa: F401  isort: skip  (registration order = the order of ``run=help``)
    pretrain,
    generate,
    import_published,
    meta_train,
    visualize,
    final,
    metapruning,
    analyse,
    quickstart,
    benchmark,
    export,
)
