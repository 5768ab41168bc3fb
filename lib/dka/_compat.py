"""The one place that imports torchvision.

PyPI's torchvision wheels are CUDA builds. Next to a CPU build of torch their compiled operators
(`nms`, `roi_align`, ...) cannot load, and `import torchvision` then fails while registering a fake
kernel for `torchvision::nms` ("operator torchvision::nms does not exist"). Models, transforms and
datasets do not need those operators, so when (and only when) that specific failure happens we
declare the two operator schemas torchvision registers unconditionally and import it again. With a
matching torchvision the normal import path runs untouched.

Everything in dka does `from dka._compat import torchvision`.
"""

from __future__ import annotations

import logging
import sys

import torch

_PLACEHOLDER_LIBRARY = None  # kept alive: dropping the Library object would undefine the schemas


def _declare_missing_torchvision_ops() -> None:
    global _PLACEHOLDER_LIBRARY
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _PLACEHOLDER_LIBRARY = lib


def _import_torchvision():
    try:
        import torchvision as tv

        return tv, True
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        reason = str(err)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_missing_torchvision_ops()
    import torchvision as tv

    # Logged, not warned: every notebook and CLI would otherwise print it on this machine's setup.
    logging.getLogger("dka").info(
        "torchvision's compiled operators do not match this torch build (%s); models, transforms "
        "and datasets work, torchvision.ops (nms, roi_align) do not. Install a torchvision built "
        "for this torch to get them.",
        reason,
    )
    return tv, False


torchvision, TORCHVISION_OPS_AVAILABLE = _import_torchvision()

__all__ = ["torchvision", "TORCHVISION_OPS_AVAILABLE"]
