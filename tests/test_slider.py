"""The notebooks' K slider: one drawing per change of a control, shown in place, in any kernel with widgets."""

from __future__ import annotations

import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.figure  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from IPython.display import DisplayHandle  # noqa: E402

from dka import experiments, plots, progress, results  # noqa: E402

KS = [1, 5, 10, 25, 50, 100]
MODELS = ["res18", *(f"res18-d{k}a" for k in KS)]


@pytest.fixture
def shown(monkeypatch):
    """Every object the slider's figure handle is updated with (instead of a front-end)."""
    updates = []
    monkeypatch.setattr(DisplayHandle, "update", lambda self, obj, **kw: updates.append(obj))
    return updates


def _sweep_draw(calls: list):
    """The notebooks' draw_sweep on synthetic runs: the real dashboard, one figure per call."""
    rng = np.random.default_rng(0)
    heads = {name: rng.normal(size=(10, 32)) for name in MODELS}
    records = {name: [{"epoch": e, "test_top1": 40.0 + e, "train_top1": 45.0 + e, "sparsity": {"head": 0.1 * e},
                       "never_routed": {"head": 0.2 * e} if name != "res18" else {}} for e in (1, 2)]
               for name in MODELS}
    frame = results.metrics_frame(records)
    sparsity = {name: {"small": 0.1, "never_routed": float("nan") if name == "res18" else 0.5} for name in MODELS}

    def draw(K, compare_with):
        calls.append((K, compare_with))
        shown = list(dict.fromkeys([f"res18-d{K}a", compare_with]))
        return plots.sweep_dashboard({n: heads[n] for n in shown}, frame, {n: sparsity[n] for n in shown},
                                     class_names=[str(c) for c in range(10)], title=f"K = {K}")

    return draw


def test_every_k_is_drawn_once_and_shown_in_place(monkeypatch, shown, tmp_path):
    monkeypatch.setenv("DKA_WIDGETS", "1")
    calls = []
    view = experiments.k_slider(_sweep_draw(calls), KS, 5, MODELS, "res18", save_to=tmp_path / "default.png")
    assert isinstance(view, experiments.SliderView)
    assert calls == [(5, "res18")] and (tmp_path / "default.png").stat().st_size > 0
    assert plt.get_fignums() == []  # the default view is displayed once, not again by the inline backend
    slider = view.controls["K"]
    assert slider.continuous_update is False and list(slider.options) == KS
    assert view.controls["compare_with"].style.description_width == "initial"  # "compare with" is not cut off
    for k in [k for k in KS if k != 5] + [5]:
        before = len(calls)
        slider.value = k
        assert calls[before:] == [(k, "res18")]  # exactly one drawing per change
        assert len(shown) == view.redraws == len(calls) - 1  # ...which replaces the figure shown
        assert isinstance(shown[-1], matplotlib.figure.Figure) and shown[-1].axes[0].figure is shown[-1]
        assert plt.get_fignums() == []  # nothing left open to be shown twice
    view.controls["compare_with"].value = "res18-d100a"
    assert calls[-1] == (5, "res18-d100a") and len(shown) == len(KS) + 1
    slider.value = 5  # no change: no redraw
    assert len(shown) == len(KS) + 1


def test_a_failing_drawing_is_shown_where_the_figure_was(monkeypatch, shown):
    monkeypatch.setenv("DKA_WIDGETS", "1")

    def draw(K, compare_with):
        if K == 10:
            raise KeyError("res18-d10a")
        return plt.figure()

    view = experiments.k_slider(draw, [5, 10], 5, ["res18"], "res18")
    with pytest.raises(KeyError):
        view.controls["K"].value = 10
    assert "res18-d10a" in shown[-1].data and plt.get_fignums() == []


def test_without_widgets_the_default_view_is_drawn_once(monkeypatch, shown, tmp_path):
    monkeypatch.setenv("DKA_WIDGETS", "0")
    calls = []
    assert experiments.k_slider(_sweep_draw(calls), KS, 5, MODELS, "res18", save_to=tmp_path / "d.png") is None
    assert calls == [(5, "res18")] and shown == [] and plt.get_fignums() == []
    with pytest.raises(ValueError, match="no default value"):
        experiments.interactive_figure(lambda **kw: plt.figure(), {"K": [1]}, {})


def _fake_kernel(monkeypatch):
    import IPython

    monkeypatch.setattr(IPython, "get_ipython", lambda: types.SimpleNamespace(kernel=object()))
    for variable in ("DKA_WIDGETS", "JPY_SESSION_NAME", "VSCODE_PID", "VSCODE_CWD"):
        monkeypatch.delenv(variable, raising=False)


def test_widgets_in_any_kernel_widget_bars_only_where_a_frontend_is_known(monkeypatch):
    monkeypatch.delenv("DKA_WIDGETS", raising=False)
    assert progress.widgets_available() is False  # plain Python: no kernel
    _fake_kernel(monkeypatch)  # a kernel with no known front-end variable (Colab, a VS Code variant, ...)
    assert progress.in_kernel() and progress.widgets_available() is True
    assert progress.widget_frontend_available() is False  # progress bars stay text there
    monkeypatch.setenv("JPY_SESSION_NAME", "01_cifar.ipynb")
    assert progress.widget_frontend_available() is True
    monkeypatch.setenv("DKA_WIDGETS", "0")  # the pipeline's recorded notebooks
    assert progress.widgets_available() is False and progress.widget_frontend_available() is False
