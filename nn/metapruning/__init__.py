"""MetaPruning (Liu et al., ICCV 2019) and Rewarded meta-pruning as methods of ``run=pruning_final``.

* :mod:`nn.metapruning.families`: genes (coupled widths), layers and forward of each supported zoo family.
* :mod:`nn.metapruning.pruningnet`: the weight-generating PruningNet, BN recalibration, exact MACs.
* :mod:`nn.metapruning.search`: evolutionary search in a MAC window, accuracy and reward fitness.
* :mod:`main.metapruning`: the ``metapruning`` final-pruning pipeline (train, search, retrain).
"""
