"""dka.plots: every helper draws the labels it promises and writes real, complete files."""

from __future__ import annotations

import json
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from dka import plots, progress, results  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _style_and_close():
    plots.use_style()
    yield
    plt.close("all")


def _runs():
    rng = np.random.default_rng(0)
    runs = {}
    for name in ("res18", "res18-d5a"):
        records = []
        for epoch in range(1, 4):
            records.append({
                "epoch": epoch, "lr": 0.1, "train_loss": 1.0 / epoch,
                "train_top1": 50 + 10 * epoch + rng.random(), "test_top1": 45 + 10 * epoch,
                "test_top5": 90.0, "sparsity": {"head": 0.1 * epoch, "layer3.0.conv1": 0.0},
                "never_routed": ({"head": 0.2 * epoch} if name.endswith("a") else {}),
                "seconds": 1.0,
            })
        runs[name] = records
    return runs


def _texts(fig):
    out = []
    for ax in fig.axes:
        out += [ax.get_xlabel(), ax.get_ylabel(), ax.get_title()]
        legend = ax.get_legend()
        if legend is not None:
            out += [t.get_text() for t in legend.get_texts()]
        out += [t.get_text() for t in ax.texts]
        out += [t.get_text() for t in ax.get_xticklabels()]
    if fig._suptitle is not None:
        out.append(fig._suptitle.get_text())
    return out


def test_metrics_frame_takes_head_entry_of_layer_dicts():
    frame = results.metrics_frame(_runs())
    assert list(frame["model"].unique()) == ["res18", "res18-d5a"]
    assert frame.loc[frame["model"] == "res18-d5a", "never_routed"].tolist() == pytest.approx([0.2, 0.4, 0.6])
    assert frame.loc[frame["model"] == "res18", "never_routed"].isna().all()
    assert frame["sparsity"].tolist() == pytest.approx([0.1, 0.2, 0.3] * 2)
    with pytest.raises(ValueError, match="empty"):
        results.metrics_frame({"res18": []})


def test_save_figure_writes_small_png_atomically(tmp_path):
    fig = plots.accuracy_curves(results.metrics_frame(_runs()))
    path = results.save_figure(fig, tmp_path / "sub" / "acc.png")
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert 5_000 < len(data) < 400_000
    assert [p.name for p in path.parent.iterdir()] == ["acc.png"]  # no temp file left behind
    width, height = Image.open(path).size
    assert 600 < width < 1800 and 200 < height < 900
    with pytest.raises(ValueError, match="PNG"):
        results.save_figure(fig, tmp_path / "acc.pdf")


def test_accuracy_curves_labels_every_model_and_split():
    fig = plots.accuracy_curves(results.metrics_frame(_runs()), title="Fig. 4(a)")
    texts = _texts(fig)
    assert "train" in texts and "test" in texts
    assert "res18" in texts and "res18-d5a" in texts
    assert "top-1 accuracy (%)" in texts and "Fig. 4(a)" in texts
    with pytest.raises(KeyError, match="test_top1"):
        plots.accuracy_curves(pd.DataFrame({"model": ["a"], "epoch": [1], "train_top1": [1.0]}))


def test_weight_heatmap_is_diverging_and_centred_at_zero():
    w = np.random.default_rng(0).normal(size=(10, 128))
    w[:, :64] = 0.0
    fig = plots.weight_heatmap(w, title="res18-d5a")
    image = fig.axes[0].images[0]
    vmin, vmax = image.get_clim()
    assert vmin == pytest.approx(-vmax) and vmax > 0
    assert image.get_array().shape == (128, 10)  # features down, classes across
    assert image.get_cmap().name == "RdBu_r"
    assert "feature (of 128)" in _texts(fig) and "class" in _texts(fig)
    with pytest.raises(ValueError, match="2-D"):
        plots.weight_heatmap(np.zeros(5))


def test_weight_heatmaps_one_panel_per_model():
    w = {name: np.random.default_rng(i).normal(size=(10, 32)) for i, name in enumerate(["res18", "res18-d5a"])}
    fig = plots.weight_heatmaps(w, subtitles={"res18-d5a": "sparsity 90%"})
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ["res18", "res18-d5a\nsparsity 90%"]


