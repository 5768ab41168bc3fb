"""Distributed training helpers: the process group, reductions, and a BatchNorm pooled across ranks.

Under `torchrun` the global batch is split over ranks and BatchNorm statistics are pooled across ranks
(`nn.SyncBatchNorm` on GPU, `AllReduceBatchNorm2d` on CPU/gloo), so N processes compute the same step as
one process with the same global batch; rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["DistContext", "init_distributed", "all_reduce", "barrier", "AllReduceBatchNorm2d",
           "convert_allreduce_bn", "all_gather_objects"]


@dataclass
class DistContext:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str | None) -> DistContext:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and (device_pref is None or device_pref.startswith("cuda"))
    initialized_here = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        initialized_here = True
    return DistContext(world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank,
                 initialized_here=initialized_here)


def all_reduce(tensor: torch.Tensor, dist_ctx: DistContext, op: str = "sum") -> torch.Tensor:
    if dist_ctx.world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def barrier(dist_ctx: DistContext) -> None:
    if dist_ctx.world > 1:
        import torch.distributed as dist

        dist.barrier()


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks (each rank's statistics feed every
    rank's loss), so gradients through pooled BatchNorm statistics are exact."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are pooled over all ranks by a differentiable all-reduce.

    `nn.SyncBatchNorm` refuses CPU tensors; this is its CPU/gloo counterpart (sum, sum of squares and
    count reduced in one call), so DDP on CPU computes exactly the global-batch step.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        xf = x.float()
        count = xf.new_full((1,), xf.numel() / channels)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach() * m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)) * m)
        shape = (1, channels, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_allreduce_bn(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, AllReduceBatchNorm2d):
        new = AllReduceBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                   module.track_running_stats)
        new.load_state_dict(module.state_dict())
        return new.to(module.weight.device if module.affine else module.running_mean.device)
    for name, child in module.named_children():
        setattr(module, name, convert_allreduce_bn(child))
    return module


def all_gather_objects(obj, dist_ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] (just [obj] without DDP)."""
    if dist_ctx.world <= 1:
        return [obj]
    import torch.distributed as dist

    gathered = [None] * dist_ctx.world
    dist.all_gather_object(gathered, obj)
    return gathered
