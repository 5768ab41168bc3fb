"""Progress bars and widgets that suit where the code runs.

Two decisions, for two different costs of being wrong:

- `widgets_available()` — may this code create ipywidgets (the notebooks' sliders)? Yes in any IPython
  kernel where ipywidgets imports: JupyterLab, Notebook, VS Code, Colab and whatever comes next all
  render them, and a rule keyed on one front-end's environment variables silently drops the slider on
  the others. A headless executor keeps a handful of controls as a few kB of state; the pipeline sets
  DKA_WIDGETS=0 so its recorded notebooks carry no dead controls.
- `widget_frontend_available()` — should progress bars be widgets? Only where a front-end is known to
  be attached: `tqdm.auto` would otherwise store every bar's widget state (hundreds of kB) in notebooks
  executed headless, while a text bar where a widget would have worked costs nothing.

DKA_WIDGETS=1 / DKA_WIDGETS=0 forces both.
"""

from __future__ import annotations

import os
import sys

__all__ = ["tqdm", "widget_frontend_available", "widgets_available", "in_kernel"]

_HEADLESS_MININTERVAL = 5.0  # seconds between text updates when nobody watches a terminal or widget
# Set in the kernel's environment by the front-ends that render widget bars (Jupyter Server, VS Code).
_FRONTEND_VARIABLES = ("JPY_SESSION_NAME", "VSCODE_PID", "VSCODE_CWD")


def _forced() -> bool | None:
    value = os.environ.get("DKA_WIDGETS")
    return None if value not in ("0", "1") else value == "1"


def in_kernel() -> bool:
    """Whether this code runs inside an IPython kernel (a notebook), not a terminal or plain Python."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return getattr(get_ipython(), "kernel", None) is not None


def _ipywidgets_importable() -> bool:
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        return False
    return True


def _frontend_attached() -> bool:
    return "google.colab" in sys.modules or any(os.environ.get(v) for v in _FRONTEND_VARIABLES)


def widgets_available() -> bool:
    """Whether to create interactive widgets: in a kernel where ipywidgets imports (DKA_WIDGETS forces)."""
    forced = _forced()
    return forced if forced is not None else in_kernel() and _ipywidgets_importable()


def widget_frontend_available() -> bool:
    """Whether progress bars should be widgets: a kernel with a front-end known to render them."""
    forced = _forced()
    return forced if forced is not None else in_kernel() and _frontend_attached()


def tqdm(*args, **kwargs):
    """`tqdm.tqdm` with the bar kind chosen as the module docstring says (same arguments)."""
    if widget_frontend_available():
        from tqdm.notebook import tqdm as bar

        return bar(*args, **kwargs)
    from tqdm.std import tqdm as bar

    if in_kernel():  # headless notebook: few, plain updates
        kwargs.setdefault("mininterval", _HEADLESS_MININTERVAL)
        kwargs.setdefault("ascii", True)
    return bar(*args, **kwargs)
