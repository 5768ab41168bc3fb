"""dka — Dynamic-K activation (Sun, Ravi, Singh, ICCV 2019), a reference replication.

The layer lives in `dka.layers`, the ResNet family in `dka.models`; data, training, dissection and
explanations each have a module of their own (see README.md).
"""

__version__ = "0.1.0"
