"""dka — Dynamic-K activation (Sun, Ravi, Singh, ICCV 2019), a reference replication.

The main entry points::

    import dka
    dka.list_models()                                  # the registry's name forms
    model = dka.build("res18-d5a", num_classes=10, stem="cifar", width=16)
    head = dka.DynamicKLinear(512, 365, k=5)           # the layer, a drop-in for nn.Linear
    model = dka.load_model("runs/res18-d5a/final.pt")  # a trained network
    tally = dka.dissect(model, "layer4", "data/broden1_224")   # Network Dissection -> tally DataFrame
    attr = dka.attribute(model, images)                # per-image unit contributions
    dka.convert(torchvision_model, k=5)                # any classifier's final nn.Linear made Dynamic-K

The package is layered (ARCHITECTURE.md): `_core` < `kernels` < `layers` < `attribution` < `models` <
`data` < `train` < analysis (`dissect`, `concepts`, `explain`) < presentation (`results`, `plots`,
`report`) < `cli`, `experiments`; a module imports only from layers below its own.
"""

import importlib

__version__ = "0.1.0"

# Loaded on first use (PEP 562), so `import dka` and `python -m dka --help` stay fast.
_ENTRY_POINTS = {
    "build": "dka.models", "list_models": "dka.models", "load_model": "dka.models",
    "DynamicKLinear": "dka.layers", "DynamicKConv2d": "dka.layers", "dynamic_k_linear": "dka.layers",
    "dissect": "dka.dissection", "attribute": "dka.explain", "convert": "dka.conversion",
}
__all__ = [*_ENTRY_POINTS, "__version__"]


def __getattr__(name: str):
    if name in _ENTRY_POINTS:
        value = getattr(importlib.import_module(_ENTRY_POINTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dka' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_ENTRY_POINTS])
