"""Progress bars: plain text outside a widget frontend, the same arguments as tqdm."""

from tqdm.std import tqdm as std_tqdm

from dka.progress import tqdm, widget_frontend_available


def test_text_bar_outside_a_notebook(monkeypatch):
    monkeypatch.delenv("DKA_WIDGETS", raising=False)
    assert widget_frontend_available() is False
    bar = tqdm(range(5), desc="x", disable=True)
    assert isinstance(bar, std_tqdm) and list(bar) == [0, 1, 2, 3, 4]


def test_widget_switch_can_be_forced(monkeypatch):
    monkeypatch.setenv("DKA_WIDGETS", "0")
    assert widget_frontend_available() is False
    monkeypatch.setenv("DKA_WIDGETS", "1")
    assert widget_frontend_available() is True
