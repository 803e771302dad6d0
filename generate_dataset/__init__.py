"""Data-model generation: ``python -m generate_dataset [data_generator=<task>] [method=...] index=I num=N``."""