def test_sparsity_curves_name_the_measure():
    frame = results.metrics_frame(_runs())
    fig = plots.sparsity_curves(frame, measure="small")
    assert any("|w| < 1e-3" in t for t in _texts(fig))
    fig = plots.sparsity_curves(frame, measure="never_routed")
    texts = _texts(fig)
    assert any("never routed" in t for t in texts)
    assert "res18" not in texts  # a dense head has no routing: no line for it
    with pytest.raises(ValueError, match="measure"):
        plots.sparsity_curves(frame, measure="l0")


def test_weight_heatmaps_share_one_colour_scale():
    w = {"res18": np.full((4, 8), 0.5), "res18-d5a": np.full((4, 8), 0.01)}
    fig = plots.weight_heatmaps(w)
    limits = {ax.images[0].get_clim() for ax in fig.axes if ax.images}
    assert len(limits) == 1  # a paler panel really holds smaller weights
    separate = plots.weight_heatmaps(w, shared_scale=False)
    assert len({ax.images[0].get_clim() for ax in separate.axes if ax.images}) == 2


def test_model_colours_do_not_depend_on_the_figure():
    assert plots.model_palette(["res18", "res18-d5a"])["res18-d5a"] == plots.model_palette(["res18-d5a"])["res18-d5a"]
    assert plots.model_color("res18-d1a") != plots.model_color("res18-d100a")


def test_paper_comparison_bars_prints_both_values():
    fig = plots.paper_comparison_bars({"res18": 80.0, "res18-d5a": 81.5, "res18-d7a": 79.0},
                                      {"res18": 53.69, "res18-d5a": 53.60}, title="Table 1")
    texts = _texts(fig)
    assert "81.5" in texts and "53.7" in texts and "53.6" in texts
    assert "this run" in texts and "paper" in texts and "res18-d7a" in texts
    assert len([ax for ax in fig.axes if ax.patches]) == 2  # ours and the paper's never share an axis


def test_sweep_dashboard_shows_both_sparsities():
    frame = results.metrics_frame(_runs())
    weights = {"res18-d5a": np.ones((10, 32)), "res18": -np.ones((10, 32))}
    fig = plots.sweep_dashboard(weights, frame, {"res18-d5a": {"small": 0.25, "never_routed": 0.5},
                                                 "res18": {"small": 0.0, "never_routed": float("nan")}},
                                class_names=[str(i) for i in range(10)], title="K = 5")
    texts = _texts(fig)
    assert "25%" in texts and "50%" in texts and "n/a" in texts and "never routed" in texts
    assert "res18-d5a" in texts and "res18" in texts and "K = 5" in texts
    assert sum(1 for ax in fig.axes if ax.images) == 2


def test_widget_frontend_is_off_outside_a_kernel(monkeypatch):
    monkeypatch.delenv("DKA_WIDGETS", raising=False)
    assert progress.widget_frontend_available() is False  # pytest: no IPython kernel
    monkeypatch.setenv("DKA_WIDGETS", "1")
    assert progress.widget_frontend_available() is True


def _markdown_rows(md: str) -> list[list[str]]:
    """The cells of a pipe table (alignment row dropped, escaped pipes kept inside their cell)."""
    lines = [line for line in md.strip().splitlines() if not set(line) <= set("|:- ")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]


def test_markdown_tables_format_columns_and_escape_pipes():
    df = pd.DataFrame({"model": ["a|b", "c"], "|w| < 1e-3 (%)": [1.234, np.nan], "epochs": [3, 4]})
    md = results.markdown_table(df, floatfmt={"|w| < 1e-3 (%)": ".1f"})
    assert _markdown_rows(md) == [["model", "\\|w\\| < 1e-3 (%)", "epochs"], ["a\\|b", "1.2", "3"], ["c", "–", "4"]]
    assert md.splitlines()[1].replace(" ", "").startswith("|:-") and md.splitlines()[1].rstrip().endswith(":|")
    assert _markdown_rows(results.markdown_table(df.set_index("model"), index=True))[0][0] == "model"


