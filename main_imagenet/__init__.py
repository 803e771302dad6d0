"""ImageNet-scale pipeline under ``torchrun`` with DistributedDataParallel (DESIGN.md section 2, item 7).

Stages (``run=``): ``train``, ``prune``, ``finetune`` (one network: a data model or a target network;
``stages.py``), ``meta_train``, ``visualize`` and ``prune_after_metanetwork`` (``meta.py``). The entry
point is ``main.py``; the shared set-up (process group, run directory, sharded data) is ``context.py``.
"""
