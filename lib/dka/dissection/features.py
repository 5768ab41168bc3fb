"""Features of a named layer: a forward hook that captures them, and a store that keeps them.

At paper scale (Broden's 63,305 images, ResNet18 layer4 = 512 units x 7 x 7) the store is 6.4 GB, so it
goes to a float32 memmap file; small runs keep it in memory. The file has no name (O_TMPFILE, or unlinked
as soon as it is created): the kernel frees it when the store is closed or the process ends, even by
SIGKILL, so a killed dissection never leaves gigabytes behind in its output folder.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["LayerCapture", "FeatureStore"]


class _StopForward(Exception):
    pass


class LayerCapture:
    """Forward hook on ``model.get_submodule(layer)``; stops the forward pass once it has fired."""

    def __init__(self, model: nn.Module, layer: str, stop: bool = True):
        names = dict(model.named_modules())
        if layer not in names or layer == "":
            conv_like = [n for n, m in names.items() if n and not list(m.children())]
            blocks = [n for n in names if n and n.count(".") == 0]
            raise KeyError(
                f"model has no module {layer!r}; top-level modules: {blocks}; leaf modules look like "
                f"{conv_like[:6]}... (e.g. 'layer4' or an internal dynamic layer 'layer3.0.conv1')"
            )
        self.module = names[layer]
        self.layer = layer
        self.stop = stop
        self.output: Tensor | None = None

    def _hook(self, _module, _inputs, output):
        self.output = output
        if self.stop:
            raise _StopForward

    def __call__(self, model: nn.Module, x: Tensor) -> Tensor:
        handle = self.module.register_forward_hook(self._hook)
        try:
            try:
                model(x)
            except _StopForward:
                pass
        finally:
            handle.remove()
        out = self.output
        self.output = None
        if out is None:
            raise RuntimeError(f"layer {self.layer!r} did not run during the forward pass")
        if not isinstance(out, Tensor) or out.dim() != 4:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"layer {self.layer!r} outputs {shape}; dissection needs a (B, C, h, w) map")
        return out


class FeatureStore:
    """Features (N, U, h, w) float32 in dataset order: a tensor in memory, or a memmap file."""

    def __init__(self, n: int, shape: tuple[int, int, int], memory_budget: int, cache_dir: str | Path | None):
        self.shape = (n, *shape)
        nbytes = 4 * int(np.prod(self.shape))
        self._file = None
        if nbytes <= memory_budget:
            self.data: Tensor | np.ndarray = torch.empty(self.shape, dtype=torch.float32)
        else:
            self._file = tempfile.TemporaryFile(prefix="dka-features-", suffix=".f32", dir=cache_dir)
            self.data = np.memmap(self._file, dtype=np.float32, mode="w+", shape=self.shape)
        self.filled = 0

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def append(self, x: Tensor) -> None:
        b = x.shape[0]
        x = x.detach().to("cpu", torch.float32)
        if self.in_memory:
            self.data[self.filled : self.filled + b] = x
        else:
            self.data[self.filled : self.filled + b] = x.numpy()
        self.filled += b

    def batch(self, start: int, stop: int) -> Tensor:
        part = self.data[start:stop]
        return part if isinstance(part, Tensor) else torch.from_numpy(np.asarray(part))

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        for s in range(0, self.filled, batch_size):
            yield self.batch(s, min(self.filled, s + batch_size))

    def close(self) -> None:
        if self._file is not None:
            del self.data
            self._file.close()
            self._file = None
