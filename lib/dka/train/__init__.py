"""Training engine: the paper's recipes, metrics every epoch, atomic checkpoints, exact resume, DDP.

- `config`      TrainConfig (the one source of a run's settings; the CLI is generated from it), PRESETS
- `loop`        run (check first), train_one_epoch, evaluate
- `objectives`  the loss and the extension point for a method's extra loss (`auxiliary_losses`)
- `state`       checkpoint payloads, RNG states, metrics files
- `routing`     never-routed bookkeeping and sparsity of Dynamic-K layers
- `distributed` process group, reductions, BatchNorm pooled over ranks
- `schedule`    learning-rate schedules
- `cost`        what runs will cost (measured step time, GPU-hours, disk) and the refusal of a short disk
"""

from dka.train.config import (LOSSES, OPTIMIZERS, PRESETS, SCHEDULES, TrainConfig, bf16_is_fast, build_parser,
                              config_from_args, config_to_argv, resolve_preset)
from dka.train.distributed import AllReduceBatchNorm2d, DistContext
from dka.train.loop import RunResult, check, evaluate, run, train_one_epoch
from dka.train.objectives import classification_loss, training_loss
from dka.train.routing import RoutingTracker, layer_sparsity
from dka.train.schedule import LrFactor

__all__ = ["run", "check", "RunResult", "TrainConfig", "PRESETS", "SCHEDULES", "OPTIMIZERS", "LOSSES", "resolve_preset",
           "bf16_is_fast", "build_parser", "config_from_args", "config_to_argv", "train_one_epoch", "evaluate",
           "training_loss", "classification_loss",
           "RoutingTracker", "layer_sparsity", "LrFactor", "AllReduceBatchNorm2d", "DistContext"]
