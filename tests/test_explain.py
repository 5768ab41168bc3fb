"""Per-image explanations: exact decomposition of the class score, routing, residual, report."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from dka import explain as E
from dka import report
from dka.models import build


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dense = build("res18", num_classes=6, stem="cifar", width=4).eval()
    dka = build("res18-d3a", num_classes=6, stem="cifar", width=4).eval()
    # BN statistics away from the identity so the pooled activations are varied
    with torch.no_grad():
        for m in (dense, dka):
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return dense, dka


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_contributions_sum_to_score_minus_bias_dense(models, images):
    dense, _ = models
    a = E.attribute(dense, images)
    assert a.contributions.shape == (4, dense.num_features)
    assert torch.equal(a.target, a.logits.argmax(dim=1))
    total = (a.contributions * a.score[:, None]).sum(dim=1)
    torch.testing.assert_close(total, a.score - a.bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a.contributions.sum(dim=1), 1 - a.bias / a.score, rtol=1e-4, atol=1e-4)
    assert a.routed is None and torch.equal(a.effective, a.contributions)
    # residual after all units is exactly the bias share
    torch.testing.assert_close(a.residual(dense.num_features), a.bias / a.score, rtol=1e-4, atol=1e-4)


def test_routed_contributions_sum_to_score_minus_bias_dynamic(models, images):
    _, dka = models
    a = E.attribute(dka, images, target=2)
    assert (a.target == 2).all() and a.k == 3
    assert a.routed.shape == (4, 3) and a.routed_contributions.shape == (4, 3)
    torch.testing.assert_close((a.routed_contributions * a.score[:, None]).sum(dim=1), a.score - a.bias,
                               rtol=1e-4, atol=1e-5)
    # the routed units are the K largest products of the target row
    top = a.products.topk(3, dim=1).indices
    assert torch.equal(a.routed.sort(dim=1).values, top.sort(dim=1).values)
    # outside the routed set nothing counts; with n = K the residual is the bias share
    assert (a.effective.count_nonzero(dim=1) <= 3).all()
    torch.testing.assert_close(a.residual(3), a.bias / a.score, rtol=1e-4, atol=1e-4)
    units, vals = a.top_units(2)
    assert set(units[0].tolist()) <= set(a.routed[0].tolist())


def test_model_explain_and_targets(models, images):
    dense, _ = models
    a = dense.explain(images, target=[0, 1, 2, 3])
    assert a.target.tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="classes are 0..5"):
        E.attribute(dense, images, target=9)
    with pytest.raises(ValueError, match="one per image"):
        E.attribute(dense, images, target=[0, 1])
    with pytest.raises(ValueError, match="1 <= n <="):
        a.top_units(0)
    with pytest.raises(TypeError, match="features"):
        E.attribute(torch.nn.Linear(3, 2), images)


def test_heatmaps_shape_and_range(models, images):
    dense, _ = models
    a = E.attribute(dense, images)
    units, _ = a.top_units(2)
    h = a.heatmaps(units, (16, 16))
    assert h.shape == (4, 2, 16, 16)
    assert float(h.min()) >= 0 and float(h.max()) <= 1


def test_table_and_html_report(models, images, tmp_path):
    dense, dka = models
    units = dense.num_features
    tally = pd.DataFrame({"unit": range(1, units + 1), "category": "object",
                          "label": [f"concept{u}" for u in range(1, units + 1)], "score": 0.1})
    a, b = E.attribute(dka, images), E.attribute(dense, images)
    table = E.explanation_table(a, tally, n=2, class_names=[f"c{i}" for i in range(6)])
    assert len(table) == 8 and set(table["concept"]) <= set(tally["label"])
    assert (table["concept"] == table["unit"].map(lambda u: f"concept{u}")).all()
    text = report.render_report(images, {"res18-d3a": (a, tally), "res18": (b, None)}, [f"c{i}" for i in range(6)],
                           n=2, labels=[0, 1, 2, 3])
    path = report.write_report(text, tmp_path / "report.html")
    body = path.read_text()
    assert body.count("<tr>") == 5  # header + 4 images
    assert body.count("data:image/png;base64,") == 4 * (1 + 2 + 2)
    assert "res18-d3a" in body and "concept" in body and "residual" in body


def test_spatial_map_sums_to_the_explained_score(models, images):
    """The contribution map over positions holds exactly the part of y_c the head's used units carry."""
    for model in models:
        a = E.attribute(model, images)
        torch.testing.assert_close(a.spatial.sum(dim=(1, 2)), a.score - a.bias, rtol=1e-4, atol=1e-4)
        assert a.pixel_map((16, 16)).shape == (4, 16, 16)


