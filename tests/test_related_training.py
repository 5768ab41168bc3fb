"""res18-icnn and res18-decouple through the training engine: smoke scenes, logged losses, exact resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import TensorDataset

from dka import train
from dka.checkpoint import load_checkpoint
from dka.data.scenes import generate
from dka.models import load_model
from dka.train.objectives import training_loss

MODELS = {"res18-icnn": {"filter_weight": 1.0, "tau": 0.5}, "res18-decouple": {"open_target": 0.5}}
AUX = {"res18-icnn": {"filter"}, "res18-decouple": {"mi", "align", "sparsity"}}


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", seed=0, processes=1, progress=False)


def _objective(path, images, labels) -> float:
    """Cross-entropy plus the model's own losses on a fixed batch (training-mode forward, no update)."""
    model = load_model(path).train()
    with torch.no_grad():
        return training_loss(model, model(images), labels, None).total.item()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_short_run_on_smoke_scenes_reduces_the_loss(tmp_path, smoke_root, name):
    torch.manual_seed(0)
    cfg = train.TrainConfig(model=name, data="scenes-smoke", data_root=str(smoke_root), out=str(tmp_path / "run"),
                            preset="smoke", width=8, epochs=3, batch_size=16, max_steps_per_epoch=None, lr=0.05,
                            amp=False,
                            channels_last=False, progress=False, threads=1, save_checkpoint_epochs="0,last",
                            model_options=MODELS[name])
    result = train.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows == result.metrics and set(rows[-1]["aux_losses"]) == AUX[name]
    assert rows[-1]["never_routed"] == {}  # no Dynamic-K layer
    from dka.data import build_loaders

    bundle = build_loaders("scenes-smoke", smoke_root, batch_size=64, workers=0, augment=False)
    images, labels = next(iter(bundle.train))
    before = _objective(tmp_path / "run" / "checkpoint_epoch000.pt", images, labels)
    after = _objective(tmp_path / "run" / "final.pt", images, labels)
    assert after < before
    model = load_model(tmp_path / "run" / "final.pt")
    assert model.build_kwargs["name"] == name and all(model.build_kwargs[k] == v for k, v in MODELS[name].items())


class _Interrupt(Exception):
    pass


def _tiny_bundle():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (96,), generator=g)
    x = torch.randn(96, 3, 8, 8, generator=g) * 0.5 + y.view(-1, 1, 1, 1) * 0.3
    return SimpleNamespace(train=TensorDataset(x[:64], y[:64]), test=TensorDataset(x[64:], y[64:]), num_classes=4,
                           stem="cifar")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_interrupted_run_resumes_to_the_same_weights_and_method_state(tmp_path, name):
    def cfg(out):
        return train.TrainConfig(model=name, data="tiny", out=str(out), preset="smoke", width=4, batch_size=16,
                                 epochs=2, amp=False, channels_last=False, progress=False, threads=1,
                                 deterministic=True, augment=False, model_options=MODELS[name])

    train.run(cfg(tmp_path / "reference"), bundle=_tiny_bundle())

    def stop(steps):
        if steps == 6:  # 4 steps per epoch: stop in epoch 2, after checkpoint 1
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train.run(cfg(tmp_path / "resumed"), bundle=_tiny_bundle(), on_step=stop)
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    train.run(cfg(tmp_path / "resumed"), bundle=_tiny_bundle())
    ref = load_checkpoint(tmp_path / "reference" / "final.pt")["state_dict"]
    res = load_checkpoint(tmp_path / "resumed" / "final.pt")["state_dict"]
    assert ref.keys() == res.keys()
    for key in ref:  # includes the filter categories' running statistic and the control modules
        assert torch.equal(ref[key], res[key]), key
