"""dka.checkpoint: atomic writes, weights_only loads, model round trips, the authors' layout."""

from __future__ import annotations

import os

import pytest
import torch

from dka import models
from dka._compat import torchvision
from dka.models import load_model
from dka.checkpoint import (convert_authors_state_dict, load_checkpoint, model_payload,
                            save_atomic)


class _NotATensor:
    """Arbitrary class: pickling it works, loading it with weights_only=True must not."""

    def __init__(self):
        self.value = 3


def test_save_atomic_round_trip_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    save_atomic({"a": torch.arange(5), "b": [1, 2.5, "x", None], "c": (1, 2)}, path)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded["a"], torch.arange(5))
    assert loaded["b"] == [1, 2.5, "x", None] and tuple(loaded["c"]) == (1, 2)
    assert sorted(os.listdir(path.parent)) == ["state.pt"]


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert load_checkpoint(path) == {"epoch": 1}
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_load_checkpoint_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"obj": _NotATensor()}, path)
    with pytest.raises(RuntimeError, match="weights_only=True"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dka train"):
        load_checkpoint(tmp_path / "nope.pt")


def test_load_model_rebuilds_and_matches_outputs(tmp_path):
    torch.manual_seed(0)
    model = models.build("res18-d5a", 7, stem="cifar", width=4).eval()
    save_atomic(model_payload(model, epoch=3), tmp_path / "final.pt")
    loaded = load_model(tmp_path / "final.pt")
    assert not loaded.training
    assert loaded.build_kwargs == model.build_kwargs
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_load_model_rejects_other_files(tmp_path):
    save_atomic({"weight": torch.zeros(2)}, tmp_path / "head.pt")
    with pytest.raises(ValueError, match="not a dka model checkpoint"):
        load_model(tmp_path / "head.pt")


def _authors_places_checkpoint() -> dict:
    """A state dict in the authors' exact layout: their ResNet uses torchvision's names, the routed
    final layer is `rfc`, and nn.DataParallel prefixes everything with `module.`."""
    reference = torchvision.models.resnet18(num_classes=365).state_dict()
    generator = torch.Generator().manual_seed(1)
    state = {}
    for key, value in reference.items():
        key = "rfc." + key[len("fc."):] if key.startswith("fc.") else key
        if value.is_floating_point():
            value = torch.randn(value.shape, generator=generator)
        state["module." + key] = value
    return {"epoch": 89, "best_prec1": 53.6, "state_dict": state}


def test_convert_authors_layout_loads_into_res18_d5a(tmp_path):
    path = tmp_path / "resnet18_fc_ma_t5.pth"
    torch.save(_authors_places_checkpoint(), path)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    converted = convert_authors_state_dict(raw)
    assert not any(k.startswith(("module.", "rfc.")) for k in converted)
    model = models.build("res18-d5a", 365, stem="imagenet")
    model.load_state_dict(converted)  # strict: every name and shape must line up
    assert torch.equal(model.head.weight, raw["state_dict"]["module.rfc.weight"])
    assert torch.equal(model.layer2[0].downsample[1].running_mean,
                       raw["state_dict"]["module.layer2.0.downsample.1.running_mean"])
    assert model.head.k == 5


def test_convert_maps_plain_fc_and_unwrapped_dicts():
    state = {"fc.weight": torch.zeros(2, 3), "fc.bias": torch.zeros(2), "conv1.weight": torch.ones(1)}
    converted = convert_authors_state_dict(state)
    assert set(converted) == {"head.weight", "head.bias", "conv1.weight"}


def test_load_model_reads_the_resumable_checkpoint_too(tmp_path):
    """The docstring accepts checkpoint.pt (model payload plus optimiser, RNG, metrics): it must load."""
    torch.manual_seed(0)
    model = models.build("res18-d3a", 4, stem="cifar", width=4).eval()
    save_atomic(model_payload(model, 2, fingerprint="f", config={}, optimizer={"state": {}}, rng=[],
                              metrics=[{"epoch": 1}]), tmp_path / "checkpoint.pt")
    loaded = load_model(tmp_path / "checkpoint.pt")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_a_truncated_checkpoint_is_called_truncated(tmp_path, cut):
    """Not "re-save it as a state_dict", which suggests the file holds the wrong objects."""
    model = models.build("res18", 4, stem="cifar", width=4)
    path = save_atomic(model_payload(model, 1), tmp_path / "final.pt")
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    for load in (load_checkpoint, load_model):
        with pytest.raises(RuntimeError, match=r"final\.pt is truncated or is not a PyTorch checkpoint") as info:
            load(path)
        assert "re-save" not in str(info.value) and "re-run the command that wrote it" in str(info.value)
