"""Pruning: criteria (methods), exact fast MAC counting, progressive pruning to a target speed-up."""