def test_tables_and_json_are_written(tmp_path):
    df = pd.DataFrame({"model": ["res18", "res18-d5a"], "top1": [80.123, np.nan], "paper": [95.10, 95.12]})
    csv_path, md_path = results.save_table(df, tmp_path / "table1", title="Table 1")
    assert pd.read_csv(csv_path).shape == (2, 3)
    md = md_path.read_text()
    assert md.startswith("**Table 1**\n\n")
    rows = _markdown_rows(md.split("\n\n", 1)[1])
    assert rows == [["model", "top1", "paper"], ["res18", "80.12", "95.10"], ["res18-d5a", "–", "95.12"]]
    path = results.save_json({"top1": np.float32(0.5), "n": np.int64(3)}, tmp_path / "m.json")
    assert json.loads(path.read_text()) == {"n": 3, "top1": 0.5}


def test_explanation_figure_names_units_concepts_and_residual():
    import torch

    from dka import explain, models

    torch.manual_seed(0)
    model = models.build("res18-d3a", num_classes=3, width=2).eval()
    images = torch.randn(2, 3, 16, 16)
    attr = explain.attribute(model, images)
    tally = pd.DataFrame({"unit": range(1, 17), "category": "color", "label": [f"c{u}" for u in range(1, 17)],
                          "score": np.linspace(0.3, 0.0, 16)})
    fig = plots.explanation_figure(images, {"res18-d3a": (attr, tally), "again": (attr, None)}, index=1, n=2,
                                   class_names=["a", "b", "c"], true_label=0)
    assert len(fig.axes) == 2 * 3
    titles = [ax.get_title() for ax in fig.axes]
    units = attr.top_units(2)[0][1] + 1
    assert titles[1].startswith(f"unit {int(units[0])}: ") and f"c{int(units[0])} (IoU" in titles[1]
    assert "K=3" in titles[0] and "true: a" in titles[0]
    assert fig.axes[0].get_xlabel().startswith("residual ")
    with pytest.raises(IndexError, match="out of range"):
        plots.explanation_figure(images, {"m": (attr, None)}, index=2)


def test_save_json_writes_strict_json(tmp_path):
    import json as _json

    import numpy as _np

    from dka import results as _results

    path = _results.save_json({"a": float("nan"), "b": _np.float32(0.5), "c": [_np.int64(3), float("inf")],
                             "d": _np.arange(2)}, tmp_path / "m.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert _json.loads(text) == {"a": None, "b": 0.5, "c": [3, None], "d": [0, 1]}


def test_method_panels_and_maps_show_absence_and_truth():
    import pandas as pd

    from dka import summaries

    scores = pd.DataFrame({"method": ["res18", "res18", "coda-s", "coda-s"], "seed": [0, 1, 0, 1],
                           "localisation": [0.4, 0.5, 0.7, 0.8], "recovery precision": [0.3, 0.5, np.nan, np.nan]})
    table = summaries.method_table(scores)
    assert list(table["method"]) == ["res18", "coda-s"]
    assert table.loc[0, "localisation"] == "0.450 ± 0.071" and table.loc[1, "recovery precision"] == "–"
    fig = plots.metric_panels(scores, ["localisation", "recovery precision"])
    assert "n/a" in _texts(fig)
    images = torch.randn(2, 3, 8, 8)
    masks = torch.zeros(2, 8, 8, dtype=torch.bool)
    masks[:, 2:5, 2:5] = True
    fig = plots.method_maps(images, masks, {"a": torch.rand(2, 8, 8), "b": torch.rand(2, 8, 8)}, ["x", "y"])
    assert [ax.get_title() for ax in fig.axes[:4]] == ["image", "true concepts", "a", "b"]


def test_localisation_bars_show_every_method_model_and_the_chance_level():
    table = pd.DataFrame({"model": ["res18-d5a", "res18-d5a", "res18", "res18"],
                          "method": ["dka", "integrated_gradients"] * 2, "share": [0.5, 0.6, 0.48, np.nan],
                          "share_sd": [0.2, 0.25, 0.3, np.nan], "mask_area": [0.4, 0.4, 0.42, 0.42]})
    fig = plots.localisation_bars(table, title="where")
    texts = _texts(fig)
    assert "res18-d5a" in texts and "res18" in texts and "mask area (41 %): chance" in texts
    assert any("Integrated Gradients" in t for t in texts) and any("built-in" in t for t in texts)
    bars = [p for p in fig.axes[0].patches]
    assert sorted(round(b.get_height(), 1) for b in bars if not np.isnan(b.get_height())) == [48.0, 50.0, 60.0]
    assert "60" in [t.get_text() for t in fig.axes[0].texts]
