"""Pruning: criteria (methods), exact fast MAC counting, progressive pruning to a target speed-up.

Importing the package registers the group hooks (:data:`utils.pruning.methods.GROUP_HOOKS`) of its modules.
"""
from utils.pruning import intra_fusion  # noqa: F401  (registers the intra_fusion group hook)
