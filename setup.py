"""Install with ``pip install -c constraints.txt -e ".[dev]"`` (see README.md)."""
from setuptools import find_packages, setup

PACKAGES = ["configs", "data_loaders", "generate_dataset", "nn", "utils", "main", "main_imagenet"]

setup(
    name="graph-meta-pruning",
    version="0.1.0",
    description="Graph-metanetwork meta pruning: make trained CNNs and ViTs easy to prune, then prune them",
    python_requires=">=3.10",
    packages=find_packages(include=[p for name in PACKAGES for p in (name, f"{name}.*")]),
    package_data={"configs": ["**/*.yaml"]},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "torch-pruning>=1.5,<1.7",
        "torch-geometric>=2.5",
        "hydra-core>=1.3,<1.4",
        "omegaconf>=2.3,<2.4",
        "h5py>=3.8",
        "numpy",
        "scipy",
        "scikit-learn",
        "matplotlib",
        "tqdm",
        "pot>=0.9",
    ],
    extras_require={
        # torch_scatter has no binary wheel for recent torch; building it takes ~13 min. Optional speed-up.
        "scatter": ["torch-scatter"],
        # ONNX export of pruned networks (run=export, pruning_final export_onnx=true), checked with onnxruntime.
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        # Import/export of the published code's data models (Hugging Face datasets folders).
        "published": ["datasets>=2.14"],
        "dev": ["pytest>=7", "import-linter>=2.1"],  # lint-imports checks the layering (pyproject.toml)
    },
)
