"""Datasets: the built-in concept scenes and the real CIFAR-10, Places365 and Broden.

`build_loaders(name, root, ...)` is the one entry point for training; `dka.data.broden.BrodenDataset`
is the one for Network Dissection; `dka.data.scenes.generate` writes the built-in dataset.
"""

from dka.data.loaders import DATASETS, DataBundle, build_loaders

__all__ = ["DATASETS", "DataBundle", "build_loaders"]