# ------------------------------------------------------------------ the command line (issue 15, item 4)


def _cifar_tree(root, per_class=1):
    import numpy as np
    from PIL import Image

    from dka.data import cifar

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in cifar.CLASSES:
            (root / split / name).mkdir(parents=True)
            for k in range(per_class):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / split / name / f"{k}.png")
    return root


def test_cli_refuses_a_checkpoint_tally_or_dataset_that_do_not_belong_together(tmp_path, capsys):
    from dka.checkpoint import model_payload, save_atomic
    from dka.cli.explain import main as explain_main
    from dka.data import cifar
    from dka.dissection import tally_columns

    data = _cifar_tree(tmp_path / "cifar")
    save_atomic(model_payload(build("res18-d3a", num_classes=4, stem="cifar", width=4)), tmp_path / "four.pt")
    ten = build("res18-d3a", num_classes=10, stem="cifar", width=4)
    save_atomic(model_payload(ten), tmp_path / "ten.pt")
    other = list(cifar.CLASSES)[::-1]  # trained on 10 classes, but in another order
    save_atomic(model_payload(ten, dataset={"class_names": other}), tmp_path / "shuffled.pt")
    units = ten.head.weight.shape[1]
    tally = pd.DataFrame([[u, "color", "red", 0.1] + [0] * 25 for u in range(1, 2 * units + 1)],
                         columns=tally_columns())
    tally.to_csv(tmp_path / "tally.csv", index=False)
    base = ["--dataset", "cifar10", "--data", str(data), "--count", "4", "--out", str(tmp_path / "r" / "report.html")]
    for extra, message in (
        (["--checkpoint", str(tmp_path / "four.pt")], "is a 4-class model but cifar10 at"),
        (["--checkpoint", str(tmp_path / "shuffled.pt")], "trained on other classes than cifar10"),
        (["--checkpoint", str(tmp_path / "ten.pt"), "--tally", str(tmp_path / "tally.csv")],
         f"does not fit --checkpoint {tmp_path / 'ten.pt'}: the tally covers {2 * units} units"),
    ):
        with pytest.raises(SystemExit) as info:
            explain_main([*base, *extra])
        assert info.value.code == 2 and message in capsys.readouterr().err
        assert not (data / ".dka_cache").exists()  # refused before the dataset was decoded
        assert not (tmp_path / "r").exists()
    assert explain_main([*base, "--checkpoint", str(tmp_path / "ten.pt")]) == 0
    assert (tmp_path / "r" / "report.html").is_file()


def test_cli_skip_corrupt_reports_the_skipped_images(tmp_path, capsys):
    from dka.checkpoint import model_payload, save_atomic
    from dka.cli.explain import main as explain_main

    data = _cifar_tree(tmp_path / "cifar")
    bad = data / "test" / "bird" / "0.png"
    bad.write_bytes(bad.read_bytes()[:40])
    save_atomic(model_payload(build("res18", num_classes=10, stem="cifar", width=4)), tmp_path / "ten.pt")
    argv = ["--checkpoint", str(tmp_path / "ten.pt"), "--dataset", "cifar10", "--data", str(data), "--count", "4",
            "--out", str(tmp_path / "report.html")]
    with pytest.raises(Exception, match=r"bird/0\.png.*--skip-corrupt"):
        explain_main(argv)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 corrupt image"):
        assert explain_main([*argv, "--skip-corrupt"]) == 0
    assert "--skip-corrupt: 1 test image(s) could not be decoded" in capsys.readouterr().out
