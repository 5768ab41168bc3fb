"""CoDA-Nets: the dynamic-linear identity, the norm bound, the convolution = per-patch DAU, gradients,
training through the engine, and the temperature measurement at smoke size."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dka import metrics, train
from dka.data.scenes import generate
from dka.explain import attribute
from dka.models import build, load_model, parse_name
from dka.models._dau import DALayer, DAUConv2d, bounded_scale


def tiny(name="coda-s", classes=4, width=2, dtype=torch.float64, **options):
    torch.manual_seed(0)
    return build(name, classes, width=width, **options).to(dtype)


# ------------------------------------------------------------------------------------------ the model


def test_names_options_and_rebuild():
    assert parse_name("CoDA-S").arch == "coda-s" and parse_name("coda-cifar").family == "coda"
    model = build("coda-cifar", 10)
    widths = [layer.out_channels for layer in model.layers] + [model.classifier.out_channels]
    assert widths == [16, 16, 32, 32, 32, 64, 64, 64, 10]  # the authors' 9L-S-CoDA-SQ
    assert [layer.rank for layer in model.layers] + [model.classifier.rank] == [32, 32] + [64] * 7
    assert [layer.stride for layer in model.layers] == [1, 1, 2, 1, 1, 2, 1, 1]
    assert model.temperature == 1000.0 and model.logit_bias == pytest.approx(math.log(0.1 / 0.9))
    assert model.dynamic_layers() == {} and not hasattr(model, "head")
    small = build("coda-s", 5, stem="imagenet", width=4, temperature=50, norm="l2", rank=3)
    assert small.build_kwargs == {"name": "coda-s", "num_classes": 5, "stem": "imagenet", "width": 4,
                                  "temperature": 50.0, "norm": "l2", "rank": 3,
                                  "logit_bias": pytest.approx(math.log(1 / 4)), "input_norm": "imagenet"}
    assert build(**small.build_kwargs).build_kwargs == small.build_kwargs
    with pytest.raises(ValueError, match="valid: temperature"):
        build("coda-s", 5, temprature=5)
    with pytest.raises(ValueError, match="temperature must be a positive"):
        build("coda-s", 5, temperature=0)
    with pytest.raises(ValueError, match="valid: squash, l2"):
        build("coda-s", 5, norm="l1")
    with pytest.raises(ValueError, match="input_norm"):
        build("coda-s", 5, input_norm="places")
    with pytest.raises(ValueError, match="coda-cifar"):
        build("coda-xl", 5)


def test_the_input_encoding_is_colour_and_complement():
    model = tiny(input_norm="imagenet")
    pixels = torch.rand(2, 3, 5, 5, dtype=torch.float64)
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    enc = model.encode((pixels - mean) / std)
    torch.testing.assert_close(enc, torch.cat([pixels, 1 - pixels], 1))
    with pytest.raises(ValueError, match="RGB"):
        model.encode(torch.zeros(1, 1, 4, 4))


@pytest.mark.parametrize("name,norm", [("coda-s", "squash"), ("coda-s", "l2"), ("coda-cifar", "squash")])
@pytest.mark.parametrize("size", [(8, 8), (12, 20), (32, 32)])
def test_contribution_map_sums_to_the_logit(name, norm, size):
    """The dynamic-linear identity, in float64: sum of W_c(x) * enc(x) = logit_c - bias, for any image."""
    model = tiny(name, classes=5, norm=norm, temperature=7.0)
    g = torch.Generator().manual_seed(hash((name, norm, size)) % 2**31)
    for batch, target in ((3, None), (2, 4), (4, [0, 1, 2, 3])):
        x = torch.randn(batch, 3, *size, dtype=torch.float64, generator=g) * 2
        attr = attribute(model, x, target)
        assert attr.spatial.shape == (batch, *size) and attr.spatial.dtype == torch.float64
        torch.testing.assert_close(attr.logits, model(x).detach(), rtol=1e-12, atol=1e-12)
        explained = attr.score - attr.bias
        torch.testing.assert_close(attr.spatial.sum((1, 2)), explained, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(attr.products.sum(1), explained, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(attr.contributions.sum(1) + attr.bias / attr.score,
                                   torch.ones(batch, dtype=torch.float64))
        assert attr.feature_maps.shape[1] == model.num_features and attr.effective is not None
    # the map is the gradient of the logit with the dynamic weights held fixed, times the input
    assert torch.isfinite(attr.spatial).all() and attr.spatial.abs().sum() > 0


def test_alignment_is_the_cosine_of_the_linear_map_and_the_input():
    model = tiny(classes=3, temperature=3.0)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    lm = model.linear_map(x, 1)
    torch.testing.assert_close((lm.weights * lm.encoded).sum((1, 2, 3)),
                               lm.logits[:, 1] - model.logit_bias, rtol=1e-9, atol=1e-12)
    cos = model.alignment(x, 1)
    norms = lm.weights.flatten(1).norm(dim=1) * lm.encoded.flatten(1).norm(dim=1)
    expected = (lm.logits[:, 1] - model.logit_bias) / norms
    torch.testing.assert_close(cos, expected)
    assert (cos.abs() <= 1).all()


def test_frozen_forward_is_the_same_function_but_linear():
    model = tiny(classes=3)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    enc = model.encode(x)
    normal = model.classifier(model.layers(enc))
    frozen = model.classifier(model.layers(enc, frozen=True), frozen=True)
    torch.testing.assert_close(frozen, normal, rtol=0, atol=0)
    # linear in the input with the weights of x frozen: f(2x) computed with x's weights is 2 f(x)
    jac = torch.func.jacrev(lambda e: model.classifier(model.layers(e, frozen=True), frozen=True))(enc)
    torch.testing.assert_close(torch.einsum("bchwnijk,nijk->bchw", jac, enc), normal)


def test_explain_keeps_the_train_mode_and_moves_inputs():
    model = tiny().float().train()
    attr = model.explain(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert model.training and attr.spatial.dtype == torch.float32
    units, values = attr.top_units(2)
    assert units.shape == (2, 2) and attr.residual(model.num_features).shape == (2,)


# ------------------------------------------------------------------------------------------ the DAU


@pytest.mark.parametrize("norm", ["squash", "l2"])
def test_g_bounds_the_weight_norm(norm):
    torch.manual_seed(1)
    layer = DALayer(7, 5, 3, norm=norm).double()
    for scale in (1e-3, 1.0, 1e3):
        with torch.no_grad():
            layer.expand.mul_(scale)
        x = torch.randn(64, 7, dtype=torch.float64) * scale
        w = layer.dynamic_weights(x)
        norms = w.norm(dim=-1)
        raw = torch.einsum("nr,jrd->njd", x @ layer.reduce.t(), layer.expand) + layer.bias
        sq = (raw * raw).sum(-1)
        if norm == "squash":
            assert (norms < 1).all()
            torch.testing.assert_close(norms, sq / (1 + sq))
        else:
            torch.testing.assert_close(norms, torch.ones_like(norms))
        # so a unit's output is at most the input's norm (Cauchy-Schwarz): only alignment makes it large
        assert (layer(x).abs() <= x.norm(dim=1, keepdim=True) * (1 + 1e-12)).all()
    with pytest.raises(ValueError, match="squash, l2"):
        bounded_scale(torch.ones(1), "max")


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, None), (3, 2, None), (1, 1, None), (5, 2, 0), (2, 1, 1)])
def test_conv_layer_is_the_dau_on_every_patch(kernel, stride, padding):
    torch.manual_seed(2)
    conv = DAUConv2d(3, 4, 5, kernel, stride, padding).double()
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64)
    out = conv(x)
    pad = (kernel - 1) // 2 if padding is None else padding
    patches = F.unfold(x, kernel, padding=pad, stride=stride)  # (2, D, L), D ordered (channel, row, col)
    rows = conv.as_patch_layer()(patches.transpose(1, 2).reshape(-1, patches.shape[1]))  # (2 L, out)
    expected = rows.view(2, -1, 4).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-13)
    # channels_last input (what the trainer feeds) changes nothing
    torch.testing.assert_close(conv(x.to(memory_format=torch.channels_last)), out, rtol=1e-12, atol=1e-13)


def test_bf16_autocast_stays_close_to_float32():
    torch.manual_seed(3)
    conv = DAUConv2d(6, 8, 4)
    x = torch.rand(2, 6, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = conv(x)
    torch.testing.assert_close(low.float(), conv(x), rtol=0.05, atol=0.02)


@pytest.mark.parametrize("norm", ["squash", "l2"])
def test_gradcheck_tiny_layer(norm):
    torch.manual_seed(4)
    conv = DAUConv2d(2, 3, 2, kernel_size=3, stride=2, norm=norm).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    params = (conv.reduce, conv.expand, conv.bias)

    def as_function(inp, reduce, expand, bias):
        return torch.func.functional_call(conv, {"reduce": reduce, "expand": expand, "bias": bias}, (inp,))

    inputs = (x, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(as_function, inputs)
    assert torch.autograd.gradgradcheck(as_function, inputs)


# ------------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    return generate("smoke", tmp_path_factory.mktemp("scenes") / "smoke", seed=0, processes=1, progress=False)


def coda_config(out, root, **overrides):
    base = dict(model="coda-s", data="scenes-smoke", data_root=str(root), out=str(out), preset="smoke", width=4,
                optimizer="adam", loss="bce", lr=5e-3, weight_decay=0.0, batch_size=16, epochs=3,
                max_steps_per_epoch=8, max_eval_steps=None, amp=False, channels_last=True, progress=False,
                threads=1, workers=0, model_options={"temperature": 10.0})
    base.update(overrides)
    return train.TrainConfig(**base)


@pytest.mark.slow
def test_short_training_on_smoke_scenes_reduces_the_loss(smoke_root, tmp_path):
    result = train.run(coda_config(tmp_path / "run", smoke_root, epochs=4, max_steps_per_epoch=None, lr=1e-2,
                                   model_options={"temperature": 1.0}))
    losses = [m["train_loss"] for m in result.metrics]
    assert losses[-1] < losses[0] * 0.9, losses
    # the smoke split is too small to test accuracy (bench/coda_paper_checks.py measures it on scenes-demo32)
    assert result.metrics[-1]["test_loss"] < result.metrics[0]["test_loss"], result.metrics
    assert result.metrics[-1]["sparsity"] == {} and result.metrics[-1]["never_routed"] == {}
    assert not list((tmp_path / "run").glob("head_epoch*.pt"))  # no linear head: no head snapshots
    model = load_model(tmp_path / "run" / "final.pt")
    assert model.build_kwargs["temperature"] == 1.0 and model.build_kwargs["width"] == 4
    # the stored model is the trained one: its explanation is still exact, in float32 too
    attr = model.explain(torch.randn(3, 3, 24, 24))
    torch.testing.assert_close(attr.spatial.sum((1, 2)), attr.score - attr.bias, rtol=1e-3, atol=1e-4)


def test_adam_bce_recipe_fields():
    cfg = train.TrainConfig(model="coda-s", data="scenes-demo32", out="x", preset="coda-demo").resolved()
    assert (cfg.optimizer, cfg.loss, cfg.width) == ("adam", "bce", 8)
    paper = train.TrainConfig(model="coda-cifar", data="cifar10", out="x", preset="coda-paper").resolved()
    assert (paper.optimizer, paper.lr, paper.batch_size, paper.epochs, paper.weight_decay) == ("adam", 2.5e-4, 16,
                                                                                                200, 0.0)
    assert train.LrFactor("step", 1, 200, paper.milestones, paper.gamma)(30) == pytest.approx(1 / 1.5)
    # the two fields leave the fingerprint of earlier (sgd, cross-entropy) runs unchanged
    old = train.TrainConfig(model="res18", data="x", out="x").resolved()
    assert "optimizer" not in old.fingerprint_fields() and "loss" not in old.fingerprint_fields()
    assert "optimizer" in paper.fingerprint_fields()
    back = train.config_from_args(train.config_to_argv(paper)).resolved()  # the torchrun relaunch path
    assert (back.optimizer, back.loss, back.lr, back.milestones) == ("adam", "bce", 2.5e-4, paper.milestones)
    with pytest.raises(SystemExit):
        train.config_from_args(["--model", "coda-s", "--data", "x", "--out", "x", "--optimizer", "lbfgs"])
    with pytest.raises(ValueError, match="head-weight-decay"):
        train.run(train.TrainConfig(model="coda-s", data="x", out="unused", head_weight_decay=0.0, preset="smoke"),
                  bundle=_TinyBundle())


class _TinyBundle:
    def __init__(self):
        x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
        self.train = self.test = torch.utils.data.TensorDataset(x, y)
        self.num_classes, self.stem = 3, "cifar"


def test_bce_loss_is_the_one_hot_binary_cross_entropy():
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    expected = torch.nn.BCEWithLogitsLoss()(logits, F.one_hot(labels, 4).float())
    torch.testing.assert_close(train.classification_loss(logits, labels, "bce"), expected)
    torch.testing.assert_close(train.classification_loss(logits, labels, "bce", reduction="sum"), expected * 5)
    torch.testing.assert_close(train.classification_loss(logits, labels), F.cross_entropy(logits, labels))


# ------------------------------------------------------------------------------------------ temperature


@pytest.mark.slow
def test_temperature_measurement_at_smoke_size(smoke_root, tmp_path):
    """The paper check end to end at smoke size: train per temperature, score the contribution maps
    against the true concept masks (the effect itself is measured by bench/coda_paper_checks.py)."""
    truth = metrics.ConceptTruth(smoke_root, split="test")
    tables = {}
    for temperature in (1.0, 1000.0):
        cfg = coda_config(tmp_path / f"T{temperature:g}", smoke_root, model_options={"temperature": temperature},
                          epochs=1)
        model = load_model(train.run(cfg).final_path)
        assert model.temperature == temperature
        tables[temperature] = table = metrics.explanation_localisation(model, truth, batch_size=32, limit=40)
        assert len(table) == 40 and table["share"].between(0, 1).all()
        assert table["mask_fraction"].between(0, 1).all() and table["pointing"].dtype == bool
        # the row scores are the metrics' functions on the model's own pixel maps of the true class
        batch = truth.collate([truth[j] for j in range(4)])
        attr = model.explain(batch["image"], batch["label"])
        share = metrics.localisation_share(attr.pixel_map(tuple(batch["mask"].shape[-2:])), batch["mask"])
        torch.testing.assert_close(torch.tensor(table["share"][:4].to_numpy(), dtype=share.dtype), share)
    assert set(tables) == {1.0, 1000.0}


# ------------------------------------------------------------------------------------------ dissection


@pytest.mark.slow
def test_network_dissection_of_the_last_layer(smoke_root):
    """`dka.dissect` hooks the units the class layer weighs ("layers") and the class maps ("classifier")."""
    from dka.dissection import dissect

    model = tiny(classes=4, width=2, dtype=torch.float32).eval()
    tally = dissect(model, "layers", str(smoke_root), batch_size=64, progress=False)
    assert sorted(tally["unit"]) == list(range(1, model.num_features + 1))
    assert tally["score"].between(0, 1).all() and tally["score"].is_monotonic_decreasing
    assert len(dissect(model, model.final_layer_name, str(smoke_root), batch_size=64, progress=False)) == 4
